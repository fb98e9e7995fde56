"""Best-of-N decoding: N samples per prompt in one jitted call, scored on the host, the best kept.

``best_of_n = make_best_of_n_fn(graphdef, n=K, ...)`` repeats each prompt K times on the
batch axis *inside* one jitted program (row ``b·K + k`` is sample ``k`` of prompt ``b``) and
decodes them together with :func:`rlhf_jax.sampling.make_generate_fn`. The samples are then
scored by a host function::

    score_fn(tokens_BKxN, mask_BKxN, lengths_BK, prompt_index_BK) -> scores [B·K]

(a reward model, a pairwise preference model, a rule verifier, a user text function;
:func:`reward_model_scorer`, :func:`pairwise_score_fn` and :func:`text_score_fn` adapt
them),
and the best sample of each prompt is returned with all samples and all scores.

The same function serves the training loops (rejection-sampling fine-tuning: RAFT,
ReST, SuperHF, Sharpening, DPA in :mod:`rlhf_jax.train.rejection`) and inference:
best-of-N with a reward model is a strong decoding baseline on its own (Nakano et al.,
2021, "WebGPT"; Stiennon et al., 2020). At inference::

    bon = make_best_of_n_fn(graphdef, n=8, max_new_tokens=64, eos_id=tok.eos_id,
                            processor=processors.temperature(0.8))
    ids, mask = left_pad([tok.encode(p) for p in prompts])
    score = reward_model_scorer(rm_graphdef)(rm_params, ids, mask)
    out = bon(params, ids, mask, jax.random.PRNGKey(0), score)
    answers = [tok.decode(t[:n]) for t, n in zip(out.best_tokens_BxN, out.best_lengths_B)]

Ties go to the lowest sample index; non-finite scores (a verifier that failed) never win
over finite ones.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.rewards.heads import gather_last
from rlhf_jax.sampling.generate import make_generate_fn
from rlhf_jax.sampling.processors import LogitProcessor

ScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], Any]


class BestOfN(NamedTuple):
  """Every sample, every score and the best sample of each prompt (host NumPy arrays).

  Attributes:
    tokens_BxKxN: the K samples of each prompt, ``pad_id`` after EOS.
    logps_BxKxN: the sampler's (unprocessed) log-probs of those tokens, 0 after EOS.
    mask_BxKxN: 1 on generated tokens up to and including EOS.
    lengths_BxK: generated tokens per sample (EOS included).
    scores_BxK: ``score_fn``'s scores (float32).
    best_index_B: the winning sample of each prompt.
    best_tokens_BxN / best_mask_BxN / best_lengths_B / best_scores_B: the winners.
  """

  tokens_BxKxN: np.ndarray
  logps_BxKxN: np.ndarray
  mask_BxKxN: np.ndarray
  lengths_BxK: np.ndarray
  scores_BxK: np.ndarray
  best_index_B: np.ndarray
  best_tokens_BxN: np.ndarray
  best_mask_BxN: np.ndarray
  best_lengths_B: np.ndarray
  best_scores_B: np.ndarray


def best_index(scores_BxK: np.ndarray) -> np.ndarray:
  """``argmax_k scores[b, k]`` per row: the first maximum; NaN counts as ``-inf``."""
  s = np.asarray(scores_BxK, np.float64)
  if s.ndim != 2:
    raise ValueError(f"scores_BxK must be [B, K], got shape {s.shape}")
  return np.argmax(np.where(np.isnan(s), -np.inf, s), axis=1).astype(np.int32)


def make_best_of_n_fn(
    graphdef: nnx.GraphDef,
    *,
    n: int,
    max_new_tokens: int,
    processor: LogitProcessor | None,
    eos_id: int | None,
    pad_id: int = 0,
) -> Callable[..., BestOfN]:
  """Builds ``best_of_n(params, prompt_ids_BxP, prompt_mask_BxP, rng, score_fn) -> BestOfN``.

  The sampler (``best_of_n.sample(params, prompt_ids_BxP, prompt_mask_BxP, rng) ->
  Generation`` over ``B·K`` rows) is one jitted program: the prompts are repeated
  ``n`` times on the batch axis inside it (``jnp.repeat``, so row ``b·K + k`` is sample
  ``k`` of prompt ``b``) and decoded by :func:`make_generate_fn`'s loop with ``rng``; its
  samples are those of a plain ``generate`` of the repeated prompts with the same key.
  ``score_fn(tokens_BKxN, mask_BKxN, lengths_BK, prompt_index_BK) -> [B·K]`` then scores
  them on the host (``prompt_index_BK[r]`` is the prompt row ``r`` answers).

  Args:
    graphdef: the policy's graph definition (``nnx.split``).
    n: K, samples per prompt (>= 1).
    max_new_tokens: N, the most tokens generated per sample.
    processor: the sampling logit processor (e.g. ``processors.temperature(1.0)``);
      ``None`` is greedy, which makes the K samples identical.
    eos_id: a sample stops after emitting it; ``None`` never stops early.
    pad_id: written after EOS.

  Returns:
    ``best_of_n``, with the jitted sampler as its ``sample`` attribute.
  """
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"n (samples per prompt) must be an int >= 1, got {n!r}")
  n = int(n)
  generate = make_generate_fn(graphdef, max_new_tokens=max_new_tokens, processor=processor, eos_id=eos_id,
                              pad_id=pad_id, jit=False)

  @jax.jit
  def sample(params, prompt_ids_BxP, prompt_mask_BxP, rng):
    ids_BKxP = jnp.repeat(jnp.asarray(prompt_ids_BxP), n, axis=0)
    mask_BKxP = jnp.repeat(jnp.asarray(prompt_mask_BxP), n, axis=0)
    return generate(params, ids_BKxP, mask_BKxP, rng)

  def best_of_n(params, prompt_ids_BxP, prompt_mask_BxP, rng, score_fn: ScoreFn) -> BestOfN:
    b = int(np.shape(prompt_ids_BxP)[0])
    gen = jax.device_get(sample(params, prompt_ids_BxP, prompt_mask_BxP, rng))
    tokens, logps, mask, lengths = (np.asarray(x) for x in (gen.tokens_BxN, gen.logps_BxN, gen.mask_BxN,
                                                             gen.lengths_B))
    prompt_index = np.repeat(np.arange(b, dtype=np.int32), n)
    scores = np.asarray(score_fn(tokens, mask, lengths, prompt_index), np.float32)
    if scores.shape != (b * n,):
      raise ValueError(f"score_fn must return one score per sample, shape ({b * n},); got shape {scores.shape}")
    scores_BxK = scores.reshape(b, n)
    best = best_index(scores_BxK)
    rows = np.arange(b) * n + best
    return BestOfN(
        tokens_BxKxN=tokens.reshape(b, n, -1), logps_BxKxN=logps.reshape(b, n, -1),
        mask_BxKxN=mask.reshape(b, n, -1), lengths_BxK=lengths.reshape(b, n), scores_BxK=scores_BxK,
        best_index_B=best, best_tokens_BxN=tokens[rows], best_mask_BxN=mask[rows], best_lengths_B=lengths[rows],
        best_scores_B=scores_BxK[np.arange(b), best],
    )

  best_of_n.sample = sample
  best_of_n.n = n
  return best_of_n


def scoring_rows(prompt_ids_BxP, prompt_mask_BxP, tokens_BKxN, mask_BKxN, prompt_index_BK):
  """``(input_ids, attention_mask)`` of ``[left-padded prompt | completion]`` for each sample (NumPy)."""
  ids = np.concatenate([np.asarray(prompt_ids_BxP)[prompt_index_BK], np.asarray(tokens_BKxN)], axis=1)
  mask = np.concatenate([np.asarray(prompt_mask_BxP)[prompt_index_BK], np.asarray(mask_BKxN)], axis=1)
  return ids.astype(np.int32), mask.astype(np.int32)


def reward_model_scorer(rm_graphdef: nnx.GraphDef, *, head: int | None = 0):
  """Adapts a scalar-head reward model: ``scorer(rm_params, prompt_ids_BxP, prompt_mask_BxP) -> score_fn``.

  The reward of a sample is the model's scalar head at the last real token of
  ``[prompt | completion]`` (the convention of :mod:`rlhf_jax.train.reward`). The forward
  is jitted once, in this factory; build the ``score_fn`` per prompt batch.

  Args:
    rm_graphdef: the reward model's graph definition (a model with ``scalar_head_outputs``).
    head: which scalar head to return (``None``: all heads, ``[B·K, H]``: vector rewards,
      e.g. for DPA's directional scores).
  """

  @jax.jit
  def rewards(rm_params, ids_BxT, mask_BxT):
    model = nnx.merge(rm_graphdef, rm_params)
    hidden, _ = model.hidden_states(ids_BxT, attention_mask_BxT=mask_BxT)
    r = gather_last(model.scalar(hidden), mask_BxT).astype(jnp.float32)
    return r if head is None else r[:, head]

  def scorer(rm_params, prompt_ids_BxP, prompt_mask_BxP) -> ScoreFn:
    def score_fn(tokens_BKxN, mask_BKxN, lengths_BK, prompt_index_BK):
      del lengths_BK
      ids, mask = scoring_rows(prompt_ids_BxP, prompt_mask_BxP, tokens_BKxN, mask_BKxN, prompt_index_BK)
      return np.asarray(jax.device_get(rewards(rm_params, ids, mask)))

    return score_fn

  scorer.rewards = rewards
  return scorer


def pairwise_score_fn(pair_logits_fn: Callable, *, n: int) -> ScoreFn:
  """Adapts a pairwise preference model: each sample's round-robin win rate within its prompt.

  ``score[b, k] = mean_{j ≠ k} σ(logit(y_k ≻ y_j | x_b))`` over the other K − 1 samples of
  prompt ``b`` (a Copeland-style tournament, as best-of-N with a preference model needs a
  reference point and the group is the natural one). ``pair_logits_fn(tokens_a, mask_a,
  tokens_b, mask_b, prompt_index) -> logits [P]`` scores ``P = B·K·(K − 1)`` ordered pairs in
  one call (e.g. a jitted :func:`rlhf_jax.train.reward.preference_logits` over rows built
  the way the model was trained).

  Args:
    pair_logits_fn: the logit of ``P(a ≻ b)`` for each pair.
    n: K, the samples per prompt (the ``n`` of :func:`make_best_of_n_fn`).
  """
  if n < 2:
    raise ValueError(f"a pairwise score needs n >= 2 samples per prompt, got {n}")

  def score_fn(tokens_BKxN, mask_BKxN, lengths_BK, prompt_index_BK):
    del lengths_BK
    bk = len(prompt_index_BK)
    if bk % n:
      raise ValueError(f"{bk} samples are not a multiple of n={n}")
    k, j = np.nonzero(~np.eye(n, dtype=bool))  # ordered pairs (k, j), k != j, k-major
    base = (np.arange(bk // n) * n)[:, None]
    a, b = (base + k[None]).reshape(-1), (base + j[None]).reshape(-1)
    tokens, mask, index = np.asarray(tokens_BKxN), np.asarray(mask_BKxN), np.asarray(prompt_index_BK)
    logits = np.asarray(pair_logits_fn(tokens[a], mask[a], tokens[b], mask[b], index[a]), np.float64)
    if logits.shape != a.shape:
      raise ValueError(f"pair_logits_fn must return one logit per pair, shape {a.shape}; got {logits.shape}")
    wins = 1.0 / (1.0 + np.exp(-logits))
    return wins.reshape(bk // n, n, n - 1).mean(-1).reshape(-1).astype(np.float32)

  return score_fn


def decode_completions(tokens_BKxN, lengths_BK, decode_fn: Callable[[list[int]], str], *,
                       eos_id: int | None = None) -> list[str]:
  """Each sample's first ``lengths`` tokens, without a final EOS, through ``decode_fn``."""
  out = []
  for t, n in zip(np.asarray(tokens_BKxN), np.asarray(lengths_BK)):
    ids = [int(x) for x in t[: int(n)]]
    if eos_id is not None and ids and ids[-1] == eos_id:
      ids = ids[:-1]
    out.append(decode_fn(ids))
  return out


def text_score_fn(
    reward_fn: Callable,
    decode_fn: Callable[[list[int]], str],
    *,
    prompts: Sequence[str],
    fields: Mapping[str, Sequence] | None = None,
    eos_id: int | None = None,
) -> ScoreFn:
  """Adapts a text reward to a ``score_fn``: decode, then ``reward_fn(completions, prompts, fields)``.

  ``reward_fn`` follows :mod:`rlhf_jax.train.reward_fns`' convention (a ``RewardFunction``
  or the ``RewardSum`` of ``load_reward_fns``): it gets the decoded completions, each
  sample's prompt text and the per-row fields, and returns the rewards (or a tuple whose
  first entry is the rewards, as those classes do). ``prompts`` and ``fields`` are given
  per prompt (length B) and repeated for each of its samples. For a plain batched
  verifier ``fn(completions, **fields)`` (:func:`rlhf_jax.rewards.batched_reward_fn`) pass
  ``lambda c, p, f: fn(c, **f)``.
  """
  prompts = list(prompts)
  fields = {k: list(v) for k, v in (fields or {}).items()}

  def score_fn(tokens_BKxN, mask_BKxN, lengths_BK, prompt_index_BK):
    del mask_BKxN
    completions = decode_completions(tokens_BKxN, lengths_BK, decode_fn, eos_id=eos_id)
    idx = [int(i) for i in prompt_index_BK]
    out = reward_fn(completions, [prompts[i] for i in idx], {k: [v[i] for i in idx] for k, v in fields.items()})
    if isinstance(out, tuple):
      out = out[0]
    return np.asarray(out, np.float32)

  return score_fn
