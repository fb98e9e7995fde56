"""One named device mesh and one table of logical-axis rules.

Parameters and activations carry *logical* axis names (``embed``, ``mlp``,
``heads``, ``vocab``, ``batch``, ``length`` ...). A rules table maps each logical
name to zero or more mesh axes (``data``, ``fsdp``, ``tensor``). Two tables ship:
``TRAIN_RULES`` (FSDP + tensor parallel) and ``SAMPLE_RULES`` (weights only
tensor-sharded, so decoding does not all-gather FSDP shards every token). Moving
weights between layouts is :func:`reshard`, a ``jax.device_put`` onto the other
sharding; nothing is gathered to one device.

A mesh axis is dropped from a spec when it does not divide the array dimension,
or when an earlier dimension of the same array already uses it, so one rules table
serves every model size and mesh shape (a 2-KV-head model on a 4-way tensor axis
keeps its KV heads replicated instead of failing).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]

# Logical name -> mesh axis (str), tuple of mesh axes, or None (replicated).
TRAIN_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("scalar_out", None),
    ("cache_length", None),
)

# Sampling: weights replicated over data/fsdp and split over tensor only.
SAMPLE_RULES: Rules = tuple(
    (name, None if name == "embed" else axes) for name, axes in TRAIN_RULES
)

_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar(
    "rlhf_jax_axis_rules", default=TRAIN_RULES
)


@contextlib.contextmanager
def axis_rules(rules: Rules):
  """Sets the logical-axis rules used by :func:`with_logical_constraint`."""
  token = _RULES.set(tuple(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def current_rules() -> Rules:
  return _RULES.get()


def make_mesh(
    shape: Mapping[str, int] | Sequence[int] | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Builds a ``(data, fsdp, tensor)`` mesh.

  Args:
    shape: sizes per axis, as a mapping ``{"data": 2, "fsdp": 2, "tensor": 2}``
      or a 3-sequence in ``MESH_AXES`` order. One size may be ``-1`` (the rest of
      the devices). ``None`` puts every device on ``fsdp``.
    devices: devices to use; defaults to ``jax.devices()`` (all hosts).

  Returns:
    A mesh whose axes are all of type ``Auto`` (GSPMD propagation).
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if shape is None:
    sizes = [1, -1, 1]
  elif isinstance(shape, Mapping):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(
          f"mesh shape has unknown axes {sorted(unknown)}; valid axes are {MESH_AXES}"
      )
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
    if len(sizes) != len(MESH_AXES):
      raise ValueError(f"mesh shape {tuple(sizes)} must have {len(MESH_AXES)} sizes {MESH_AXES}")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  if -1 in sizes:
    rest = math.prod(s for s in sizes if s != -1)
    if n % rest:
      raise ValueError(
          f"mesh shape {dict(zip(MESH_AXES, sizes))} does not divide {n} devices"
      )
    sizes[sizes.index(-1)] = n // rest
  if math.prod(sizes) != n:
    raise ValueError(
        f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
        f"but {n} are available"
    )
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types, devices=devices)


def _mesh_axis_sizes(mesh) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes") else mesh.devices.shape))


def logical_to_spec(
    names: Sequence[str | None],
    *,
    shape: Sequence[int] | None = None,
    mesh=None,
    rules: Rules | None = None,
) -> P:
  """Maps logical axis names to a ``PartitionSpec``.

  Unknown logical names raise. With ``shape`` and ``mesh`` given, mesh axes that
  do not divide the dimension (or are absent from the mesh) are dropped.
  """
  rules = dict(current_rules() if rules is None else rules)
  sizes = _mesh_axis_sizes(mesh) if mesh is not None else None
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
    target = rules[name]
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    kept = []
    prod = 1
    for a in axes:
      if a in used:
        continue
      if sizes is not None:
        if a not in sizes:
          continue
        if shape is not None and shape[i] % (prod * sizes[a]):
          continue
        prod *= sizes[a]
      kept.append(a)
    used.update(kept)
    spec.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return P(*spec)


def with_logical_constraint(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """``with_sharding_constraint`` by logical names; a no-op outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  spec = logical_to_spec(names, shape=x.shape, mesh=mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _is_variable(x) -> bool:
  from flax import nnx  # local: parallel stays importable without flax users

  return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh, rules: Rules | None = None):
  """NamedShardings for an ``nnx.State`` whose Variables carry ``axes`` metadata.

  Variables without ``axes`` are replicated.
  """

  def one(v):
    value = v.get_value() if hasattr(v, "get_value") else v.value
    axes = v.get_metadata().get("axes") if hasattr(v, "get_metadata") else getattr(v, "axes", None)
    if axes is None:
      spec = P()
    else:
      spec = logical_to_spec(axes, shape=value.shape, mesh=mesh, rules=rules)
    return v.replace(NamedSharding(mesh, spec))

  return jax.tree.map(one, state, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Rules | None = None, shape=None) -> NamedSharding:
  """Sharding of a ``[B, ...]`` batch array: batch over the ``batch`` rule axes.

  With ``shape``, mesh axes that do not divide ``B`` are left out (replicated).
  """
  spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh=mesh, rules=rules, shape=shape)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def reshard(tree, shardings):
  """Moves a pytree onto other shardings (train <-> sample layout), device to device."""
  return jax.device_put(tree, shardings)


def host_local_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules | None = None):
  """Assembles per-host batch slices into global arrays sharded over ``batch``.

  Each process passes its own rows (its slice of the global batch, in process
  order); on one process this is a plain sharded ``device_put``.
  """
  out = {}
  for key, local in batch.items():
    local = np.asarray(local)
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    sharding = batch_sharding(mesh, local.ndim, rules, shape=global_shape)
    if jax.process_count() == 1:
      out[key] = jax.device_put(local, sharding)
    else:
      out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return out


def data_parallel_axes(mesh, rules: Rules | None = None) -> dict[str, int]:
  """``{mesh axis: size}`` of the axes a batch is split over (the ``batch`` rule's axes in ``mesh``)."""
  rules = dict(current_rules() if rules is None else rules)
  target = rules.get("batch")
  axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
  sizes = _mesh_axis_sizes(mesh)
  return {a: int(sizes[a]) for a in axes if a in sizes}


def check_batch_divisible(batch, *, key: str = "batch_size", rules: Rules | None = None) -> None:
  """Raises when a device batch does not split over the mesh's data-parallel devices.

  ``batch``: a pytree of global arrays (e.g. from :func:`host_local_to_global`). Each
  array with a ``NamedSharding`` and a leading (batch) dimension must have that
  dimension divisible by the product of the data-parallel axes (``data`` × ``fsdp``
  under the default rules); otherwise :func:`batch_sharding` would replicate it and
  every device would compute the whole batch. Host arrays and scalars are not checked.

  Raises:
    rlhf_jax.errors.ConfigError: one line naming the batch size, the data-parallel
      size and ``config.<key>``, the key to change.
  """
  from rlhf_jax.errors import ConfigError

  for x in jax.tree.leaves(batch):
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding) or not getattr(x, "ndim", 0):
      continue
    axes = data_parallel_axes(sharding.mesh, rules)
    n = math.prod(axes.values())
    rows = int(x.shape[0])
    if n > 1 and rows % n:
      where = " x ".join(f"{a}={s}" for a, s in axes.items())
      raise ConfigError(
          f"config.{key}: a batch of {rows} rows does not split over the {n} data-parallel devices (mesh {where}), "
          f"so every device would compute all {rows}; set {key} to a multiple of {n} or use fewer devices "
          f"(config.mesh)")
