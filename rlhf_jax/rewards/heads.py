"""Reward-head math: categorical (HL-Gauss / two-hot) value heads, PRM steps, last-token gathering.

Pure functions on the arrays a head produces; the heads themselves (Flax modules) live in
`rlhf_jax.models`.

- **Categorical heads** ("Stop Regressing", Farebrother et al. 2024): a head emits logits over
  ``M = num_bins`` bins that split ``[v_min, v_max]`` evenly (edges ``b_0 < … < b_M``, centres
  ``z_i = (b_i + b_{i+1})/2``, width ``w = (v_max − v_min)/M``). A scalar target ``y`` becomes
  a distribution over bins (`hl_gauss_targets`, `two_hot_targets`), the head is trained with
  cross-entropy (`categorical_loss`; registered as ``hl_gauss`` and ``two_hot``) and read out
  as the expectation over the bin centres (`categorical_to_scalar`).
- **Process reward models**: per-token scores read at step-separator tokens
  (`prm_step_scores`), aggregated per solution (`prm_aggregate`), trained with a masked
  per-step BCE (`prm_bce`, registered).
- **Scalar reward models on a policy backbone**: the score of a sequence is the head's value at
  its last non-pad token (`last_token_index`, `gather_last`), for left- or right-padded batches.

Nothing is jitted at definition; ``num_bins``, ``how`` and ``max_steps`` must be static.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses.registry import register
from rlhf_jax.ops import _checks
from rlhf_jax.ops.reductions import last_token_index  # noqa: F401  (public here too)

__all__ = [
    "PRM_AGGREGATIONS",
    "bin_centers",
    "categorical_loss",
    "categorical_to_scalar",
    "gather_last",
    "hl_gauss",
    "hl_gauss_targets",
    "last_token_index",
    "prm_aggregate",
    "prm_bce",
    "prm_step_scores",
    "two_hot",
    "two_hot_targets",
]

Array = jax.Array

_STOP_REGRESSING = ("Farebrother et al. 2024, Stop Regressing: Training Value Functions via Classification "
                    "for Scalable Deep RL (arXiv:2403.03950)")


# ----------------------------------------------------------------------------- helpers


def _dtype(*xs: Any) -> jnp.dtype:
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def _concrete(x) -> float | None:
  if isinstance(x, jax.core.Tracer) or np.ndim(x) != 0:
    return None
  return float(x)


def _check_support(v_min, v_max, num_bins) -> None:
  if not isinstance(num_bins, (int, np.integer)) or isinstance(num_bins, bool) or num_bins < 2:
    raise ValueError(f"`num_bins` must be a Python int >= 2 (static); got {num_bins!r}.")
  lo, hi = _concrete(v_min), _concrete(v_max)
  if lo is not None and hi is not None and not hi > lo:
    raise ValueError(f"`v_max` must be > `v_min`; got v_min={lo}, v_max={hi}.")


def _edges(v_min, v_max, num_bins: int, dtype) -> Array:
  return jnp.linspace(jnp.asarray(v_min, dtype), jnp.asarray(v_max, dtype), num_bins + 1)


def bin_centers(*, v_min: float, v_max: float, num_bins: int, dtype=jnp.float32) -> Array:
  """Centres ``z_i = v_min + (i + ½)·w`` of ``num_bins`` equal bins on ``[v_min, v_max]``, shape ``[M]``.

  Examples:
    >>> bin_centers(v_min=0.0, v_max=1.0, num_bins=4)
    Array([0.125, 0.375, 0.625, 0.875], dtype=float32)
  """
  _check_support(v_min, v_max, num_bins)
  edges = _edges(v_min, v_max, num_bins, dtype)
  return (edges[:-1] + edges[1:]) / 2


def _check_logits(logits, num_bins: int) -> None:
  _checks.check_min_rank(logits, 1, "logits")
  _checks.check_floating(logits, "logits")
  if np.shape(logits)[-1] != num_bins:
    raise ValueError(
        f"The last axis of `logits` must have `num_bins`={num_bins} entries; got shape {np.shape(logits)}."
    )


# ----------------------------------------------------------------------------- categorical targets


def hl_gauss_targets(y: Array, *, v_min: float, v_max: float, num_bins: int, sigma: float) -> Array:
  """HL-Gauss target distribution: a Gaussian ``N(y, σ²)`` integrated over each bin, renormalised.

  ``p_i = [Φ((b_{i+1} − y)/σ) − Φ((b_i − y)/σ)] / [Φ((v_max − y)/σ) − Φ((v_min − y)/σ)]``,
  computed with ``erf`` as the paper's reference code. ``y`` is first clipped to
  ``[v_min, v_max]`` (an out-of-range target would otherwise have almost no mass in the support
  and the renormalisation would divide by ~0). The paper recommends ``σ = 0.75·w``
  (``sigma_ratio=0.75`` in `hl_gauss`); as ``σ → 0`` the target becomes one-hot on the bin
  holding ``y``.

  Args:
    y: scalar targets, any shape ``[...]`` (gradient stopped).
    v_min: lower end of the support.
    v_max: upper end of the support.
    num_bins: number of bins ``M`` (static Python int, >= 2).
    sigma: standard deviation ``σ > 0`` of the smoothing Gaussian (in units of ``y``).

  Returns:
    Target probabilities, shape ``[..., M]``, summing to 1 over the last axis.

  Raises:
    ValueError: on a bad ``num_bins``, ``v_max <= v_min`` or ``sigma <= 0`` (when concrete).

  Examples:
    >>> hl_gauss_targets(jnp.array(0.5), v_min=0.0, v_max=1.0, num_bins=2, sigma=1e-3)
    Array([0.5, 0.5], dtype=float32)

  References:
    Farebrother et al. 2024, `Stop Regressing: Training Value Functions via Classification for
    Scalable Deep RL <https://arxiv.org/abs/2403.03950>`_; Imani & White 2018, Improving
    Regression Performance with Distributional Losses (the histogram loss).
  """
  _check_support(v_min, v_max, num_bins)
  s = _concrete(sigma)
  if s is not None and not s > 0:
    raise ValueError(f"`sigma` must be > 0; got {s}.")
  dtype = _dtype(y)
  y = jax.lax.stop_gradient(jnp.asarray(y).astype(dtype))
  y = jnp.clip(y, jnp.asarray(v_min, dtype), jnp.asarray(v_max, dtype))
  edges = _edges(v_min, v_max, num_bins, dtype).reshape((1,) * y.ndim + (num_bins + 1,))  # explicit rank
  cdf = jax.scipy.special.erf((edges - y[..., None]) / (jnp.asarray(sigma, dtype) * math.sqrt(2.0)))
  z = cdf[..., -1:] - cdf[..., :1]
  return (cdf[..., 1:] - cdf[..., :-1]) / z


def two_hot_targets(y: Array, *, v_min: float, v_max: float, num_bins: int) -> Array:
  """Two-hot target distribution: ``y`` split between the two nearest bin centres.

  With centres ``z_i`` and ``z_i ≤ y ≤ z_{i+1}``: ``p_i = (z_{i+1} − y)/w``,
  ``p_{i+1} = (y − z_i)/w``, zero elsewhere, so ``Σ_i p_i z_i = y`` exactly. ``y`` is clipped to
  ``[z_0, z_{M−1}]`` (the centres' range; a target in the outer half-bins goes one-hot on the
  end bin). A target on a centre gives a one-hot distribution, the ``σ → 0`` limit of
  `hl_gauss_targets` there.

  Args:
    y: scalar targets, any shape ``[...]`` (gradient stopped).
    v_min: lower end of the support.
    v_max: upper end of the support.
    num_bins: number of bins ``M`` (static Python int, >= 2).

  Returns:
    Target probabilities, shape ``[..., M]``.

  Raises:
    ValueError: on a bad ``num_bins`` or ``v_max <= v_min`` (when concrete).

  Examples:
    >>> two_hot_targets(jnp.array(0.25), v_min=0.0, v_max=1.0, num_bins=4)
    Array([0.5, 0.5, 0. , 0. ], dtype=float32)

  References:
    Farebrother et al. 2024, `Stop Regressing <https://arxiv.org/abs/2403.03950>`_; Schrittwieser
    et al. 2020, MuZero (two-hot value targets).
  """
  _check_support(v_min, v_max, num_bins)
  dtype = _dtype(y)
  y = jax.lax.stop_gradient(jnp.asarray(y).astype(dtype))
  centers = bin_centers(v_min=v_min, v_max=v_max, num_bins=num_bins, dtype=dtype)
  width = centers[1] - centers[0]
  pos = (jnp.clip(y, centers[0], centers[-1]) - centers[0]) / width
  lo = jnp.clip(jnp.floor(pos), 0, num_bins - 2)
  frac = jnp.clip(pos - lo, 0.0, 1.0)
  lo = lo.astype(jnp.int32)
  return (jax.nn.one_hot(lo, num_bins, dtype=dtype) * (1.0 - frac)[..., None]
          + jax.nn.one_hot(lo + 1, num_bins, dtype=dtype) * frac[..., None])


def categorical_loss(logits: Array, target_probs: Array) -> Array:
  """Cross-entropy ``−Σ_i p_i·log softmax(logits)_i`` over the last axis.

  Args:
    logits: head logits, shape ``[..., M]``.
    target_probs: target distribution, same shape (gradient stopped). Zero-probability bins
      contribute exactly 0, even where the log-softmax is ``-inf``.

  Returns:
    Per-element losses, shape ``[...]``.

  Raises:
    ValueError: on mismatched shapes or non-floating logits.

  Examples:
    >>> categorical_loss(jnp.zeros(4), jnp.array([0.0, 1.0, 0.0, 0.0])).round(4)  # log 4
    Array(1.3863, dtype=float32)
  """
  _checks.check_min_rank(logits, 1, "logits")
  _checks.check_floating(logits, "logits")
  _checks.check_same_shape(logits, target_probs, "logits", "target_probs")
  dtype = _dtype(logits)
  p = jax.lax.stop_gradient(jnp.asarray(target_probs).astype(dtype))
  log_q = jax.nn.log_softmax(jnp.asarray(logits).astype(dtype), axis=-1)
  return -jnp.sum(jnp.where(p != 0, p * log_q, 0.0), axis=-1)


def categorical_to_scalar(logits: Array, *, v_min: float, v_max: float, num_bins: int) -> Array:
  """The scalar a categorical head predicts: ``Σ_i softmax(logits)_i·z_i`` over the bin centres.

  Args:
    logits: head logits, shape ``[..., M]``.
    v_min: lower end of the support.
    v_max: upper end of the support.
    num_bins: number of bins ``M`` (static).

  Returns:
    Scalar predictions, shape ``[...]``, in ``[z_0, z_{M−1}]``.

  Raises:
    ValueError: if the last axis is not ``num_bins`` long, or on a bad support.

  Examples:
    >>> logits = jnp.log(two_hot_targets(jnp.array(0.3), v_min=0.0, v_max=1.0, num_bins=4))
    >>> categorical_to_scalar(logits, v_min=0.0, v_max=1.0, num_bins=4).round(6)
    Array(0.3, dtype=float32)
  """
  _check_support(v_min, v_max, num_bins)
  _check_logits(logits, num_bins)
  dtype = _dtype(logits)
  centers = bin_centers(v_min=v_min, v_max=v_max, num_bins=num_bins, dtype=dtype)
  probs = jax.nn.softmax(jnp.asarray(logits).astype(dtype), axis=-1)
  return jnp.sum(probs * centers.reshape((1,) * (probs.ndim - 1) + (num_bins,)), axis=-1)


def _check_targets(logits, targets_scalar) -> None:
  if np.shape(logits)[:-1] != np.shape(targets_scalar):
    raise ValueError(
        f"`targets_scalar` must have the shape of `logits` without its last axis "
        f"{np.shape(logits)[:-1]}; got {np.shape(targets_scalar)}."
    )


@register(
    "hl_gauss", kind="reward",
    formula="−Σ_i p_i·log softmax(logits)_i, p_i = Φ((b_{i+1} − y)/σ) − Φ((b_i − y)/σ) renormalised, "
            "σ = sigma_ratio·bin width",
    reference=_STOP_REGRESSING,
    hparams=("v_min", "v_max", "num_bins", "sigma_ratio=0.75"),
)
def hl_gauss(
    logits: Array,
    targets_scalar: Array,
    *,
    v_min: float,
    v_max: float,
    num_bins: int,
    sigma_ratio: float = 0.75,
) -> Array:
  """HL-Gauss cross-entropy of a categorical head against scalar targets.

  ``categorical_loss(logits, hl_gauss_targets(y, σ = sigma_ratio·w))`` with the bin width
  ``w = (v_max − v_min)/num_bins``; ``sigma_ratio = σ/w = 0.75`` is the paper's recommendation
  (the target then spreads over about six bins). Read the prediction out with
  `categorical_to_scalar`.

  Args:
    logits: head logits, shape ``[..., M]`` (e.g. ``[B]``-many value heads: ``[B, M]``).
    targets_scalar: scalar targets (returns, rewards), shape ``[...]`` (gradient stopped).
    v_min: lower end of the support.
    v_max: upper end of the support.
    num_bins: number of bins ``M`` (static).
    sigma_ratio: ``σ / w``.

  Returns:
    Per-element losses, shape ``[...]``.

  Raises:
    ValueError: on mismatched shapes or a bad support.

  Examples:
    >>> hl_gauss(jnp.zeros((1, 8)), jnp.array([0.0]), v_min=-1.0, v_max=1.0, num_bins=8).round(4)
    Array([2.0794], dtype=float32)

  References:
    Farebrother et al. 2024, `Stop Regressing: Training Value Functions via Classification for
    Scalable Deep RL <https://arxiv.org/abs/2403.03950>`_.
  """
  _check_support(v_min, v_max, num_bins)
  _check_logits(logits, num_bins)
  _check_targets(logits, targets_scalar)
  sigma = sigma_ratio * (v_max - v_min) / num_bins
  probs = hl_gauss_targets(targets_scalar, v_min=v_min, v_max=v_max, num_bins=num_bins, sigma=sigma)
  return categorical_loss(logits, probs)


@register(
    "two_hot", kind="reward",
    formula="−Σ_i p_i·log softmax(logits)_i, p = two-hot of y on the two nearest bin centres",
    reference=_STOP_REGRESSING,
    hparams=("v_min", "v_max", "num_bins"),
)
def two_hot(
    logits: Array,
    targets_scalar: Array,
    *,
    v_min: float,
    v_max: float,
    num_bins: int,
    sigma_ratio: float | None = None,
) -> Array:
  """Two-hot cross-entropy of a categorical head against scalar targets.

  ``categorical_loss(logits, two_hot_targets(y))``.

  Args:
    logits: head logits, shape ``[..., M]``.
    targets_scalar: scalar targets, shape ``[...]`` (gradient stopped).
    v_min: lower end of the support.
    v_max: upper end of the support.
    num_bins: number of bins ``M`` (static).
    sigma_ratio: unused; accepted so `two_hot` and `hl_gauss` share one call.

  Returns:
    Per-element losses, shape ``[...]``.

  Raises:
    ValueError: on mismatched shapes or a bad support.

  Examples:
    >>> two_hot(jnp.zeros((1, 4)), jnp.array([0.25]), v_min=0.0, v_max=1.0, num_bins=4).round(4)
    Array([1.3863], dtype=float32)

  References:
    Farebrother et al. 2024, `Stop Regressing <https://arxiv.org/abs/2403.03950>`_.
  """
  del sigma_ratio
  _check_support(v_min, v_max, num_bins)
  _check_logits(logits, num_bins)
  _check_targets(logits, targets_scalar)
  probs = two_hot_targets(targets_scalar, v_min=v_min, v_max=v_max, num_bins=num_bins)
  return categorical_loss(logits, probs)


# ----------------------------------------------------------------------------- PRM


def prm_step_scores(
    token_scores_BxT: Array, step_mask_BxT: Array, *, max_steps: int | None = None, fill_value: float = 0.0
) -> tuple[Array, Array]:
  """Gathers per-token scores at step-separator positions into a left-packed per-step layout.

  A process reward model scores every token; its step scores are the values at the tokens that
  end a reasoning step (``step_mask_BxT`` nonzero there, e.g. where ``input_ids`` is the step
  separator ``"\\n\\n"`` / ``"ки"``). Step ``s`` of row ``b`` is the ``s``-th marked position of
  that row, in order.

  Args:
    token_scores_BxT: per-token scores (logits or probabilities), shape ``[B, T]``.
    step_mask_BxT: 1 (nonzero) at step-end tokens, shape ``[B, T]``.
    max_steps: ``S``, the number of step slots (static; default ``T``). Steps beyond ``S``
      are dropped.
    fill_value: the score written in empty slots.

  Returns:
    ``(step_scores_BxS, step_valid_BxS)``: the scores of the steps in order, and a bool mask of
    the slots that hold a step. Gradients flow to the gathered tokens.

  Raises:
    ValueError: on a rank other than 2, mismatched shapes, or a bad ``max_steps``.

  Examples:
    >>> scores, valid = prm_step_scores(jnp.array([[0.1, 0.9, 0.2, 0.8]]), jnp.array([[0, 1, 0, 1]]),
    ...                                 max_steps=3)
    >>> scores, valid
    (Array([[0.9, 0.8, 0. ]], dtype=float32), Array([[ True,  True, False]], dtype=bool))
  """
  _checks.check_rank(token_scores_BxT, 2, "token_scores_BxT")
  _checks.check_same_shape(token_scores_BxT, step_mask_BxT, "token_scores_BxT", "step_mask_BxT")
  t = np.shape(token_scores_BxT)[1]
  s = t if max_steps is None else max_steps
  if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 1:
    raise ValueError(f"`max_steps` must be a Python int >= 1 (static) or None; got {max_steps!r}.")
  marked_BxT = jnp.asarray(step_mask_BxT) != 0
  order_BxT = jnp.argsort(~marked_BxT, axis=-1, stable=True)  # marked positions first, in order
  if s > t:
    order_BxT = jnp.pad(order_BxT, ((0, 0), (0, s - t)))
  order_BxS = order_BxT[:, :s]
  count_B = jnp.sum(marked_BxT, axis=-1)
  valid_BxS = jnp.arange(s)[None, :] < count_B[:, None]
  gathered_BxS = jnp.take_along_axis(jnp.asarray(token_scores_BxT), order_BxS, axis=-1)
  return jnp.where(valid_BxS, gathered_BxS, jnp.asarray(fill_value, gathered_BxS.dtype)), valid_BxS


PRM_AGGREGATIONS = ("min", "last", "product", "mean")
"""Names accepted by `prm_aggregate`'s ``how``."""


def prm_aggregate(step_scores: Array, step_mask: Array, *, how: str, empty_value: float = 0.0) -> Array:
  """Aggregates per-step PRM scores into one score per solution.

  ``how`` (static):

  - ``"min"``: ``min_s p_s``, the weakest step (Lightman et al. 2023; Wang et al. 2024,
    Math-Shepherd).
  - ``"last"``: the score of the last step.
  - ``"product"``: ``Π_s p_s``, the probability that every step is correct (Lightman et al.).
  - ``"mean"``: the mean over steps.

  ``step_scores`` are usually step-correctness probabilities ``σ(step logits)``; the functions
  are applied as written to whatever is passed. A row with no step gives ``empty_value``.

  Args:
    step_scores: per-step scores, shape ``[B, S]`` (e.g. from `prm_step_scores`) or ``[B, T]``
      with the step mask on the token layout.
    step_mask: 1 (nonzero) where a step is, same shape; other entries may hold anything.
    how: one of `PRM_AGGREGATIONS`.
    empty_value: the result for rows without steps.

  Returns:
    Aggregated scores, shape ``[B]``.

  Raises:
    ValueError: on an unknown ``how``, a rank other than 2, or mismatched shapes.

  Examples:
    >>> p, m = jnp.array([[0.9, 0.5, 0.8, 0.0]]), jnp.array([[1, 1, 1, 0]])
    >>> [round(float(prm_aggregate(p, m, how=h)[0]), 4) for h in ("min", "last", "product", "mean")]
    [0.5, 0.8, 0.36, 0.7333]

  References:
    Lightman et al. 2023, `Let's Verify Step by Step <https://arxiv.org/abs/2305.20050>`_;
    Wang et al. 2024, `Math-Shepherd <https://arxiv.org/abs/2312.08935>`_.
  """
  if how not in PRM_AGGREGATIONS:
    raise ValueError(f"`how` must be one of {PRM_AGGREGATIONS}; got {how!r}.")
  _checks.check_rank(step_scores, 2, "step_scores")
  _checks.check_same_shape(step_scores, step_mask, "step_scores", "step_mask")
  dtype = _dtype(step_scores)
  valid = jnp.asarray(step_mask) != 0
  x = jnp.asarray(step_scores).astype(dtype)
  nonempty = jnp.any(valid, axis=-1)
  if how == "min":
    out = jnp.min(jnp.where(valid, x, jnp.inf), axis=-1)
  elif how == "product":
    out = jnp.prod(jnp.where(valid, x, 1.0), axis=-1)
  elif how == "mean":
    count = jnp.sum(valid, axis=-1).astype(dtype)
    out = jnp.sum(jnp.where(valid, x, 0.0), axis=-1) / jnp.maximum(count, 1.0)
  else:  # last
    positions = jnp.arange(x.shape[-1])
    last = jnp.max(jnp.where(valid, positions, -1), axis=-1)
    out = jnp.take_along_axis(x, jnp.maximum(last, 0)[:, None], axis=-1)[:, 0]
  return jnp.where(nonempty, out, jnp.asarray(empty_value, dtype))


@register(
    "prm_bce", kind="reward",
    formula="−[y_s·log σ(l_s) + (1 − y_s)·log σ(−l_s)] at step tokens, 0 elsewhere",
    reference="Lightman et al. 2023, Let's Verify Step by Step (arXiv:2305.20050); Wang et al. 2024, "
              "Math-Shepherd (arXiv:2312.08935)",
)
def prm_bce(step_logits_BxT: Array, step_labels_BxT: Array, step_mask_BxT: Array) -> Array:
  """Per-step binary cross-entropy of a process reward model, zero off the step tokens.

  ``loss[b, t] = −[y·log σ(l) + (1 − y)·log σ(−l)]`` where ``step_mask_BxT[b, t]`` is nonzero
  (a step-end token), else exactly 0 (labels there may be anything, e.g. ``-100`` or NaN).
  Labels are 1 for a correct step and 0 for a wrong one; soft labels in ``[0, 1]`` (e.g.
  Math-Shepherd's estimated step values) are allowed. Reduce with
  ``rlhf_jax.ops.token_mean(losses, step_mask_BxT)`` (mean over steps). Works on the token
  layout ``[B, T]`` and on a packed step layout ``[B, S]`` alike.

  Args:
    step_logits_BxT: per-token logits of "this step is correct", shape ``[B, T]``.
    step_labels_BxT: labels at step tokens, same shape (gradient stopped).
    step_mask_BxT: 1 (nonzero, or a float weight, applied by the aggregation) at step tokens.

  Returns:
    ``losses_BxT``: per-token losses, shape ``[B, T]``.

  Raises:
    ValueError: on mismatched shapes or non-floating logits.

  Examples:
    >>> prm_bce(jnp.array([[0.0, 5.0, 0.0]]), jnp.array([[-100.0, 1.0, 0.0]]),
    ...         jnp.array([[0, 1, 1]])).round(4)
    Array([[0.    , 0.0067, 0.6931]], dtype=float32)
  """
  _checks.check_min_rank(step_logits_BxT, 1, "step_logits_BxT")
  _checks.check_floating(step_logits_BxT, "step_logits_BxT")
  _checks.check_same_shape(step_logits_BxT, step_labels_BxT, "step_logits_BxT", "step_labels_BxT")
  _checks.check_same_shape(step_logits_BxT, step_mask_BxT, "step_logits_BxT", "step_mask_BxT")
  dtype = _dtype(step_logits_BxT)
  mask = jnp.asarray(step_mask_BxT)
  keep = mask != 0
  logits = jnp.where(keep, jnp.asarray(step_logits_BxT).astype(dtype), 0.0)
  labels = jnp.where(keep, jax.lax.stop_gradient(jnp.asarray(step_labels_BxT).astype(dtype)), 0.0)
  losses = -(labels * jax.nn.log_sigmoid(logits) + (1.0 - labels) * jax.nn.log_sigmoid(-logits))
  return jnp.where(keep, losses, 0.0)


# ----------------------------------------------------------------------------- last token


def gather_last(values_BxT: Array, attention_mask_BxT: Array) -> Array:
  """The value at each row's last non-pad token: ``values[b, last_token_index(mask)[b]]``.

  A scalar reward model on a policy backbone reads ``r(x, y)`` from its head at the final
  token: ``gather_last(head(hidden_BxTxD)[..., 0], attention_mask_BxT)``, or gather the hidden
  states first (``gather_last(hidden_BxTxD, mask)`` → ``[B, D]``) and apply the head once.

  Args:
    values_BxT: per-token values, shape ``[B, T, ...]``.
    attention_mask_BxT: 1 (nonzero) for real tokens, shape ``[B, T]``.

  Returns:
    Values at the last tokens, shape ``[B, ...]``.

  Raises:
    ValueError: if ``values`` does not start with the mask's ``[B, T]``.

  Examples:
    >>> v = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    >>> gather_last(v, jnp.array([[1, 1, 0], [0, 1, 1]]))
    Array([2., 6.], dtype=float32)
  """
  _checks.check_rank(attention_mask_BxT, 2, "attention_mask_BxT")
  _checks.check_min_rank(values_BxT, 2, "values_BxT")
  if np.shape(values_BxT)[:2] != np.shape(attention_mask_BxT):
    raise ValueError(
        f"`values_BxT` must start with the shape of `attention_mask_BxT` {np.shape(attention_mask_BxT)}; "
        f"got {np.shape(values_BxT)}."
    )
  idx_B = last_token_index(attention_mask_BxT)
  values = jnp.asarray(values_BxT)
  return values[jnp.arange(values.shape[0]), idx_B]
