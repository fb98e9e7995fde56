"""LoRA: low-rank adapters on chosen linear layers of the transformer.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"
(arXiv:2106.09685). A target kernel ``W`` (e.g. ``attn.wq [D, N, H]``) gets an
adapter ``<name>_lora`` beside it with ``A [in..., r]`` (random) and
``B [r, out...]`` (zeros), both of the Variable type :class:`LoRA`, and the layer
computes ``x·W + (α/r)·dropout(x)·A·B`` (the model's ``_linear`` helper adds the
adapter term when one is attached). With ``B = 0`` the adapted model equals the
base exactly. Adapters carry logical ``axes`` (the kernel's input axes, then an
unsharded rank axis; the rank axis, then the kernel's output axes) so they shard
with the model.

Training only the adapters::

    model = lora.apply_lora(base, targets=("wq", "wv"), rank=8, alpha=16, rngs=nnx.Rngs(1))
    graphdef, state, sh = lora.create_lora_train_state(model, tx, mesh=mesh)
    step = make_train_step(lora.lora_loss(make_sft_loss()), tx, graphdef, mesh=mesh, state_shardings=sh)

``state.params`` (and so the gradients and the optimizer state) hold only the
adapters; the base weights sit in ``state.extras["frozen_params"]`` and the step
merges them back in. The frozen base is the DPO reference at no cost::

    loss = lora.lora_loss(make_preference_loss(ref_graphdef=lora.base_graphdef(model)), base_as_reference=True)

:func:`merge_lora` folds the adapters into the kernels (a plain ``Transformer``
for :func:`rlhf_jax.models.hf.export_hf`);
:func:`rlhf_jax.models.hf.export_adapter` writes the adapters alone in PEFT's
format (``adapter_model.safetensors`` + ``adapter_config.json``) for
``peft.PeftModel.from_pretrained`` on the base checkpoint.

A reward model or critic with a scalar head
(:func:`rlhf_jax.models.with_scalar_head`, called before :func:`apply_lora`)
never gets adapters on the head, and :func:`create_lora_train_state` trains the
head's ``scalar_head``/``scalar_bias`` with the adapters (``train_head=True``).
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from rlhf_jax.models import transformer
from rlhf_jax.parallel import mesh as mesh_lib

# Linear kernels of the transformer that can take an adapter: name -> number of
# leading input dimensions of the kernel (the rest are output dimensions).
KERNELS: dict[str, int] = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
ATTENTION = ("wq", "wk", "wv", "wo")
MLP = ("w_gate", "w_up", "w_down")
SUFFIX = "_lora"

_DROPOUT_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("rlhf_jax_lora_dropout", default=None)


class LoRA(nnx.Param):
  """The Variable type of adapter matrices: ``nnx.split(model, LoRA, ...)`` separates them."""


@contextlib.contextmanager
def dropout_rng(key: jax.Array | None):
  """Turns adapter dropout on for the forwards traced inside, with ``key``.

  Outside this context (or with ``key=None``) adapters are deterministic
  (evaluation mode), whatever their dropout rate. :func:`lora_loss` sets it
  from the step's rng.
  """
  token = _DROPOUT_KEY.set(key)
  try:
    yield
  finally:
    _DROPOUT_KEY.reset(token)


class LoRAAdapter(nnx.Module):
  """``(α/r)·dropout(x)·A·B`` for one kernel, called with the kernel's einsum equation.

  Attributes:
    a: :class:`LoRA` ``[in..., r]``.
    b: :class:`LoRA` ``[r, out...]``.
    scale: ``alpha / rank``.
    dropout: dropout rate on the adapter input (only inside :func:`dropout_rng`).
    index: the kernel's position in :data:`KERNELS`, folded into the dropout key
      with the block index (:func:`rlhf_jax.models.transformer.current_layer`), so
      every adapter draws its own mask while all blocks keep one structure (which
      ``ModelConfig.scan_layers`` needs).
  """

  def __init__(self, kernel: nnx.Variable, num_in: int, *, rank: int, alpha: float, dropout: float,
               index: int, rngs: nnx.Rngs):
    value = kernel.get_value()
    axes = tuple(kernel.get_metadata().get("axes") or (None,) * value.ndim)
    in_shape, out_shape = value.shape[:num_in], value.shape[num_in:]
    bound = 1.0 / math.sqrt(math.prod(in_shape))  # PEFT's kaiming_uniform(a=sqrt(5))
    a = jax.random.uniform(rngs.params(), (*in_shape, rank), jnp.float32, -bound, bound).astype(value.dtype)
    b = jnp.zeros((rank, *out_shape), value.dtype)
    a_axes, b_axes = (*axes[:num_in], None), (None, *axes[num_in:])
    sharding = getattr(value, "sharding", None)
    if isinstance(sharding, NamedSharding):  # born on the kernel's mesh, sharded by the same rules
      put = lambda x, ax: jax.device_put(x, NamedSharding(
          sharding.mesh, mesh_lib.logical_to_spec(ax, shape=x.shape, mesh=sharding.mesh)))
      a, b = put(a, a_axes), put(b, b_axes)
    self.a = LoRA(a, axes=a_axes)
    self.b = LoRA(b, axes=b_axes)
    self.scale = float(alpha) / rank
    self.dropout = float(dropout)
    self.index = int(index)

  def delta(self) -> jax.Array:
    """``(α/r)·A·B`` in fp32, shaped like the kernel."""
    a, b = self.a.get_value().astype(jnp.float32), self.b.get_value().astype(jnp.float32)
    return self.scale * jnp.tensordot(a, b, axes=1)

  def __call__(self, equation: str, x: jax.Array) -> jax.Array:
    lhs, out = equation.split("->")
    x_spec, w_spec = lhs.split(",")
    in_letters = "".join(c for c in w_spec if c in x_spec)
    out_letters = "".join(c for c in w_spec if c not in x_spec)
    batch_letters = "".join(c for c in x_spec if c not in w_spec)
    r = next(c for c in "RZYXWUQ" if c not in equation)
    dt = x.dtype
    key = _DROPOUT_KEY.get()
    if self.dropout > 0.0 and key is not None:
      key = jax.random.fold_in(jax.random.fold_in(key, transformer.current_layer()), self.index)
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(dt)
    h = jnp.einsum(f"{x_spec},{in_letters}{r}->{batch_letters}{r}", x, self.a.astype(dt))
    y = jnp.einsum(f"{batch_letters}{r},{r}{out_letters}->{out}", h, self.b.astype(dt))
    return y * jnp.asarray(self.scale, dt)


def _matches(patterns: Sequence[str], name: str, path: str) -> bool:
  return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(path, p) for p in patterns)


def _patterns(targets) -> tuple[str, ...]:
  if isinstance(targets, str):
    named = {"all": tuple(KERNELS), "attention": ATTENTION, "attn": ATTENTION, "mlp": MLP}
    return named.get(targets, (targets,))
  return tuple(targets)


def _modules(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      yield ".".join(str(p) for p in path), node


def adapters(model: nnx.Module) -> list[tuple[str, nnx.Module, str, LoRAAdapter]]:
  """``(dotted path of the kernel, owning module, kernel name, adapter)`` for every adapter."""
  out = []
  for path, module in _modules(model):
    for attr, value in list(vars(module).items()):
      if isinstance(value, LoRAAdapter) and attr.endswith(SUFFIX):
        name = attr[: -len(SUFFIX)]
        out.append((f"{path}.{name}" if path else name, module, name, value))
  return out


def apply_lora(
    model: nnx.Module,
    *,
    targets: str | Sequence[str] = ("wq", "wv"),
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    rngs: nnx.Rngs,
) -> nnx.Module:
  """A copy of ``model`` with LoRA adapters on the matching kernels.

  Args:
    model: a :class:`rlhf_jax.models.Transformer` (concrete, possibly sharded).
    targets: ``"all"``, ``"attention"``, ``"mlp"``, or kernel names / glob
      patterns matched against the kernel name (``"wq"``, ``"w_*"``) or its
      dotted path (``"layers.0.attn.*"``). Kernels: ``wq wk wv wo w_gate w_up w_down``.
    rank: ``r``.
    alpha: the adapter output is scaled by ``alpha / rank``.
    dropout: dropout rate on the adapter input, active only under
      :func:`dropout_rng` (:func:`lora_loss` sets it from the step rng).
    rngs: draws ``A`` (``rngs.params()``).

  Returns:
    A new module sharing the base arrays (no copy); ``model`` is unchanged.
  """
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
  patterns = _patterns(targets)
  model = nnx.clone(model)
  found = 0
  for path, module in list(_modules(model)):
    for name, num_in in KERNELS.items():
      kernel = vars(module).get(name)
      if not isinstance(kernel, nnx.Param) or isinstance(kernel, LoRA):
        continue
      if not _matches(patterns, name, f"{path}.{name}" if path else name):
        continue
      if hasattr(module, name + SUFFIX):
        raise ValueError(f"{path}.{name} already has a LoRA adapter")
      setattr(module, name + SUFFIX, LoRAAdapter(
          kernel, num_in, rank=rank, alpha=alpha, dropout=dropout, index=list(KERNELS).index(name), rngs=rngs))
      found += 1
  if not found:
    raise ValueError(f"no kernel matches LoRA targets {patterns}; kernels: {tuple(KERNELS)}")
  return model


def lora_state(model: nnx.Module) -> nnx.State:
  """The adapter parameters only (``nnx.state(model, LoRA)``)."""
  return nnx.state(model, LoRA)


def _strip(model: nnx.Module, *, merge: bool) -> nnx.Module:
  model = nnx.clone(model)
  for _, module, name, adapter in adapters(model):
    if merge:
      kernel = getattr(module, name)
      w = kernel.get_value()
      new = (w.astype(jnp.float32) + adapter.delta()).astype(w.dtype)
      if isinstance(getattr(w, "sharding", None), NamedSharding):
        new = jax.device_put(new, w.sharding)
      kernel.set_value(new)
    delattr(module, name + SUFFIX)
  return model


def merge_lora(model: nnx.Module) -> nnx.Module:
  """A plain model with every kernel ``W ← W + (α/r)·A·B`` (fp32 sum, cast back); for export."""
  return _strip(model, merge=True)


def base_model(model: nnx.Module) -> nnx.Module:
  """The frozen base: the model with its adapters dropped (shares the arrays)."""
  return _strip(model, merge=False)


def base_graphdef(model: nnx.Module) -> nnx.GraphDef:
  """Graph definition of the base model: the ``ref_graphdef`` for the frozen base as reference."""
  return nnx.graphdef(base_model(model))


def reference_from_lora(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
  """``(ref_graphdef, ref_params)`` of the frozen base (no copy), e.g. for
  :func:`rlhf_jax.train.preference.precompute_reference_logps`.

  In a LoRA train state prefer ``lora_loss(..., base_as_reference=True)``, which
  reads the base already held in ``extras["frozen_params"]`` instead of a second copy.
  """
  base = base_model(model)
  return nnx.graphdef(base), nnx.state(base)


HEAD_PARAMS = ("scalar_head", "scalar_bias")


def trainable_filter(model: nnx.Module | None = None, *, train_head: bool = True):
  """The NNX filter of what LoRA training updates: every :class:`LoRA` variable,
  plus the scalar head's ``scalar_head``/``scalar_bias`` when ``train_head`` and
  ``model`` has a head (``model=None``: whenever the head is there)."""
  has_head = model is None or bool(getattr(getattr(model, "config", None), "scalar_head_outputs", 0))
  if not (train_head and has_head):
    return LoRA
  return nnx.Any(LoRA, nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(k) for k in HEAD_PARAMS))))


def create_lora_train_state(model: nnx.Module, optimizer, *, seed: int = 0, mesh=None, extras: Any = None,
                            train_head: bool = True):
  """``create_train_state(model, optimizer, trainable=trainable_filter(model, train_head=...))``.

  Returns ``(graphdef, state, shardings)``; ``state.params`` and ``state.opt_state``
  hold only the adapter leaves and, for a model with a scalar head (a reward model
  or critic) and ``train_head=True``, the freshly initialised head
  (``scalar_head``, ``scalar_bias``), which has to learn too; the rest of the base
  is in ``state.extras["frozen_params"]``. (With a trained head, the frozen base
  lacks the head, so ``lora_loss(..., base_as_reference=True)`` applies to LM
  policies only.)
  """
  from rlhf_jax.train.state import create_train_state  # models does not import train at load time

  if not adapters(model):
    raise ValueError("the model has no LoRA adapters: call apply_lora first")
  return create_train_state(model, optimizer, seed=seed, mesh=mesh, extras=extras,
                            trainable=trainable_filter(model, train_head=train_head))


def lora_loss(loss_fn: Callable, *, base_as_reference: bool = False) -> Callable:
  """Wraps ``loss_fn(model, batch, rng)`` for LoRA training.

  * Adapter dropout is on, keyed by a split of the step's ``rng``.
  * ``base_as_reference``: the frozen base in ``extras["frozen_params"]`` is
    handed to the loss as ``extras["ref_params"]`` (use with
    ``ref_graphdef=base_graphdef(model)``), so DPO's reference costs no memory.
  """

  def wrapped(model, batch, rng):
    if base_as_reference:
      extras = batch.get("extras") or {}
      if "frozen_params" not in extras:
        raise ValueError("base_as_reference needs a state from create_lora_train_state (extras['frozen_params'])")
      batch = {**batch, "extras": {**extras, "ref_params": extras["frozen_params"]}}
    if rng is None:
      return loss_fn(model, batch, rng)
    drop_key, rng = jax.random.split(rng)
    with dropout_rng(drop_key):
      return loss_fn(model, batch, rng)

  return wrapped
