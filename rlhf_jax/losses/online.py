"""Online and Nash preference-learning objectives: XPO, Nash-MD-PG, INPO, DNO and online IPO.

These are the per-pair losses of the online / game-theoretic preference papers. Each is a pure
function of arrays; sampling the completions, querying the judge or preference model and
keeping the previous iterate ``π_t`` are the caller's business. Sequence-level losses take
*sequence* log-probabilities ``[B]`` (masked sums over completion tokens) in the naming of
`rlhf_jax.losses.dpo`:

    losses_B = fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                  ref_rejected_logps, ..., *, hparams)

For the self-play losses, where the two completions of a pair are not ranked in advance,
"chosen" is simply the first completion ``y`` and "rejected" the second ``y'``, and
``preference_B = P(y ≻ y' | x)`` (a probability in ``[0, 1]``: a preference model's output, a
judge's soft label, or a 0/1 outcome). `nash_md_loss` is a REINFORCE estimator and takes
per-token log-probs ``[B, T]`` with a mask.

Reference log-probs, previous-iterate log-probs and preferences are targets: their gradient is
stopped inside every loss (``stop_gradient=False``, the last keyword, turns that off). The
output is the per-pair loss ``[B]``; the caller reduces (TRL takes the mean).

`preference_win_rates` turns a ``[B, K, K]`` matrix of pairwise preferences among K samples of
a prompt into each sample's mean win rate against the others, DNO's estimate of
``r_t(x, y) = E_{y'~π_t} P(y ≻ y' | x)``. Make a preference model's matrix consistent
(``P_ij + P_ji = 1``) first with `rlhf_jax.rewards.symmetrize_preference` applied to the logit
matrix and its transpose.

Nothing is jitted at definition; every function is jit-able (hyper-parameters are Python
scalars or arrays; string arguments must be static).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses.dpo import _check_positive, _concrete_scalar
from rlhf_jax.losses.registry import register
from rlhf_jax.ops import _checks

__all__ = [
    "dno_loss",
    "inpo_loss",
    "nash_md_loss",
    "online_ipo_loss",
    "preference_win_rates",
    "xpo_loss",
]

Array = jax.Array

XPO_LOSS_TYPES = ("sigmoid", "ipo")
NASH_MD_KL_FORMS = ("token", "sequence")

# ----------------------------------------------------------------------------- checks


def _check_nonnegative(x, name: str) -> None:
  v = _concrete_scalar(x)
  if v is not None and not v >= 0:
    raise ValueError(f"`{name}` must be >= 0; got {v}.")


def _check_choice(x, name: str, choices: tuple[str, ...]) -> None:
  if not isinstance(x, str) or x not in choices:
    raise ValueError(f"`{name}` must be one of {list(choices)}; got {x!r}.")


def _check_seqs(arrays, names) -> jnp.dtype:
  """Checks rank-1 floating arrays of one shape; returns their common dtype."""
  for x, name in zip(arrays, names):
    _checks.check_rank(x, 1, name)
    _checks.check_floating(x, name)
  for x, name in zip(arrays[1:], names[1:]):
    _checks.check_same_shape(arrays[0], x, names[0], name)
  return jnp.result_type(*arrays)


def _preference(preference_B, like: Array, stop_gradient: bool, like_name: str = "policy_chosen_logps") -> Array:
  """Checks ``preference_B`` (shape of ``like``, values in [0, 1] when concrete); returns it in ``like``'s dtype."""
  _checks.check_same_shape(like, preference_B, like_name, "preference_B")
  if not jnp.issubdtype(jnp.result_type(preference_B), jnp.number):
    raise ValueError(f"`preference_B` must be numeric; got dtype {jnp.result_type(preference_B)}.")
  if not isinstance(preference_B, jax.core.Tracer):
    p = np.asarray(preference_B, dtype=np.float64)
    if not np.all((p >= 0.0) & (p <= 1.0)):  # also rejects NaN
      raise ValueError(f"`preference_B` must lie in [0, 1]; got values in [{p.min()}, {p.max()}].")
  p = jnp.asarray(preference_B).astype(like.dtype)
  return _sg(p, stop_gradient)


def _sg(x: Array, stop_gradient: bool) -> Array:
  return jax.lax.stop_gradient(x) if stop_gradient else x


def _margin(policy_chosen_logps, policy_rejected_logps, anchor_chosen_logps, anchor_rejected_logps,
            stop_gradient: bool, dtype) -> Array:
  """``(log π(y_c) − log π_a(y_c)) − (log π(y_r) − log π_a(y_r))``, the anchor's gradient stopped."""
  u_c = jnp.asarray(policy_chosen_logps, dtype) - _sg(jnp.asarray(anchor_chosen_logps, dtype), stop_gradient)
  u_r = jnp.asarray(policy_rejected_logps, dtype) - _sg(jnp.asarray(anchor_rejected_logps, dtype), stop_gradient)
  return u_c - u_r


_PAIR_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")

# ----------------------------------------------------------------------------- XPO


@register(
    "xpo", kind="online",
    formula="−log σ(β·Δ) + α·log π(ỹ)  (ipo: (Δ − 1/(2β))² + α·log π(ỹ)), ỹ ~ π_ref",
    reference="Xie et al. 2024, Exploratory Preference Optimization: Harnessing Implicit "
              "Q*-Approximation for Sample-Efficient RLHF (arXiv:2405.21046)",
    hparams=("beta=0.1", "alpha=1e-5", "loss_type='sigmoid'"),
)
def xpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    policy_explore_logps: Array,
    *,
    beta: float = 0.1,
    alpha: float = 1e-5,
    loss_type: str = "sigmoid",
    stop_gradient: bool = True,
) -> Array:
  """XPO: online DPO (or IPO) on the judged pair plus the exploration term ``α·log π(ỹ|x)``.

  Each step samples ``y ~ π_θ`` and ``ỹ ~ π_ref``, has them judged, and minimises, with
  ``Δ = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))`` on the judged pair,

  * ``loss_type="sigmoid"``: ``−log σ(β·Δ) + α·log π_θ(ỹ|x)``,
  * ``loss_type="ipo"``: ``(Δ − 1/(2β))² + α·log π_θ(ỹ|x)``.

  The exploration term pushes down the policy's likelihood of the reference model's own sample,
  moving mass outside the reference's support (XPO Algorithm 1, "optimism"; ``α = 0`` is online
  DPO). Checked against TRL's ``XPOTrainer._compute_losses`` (``trl/experimental/xpo``): the pair
  is (policy sample, reference sample) ordered by the judge, all log-probs are sums over
  completion tokens, the IPO margin is *not* length-normalised (unlike TRL's DPO ``ipo``, see
  `rlhf_jax.losses.dpo.ipo_loss`), the exploration term is ``α`` times the policy's summed
  log-prob of the reference completion (with gradient), and ``α = 1e-5``, ``β = 0.1`` are
  TRL's defaults (the paper gives no values).

  Args:
    policy_chosen_logps: policy sequence log-probs of the chosen completions, shape ``[B]``.
    policy_rejected_logps: policy sequence log-probs of the rejected completions, shape ``[B]``.
    ref_chosen_logps: reference log-probs of the chosen completions, shape ``[B]`` (no gradient).
    ref_rejected_logps: reference log-probs of the rejected completions, shape ``[B]`` (no gradient).
    policy_explore_logps: policy sequence log-probs ``log π_θ(ỹ|x)`` of the reference model's
      sample ``ỹ``, shape ``[B]`` (with gradient). In TRL's pairing ``ỹ`` is one of the judged
      pair, so this equals ``policy_chosen_logps`` or ``policy_rejected_logps`` row by row.
    beta: KL coefficient ``β`` (> 0).
    alpha: exploration coefficient ``α`` (>= 0).
    loss_type: ``"sigmoid"`` (DPO) or ``"ipo"`` (static).
    stop_gradient: stop gradients through the reference log-probs (default True).

  Returns:
    ``losses_B``: per-pair losses, shape ``[B]``.

  Raises:
    ValueError: on a shape/rank/dtype mismatch, ``beta <= 0``, ``alpha < 0`` or an unknown
      ``loss_type``.

  Examples:
    >>> xpo_loss(jnp.array([-1.0]), jnp.array([-2.0]), jnp.array([-1.5]), jnp.array([-1.5]),
    ...          jnp.array([-2.0]), beta=1.0, alpha=0.1)
    Array([0.11326168], dtype=float32)

  References:
    Xie et al. 2024, `Exploratory Preference Optimization: Harnessing Implicit
    Q*-Approximation for Sample-Efficient RLHF <https://arxiv.org/abs/2405.21046>`_.
  """
  _check_choice(loss_type, "loss_type", XPO_LOSS_TYPES)
  _check_positive(beta, "beta")
  _check_nonnegative(alpha, "alpha")
  arrays = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
            policy_explore_logps)
  dtype = _check_seqs(arrays, (*_PAIR_NAMES, "policy_explore_logps"))
  delta = _margin(*arrays[:4], stop_gradient, dtype)
  if loss_type == "sigmoid":
    pair = -jax.nn.log_sigmoid(beta * delta)
  else:
    pair = (delta - 1.0 / (2.0 * beta)) ** 2
  return pair + alpha * jnp.asarray(policy_explore_logps, dtype)


# ----------------------------------------------------------------------------- Nash-MD-PG


@register(
    "nash_md", kind="online",
    formula="β·Σ_t sg(log π_t − log π_ref,t)·log π_t − (P(y ≻ y′) − ½)·Σ_t log π_t, y ~ π, "
            "y′ ~ π^(1−m)·π_ref^m",
    reference="Munos et al. 2023, Nash Learning from Human Feedback (arXiv:2312.00886)",
    hparams=("beta=0.1", "kl_form='token'"),
)
def nash_md_loss(
    policy_token_logps_BxT: Array,
    ref_token_logps_BxT: Array,
    mask_BxT: Array,
    preference_B: Array,
    *,
    beta: float = 0.1,
    kl_form: str = "token",
) -> Array:
  """Nash-MD-PG: a REINFORCE surrogate whose gradient plays the policy against a mixture.

  ``y ~ π_θ`` is the policy's sample and ``y′`` a sample of the geometric mixture
  ``π_θ^(1−m)·π_ref^m`` (TRL's ``mixture_coef`` ``m``, token by token); ``preference_B`` is
  ``P(y ≻ y′ | x)``. With ``ℓ_t = log π_θ(y_t | x, y_<t)`` over the masked tokens of ``y``
  (``w_t`` = ``mask_BxT``) and the token log-ratio ``ρ_t = ℓ_t − log π_ref(y_t | ...)``,
  the per-sample loss is

  * ``kl_form="token"`` (TRL): ``β·Σ_t w_t·sg(ρ_t)·ℓ_t − (P − ½)·Σ_t w_t·ℓ_t``;
  * ``kl_form="sequence"`` (the paper's estimator): ``β·sg(Σ_t w_t·ρ_t)·Σ_t w_t·ℓ_t −
    (P − ½)·Σ_t w_t·ℓ_t``.

  Its gradient is ``−∇log π(y)·(P(y ≻ y′) − ½ − β·log π(y)/π_ref(y))`` (the Nash-MD-PG
  direction, ``½`` the control variate) for the sequence form; the token form, as TRL computes
  it, weights each token's score by that token's own log-ratio. The *value* is a surrogate,
  not an objective (it is linear in ``ℓ``); ``P`` and the log-ratio are stop-gradient targets.
  Checked against TRL's ``NashMDTrainer._compute_losses`` (``trl/experimental/nash_md``:
  ``score = (probability − 0.5)·Σ logπ``, ``kl = Σ sg(logπ − logπ_ref)·logπ``, ``loss =
  β·kl − score``, padding log-probs zeroed) and, for ``kl_form="sequence"``, against the
  sampled Nash-MD-PG loss of the EGPO authors' simulations (``nash_md_pg_sample`` in
  ``zhourunlong/EGPO``, without the ``½`` baseline, which only changes the variance).

  Args:
    policy_token_logps_BxT: policy log-probs of the sampled tokens of ``y``, ``[B, T]``.
    ref_token_logps_BxT: reference log-probs of the same tokens, ``[B, T]`` (no gradient).
    mask_BxT: completion-token mask of ``y`` (bool or float weights), ``[B, T]``.
    preference_B: ``P(y ≻ y′ | x)`` in ``[0, 1]``, shape ``[B]`` (no gradient); TRL uses
      ``σ(r(y) − r(y′))`` of a reward model.
    beta: KL coefficient ``β`` (>= 0; 0 is pure self-play against the mixture).
    kl_form: ``"token"`` (TRL) or ``"sequence"`` (static).

  Returns:
    ``losses_B``: per-sample surrogate losses, shape ``[B]``.

  Raises:
    ValueError: on a shape/rank/dtype mismatch, ``beta < 0``, ``preference_B`` outside
      ``[0, 1]`` or an unknown ``kl_form``.

  Examples:
    >>> nash_md_loss(jnp.array([[-1.0, -2.0]]), jnp.array([[-1.5, -1.5]]), jnp.array([[1, 1]]),
    ...              jnp.array([0.75]), beta=0.5)
    Array([1.], dtype=float32)

  References:
    Munos et al. 2023, `Nash Learning from Human Feedback <https://arxiv.org/abs/2312.00886>`_.
  """
  _check_choice(kl_form, "kl_form", NASH_MD_KL_FORMS)
  _check_nonnegative(beta, "beta")
  for x, name in ((policy_token_logps_BxT, "policy_token_logps_BxT"),
                  (ref_token_logps_BxT, "ref_token_logps_BxT")):
    _checks.check_rank(x, 2, name)
    _checks.check_floating(x, name)
  _checks.check_same_shape(policy_token_logps_BxT, ref_token_logps_BxT, "policy_token_logps_BxT",
                           "ref_token_logps_BxT")
  _checks.check_same_shape(policy_token_logps_BxT, mask_BxT, "policy_token_logps_BxT", "mask_BxT")
  dtype = jnp.promote_types(jnp.result_type(policy_token_logps_BxT, ref_token_logps_BxT), jnp.float32)
  mask_BxT = jnp.asarray(mask_BxT)
  keep = mask_BxT != 0
  w = mask_BxT.astype(dtype)
  logp = jnp.where(keep, jnp.asarray(policy_token_logps_BxT, dtype), 0.0)  # no 0·inf from padding
  ref = jnp.where(keep, jax.lax.stop_gradient(jnp.asarray(ref_token_logps_BxT, dtype)), 0.0)
  seq_logp = jnp.sum(w * logp, axis=-1)
  p = _preference(preference_B, seq_logp, True, "policy_token_logps_BxT[:, 0]")
  ratio = jax.lax.stop_gradient(logp - ref)
  if kl_form == "token":
    kl = jnp.sum(w * ratio * logp, axis=-1)
  else:
    kl = jnp.sum(w * ratio, axis=-1) * seq_logp
  return beta * kl - (p - 0.5) * seq_logp


# ----------------------------------------------------------------------------- INPO


@register(
    "inpo", kind="online",
    formula="(log π(y_w)/π(y_l) − (τ/η)·log π_ref(y_w)/π_ref(y_l) − (1 − τ/η)·log π_t(y_w)/π_t(y_l) "
            "− 1/(2η))²",
    reference="Zhang et al. 2024, Iterative Nash Policy Optimization: Aligning LLMs with General "
              "Preferences via No-Regret Learning (arXiv:2407.00617)",
    hparams=("eta", "tau"),
)
def inpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    prev_chosen_logps: Array,
    prev_rejected_logps: Array,
    *,
    eta: float,
    tau: float,
    stop_gradient: bool = True,
) -> Array:
  """INPO's squared loss: regress the policy's log-ratio margin onto the OMD step's target.

  Online mirror descent on the KL-regularised preference game, ``π_{t+1} = argmin ⟨∇ℓ_t(π_t), π⟩
  + η·KL(π ‖ π_t)`` with ``ℓ_t(π) = −P(π ≻ π_t) + τ·KL(π ‖ π_ref)`` (``1/η`` is the OMD learning
  rate), has the closed form ``π_{t+1}(y) ∝ exp(P(y ≻ π_t)/η)·π_ref(y)^(τ/η)·π_t(y)^(1−τ/η)``.
  INPO fits it without win rates, on pairs ``y_w ≻ y_l`` sampled from ``π_t`` and judged:

      h = log π(y_w)/π(y_l) − (τ/η)·log π_ref(y_w)/π_ref(y_l) − (1 − τ/η)·log π_t(y_w)/π_t(y_l)
      loss = (h − 1/(2η))²

  (IPO's target ``1/(2τ)`` with the OMD ``η`` in its place.) Checked against the ICLR 2025
  version of the paper: Algorithm 1 line 5, the definition of ``h_t`` and Eq. (8), with
  Proposition 6 (equality with the win-rate regression of Eq. (7) up to a constant); the paper
  grid-searches ``η ∈ {0.1, 0.01, 0.0075, 0.005, 0.002}``, uses ``η = 0.005`` and ``τ = η/3``,
  and ``τ = 0`` for its "w/o KL" ablation. Two public re-implementations use the same
  coefficients. Note: this ``η`` multiplies the KL to ``π_t`` (it is the *inverse* step size);
  a parametrisation with step size ``η′ = 1/η`` reads ``η′τ``, ``1 − η′τ`` and ``η′/2``.

  Args:
    policy_chosen_logps: policy sequence log-probs of the winners ``y_w``, shape ``[B]``.
    policy_rejected_logps: policy sequence log-probs of the losers ``y_l``, shape ``[B]``.
    ref_chosen_logps: ``log π_ref(y_w)``, shape ``[B]`` (no gradient).
    ref_rejected_logps: ``log π_ref(y_l)``, shape ``[B]`` (no gradient).
    prev_chosen_logps: ``log π_t(y_w)`` under the previous iterate, shape ``[B]`` (no gradient).
    prev_rejected_logps: ``log π_t(y_l)``, shape ``[B]`` (no gradient).
    eta: OMD coefficient ``η`` (> 0), the weight of ``KL(π ‖ π_t)``.
    tau: KL-regularisation coefficient ``τ`` of the game, ``0 <= τ <= η``.
    stop_gradient: stop gradients through the reference and previous-iterate log-probs.

  Returns:
    ``losses_B``: per-pair losses, shape ``[B]``.

  Raises:
    ValueError: on a shape/rank/dtype mismatch, ``eta <= 0``, ``tau < 0`` or ``tau > eta``.

  Examples:
    >>> inpo_loss(jnp.array([-1.0]), jnp.array([-2.0]), jnp.array([-1.5]), jnp.array([-1.5]),
    ...           jnp.array([-1.2]), jnp.array([-1.8]), eta=0.5, tau=0.25)
    Array([0.08999997], dtype=float32)

  References:
    Zhang et al. 2024, `Iterative Nash Policy Optimization: Aligning LLMs with General
    Preferences via No-Regret Learning <https://arxiv.org/abs/2407.00617>`_ (ICLR 2025).
  """
  _check_positive(eta, "eta")
  _check_nonnegative(tau, "tau")
  eta_v, tau_v = _concrete_scalar(eta), _concrete_scalar(tau)
  if eta_v is not None and tau_v is not None and tau_v > eta_v:
    raise ValueError(f"`tau` must be <= `eta` (the OMD step would pass π_t's exponent below 0); "
                     f"got tau={tau_v}, eta={eta_v}.")
  arrays = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
            prev_chosen_logps, prev_rejected_logps)
  dtype = _check_seqs(arrays, (*_PAIR_NAMES, "prev_chosen_logps", "prev_rejected_logps"))
  pol = jnp.asarray(policy_chosen_logps, dtype) - jnp.asarray(policy_rejected_logps, dtype)
  ref = _sg(jnp.asarray(ref_chosen_logps, dtype) - jnp.asarray(ref_rejected_logps, dtype), stop_gradient)
  prev = _sg(jnp.asarray(prev_chosen_logps, dtype) - jnp.asarray(prev_rejected_logps, dtype), stop_gradient)
  w_ref = tau / eta
  h = pol - w_ref * ref - (1.0 - w_ref) * prev
  return (h - 1.0 / (2.0 * eta)) ** 2


# ----------------------------------------------------------------------------- DNO


@register(
    "dno", kind="online",
    formula="−z·log σ(η·Δ_t) − (1 − z)·log σ(−η·Δ_t), Δ_t = log π(y1)/π_t(y1) − log π(y2)/π_t(y2), "
            "z = σ(r_t(y1) − r_t(y2))",
    reference="Rosset et al. 2024, Direct Nash Optimization: Teaching Language Models to "
              "Self-Improve with General Preferences (arXiv:2404.03715)",
    hparams=("eta",),
)
def dno_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    prev_chosen_logps: Array,
    prev_rejected_logps: Array,
    preference_B: Array,
    *,
    eta: float,
    stop_gradient: bool = True,
) -> Array:
  """DNO (Algorithm 1): soft-label cross-entropy regressing internal rewards onto win rates.

  DNO reparameterises the soft policy iteration ``π_{t+1} ∝ π_t·exp(r_t/η)``, with
  ``r_t(x, y) = E_{y′~π_t} P(y ≻ y′ | x)``, through the policy's internal reward
  ``η·log π(y)/π_t(y)`` and regresses its pairwise difference onto ``r_t(y1) − r_t(y2)`` with the
  binary cross-entropy. With ``Δ_t = (log π(y1) − log π_t(y1)) − (log π(y2) − log π_t(y2))`` and
  the soft label ``z``:

      loss = −z·log σ(η·Δ_t) − (1 − z)·log σ(−η·Δ_t)

  For the paper's Algorithm 1 pass ``z = σ(r_t(y1) − r_t(y2))`` (``r_t`` e.g. from
  `preference_win_rates` over K samples of ``π_t``; ``σ(r1 − r2) = 1 − σ(r2 − r1)`` makes the
  two terms of Eq. (8)). Checked against the paper: Algorithm 1 line 4 / Eq. (8) and its
  derivation Eqs. (10)-(12). The practical variant **DNO-Prct** (Algorithm 2, Eq. (13)) is plain
  DPO on large-margin pairs with the previous iterate as the reference: `dno_loss` with
  ``z = 1``, i.e. `rlhf_jax.losses.dpo.sigmoid_loss` with ``beta=eta`` and ``ref = π_t``; it
  needs no function of its own.

  Args:
    policy_chosen_logps: policy sequence log-probs of the first completions ``y1``, shape ``[B]``.
    policy_rejected_logps: policy sequence log-probs of the second completions ``y2``, ``[B]``.
    prev_chosen_logps: ``log π_t(y1)`` under the previous iterate, shape ``[B]`` (no gradient).
    prev_rejected_logps: ``log π_t(y2)``, shape ``[B]`` (no gradient).
    preference_B: the target ``z`` that ``y1`` ranks above ``y2``, in ``[0, 1]``, shape ``[B]``
      (no gradient).
    eta: the soft-policy-iteration temperature ``η`` (> 0).
    stop_gradient: stop gradients through the previous-iterate log-probs and ``z``.

  Returns:
    ``losses_B``: per-pair losses, shape ``[B]``.

  Raises:
    ValueError: on a shape/rank/dtype mismatch, ``eta <= 0`` or ``preference_B`` outside
      ``[0, 1]``.

  Examples:
    >>> dno_loss(jnp.array([-1.0]), jnp.array([-2.0]), jnp.array([-1.5]), jnp.array([-1.5]),
    ...          jnp.array([1.0]), eta=1.0)
    Array([0.3132617], dtype=float32)

  References:
    Rosset et al. 2024, `Direct Nash Optimization: Teaching Language Models to Self-Improve with
    General Preferences <https://arxiv.org/abs/2404.03715>`_.
  """
  _check_positive(eta, "eta")
  arrays = (policy_chosen_logps, policy_rejected_logps, prev_chosen_logps, prev_rejected_logps)
  dtype = _check_seqs(arrays, ("policy_chosen_logps", "policy_rejected_logps", "prev_chosen_logps",
                               "prev_rejected_logps"))
  logits = eta * _margin(*arrays, stop_gradient, dtype)
  z = _preference(preference_B, logits, stop_gradient)
  return -z * jax.nn.log_sigmoid(logits) - (1.0 - z) * jax.nn.log_sigmoid(-logits)


# ----------------------------------------------------------------------------- online IPO / EGPO


@register(
    "online_ipo", kind="online",
    formula="(Δ − (P(y ≻ y′) − ½)/τ)², y, y′ ~ π",
    reference="Calandriello et al. 2024, Human Alignment of Large Language Models through Online "
              "Preference Optimisation (arXiv:2403.08635); Zhou et al. 2025, Extragradient "
              "Preference Optimization (EGPO) (arXiv:2503.08942)",
    hparams=("tau",),
)
def online_ipo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    preference_B: Array,
    *,
    tau: float,
    stop_gradient: bool = True,
) -> Array:
  """Online IPO (the loss of IPO-MD and of each EGPO step): ``(Δ − (P(y ≻ y′) − ½)/τ)²``.

  ``y, y′`` are two samples of the current policy (of a geometric mixture with ``π_ref`` for
  IPO-MD), ``Δ = h(y) − h(y′)`` with ``h = log π − log π_ref``, and ``P = P(y ≻ y′ | x)``. The
  minimiser of its expectation is the Nash equilibrium of the ``τ``-KL-regularised preference
  game. With a 0/1 outcome it is IPO's ``(h(y_w, y_l) − 1/(2τ))²`` on the judged pair (no length
  normalisation); with a soft ``P`` it equals, up to a constant (so with the same gradient),
  Calandriello et al.'s soft-label form ``P·(Δ − 1/(2τ))² + (1 − P)·(Δ + 1/(2τ))²``.
  Checked against the EGPO code (``zhourunlong/EGPO``: ``online_ipo_2_sample`` in
  ``simulations/loss_funcs.py`` and ``ExtragradientTrainer._compute_losses``, whose preference
  pair is ``(P(y ≻ y′), ½)`` when no third sample is drawn): the constant is ``1/τ`` on
  ``P − ½`` (``τ`` is the EGPO code's ``beta``). EGPO's other estimator, with a third sample
  ``y″ ~ π``, regresses onto ``(P(y ≻ y″) − P(y′ ≻ y″))/τ``; pass
  ``preference_B = P(y ≻ y″) − P(y′ ≻ y″) + ½`` for it.

  Args:
    policy_chosen_logps: policy sequence log-probs of the first samples ``y``, shape ``[B]``.
    policy_rejected_logps: policy sequence log-probs of the second samples ``y′``, shape ``[B]``.
    ref_chosen_logps: ``log π_ref(y)``, shape ``[B]`` (no gradient).
    ref_rejected_logps: ``log π_ref(y′)``, shape ``[B]`` (no gradient).
    preference_B: ``P(y ≻ y′ | x)`` in ``[0, 1]``, shape ``[B]`` (no gradient).
    tau: KL-regularisation coefficient ``τ`` (> 0).
    stop_gradient: stop gradients through the reference log-probs and the preferences.

  Returns:
    ``losses_B``: per-pair losses, shape ``[B]``.

  Raises:
    ValueError: on a shape/rank/dtype mismatch, ``tau <= 0`` or ``preference_B`` outside
      ``[0, 1]``.

  Examples:
    >>> online_ipo_loss(jnp.array([-1.0]), jnp.array([-2.0]), jnp.array([-1.5]), jnp.array([-1.5]),
    ...                 jnp.array([0.75]), tau=0.5)
    Array([0.25], dtype=float32)

  References:
    Calandriello et al. 2024, `Human Alignment of Large Language Models through Online
    Preference Optimisation <https://arxiv.org/abs/2403.08635>`_; Zhou et al. 2025,
    `Extragradient Preference Optimization (EGPO): Beyond Last-Iterate Convergence for Nash
    Learning from Human Feedback <https://arxiv.org/abs/2503.08942>`_.
  """
  _check_positive(tau, "tau")
  arrays = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
  dtype = _check_seqs(arrays, _PAIR_NAMES)
  delta = _margin(*arrays, stop_gradient, dtype)
  p = _preference(preference_B, delta, stop_gradient)
  return (delta - (p - 0.5) / tau) ** 2


# ----------------------------------------------------------------------------- win rates


@register(
    "preference_win_rates", kind="online",
    formula="r_i = Σ_{j≠i} P(y_i ≻ y_j)/(K − 1)",
    reference="Rosset et al. 2024, Direct Nash Optimization: Teaching Language Models to "
              "Self-Improve with General Preferences (arXiv:2404.03715)",
)
def preference_win_rates(preference_BxKxK: Array) -> Array:
  """Mean win rate of each of K samples against the other K − 1: DNO's estimate of ``r_t``.

  ``r[b, i] = Σ_{j ≠ i} P[b, i, j] / (K − 1)`` with ``P[b, i, j] = P(y_i ≻ y_j | x_b)`` for K
  samples of ``π_t`` (the diagonal is ignored). This is the sample estimate of ``r_t(x, y) =
  E_{y′~π_t} P(y ≻ y′ | x)`` that DNO-Prct ranks by (DNO Section 4, Algorithm 2 line 5, there
  with 0/1 judgements and the gold answer among the samples). Feed ``σ(r_i − r_j)`` to
  `dno_loss`. The matrix is used as given: make a preference model's matrix consistent first,
  e.g. ``rlhf_jax.rewards.symmetrize_preference(L, jnp.swapaxes(L, -1, -2))`` on its logits
  ``L``. Gradients flow (this is a reduction, not a loss).

  Args:
    preference_BxKxK: pairwise preferences ``P(y_i ≻ y_j)``, shape ``[B, K, K]``, ``K >= 2``.

  Returns:
    ``win_rates_BxK``: shape ``[B, K]``.

  Raises:
    ValueError: on a rank other than 3, a non-square ``K × K`` block, ``K < 2`` or a
      non-floating dtype.

  Examples:
    >>> P = jnp.array([[[0.5, 0.75, 0.25], [0.25, 0.5, 0.5], [0.75, 0.5, 0.5]]])
    >>> preference_win_rates(P)
    Array([[0.5  , 0.375, 0.625]], dtype=float32)

  References:
    Rosset et al. 2024, `Direct Nash Optimization: Teaching Language Models to Self-Improve with
    General Preferences <https://arxiv.org/abs/2404.03715>`_.
  """
  _checks.check_rank(preference_BxKxK, 3, "preference_BxKxK")
  _checks.check_floating(preference_BxKxK, "preference_BxKxK")
  _, k, k2 = np.shape(preference_BxKxK)
  if k != k2 or k < 2:
    raise ValueError(
        f"`preference_BxKxK` must be [B, K, K] with K >= 2; got shape {tuple(np.shape(preference_BxKxK))}."
    )
  p = jnp.asarray(preference_BxKxK)
  off_diag = ~jnp.eye(k, dtype=bool)
  return jnp.sum(jnp.where(off_diag, p, 0.0), axis=-1) / (k - 1)
