"""Policy objectives of online RL (PPO/GRPO family), per token, with verl's ``loss_mode`` names.

Every policy loss has one call shape (registered with ``kind="policy"``):

    losses_BxT = fn(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT, **hparams)

- ``logps_BxT``: log π_θ of the sampled tokens under the policy being trained (differentiated).
- ``old_logps_BxT``: log π_old of the same tokens under the policy that sampled them (or the
  policy before this round of updates); a target, its gradient is stopped inside.
- ``advantages_BxT``: per-token advantages (outcome estimators broadcast a sequence's advantage
  to its tokens); a ``[B]`` array is accepted and broadcast. A target: gradient stopped.
- ``mask_BxT``: 1 on the completion tokens that count (bool or float weights), aligned with the
  log-probs: ``logps_BxT[b, t]`` is log p(token ``t + 1`` | tokens ``<= t``).

The result is the per-token loss ``[B, T]`` (to be *minimised*); masked positions are exactly 0
with zero gradient whatever the inputs hold there (``-inf``/NaN log-probs of padding included).
The mask only *selects* here: the losses are not multiplied by float weights. Pass the same mask
to the aggregation, which weighs each token once (``token-mean`` gives ``Σ w·l / Σ w``); inside a
sequence-level objective (GSPO's length-normalised log-ratio, GMPO's means) the weights enter the
per-sequence averages.
Reduce with a named aggregation from `rlhf_jax.ops` (verl's ``loss_agg_mode``; see
`TRL_GRPO_LOSS_TYPE_TO_AGGREGATION` for TRL's GRPO ``loss_type`` names). The last keyword of each
loss, ``stop_gradient=True``, can be turned off for meta-gradient research.

Notation: ``r = π_θ / π_old = exp(log π_θ − log π_old)`` the token ratio (its log clamped to
``[−20, 20]`` before ``exp``, as verl does), ``A`` the advantage, ``sg`` stop-gradient,
``ε_low = clip_ratio_low``, ``ε_high = clip_ratio_high``, ``c = clip_ratio_c``.

Sequence-level objectives (`geo_mean_loss`, `kimi_k15_loss`) compute one loss per sequence and
put it on each of that sequence's unmasked tokens: ``rlhf_jax.ops.seq_mean_token_mean`` of the
result is then the mean over sequences of the per-sequence loss, the papers' objective.

Also here: `ppo_clip_fraction` (clip fractions, approximate KL, ratio statistics for the step
metrics), `truncated_importance_weights` (rollout/trainer mismatch correction: TIS and masking
at token or sequence level) and `TRL_GRPO_LOSS_TYPE_TO_AGGREGATION`.

Nothing is jitted at definition; every function is jit-able with the string arguments static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses.registry import register
from rlhf_jax.ops import _checks

__all__ = [
    "TRL_GRPO_LOSS_TYPE_TO_AGGREGATION",
    "cispo_loss",
    "clip_cov_loss",
    "geo_mean_loss",
    "gpg_loss",
    "gspo_loss",
    "kimi_k15_loss",
    "kl_cov_loss",
    "ppo_clip_fraction",
    "ppo_clip_loss",
    "reinforce_loss",
    "sapo_loss",
    "truncated_importance_weights",
]

Array = jax.Array

_LOG_RATIO_BOUND = 20.0  # verl clamps log(π/π_old) to [−20, 20] before exp.

TRL_GRPO_LOSS_TYPE_TO_AGGREGATION: dict[str, str] = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
}
"""TRL ``GRPOConfig.loss_type`` values -> the `rlhf_jax.ops.AGGREGATIONS` name that reduces the same
per-token PPO-clip loss (``ppo_clip_loss`` with ``clip_ratio_c=None``: TRL has no dual clip).

How TRL's ``GRPOTrainer._compute_loss`` (2025 releases) normalises one micro-batch's per-token losses ``x``
(mask ``m``, ``G`` gradient-accumulation steps, ``P`` processes whose gradients DDP averages):

- ``grpo``: ``mean_b(Σ_t x m / Σ_t m) / G``: each sequence's token mean, averaged over the local
  micro-batch's sequences (DeepSeekMath's ``1/G Σ_i 1/|o_i| Σ_t``). Accumulated over micro-batches
  it is the mean of micro-batch means: each *sequence* weighs the same only when every micro-batch
  holds as many sequences.
- ``bnpo``: ``Σ x m / Σ m / G``: a token mean over the *local* micro-batch ("batch-normalised"),
  so a micro-batch with few tokens gives each of its tokens a larger weight; accumulated over
  micro-batches and processes it is a mean of local token means, not the global token mean.
- ``dr_grpo``: ``Σ x m / (B_local · max_completion_length) / G``: a constant normaliser (Dr. GRPO
  drops the ``1/|o_i|`` length normalisation that favours long wrong answers).
- ``dapo`` (TRL's default): ``Σ x m / (N / P)`` with ``N = num_items_in_batch`` the number of
  completion tokens in the whole *global accumulated* batch (all micro-batches of the step, all
  processes); after DDP's average over ``P`` processes the step's loss is ``Σ_all x m / N``: the
  exact token mean of the global batch (DAPO's token-level policy-gradient loss). TRL's ``cispo``
  normalises the same way, its ``sapo`` like ``grpo``.

What rlhf_jax gives: the aggregations work on global arrays (under ``jit`` with sharded inputs a
sum is already a global sum), and the step's micro-batch accumulation weights each micro-batch by
its aggregation's normaliser (``rlhf_jax.ops.aggregation_weight``: token count for
``token-mean``, non-empty sequence count for ``seq-mean-*``), so accumulation is exact:

- ``token-mean`` is the token mean of the whole accumulated, global batch: exactly TRL's ``dapo``,
  whatever the micro-batch or process split; and TRL's ``bnpo`` whenever that has one micro-batch
  on one process (otherwise ``bnpo`` is the split-dependent mean of local means, which we do not
  reproduce; both names map to the exact global token mean).
- ``seq-mean-token-mean`` is the mean over all non-empty sequences of the accumulated batch:
  TRL's ``grpo`` when micro-batches hold equal numbers of sequences (and none is empty).
- ``seq-mean-token-sum-norm`` divides the token sum by ``norm`` (default ``T``, the padded length)
  and is summed over micro-batches then divided by their number. Pass
  ``norm = B · max_completion_length`` (``B`` the sequences in one call) to get TRL's ``dr_grpo``
  value exactly; the default differs from it by the constant factor ``B`` (same direction, the
  learning rate absorbs it).
"""


# ----------------------------------------------------------------------------- helpers


def _concrete(x) -> float | None:
  """``x`` as a float when it is a scalar known at trace time, else None."""
  if isinstance(x, jax.core.Tracer) or np.ndim(x) != 0:
    return None
  return float(x)


def _check_min(x, name: str, lo: float, *, strict: bool = False) -> None:
  v = _concrete(x)
  if v is not None and (v <= lo if strict else v < lo):
    raise ValueError(f"`{name}` must be {'>' if strict else '>='} {lo}; got {v}.")


def _check_choice(x, name: str, choices: tuple[str, ...]) -> None:
  if not isinstance(x, str) or x not in choices:
    raise ValueError(f"`{name}` must be one of {list(choices)}; got {x!r}.")


def _sg(x: Array, stop_gradient: bool) -> Array:
  return jax.lax.stop_gradient(x) if stop_gradient else x


def _check_inputs(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT) -> None:
  _checks.check_rank(logps_BxT, 2, "logps_BxT")
  _checks.check_floating(logps_BxT, "logps_BxT")
  _checks.check_same_shape(logps_BxT, old_logps_BxT, "logps_BxT", "old_logps_BxT")
  _checks.check_floating(old_logps_BxT, "old_logps_BxT")
  _checks.check_same_shape(logps_BxT, mask_BxT, "logps_BxT", "mask_BxT")
  shape = tuple(np.shape(logps_BxT))
  adv_shape = tuple(np.shape(advantages_BxT))
  if adv_shape not in (shape, shape[:1]):
    raise ValueError(
        f"`advantages_BxT` must have shape {shape} (per token) or {shape[:1]} (per sequence) "
        f"to match `logps_BxT`; got {adv_shape}."
    )


def _prepare(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT, stop_gradient: bool):
  """Checks; returns ``(logp, old, adv, weights, keep)``, all ``[B, T]``, 0 where masked."""
  _check_inputs(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT)
  logps_BxT = jnp.asarray(logps_BxT)
  dtype = jnp.promote_types(logps_BxT.dtype, jnp.float32)
  mask_BxT = jnp.asarray(mask_BxT)
  keep_BxT = mask_BxT != 0
  weights_BxT = mask_BxT.astype(dtype)
  adv = jnp.asarray(advantages_BxT).astype(dtype)
  if adv.ndim == 1:
    adv = jnp.broadcast_to(adv[:, None], logps_BxT.shape)
  logp_BxT = jnp.where(keep_BxT, logps_BxT.astype(dtype), 0.0)
  old_BxT = jnp.where(keep_BxT, _sg(jnp.asarray(old_logps_BxT).astype(dtype), stop_gradient), 0.0)
  adv_BxT = jnp.where(keep_BxT, _sg(adv, stop_gradient), 0.0)
  return logp_BxT, old_BxT, adv_BxT, weights_BxT, keep_BxT


def _finish(losses_BxT: Array, weights_BxT: Array, keep_BxT: Array) -> Array:
  """The per-token loss, exactly 0 where masked. Float weights are not applied here: the
  aggregation (`rlhf_jax.ops`) weighs each token once, so a weight ``w`` counts as ``w / Σw``."""
  del weights_BxT
  return jnp.where(keep_BxT, losses_BxT, 0.0)


def _ratio(logp_BxT: Array, old_BxT: Array) -> tuple[Array, Array]:
  """``(log r, r)`` with ``log r`` clamped to ``[−20, 20]`` (verl)."""
  log_ratio = jnp.clip(logp_BxT - old_BxT, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
  return log_ratio, jnp.exp(log_ratio)


def _safe_div(num: Array, den: Array) -> Array:
  nonzero = den != 0
  return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def _check_clip(clip_ratio_low, clip_ratio_high) -> None:
  _check_min(clip_ratio_low, "clip_ratio_low", 0.0)
  _check_min(clip_ratio_high, "clip_ratio_high", 0.0)


def _rank_desc(score_N: Array) -> Array:
  """Rank of each entry when sorted by decreasing score (0 = largest; ties by position)."""
  order_N = jnp.argsort(-score_N, stable=True)
  return jnp.zeros(score_N.shape, jnp.int32).at[order_N].set(jnp.arange(score_N.shape[0], dtype=jnp.int32))


def _masked_mean_all(x_BxT: Array, keep_BxT: Array) -> Array:
  return _safe_div(jnp.sum(jnp.where(keep_BxT, x_BxT, 0.0)), jnp.sum(keep_BxT).astype(x_BxT.dtype))


_PPO_REF = (
    "Schulman et al. 2017, Proximal Policy Optimization Algorithms (arXiv:1707.06347); dual clip: "
    "Ye et al. 2020 (arXiv:1912.09729); clip-higher: Yu et al. 2025, DAPO (arXiv:2503.14476)"
)


# ----------------------------------------------------------------------------- PPO clip


def _ppo_clip_terms(ratio, adv, clip_ratio_low, clip_ratio_high, clip_ratio_c):
  """verl ``compute_policy_loss_vanilla``: ``(losses, pg1, pg2, clip1, pg3)``."""
  pg1 = -adv * ratio
  pg2 = -adv * jnp.clip(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
  clip1 = jnp.maximum(pg1, pg2)
  if clip_ratio_c is None:
    return clip1, pg1, pg2, clip1, None
  pg3 = -adv * clip_ratio_c
  clip2 = jnp.minimum(pg3, clip1)
  return jnp.where(adv < 0, clip2, clip1), pg1, pg2, clip1, pg3


@register(
    "vanilla", kind="policy",
    formula="max(−r·A, −clip(r, 1−ε_low, 1+ε_high)·A); where A < 0 also min(·, −c·A) (dual clip)",
    reference=_PPO_REF,
    hparams=("clip_ratio_low=0.2", "clip_ratio_high=0.2", "clip_ratio_c=3.0"),
)
def ppo_clip_loss(
    logps_BxT: Array,
    old_logps_BxT: Array,
    advantages_BxT: Array,
    mask_BxT: Array,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
    stop_gradient: bool = True,
) -> Array:
  """PPO's clipped surrogate with asymmetric clip ranges and dual clip (verl ``loss_mode="vanilla"``).

  ``L = max(−r·A, −clip(r, 1 − ε_low, 1 + ε_high)·A)`` per token, and for ``A < 0`` the dual
  clip ``L = min(L, −c·A)`` bounds the loss of a negative-advantage token whose ratio has grown
  large (Ye et al. 2020). ``ε_high > ε_low`` is DAPO's clip-higher (e.g. 0.2 / 0.28), which
  leaves low-probability tokens more room to grow. At ``r = 1`` the gradient is the policy
  gradient ``−A·∇log π``. Matches verl's ``compute_policy_loss_vanilla`` per token; TRL's GRPO
  loss is this with ``clip_ratio_c=None`` (``epsilon``/``epsilon_high`` are ``ε_low``/``ε_high``).

  Args:
    logps_BxT: log π_θ of the sampled tokens, ``[B, T]``.
    old_logps_BxT: log π_old of the same tokens, ``[B, T]`` (gradient stopped).
    advantages_BxT: advantages, ``[B, T]`` or ``[B]`` (gradient stopped).
    mask_BxT: completion-token mask (bool or float weights), ``[B, T]``.
    clip_ratio_low: ``ε_low``, the ratio is clipped below at ``1 − ε_low``.
    clip_ratio_high: ``ε_high``, the ratio is clipped above at ``1 + ε_high``.
    clip_ratio_c: the dual-clip constant ``c > 1`` (verl default 3.0); ``None`` turns dual clip
      off.
    stop_gradient: stop the gradient of ``old_logps_BxT`` and ``advantages_BxT``.

  Returns:
    ``losses_BxT``: per-token losses, ``[B, T]``, 0 where masked.

  Raises:
    ValueError: on mismatched shapes, a non-floating ``logps_BxT``, negative clip ranges or
      ``clip_ratio_c <= 1``.

  References:
    Schulman et al. 2017, `Proximal Policy Optimization Algorithms
    <https://arxiv.org/abs/1707.06347>`_; Ye et al. 2020, `Mastering Complex Control in MOBA
    Games with Deep Reinforcement Learning <https://arxiv.org/abs/1912.09729>`_ (dual clip);
    Yu et al. 2025, `DAPO <https://arxiv.org/abs/2503.14476>`_ (clip-higher).

  Examples:
    >>> lp = jnp.log(jnp.array([[0.5, 0.9]]))
    >>> ppo_clip_loss(lp, jnp.log(jnp.array([[0.5, 0.5]])), jnp.array([1.0]), jnp.ones((1, 2)))
    Array([[-1. , -1.2]], dtype=float32)
  """
  _check_clip(clip_ratio_low, clip_ratio_high)
  if clip_ratio_c is not None:
    _check_min(clip_ratio_c, "clip_ratio_c", 1.0, strict=True)
  logp, old, adv, w, keep = _prepare(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT, stop_gradient)
  _, ratio = _ratio(logp, old)
  losses, *_ = _ppo_clip_terms(ratio, adv, clip_ratio_low, clip_ratio_high, clip_ratio_c)
  return _finish(losses, w, keep)


# ----------------------------------------------------------------------------- GSPO


@register(
    "gspo", kind="policy",
    formula="max(−s·A, −clip(s, 1−ε_low, 1+ε_high)·A), s = sg(exp(mean_t log r))·π/sg(π) (GSPO-token)",
    reference="Zheng et al. 2025, Group Sequence Policy Optimization (arXiv:2507.18071)",
    hparams=("clip_ratio_low=3e-4", "clip_ratio_high=4e-4"),
)
def gspo_loss(
    logps_BxT: Array,
    old_logps_BxT: Array,
    advantages_BxT: Array,
    mask_BxT: Array,
    *,
    clip_ratio_low: float = 3e-4,
    clip_ratio_high: float = 4e-4,
    stop_gradient: bool = True,
) -> Array:
  """GSPO: PPO clipping of the sequence-level, length-normalised ratio (verl ``loss_mode="gspo"``).

  The sequence ratio ``s_b = (π_θ(y_b|x) / π_old(y_b|x))^(1/|y_b|) = exp(mean_t log r_bt)`` is
  put on every token in the straight-through "GSPO-token" form verl uses,
  ``s_bt = sg(s_b)·π_θ(y_t) / sg(π_θ(y_t))`` (value ``s_b``, gradient ``s_b·∇log π_θ(y_t)``;
  ``log s_bt`` is clamped above at 10 as in verl), and clipped like PPO:
  ``L = max(−s·A, −clip(s, 1 − ε_low, 1 + ε_high)·A)``. Reduced with
  ``rlhf_jax.ops.seq_mean_token_mean`` (what verl forces for GSPO) and with sequence-level
  advantages, its gradient is GSPO's ``−A_b·s_b·∇ mean_t log π_θ``. Clipping is decided per
  sequence, so a whole response is kept or dropped. The clip ranges are the paper's
  (3e-4 / 4e-4): the sequence ratio moves much less than a token ratio.

  With one token per sequence it equals `ppo_clip_loss` without dual clip.

  Args:
    logps_BxT: log π_θ of the sampled tokens, ``[B, T]``.
    old_logps_BxT: log π_old of the same tokens, ``[B, T]`` (gradient stopped).
    advantages_BxT: advantages, ``[B, T]`` or ``[B]`` (gradient stopped).
    mask_BxT: completion-token mask, ``[B, T]``; also defines ``|y_b|``.
    clip_ratio_low: ``ε_low`` of the sequence ratio.
    clip_ratio_high: ``ε_high`` of the sequence ratio.
    stop_gradient: stop the gradient of ``old_logps_BxT`` and ``advantages_BxT``.

  Returns:
    ``losses_BxT``: per-token losses, ``[B, T]``, 0 where masked.

  Raises:
    ValueError: on mismatched shapes, a non-floating ``logps_BxT`` or negative clip ranges.

  References:
    Zheng et al. 2025, `Group Sequence Policy Optimization <https://arxiv.org/abs/2507.18071>`_.

  Examples:
    >>> lp = jnp.log(jnp.array([[0.5, 0.5]]))
    >>> gspo_loss(lp, lp, jnp.array([2.0]), jnp.ones((1, 2)))  # s = 1
    Array([[-2., -2.]], dtype=float32)
  """
  _check_clip(clip_ratio_low, clip_ratio_high)
  logp, old, adv, w, keep = _prepare(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT, stop_gradient)
  n_B = jnp.sum(w, axis=-1)
  log_seq_B = _safe_div(jnp.sum((logp - old) * w, axis=-1), n_B)
  log_s = logp - jax.lax.stop_gradient(logp) + jax.lax.stop_gradient(log_seq_B)[:, None]
  s = jnp.exp(jnp.minimum(log_s, 10.0))
  losses = jnp.maximum(-adv * s, -adv * jnp.clip(s, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high))
  return _finish(losses, w, keep)


# ----------------------------------------------------------------------------- CISPO


@register(
    "cispo", kind="policy",
    formula="−sg(clip(r, 1−ε_low, 1+ε_high))·A·log π",
    reference="MiniMax 2025, MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning "
    "Attention, CISPO (arXiv:2506.13585)",
    hparams=("clip_ratio_low=1.0", "clip_ratio_high=4.0"),
)
def cispo_loss(
    logps_BxT: Array,
    old_logps_BxT: Array,
    advantages_BxT: Array,
    mask_BxT: Array,
    *,
    clip_ratio_low: float = 1.0,
    clip_ratio_high: float = 4.0,
    stop_gradient: bool = True,
) -> Array:
  """CISPO: REINFORCE with a clipped, stop-gradient importance weight (verl ``loss_mode="cispo"``).

  ``L = −sg(clip(r, 1 − ε_low, 1 + ε_high))·A·log π_θ``. Unlike PPO no token's gradient is ever
  dropped: clipping bounds the importance *weight* only, so rare "fork" tokens with large ratios
  keep contributing. Gradient: ``−clip(r)·A·∇log π_θ``.

  Note: the sources parameterise the bound differently. verl clips to ``[1 − ε_low, 1 + ε_high]``
  (this function); TRL's ``loss_type="cispo"`` caps at ``min(r, epsilon_high)`` with
  ``epsilon_high = 5`` recommended (ScaleRL), i.e. ``clip_ratio_low=1, clip_ratio_high=4`` here,
  which are the defaults; MiniMax-M1 sets no lower bound (``ε_low`` large) and tunes ``ε_high``.
  Pass verl's PPO values (0.2 / 0.2, or 0.2 / 0.28) to reproduce a verl run.

  Args:
    logps_BxT: log π_θ of the sampled tokens, ``[B, T]``.
    old_logps_BxT: log π_old of the same tokens, ``[B, T]`` (gradient stopped).
    advantages_BxT: advantages, ``[B, T]`` or ``[B]`` (gradient stopped).
    mask_BxT: completion-token mask, ``[B, T]``.
    clip_ratio_low: ``ε_low``; the weight is clipped below at ``1 − ε_low`` (1.0: no lower bound).
    clip_ratio_high: ``ε_high``; the weight is clipped above at ``1 + ε_high``.
    stop_gradient: stop the gradient of ``old_logps_BxT`` and ``advantages_BxT``.

  Returns:
    ``losses_BxT``: per-token losses, ``[B, T]``, 0 where masked.

  Raises:
    ValueError: on mismatched shapes, a non-floating ``logps_BxT`` or negative clip ranges.

  References:
    MiniMax 2025, `MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention
    <https://arxiv.org/abs/2506.13585>`_.

  Examples:
    >>> lp = jnp.log(jnp.array([[0.5]]))
    >>> cispo_loss(lp, lp - 3.0, jnp.array([1.0]), jnp.ones((1, 1))).round(4)  # weight capped at 5
    Array([[3.4657]], dtype=float32)
  """
  _check_clip(clip_ratio_low, clip_ratio_high)
  logp, old, adv, w, keep = _prepare(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT, stop_gradient)
  _, ratio = _ratio(logp, old)
  weight = jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high))
  return _finish(-weight * adv * logp, w, keep)


# ----------------------------------------------------------------------------- SAPO


@register(
    "sapo", kind="policy",
    formula="−(4/τ)·σ(τ·(r − 1))·A, τ = τ_pos if A > 0 else τ_neg",
    reference="Gao et al. 2025, Soft Adaptive Policy Optimization (arXiv:2511.20347)",
    hparams=("tau_pos=1.0", "tau_neg=1.05"),
)
def sapo_loss(
    logps_BxT: Array,
    old_logps_BxT: Array,
    advantages_BxT: Array,
    mask_BxT: Array,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    stop_gradient: bool = True,
) -> Array:
  """SAPO: a smooth, temperature-controlled gate on the ratio instead of a hard clip.

  ``L = −f(r, τ)·A`` with ``f(r, τ) = σ(τ·(r − 1))·4/τ``, ``τ = τ_pos`` where ``A > 0`` and
  ``τ_neg`` elsewhere (verl ``loss_mode="sapo"``, TRL ``loss_type="sapo"``). The gradient is
  ``−4·σ(1 − σ)·r·A·∇log π``: exactly the policy gradient at ``r = 1`` and decaying smoothly as
  the ratio leaves 1, so off-policy tokens are down-weighted rather than cut off. A larger
  ``τ_neg`` makes negative-advantage tokens decay faster (the paper's asymmetric choice).
  verl and TRL reduce it with ``seq-mean-token-mean``.

  Args:
    logps_BxT: log π_θ of the sampled tokens, ``[B, T]``.
    old_logps_BxT: log π_old of the same tokens, ``[B, T]`` (gradient stopped).
    advantages_BxT: advantages, ``[B, T]`` or ``[B]`` (gradient stopped).
    mask_BxT: completion-token mask, ``[B, T]``.
    tau_pos: gate temperature for ``A > 0`` (> 0).
    tau_neg: gate temperature for ``A <= 0`` (> 0).
    stop_gradient: stop the gradient of ``old_logps_BxT`` and ``advantages_BxT``.

  Returns:
    ``losses_BxT``: per-token losses, ``[B, T]``, 0 where masked.

  Raises:
    ValueError: on mismatched shapes, a non-floating ``logps_BxT`` or a non-positive temperature.

  References:
    Gao et al. 2025, `Soft Adaptive Policy Optimization <https://arxiv.org/abs/2511.20347>`_.

  Examples:
    >>> lp = jnp.log(jnp.array([[0.5]]))
    >>> sapo_loss(lp, lp, jnp.array([1.0]), jnp.ones((1, 1)))  # −(4/1)·σ(0)
    Array([[-2.]], dtype=float32)
  """
  _check_min(tau_pos, "tau_pos", 0.0, strict=True)
  _check_min(tau_neg, "tau_neg", 0.0, strict=True)
  logp, old, adv, w, keep = _prepare(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT, stop_gradient)
  _, ratio = _ratio(logp, old)
  tau = jnp.where(adv > 0, jnp.asarray(tau_pos, logp.dtype), jnp.asarray(tau_neg, logp.dtype))
  gate = jax.nn.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
  return _finish(-gate * adv, w, keep)


# ----------------------------------------------------------------------------- GPG / REINFORCE


@register(
    "gpg", kind="policy",
    formula="−A·log π",
    reference="Chu et al. 2025, GPG: A Simple and Strong Reinforcement Learning Baseline for "
    "Model Reasoning (arXiv:2504.02546)",
)
def gpg_loss(
    logps_BxT: Array,
    old_logps_BxT: Array,
    advantages_BxT: Array,
    mask_BxT: Array,
    *,
    stop_gradient: bool = True,
) -> Array:
  """GPG: the plain policy-gradient loss ``−A·log π_θ`` (verl ``loss_mode="gpg"``).

  No ratio and no clipping: ``old_logps_BxT`` is accepted for the common call shape and ignored.
  GPG's own advantage (group-normalised, rescaled by the fraction of valid samples) is the
  ``gpg`` advantage estimator; verl reduces with ``token-mean``.

  Args:
    logps_BxT: log π_θ of the sampled tokens, ``[B, T]``.
    old_logps_BxT: ignored (shape-checked), ``[B, T]``.
    advantages_BxT: advantages, ``[B, T]`` or ``[B]`` (gradient stopped).
    mask_BxT: completion-token mask, ``[B, T]``.
    stop_gradient: stop the gradient of ``advantages_BxT``.

  Returns:
    ``losses_BxT``: per-token losses, ``[B, T]``, 0 where masked.

  Raises:
    ValueError: on mismatched shapes or a non-floating ``logps_BxT``.

  References:
    Chu et al. 2025, `GPG: A Simple and Strong Reinforcement Learning Baseline for Model
    Reasoning <https://arxiv.org/abs/2504.02546>`_.

  Examples:
    >>> lp = jnp.log(jnp.array([[0.5, 0.25]]))
    >>> gpg_loss(lp, lp, jnp.array([1.0]), jnp.array([[1, 0]])).round(4)
    Array([[0.6931, 0.    ]], dtype=float32)
  """
  logp, _, adv, w, keep = _prepare(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT, stop_gradient)
  return _finish(-adv * logp, w, keep)


@register(
    "reinforce", kind="policy",
    formula="−r·A (unclipped; on-policy r = 1: gradient −A·∇log π)",
    reference="Williams 1992, Simple Statistical Gradient-Following Algorithms for Connectionist "
    "Reinforcement Learning (doi:10.1007/BF00992696)",
)
def reinforce_loss(
    logps_BxT: Array,
    old_logps_BxT: Array,
    advantages_BxT: Array,
    mask_BxT: Array,
    *,
    stop_gradient: bool = True,
) -> Array:
  """REINFORCE as an importance-weighted surrogate: ``L = −r·A``, no clipping.

  On-policy (``old_logps`` equal to ``logps``, ratio 1, the single update per batch of
  REINFORCE/RLOO/ReMax/REINFORCE++) the value is ``−A`` and the gradient is the policy gradient
  ``−A·∇log π_θ``, the same as `gpg_loss`; after the first update of a batch the ratio corrects
  for the policy having moved (gradient ``−A·r·∇log π_θ``), without PPO's trust region. Use it
  as the loss of the REINFORCE-family estimators (``reinforce_plus_plus``, ``rloo``, ``remax``)
  when the loop takes one step per batch; use `ppo_clip_loss` for several epochs.

  Args:
    logps_BxT: log π_θ of the sampled tokens, ``[B, T]``.
    old_logps_BxT: log π of the sampling policy, ``[B, T]`` (gradient stopped).
    advantages_BxT: advantages, ``[B, T]`` or ``[B]`` (gradient stopped).
    mask_BxT: completion-token mask, ``[B, T]``.
    stop_gradient: stop the gradient of ``old_logps_BxT`` and ``advantages_BxT``.

  Returns:
    ``losses_BxT``: per-token losses, ``[B, T]``, 0 where masked.

  Raises:
    ValueError: on mismatched shapes or a non-floating ``logps_BxT``.

  References:
    Williams 1992, `Simple Statistical Gradient-Following Algorithms for Connectionist
    Reinforcement Learning <https://doi.org/10.1007/BF00992696>`_.

  Examples:
    >>> lp = jnp.log(jnp.array([[0.5]]))
    >>> reinforce_loss(lp, lp, jnp.array([3.0]), jnp.ones((1, 1)))
    Array([[-3.]], dtype=float32)
  """
  logp, old, adv, w, keep = _prepare(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT, stop_gradient)
  _, ratio = _ratio(logp, old)
  return _finish(-ratio * adv, w, keep)


# ----------------------------------------------------------------------------- Clip-Cov / KL-Cov

_COV_REF = (
    "Cui et al. 2025, The Entropy Mechanism of Reinforcement Learning for Reasoning Language "
    "Models (arXiv:2505.22617)"
)


@register(
    "clip_cov", kind="policy",
    formula="PPO clip, times 0 on ⌊ρ·N⌋ (≥ 1) random tokens with cov(A, log π) ∈ (lb, ub)",
    reference=_COV_REF,
    hparams=("clip_ratio_low=0.2", "clip_ratio_high=0.2", "clip_cov_ratio=2e-4", "clip_cov_lb=1.0",
             "clip_cov_ub=5.0", "rng=None"),
)
def clip_cov_loss(
    logps_BxT: Array,
    old_logps_BxT: Array,
    advantages_BxT: Array,
    mask_BxT: Array,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    rng: Array | None = None,
    stop_gradient: bool = True,
) -> Array:
  """Clip-Cov: PPO clip, with the gradient of a few high-covariance tokens detached.

  Cui et al. show that entropy falls in proportion to the covariance between a token's
  log-probability and its advantage; Clip-Cov removes from the update a small random fraction of
  the tokens with large covariance. Per token ``cov_t = (A_t − Ā)·(log π_t − mean log π)``
  (means over the unmasked tokens of the batch); candidates are unmasked tokens not already
  clipped by PPO with ``clip_cov_lb < cov_t < clip_cov_ub``; ``k = min(max(⌊ρ·N⌋, 1), #candidates)``
  of them (``ρ = clip_cov_ratio``, ``N`` the number of unmasked tokens) get loss 0 (so no
  gradient); everything else gets ``max(−r·A, −clip(r, 1 − ε_low, 1 + ε_high)·A)`` (no dual
  clip), as verl's ``compute_policy_loss_clip_cov``. Selection is done with fixed shapes (a rank
  over all ``B·T`` tokens), so the function jits.

  verl draws the ``k`` candidates uniformly at random: pass ``rng`` (a PRNG key) for that. With
  ``rng=None`` the choice is deterministic: the ``k`` candidates of largest covariance.

  Args:
    logps_BxT: log π_θ of the sampled tokens, ``[B, T]``.
    old_logps_BxT: log π_old of the same tokens, ``[B, T]`` (gradient stopped).
    advantages_BxT: advantages, ``[B, T]`` or ``[B]`` (gradient stopped).
    mask_BxT: completion-token mask, ``[B, T]``.
    clip_ratio_low: PPO's ``ε_low``.
    clip_ratio_high: PPO's ``ε_high``.
    clip_cov_ratio: ``ρ``, the fraction of unmasked tokens to detach (> 0).
    clip_cov_lb: lower covariance bound of a candidate.
    clip_cov_ub: upper covariance bound of a candidate.
    rng: a PRNG key for verl's random choice among candidates, or ``None`` (largest covariance).
    stop_gradient: stop the gradient of ``old_logps_BxT`` and ``advantages_BxT``.

  Returns:
    ``losses_BxT``: per-token losses, ``[B, T]``, 0 where masked or detached.

  Raises:
    ValueError: on mismatched shapes, a non-floating ``logps_BxT``, negative clip ranges or a
      non-positive ``clip_cov_ratio``.

  References:
    Cui et al. 2025, `The Entropy Mechanism of Reinforcement Learning for Reasoning Language
    Models <https://arxiv.org/abs/2505.22617>`_.

  Examples:
    >>> lp = jnp.log(jnp.array([[0.5, 0.5]]))
    >>> clip_cov_loss(lp, lp, jnp.array([1.0]), jnp.ones((1, 2)))  # no covariance: plain PPO
    Array([[-1., -1.]], dtype=float32)
  """
  _check_clip(clip_ratio_low, clip_ratio_high)
  _check_min(clip_cov_ratio, "clip_cov_ratio", 0.0, strict=True)
  logp, old, adv, w, keep = _prepare(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT, stop_gradient)
  _, ratio = _ratio(logp, old)
  pg1 = -adv * ratio
  pg2 = -adv * jnp.clip(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
  clipped_by_ppo = (pg2 > pg1) & keep

  adv_sg = jax.lax.stop_gradient(adv)
  logp_sg = jax.lax.stop_gradient(logp)
  cov = (adv_sg - _masked_mean_all(adv_sg, keep)) * (logp_sg - _masked_mean_all(logp_sg, keep))
  candidate = keep & ~clipped_by_ppo & (cov > clip_cov_lb) & (cov < clip_cov_ub)
  n_valid = jnp.sum(keep)
  k = jnp.maximum(jnp.floor(clip_cov_ratio * n_valid.astype(jnp.float32)).astype(jnp.int32), 1)
  priority = cov if rng is None else jax.random.uniform(rng, cov.shape, dtype=jnp.float32)
  priority_N = jnp.where(candidate, priority.astype(jnp.float32), -jnp.inf).reshape(-1)
  rank = _rank_desc(priority_N).reshape(cov.shape)
  detach = candidate & (rank < k)
  losses = jnp.where(detach, 0.0, jnp.maximum(pg1, pg2))
  return _finish(losses, w, keep)


@register(
    "kl_cov", kind="policy",
    formula="−r·A, plus β·|log r| on the top ⌊ρ·N⌋ (≥ 1) tokens by cov(A, log π)",
    reference=_COV_REF,
    hparams=("kl_cov_ratio=2e-4", "ppo_kl_coef=1.0"),
)
def kl_cov_loss(
    logps_BxT: Array,
    old_logps_BxT: Array,
    advantages_BxT: Array,
    mask_BxT: Array,
    *,
    kl_cov_ratio: float = 2e-4,
    ppo_kl_coef: float = 1.0,
    stop_gradient: bool = True,
) -> Array:
  """KL-Cov: unclipped policy gradient, with a KL penalty on the highest-covariance tokens.

  ``L = −r·A`` on every token; on the ``k = max(⌊ρ·N⌋, 1)`` unmasked tokens with the largest
  ``cov_t = (A_t − Ā)·(log π_t − mean log π)`` (means over unmasked tokens; ``ρ = kl_cov_ratio``,
  ``N`` unmasked tokens) add ``β·|log r|`` (``β = ppo_kl_coef``), as verl's
  ``compute_policy_loss_kl_cov``: the penalty pulls exactly the tokens that drive entropy
  collapse back towards π_old. Selection is a fixed-shape rank over the ``B·T`` tokens (ties are
  broken by position), so the function jits.

  Args:
    logps_BxT: log π_θ of the sampled tokens, ``[B, T]``.
    old_logps_BxT: log π_old of the same tokens, ``[B, T]`` (gradient stopped).
    advantages_BxT: advantages, ``[B, T]`` or ``[B]`` (gradient stopped).
    mask_BxT: completion-token mask, ``[B, T]``.
    kl_cov_ratio: ``ρ``, the fraction of unmasked tokens penalised (> 0).
    ppo_kl_coef: ``β``, the weight of ``|log r|``.
    stop_gradient: stop the gradient of ``old_logps_BxT`` and ``advantages_BxT``.

  Returns:
    ``losses_BxT``: per-token losses, ``[B, T]``, 0 where masked.

  Raises:
    ValueError: on mismatched shapes, a non-floating ``logps_BxT`` or a non-positive
      ``kl_cov_ratio``.

  References:
    Cui et al. 2025, `The Entropy Mechanism of Reinforcement Learning for Reasoning Language
    Models <https://arxiv.org/abs/2505.22617>`_.

  Examples:
    >>> lp = jnp.log(jnp.array([[0.5, 0.5]]))
    >>> kl_cov_loss(lp, lp, jnp.array([1.0]), jnp.ones((1, 2)))
    Array([[-1., -1.]], dtype=float32)
  """
  _check_min(kl_cov_ratio, "kl_cov_ratio", 0.0, strict=True)
  logp, old, adv, w, keep = _prepare(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT, stop_gradient)
  log_ratio, ratio = _ratio(logp, old)
  adv_sg = jax.lax.stop_gradient(adv)
  logp_sg = jax.lax.stop_gradient(logp)
  cov = (adv_sg - _masked_mean_all(adv_sg, keep)) * (logp_sg - _masked_mean_all(logp_sg, keep))
  n_valid = jnp.sum(keep)
  k = jnp.maximum(jnp.floor(kl_cov_ratio * n_valid.astype(jnp.float32)).astype(jnp.int32), 1)
  rank = _rank_desc(jnp.where(keep, cov, -jnp.inf).astype(jnp.float32).reshape(-1)).reshape(cov.shape)
  penalised = keep & (rank < k)
  losses = -adv * ratio + jnp.where(penalised, ppo_kl_coef * jnp.abs(log_ratio), 0.0)
  return _finish(losses, w, keep)


# ----------------------------------------------------------------------------- GMPO


@register(
    "geo_mean", kind="policy",
    formula="−Ā·exp(mean_t sgn(A)·min(sgn(A)·log r, sgn(A)·clip(log r, −ε_low, ε_high))), per sequence",
    reference="Zhao et al. 2025, Geometric-Mean Policy Optimization (arXiv:2507.20673)",
    hparams=("clip_ratio_low=0.4", "clip_ratio_high=0.4"),
)
def geo_mean_loss(
    logps_BxT: Array,
    old_logps_BxT: Array,
    advantages_BxT: Array,
    mask_BxT: Array,
    *,
    clip_ratio_low: float = 0.4,
    clip_ratio_high: float = 0.4,
    stop_gradient: bool = True,
) -> Array:
  """GMPO: the geometric mean of clipped token ratios times the sequence advantage.

  Per sequence ``L_b = −Ā_b·exp((1/|y_b|)·Σ_t sgn(A)·min(sgn(A)·log r_t, sgn(A)·clip(log r_t,
  −ε_low, ε_high)))`` with ``Ā_b`` the token mean of the advantages, as verl's
  ``compute_policy_loss_geo_mean``: the arithmetic mean of token ratios (GRPO) is replaced by
  their geometric mean, which outliers move less, and the clip acts in log space (so the range
  is ``(e^−ε_low, e^ε_high)``; GMPO's default ε = 0.4 gives about (0.67, 1.49)).

  ``L_b`` is put on each unmasked token of sequence ``b``: reduce with
  ``rlhf_jax.ops.seq_mean_token_mean`` for GMPO's mean over sequences (verl takes the mean over
  all ``B`` rows; the two agree when every sequence has a token).

  Args:
    logps_BxT: log π_θ of the sampled tokens, ``[B, T]``.
    old_logps_BxT: log π_old of the same tokens, ``[B, T]`` (gradient stopped).
    advantages_BxT: advantages, ``[B, T]`` or ``[B]`` (gradient stopped).
    mask_BxT: completion-token mask, ``[B, T]``.
    clip_ratio_low: ``ε_low``, the lower clip of ``log r``.
    clip_ratio_high: ``ε_high``, the upper clip of ``log r``.
    stop_gradient: stop the gradient of ``old_logps_BxT`` and ``advantages_BxT``.

  Returns:
    ``losses_BxT``: the sequence loss on each unmasked token, ``[B, T]``, 0 where masked.

  Raises:
    ValueError: on mismatched shapes, a non-floating ``logps_BxT`` or negative clip ranges.

  References:
    Zhao et al. 2025, `Geometric-Mean Policy Optimization <https://arxiv.org/abs/2507.20673>`_.

  Examples:
    >>> lp = jnp.log(jnp.array([[0.5, 0.5]]))
    >>> geo_mean_loss(lp, lp, jnp.array([2.0]), jnp.ones((1, 2)))
    Array([[-2., -2.]], dtype=float32)
  """
  _check_clip(clip_ratio_low, clip_ratio_high)
  logp, old, adv, w, keep = _prepare(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT, stop_gradient)
  log_ratio = logp - old
  sgn = jnp.sign(adv)
  clamped = jnp.clip(log_ratio, -clip_ratio_low, clip_ratio_high)
  log_ratio_min = sgn * jnp.minimum(sgn * log_ratio, sgn * clamped)
  n_B = jnp.sum(w, axis=-1)
  ratio_B = jnp.exp(_safe_div(jnp.sum(log_ratio_min * w, axis=-1), n_B))
  adv_B = _safe_div(jnp.sum(adv * w, axis=-1), n_B)
  losses_B = -adv_B * ratio_B
  return _finish(jnp.broadcast_to(losses_B[:, None], logp.shape), w, keep)


# ----------------------------------------------------------------------------- Kimi k1.5


@register(
    "kimi_k15", kind="policy",
    formula="½·(A − τ·log(π(y|x)/π_old(y|x)))², A = r − mean group reward, per sequence",
    reference="Kimi Team 2025, Kimi k1.5: Scaling Reinforcement Learning with LLMs (arXiv:2501.12599)",
    hparams=("tau=1.0",),
)
def kimi_k15_loss(
    logps_BxT: Array,
    old_logps_BxT: Array,
    advantages_BxT: Array,
    mask_BxT: Array,
    *,
    tau: float = 1.0,
    stop_gradient: bool = True,
) -> Array:
  """Kimi k1.5's online mirror-descent loss: squared regression of the sequence log-ratio.

  Kimi k1.5 solves ``max_θ E[r] − τ·KL(π_θ ‖ π_old)`` at each iteration; its optimum satisfies
  ``r − τ·log Z = τ·log(π*(y|x) / π_old(y|x))``, which the policy is regressed onto with the
  surrogate ``L_b = ½·(r_b − τ·log Z − τ·log(π_θ(y_b|x) / π_old(y_b|x)))²`` and
  ``τ·log Z ≈ r̄`` (the mean reward of the prompt's samples). Pass ``A = r − r̄`` as the
  advantage (the ``grpo`` estimator with ``norm_adv_by_std_in_grpo=False``, or ``dr_grpo``); the
  token mean of ``advantages_BxT`` is taken per sequence. The sequence log-ratio is the *sum* of
  token log-ratios. Its gradient ``−τ·(A − τ·u)·∇u`` (``u`` the log-ratio) is ``τ`` times the
  paper's ``−(A·∇u − (τ/2)·∇u²)``; at ``u = 0`` it is the policy gradient with a mean-reward
  baseline, scaled by ``τ``.

  ``L_b`` is put on each unmasked token of sequence ``b``: reduce with
  ``rlhf_jax.ops.seq_mean_token_mean`` for the paper's mean over samples. The paper does not
  publish ``τ``; tune it (it sets how far one iteration moves: at the optimum ``u = A/τ``).

  Args:
    logps_BxT: log π_θ of the sampled tokens, ``[B, T]``.
    old_logps_BxT: log π of the iteration's reference policy π_θi (the sampler), ``[B, T]``
      (gradient stopped).
    advantages_BxT: ``r − r̄``, ``[B, T]`` or ``[B]`` (gradient stopped).
    mask_BxT: completion-token mask, ``[B, T]``.
    tau: ``τ > 0``, the KL-regularisation strength.
    stop_gradient: stop the gradient of ``old_logps_BxT`` and ``advantages_BxT``.

  Returns:
    ``losses_BxT``: the sequence loss on each unmasked token, ``[B, T]``, 0 where masked.

  Raises:
    ValueError: on mismatched shapes, a non-floating ``logps_BxT`` or ``tau <= 0``.

  References:
    Kimi Team 2025, `Kimi k1.5: Scaling Reinforcement Learning with LLMs
    <https://arxiv.org/abs/2501.12599>`_, Section 2.3.2.

  Examples:
    >>> lp = jnp.log(jnp.array([[0.5, 0.5]]))
    >>> kimi_k15_loss(lp, lp, jnp.array([2.0]), jnp.ones((1, 2)))  # ½·2²
    Array([[2., 2.]], dtype=float32)
  """
  _check_min(tau, "tau", 0.0, strict=True)
  logp, old, adv, w, keep = _prepare(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT, stop_gradient)
  n_B = jnp.sum(w, axis=-1)
  log_ratio_B = jnp.sum(logp - old, axis=-1)  # log π(y|x) − log π_old(y|x): 0 off the mask
  adv_B = _safe_div(jnp.sum(adv * w, axis=-1), n_B)
  losses_B = 0.5 * jnp.square(adv_B - tau * log_ratio_B)
  return _finish(jnp.broadcast_to(losses_B[:, None], logp.shape), w, keep)


# ----------------------------------------------------------------------------- metrics


def ppo_clip_fraction(
    logps_BxT: Array,
    old_logps_BxT: Array,
    advantages_BxT: Array,
    mask_BxT: Array,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
    level: str = "token",
) -> dict[str, Array]:
  """Step metrics of a PPO-style update: clip fractions, approximate KL, ratio statistics.

  All are means over the unmasked tokens (float32 scalars, no gradient), named as verl/TRL log
  them:

  - ``clip_fraction``: tokens where the clipped term is the active one (verl ``pg_clipfrac``:
    ``−clip(r)·A > −r·A``).
  - ``clip_fraction_lower``: negative-advantage tokens cut by the dual clip (verl
    ``pg_clipfrac_lower``); 0 when ``clip_ratio_c`` is ``None``.
  - ``clip_fraction_low`` / ``clip_fraction_high``: TRL's region metrics, ``r < 1 − ε_low`` with
    ``A < 0`` and ``r > 1 + ε_high`` with ``A > 0``.
  - ``approx_kl``: Schulman's k3 estimate of KL(π_old ‖ π_θ), ``mean((r − 1) − log r)`` (≥ 0).
  - ``ppo_kl``: verl's ``ppo_kl``, the k1 estimate ``mean(log π_old − log π_θ)``.
  - ``ratio_mean``, ``ratio_min``, ``ratio_max``: of ``r`` (0 if nothing is unmasked).
  - ``ntokens``: the number (sum of weights) of unmasked tokens, the denominator.

  ``level="sequence"`` measures the clipping of GSPO (`gspo_loss`): every token of sequence ``b``
  carries the length-normalised sequence ratio ``s_b = exp(mean_t log r_bt)`` in place of its own
  ratio for the clip fractions and ``ratio_*`` (verl's ``pg_clipfrac`` for ``loss_mode="gspo"``);
  the KL estimates stay per token.

  Args:
    logps_BxT: log π_θ, ``[B, T]``.
    old_logps_BxT: log π_old, ``[B, T]``.
    advantages_BxT: advantages, ``[B, T]`` or ``[B]``.
    mask_BxT: completion-token mask, ``[B, T]``.
    clip_ratio_low: ``ε_low``.
    clip_ratio_high: ``ε_high``.
    clip_ratio_c: the dual-clip constant, or ``None``.
    level: ``"token"`` (PPO's token ratio) or ``"sequence"`` (GSPO's sequence ratio; static).

  Returns:
    A dict of float32 scalars with the keys above.

  Raises:
    ValueError: on mismatched shapes or a non-floating ``logps_BxT``.

  Examples:
    >>> lp = jnp.log(jnp.array([[0.5, 0.9]]))
    >>> m = ppo_clip_fraction(lp, jnp.log(jnp.array([[0.5, 0.5]])), jnp.array([1.0]), jnp.ones((1, 2)))
    >>> float(m["clip_fraction"]), float(m["ratio_max"])
    (0.5, 1.7999999523162842)
  """
  _check_clip(clip_ratio_low, clip_ratio_high)
  _check_choice(level, "level", ("token", "sequence"))
  logp, old, adv, w, keep = _prepare(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT, True)
  logp = jax.lax.stop_gradient(logp)
  log_ratio, ratio = _ratio(logp, old)
  ntokens = jnp.sum(jnp.where(keep, w, 0.0))
  if level == "sequence":
    log_seq_B = _safe_div(jnp.sum(log_ratio * w, axis=-1), jnp.sum(w, axis=-1))
    ratio = jnp.where(keep, jnp.exp(jnp.minimum(log_seq_B, 10.0))[:, None], 0.0)
  _, pg1, pg2, clip1, pg3 = _ppo_clip_terms(ratio, adv, clip_ratio_low, clip_ratio_high, clip_ratio_c)

  def mean(x):
    return _safe_div(jnp.sum(jnp.where(keep, x.astype(w.dtype) * w, 0.0)), ntokens)

  lower = jnp.zeros_like(w) if pg3 is None else ((clip1 > pg3) & (adv < 0))
  has = jnp.any(keep)
  return {
      "clip_fraction": mean(pg2 > pg1),
      "clip_fraction_lower": mean(lower),
      "clip_fraction_low": mean((ratio < 1.0 - clip_ratio_low) & (adv < 0)),
      "clip_fraction_high": mean((ratio > 1.0 + clip_ratio_high) & (adv > 0)),
      "approx_kl": mean(jnp.expm1(log_ratio) - log_ratio),
      "ppo_kl": mean(-log_ratio),
      "ratio_mean": mean(ratio),
      "ratio_min": jnp.where(has, jnp.min(jnp.where(keep, ratio, jnp.inf)), 0.0),
      "ratio_max": jnp.where(has, jnp.max(jnp.where(keep, ratio, -jnp.inf)), 0.0),
      "ntokens": ntokens,
  }


# ----------------------------------------------------------------------------- rollout mismatch


def truncated_importance_weights(
    trainer_logps_BxT: Array,
    rollout_logps_BxT: Array,
    mask_BxT: Array,
    *,
    level: str = "token",
    cap: float = 2.0,
    mode: str = "truncate",
    lower_cap: float | None = None,
) -> Array:
  """Importance weights ``π_trainer / π_rollout`` that correct the rollout/trainer mismatch.

  The sampler's log-probs differ from the trainer's for the same policy (other kernels,
  precision, or a stale policy in asynchronous RL), so samples are slightly off-policy. The
  correction multiplies the per-token loss by a stop-gradient weight built from
  ``log ρ = log π_trainer − log π_rollout`` (``log π_trainer`` is usually π_old's, recomputed by
  the trainer):

  - ``level="token"``: ``ρ_t = exp(log ρ_t)`` per token;
    ``level="sequence"``: ``ρ_b = exp(Σ_t log ρ_bt)`` (the product of token ratios) on every
    token of the sequence.
  - ``mode="truncate"`` (TIS): ``w = min(ρ, cap)`` (and ``max(·, lower_cap)`` when given);
    verl's ``rollout_is`` with ``rollout_is_threshold``, TRL's ``token_truncate`` /
    ``sequence_truncate``.
  - ``mode="mask"``: ``w = ρ`` where ``lower_cap <= ρ <= cap`` and 0 elsewhere: the token (or
    the whole sequence) leaves the update (IcePop / MIS; TRL's ``token_mask`` /
    ``sequence_mask``). For pure rejection (verl's ``rollout_rs``, weights 1 on kept tokens)
    use ``w > 0`` as a mask.

  ``log ρ`` is clamped to ``[−20, 20]`` before ``exp`` (verl's safety bound); the mask
  comparison is made on the unclamped log-ratio. Masked positions get weight 0.

  Args:
    trainer_logps_BxT: log-probs of the sampled tokens from the trainer, ``[B, T]``.
    rollout_logps_BxT: log-probs of the same tokens reported by the sampler, ``[B, T]``.
    mask_BxT: completion-token mask, ``[B, T]``.
    level: ``"token"`` or ``"sequence"`` (static).
    cap: the upper threshold ``C > 0`` (verl default 2.0).
    mode: ``"truncate"`` or ``"mask"`` (static).
    lower_cap: an optional lower threshold (IcePop's α, TRL's ``clip_min``), or ``None``.

  Returns:
    ``weights_BxT``: stop-gradient weights, ``[B, T]``, 0 where masked; multiply the per-token
    loss by them.

  Raises:
    ValueError: on mismatched shapes, an unknown ``level``/``mode`` or a non-positive ``cap``.

  References:
    Yao et al. 2025, `Your Efficient RL Framework Secretly Brings You Off-Policy RL Training
    <https://fengyao.notion.site/off-policy-rl>`_ (TIS); Ionides 2008, Truncated Importance
    Sampling; Ling Team 2025, IcePop (Ring-1T, arXiv:2510.18855).

  Examples:
    >>> t = jnp.log(jnp.array([[0.9, 0.2]]))
    >>> r = jnp.log(jnp.array([[0.3, 0.4]]))
    >>> truncated_importance_weights(t, r, jnp.ones((1, 2))).round(4)  # ratios 3.0 and 0.5
    Array([[2. , 0.5]], dtype=float32)
    >>> truncated_importance_weights(t, r, jnp.ones((1, 2)), mode="mask").round(4)
    Array([[0. , 0.5]], dtype=float32)
  """
  _check_choice(level, "level", ("token", "sequence"))
  _check_choice(mode, "mode", ("truncate", "mask"))
  _check_min(cap, "cap", 0.0, strict=True)
  if lower_cap is not None:
    _check_min(lower_cap, "lower_cap", 0.0)
  _checks.check_rank(trainer_logps_BxT, 2, "trainer_logps_BxT")
  _checks.check_floating(trainer_logps_BxT, "trainer_logps_BxT")
  _checks.check_same_shape(trainer_logps_BxT, rollout_logps_BxT, "trainer_logps_BxT", "rollout_logps_BxT")
  _checks.check_floating(rollout_logps_BxT, "rollout_logps_BxT")
  _checks.check_same_shape(trainer_logps_BxT, mask_BxT, "trainer_logps_BxT", "mask_BxT")
  trainer = jnp.asarray(trainer_logps_BxT)
  dtype = jnp.promote_types(trainer.dtype, jnp.float32)
  keep = jnp.asarray(mask_BxT) != 0
  w = jnp.asarray(mask_BxT).astype(dtype)
  log_rho = jnp.where(keep, trainer.astype(dtype) - jnp.asarray(rollout_logps_BxT).astype(dtype), 0.0)
  log_rho = jax.lax.stop_gradient(log_rho)
  if level == "sequence":
    log_rho = jnp.broadcast_to(jnp.sum(log_rho * w, axis=-1, keepdims=True), log_rho.shape)
  rho = jnp.exp(jnp.clip(log_rho, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND))
  if mode == "truncate":
    weights = jnp.minimum(rho, cap)
    if lower_cap is not None:
      weights = jnp.maximum(weights, lower_cap)
  else:
    ok = log_rho <= jnp.log(jnp.asarray(cap, dtype))
    if lower_cap is not None:
      ok &= log_rho >= jnp.log(jnp.asarray(lower_cap, dtype))  # log 0 = −inf keeps everything
    weights = jnp.where(ok, rho, 0.0)
  return jax.lax.stop_gradient(jnp.where(keep, weights, 0.0))
