"""Critic losses (clipped MSE, HL-Gauss categorical) and the entropy bonus, per token.

Value losses take the critic's current predictions (differentiated), the predictions at rollout
time ``old_values_BxT`` and the ``returns_BxT`` targets (e.g. from GAE); old values and returns
are targets, their gradient is stopped inside. Masked positions give exactly 0 with zero
gradient. Reduce with an aggregation from `rlhf_jax.ops` (verl uses ``token-mean``).

The HL-Gauss head predicts a categorical distribution over ``M`` bins of ``[v_min, v_max]``
instead of a scalar, and is trained by cross-entropy towards the Gaussian-smoothed histogram of
the return (Imani & White 2018; Farebrother et al. 2024 find it scales better than MSE).
`hl_gauss_targets` builds those targets, `hl_gauss_values` reads a scalar value off the head.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses.registry import register
from rlhf_jax.rewards import heads
from rlhf_jax.ops import _checks

__all__ = [
    "clipped_value_loss",
    "entropy_bonus",
    "hl_gauss_targets",
    "hl_gauss_value_loss",
    "hl_gauss_values",
]

Array = jax.Array


def _concrete(x) -> float | None:
  if isinstance(x, jax.core.Tracer) or np.ndim(x) != 0:
    return None
  return float(x)


def _sg(x: Array, stop_gradient: bool) -> Array:
  return jax.lax.stop_gradient(x) if stop_gradient else x


def _check_bins(num_bins, v_min, v_max, sigma_ratio) -> None:
  if not isinstance(num_bins, (int, np.integer)) or num_bins < 2:
    raise ValueError(f"`num_bins` must be an integer >= 2; got {num_bins!r}.")
  lo, hi = _concrete(v_min), _concrete(v_max)
  if lo is None or hi is None:
    raise ValueError("`v_min` and `v_max` must be Python numbers (they fix the bins).")
  if not hi > lo:
    raise ValueError(f"`v_max` must be > `v_min`; got v_min={lo}, v_max={hi}.")
  s = _concrete(sigma_ratio)
  if s is not None and not s > 0:
    raise ValueError(f"`sigma_ratio` must be > 0; got {s}.")


@register(
    "clipped_value", kind="value",
    formula="½·max((v − R)², (clip(v, v_old − ε, v_old + ε) − R)²)",
    reference="Schulman et al. 2017, Proximal Policy Optimization Algorithms (arXiv:1707.06347), "
    "value clipping of the OpenAI baselines implementation",
    hparams=("clip_range",),
)
def clipped_value_loss(
    values_BxT: Array,
    old_values_BxT: Array,
    returns_BxT: Array,
    mask_BxT: Array,
    *,
    clip_range: float | None,
    stop_gradient: bool = True,
) -> Array:
  """PPO's clipped value loss, ``½·max((v − R)², (clip(v, v_old − ε, v_old + ε) − R)²)``.

  The prediction may not move more than ``ε = clip_range`` from the rollout-time value without
  being penalised as if it had stopped at the boundary (verl's ``compute_value_loss``, whose ½
  is applied after aggregation; TRL's PPO). ``clip_range=None`` gives the plain ``½·(v − R)²``.
  At ``v_old = v`` both terms are equal: ``½·(v − R)²``.

  Args:
    values_BxT: current critic predictions, ``[B, T]``.
    old_values_BxT: critic predictions at rollout time, ``[B, T]`` (gradient stopped).
    returns_BxT: return targets, ``[B, T]`` (gradient stopped).
    mask_BxT: completion-token mask (bool or float weights), ``[B, T]``.
    clip_range: ``ε >= 0`` (verl ``cliprange_value`` 0.5, TRL 0.2), or ``None`` for no clipping.
    stop_gradient: stop the gradient of ``old_values_BxT`` and ``returns_BxT``.

  Returns:
    ``losses_BxT``: per-token losses, ``[B, T]``, 0 where masked.

  Raises:
    ValueError: on mismatched shapes, non-floating values or a negative ``clip_range``.

  References:
    Schulman et al. 2017, `Proximal Policy Optimization Algorithms
    <https://arxiv.org/abs/1707.06347>`_.

  Examples:
    >>> v = jnp.array([[1.0, 1.0]])
    >>> clipped_value_loss(v, jnp.array([[1.0, 0.0]]), jnp.array([[3.0, 3.0]]), jnp.ones((1, 2)), clip_range=0.5)
    Array([[2.   , 3.125]], dtype=float32)
  """
  _checks.check_rank(values_BxT, 2, "values_BxT")
  _checks.check_floating(values_BxT, "values_BxT")
  _checks.check_same_shape(values_BxT, old_values_BxT, "values_BxT", "old_values_BxT")
  _checks.check_same_shape(values_BxT, returns_BxT, "values_BxT", "returns_BxT")
  _checks.check_same_shape(values_BxT, mask_BxT, "values_BxT", "mask_BxT")
  c = _concrete(clip_range) if clip_range is not None else None
  if c is not None and c < 0:
    raise ValueError(f"`clip_range` must be >= 0 or None; got {c}.")
  values = jnp.asarray(values_BxT)
  dtype = jnp.promote_types(values.dtype, jnp.float32)
  mask = jnp.asarray(mask_BxT)
  keep = mask != 0
  v = jnp.where(keep, values.astype(dtype), 0.0)
  ret = jnp.where(keep, _sg(jnp.asarray(returns_BxT).astype(dtype), stop_gradient), 0.0)
  losses = jnp.square(v - ret)
  if clip_range is not None:
    old = jnp.where(keep, _sg(jnp.asarray(old_values_BxT).astype(dtype), stop_gradient), 0.0)
    v_clipped = jnp.clip(v, old - clip_range, old + clip_range)
    losses = jnp.maximum(losses, jnp.square(v_clipped - ret))
  return jnp.where(keep, 0.5 * losses, 0.0)


def hl_gauss_targets(
    returns: Array, *, num_bins: int, v_min: float, v_max: float, sigma_ratio: float = 0.75
) -> Array:
  """HL-Gauss target distributions: a Gaussian around each return, integrated over the bins.

  The support ``[v_min, v_max]`` is cut into ``M = num_bins`` equal bins of width
  ``w = (v_max − v_min) / M`` with edges ``e_0 < … < e_M``; with ``σ = sigma_ratio·w`` and
  ``Φ`` the normal CDF (via ``erf``), bin ``i`` gets
  ``p_i = (Φ((e_{i+1} − y)/σ) − Φ((e_i − y)/σ)) / (Φ((e_M − y)/σ) − Φ((e_0 − y)/σ))``:
  the normal ``N(y, σ²)`` truncated to the support. Returns outside the support are clipped to
  it first (so the normaliser never vanishes). ``sigma_ratio = 0.75`` is the value
  Farebrother et al. recommend.

  Args:
    returns: scalar targets ``y``, any shape ``S``.
    num_bins: ``M >= 2`` (static).
    v_min: lower end of the support (Python number).
    v_max: upper end of the support (Python number, > ``v_min``).
    sigma_ratio: ``σ / w``, the smoothing in bin widths (> 0).

  Returns:
    Probabilities of shape ``S + (M,)`` (float32 or wider) summing to 1 over the last axis.

  Raises:
    ValueError: if the bins are ill-defined or ``returns`` is not floating.

  References:
    Farebrother et al. 2024, `Stop Regressing: Training Value Functions via Classification for
    Scalable Deep RL <https://arxiv.org/abs/2403.03950>`_; Imani & White 2018, `Improving
    Regression Performance with Distributional Losses <https://arxiv.org/abs/1806.04613>`_.

  Examples:
    >>> p = hl_gauss_targets(jnp.array(0.0), num_bins=4, v_min=-2.0, v_max=2.0)  # σ = 0.75
    >>> [round(float(x), 3) for x in p]
    [0.088, 0.412, 0.412, 0.088]
  """
  _check_bins(num_bins, v_min, v_max, sigma_ratio)
  _checks.check_floating(returns, "returns")
  # The projection itself is the reward heads' (one implementation of HL-Gauss in the project).
  return heads.hl_gauss_targets(returns, v_min=v_min, v_max=v_max, num_bins=num_bins,
                                sigma=sigma_ratio * (v_max - v_min) / num_bins)


def hl_gauss_values(logits_BxTxM: Array, *, v_min: float, v_max: float) -> Array:
  """The scalar value of an HL-Gauss head: ``Σ_i softmax(logits)_i·c_i`` over the bin centres ``c_i``.

  Args:
    logits_BxTxM: value-head logits over ``M`` bins, ``[..., M]``.
    v_min: lower end of the support.
    v_max: upper end of the support.

  Returns:
    The expected values, ``[...]`` (float32 or wider).

  Raises:
    ValueError: if the bins are ill-defined or the logits are not floating.

  Examples:
    >>> hl_gauss_values(jnp.zeros((1, 1, 4)), v_min=-2.0, v_max=2.0)
    Array([[0.]], dtype=float32)
  """
  _checks.check_min_rank(logits_BxTxM, 1, "logits_BxTxM")
  _checks.check_floating(logits_BxTxM, "logits_BxTxM")
  num_bins = int(np.shape(logits_BxTxM)[-1])
  _check_bins(num_bins, v_min, v_max, 1.0)
  return heads.categorical_to_scalar(logits_BxTxM, v_min=v_min, v_max=v_max, num_bins=num_bins)


@register(
    "hl_gauss_value", kind="value",
    formula="−Σ_i p_i(R)·log softmax(z)_i, p(R) = N(R, (0.75·bin width)²) integrated over the bins",
    reference="Farebrother et al. 2024, Stop Regressing: Training Value Functions via Classification "
    "for Scalable Deep RL (arXiv:2403.03950)",
    hparams=("v_min", "v_max", "sigma_ratio=0.75"),
)
def hl_gauss_value_loss(
    logits_BxTxM: Array,
    returns_BxT: Array,
    mask_BxT: Array,
    *,
    v_min: float,
    v_max: float,
    sigma_ratio: float = 0.75,
    stop_gradient: bool = True,
) -> Array:
  """Categorical (HL-Gauss) value loss: cross-entropy of the head against `hl_gauss_targets`.

  ``loss[b, t] = −Σ_i p_i(R_bt)·log softmax(logits_bt)_i`` with ``p(R)`` the Gaussian histogram
  of the return over ``M = logits_BxTxM.shape[-1]`` bins of ``[v_min, v_max]`` (σ = 0.75 bin
  widths by default). The head's value is `hl_gauss_values`. Computed in float32.

  Args:
    logits_BxTxM: value-head logits, ``[B, T, M]``.
    returns_BxT: return targets, ``[B, T]`` (gradient stopped; clipped to the support).
    mask_BxT: completion-token mask (bool or float weights), ``[B, T]``.
    v_min: lower end of the support (Python number).
    v_max: upper end of the support (Python number).
    sigma_ratio: Gaussian width in bin widths.
    stop_gradient: stop the gradient of ``returns_BxT``.

  Returns:
    ``losses_BxT``: per-token cross-entropies, ``[B, T]``, 0 where masked.

  Raises:
    ValueError: on mismatched shapes, non-floating inputs or ill-defined bins.

  References:
    Farebrother et al. 2024, `Stop Regressing: Training Value Functions via Classification for
    Scalable Deep RL <https://arxiv.org/abs/2403.03950>`_.

  Examples:
    >>> hl_gauss_value_loss(jnp.zeros((1, 1, 4)), jnp.zeros((1, 1)), jnp.ones((1, 1)),
    ...                     v_min=-2.0, v_max=2.0).round(4)  # uniform head: log 4
    Array([[1.3863]], dtype=float32)
  """
  _checks.check_rank(logits_BxTxM, 3, "logits_BxTxM")
  _checks.check_floating(logits_BxTxM, "logits_BxTxM")
  _checks.check_rank(returns_BxT, 2, "returns_BxT")
  if tuple(np.shape(logits_BxTxM))[:2] != tuple(np.shape(returns_BxT)):
    raise ValueError(
        f"`logits_BxTxM` must have shape [B, T, M] with [B, T] = {tuple(np.shape(returns_BxT))} "
        f"(the shape of `returns_BxT`); got {tuple(np.shape(logits_BxTxM))}."
    )
  _checks.check_same_shape(returns_BxT, mask_BxT, "returns_BxT", "mask_BxT")
  num_bins = int(np.shape(logits_BxTxM)[-1])
  _check_bins(num_bins, v_min, v_max, sigma_ratio)
  logits = jnp.asarray(logits_BxTxM)
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  mask = jnp.asarray(mask_BxT)
  keep = mask != 0
  logits = jnp.where(keep[..., None], logits.astype(dtype), 0.0)
  returns = jnp.where(keep, _sg(jnp.asarray(returns_BxT).astype(dtype), stop_gradient), 0.0)
  targets = hl_gauss_targets(returns, num_bins=num_bins, v_min=v_min, v_max=v_max, sigma_ratio=sigma_ratio)
  ce = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  return jnp.where(keep, ce, 0.0)


@register(
    "entropy_bonus", kind="regularizer",
    formula="−c·H(π(·| x, y_<t)) per token (added to the loss)",
    reference="Mnih et al. 2016, Asynchronous Methods for Deep Reinforcement Learning, entropy "
    "regularisation (arXiv:1602.01783)",
    hparams=("coef",),
)
def entropy_bonus(entropy_BxT: Array, mask_BxT: Array, *, coef: float) -> Array:
  """Entropy bonus as a per-token loss term: ``−coef·H_t`` (0 where masked).

  Adding it to the policy loss rewards higher-entropy next-token distributions (verl
  ``entropy_coeff``, TRL ``entropy_coef``); the gradient flows into the entropy, which usually
  comes from ``rlhf_jax.ops.entropy_from_logits``. ``coef`` may be a traced scalar (a schedule or
  an adaptive-entropy controller's state).

  Args:
    entropy_BxT: per-token entropies of the policy, ``[B, T]``.
    mask_BxT: completion-token mask (bool or float weights), ``[B, T]``.
    coef: the bonus coefficient ``c`` (>= 0 to encourage entropy).

  Returns:
    ``losses_BxT``: ``−c·H``, ``[B, T]``, 0 where masked.

  Raises:
    ValueError: on mismatched shapes or non-floating entropies.

  References:
    Mnih et al. 2016, `Asynchronous Methods for Deep Reinforcement Learning
    <https://arxiv.org/abs/1602.01783>`_.

  Examples:
    >>> entropy_bonus(jnp.array([[2.0, 1.0]]), jnp.array([[1, 0]]), coef=0.01)
    Array([[-0.02,  0.  ]], dtype=float32)
  """
  _checks.check_rank(entropy_BxT, 2, "entropy_BxT")
  _checks.check_floating(entropy_BxT, "entropy_BxT")
  _checks.check_same_shape(entropy_BxT, mask_BxT, "entropy_BxT", "mask_BxT")
  _checks.check_rank(coef, 0, "coef")
  entropy = jnp.asarray(entropy_BxT)
  dtype = jnp.promote_types(entropy.dtype, jnp.float32)
  mask = jnp.asarray(mask_BxT)
  keep = mask != 0
  h = jnp.where(keep, entropy.astype(dtype), 0.0)
  return jnp.where(keep, -jnp.asarray(coef, dtype) * h, 0.0)
