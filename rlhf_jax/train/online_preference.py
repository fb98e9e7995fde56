"""Online and iterative preference optimisation: sample, judge, pair, step.

One iteration of :func:`make_preference_data` (the ``make_data`` of
:func:`rlhf_jax.train.iterative.run_iterations`):

1. **sample** K completions per prompt (:func:`make_sampler`) from the policy, the
   reference, or their geometric mixture ``π_θ^{1−α}·π_ref^α`` (Nash-MD), or one
   from the policy and one from an *opponent* (the reference for XPO, the mixture
   for Nash-MD);
2. **judge** them (:class:`RewardJudge`: a reward model, a rule verifier, a user text
   function; :class:`PreferenceJudge`: a pairwise preference model, whose scores are
   each sample's win rate against the others, DNO's ``r_t``; or the policy itself:
   its implicit reward ``β·log π_θ/π_ref`` (DICE) or its likelihood (Sharpening));
3. **pair** them (:data:`PAIRINGS`): best vs worst, all ordered pairs, RSO's
   rejection-sampled pairs, the first two samples whatever their scores (online
   IPO, EGPO: the judge's ``P(y ≻ y')`` is the target), the gold response against
   the policy's sample (SPIN), or the policy's sample against the opponent's;
4. precompute the log-probs the objective holds fixed: the reference's (a fixed
   model, or the policy that sampled the iteration, π_t, under the ``iteration``
   schedule of iterative DPO, SPIN, DNO) and π_t's for INPO.

Then any pairwise loss of :mod:`rlhf_jax.losses` (``make_preference_loss``) or an
online objective of :mod:`rlhf_jax.losses.online` (:func:`make_online_loss`: XPO,
Nash-MD, INPO, DNO's regression, online IPO) takes the steps. The named algorithms
are presets of these choices (:data:`ALGORITHMS`).

Rows are right-padded ``[prompt | completion]`` sequences in the pair format of
:mod:`rlhf_jax.train.preference` (``chosen_*`` / ``rejected_*`` / ``explore_*``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.losses import dpo as dpo_losses
from rlhf_jax import ops
from rlhf_jax.data.tokenize import sequence_row
from rlhf_jax.sampling import left_pad, make_generate_fn, processors
from rlhf_jax.train import preference as pref_lib
from rlhf_jax.train.iterative import IterationData

SOURCES = ("policy", "reference", "mixture")
OPPONENTS = ("none", "reference", "mixture")
PAIRINGS = ("best_vs_worst", "all_pairs", "sample_pair", "rso", "gold", "opponent")
REFERENCES = ("fixed", "iteration", "tr_dpo")
GOLD = ("none", "chosen", "candidate")
SELF_JUDGES = ("none", "implicit", "likelihood")


# ----------------------------------------------------------------------------- sampling


class Samples(NamedTuple):
  """K completions per prompt (host arrays): ``tokens_BxKxN`` (pad after EOS) and ``lengths_BxK`` (EOS included)."""

  tokens_BxKxN: np.ndarray
  lengths_BxK: np.ndarray

  def completion(self, b: int, k: int) -> np.ndarray:
    return self.tokens_BxKxN[b, k, : int(self.lengths_BxK[b, k])]


def make_sampler(graphdef, *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 eos_id: int | None, pad_id: int = 0):
  """``sample(params, prompts, k, rng, *, mix_params=None, mix_alpha=0.5, prompt_length=None) -> Samples``.

  Each prompt (a 1-D token array) is repeated ``k`` times in one jitted
  :func:`rlhf_jax.sampling.make_generate_fn` call. With ``mix_params`` (e.g. the
  reference's) tokens come from the geometric mixture ``π^{1−α}·π_mix^α``
  (Munos et al. 2023; α = ``mix_alpha``, TRL's ``mixture_coef``), a second program
  compiled on first use. ``temperature=0`` is greedy.
  """
  proc = None
  if temperature > 0:
    proc = processors.temperature(temperature)
    if top_p < 1.0:
      proc = processors.chain(proc, processors.top_p(top_p))
  kw = dict(max_new_tokens=max_new_tokens, processor=proc, eos_id=eos_id, pad_id=pad_id)
  plain = make_generate_fn(graphdef, **kw)
  mixed = []

  def sample(params, prompts: Sequence[np.ndarray], k: int, rng, *, mix_params=None, mix_alpha: float = 0.5,
             prompt_length: int | None = None) -> Samples:
    rep = [np.asarray(p) for p in prompts for _ in range(k)]
    ids, mask = left_pad(rep, pad_id=pad_id, length=prompt_length)
    if mix_params is None:
      out = plain(params, ids, mask, rng)
    else:
      if not mixed:
        mixed.append(make_generate_fn(graphdef, mix_graphdef=graphdef, **kw))
      out = mixed[0](params, ids, mask, rng, mix_params=mix_params, mix_alpha=jnp.float32(mix_alpha))
    out = jax.device_get(out)
    b = len(prompts)
    return Samples(np.asarray(out.tokens_BxN).reshape(b, k, -1), np.asarray(out.lengths_B).reshape(b, k))

  return sample


# ----------------------------------------------------------------------------- judges


class RewardJudge:
  """A pointwise judge: ``reward_fn(prompts, completions) -> scores [M]`` over flat lists of token arrays.

  ``preference(a, b) = σ((r(a) − r(b)) / temperature)``, the Bradley-Terry probability
  TRL's Nash-MD and XPO trainers use with a reward model.
  """

  pairwise = False

  def __init__(self, reward_fn: Callable[[list, list], Any], *, temperature: float = 1.0):
    self.reward_fn, self.temperature = reward_fn, float(temperature)

  def rewards(self, prompts: Sequence, completions: Sequence) -> np.ndarray:
    out = np.asarray(self.reward_fn(list(prompts), list(completions)), np.float32).reshape(-1)
    if out.shape[0] != len(completions):
      raise ValueError(f"reward_fn returned {out.shape[0]} scores for {len(completions)} completions")
    return out

  def scores(self, prompts: Sequence, samples: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """``[B, K]`` rewards of ``samples[b][k]`` answering ``prompts[b]``."""
    k = len(samples[0])
    flat = [c for row in samples for c in row]
    return self.rewards([p for p in prompts for _ in range(k)], flat).reshape(len(prompts), k)

  def preference(self, prompts: Sequence, a: Sequence, b: Sequence) -> np.ndarray:
    ra, rb = self.rewards(prompts, a), self.rewards(prompts, b)
    return np.asarray(jax.nn.sigmoid((ra - rb) / self.temperature), np.float32)


class PreferenceJudge:
  """A pairwise judge: ``preference_fn(prompts, a, b) -> P(a ≻ b) [M]`` (a preference model).

  With ``symmetric=True`` both orders are asked and averaged,
  ``(P(a≻b) + 1 − P(b≻a)) / 2``, so position bias cancels. ``scores`` are each
  sample's mean win rate against the other K−1 (DNO's ``r_t(x, y)``).
  """

  pairwise = True

  def __init__(self, preference_fn: Callable[[list, list, list], Any], *, symmetric: bool = True):
    self.preference_fn, self.symmetric = preference_fn, symmetric

  def preference(self, prompts: Sequence, a: Sequence, b: Sequence) -> np.ndarray:
    p = np.asarray(self.preference_fn(list(prompts), list(a), list(b)), np.float32).reshape(-1)
    if p.shape[0] != len(a):
      raise ValueError(f"preference_fn returned {p.shape[0]} probabilities for {len(a)} pairs")
    if self.symmetric:
      p = 0.5 * (p + 1.0 - np.asarray(self.preference_fn(list(prompts), list(b), list(a)), np.float32).reshape(-1))
    return p

  def scores(self, prompts: Sequence, samples: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    b, k = len(prompts), len(samples[0])
    if k < 2:
      raise ValueError("a pairwise judge needs at least 2 samples per prompt to score them")
    from rlhf_jax.losses.online import preference_win_rates

    idx = [(i, x, y) for i in range(b) for x in range(k) for y in range(x + 1, k)]
    p = self.preference([prompts[i] for i, _, _ in idx], [samples[i][x] for i, x, _ in idx],
                        [samples[i][y] for i, _, y in idx])
    p_bxkxk = np.full((b, k, k), 0.5, np.float32)
    for (i, x, y), pxy in zip(idx, p):  # one question per unordered pair: P(y ≻ x) = 1 − P(x ≻ y)
      p_bxkxk[i, x, y], p_bxkxk[i, y, x] = pxy, 1.0 - pxy
    return np.asarray(preference_win_rates(jnp.asarray(p_bxkxk)))


# ----------------------------------------------------------------------------- pairing


def best_vs_worst(scores_BxK: np.ndarray, *, min_margin: float = 0.0) -> list[tuple[int, int, int]]:
  """``(prompt, chosen, rejected)`` per prompt: its highest against its lowest score, when they differ by more than ``min_margin``.

  Iterative DPO's (Xiong et al. 2024, RLHF Workflow) and DNO-Prct's large-margin pairs.
  """
  out = []
  for b, row in enumerate(np.asarray(scores_BxK, np.float64)):
    hi, lo = int(np.argmax(row)), int(np.argmin(row))
    if row[hi] - row[lo] > min_margin:
      out.append((b, hi, lo))
  return out


def all_pairs(scores_BxK: np.ndarray, *, min_margin: float = 0.0) -> list[tuple[int, int, int]]:
  """Every ``(prompt, i, j)`` with ``score_i − score_j > min_margin``."""
  s = np.asarray(scores_BxK, np.float64)
  return [(b, i, j) for b in range(s.shape[0]) for i in range(s.shape[1]) for j in range(s.shape[1])
          if s[b, i] - s[b, j] > min_margin]


def rso_pairs(scores_BxK: np.ndarray, rng: jax.Array, *, beta: float, num_samples: int,
              mode: str = "first_round") -> list[tuple[int, int, int]]:
  """RSO (Liu et al. 2024, Statistical Rejection Sampling Improves Preference Optimization).

  ``num_samples`` of the K candidates are drawn from ``π_sft·exp(r/β)`` by
  :func:`rlhf_jax.losses.preference.rso_rejection_sample`, then paired by reward with
  :func:`rlhf_jax.losses.preference.rso_pairs` (``first_round``: 1st vs 2nd, 3rd vs 4th, ...).
  """
  from rlhf_jax.losses import preference as losses

  s = jnp.asarray(scores_BxK, jnp.float32)
  idx = losses.rso_rejection_sample(rng, s, beta=beta, num_samples=num_samples)
  chosen, rejected = jax.device_get(losses.rso_pairs(idx, s, mode=mode))
  chosen, rejected = np.asarray(chosen).reshape(s.shape[0], -1), np.asarray(rejected).reshape(s.shape[0], -1)
  sc = np.asarray(scores_BxK)
  return [(b, int(c), int(r)) for b in range(s.shape[0]) for c, r in zip(chosen[b], rejected[b])
          if sc[b, int(c)] > sc[b, int(r)]]


# ----------------------------------------------------------------------------- log-probs


def make_sequence_logps_fn(graphdef, *, chunk: int = 64, logprob_chunk_size: int | None = None):
  """``logps(params, rows) -> (seq_M, token_MxT)`` over right-padded rows (``input_ids``, ``targets``, ``loss_mask``).

  Runs in jitted chunks of ``chunk`` rows (the last one padded), one compilation
  per row length. Token log-probs are masked by ``loss_mask``.
  """

  @jax.jit
  def one(params, ids, targets, mask):
    model = nnx.merge(graphdef, params)
    hidden, _ = model.hidden_states(ids)
    lp = ops.token_logprobs(hidden, model.unembed_matrix(), targets, chunk_size=logprob_chunk_size) * mask
    return lp.sum(-1), lp

  def logps(params, rows: Mapping[str, np.ndarray]):
    ids, targets, mask = rows["input_ids"], rows["targets"], rows["loss_mask"].astype(np.float32)
    m = ids.shape[0]
    seqs, toks = [], []
    for start in range(0, m, chunk):
      sl = slice(start, start + chunk)
      pad = chunk - ids[sl].shape[0]
      padded = [np.pad(x[sl], ((0, pad), (0, 0))) for x in (ids, targets, mask)]
      s, t = jax.device_get(one(params, *padded))
      seqs.append(np.asarray(s)[: chunk - pad])
      toks.append(np.asarray(t)[: chunk - pad])
    if not seqs:
      return np.zeros((0,), np.float32), np.zeros((0, ids.shape[1]), np.float32)
    return np.concatenate(seqs), np.concatenate(toks)

  return logps


def completion_rows(prompts: Sequence[np.ndarray], completions: Sequence[np.ndarray], *, seq_len: int,
                    pad_id: int = 0) -> dict[str, np.ndarray]:
  """Right-padded ``[prompt | completion]`` rows with the loss on the completion (``sequence_row``)."""
  rows = []
  for i, (p, c) in enumerate(zip(prompts, completions)):
    p, c = np.asarray(p), np.asarray(c)
    if len(p) + len(c) > seq_len:
      raise ValueError(f"row {i}: prompt ({len(p)}) + completion ({len(c)}) tokens exceed seq_len={seq_len}")
    rows.append(sequence_row(np.concatenate([p, c]).astype(np.int32), [0] * len(p) + [1] * len(c),
                             seq_len=seq_len, pad_id=pad_id))
  if not rows:
    rows = [sequence_row([pad_id], [0], seq_len=seq_len, pad_id=pad_id)]
    return {k: v[None][:0] for k, v in rows[0].items()}
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# ----------------------------------------------------------------------------- one iteration's data


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
  """What one iteration samples, how it judges and pairs, what it precomputes.

  Attributes:
    num_samples: K completions per prompt (with ``pairing="opponent"``: 1 from the
      policy and 1 from the opponent, K is ignored).
    source: who samples the K completions: ``policy`` (on-policy), ``reference``
      (the fixed reference: RSO's SFT samples, an offline baseline) or ``mixture``.
    mix_alpha: α of the geometric mixture ``π_θ^{1−α}·π_ref^α``.
    opponent: for ``pairing="opponent"``: ``reference`` (XPO's ỹ) or ``mixture`` (Nash-MD).
    pairing: one of :data:`PAIRINGS`.
    min_margin: pairs need a score gap above this.
    gold: ``chosen``: the data's gold response is the chosen side against each
      sample (SPIN); ``candidate``: it joins the K samples and is judged with them
      (DNO's teacher output); ``none``.
    reference: ``fixed`` (the reference model given to the loop), ``iteration`` (the
      policy that sampled the iteration, π_t: iterative DPO, SPIN, DNO) or ``tr_dpo``
      (reference parameters in the state, synced by the step; nothing precomputed).
    with_previous: also precompute π_t's log-probs (``prev_*``, INPO, DNO's regression).
    with_preference: also store ``preference_B = P(chosen ≻ rejected)`` from the judge.
    with_ref_tokens: also store the reference's per-token log-probs of the chosen side
      (``ref_chosen_token_logps_BxT``, Nash-MD's KL term).
    self_judge: the policy judges its own samples instead of the loop's judge:
      ``implicit``: its DPO implicit reward ``implicit_beta·(log π_θ − log π_ref)``
      against the fixed reference (DICE; zero while the policy is the reference, so
      start from a DPO-trained policy); ``likelihood``: its length-normalised
      log-likelihood ``log π_θ(y)/|y|`` (Sharpening's self-reward); ``none``.
    rso_beta: RSO's sampler temperature β (``pairing="rso"``); ``rso_num_samples`` drawn.
  """

  num_samples: int = 2
  source: str = "policy"
  mix_alpha: float = 0.5
  opponent: str = "none"
  pairing: str = "best_vs_worst"
  min_margin: float = 0.0
  gold: str = "none"
  reference: str = "fixed"
  with_previous: bool = False
  with_preference: bool = False
  with_ref_tokens: bool = False
  self_judge: str = "none"
  implicit_beta: float = 0.1
  rso_beta: float = 0.5
  rso_num_samples: int = 4

  def __post_init__(self):
    for name, value, allowed in (("source", self.source, SOURCES), ("opponent", self.opponent, OPPONENTS),
                                 ("pairing", self.pairing, PAIRINGS), ("reference", self.reference, REFERENCES),
                                 ("gold", self.gold, GOLD), ("self_judge", self.self_judge, SELF_JUDGES)):
      if value not in allowed:
        raise ValueError(f"{name}={value!r}; valid choices: {allowed}")
    if (self.pairing == "opponent") != (self.opponent != "none"):
      raise ValueError(f"pairing='opponent' and opponent={self.opponent!r} go together: an opponent needs "
                       "pairing='opponent' and pairing='opponent' needs opponent='reference' or 'mixture'")
    if self.pairing == "gold" and self.gold != "chosen":
      raise ValueError("pairing='gold' (SPIN) needs gold='chosen'")
    if self.pairing not in ("gold", "opponent") and self.num_samples < 2 and self.gold != "candidate":
      raise ValueError(f"pairing={self.pairing!r} needs num_samples >= 2, got {self.num_samples}")
    if not 0.0 <= self.mix_alpha <= 1.0:
      raise ValueError(f"mix_alpha must be in [0, 1], got {self.mix_alpha}")


ALGORITHMS: dict[str, dict[str, Any]] = {
    # Guo et al. 2024, Direct Language Model Alignment from Online AI Feedback (TRL OnlineDPOTrainer):
    # two policy samples per prompt, judged, a DPO step against the fixed reference.
    "online_dpo": dict(num_samples=2, pairing="best_vs_worst", reference="fixed"),
    # Xiong et al. 2024 / Dong et al. 2024, RLHF Workflow: K samples, best vs worst by a reward model,
    # the reference reset to the policy of each iteration.
    "iterative_dpo": dict(num_samples=4, pairing="best_vs_worst", reference="iteration"),
    # Chen et al. 2024, Self-Play Fine-Tuning (SPIN): the gold response beats the previous iterate's sample,
    # DPO against that iterate.
    "spin": dict(num_samples=1, pairing="gold", gold="chosen", reference="iteration"),
    # Rosset et al. 2024, Direct Nash Optimization (DNO-Prct): win rates under a preference model, the teacher's
    # response among the candidates, large-margin best vs worst, reference = π_t.
    "dno": dict(num_samples=4, pairing="best_vs_worst", gold="candidate", reference="iteration"),
    # Zhang et al. 2024, Iterative Nash Policy Optimization: on-policy pairs, a squared loss against the fixed
    # reference and π_t (objective="inpo").
    "inpo": dict(num_samples=2, pairing="best_vs_worst", reference="fixed", with_previous=True),
    # Xie et al. 2024, Exploratory Preference Optimization: a policy sample against a reference sample, DPO plus
    # α·log π(ỹ_ref) (objective="xpo").
    "xpo": dict(pairing="opponent", opponent="reference", reference="fixed"),
    # Munos et al. 2023, Nash Learning from Human Feedback (TRL NashMDTrainer): a policy sample against a sample
    # of the geometric mixture, the preference P(y ≻ y') as the REINFORCE reward (objective="nash_md").
    "nash_md": dict(pairing="opponent", opponent="mixture", reference="fixed", with_preference=True,
                    with_ref_tokens=True),
    # Liu et al. 2024, RSO: SFT samples rejection-sampled towards π_r ∝ π_sft·exp(r/β), paired by reward.
    "rso": dict(num_samples=8, source="reference", pairing="rso", reference="fixed"),
    # Zhou et al. 2025, Extragradient Preference Optimization: online IPO towards P(y ≻ y') − ½ on pairs of policy
    # samples, with extragradient iterations (objective="online_ipo", begin_iteration=extragradient_begin).
    "egpo": dict(num_samples=2, pairing="sample_pair", reference="fixed", with_preference=True),
    # Chen et al. 2024, Bootstrapping Language Models with DPO Implicit Rewards (DICE; self-rewarding with the
    # policy's implicit reward β·log π_θ/π_ref as the judge): start from a DPO-trained policy.
    "dice": dict(num_samples=4, pairing="best_vs_worst", reference="fixed", self_judge="implicit"),
    # Huang et al. 2024, Self-Improvement in Language Models: The Sharpening Mechanism (DPO on self-ranked pairs):
    # the policy's own length-normalised likelihood ranks its samples, the SFT model is the reference.
    "sharpening": dict(num_samples=4, pairing="best_vs_worst", reference="fixed", self_judge="likelihood"),
}

# The objective each algorithm trains with (``make_online_loss``); "dpo" is any pairwise loss.
OBJECTIVES = {"online_dpo": "dpo", "iterative_dpo": "dpo", "spin": "dpo", "dno": "dpo", "inpo": "inpo",
              "xpo": "xpo", "nash_md": "nash_md", "rso": "dpo", "dice": "dpo", "sharpening": "dpo",
              "egpo": "online_ipo"}


def online_config(algorithm: str, **overrides) -> OnlineConfig:
  """The :class:`OnlineConfig` preset of a named algorithm (:data:`ALGORITHMS`), with overrides."""
  if algorithm not in ALGORITHMS:
    raise ValueError(f"algorithm={algorithm!r}; valid choices: {tuple(ALGORITHMS)}")
  return OnlineConfig(**{**ALGORITHMS[algorithm], **overrides})


def _side_rows(prefix: str, rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {f"{prefix}_{k}_BxT": v for k, v in rows.items()}


def make_preference_data(
    cfg: OnlineConfig,
    *,
    prompts_fn: Callable[[int], tuple[list[np.ndarray], list[np.ndarray] | None]],
    sampler: Callable,
    judge,
    logps_fn: Callable,
    seq_len: int,
    ref_params: Any = None,
    state_params_fn: Callable[[Any], Any] = lambda state: state.params,
    seed: int = 0,
    pad_id: int = 0,
    prompt_length: int | None = None,
    decode: Callable[[np.ndarray], str] | None = None,
    num_logged_samples: int = 8,
) -> Callable[[Any, int], IterationData]:
  """The ``make_data(state, iteration) -> IterationData`` of an online preference loop.

  Args:
    cfg: the sampling / judging / pairing choices (:func:`online_config`).
    prompts_fn: ``prompts_fn(iteration) -> (prompts, golds)``: token arrays, and the
      gold responses (``None`` without; needed by ``gold != "none"``).
    sampler: from :func:`make_sampler`.
    judge: a :class:`RewardJudge` or :class:`PreferenceJudge`.
    logps_fn: from :func:`make_sequence_logps_fn`, for the precomputed log-probs.
    seq_len: row length (prompt + completion must fit).
    ref_params: the fixed reference's parameters (``reference="fixed"``, ``source`` or
      ``opponent`` ``reference`` / ``mixture``, INPO, the implicit-reward judge), or a
      function ``ref_params(state) -> params`` (e.g. a LoRA state's frozen base, read from
      the current state because the step donates it).
    state_params_fn: the policy's parameters in a state (e.g. LoRA adapters merged
      with their base).
    seed: sampling is seeded by ``(seed, iteration)``: a regenerated iteration is identical.
    decode: tokens -> text for the logged samples.
  """
  fixed_ref = ref_params

  def make_data(state, it: int) -> IterationData:
    policy = state_params_fn(state)
    ref_params = fixed_ref(state) if callable(fixed_ref) else fixed_ref
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), it)
    k_sample, k_opp, k_rso = jax.random.split(rng, 3)
    prompts, golds = prompts_fn(it)
    if cfg.gold != "none" and golds is None:
      raise ValueError(f"gold={cfg.gold!r} needs gold responses from prompts_fn")
    b = len(prompts)
    mix = lambda src: dict(mix_params=ref_params, mix_alpha=cfg.mix_alpha) if src == "mixture" else {}
    who = lambda src: ref_params if src == "reference" else policy  # the mixture is the policy's, mixed
    k = 1 if cfg.pairing == "opponent" else cfg.num_samples
    s = sampler(who(cfg.source), prompts, k, k_sample, prompt_length=prompt_length, **mix(cfg.source))
    cands = [[s.completion(i, j) for j in range(k)] for i in range(b)]
    if cfg.pairing == "opponent":
      o = sampler(who(cfg.opponent), prompts, 1, k_opp, prompt_length=prompt_length, **mix(cfg.opponent))
      cands = [row + [o.completion(i, 0)] for i, row in enumerate(cands)]
    if cfg.gold == "candidate":
      cands = [row + [np.asarray(g)] for row, g in zip(cands, golds)]
    metrics: dict[str, float] = {}

    if cfg.self_judge != "none":
      flat_p = [p for p, row in zip(prompts, cands) for _ in row]
      rows = completion_rows(flat_p, [c for row in cands for c in row], seq_len=seq_len, pad_id=pad_id)
      lp_pol = logps_fn(policy, rows)[0]
      if cfg.self_judge == "implicit":
        scores = (cfg.implicit_beta * (lp_pol - logps_fn(ref_params, rows)[0])).reshape(b, -1)
      else:
        scores = (lp_pol / np.maximum(rows["loss_mask"].sum(-1), 1.0)).reshape(b, -1)
    elif cfg.pairing == "gold":
      scores = np.zeros((b, k), np.float32)
    else:
      scores = judge.scores(prompts, cands)

    if cfg.pairing == "best_vs_worst":
      pairs = best_vs_worst(scores, min_margin=cfg.min_margin)
    elif cfg.pairing == "all_pairs":
      pairs = all_pairs(scores, min_margin=cfg.min_margin)
    elif cfg.pairing == "sample_pair":
      pairs = [(i, 0, 1) for i in range(b)]
    elif cfg.pairing == "rso":
      pairs = rso_pairs(scores, k_rso, beta=cfg.rso_beta, num_samples=min(cfg.rso_num_samples, scores.shape[1]))
    elif cfg.pairing == "gold":
      cands = [row + [np.asarray(g)] for row, g in zip(cands, golds)]
      pairs = [(i, k, j) for i in range(b) for j in range(k)]
    else:  # opponent: the policy's sample (index 0) against the opponent's (index 1)
      pairs = [(i, 0, 1) for i in range(b)]
    pair_prompts = [prompts[i] for i, _, _ in pairs]
    chosen = [cands[i][c] for i, c, _ in pairs]
    rejected = [cands[i][r] for i, _, r in pairs]
    if cfg.pairing == "opponent" and cfg.opponent == "reference":
      # XPO: the judged pair ordered by score; the reference's sample is the exploration row.
      explore = list(rejected)
      swap = [scores[i, 1] > scores[i, 0] for i, _, _ in pairs]
      chosen, rejected = ([r if w else c for c, r, w in zip(chosen, rejected, swap)],
                          [c if w else r for c, r, w in zip(chosen, rejected, swap)])
    arrays: dict[str, np.ndarray] = {}
    c_rows = completion_rows(pair_prompts, chosen, seq_len=seq_len, pad_id=pad_id)
    r_rows = completion_rows(pair_prompts, rejected, seq_len=seq_len, pad_id=pad_id)
    arrays.update(_side_rows("chosen", c_rows))
    arrays.update(_side_rows("rejected", r_rows))
    if cfg.pairing == "opponent" and cfg.opponent == "reference":
      arrays.update(_side_rows("explore", completion_rows(pair_prompts, explore, seq_len=seq_len, pad_id=pad_id)))
    if cfg.reference != "tr_dpo" and pairs:
      ref = policy if cfg.reference == "iteration" else ref_params
      (rc, rc_tok), (rr, _) = logps_fn(ref, c_rows), logps_fn(ref, r_rows)
      arrays["ref_chosen_logps_B"], arrays["ref_rejected_logps_B"] = rc, rr
      metrics["logp_margin"] = float(np.mean(rc - rr))  # SPIN: log π_t(gold) − log π_t(own sample)
      if cfg.with_ref_tokens:
        arrays["ref_chosen_token_logps_BxT"] = rc_tok
    if cfg.with_previous and pairs:
      arrays["prev_chosen_logps_B"], arrays["prev_rejected_logps_B"] = logps_fn(policy, c_rows)[0], logps_fn(
          policy, r_rows)[0]
    if cfg.with_preference and pairs:
      arrays["preference_B"] = judge.preference(pair_prompts, chosen, rejected)

    policy_scores = scores[:, :k]
    metrics.update(score_mean=float(policy_scores.mean()), score_max=float(policy_scores.max(-1).mean()),
                   pairs=float(len(pairs)), pairs_per_prompt=len(pairs) / max(b, 1),
                   response_length=float(s.lengths_BxK.mean()))
    if cfg.pairing == "opponent":
      metrics["score_opponent_mean"] = float(scores[:, 1].mean())
      metrics["win_rate_vs_opponent"] = float(np.mean(judge.preference(prompts, [r[0] for r in cands],
                                                                       [r[1] for r in cands])))
    if pairs and cfg.pairing != "gold":
      metrics["score_margin"] = float(np.mean([scores[i, c] - scores[i, r] for i, c, r in pairs]))
    samples = None
    if decode is not None and jax.process_index() == 0:
      samples = [{"prompt": decode(prompts[i]), "completions": [decode(c) for c in cands[i]],
                  "scores": [float(x) for x in scores[i]]} for i in range(min(b, num_logged_samples))]
    return IterationData(arrays, metrics, samples)

  return make_data


# ----------------------------------------------------------------------------- the step's loss


def _online_objective(name: str):
  from rlhf_jax.losses import online as online_losses

  return {"xpo": online_losses.xpo_loss, "nash_md": online_losses.nash_md_loss,
          "inpo": online_losses.inpo_loss, "dno": online_losses.dno_loss,
          "online_ipo": online_losses.online_ipo_loss}[name]


ONLINE_OBJECTIVES = ("dpo", "xpo", "nash_md", "inpo", "dno", "online_ipo")
# Hyper-parameters of the online objectives derived from the step's ``beta`` when not given.
OBJECTIVE_DEFAULTS = {"inpo": {"eta": lambda b: b, "tau": lambda b: b / 3}, "dno": {"eta": lambda b: b},
                      "online_ipo": {"tau": lambda b: b}}


def make_online_loss(objective: str = "dpo", *, beta: float = 0.1,
                     losses: Sequence[pref_lib.LossSpec] = (("sigmoid", 1.0, {}),), hparams: Mapping | None = None,
                     ref_graphdef=None, logprob_chunk_size: int | None = None):
  """``loss_fn(model, batch, rng)`` for the rows of :func:`make_preference_data`.

  ``objective="dpo"``: any weighted pairwise losses of :mod:`rlhf_jax.losses`
  (:func:`rlhf_jax.train.preference.make_preference_loss`; precomputed reference
  log-probs, or ``extras["ref_params"]`` with ``ref_graphdef`` under TR-DPO).
  Otherwise one of :mod:`rlhf_jax.losses.online`: ``xpo`` (``alpha``, ``loss_type``),
  ``nash_md``, ``inpo`` (``eta``, ``tau``), ``dno`` (``eta``), ``online_ipo`` (``tau``),
  with ``hparams`` passed to it. Unset, their KL weights follow ``beta`` (:data:`OBJECTIVE_DEFAULTS`):
  INPO's ``eta`` (the weight of KL(π‖π_t), the paper's inverse step size) is ``beta`` and ``tau``
  ``beta / 3`` (the paper's ratio), DNO's ``eta`` and online IPO's ``tau`` are ``beta``.
  """
  if objective not in ONLINE_OBJECTIVES:
    raise ValueError(f"objective={objective!r}; valid choices: {ONLINE_OBJECTIVES}")
  hparams = dict(hparams or {})
  if objective == "dpo":
    return pref_lib.make_preference_loss(losses, beta=beta, ref_graphdef=ref_graphdef,
                                         logprob_chunk_size=logprob_chunk_size)
  fn = _online_objective(objective)
  hparams = {**{k: f(beta) for k, f in OBJECTIVE_DEFAULTS.get(objective, {}).items()}, **hparams}
  sides = {"xpo": ("chosen", "rejected", "explore"), "nash_md": ("chosen",)}.get(objective, ("chosen", "rejected"))

  def loss_fn(model, batch, rng):
    del rng
    pol = pref_lib.concatenated_logps(model, batch, logprob_chunk_size=logprob_chunk_size, sides=sides)
    pc = pol["chosen"].seq_B
    aux = {"logps/chosen": pc.mean(), "weight": jnp.asarray(pc.shape[0], jnp.float32)}
    if objective == "nash_md":
      loss_b = fn(pol["chosen"].token_BxT, batch["ref_chosen_token_logps_BxT"], pol["chosen"].mask_BxT,
                  batch["preference_B"], beta=beta, **hparams)
      aux["preference"] = batch["preference_B"].mean()
      aux["kl"] = ((pol["chosen"].token_BxT - batch["ref_chosen_token_logps_BxT"]) * pol["chosen"].mask_BxT).sum(
          -1).mean()
    else:
      pr = pol["rejected"].seq_B
      rc, rr = batch["ref_chosen_logps_B"], batch["ref_rejected_logps_B"]
      if objective == "xpo":
        loss_b = fn(pc, pr, rc, rr, pol["explore"].seq_B, beta=beta, **hparams)
        aux["logps/explore"] = pol["explore"].seq_B.mean()
      elif objective == "inpo":
        loss_b = fn(pc, pr, rc, rr, batch["prev_chosen_logps_B"], batch["prev_rejected_logps_B"], **hparams)
      elif objective == "dno":
        loss_b = fn(pc, pr, batch["prev_chosen_logps_B"], batch["prev_rejected_logps_B"], batch["preference_B"],
                    **hparams)
      else:
        loss_b = fn(pc, pr, rc, rr, batch["preference_B"], **hparams)
      aux.update(dpo_losses.dpo_metrics(pc, pr, rc, rr, beta=beta))
    loss = loss_b.mean()
    aux[f"loss/{objective}"] = loss
    return loss, aux

  return loss_fn


# ----------------------------------------------------------------------------- extragradient (EGPO)


def extragradient_extras(params) -> dict:
  """The state extras :func:`extragradient_begin` needs: the anchor θ_t and the extrapolated θ_{t+½}."""
  copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
  return {"eg_anchor": copy(params), "eg_half": copy(params)}


def extragradient_begin(state, iteration: int):
  """EGPO's extragradient as a ``begin_iteration`` of :func:`rlhf_jax.train.iterative.run_iterations`.

  Zhou et al. 2025, "Extragradient Preference Optimization (EGPO): Beyond Last-Iterate
  Convergence for Nash Learning from Human Feedback": ``θ_{t+½} = θ_t − η·∇L(θ_t)``, then
  ``θ_{t+1} = θ_t − η·∇L(θ_{t+½})``, each loss on pairs sampled from the policy being
  differentiated. Loop iteration ``2t`` samples at θ_t and steps to θ_{t+½} (the
  extrapolation); iteration ``2t+1`` samples at θ_{t+½} and steps from it; the next even
  iteration moves that step back onto the anchor: ``θ_{t+1} = θ_t + (θ' − θ_{t+½})``.
  With SGD this is the extragradient method exactly; with Adam, its extra-Adam form
  (Gidel et al. 2019), the optimizer moments updated by both half-steps. The state needs
  :func:`extragradient_extras` in ``state.extras``; it is a pure function of
  ``(state, iteration)``, so a resumed run repeats it identically.
  """
  ex = dict(state.extras)
  params = state.params
  if iteration % 2 == 1:
    ex["eg_half"] = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
  else:
    if iteration > 0:
      params = jax.tree.map(lambda p, h, a: p - h + a, params, ex["eg_half"], ex["eg_anchor"])
    ex["eg_anchor"] = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
  return state._replace(params=params, extras=ex)


# ----------------------------------------------------------------------------- evaluation


def make_win_rate_eval(sampler: Callable, judge, prompts: Sequence[np.ndarray], *, opponent_params: Any,
                       state_params_fn: Callable[[Any], Any] = lambda state: state.params, seed: int = 0,
                       prompt_length: int | None = None, reward_name: str = "score"):
  """``eval_fn(state)``: the policy's win rate against ``opponent_params`` on held-out ``prompts``.

  One sample each from the policy and the opponent per prompt (same seed every
  call), judged by ``judge.preference``; a :class:`RewardJudge` also reports the
  policy's mean score (``<reward_name>``) and the opponent's.
  """
  opp = None

  def eval_fn(state):
    nonlocal opp
    rng = jax.random.PRNGKey(seed)
    if opp is None:
      opp = sampler(opponent_params, prompts, 1, jax.random.fold_in(rng, 1), prompt_length=prompt_length)
    pol = sampler(state_params_fn(state), prompts, 1, rng, prompt_length=prompt_length)
    a = [pol.completion(i, 0) for i in range(len(prompts))]
    o = [opp.completion(i, 0) for i in range(len(prompts))]
    out = {"win_rate": float(np.mean(judge.preference(prompts, a, o)))}
    if not judge.pairwise:
      out[reward_name] = float(np.mean(judge.rewards(prompts, a)))
      out[f"opponent_{reward_name}"] = float(np.mean(judge.rewards(prompts, o)))
    return out

  return eval_fn
