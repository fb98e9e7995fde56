"""Rejection-sampling fine-tuning: sample K per prompt, score, keep the best, SFT on them, repeat.

One family, several papers; they differ in what scores the samples, which samples are
kept and what loss trains on them:

==============  ==========================================  ====================================
method          score / selection                           loss
==============  ==========================================  ====================================
RAFT / RSF      reward; best of K per prompt                SFT (NLL) on the kept samples
                (:func:`select_best`), or the top ``1/K``
                of the whole batch (:func:`select_top_fraction`)
ReST            reward; ``R > τ`` with τ rising over the    SFT (behaviour cloning)
                Improve steps of one Grow dataset
                (:func:`select_threshold`, :class:`ReSTSchedule`)
SuperHF         reward; best of K                           SFT + β·KL(π_θ‖π_ref) on the kept
                                                            tokens (:func:`make_superhf_loss`)
Sharpening      the base model's own log-likelihood         SFT (SFT-Sharpening: amortised
                (:func:`self_reward_scorer`); best of K     best-of-N)
DPA             ``vᵀ·r⃗`` for a multi-objective reward and a  SFT on (direction-conditioned
                per-prompt direction v (:func:`dpa_scores`,  prompt, best sample)
                :func:`dpa_score_fn`); best of K
==============  ==========================================  ====================================

The pieces are pure functions; :func:`make_rejection_data` composes them into the
``make_data(state, iteration)`` of :func:`rlhf_jax.train.iterative.run_iterations` (the
host loop: it stores each iteration's rows, resumes mid-iteration, handles SIGTERM), and
the step is :func:`rlhf_jax.train.step.make_train_step` over
:func:`rlhf_jax.train.sft.make_sft_loss` or :func:`make_superhf_loss`. See
``experiments/rejection_sampling_tiny.py``.

Rows are right-padded SFT rows (the keys of :func:`rlhf_jax.train.sft.make_sft_loss`):
``[prompt | kept completion | pad]`` with the loss mask on the completion's targets
(EOS included) and 0 on the prompt's; ``rewards_B`` holds each row's score.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import ops
from rlhf_jax.losses.kl import kl_penalty
from rlhf_jax.losses.sft import sft_loss
from rlhf_jax.rewards.multi_objective import direction_from_angle, dpa_direction_reward
from rlhf_jax.sampling.best_of_n import scoring_rows
from rlhf_jax.sampling.generate import left_pad
from rlhf_jax.train.iterative import IterationData, IterationStore

__all__ = [
    "PromptBatch",
    "ReSTSchedule",
    "dpa_score_fn",
    "dpa_scores",
    "make_rejection_data",
    "make_superhf_loss",
    "rest_thresholds",
    "sample_directions",
    "select_best",
    "select_threshold",
    "select_top_fraction",
    "self_reward",
    "self_reward_scorer",
    "sft_rows",
]


# ----------------------------------------------------------------------------- selection


def _scores(scores_BxK):
  s = jnp.asarray(scores_BxK)
  if s.ndim != 2:
    raise ValueError(f"scores_BxK must be [B, K] (prompts x samples), got shape {s.shape}")
  s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
  return jnp.where(jnp.isnan(s), -jnp.inf, s)


def select_best(scores_BxK, *, min_score: float | None = None) -> jax.Array:
  """RAFT / RSF's local ranking: keep the best sample of each prompt.

  ``keep[b, k] = 1`` for ``k = argmax_k r[b, k]`` (the first maximum; NaN scores count as
  ``-inf``, and a prompt without a finite score keeps nothing), and, with ``min_score``,
  only if that best score is ``>= min_score`` (with a verifier, ``min_score=1`` drops
  prompts none of whose samples is right, which RAFT would otherwise imitate).

  Args:
    scores_BxK: scores of K samples of B prompts, shape ``[B, K]``.
    min_score: the least score a kept sample needs; ``None`` keeps one per prompt.

  Returns:
    ``keep_BxK``, bool.

  Examples:
    >>> select_best(jnp.array([[0.1, 0.9, 0.9], [0.3, 0.2, 0.0]])).astype(int).tolist()
    [[0, 1, 0], [1, 0, 0]]
    >>> select_best(jnp.array([[0.1, 0.9], [0.3, 0.2]]), min_score=0.5).astype(int).tolist()
    [[0, 1], [0, 0]]

  References:
    Dong et al. 2023, `RAFT: Reward rAnked FineTuning for Generative Foundation Model
    Alignment <https://arxiv.org/abs/2304.06767>`_.
  """
  s = _scores(scores_BxK)
  best = jnp.argmax(s, axis=1)
  keep = jax.nn.one_hot(best, s.shape[1], dtype=jnp.bool_)
  keep = keep & jnp.any(s > -jnp.inf, axis=1, keepdims=True)  # a prompt whose scores all failed keeps nothing
  if min_score is not None:
    keep = keep & (jnp.max(s, axis=1, keepdims=True) >= min_score)
  return keep


def select_threshold(scores_BxK, threshold) -> jax.Array:
  """ReST's Improve-step filter ``F(x, y; τ) = 1[R(x, y) > τ]``: every sample above τ.

  Args:
    scores_BxK: scores, shape ``[B, K]``.
    threshold: τ, a scalar or one per prompt ``[B]``.

  Returns:
    ``keep_BxK``, bool (``scores > τ``; NaN is never kept).

  Examples:
    >>> select_threshold(jnp.array([[0.2, 0.8], [0.5, 0.9]]), 0.5).astype(int).tolist()
    [[0, 1], [0, 1]]

  References:
    Gulcehre et al. 2023, `Reinforced Self-Training (ReST) for Language Modeling
    <https://arxiv.org/abs/2308.08998>`_.
  """
  s = _scores(scores_BxK)
  t = jnp.asarray(threshold, s.dtype)
  if t.ndim == 1:
    t = t[:, None]
  return s > t


def select_top_fraction(scores_BxK, fraction: float) -> jax.Array:
  """RAFT's global ranking: keep the ``round(fraction·B·K)`` highest scores of the whole batch.

  With ``fraction = 1/K`` it keeps as many samples as :func:`select_best`, but a prompt
  with several good samples may give more than one and a hard prompt none. Ties are
  broken towards the lower flat index ``b·K + k``; at least one sample is kept.

  Args:
    scores_BxK: scores, shape ``[B, K]``.
    fraction: the kept share of all samples, in ``(0, 1]`` (static).

  Returns:
    ``keep_BxK``, bool.

  Examples:
    >>> select_top_fraction(jnp.array([[0.1, 0.9], [0.8, 0.7]]), 0.5).astype(int).tolist()
    [[0, 1], [1, 0]]

  References:
    Dong et al. 2023, `RAFT: Reward rAnked FineTuning for Generative Foundation Model
    Alignment <https://arxiv.org/abs/2304.06767>`_.
  """
  if not 0.0 < float(fraction) <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  s = _scores(scores_BxK)
  b, k = s.shape
  count = min(b * k, max(1, int(round(float(fraction) * b * k))))
  order = jnp.argsort(-s.reshape(-1), stable=True)
  keep = jnp.zeros((b * k,), jnp.bool_).at[order[:count]].set(True)
  return keep.reshape(b, k)


def rest_thresholds(num_improve_steps: int, *, low: float, high: float) -> tuple[float, ...]:
  """``num_improve_steps`` thresholds rising linearly from ``low`` to ``high`` (ReST's τ_1 < ... < τ_I)."""
  if num_improve_steps < 1:
    raise ValueError(f"num_improve_steps must be >= 1, got {num_improve_steps}")
  if num_improve_steps == 1:
    return (float(low),)
  return tuple(float(x) for x in np.linspace(low, high, num_improve_steps))


class ReSTSchedule(NamedTuple):
  """ReST's Grow / Improve schedule over loop iterations.

  Iteration ``i`` is Improve step ``j = i mod I`` (``I = len(thresholds)``) of the Grow
  dataset sampled at iteration ``i − j`` (its Grow step) and keeps the samples of that
  dataset with a reward above ``thresholds[j]``. Thresholds must not decrease: each
  Improve step trains on a better-filtered subset of the same samples.

  References:
    Gulcehre et al. 2023, `Reinforced Self-Training (ReST) for Language Modeling
    <https://arxiv.org/abs/2308.08998>`_.
  """

  thresholds: tuple[float, ...]

  @property
  def grow_every(self) -> int:
    return len(self.thresholds)

  def threshold(self, iteration: int) -> float:
    return float(self.thresholds[iteration % len(self.thresholds)])

  def grow_iteration(self, iteration: int) -> int:
    return iteration - iteration % len(self.thresholds)

  def check(self) -> "ReSTSchedule":
    if not self.thresholds or any(b < a for a, b in zip(self.thresholds, self.thresholds[1:])):
      raise ValueError(f"ReST thresholds must be non-empty and non-decreasing, got {self.thresholds}")
    return self


# ----------------------------------------------------------------------------- scorers


def self_reward(logps_BxN, mask_BxN, *, length_normalize: bool = False) -> jax.Array:
  """Sharpening's self-reward: the sequence log-likelihood ``log π_base(y | x) = Σ_t log π_base(y_t | ·)``.

  With ``length_normalize`` the mean per-token log-probability instead (a common variant
  that does not favour short answers; not the paper's definition).

  Args:
    logps_BxN: log-probs of the completion tokens under the base model, shape ``[B, N]``.
    mask_BxN: 1 on completion tokens (EOS included), shape ``[B, N]``.
    length_normalize: divide by the token count.

  Returns:
    ``[B]`` self-rewards.

  Examples:
    >>> [round(float(x), 4) for x in self_reward(jnp.log(jnp.array([[0.5, 0.5, 1.0]])), jnp.array([[1, 1, 0]]))]
    [-1.3863]

  References:
    Huang et al. 2024, `Self-Improvement in Language Models: The Sharpening Mechanism
    <https://arxiv.org/abs/2412.01951>`_.
  """
  m = jnp.asarray(mask_BxN).astype(jnp.float32)
  total = jnp.sum(jnp.where(m > 0, jnp.asarray(logps_BxN, jnp.float32), 0.0), axis=-1)
  if length_normalize:
    return total / jnp.maximum(m.sum(-1), 1.0)
  return total


def self_reward_scorer(graphdef: nnx.GraphDef, *, length_normalize: bool = False,
                       logprob_chunk_size: int | None = None):
  """Sharpening's scorer: ``scorer(base_params, prompt_ids_BxP, prompt_mask_BxP) -> score_fn``.

  ``score_fn`` (for :func:`rlhf_jax.sampling.make_best_of_n_fn`) returns
  :func:`self_reward` of each sample under the base model ``base_params``, computed by
  one jitted forward over ``[prompt | completion]`` rows
  (:func:`rlhf_jax.train.online.make_logps_fn`); the forward compiles once per shape.
  Pass the base (e.g. SFT) parameters, not the current policy's, for SFT-Sharpening
  against a fixed base.

  References:
    Huang et al. 2024, `Self-Improvement in Language Models: The Sharpening Mechanism
    <https://arxiv.org/abs/2412.01951>`_.
  """
  from rlhf_jax.train.online import make_logps_fn

  fns: dict[int, Callable] = {}

  def scorer(base_params, prompt_ids_BxP, prompt_mask_BxP):
    def score_fn(tokens_BKxN, mask_BKxN, lengths_BK, prompt_index_BK):
      del lengths_BK
      n = int(np.shape(tokens_BKxN)[1])
      if n not in fns:
        fns[n] = make_logps_fn(graphdef, n, logprob_chunk_size=logprob_chunk_size)
      ids, mask = scoring_rows(prompt_ids_BxP, prompt_mask_BxP, tokens_BKxN, mask_BKxN, prompt_index_BK)
      batch = {"input_ids_BxT": ids[:, :-1], "attention_mask_BxT": mask[:, :-1], "targets_BxT": ids[:, 1:]}
      logps = fns[n](base_params, batch)
      return np.asarray(jax.device_get(self_reward(logps, mask_BKxN, length_normalize=length_normalize)))

    return score_fn

  return scorer


def dpa_scores(rewards_BxKxM, directions_BxM) -> jax.Array:
  """DPA's directional reward of every sample: ``R[b, k] = v_bᵀ·r⃗[b, k]`` with ``v_b = d_b/‖d_b‖``.

  Each prompt carries its own preference direction (DPA samples one per prompt and states
  it in the prompt, e.g. its system prompt), and its samples are ranked by the projection
  of their multi-objective rewards on it; :func:`select_best` then keeps
  ``argmax_k vᵀ·r⃗(x, y_k)``. Built on :func:`rlhf_jax.rewards.dpa_direction_reward`.

  Args:
    rewards_BxKxM: multi-objective rewards of K samples of B prompts, shape ``[B, K, M]``.
    directions_BxM: one non-zero direction per prompt, shape ``[B, M]`` (or ``[M]`` for all).

  Returns:
    ``[B, K]`` scores.

  Examples:
    >>> r = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
    >>> dpa_scores(r, jnp.array([[0.0, 2.0]])).tolist()
    [[0.0, 1.0]]

  References:
    Wang et al. 2024, `Arithmetic Control of LLMs for Diverse User Preferences: Directional
    Preference Alignment with Multi-Objective Rewards <https://arxiv.org/abs/2402.18571>`_.
  """
  r = jnp.asarray(rewards_BxKxM)
  if r.ndim != 3:
    raise ValueError(f"rewards_BxKxM must be [B, K, M], got shape {r.shape}")
  d = jnp.asarray(directions_BxM)
  d = d[:, None, :] if d.ndim == 2 else d
  return dpa_direction_reward(r, jnp.broadcast_to(d, r.shape))


def dpa_score_fn(vector_score_fn: Callable, directions_BxM) -> Callable:
  """A best-of-N ``score_fn`` from a vector-reward one: ``v_{prompt}ᵀ·r⃗`` per sample (DPA).

  ``vector_score_fn(tokens, mask, lengths, prompt_index) -> [B·K, M]`` (e.g.
  :func:`rlhf_jax.sampling.reward_model_scorer` with ``head=None`` on a multi-objective
  reward model); ``directions_BxM[b]`` is the direction prompt ``b`` was conditioned on.
  """
  d_BxM = np.asarray(directions_BxM, np.float32)

  def score_fn(tokens_BKxN, mask_BKxN, lengths_BK, prompt_index_BK):
    r = np.asarray(vector_score_fn(tokens_BKxN, mask_BKxN, lengths_BK, prompt_index_BK), np.float32)
    if r.ndim != 2 or r.shape[0] != len(prompt_index_BK):
      raise ValueError(f"vector_score_fn must return [B·K, M] rewards, got shape {r.shape}")
    return np.asarray(dpa_direction_reward(r, d_BxM[np.asarray(prompt_index_BK)]))

  return score_fn


def sample_directions(rng: np.random.Generator, num: int, *, min_angle: float = 0.0,
                      max_angle: float = math.pi / 2) -> np.ndarray:
  """``num`` DPA directions ``v = (cos θ, sin θ)`` with θ uniform in ``[min_angle, max_angle]``: ``[num, 2]``."""
  theta = rng.uniform(min_angle, max_angle, size=(num,))
  return np.asarray(direction_from_angle(theta), np.float32)


# ----------------------------------------------------------------------------- SuperHF loss


def make_superhf_loss(ref_graphdef: nnx.GraphDef, *, beta: float, kl_estimator: str = "k3",
                      aggregation: str = "token-mean", logprob_chunk_size: int | None = None):
  """SuperHF's loss on the kept samples: ``L = agg(−log π_θ(y⁺_t | ·)) + β·agg(KL_t)``.

  The first term is :func:`rlhf_jax.train.sft.make_sft_loss`'s NLL on the same batch keys;
  the second estimates ``KL(π_θ ‖ π_ref)`` per completion token from the log-probs of the
  kept (sampled) tokens under the policy and the reference
  (:func:`rlhf_jax.losses.kl.kl_penalty` with ``kl_estimator``), aggregated with the same
  mask. The reference forward runs inside the step from ``state.extras["ref_params"]``
  (its gradient stopped); build the state with ``create_train_state(..., extras={"ref_params": ...})``.

  Note: the estimator sets the gradient: ``k3`` (default) has the value of
  ``KL(π_θ‖π_ref)`` and, on samples of π_θ, the gradient of the forward
  ``KL(π_ref‖π_θ)`` (the direction of SuperHF's released code, which sums the exact
  forward KL over the vocabulary at the kept tokens' positions); ``k2`` or ``k3+`` follow
  the reverse-KL gradient (see :mod:`rlhf_jax.losses.kl`).

  Args:
    ref_graphdef: the reference model's graph definition (``nnx.split``).
    beta: β, the KL coefficient (>= 0).
    kl_estimator: a :data:`rlhf_jax.losses.kl.KL_ESTIMATORS` name.
    aggregation: the reduction of both terms (``ops.get_aggregation``).
    logprob_chunk_size: token chunk for log-probs (``ops.token_logprobs``).

  Returns:
    ``loss_fn(model, batch, rng) -> (loss, aux)`` with metrics ``nll``, ``sft_loss``,
    ``kl``, ``loss_tokens``.

  References:
    Mukobi et al. 2023, `SuperHF: Supervised Iterative Learning from Human Feedback
    <https://arxiv.org/abs/2310.16763>`_.
  """
  if beta < 0:
    raise ValueError(f"beta must be >= 0, got {beta}")
  reduce = ops.get_aggregation(aggregation)

  def logps_of(model, batch):
    hidden, _ = model.hidden_states(batch["input_ids_BxT"])
    return ops.token_logprobs(hidden, model.unembed_matrix(), batch["targets_BxT"], chunk_size=logprob_chunk_size)

  def loss_fn(model, batch, rng):
    del rng
    extras = batch.get("extras")
    if not isinstance(extras, dict) or "ref_params" not in extras:
      raise ValueError("make_superhf_loss needs the reference in state.extras['ref_params'] "
                       "(create_train_state(..., extras={'ref_params': params}))")
    mask = batch["loss_mask_BxT"].astype(jnp.float32)
    logps = logps_of(model, batch)
    ref_logps = jax.lax.stop_gradient(logps_of(nnx.merge(ref_graphdef, extras["ref_params"]), batch))
    sft = reduce(sft_loss(logps, mask), mask)
    kl = reduce(jnp.where(mask > 0, kl_penalty(logps, ref_logps, kind=kl_estimator), 0.0), mask)
    ntokens = mask.sum()
    nll = -(logps * mask).sum() / jnp.maximum(ntokens, 1.0)
    return sft + beta * kl, {"weight": ops.aggregation_weight(aggregation, mask), "nll": nll, "sft_loss": sft,
                             "kl": kl, "loss_tokens": ntokens}

  return loss_fn


# ----------------------------------------------------------------------------- rows and the data function


class PromptBatch(NamedTuple):
  """One iteration's prompts: unpadded 1-D token arrays, and per-prompt fields for the scorer
  (e.g. ``{"direction": [B, M]}`` for DPA, reference answers for a verifier)."""

  prompts: list
  fields: Mapping[str, Any] | None = None


def sft_rows(prompts: Sequence, completions: Sequence, *, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Right-padded SFT rows ``[prompt | completion | pad]`` with the loss on the completion.

  Row ``i``: ``input_ids`` holds the ``P_i + C_i`` tokens then ``pad_id``; ``targets`` is it
  shifted left by one; ``loss_mask`` is 1 on the targets that are completion tokens
  (positions ``P_i − 1 … P_i + C_i − 2``), so a completion ending in EOS trains EOS too;
  ``attention_mask`` is 1 on the real tokens. The keys of
  :func:`rlhf_jax.train.sft.make_sft_loss`.

  Raises:
    ValueError: if a row has more than ``seq_len`` tokens or an empty prompt.
  """
  from rlhf_jax.train.online_preference import completion_rows as prompt_completion_rows

  for i, p in enumerate(prompts):
    if np.size(p) == 0:
      raise ValueError(f"row {i}: empty prompt")
  rows = prompt_completion_rows([np.asarray(p, np.int32).reshape(-1) for p in prompts],
                                [np.asarray(c, np.int32).reshape(-1) for c in completions], seq_len=seq_len,
                                pad_id=pad_id)
  return {f"{k}_BxT": v for k, v in rows.items()}


def _as_prompt_batch(x) -> PromptBatch:
  if isinstance(x, PromptBatch):
    return x
  return PromptBatch(list(x), None)


def make_rejection_data(
    *,
    best_of_n: Callable,
    prompt_fn: Callable[[int], PromptBatch | Sequence],
    make_score_fn: Callable[[PromptBatch, np.ndarray, np.ndarray], Callable],
    select_fn: Callable[[np.ndarray, int], Any],
    seq_len: int,
    seed: int = 0,
    params_fn: Callable[[Any], Any] = lambda state: state.params,
    prompt_length: int | None = None,
    pad_id: int = 0,
    grow_every: int = 1,
    grow_dir: str | None = None,
    decode_fn: Callable[[Sequence[int]], str] | None = None,
    num_logged_prompts: int = 8,
) -> Callable[[Any, int], IterationData]:
  """``make_data(state, iteration) -> IterationData`` for :func:`rlhf_jax.train.iterative.run_iterations`.

  Each iteration: ``prompt_fn(iteration)`` gives the prompts (a :class:`PromptBatch` or a
  list of 1-D token arrays), left-padded to ``prompt_length``; ``best_of_n``
  (:func:`rlhf_jax.sampling.make_best_of_n_fn`) samples K per prompt from
  ``params_fn(state)`` with the key ``fold_in(PRNGKey(seed), iteration)`` and scores them
  with ``make_score_fn(prompts, prompt_ids_BxP, prompt_mask_BxP)``; ``select_fn(scores_BxK,
  iteration) -> keep_BxK`` picks the samples to train on (e.g. ``lambda s, i:
  select_best(s)``); the kept ones become :func:`sft_rows` (plus their scores as
  ``rewards_B``). Deterministic in ``(state, iteration)``, as ``run_iterations`` requires.

  ReST (``grow_every = I > 1``): only iterations ``0, I, 2I, ...`` sample (Grow); their
  samples and scores are written to ``grow_dir`` (an
  :class:`rlhf_jax.train.iterative.IterationStore`, so a resumed run refilters the same
  samples), and the iterations between them refilter that dataset (Improve), typically
  with :class:`ReSTSchedule`'s rising thresholds. Grow datasets are not accumulated: each
  Grow step's samples replace the previous ones.

  Metrics (logged as ``iteration/<name>``): ``reward_mean``, ``reward_std``, ``reward_max``
  over all samples, ``best_reward_mean`` (mean over prompts of the best sample's score,
  the best-of-K reward), ``kept``, ``kept_fraction``, ``kept_reward_mean`` (when any are
  kept), ``prompts_kept_fraction`` (prompts with a kept sample), ``response_length`` and
  ``grow`` (1 on an iteration that sampled). ``samples`` holds the first
  ``num_logged_prompts`` prompts with every completion (decoded with ``decode_fn`` when
  given, else token lists), its score and whether it was kept.
  """
  if grow_every < 1:
    raise ValueError(f"grow_every must be >= 1, got {grow_every}")
  if grow_every > 1 and not grow_dir:
    raise ValueError("grow_every > 1 (ReST) needs grow_dir, where each Grow step's samples are kept")
  store = IterationStore(grow_dir) if grow_every > 1 else None

  def show(ids):
    ids = [int(t) for t in ids]
    if decode_fn is None:
      return ids
    try:
      return decode_fn(ids)
    except Exception:  # noqa: BLE001 — a sample the tokenizer cannot decode is logged as its ids
      return ids

  def grow(state, iteration):
    pb = _as_prompt_batch(prompt_fn(iteration))
    ids, mask = left_pad(pb.prompts, pad_id=pad_id, length=prompt_length)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), iteration)
    out = best_of_n(params_fn(state), ids, mask, rng, make_score_fn(pb, ids, mask))
    return {"prompt_ids": ids, "prompt_mask": mask, "tokens": out.tokens_BxKxN, "lengths": out.lengths_BxK,
            "scores": out.scores_BxK}

  def make_data(state, iteration: int) -> IterationData:
    g = iteration - iteration % grow_every
    fresh = g == iteration
    if fresh:
      data = grow(state, iteration)
      if store is not None:
        store.save(g, IterationData(data, {}))
    else:
      loaded = store.load(g)
      if loaded is None:
        raise FileNotFoundError(f"iteration {iteration} refilters the Grow samples of iteration {g}, "
                                f"which are not in {store.directory}")
      data = loaded.arrays
    ids, pmask, tokens, lengths = data["prompt_ids"], data["prompt_mask"], data["tokens"], data["lengths"]
    scores = np.asarray(data["scores"], np.float32)
    keep = np.asarray(jax.device_get(select_fn(scores, iteration)), bool)
    if keep.shape != scores.shape:
      raise ValueError(f"select_fn returned shape {keep.shape} for scores of shape {scores.shape}")
    kept_b, kept_k = np.nonzero(keep)
    prompt_tokens = [ids[b][pmask[b] > 0] for b in range(ids.shape[0])]
    rows = sft_rows([prompt_tokens[b] for b in kept_b],
                    [tokens[b, k, : int(lengths[b, k])] for b, k in zip(kept_b, kept_k)],
                    seq_len=seq_len, pad_id=pad_id)
    rows["rewards_B"] = scores[kept_b, kept_k].astype(np.float32)
    finite = np.where(np.isfinite(scores), scores, np.nan)
    metrics = {
        "reward_mean": float(np.nanmean(finite)), "reward_std": float(np.nanstd(finite)),
        "reward_max": float(np.nanmax(finite)), "best_reward_mean": float(np.mean(np.nanmax(finite, axis=1))),
        "kept": float(keep.sum()), "kept_fraction": float(keep.mean()),
        "prompts_kept_fraction": float(keep.any(axis=1).mean()),
        "response_length": float(np.mean(lengths)), "grow": float(fresh),
    }
    if keep.any():
      metrics["kept_reward_mean"] = float(np.mean(scores[keep]))
    samples = []
    for b in range(min(num_logged_prompts, ids.shape[0])):
      samples.append({
          "iteration": int(iteration), "prompt": show(prompt_tokens[b]),
          "completions": [show(tokens[b, k, : int(lengths[b, k])]) for k in range(tokens.shape[1])],
          "scores": [float(x) for x in scores[b]], "kept": [bool(x) for x in keep[b]],
      })
    return IterationData(rows, metrics, samples)

  return make_data
