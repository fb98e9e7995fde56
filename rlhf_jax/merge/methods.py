"""Weight-space merges of models that share one architecture: soups, task arithmetic, TIES, DARE, SLERP, LiNeS.

Every function takes pytrees of parameters (an ``nnx.State``, a dict of arrays, a
dict ``{hf_name: array}`` read from safetensors) with the same structure and shapes,
and returns a pytree of that structure. The work is done leaf by leaf with
``jax.tree.map`` and ``jnp`` operations (element-wise arithmetic and global
reductions: sums, norms, counts), so sharded arrays stay sharded: each leaf of the
result is placed on the sharding of the corresponding leaf of the first input (the
base model), and no tensor is gathered to one host. Inside a ``jax.jit`` (e.g. a
soup built in a train step) the same functions trace like any ``jnp`` code.

Arithmetic is done in float32 and the result cast back to the base's dtype
(mergekit does the same with its base dtype).

A task vector is ``τ_i = θ_i − θ_base``. With M models:

- `linear`:          ``Σ_i w_i θ_i / Σ_i w_i`` (``normalize=False``: ``Σ_i w_i θ_i``); a model soup.
- `task_arithmetic`: ``θ_base + λ Σ_i τ_i`` (Ilharco et al. 2023).
- `ties`:            trim each ``τ_i`` to its top-``density`` magnitudes, elect a sign per entry from
                     ``Σ_i trim(τ_i)``, average the trimmed entries that agree with it, and add λ times
                     that (Yadav et al. 2023).
- `dare`:            drop each entry of ``τ_i`` with probability p, rescale the rest by ``1/(1−p)``,
                     then ``θ_base + λ Σ_i τ̃_i`` (Yu et al. 2024).
- `slerp`:           per tensor spherical interpolation between two models, linear when they are
                     nearly colinear (mergekit's ``slerp``).
- `lines`:           scale the task vector of layer ℓ (0-based) by ``α + β·ℓ/(L−1)`` (Wang et al. 2024).

References:
  Wortsman et al., 2022, `Model soups: averaging weights of multiple fine-tuned models improves
  accuracy without increasing inference time <https://arxiv.org/abs/2203.05482>`_.
  Ilharco et al., 2023, `Editing Models with Task Arithmetic <https://arxiv.org/abs/2212.04089>`_.
  Yadav et al., 2023, `TIES-Merging: Resolving Interference When Merging Models
  <https://arxiv.org/abs/2306.01708>`_.
  Yu et al., 2024, `Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
  Free Lunch <https://arxiv.org/abs/2311.03099>`_.
  Wang et al., 2024, `LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model
  Merging <https://arxiv.org/abs/2410.17146>`_.
  Goddard et al., 2024, `Arcee's MergeKit: A Toolkit for Merging Large Language Models
  <https://arxiv.org/abs/2403.13257>`_ (the reference implementation whose conventions these follow).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "dare",
    "dare_masks",
    "drop_and_rescale",
    "layer_index",
    "lines",
    "linear",
    "path_name",
    "scale_task_vector",
    "slerp",
    "task_arithmetic",
    "ties",
    "trim_top_k",
]

PyTree = Any

# mergekit's threshold above which |cos| counts as colinear (slerp falls back to lerp).
SLERP_DOT_THRESHOLD = 0.9995


# Paths, structure checks, placement ---------------------------------------------------------------


def _key_part(k) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def path_name(path) -> str:
  """A jax key path (or a tuple of keys) as a dotted name: ``layers.0.attn.wq``.

  The trailing ``.value`` of an NNX variable is dropped, so the name of a parameter
  of ``nnx.state(model)`` is its module path.
  """
  parts = [_key_part(k) for k in path]
  if parts and parts[-1] == "value" and type(path[-1]).__name__ == "GetAttrKey":
    parts = parts[:-1]
  return ".".join(str(p) for p in parts)


def _flat(tree):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_name(p), x) for p, x in leaves], treedef


def _check_like(method: str, ref, others: Sequence, ref_name: str = "the base", names=None) -> list[str]:
  """Raises a ValueError naming the first parameter whose presence or shape differs; returns the names."""
  ref_leaves, ref_def = _flat(ref)
  ref_names = [n for n, _ in ref_leaves]
  for i, other in enumerate(others):
    who = names[i] if names else f"model {i}"
    leaves, treedef = _flat(other)
    got = {n: x for n, x in leaves}
    for n, x in ref_leaves:
      if n not in got:
        raise ValueError(f"{method}: parameter {n} is in {ref_name} but not in {who}")
    want = set(ref_names)
    for n, _ in leaves:
      if n not in want:
        raise ValueError(f"{method}: parameter {n} is in {who} but not in {ref_name}")
    for n, x in ref_leaves:
      if tuple(np.shape(got[n])) != tuple(np.shape(x)):
        raise ValueError(f"{method}: parameter {n} has shape {tuple(np.shape(got[n]))} in {who} "
                         f"but {tuple(np.shape(x))} in {ref_name}")
    if treedef != ref_def:
      raise ValueError(f"{method}: {who} has another tree structure than {ref_name} "
                       f"(same parameter names and shapes; different containers or metadata)")
  return ref_names


def _is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _place(out, like):
  """``out`` on ``like``'s sharding (a no-op when it is there already, and under a trace)."""
  if _is_tracer(out) or _is_tracer(like) or not isinstance(like, jax.Array):
    return out
  if out.sharding != like.sharding:
    out = jax.device_put(out, like.sharding)
  return out


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _map(method: str, leaf: Callable, ref, others: Sequence, statics: Callable[[str], tuple] = lambda n: (),
         extras: Sequence | None = None):
  """``leaf(ref_leaf, other_leaves, extra, *static)`` over the leaves, all in one jitted call.

  ``statics(name)`` gives each leaf's hashable Python constants (k, a scale); ``extras[j]`` its
  array arguments (keys, t). Outside a trace the call is jitted with ``out_shardings`` the
  shardings of ``ref``'s leaves and cached on (leaf, constants, shardings), so repeated merges of
  one model compile once; inside a trace it is plain ``jnp`` code.
  """
  names = _check_like(method, ref, others)
  ref_leaves, treedef = jax.tree_util.tree_flatten(ref)
  other_leaves = [jax.tree_util.tree_leaves(o) for o in others]
  ys = tuple(tuple(o[j] for o in other_leaves) for j in range(len(ref_leaves)))
  consts = tuple(tuple(statics(n)) for n in names)
  extras = tuple(extras) if extras is not None else (None,) * len(ref_leaves)
  leaves = tuple(ref_leaves)
  if any(_is_tracer(x) for x in jax.tree_util.tree_leaves((leaves, ys, extras))):
    out = _tree_impl(leaf, consts)(leaves, ys, extras)
  else:
    shardings = tuple(x.sharding if isinstance(x, jax.Array) else None for x in leaves)
    out = _tree_jit(leaf, consts, shardings)(leaves, ys, extras)
    out = [_place(o, x) for o, x in zip(out, leaves)]
  return jax.tree_util.tree_unflatten(treedef, list(out))


def _tree_impl(leaf: Callable, consts: tuple):
  def run(leaves, ys, extras):
    return [leaf(x, y, e, *c) for x, y, e, c in zip(leaves, ys, extras, consts)]
  return run


@functools.lru_cache(maxsize=64)
def _tree_jit(leaf: Callable, consts: tuple, shardings: tuple):
  if all(s is not None for s in shardings):
    return jax.jit(_tree_impl(leaf, consts), out_shardings=list(shardings))
  return jax.jit(_tree_impl(leaf, consts))


def _weights(w, m: int, name: str) -> tuple[float, ...]:
  if np.ndim(w) == 0:
    return (float(w),) * m
  w = tuple(float(v) for v in w)
  if len(w) != m:
    raise ValueError(f"`{name}` has {len(w)} entries for {m} models")
  return w


def _check_models(method: str, models) -> list:
  models = list(models)
  if not models:
    raise ValueError(f"{method}: `models` is empty")
  return models


# Linear soups and task arithmetic -----------------------------------------------------------------


def _linear_leaf(first, rest, _, weights, normalize):
  xs = (first,) + tuple(rest)
  acc = sum(w * _f32(x) for w, x in zip(weights, xs))
  if normalize:
    total = sum(weights)
    acc = acc / (total if abs(total) >= 1e-8 else 1.0)
  return acc.astype(xs[0].dtype)


def linear(models: Sequence[PyTree], weights: Sequence[float] | None = None, *, normalize: bool = True) -> PyTree:
  """A weighted average of parameters (a model soup; mergekit ``linear``).

  ``θ = Σ_i w_i θ_i / Σ_i w_i``; with ``normalize=False`` the plain weighted sum ``Σ_i w_i θ_i``.
  As in mergekit, a weight sum of (nearly) zero is not divided by.

  Args:
    models: M parameter pytrees of one structure and one set of shapes.
    weights: M weights; default ``1`` each (the uniform soup).
    normalize: divide by ``Σ_i w_i`` (mergekit's default for ``linear``).

  Returns:
    A pytree like ``models[0]``, each leaf in its dtype and on its sharding.

  Raises:
    ValueError: no models, a wrong number of weights, or a parameter that is missing or shaped
      differently in one model (the message names it).

  Examples:
    >>> a, b = {"w": jnp.array([0.0, 2.0])}, {"w": jnp.array([4.0, 6.0])}
    >>> linear([a, b], [1.0, 3.0])["w"]
    Array([3., 5.], dtype=float32)
  """
  models = _check_models("linear", models)
  w = _weights(1.0 if weights is None else weights, len(models), "weights")
  return _map("linear", _linear_leaf, models[0], models[1:], lambda n: (w, bool(normalize)))


def _ta_leaf(base, xs, _, lams):
  b = _f32(base)
  return (b + sum(l * (_f32(x) - b) for l, x in zip(lams, xs))).astype(base.dtype)


def task_arithmetic(base: PyTree, models: Sequence[PyTree], lam: float | Sequence[float] = 1.0) -> PyTree:
  """Task arithmetic: ``θ = θ_base + λ Σ_i (θ_i − θ_base)`` (mergekit ``task_arithmetic``).

  Args:
    base: the parameters the models were fine-tuned from.
    models: M fine-tuned parameter pytrees like ``base``.
    lam: λ, one scaling coefficient, or one per model (then ``θ_base + Σ_i λ_i τ_i``).

  Returns:
    A pytree like ``base`` (its dtypes and shardings).

  Raises:
    ValueError: as `linear`.

  Examples:
    >>> base, m = {"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([3.0, 0.0])}
    >>> task_arithmetic(base, [m], 0.5)["w"]
    Array([2. , 0.5], dtype=float32)
  """
  models = _check_models("task_arithmetic", models)
  lams = _weights(lam, len(models), "lam")
  return _map("task_arithmetic", _ta_leaf, base, models, lambda n: (lams,))


# TIES ---------------------------------------------------------------------------------------------


def _kth_largest_bits(bits, k: int):
  """The k-th largest of non-negative float32 bit patterns (int32), by bisection on counts.

  For non-negative IEEE floats the int32 bit pattern orders like the value, so
  ``max{t : #(bits ≥ t) ≥ k}`` is the k-th largest value. 31 halvings of
  ``[0, +inf]``, each one global count: sharded operands stay sharded (no sort, no gather).
  """
  def body(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    ok = jnp.sum(bits >= mid, dtype=jnp.int32) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo = jnp.int32(0)
  hi = jnp.int32(0x7F800001)  # one past +inf
  lo, _ = jax.lax.fori_loop(0, 31, body, (lo, hi))
  return lo


def _trim_mask(x, k: int):
  """Keeps the k largest |x| (ties at the threshold: lowest row-major index first).

  The threshold and the tie cut-off are both found by bisection on global counts (no sort,
  no reshape), so a sharded ``x`` stays sharded.
  """
  a = jnp.abs(_f32(x))
  bits = jax.lax.bitcast_convert_type(a, jnp.int32)
  thr = _kth_largest_bits(bits, k)
  greater = bits > thr
  need = k - jnp.sum(greater, dtype=jnp.int32)  # how many entries equal to the threshold to keep
  eq = bits == thr
  strides = [int(np.prod(x.shape[d + 1:], dtype=np.int64)) for d in range(x.ndim)]
  flat = sum((jax.lax.broadcasted_iota(jnp.int32, x.shape, d) * s for d, s in enumerate(strides)),
             jnp.zeros(x.shape, jnp.int32))

  def body(_, lohi):  # the largest cut c with #(eq & flat < c) <= need
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    ok = jnp.sum(eq & (flat < mid), dtype=jnp.int32) <= need
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  cut, _ = jax.lax.fori_loop(0, 32, body, (jnp.int32(0), jnp.int32(x.size + 1)))
  return greater | (eq & (flat < cut))


def _num_kept(size: int, density: float, name: str, method: str) -> int:
  k = int(density * size)  # mergekit: int(density * numel)
  if k < 1:
    raise ValueError(f"{method}: density {density} keeps no entry of parameter {name} ({size} entries)")
  return k


@functools.partial(jax.jit, static_argnames=("k",))
def _trim_leaf(x, *, k):
  return jnp.where(_trim_mask(x, k), x, jnp.zeros_like(x))


def trim_top_k(x: jax.Array, *, density: float) -> jax.Array:
  """``x`` with all but its ``int(density · x.size)`` largest magnitudes set to 0 (mergekit ``magnitude``).

  Entries tied at the threshold are kept in row-major order (lowest flat index first),
  so the result is deterministic; ``density >= 1`` returns ``x``.

  Examples:
    >>> trim_top_k(jnp.array([0.1, -3.0, 2.0, -2.0]), density=0.5)
    Array([ 0., -3.,  2.,  0.], dtype=float32)
  """
  if density >= 1:
    return x
  return _place(_trim_leaf(x, k=_num_kept(int(np.size(x)), density, "x", "trim_top_k")), x)


def _ties_leaf(base, xs, _, k, lam):
  b = _f32(base)
  trimmed = []
  for x in xs:
    d = _f32(x) - b
    trimmed.append(d if k is None else jnp.where(_trim_mask(d, k), d, 0.0))
  elected = jnp.where(sum(trimmed) >= 0, 1.0, -1.0)  # mergekit "sum" consensus: a zero sum elects +
  agree = [jnp.sign(d) == elected for d in trimmed]  # zeros (trimmed or unchanged) never agree
  total = sum(jnp.where(a, d, 0.0) for a, d in zip(agree, trimmed))
  count = sum(a.astype(jnp.float32) for a in agree)
  merged = total / jnp.maximum(count, 1.0)  # disjoint mean
  return (b + lam * merged).astype(base.dtype)


def ties(base: PyTree, models: Sequence[PyTree], *, density: float, lam: float = 1.0) -> PyTree:
  """TIES-merging: trim, elect sign, disjoint merge (Yadav et al. 2023; mergekit ``ties``).

  For every parameter tensor, with task vectors ``τ_i = θ_i − θ_base``:

  1. Trim: ``τ̂_i`` keeps the ``k = int(density · n)`` entries of ``τ_i`` of largest
     magnitude and zeroes the rest (ties at the threshold are broken by the lowest
     row-major index, so the result is deterministic).
  2. Elect: ``γ = sign(Σ_i τ̂_i)``, with ``+1`` where the sum is 0 (mergekit's ``sum`` consensus).
  3. Disjoint merge: ``τ_m = Σ_i [sign(τ̂_i) = γ]·τ̂_i / max(1, Σ_i [sign(τ̂_i) = γ])``;
     zeroed entries never agree, so they are not counted.

  ``θ = θ_base + λ·τ_m``. Every model has weight 1 (mergekit's per-model weights are not exposed).

  Args:
    base: the parameters the models were fine-tuned from.
    models: M fine-tuned parameter pytrees like ``base``.
    density: the fraction of each task vector's entries kept, in ``(0, 1]`` (1: no trimming).
    lam: λ, the scale of the merged task vector.

  Returns:
    A pytree like ``base`` (its dtypes and shardings).

  Raises:
    ValueError: ``density`` outside ``(0, 1]`` or keeping no entry of a tensor, or the pytrees
      differ (the message names the parameter).

  Examples:
    >>> base = {"w": jnp.zeros(4)}
    >>> m1, m2 = {"w": jnp.array([1.0, -2.0, 0.5, 3.0])}, {"w": jnp.array([3.0, 1.0, -4.0, 1.0])}
    >>> ties(base, [m1, m2], density=0.5)["w"]
    Array([ 3., -2., -4.,  3.], dtype=float32)
  """
  models = _check_models("ties", models)
  if not 0 < density <= 1:
    raise ValueError(f"ties: density must be in (0, 1]; got {density}")

  sizes = {n: int(np.size(x)) for n, x in zip(_check_like("ties", base, models),
                                                jax.tree_util.tree_leaves(base))}

  def consts(name):
    return (None if density >= 1 else _num_kept(sizes[name], density, name, "ties"), float(lam))

  return _map("ties", _ties_leaf, base, models, consts)


# DARE ---------------------------------------------------------------------------------------------


def _leaf_keys(key, num_models: int, num_leaves: int):
  """``keys[i][j]``: model i's key ``split(key, M)[i]``, split once more per leaf j (in tree order)."""
  return [jax.random.split(k, num_leaves) for k in jax.random.split(key, num_models)]


@functools.partial(jax.jit, static_argnames=("p",))
def _keep_mask(key, like, *, p):
  return jax.random.bernoulli(key, 1.0 - p, jnp.shape(like))


def drop_and_rescale(delta: jax.Array, *, p: float, key: jax.Array) -> jax.Array:
  """DARE's drop-and-rescale of one tensor: ``m ⊙ δ / (1 − p)`` with ``m ~ Bernoulli(1 − p)``.

  The mask is ``jax.random.bernoulli(key, 1 − p, δ.shape)`` (the same for any sharding of ``δ``:
  JAX's partitionable threefry), so ``E[result] = δ``.
  """
  _check_p(p)
  keep = _place(_keep_mask(key, delta, p=float(p)), delta)
  return _place(_rescale(delta, keep, p=float(p)), delta)


@functools.partial(jax.jit, static_argnames=("p",))
def _rescale(delta, keep, *, p):
  return jnp.where(keep, _f32(delta) / (1.0 - p), 0.0).astype(delta.dtype)


def _check_p(p: float) -> None:
  if not 0 <= p < 1:
    raise ValueError(f"dare: drop rate p must be in [0, 1); got {p}")


def dare_masks(base: PyTree, num_models: int, *, p: float, key: jax.Array) -> list[PyTree]:
  """The keep masks `dare` draws: one boolean pytree like ``base`` per model.

  Model i, leaf j (in ``jax.tree.leaves`` order) uses
  ``jax.random.split(jax.random.split(key, num_models)[i], num_leaves)[j]``.
  """
  _check_p(p)
  leaves, treedef = jax.tree_util.tree_flatten(base)
  keys = _leaf_keys(key, num_models, len(leaves))
  return [jax.tree_util.tree_unflatten(treedef, [_place(_keep_mask(keys[i][j], x, p=float(p)), x)
                                                  for j, x in enumerate(leaves)])
          for i in range(num_models)]


def _dare_leaf(base, xs, keys, p, lam):
  b = _f32(base)
  total = jnp.zeros_like(b)
  for x, k in zip(xs, keys):
    keep = jax.random.bernoulli(k, 1.0 - p, b.shape)
    total = total + jnp.where(keep, (_f32(x) - b) / (1.0 - p), 0.0)
  return (b + lam * total).astype(base.dtype)


def dare(base: PyTree, models: Sequence[PyTree], *, p: float, key: jax.Array, lam: float = 1.0) -> PyTree:
  """DARE (drop and rescale) followed by task arithmetic (Yu et al. 2024).

  ``θ = θ_base + λ Σ_i m_i ⊙ τ_i / (1 − p)``, ``m_i ~ Bernoulli(1 − p)`` entry-wise, independently
  per model and per tensor. The keys are deterministic: model i, leaf j (in ``jax.tree.leaves``
  order) draws with ``split(split(key, M)[i], num_leaves)[j]`` (`dare_masks` returns those masks).
  ``p = 0`` is `task_arithmetic`.

  Note: mergekit's ``dare_linear``/``dare_ties`` rescale the kept entries so the L1 norm of the task
  vector is unchanged; this is the paper's ``1/(1 − p)``.

  Args:
    base: the parameters the models were fine-tuned from.
    models: M fine-tuned parameter pytrees like ``base``.
    p: the drop rate, in ``[0, 1)``.
    key: a ``jax.random`` key.
    lam: λ, the scale of the summed task vectors.

  Returns:
    A pytree like ``base`` (its dtypes and shardings).

  Raises:
    ValueError: ``p`` outside ``[0, 1)``, or the pytrees differ (the message names the parameter).
  """
  models = _check_models("dare", models)
  _check_p(p)
  n = len(jax.tree_util.tree_leaves(base))
  keys = _leaf_keys(key, len(models), n)
  return _dare_with_keys(base, models, [tuple(k[j] for k in keys) for j in range(n)], p=p, lam=lam)


def _dare_with_keys(base, models, keys, *, p: float, lam: float):
  """`dare` with the keys given: ``keys[j]`` holds leaf j's key for each model."""
  return _map("dare", _dare_leaf, base, models, lambda n: (float(p), float(lam)), extras=keys)


# SLERP --------------------------------------------------------------------------------------------


def _slerp_leaf(a, bs, t, eps=1e-8):
  x, y = _f32(a), _f32(bs[0])
  nx, ny = jnp.linalg.norm(x), jnp.linalg.norm(y)
  ux = jnp.where(nx > eps, x / jnp.where(nx > eps, nx, 1.0), x)
  uy = jnp.where(ny > eps, y / jnp.where(ny > eps, ny, 1.0), y)
  dot = jnp.sum(ux * uy)
  colinear = jnp.abs(dot) > SLERP_DOT_THRESHOLD
  theta = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
  sin_theta = jnp.where(colinear, 1.0, jnp.sin(theta))
  s0 = jnp.where(colinear, 1.0 - t, jnp.sin((1.0 - t) * theta) / sin_theta)
  s1 = jnp.where(colinear, t, jnp.sin(t * theta) / sin_theta)
  return (s0 * x + s1 * y).astype(a.dtype)


def slerp(a: PyTree, b: PyTree, t: float) -> PyTree:
  """Per-tensor spherical linear interpolation from ``a`` (t = 0) to ``b`` (t = 1) (mergekit ``slerp``).

  Each tensor is flattened into a vector; with ``û = a/‖a‖``, ``v̂ = b/‖b‖`` (a norm ≤ 1e-8 is not
  divided by), ``cos Ω = û·v̂`` and

      slerp(a, b; t) = sin((1 − t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b,

  applied to the *unnormalised* tensors, as mergekit does. Where ``|cos Ω| > 0.9995`` (nearly
  colinear, including identical tensors) it is the linear ``(1 − t)·a + t·b``.

  Args:
    a: the first parameter pytree (``t = 0``; mergekit's base model).
    b: a pytree like ``a``.
    t: the interpolation factor (a Python or traced scalar).

  Returns:
    A pytree like ``a`` (its dtypes and shardings).

  Examples:
    >>> out = slerp({"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}, 0.5)
    >>> np.round(np.asarray(out["w"]), 4)
    array([0.7071, 0.7071], dtype=float32)
  """
  t = jnp.asarray(t, jnp.float32)
  n = len(jax.tree_util.tree_leaves(a))
  return _map("slerp", _slerp_leaf, a, [b], extras=[t] * n)


# LiNeS --------------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"(?:^|[._/])(?:layers|layer|h|blocks)[._/]?(\d+)(?:[._/]|$)")
_FIRST_RE = re.compile(r"(?:^|[._/])(embed|embed_tokens|wte|wpe|tok_embeddings)(?:[._/]|$)")


def layer_index(name: str) -> int:
  """The depth of a parameter for `lines`, from its dotted name.

  - a block parameter: its block index (``layers.3.attn.wq`` in ``nnx.state`` of
    :class:`rlhf_jax.models.Transformer`, ``model.layers.3.mlp.up_proj.weight`` in a
    Hugging Face checkpoint, ``layers_3`` in Linen-style trees) -> 3;
  - the token embedding (``embed``, ``model.embed_tokens.weight``) -> 0, the shallowest layer;
  - anything else (final norm, LM head, scalar head) -> -1, i.e. the deepest layer ``L − 1``.

  With tied embeddings the one ``embed`` matrix is both ends; it is counted as layer 0.
  """
  m = _LAYER_RE.search(name)
  if m:
    return int(m.group(1))
  if _FIRST_RE.search(name):
    return 0
  return -1


def _scale_leaf(base, xs, _, scale):
  b = _f32(base)
  return (b + scale * (_f32(xs[0]) - b)).astype(base.dtype)


def scale_task_vector(base: PyTree, model: PyTree, scale_of: Callable[[str], float]) -> PyTree:
  """``θ_base + s(name)·(θ − θ_base)`` per parameter, with ``s = scale_of(path_name)`` a Python float.

  The general form of `lines`; e.g. per-layer-group interpolation ratios between a pre- and a
  post-RLHF model (the interpolation step of Lin et al. 2024's heterogeneous model averaging):
  ``scale_of = lambda name: ratios[min(layer_index(name) % L * len(ratios) // L, len(ratios) - 1)]``.
  """
  return _map("scale_task_vector", _scale_leaf, base, [model], lambda n: (float(scale_of(n)),))


def lines(base: PyTree, model: PyTree, *, alpha: float, beta: float, num_layers: int,
          layer_of: Callable[[str], int] = layer_index) -> PyTree:
  """LiNeS: layer-increasing scaling of a task vector (Wang et al. 2024).

  ``θ_ℓ = θ_base,ℓ + λ(ℓ)·(θ_ℓ − θ_base,ℓ)`` with ``λ(ℓ) = α + β·ℓ/(L − 1)`` for the 0-based
  layer ℓ (the paper's ``α + β(ℓ − 1)/(L − 1)`` for ℓ = 1..L): shallow layers keep little of the
  fine-tuning, the deepest layer ``α + β``. For a multi-task merge pass the merged model (e.g. the
  output of `task_arithmetic` with λ = 1) as ``model``; the paper then sets ``α`` from the number
  of tasks.

  Args:
    base: the pre-trained parameters.
    model: the fine-tuned (or merged) parameters, like ``base``.
    alpha: the scale of the shallowest layer.
    beta: the increase from the shallowest to the deepest layer.
    num_layers: L, the number of layers (transformer blocks); ``L = 1`` scales everything by α.
    layer_of: maps a parameter's dotted name (`path_name`) to its layer, negative counting from
      the end (``-1`` is ``L − 1``); default `layer_index`.

  Returns:
    A pytree like ``base`` (its dtypes and shardings).

  Raises:
    ValueError: ``num_layers < 1``, a layer index outside ``[-L, L)``, or the pytrees differ.
  """
  if num_layers < 1:
    raise ValueError(f"lines: num_layers must be >= 1; got {num_layers}")

  def scale_of(name: str) -> float:
    layer = int(layer_of(name))
    if not -num_layers <= layer < num_layers:
      raise ValueError(f"lines: parameter {name} is in layer {layer}, outside [0, {num_layers}) "
                       f"(num_layers={num_layers})")
    layer %= num_layers
    return float(alpha) + (float(beta) * layer / (num_layers - 1) if num_layers > 1 else 0.0)

  return _map("lines", _scale_leaf, base, [model], lambda n: (scale_of(n),))
