"""Offline objectives beyond preference pairs, and the data transforms that go with them.

Losses (registered with ``kind="offline"``), each per token ``[B, T]`` unless stated:

- `c_rlft` (OpenChat): coarse, per-source reward-weighted token NLL.
- `a_lol`, `a_lol_seq`, `a_lol_kl`, `a_lol_ref_free` (Leftover Lunch): advantage-weighted
  offline policy gradient with clipped importance weights.
- `copg` (Contrastive Policy Gradient): off-policy pairs with scalar rewards, per pair ``[B]``.
- `dft` (Dynamic Fine-Tuning) and `anchored_sft` (ASFT): probability-reweighted NLL, with a
  KL anchor to the base model.
- `nft` (Negative-aware Fine-Tuning): likelihood ratios on positive answers and the implicit
  negative policy on negative answers.

Data transforms (NumPy in, NumPy out; not losses): `c_rlft_condition`,
`chain_of_hindsight_example`, `reward_augment_pairs`.

Alignment as everywhere in ``rlhf_jax``: ``logps_BxT[b, t]`` is log p(token ``t + 1`` | tokens
``<= t``) and ``mask_BxT`` marks the target tokens that count. Masked positions give exactly 0
and zero gradients, whatever the inputs hold there. Reference, old-policy, reward and
advantage inputs are targets: stop-gradient is applied inside.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses.registry import register
from rlhf_jax.ops import _checks

__all__ = [
    "a_lol",
    "a_lol_kl",
    "a_lol_ref_free",
    "a_lol_seq",
    "anchored_sft",
    "c_rlft",
    "c_rlft_condition",
    "chain_of_hindsight_example",
    "copg",
    "dft",
    "nft",
    "reward_augment_pairs",
]

_ALOL_REF = (
    "Baheti et al. 2023, Leftover Lunch: Advantage-based Offline Reinforcement Learning for "
    "Language Models / Improving Language Models with Advantage-based Offline Policy Gradients "
    "(arXiv:2305.14718)"
)


# ----------------------------------------------------------------------------- helpers


def _check_tokens(logps_BxT, mask_BxT, name="logps_BxT"):
  _checks.check_rank(logps_BxT, 2, name)
  _checks.check_floating(logps_BxT, name)
  _checks.check_same_shape(logps_BxT, mask_BxT, name, "mask_BxT")


def _check_per_seq(x_B, logps_BxT, name):
  _checks.check_rank(x_B, 1, name)
  if np.shape(x_B)[0] != np.shape(logps_BxT)[0]:
    raise ValueError(
        f"`{name}` must have shape [B] = ({np.shape(logps_BxT)[0]},) to match `logps_BxT` of "
        f"shape {np.shape(logps_BxT)}; got {np.shape(x_B)}."
    )


def _prepare(logps_BxT, mask_BxT):
  """``(logps, weights, keep)``: logps sanitised (0 where masked), mask as float weights."""
  logps_BxT = jnp.asarray(logps_BxT)
  dtype = jnp.promote_types(logps_BxT.dtype, jnp.float32)
  keep_BxT = jnp.asarray(mask_BxT) != 0
  weights_BxT = jnp.asarray(mask_BxT).astype(dtype)
  return jnp.where(keep_BxT, logps_BxT.astype(dtype), 0.0), weights_BxT, keep_BxT


def _target(x, keep, dtype):
  """Stop-gradient target, cast, 0 where masked."""
  return jnp.where(keep, jax.lax.stop_gradient(jnp.asarray(x).astype(dtype)), 0.0)


def _finish(losses_BxT, weights_BxT, keep_BxT):
  """Exactly 0 where masked; float weights are applied once, by the aggregation."""
  del weights_BxT
  return jnp.where(keep_BxT, losses_BxT, 0.0)


def _positive_advantages(advantages_B, dtype, filter_negative):
  adv_B = jax.lax.stop_gradient(jnp.asarray(advantages_B).astype(dtype))
  return jnp.maximum(adv_B, 0.0) if filter_negative else adv_B


# ----------------------------------------------------------------------------- C-RLFT


@register(
    "c_rlft", kind="offline",
    formula="−w_c·log π(y_t | x, c, y_<t), w_c = r_c (or exp(r_c/β)) per data source c",
    reference="Wang et al. 2023, OpenChat: Advancing Open-source Language Models with Mixed-Quality "
    "Data, C-RLFT (arXiv:2309.11235)",
    hparams=("beta=None",),
)
def c_rlft(
    logps_BxT: jax.Array,
    mask_BxT: jax.Array,
    source_rewards_B: jax.Array,
    *,
    beta: float | None = None,
) -> jax.Array:
  """C-RLFT: class-conditioned SFT, each token NLL weighted by its source's coarse reward.

  OpenChat treats each data source ``c`` (e.g. GPT-4 vs GPT-3.5 conversations) as a class
  with a coarse reward ``r_c`` (1 for expert data, a smaller ``α < 1`` for sub-optimal data)
  and regularises a class-conditioned policy ``π_θ(y | x, c)`` towards a class-conditioned
  reference. The KL-regularised optimum ``π* ∝ π_c·exp(r_c/β)`` is fitted by reward-weighted
  regression, a weighted SFT loss: ``loss[b, t] = −w_b·log π_θ(y_t | x, c_b, y_<t)``, with
  ``w_b = r_c`` (default: the coarse rewards used directly as loss weights, e.g. 1 and 0.1) or
  ``w_b = exp(r_c / β)`` (the exponentiated weights of the RWR derivation) when ``beta`` is
  given. Weights are per source, so only their ratio matters up to the learning rate.

  The class conditioning itself is data: prepend the source's class tokens to the prompt with
  `c_rlft_condition` (OpenChat puts them in the chat template, e.g. "GPT4 Correct User:" vs
  "GPT3 User:"), and condition on the expert class at inference.

  Args:
    logps_BxT: log-probs of the target tokens under the class-conditioned policy, ``[B, T]``.
    mask_BxT: target-token mask (bool or float weights), ``[B, T]``.
    source_rewards_B: coarse reward of each sequence's data source, ``[B]``.
    beta: if given, weights are ``exp(r / β)``; if ``None``, the rewards themselves.

  Returns:
    ``losses_BxT``: per-token losses, ``[B, T]``; reduce with e.g. ``rlhf_jax.ops.token_mean``.

  Raises:
    ValueError: on mismatched shapes or a non-floating ``logps_BxT``.

  References:
    Wang et al. 2023, `OpenChat: Advancing Open-source Language Models with Mixed-Quality Data
    <https://arxiv.org/abs/2309.11235>`_ (ICLR 2024).

  Examples:
    >>> c_rlft(jnp.log(jnp.array([[0.5], [0.5]])), jnp.ones((2, 1)), jnp.array([1.0, 0.1])).round(4)
    Array([[0.6931],
           [0.0693]], dtype=float32)
  """
  _check_tokens(logps_BxT, mask_BxT)
  _check_per_seq(source_rewards_B, logps_BxT, "source_rewards_B")
  logps_BxT, weights_BxT, keep_BxT = _prepare(logps_BxT, mask_BxT)
  rewards_B = jax.lax.stop_gradient(jnp.asarray(source_rewards_B).astype(logps_BxT.dtype))
  w_B = rewards_B if beta is None else jnp.exp(rewards_B / beta)
  return _finish(-w_B[:, None] * logps_BxT, weights_BxT, keep_BxT)


def c_rlft_condition(prompt_ids: Sequence[int] | np.ndarray,
                     class_token_id: int | Sequence[int] | np.ndarray) -> np.ndarray:
  """Prepends a data source's class token(s) to a prompt (C-RLFT's class conditioning).

  ``[c_1 .. c_m] + prompt``: train each example with its source's class tokens and the
  `c_rlft` weight of that source; at inference, prepend the expert class.

  Args:
    prompt_ids: prompt token ids, shape ``[P]``.
    class_token_id: one id or a sequence of ids marking the source (e.g. the tokens of
      "GPT4 Correct User:" in OpenChat's template).

  Returns:
    int32 array of shape ``[m + P]``.

  Raises:
    ValueError: if the inputs are not 1-D integer ids.

  Examples:
    >>> c_rlft_condition([5, 6, 7], 99)
    array([99,  5,  6,  7], dtype=int32)
  """
  prompt = _ids(prompt_ids, "prompt_ids")
  cls = _ids(np.atleast_1d(np.asarray(class_token_id)), "class_token_id")
  return np.concatenate([cls, prompt]).astype(np.int32)


# ----------------------------------------------------------------------------- A-LoL


def _check_alol(logps_BxT, ref_logps_BxT, advantages_B, mask_BxT):
  _check_tokens(logps_BxT, mask_BxT)
  _checks.check_same_shape(logps_BxT, ref_logps_BxT, "logps_BxT", "ref_logps_BxT")
  _check_per_seq(advantages_B, logps_BxT, "advantages_B")


@register(
    "a_lol", kind="offline",
    formula="−A⁺·clip(π(y|x)/π_ref(y|x), 1−ε, 1+ε)·log π(y_t | x, y_<t), sequence ratio, A⁺ = max(A, 0)",
    reference=_ALOL_REF,
    hparams=("epsilon=0.9", "filter_negative=True"),
)
def a_lol(
    logps_BxT: jax.Array,
    ref_logps_BxT: jax.Array,
    advantages_B: jax.Array,
    mask_BxT: jax.Array,
    *,
    epsilon: float = 0.9,
    filter_negative: bool = True,
) -> jax.Array:
  """A-LoL: advantage-weighted offline policy gradient with a clipped sequence-level ratio.

  The whole response is one action: ``∇J = E_D[A⁺·w·∇ log π_θ(y | x)]`` with
  ``w = clip(π_θ(y|x) / π_ref(y|x), 1 − ε, 1 + ε)`` (a stop-gradient weight: unlike PPO the
  gradient is never zeroed) and ``A = R(x, y) − V_ref(x)`` the advantage of the data response
  over the reference policy's value estimate. Data with ``A ≤ 0`` is discarded
  (``filter_negative``; the paper also samples training data with priority ∝ A⁺). Per token:
  ``loss[b, t] = −A⁺_b·w_b·log π_θ(y_t | x, y_<t)``; sum over tokens and average over
  sequences (``rlhf_jax.ops.seq_mean_token_sum``) for the paper's objective.

  Args:
    logps_BxT: policy log-probs of the data tokens, ``[B, T]``.
    ref_logps_BxT: reference (behaviour/SFT) log-probs of the same tokens, ``[B, T]``.
    advantages_B: ``R − V_ref`` per sequence, ``[B]``.
    mask_BxT: target-token mask, ``[B, T]``.
    epsilon: clip range ε of the importance weight (0.9 in the authors' HH-RLHF runs).
    filter_negative: use ``max(A, 0)`` (the paper's positive-advantage filter).

  Returns:
    ``losses_BxT``: per-token losses, ``[B, T]``.

  Raises:
    ValueError: on mismatched shapes or a non-floating ``logps_BxT``.

  References:
    Baheti et al. 2023, `Leftover Lunch: Advantage-based Offline Reinforcement Learning for
    Language Models <https://arxiv.org/abs/2305.14718>`_ (ICLR 2024).

  Examples:
    >>> lp = jnp.log(jnp.array([[0.5, 0.5]]))
    >>> a_lol(lp, lp, jnp.array([2.0]), jnp.ones((1, 2))).round(4)  # ratio 1
    Array([[1.3863, 1.3863]], dtype=float32)
  """
  _check_alol(logps_BxT, ref_logps_BxT, advantages_B, mask_BxT)
  logps_BxT, weights_BxT, keep_BxT = _prepare(logps_BxT, mask_BxT)
  ref_BxT = _target(ref_logps_BxT, keep_BxT, logps_BxT.dtype)
  log_ratio_B = jnp.sum(jax.lax.stop_gradient(logps_BxT) - ref_BxT, axis=-1)
  ratio_B = jnp.clip(jnp.exp(log_ratio_B), 1.0 - epsilon, 1.0 + epsilon)
  adv_B = _positive_advantages(advantages_B, logps_BxT.dtype, filter_negative)
  return _finish(-(adv_B * ratio_B)[:, None] * logps_BxT, weights_BxT, keep_BxT)


@register(
    "a_lol_seq", kind="offline",
    formula="−A⁺·clip(π(y_t)/π_ref(y_t), 1−ε, 1+ε)·log π(y_t | x, y_<t), per-token ratio",
    reference=_ALOL_REF + ", variant 'A-LoL seq.'",
    hparams=("epsilon=0.9", "filter_negative=True"),
)
def a_lol_seq(
    logps_BxT: jax.Array,
    ref_logps_BxT: jax.Array,
    advantages_B: jax.Array,
    mask_BxT: jax.Array,
    *,
    epsilon: float = 0.9,
    filter_negative: bool = True,
) -> jax.Array:
  """A-LoL seq.: A-LoL with a per-token clipped importance weight.

  ``loss[b, t] = −A⁺_b·clip(π_θ(y_t | ·) / π_ref(y_t | ·), 1 − ε, 1 + ε)·log π_θ(y_t | ·)``
  (stop-gradient weights). The paper names it "A-LoL seq." because the sequence is treated
  as a sequence of per-token actions for the importance weight, while the advantage stays
  sequence-level.

  Args:
    logps_BxT: policy log-probs, ``[B, T]``.
    ref_logps_BxT: reference log-probs, ``[B, T]``.
    advantages_B: ``R − V_ref`` per sequence, ``[B]``.
    mask_BxT: target-token mask, ``[B, T]``.
    epsilon: clip range ε of the per-token weights.
    filter_negative: use ``max(A, 0)``.

  Returns:
    ``losses_BxT``: per-token losses, ``[B, T]``.

  Raises:
    ValueError: on mismatched shapes or a non-floating ``logps_BxT``.

  References:
    Baheti et al. 2023, `Leftover Lunch <https://arxiv.org/abs/2305.14718>`_.

  Examples:
    >>> lp = jnp.log(jnp.array([[0.5, 0.5]]))
    >>> a_lol_seq(lp, lp - 1.0, jnp.array([1.0]), jnp.ones((1, 2)), epsilon=0.2).round(4)
    Array([[0.8318, 0.8318]], dtype=float32)
  """
  _check_alol(logps_BxT, ref_logps_BxT, advantages_B, mask_BxT)
  logps_BxT, weights_BxT, keep_BxT = _prepare(logps_BxT, mask_BxT)
  ref_BxT = _target(ref_logps_BxT, keep_BxT, logps_BxT.dtype)
  ratio_BxT = jnp.clip(jnp.exp(jax.lax.stop_gradient(logps_BxT) - ref_BxT), 1.0 - epsilon, 1.0 + epsilon)
  adv_B = _positive_advantages(advantages_B, logps_BxT.dtype, filter_negative)
  return _finish(-adv_B[:, None] * ratio_BxT * logps_BxT, weights_BxT, keep_BxT)


@register(
    "a_lol_kl", kind="offline",
    formula="−A⁺·log π(y_t | x, y_<t) + β·(log π(y_t) − log π_ref(y_t))",
    reference=_ALOL_REF + ", variant 'A-LoL KL'",
    hparams=("kl_coef=0.2", "filter_negative=True"),
)
def a_lol_kl(
    logps_BxT: jax.Array,
    ref_logps_BxT: jax.Array,
    advantages_B: jax.Array,
    mask_BxT: jax.Array,
    *,
    kl_coef: float = 0.2,
    filter_negative: bool = True,
) -> jax.Array:
  """A-LoL KL: A-LoL with a KL penalty to the reference instead of importance weights.

  ``loss[b, t] = −A⁺_b·log π_θ(y_t | ·) + kl_coef·(log π_θ(y_t | ·) − log π_ref(y_t | ·))``;
  summed over tokens the penalty is ``kl_coef·log(π_θ(y|x) / π_ref(y|x))`` on the data
  response, as in the authors' code (``kl_beta`` = 0.2 in their HH-RLHF runs).

  Args:
    logps_BxT: policy log-probs, ``[B, T]``.
    ref_logps_BxT: reference log-probs, ``[B, T]``.
    advantages_B: ``R − V_ref`` per sequence, ``[B]``.
    mask_BxT: target-token mask, ``[B, T]``.
    kl_coef: weight β of the KL penalty.
    filter_negative: use ``max(A, 0)``.

  Returns:
    ``losses_BxT``: per-token losses, ``[B, T]``.

  Raises:
    ValueError: on mismatched shapes or a non-floating ``logps_BxT``.

  References:
    Baheti et al. 2023, `Leftover Lunch <https://arxiv.org/abs/2305.14718>`_.

  Examples:
    >>> a_lol_kl(jnp.array([[-1.0]]), jnp.array([[-2.0]]), jnp.array([1.0]), jnp.ones((1, 1)))
    Array([[1.2]], dtype=float32)
  """
  _check_alol(logps_BxT, ref_logps_BxT, advantages_B, mask_BxT)
  logps_BxT, weights_BxT, keep_BxT = _prepare(logps_BxT, mask_BxT)
  ref_BxT = _target(ref_logps_BxT, keep_BxT, logps_BxT.dtype)
  adv_B = _positive_advantages(advantages_B, logps_BxT.dtype, filter_negative)
  losses_BxT = -adv_B[:, None] * logps_BxT + kl_coef * (logps_BxT - ref_BxT)
  return _finish(losses_BxT, weights_BxT, keep_BxT)


@register(
    "a_lol_ref_free", kind="offline",
    formula="−A⁺·log π(y_t | x, y_<t)",
    reference=_ALOL_REF + ", variant 'A-LoL ref-free'",
    hparams=("filter_negative=True",),
)
def a_lol_ref_free(
    logps_BxT: jax.Array,
    advantages_B: jax.Array,
    mask_BxT: jax.Array,
    *,
    filter_negative: bool = True,
) -> jax.Array:
  """A-LoL ref-free: the advantage-weighted NLL without importance weight (``w = 1``).

  ``loss[b, t] = −A⁺_b·log π_θ(y_t | x, y_<t)``.

  Args:
    logps_BxT: policy log-probs, ``[B, T]``.
    advantages_B: ``R − V_ref`` per sequence, ``[B]``.
    mask_BxT: target-token mask, ``[B, T]``.
    filter_negative: use ``max(A, 0)``.

  Returns:
    ``losses_BxT``: per-token losses, ``[B, T]``.

  Raises:
    ValueError: on mismatched shapes or a non-floating ``logps_BxT``.

  References:
    Baheti et al. 2023, `Leftover Lunch <https://arxiv.org/abs/2305.14718>`_.

  Examples:
    >>> a_lol_ref_free(jnp.array([[-1.0, -2.0]]), jnp.array([-1.0]), jnp.ones((1, 2)))  # A < 0
    Array([[0., 0.]], dtype=float32)
  """
  _check_tokens(logps_BxT, mask_BxT)
  _check_per_seq(advantages_B, logps_BxT, "advantages_B")
  logps_BxT, weights_BxT, keep_BxT = _prepare(logps_BxT, mask_BxT)
  adv_B = _positive_advantages(advantages_B, logps_BxT.dtype, filter_negative)
  return _finish(-adv_B[:, None] * logps_BxT, weights_BxT, keep_BxT)


# ----------------------------------------------------------------------------- CoPG


@register(
    "copg", kind="offline",
    formula="(r₁ − r₂ − β·(u₁ − u₂))² / (4β), u = log π − log π_ref; gradient "
    "−½·(R_β(y₁) − R_β(y₂))·∇(log π(y₁) − log π(y₂)), R_β = r − β·u",
    reference="Flet-Berliac et al. 2024, Contrastive Policy Gradient: Aligning LLMs on sequence-level "
    "scores in a supervised-friendly fashion (arXiv:2406.19185)",
    hparams=("beta=0.1",),
)
def copg(
    policy_logps_Bx2: jax.Array,
    ref_logps_Bx2: jax.Array,
    rewards_Bx2: jax.Array,
    *,
    beta: float = 0.1,
) -> jax.Array:
  """CoPG: contrastive off-policy policy gradient on pairs of responses with scalar rewards.

  For two responses ``y₁, y₂`` to the same prompt (from any behaviour policy) with rewards
  ``r₁, r₂`` and the regularised rewards ``R_β(y) = r(y) − β·log(π_θ(y)/π_ref(y))``, CoPG
  ascends ``½·(R_β(y₁) − R_β(y₂))·(∇log π_θ(y₁) − ∇log π_θ(y₂))``: a policy gradient where
  each response is the other's baseline, needing no importance weights. This function returns
  the loss whose gradient is exactly minus that update::

      loss = (r₁ − r₂ − β·(u₁ − u₂))² / (4β),   u = log π_θ(y) − log π_ref(y)

  (zero iff the implicit reward difference ``β(u₁ − u₂)`` matches ``r₁ − r₂``, i.e. at the
  KL-regularised optimum ``π ∝ π_ref·exp(r/β)``). With preference rewards ``(½, −½)`` it is
  IPO's squared loss up to scale: ``(β/4)·(u_w − u_l − 1/β)²``.

  Args:
    policy_logps_Bx2: policy sequence log-probs of the two responses, ``[B, 2]``.
    ref_logps_Bx2: reference sequence log-probs, ``[B, 2]``.
    rewards_Bx2: scalar rewards of the two responses, ``[B, 2]`` (any reward function).
    beta: KL-regularisation strength β (> 0).

  Returns:
    ``losses_B``: per-pair loss, ``[B]``.

  Raises:
    ValueError: on a shape other than ``[B, 2]`` or a non-floating policy.

  References:
    Flet-Berliac et al. 2024, `Contrastive Policy Gradient: Aligning LLMs on sequence-level
    scores in a supervised-friendly fashion <https://arxiv.org/abs/2406.19185>`_ (EMNLP 2024).

  Examples:
    >>> copg(jnp.array([[-1.0, -2.0]]), jnp.array([[-1.0, -2.0]]), jnp.array([[1.0, 0.0]]), beta=0.5)
    Array([0.5], dtype=float32)
  """
  _checks.check_rank(policy_logps_Bx2, 2, "policy_logps_Bx2")
  _checks.check_floating(policy_logps_Bx2, "policy_logps_Bx2")
  if np.shape(policy_logps_Bx2)[-1] != 2:
    raise ValueError(f"`policy_logps_Bx2` must have shape [B, 2]; got {np.shape(policy_logps_Bx2)}.")
  _checks.check_same_shape(policy_logps_Bx2, ref_logps_Bx2, "policy_logps_Bx2", "ref_logps_Bx2")
  _checks.check_same_shape(policy_logps_Bx2, rewards_Bx2, "policy_logps_Bx2", "rewards_Bx2")
  pol_Bx2 = jnp.asarray(policy_logps_Bx2)
  dtype = jnp.promote_types(pol_Bx2.dtype, jnp.float32)
  u_Bx2 = pol_Bx2.astype(dtype) - jax.lax.stop_gradient(jnp.asarray(ref_logps_Bx2).astype(dtype))
  r_Bx2 = jax.lax.stop_gradient(jnp.asarray(rewards_Bx2).astype(dtype))
  residual_B = (r_Bx2[:, 0] - r_Bx2[:, 1]) - beta * (u_Bx2[:, 0] - u_Bx2[:, 1])
  return jnp.square(residual_B) / (4.0 * beta)


# ----------------------------------------------------------------------------- DFT / ASFT


@register(
    "dft", kind="offline",
    formula="−sg(π(y_t | x, y_<t))·log π(y_t | x, y_<t)",
    reference="Wu et al. 2025, On the Generalization of SFT: A Reinforcement Learning Perspective with "
    "Reward Rectification (Dynamic Fine-Tuning, arXiv:2508.05629)",
)
def dft(logps_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Dynamic Fine-Tuning: token NLL weighted by the (stop-gradient) token probability.

  ``loss[b, t] = −sg(π_θ(y_t | x, y_<t))·log π_θ(y_t | x, y_<t)``. Reading SFT as a policy
  gradient with the implicit reward ``1/π_θ``, DFT rescales each token by its probability so
  the update is that of a uniform reward; the gradient is ``−π_t·∇log π_t = −∇π_t``.

  Args:
    logps_BxT: log-probs of the target tokens, ``[B, T]``.
    mask_BxT: target-token mask, ``[B, T]``.

  Returns:
    ``losses_BxT``: per-token losses, ``[B, T]``.

  Raises:
    ValueError: on mismatched shapes or a non-floating ``logps_BxT``.

  References:
    Wu et al. 2025, `On the Generalization of SFT: A Reinforcement Learning Perspective with
    Reward Rectification <https://arxiv.org/abs/2508.05629>`_.

  Examples:
    >>> dft(jnp.log(jnp.array([[0.5, 0.25]])), jnp.array([[1, 1]])).round(4)
    Array([[0.3466, 0.3466]], dtype=float32)
  """
  _check_tokens(logps_BxT, mask_BxT)
  logps_BxT, weights_BxT, keep_BxT = _prepare(logps_BxT, mask_BxT)
  probs_BxT = jax.lax.stop_gradient(jnp.exp(logps_BxT))
  return _finish(-probs_BxT * logps_BxT, weights_BxT, keep_BxT)


@register(
    "anchored_sft", kind="offline",
    formula="−sg(π(y_t))·log π(y_t) + λ·KL(π_base(·|s_t) ‖ π(·|s_t))",
    reference="Zhu et al. 2025, Anchored Supervised Fine-Tuning (ASFT, arXiv:2509.23753)",
    hparams=("kl_coef=0.1",),
)
def anchored_sft(
    logps_BxT: jax.Array,
    mask_BxT: jax.Array,
    policy_logits_BxTxV: jax.Array,
    ref_logits_BxTxV: jax.Array,
    *,
    kl_coef: float = 0.1,
) -> jax.Array:
  """Anchored SFT (ASFT): DFT plus a per-token KL anchor to the base model.

  ``loss[b, t] = −sg(π_θ(y_t | s_t))·log π_θ(y_t | s_t) + λ·KL(π_base(·|s_t) ‖ π_θ(·|s_t))``,
  the full-vocabulary KL at every trained position ``s_t``. ASFT reads DFT as reward-weighted
  regression with a tighter RL lower bound than SFT but no anchoring, so the policy drifts;
  the KL term keeps it near the base model. The KL direction, ``Σ_v π_base·(log π_base −
  log π_θ)``, and ``λ = 0.1`` follow the authors' code (``F.kl_div(log_softmax(policy),
  softmax(base))``).

  Args:
    logps_BxT: policy log-probs of the target tokens, ``[B, T]`` (the gather of
      ``policy_logits_BxTxV`` at the targets, e.g. ``rlhf_jax.ops.logprobs_from_logits``).
    mask_BxT: target-token mask, ``[B, T]``.
    policy_logits_BxTxV: policy logits (or log-probs) at the same positions, ``[B, T, V]``.
    ref_logits_BxTxV: frozen base-model logits (or log-probs), ``[B, T, V]``; stop-gradient.
    kl_coef: weight λ of the KL anchor.

  Returns:
    ``losses_BxT``: per-token losses, ``[B, T]``.

  Raises:
    ValueError: on mismatched shapes or non-floating inputs.

  References:
    Zhu et al. 2025, `Anchored Supervised Fine-Tuning <https://arxiv.org/abs/2509.23753>`_
    (ICLR 2026); DFT: Wu et al. 2025, arXiv:2508.05629.

  Examples:
    >>> logits = jnp.zeros((1, 1, 2))  # policy == base: the KL is 0, ASFT == DFT
    >>> anchored_sft(jnp.log(jnp.array([[0.5]])), jnp.ones((1, 1)), logits, logits).round(4)
    Array([[0.3466]], dtype=float32)
  """
  _check_tokens(logps_BxT, mask_BxT)
  _checks.check_rank(policy_logits_BxTxV, 3, "policy_logits_BxTxV")
  _checks.check_floating(policy_logits_BxTxV, "policy_logits_BxTxV")
  _checks.check_same_shape(
      policy_logits_BxTxV, ref_logits_BxTxV, "policy_logits_BxTxV", "ref_logits_BxTxV"
  )
  if tuple(np.shape(policy_logits_BxTxV)[:2]) != tuple(np.shape(logps_BxT)):
    raise ValueError(
        f"`policy_logits_BxTxV` must have shape [B, T, V] with [B, T] = {tuple(np.shape(logps_BxT))} "
        f"of `logps_BxT`; got {tuple(np.shape(policy_logits_BxTxV))}."
    )
  logps_BxT, weights_BxT, keep_BxT = _prepare(logps_BxT, mask_BxT)
  dtype = logps_BxT.dtype
  keep_BxTx1 = keep_BxT[..., None]
  policy_BxTxV = jnp.asarray(policy_logits_BxTxV).astype(dtype)
  ref_BxTxV = jax.lax.stop_gradient(jnp.asarray(ref_logits_BxTxV).astype(dtype))
  logp_BxTxV = jax.nn.log_softmax(jnp.where(keep_BxTx1, policy_BxTxV, 0.0))
  logq_BxTxV = jax.nn.log_softmax(jnp.where(keep_BxTx1, ref_BxTxV, 0.0))
  q_BxTxV = jnp.exp(logq_BxTxV)
  kl_BxT = jnp.sum(jnp.where(q_BxTxV > 0, q_BxTxV * (logq_BxTxV - logp_BxTxV), 0.0), axis=-1)
  probs_BxT = jax.lax.stop_gradient(jnp.exp(logps_BxT))
  return _finish(-probs_BxT * logps_BxT + kl_coef * kl_BxT, weights_BxT, keep_BxT)


# ----------------------------------------------------------------------------- NFT


_NFT_MAX_LOG_RATIO = 10.0


@register(
    "nft", kind="offline",
    formula="correct: −log R_t; incorrect: −log max((1 − r̂·R_t)/(1 − r̂), ε) (straight-through clip); "
    "R_t = π(y_t)/π_old(y_t), r̂ = per-question accuracy; × (1 − r̂)",
    reference="Chen et al. 2025, Bridging Supervised Learning and Reinforcement Learning in Math "
    "Reasoning (NFT, arXiv:2505.18116)",
    hparams=("epsilon=1.0", "neg_weight=1.0", "normalize=True", "rate_clip=0.02"),
)
def nft(
    logps_BxT: jax.Array,
    old_logps_BxT: jax.Array,
    correct_B: jax.Array,
    correct_rate_B: jax.Array,
    mask_BxT: jax.Array,
    *,
    epsilon: float = 1.0,
    neg_weight: float = 1.0,
    normalize: bool = True,
    rate_clip: float = 0.02,
) -> jax.Array:
  """Negative-aware Fine-Tuning: supervised learning on positive and negative answers.

  For a question with per-question accuracy ``r̂`` over its sampled answers, the generation
  policy splits as ``π_old = r̂·π⁺ + (1 − r̂)·π⁻``. NFT fits the positive policy ``π_θ`` by
  maximum likelihood on correct answers and, on incorrect answers, the *implicit negative
  policy* ``π⁻_θ = (π_old − r̂·π_θ)/(1 − r̂)``. Per token, with ``R_t = π_θ(y_t|·)/π_old(y_t|·)``::

      correct:    −log R_t
      incorrect:  −neg_weight · log max((1 − r̂·R_t)/(1 − r̂), ε)

  multiplied by ``(1 − r̂)`` when ``normalize`` (the authors' default ``normalize=1``, which
  matches Dr. GRPO on-policy). The ``max(·, ε)`` bounds the value, but the gradient flows
  through it unclipped (straight-through, the authors' ``clamp_preserve_grad``), so the
  ``1/x`` factor of the log is at most ``1/ε``; ``ε = 1`` is the value of the released 7B and
  32B scripts (``clamp_negative=1.0``). ``log R_t`` is capped at 10 before exponentiating, and
  ``r̂`` is clipped to ``[rate_clip, 1 − rate_clip]`` (the code's 0.02/0.98); questions that
  are all right or all wrong carry no signal and are usually filtered out.

  In strict on-policy training (``R = 1``) the gradient equals Dr. GRPO's: ``−(1 − r̂)`` on
  correct and ``+r̂`` on incorrect tokens, times ``∇log π``.

  Args:
    logps_BxT: policy log-probs of the sampled tokens, ``[B, T]``.
    old_logps_BxT: log-probs under the sampling (old) policy, ``[B, T]``; stop-gradient.
    correct_B: 1 for a correct (positive) answer, 0 for an incorrect one, ``[B]``.
    correct_rate_B: accuracy ``r̂`` of the answer's question (the mean of ``correct`` over the
      question's group), ``[B]``.
    mask_BxT: target-token mask, ``[B, T]``.
    epsilon: lower bound ε of the negative-policy likelihood ratio.
    neg_weight: weight of the negative term (0 gives rejection-sampling fine-tuning).
    normalize: multiply by ``1 − r̂`` (prioritises hard questions).
    rate_clip: ``r̂`` is clipped to ``[rate_clip, 1 − rate_clip]``.

  Returns:
    ``losses_BxT``: per-token losses, ``[B, T]`` (the authors sum tokens per answer and
    divide by a constant: ``rlhf_jax.ops.seq_mean_token_sum_norm``).

  Raises:
    ValueError: on mismatched shapes or a non-floating ``logps_BxT``.

  References:
    Chen et al. 2025, `Bridging Supervised Learning and Reinforcement Learning in Math
    Reasoning <https://arxiv.org/abs/2505.18116>`_ (ICLR 2026).

  Examples:
    >>> lp, old = jnp.log(jnp.array([[0.25], [0.25]])), jnp.log(jnp.array([[0.5], [0.5]]))
    >>> losses = nft(lp, old, jnp.array([1.0, 0.0]), jnp.array([0.5, 0.5]), jnp.ones((2, 1)))
    >>> [round(float(x), 4) for x in losses[:, 0]]  # ½·(−log ½), ½·(−log 1.5)
    [0.3466, -0.2027]
  """
  _check_tokens(logps_BxT, mask_BxT)
  _checks.check_same_shape(logps_BxT, old_logps_BxT, "logps_BxT", "old_logps_BxT")
  _check_per_seq(correct_B, logps_BxT, "correct_B")
  _check_per_seq(correct_rate_B, logps_BxT, "correct_rate_B")
  logps_BxT, weights_BxT, keep_BxT = _prepare(logps_BxT, mask_BxT)
  dtype = logps_BxT.dtype
  old_BxT = _target(old_logps_BxT, keep_BxT, dtype)
  log_ratio_BxT = jnp.minimum(logps_BxT - old_BxT, _NFT_MAX_LOG_RATIO)
  ratio_BxT = jnp.exp(log_ratio_BxT)
  rate_B = jax.lax.stop_gradient(jnp.asarray(correct_rate_B).astype(dtype))
  rate_Bx1 = jnp.clip(rate_B, rate_clip, 1.0 - rate_clip)[:, None]
  correct_Bx1 = jax.lax.stop_gradient(jnp.asarray(correct_B).astype(dtype))[:, None]
  positive_BxT = -log_ratio_BxT
  proxy_BxT = (1.0 - rate_Bx1 * ratio_BxT) / (1.0 - rate_Bx1)
  proxy_BxT = proxy_BxT + jax.lax.stop_gradient(jnp.maximum(proxy_BxT, epsilon) - proxy_BxT)
  negative_BxT = -jnp.log(proxy_BxT)
  losses_BxT = correct_Bx1 * positive_BxT + (1.0 - correct_Bx1) * neg_weight * negative_BxT
  if normalize:
    losses_BxT = losses_BxT * (1.0 - rate_Bx1)
  return _finish(losses_BxT, weights_BxT, keep_BxT)


# ----------------------------------------------------------------------------- data transforms


def _ids(x, name: str) -> np.ndarray:
  arr = np.asarray(x)
  if arr.ndim != 1:
    raise ValueError(f"`{name}` must be a 1-D sequence of token ids; got shape {arr.shape}.")
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"`{name}` must hold integer token ids; got dtype {arr.dtype}.")
  return arr.astype(np.int32)


def chain_of_hindsight_example(
    prompt_ids: Sequence[int] | np.ndarray,
    good_ids: Sequence[int] | np.ndarray,
    bad_ids: Sequence[int] | np.ndarray,
    *,
    good_feedback_ids: Sequence[int] | np.ndarray,
    bad_feedback_ids: Sequence[int] | np.ndarray,
    order_rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """One Chain-of-Hindsight training sequence: answers conditioned on feedback phrases.

  Builds ``prompt ⊕ fb₁ ⊕ answer₁ ⊕ fb₂ ⊕ answer₂``, e.g. ``x ⊕ "A helpful answer:" ⊕ y⁺ ⊕
  "An unhelpful answer:" ⊕ y⁻``, with the loss on the model-output tokens only (both
  answers), never on the prompt or the feedback phrases. The good pair comes first, or, with
  ``order_rng``, either order with probability ½ (the paper randomises the order and the
  templates). At inference, condition on the positive feedback phrase. The paper's random
  masking of past tokens (against copying) and its pre-training regulariser are left to the
  training step.

  Args:
    prompt_ids: prompt tokens, ``[P]``.
    good_ids: the preferred answer's tokens, ``[G]``.
    bad_ids: the dispreferred answer's tokens, ``[N]``.
    good_feedback_ids: tokens of the positive feedback phrase (include any separators).
    bad_feedback_ids: tokens of the negative feedback phrase.
    order_rng: a ``np.random.Generator`` to randomise the order (advanced in place), or
      ``None`` for good-then-bad.

  Returns:
    ``(input_ids, loss_mask)``: int32 arrays of shape ``[L]``; ``loss_mask[i] = 1`` where
    ``input_ids[i]`` is an answer token. For the usual next-token targets
    ``input_ids[1:]`` the aligned mask is ``loss_mask[1:]``.

  Raises:
    ValueError: if an input is not a 1-D sequence of integer ids.

  References:
    Liu, Sferrazza and Abbeel 2023, `Chain of Hindsight Aligns Language Models with Feedback
    <https://arxiv.org/abs/2302.02676>`_ (ICLR 2024).

  Examples:
    >>> ids, mask = chain_of_hindsight_example([1, 2], [7, 7], [8], good_feedback_ids=[3],
    ...                                        bad_feedback_ids=[4])
    >>> ids.tolist(), mask.tolist()
    ([1, 2, 3, 7, 7, 4, 8], [0, 0, 0, 1, 1, 0, 1])
  """
  prompt = _ids(prompt_ids, "prompt_ids")
  good = _ids(good_ids, "good_ids")
  bad = _ids(bad_ids, "bad_ids")
  good_fb = _ids(good_feedback_ids, "good_feedback_ids")
  bad_fb = _ids(bad_feedback_ids, "bad_feedback_ids")
  segments = [(good_fb, good), (bad_fb, bad)]
  if order_rng is not None and order_rng.random() < 0.5:
    segments.reverse()
  ids = [prompt]
  mask = [np.zeros_like(prompt)]
  for feedback, answer in segments:
    ids += [feedback, answer]
    mask += [np.zeros_like(feedback), np.ones_like(answer)]
  return np.concatenate(ids).astype(np.int32), np.concatenate(mask).astype(np.int32)


def reward_augment_pairs(
    prompts: Sequence[Sequence[int] | np.ndarray],
    chosen: Sequence[Sequence[int] | np.ndarray],
    rejected: Sequence[Sequence[int] | np.ndarray],
    chosen_rewards: Sequence[float] | np.ndarray,
    rejected_rewards: Sequence[float] | np.ndarray,
    *,
    goal_ids_fn: Callable[[float], Sequence[int] | np.ndarray],
    drop_ties: bool = False,
) -> dict[str, list[np.ndarray] | np.ndarray]:
  """Reward-augmented preference data: each pair twice, conditioned on each response's reward.

  For a pair ``(x, y_w, y_l)`` with judge rewards ``r_w ≥ r_l``, the reward-augmented dataset
  holds the two goal-conditioned pairs ``(g(r_w) ⊕ x: y_w ≻ y_l)`` and ``(g(r_l) ⊕ x: y_l ≻
  y_w)``: asked for quality ``r_l``, the rejected response is the better match. Any direct
  alignment loss (DPO) trains on the union, so the policy learns the whole quality spectrum
  instead of unlearning good rejected responses; at inference, condition on the highest
  reward. The goal ``g(r)`` is a prefix of the prompt, e.g. the tokens of the authors'
  system prompt "You are an assistant that generates responses for the instruction while
  implicitly achieving the following target scores (on a scale of 1-10 ...): Overall score:
  {r}.". As in the authors' script, the output is all the ``goal = r_w`` pairs followed by
  all the ``goal = r_l`` pairs.

  Args:
    prompts: ``N`` prompts (token id sequences).
    chosen: ``N`` chosen responses.
    rejected: ``N`` rejected responses.
    chosen_rewards: ``[N]`` rewards of the chosen responses.
    rejected_rewards: ``[N]`` rewards of the rejected responses (``≤`` the chosen ones).
    goal_ids_fn: maps a reward to the tokens of its goal prefix.
    drop_ties: drop pairs with equal rewards (their two copies contradict each other; the
      authors' script keeps them).

  Returns:
    A dict with ``"prompt"``, ``"chosen"``, ``"rejected"`` (lists of int32 arrays, ``2N'``
    each) and ``"goal"`` (float array ``[2N']``, the reward each pair is conditioned on).

  Raises:
    ValueError: on inputs of different lengths, non-integer ids, or a pair whose chosen
      reward is below its rejected reward.

  References:
    Zhang et al. 2024, `Reward-Augmented Data Enhances Direct Preference Alignment of LLMs
    <https://arxiv.org/abs/2410.08067>`_ (ICML 2025).

  Examples:
    >>> out = reward_augment_pairs([[1]], [[5]], [[6]], [9.0], [7.0], goal_ids_fn=lambda r: [int(r)])
    >>> [p.tolist() for p in out["prompt"]], [c.tolist() for c in out["chosen"]], out["goal"].tolist()
    ([[9, 1], [7, 1]], [[5], [6]], [9.0, 7.0])
  """
  n = len(prompts)
  if not (len(chosen) == len(rejected) == n):
    raise ValueError(
        f"`prompts`, `chosen` and `rejected` must have the same length; got {n}, {len(chosen)} and "
        f"{len(rejected)}."
    )
  r_w = np.asarray(chosen_rewards, dtype=np.float64).reshape(-1)
  r_l = np.asarray(rejected_rewards, dtype=np.float64).reshape(-1)
  if r_w.shape != (n,) or r_l.shape != (n,):
    raise ValueError(
        f"`chosen_rewards` and `rejected_rewards` must have shape ({n},); got {r_w.shape} and "
        f"{r_l.shape}."
    )
  bad = np.flatnonzero(r_w < r_l)
  if bad.size:
    raise ValueError(
        f"`chosen_rewards` must be >= `rejected_rewards`; pair {int(bad[0])} has {r_w[bad[0]]} < "
        f"{r_l[bad[0]]}."
    )
  keep = [i for i in range(n) if not (drop_ties and r_w[i] == r_l[i])]
  out = {"prompt": [], "chosen": [], "rejected": [], "goal": []}
  for goal_is_chosen in (True, False):
    for i in keep:
      prompt = _ids(prompts[i], f"prompts[{i}]")
      y_w, y_l = _ids(chosen[i], f"chosen[{i}]"), _ids(rejected[i], f"rejected[{i}]")
      goal = r_w[i] if goal_is_chosen else r_l[i]
      goal_ids = _ids(np.atleast_1d(np.asarray(goal_ids_fn(float(goal)))), "goal_ids_fn(reward)")
      out["prompt"].append(np.concatenate([goal_ids, prompt]).astype(np.int32))
      out["chosen"].append(y_w if goal_is_chosen else y_l)
      out["rejected"].append(y_l if goal_is_chosen else y_w)
      out["goal"].append(goal)
  out["goal"] = np.asarray(out["goal"], dtype=np.float32)
  return out
