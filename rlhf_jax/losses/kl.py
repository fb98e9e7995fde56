"""KL penalties between the policy and a reference policy from sampled log-probs, and KL controllers.

Per-token estimators of KL(π ‖ π_ref) from the log-probabilities of tokens *sampled from π*
(Schulman 2020, "Approximating KL divergence"), with ``u = log r = log π − log π_ref``:

- ``k1`` (alias ``kl``): ``u``. Unbiased value, can be negative.
- ``k2`` (alias ``mse``): ``½·u²``. Biased value, unbiased gradient.
- ``k3`` (alias ``low_var_kl``): ``exp(−u) − 1 + u``, with ``−u`` clamped to ``[−20, 20]`` and the
  result to ``[−10, 10]`` as verl does. Unbiased value, always ≥ 0, low variance.
- ``abs``: ``|u|``. Always ≥ 0.

Any name with a trailing ``+`` (``k1+``, ``k3+``, ``low_var_kl+``, ...) is verl's straight-through
variant: the *value* of the named estimator with the *gradient* of ``k2``,
``k2 − sg(k2) + sg(k)``. Used as a loss on samples from π, ``k2``'s expected gradient
``E_π[u·∇log π]`` is the gradient of KL(π ‖ π_ref), while ``k1``'s is 0 and ``k3``'s
``E_π[(1 − π_ref/π)·∇log π]`` is the gradient of the *forward* KL(π_ref ‖ π); the ``+`` variants
therefore log the chosen KL value and follow the reverse-KL gradient.

Placement: `kl_loss` is the per-token penalty added to the policy loss (verl ``use_kl_loss``,
default ``low_var_kl``; GRPO); `kl_penalty` is the raw estimator, e.g. to subtract
``β·kl_penalty(...)`` from the token rewards (verl ``use_kl_in_reward``, PPO/RLHF). The reference
log-probs are targets: their gradient is stopped inside.

Controllers are optax-style ``(init, update)`` pairs over a NamedTuple state (`KLControllerState`),
so the coefficient lives in the train-state pytree: `fixed_kl_controller` and
`adaptive_kl_controller` (Ziegler et al. 2019).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses.registry import register
from rlhf_jax.ops import _checks

__all__ = [
    "KL_ESTIMATORS",
    "KLController",
    "KLControllerState",
    "adaptive_kl_controller",
    "fixed_kl_controller",
    "kl_loss",
    "kl_penalty",
]

Array = jax.Array

_BASE_ALIASES = {"k1": "k1", "kl": "k1", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3", "abs": "abs"}

KL_ESTIMATORS: tuple[str, ...] = tuple(sorted(_BASE_ALIASES)) + tuple(sorted(n + "+" for n in _BASE_ALIASES))
"""Every accepted ``kind`` of `kl_penalty` / `kl_loss`: verl's ``kl_penalty`` names and their ``+`` forms."""


def _base(kind: str) -> tuple[str, bool]:
  if not isinstance(kind, str) or kind not in KL_ESTIMATORS:
    raise ValueError(f"Unknown KL estimator {kind!r}; valid names are {list(KL_ESTIMATORS)}.")
  straight_through = kind.endswith("+")
  return _BASE_ALIASES[kind.rstrip("+")], straight_through


def _estimate(log_ratio: Array, base: str) -> Array:
  if base == "k1":
    return log_ratio
  if base == "k2":
    return 0.5 * jnp.square(log_ratio)
  if base == "abs":
    return jnp.abs(log_ratio)
  # k3 as verl's low_var_kl: x = log π_ref − log π clamped to [−20, 20]; exp(x) − x − 1 clamped to [−10, 10].
  x = jnp.clip(-log_ratio, -20.0, 20.0)
  return jnp.clip(jnp.expm1(x) - x, -10.0, 10.0)


def _check_pair(logps, ref_logps) -> None:
  _checks.check_floating(logps, "logps_BxT")
  _checks.check_same_shape(logps, ref_logps, "logps_BxT", "ref_logps_BxT")
  _checks.check_floating(ref_logps, "ref_logps_BxT")


def _kl(logps, ref_logps, kind: str, stop_gradient: bool) -> Array:
  base, straight_through = _base(kind)
  logps = jnp.asarray(logps)
  dtype = jnp.promote_types(logps.dtype, jnp.float32)
  ref = jnp.asarray(ref_logps).astype(dtype)
  ref = jax.lax.stop_gradient(ref) if stop_gradient else ref
  log_ratio = logps.astype(dtype) - ref
  value = _estimate(log_ratio, base)
  if not straight_through or base == "k2":
    return value
  k2 = 0.5 * jnp.square(log_ratio)
  return k2 - jax.lax.stop_gradient(k2) + jax.lax.stop_gradient(value)


def kl_penalty(
    logps_BxT: Array,
    ref_logps_BxT: Array,
    *,
    kind: str,
    stop_gradient: bool = True,
) -> Array:
  """Per-token KL(π ‖ π_ref) estimate from sampled tokens' log-probs (verl's ``kl_penalty``).

  ``kind`` is one of `KL_ESTIMATORS`: ``k1``/``kl`` = ``log r``; ``k2``/``mse`` =
  ``½(log r)²``; ``k3``/``low_var_kl`` = ``exp(−log r) − 1 + log r`` (``−log r`` clamped to
  ``[−20, 20]`` and the result to ``[−10, 10]`` as verl); ``abs`` = ``|log r|``; with a trailing
  ``+``: the value of that estimator with the gradient of ``k2`` (straight-through). No mask:
  every entry is computed (use `kl_loss` for a masked per-token penalty).

  Args:
    logps_BxT: log π of the sampled tokens, any shape (usually ``[B, T]``).
    ref_logps_BxT: log π_ref of the same tokens, same shape (gradient stopped).
    kind: the estimator name (static).
    stop_gradient: stop the gradient of ``ref_logps_BxT``.

  Returns:
    ``kl_BxT``: the estimates, shape of the inputs, float32 (or wider).

  Raises:
    ValueError: on an unknown ``kind``, mismatched shapes or non-floating inputs.

  References:
    Schulman 2020, `Approximating KL Divergence <http://joschu.net/blog/kl-approx.html>`_.

  Examples:
    >>> lp, ref = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))
    >>> [round(float(kl_penalty(lp, ref, kind=k)[0]), 4) for k in ("k1", "k2", "k3", "abs")]
    [0.6931, 0.2402, 0.1931, 0.6931]
  """
  _base(kind)
  _check_pair(logps_BxT, ref_logps_BxT)
  return _kl(logps_BxT, ref_logps_BxT, kind, stop_gradient)


@register(
    "kl_loss", kind="regularizer",
    formula="k(log π − log π_ref) per token, k ∈ {k1, k2, k3/low_var_kl, abs} (+: k2 gradient)",
    reference="Schulman 2020, Approximating KL Divergence (joschu.net/blog/kl-approx.html); "
    "Shao et al. 2024, DeepSeekMath, GRPO's KL loss (arXiv:2402.03300)",
    hparams=("kind='low_var_kl'",),
)
def kl_loss(
    logps_BxT: Array,
    ref_logps_BxT: Array,
    mask_BxT: Array,
    *,
    kind: str = "low_var_kl",
    stop_gradient: bool = True,
) -> Array:
  """Per-token KL penalty to add to a policy loss (verl ``use_kl_loss``, GRPO's β·KL term).

  ``kl_loss[b, t] = kl_penalty(logps, ref_logps, kind=kind)[b, t]`` where ``mask[b, t] != 0``,
  exactly 0 (with zero gradient) where masked whatever the inputs hold there. Float mask weights
  are not applied here: the aggregation you pass the same mask to weighs each token once. Multiply by the coefficient
  (``kl_loss_coef``, or a controller's ``state.coef``) and add to the per-token policy loss
  before the aggregation, or aggregate it separately. verl's default ``kind`` is ``low_var_kl``
  (``k3``) as in GRPO; ``k3+`` keeps its value with an unbiased gradient.

  Args:
    logps_BxT: log π of the sampled tokens, ``[B, T]``.
    ref_logps_BxT: log π_ref of the same tokens, ``[B, T]`` (gradient stopped).
    mask_BxT: completion-token mask (bool or float weights), ``[B, T]``.
    kind: one of `KL_ESTIMATORS` (static).
    stop_gradient: stop the gradient of ``ref_logps_BxT``.

  Returns:
    ``kl_BxT``: per-token penalties, ``[B, T]``, 0 where masked.

  Raises:
    ValueError: on an unknown ``kind``, mismatched shapes or non-floating log-probs.

  References:
    Schulman 2020, `Approximating KL Divergence <http://joschu.net/blog/kl-approx.html>`_;
    Shao et al. 2024, `DeepSeekMath <https://arxiv.org/abs/2402.03300>`_.

  Examples:
    >>> lp, ref = jnp.log(jnp.array([[0.5, 0.5]])), jnp.log(jnp.array([[0.25, 0.25]]))
    >>> kl_loss(lp, ref, jnp.array([[1, 0]])).round(3)  # k3 = ½ − 1 + log 2
    Array([[0.193, 0.   ]], dtype=float32)
  """
  _base(kind)
  _checks.check_rank(logps_BxT, 2, "logps_BxT")
  _check_pair(logps_BxT, ref_logps_BxT)
  _checks.check_same_shape(logps_BxT, mask_BxT, "logps_BxT", "mask_BxT")
  mask = jnp.asarray(mask_BxT)
  keep = mask != 0
  logps = jnp.where(keep, jnp.asarray(logps_BxT), 0.0)
  ref = jnp.where(keep, jnp.asarray(ref_logps_BxT), 0.0)
  kl = _kl(logps, ref, kind, stop_gradient)
  return jnp.where(keep, kl, 0.0)


# ----------------------------------------------------------------------------- controllers


class KLControllerState(NamedTuple):
  """State of a KL controller: the current coefficient ``coef`` (float32 scalar)."""

  coef: Array


class KLController(NamedTuple):
  """An optax-style pair of pure functions.

  Attributes:
    init: ``init(params=None) -> KLControllerState`` (the argument is ignored; it is there so
      the controller composes like an optax transformation and ``jax.eval_shape`` works).
    update: ``update(state, current_kl, n_steps=1) -> KLControllerState``; jit-able,
      ``current_kl`` and ``n_steps`` may be traced scalars.
  """

  init: Callable[..., KLControllerState]
  update: Callable[..., KLControllerState]


def _scalar(x, name: str) -> None:
  if np.ndim(x) != 0:
    raise ValueError(f"`{name}` must be a scalar; got shape {np.shape(x)}.")


def _positive(x, name: str) -> None:
  _scalar(x, name)
  if not isinstance(x, jax.core.Tracer) and not float(x) > 0:
    raise ValueError(f"`{name}` must be > 0; got {float(x)}.")


def fixed_kl_controller(coef: float) -> KLController:
  """A constant KL coefficient (verl ``kl_ctrl.type="fixed"``, TRL ``FixedKLController``).

  Args:
    coef: the coefficient β (>= 0).

  Returns:
    A `KLController` whose ``update`` returns the state unchanged.

  Raises:
    ValueError: if ``coef`` is not a scalar or is negative.

  Examples:
    >>> ctrl = fixed_kl_controller(0.05)
    >>> ctrl.update(ctrl.init(), 10.0, 256).coef
    Array(0.05, dtype=float32)
  """
  _scalar(coef, "coef")
  if not isinstance(coef, jax.core.Tracer) and float(coef) < 0:
    raise ValueError(f"`coef` must be >= 0; got {float(coef)}.")

  def init(params: Any = None) -> KLControllerState:
    del params
    return KLControllerState(coef=jnp.asarray(coef, jnp.float32))

  def update(state: KLControllerState, current_kl: Any = None, n_steps: Any = 1) -> KLControllerState:
    del current_kl, n_steps
    return state

  return KLController(init, update)


def adaptive_kl_controller(init_coef: float, target: float, horizon: float) -> KLController:
  """Adaptive KL coefficient of Ziegler et al. 2019 (verl/TRL ``AdaptiveKLController``).

  A proportional controller on the measured KL: ``e = clip(KL / target − 1, −0.2, 0.2)`` and
  ``β ← β·(1 + e·n_steps / horizon)``. The coefficient grows while the KL is above ``target``
  and shrinks while it is below; ``horizon`` sets how fast (verl/TRL pass the number of samples
  of the step as ``n_steps``, with ``horizon = 10000``).

  Args:
    init_coef: the initial coefficient β₀ (> 0).
    target: the target KL (> 0), per sequence or per token as the measured KL is.
    horizon: the horizon ``H`` (> 0).

  Returns:
    A `KLController`; ``update(state, current_kl, n_steps=1)`` applies one multiplicative step.

  Raises:
    ValueError: if an argument is not a positive scalar.

  References:
    Ziegler et al. 2019, `Fine-Tuning Language Models from Human Preferences
    <https://arxiv.org/abs/1909.08593>`_.

  Examples:
    >>> ctrl = adaptive_kl_controller(0.1, target=6.0, horizon=10000)
    >>> ctrl.update(ctrl.init(), 12.0, 500).coef  # e = 0.2: β·(1 + 0.2·500/10000)
    Array(0.101, dtype=float32)
  """
  _positive(init_coef, "init_coef")
  _positive(target, "target")
  _positive(horizon, "horizon")

  def init(params: Any = None) -> KLControllerState:
    del params
    return KLControllerState(coef=jnp.asarray(init_coef, jnp.float32))

  def update(state: KLControllerState, current_kl: Any, n_steps: Any = 1) -> KLControllerState:
    kl = jnp.asarray(current_kl, jnp.float32)
    error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    mult = 1.0 + error * jnp.asarray(n_steps, jnp.float32) / horizon
    return KLControllerState(coef=(state.coef * mult).astype(state.coef.dtype))

  return KLController(init, update)
