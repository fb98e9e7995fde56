"""Online weight averaging inside a train step: EMA and the running (uniform) mean.

Both are optax-style ``(init, update)`` pairs over a NamedTuple state, so the average
lives in the train-state pytree (``jax.eval_shape``, shardings and Orbax handle it like
the parameters) and ``update`` is a pure function to call inside a jitted step:

    avg = merge.ema(0.999)
    state = avg.init(params)                  # the average starts at the parameters
    ...
    state = avg.update(new_params, state)     # in the step, after the optimizer update
    reference_params = state.average

- `ema`: ``θ̄_t = d·θ̄_{t−1} + (1 − d)·θ_t`` (Polyak averaging with exponential forgetting;
  an EMA reference model for KL regularisation, or the weights to evaluate);
- `running_mean`: ``θ̄_t = θ̄_{t−1} + (θ_t − θ̄_{t−1})/(t + 1)``, the uniform average of every
  parameter vector passed (stochastic weight averaging, Izmailov et al. 2018).

Element-wise arithmetic only: each leaf of the average keeps the sharding of its parameter.

Not done: an "AMA-style adaptive weight". The AMA/HMA paper (Lin et al. 2024, "Mitigating the
Alignment Tax of RLHF") interpolates a pre- and a post-RLHF model with per-layer-group ratios that
are searched offline against a reward and a capability score; it defines no online averaging
weight. Its interpolation step with given per-layer ratios is
`rlhf_jax.merge.scale_task_vector` applied to ``θ_pre`` and ``θ_RLHF``; the search for the ratios
is not implemented.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Averager", "AveragerState", "ema", "running_mean"]


class AveragerState(NamedTuple):
  """State of an online average.

  Attributes:
    count: int32 scalar, the number of ``update`` calls so far.
    average: the averaged parameters, a pytree like the parameters (same dtypes unless a
      ``dtype`` was given to the factory).
  """

  count: jax.Array
  average: Any


class Averager(NamedTuple):
  """An optax-style pair of pure functions.

  Attributes:
    init: ``init(params) -> AveragerState``; accepts ``jax.ShapeDtypeStruct`` leaves under
      ``jax.eval_shape``.
    update: ``update(params, state) -> AveragerState``; jit-able.
  """

  init: Callable[[Any], AveragerState]
  update: Callable[[Any, AveragerState], AveragerState]


def _init(dtype):
  def init(params) -> AveragerState:
    average = jax.tree.map(lambda p: jnp.asarray(p, dtype or p.dtype), params)
    return AveragerState(count=jnp.zeros((), jnp.int32), average=average)
  return init


def _blend(average, params, w):
  """``average + w·(params − average)`` leaf by leaf, in float32, cast back to the average's dtype."""
  return jax.tree.map(
      lambda a, p: (a.astype(jnp.float32) + w * (p.astype(jnp.float32) - a.astype(jnp.float32))).astype(a.dtype),
      average, params)


def ema(decay: float, *, dtype=None) -> Averager:
  """Exponential moving average of parameters: ``θ̄ ← d·θ̄ + (1 − d)·θ``.

  Args:
    decay: ``d`` in ``[0, 1]`` (a Python float or a traced scalar, e.g. from a schedule);
      ``0`` tracks the parameters, ``1`` freezes the initial ones.
    dtype: dtype of the average (e.g. ``jnp.float32`` over bf16 parameters); default the
      parameters' own.

  Returns:
    An `Averager`; ``init(params)`` starts the average at ``params``.

  Raises:
    ValueError: a Python ``decay`` outside ``[0, 1]``.

  Examples:
    >>> avg = ema(0.5)
    >>> s = avg.update({"w": jnp.array([2.0])}, avg.init({"w": jnp.array([0.0])}))
    >>> s.average["w"], s.count
    (Array([1.], dtype=float32), Array(1, dtype=int32))
  """
  if not isinstance(decay, jax.core.Tracer) and not 0.0 <= float(decay) <= 1.0:
    raise ValueError(f"ema: decay must be in [0, 1]; got {decay}")

  def update(params, state: AveragerState) -> AveragerState:
    return AveragerState(count=state.count + 1, average=_blend(state.average, params, 1.0 - decay))

  return Averager(_init(dtype), update)


def running_mean(*, dtype=None) -> Averager:
  """The uniform average of the initial parameters and every parameter vector passed to ``update``.

  After ``n`` updates the average is ``(θ_0 + θ_1 + … + θ_n)/(n + 1)``, computed incrementally as
  ``θ̄ ← θ̄ + (θ − θ̄)/(n + 1)`` (stochastic weight averaging).

  Examples:
    >>> avg = running_mean()
    >>> s = avg.init({"w": jnp.array([0.0])})
    >>> for x in (3.0, 6.0):
    ...   s = avg.update({"w": jnp.array([x])}, s)
    >>> s.average["w"]
    Array([3.], dtype=float32)
  """

  def update(params, state: AveragerState) -> AveragerState:
    count = state.count + 1
    w = 1.0 / (count.astype(jnp.float32) + 1.0)
    return AveragerState(count=count, average=_blend(state.average, params, w))

  return Averager(_init(dtype), update)
