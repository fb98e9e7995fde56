"""Best-of-N decode: one jitted call over repeated prompts, argmax of host scores, scorer adapters."""

import doctest

import jax
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import models
from rlhf_jax.sampling import best_of_n as bon_lib
from rlhf_jax.sampling import (
    best_index, left_pad, make_best_of_n_fn, make_generate_fn, pairwise_score_fn, processors, reward_model_scorer,
    text_score_fn,
)
from rlhf_jax.train import reward as reward_lib
from rlhf_jax.train import reward_fns

CFG = models.get_config("tiny")
K, N, EOS = 4, 6, 2
PROMPTS = [[5, 9, 3, 7, 1], [11, 4], [8, 8, 6]]


@pytest.fixture(scope="module")
def setup():
  graphdef, params = nnx.split(models.create_model(CFG, seed=3))
  bon = make_best_of_n_fn(graphdef, n=K, max_new_tokens=N, processor=processors.temperature(1.0), eos_id=EOS)
  ids, mask = left_pad(PROMPTS)
  return graphdef, params, bon, ids, mask


def _hash_score(tokens, mask, lengths, prompt_index):
  """A deterministic score with distinct values: a weighted sum of the tokens."""
  w = np.arange(1, tokens.shape[1] + 1)
  return (tokens * mask * w).sum(-1).astype(np.float32) + 0.001 * np.arange(len(tokens))


def test_best_is_argmax_of_scores_and_samples_equal_plain_generate(setup):
  graphdef, params, bon, ids, mask = setup
  rng = jax.random.PRNGKey(7)
  seen = {}

  def score_fn(tokens, m, lengths, prompt_index):
    seen.update(prompt_index=prompt_index, lengths=lengths)
    return _hash_score(tokens, m, lengths, prompt_index)

  out = bon(params, ids, mask, rng, score_fn)
  b = len(PROMPTS)
  assert out.tokens_BxKxN.shape == (b, K, N) and out.scores_BxK.shape == (b, K)
  np.testing.assert_array_equal(seen["prompt_index"], np.repeat(np.arange(b), K))
  # The samples are those of a plain generate of the repeated prompts with the same key.
  plain = jax.device_get(make_generate_fn(graphdef, max_new_tokens=N, processor=processors.temperature(1.0),
                                          eos_id=EOS)(params, np.repeat(ids, K, 0), np.repeat(mask, K, 0), rng))
  np.testing.assert_array_equal(out.tokens_BxKxN.reshape(b * K, N), plain.tokens_BxN)
  np.testing.assert_array_equal(out.mask_BxKxN.reshape(b * K, N), plain.mask_BxN)
  np.testing.assert_array_equal(out.lengths_BxK.reshape(-1), plain.lengths_B)
  np.testing.assert_allclose(out.logps_BxKxN.reshape(b * K, N), plain.logps_BxN, atol=1e-6)
  # Sampling differs across a prompt's K rows (temperature 1 on a random model).
  assert len({tuple(r) for r in out.tokens_BxKxN[0]}) > 1
  # The best is the argmax of the scores.
  expected = _hash_score(plain.tokens_BxN, plain.mask_BxN, plain.lengths_B, None).reshape(b, K)
  np.testing.assert_allclose(out.scores_BxK, expected)
  np.testing.assert_array_equal(out.best_index_B, np.argmax(expected, 1))
  for i in range(b):
    np.testing.assert_array_equal(out.best_tokens_BxN[i], out.tokens_BxKxN[i, out.best_index_B[i]])
    np.testing.assert_array_equal(out.best_mask_BxN[i], out.mask_BxKxN[i, out.best_index_B[i]])
    assert out.best_lengths_B[i] == out.lengths_BxK[i, out.best_index_B[i]]
    assert out.best_scores_B[i] == out.scores_BxK[i].max()
  # A second call with the same key gives the same samples (one compilation, deterministic).
  again = bon(params, ids, mask, rng, score_fn)
  np.testing.assert_array_equal(again.tokens_BxKxN, out.tokens_BxKxN)


def test_best_index_ties_and_nan():
  s = np.array([[1.0, 3.0, 3.0], [np.nan, -5.0, np.nan], [np.nan, np.nan, np.nan]])
  np.testing.assert_array_equal(best_index(s), [1, 1, 0])
  with pytest.raises(ValueError, match=r"\[B, K\]"):
    best_index(np.zeros(3))


def test_score_fn_must_return_one_score_per_sample(setup):
  _, params, bon, ids, mask = setup
  with pytest.raises(ValueError, match="one score per sample"):
    bon(params, ids, mask, jax.random.PRNGKey(0), lambda t, m, l, i: np.zeros(len(PROMPTS)))
  with pytest.raises(ValueError, match="n .* >= 1"):
    make_best_of_n_fn(setup[0], n=0, max_new_tokens=N, processor=None, eos_id=EOS)


def test_reward_model_scorer_matches_sequence_rewards(setup):
  _, params, bon, ids, mask = setup
  rm = models.create_model(models.get_config("tiny", scalar_head_outputs=2), seed=5)
  rm_graphdef, rm_params = nnx.split(rm)
  out = bon(params, ids, mask, jax.random.PRNGKey(1), reward_model_scorer(rm_graphdef, head=1)(rm_params, ids, mask))
  b = len(PROMPTS)
  seq = np.concatenate([np.repeat(ids, K, 0), out.tokens_BxKxN.reshape(b * K, N)], 1)
  attn = np.concatenate([np.repeat(mask, K, 0), out.mask_BxKxN.reshape(b * K, N)], 1)
  forward = jax.jit(lambda p, s, a: reward_lib.sequence_rewards(nnx.merge(rm_graphdef, p), s, a))
  expected = np.asarray(forward(rm_params, seq, attn))[:, 1].reshape(b, K)
  np.testing.assert_allclose(out.scores_BxK, expected, atol=1e-5)
  np.testing.assert_array_equal(out.best_index_B, np.argmax(expected, 1))
  # head=None gives the vector rewards (for DPA).
  vec = reward_model_scorer(rm_graphdef, head=None)(rm_params, ids, mask)(
      out.tokens_BxKxN.reshape(b * K, N), out.mask_BxKxN.reshape(b * K, N), out.lengths_BxK.reshape(-1),
      np.repeat(np.arange(b), K))
  assert vec.shape == (b * K, 2)


def test_pairwise_score_fn_is_the_round_robin_win_rate(setup):
  _, params, bon, ids, mask = setup
  utility = lambda t, m: (t * m).sum(-1).astype(np.float64) / 50.0
  calls = []

  def pair_logits(ta, ma, tb, mb, prompt_index):  # a Bradley-Terry preference model on a hidden utility
    calls.append(len(ta))
    return utility(ta, ma) - utility(tb, mb)

  out = bon(params, ids, mask, jax.random.PRNGKey(4), pairwise_score_fn(pair_logits, n=K))
  b = len(PROMPTS)
  assert calls == [b * K * (K - 1)]
  u = utility(out.tokens_BxKxN, out.mask_BxKxN)
  sig = lambda x: 1 / (1 + np.exp(-x))
  want = np.array([[np.mean([sig(u[i, k] - u[i, j]) for j in range(K) if j != k]) for k in range(K)]
                   for i in range(b)])
  np.testing.assert_allclose(out.scores_BxK, want, rtol=1e-5)
  np.testing.assert_array_equal(out.best_index_B, np.argmax(u, 1))  # the win rate ranks like the utility
  with pytest.raises(ValueError, match="n >= 2"):
    pairwise_score_fn(pair_logits, n=1)


def test_text_score_fn_with_a_user_reward_function(setup):
  _, params, bon, ids, mask = setup
  decode = lambda toks: " ".join(str(t) for t in toks)

  def count_reward(completions, prompts, target):  # a TRL-style batched user reward
    return [float(c.split().count(str(t))) + (0.5 if p == "first" else 0.0)
            for c, p, t in zip(completions, prompts, target)]

  fn = reward_fns.RewardFunction(count_reward, name="count")
  targets = [9, 4, 6]
  score_fn = text_score_fn(fn, decode, prompts=["first", "second", "third"], fields={"target": targets}, eos_id=EOS)
  out = bon(params, ids, mask, jax.random.PRNGKey(2), score_fn)
  for b in range(len(PROMPTS)):
    for k in range(K):
      toks = [int(t) for t in out.tokens_BxKxN[b, k, : out.lengths_BxK[b, k]]]
      if toks and toks[-1] == EOS:
        toks = toks[:-1]
      assert out.scores_BxK[b, k] == toks.count(targets[b]) + (0.5 if b == 0 else 0.0)
  # A RewardSum (load_reward_fns' result) returns (total, parts, failures): the total is used.
  total = text_score_fn(reward_fns.RewardSum([fn], [2.0]), decode, prompts=["a", "b", "c"],
                        fields={"target": targets})
  r = total(out.tokens_BxKxN.reshape(-1, N), out.mask_BxKxN.reshape(-1, N), out.lengths_BxK.reshape(-1),
            np.repeat(np.arange(3), K))
  assert r.shape == (3 * K,) and r.dtype == np.float32


def test_docstring_examples():
  result = doctest.testmod(bon_lib, verbose=False)
  assert result.failed == 0


def test_decode_completions_cuts_at_the_length_and_drops_a_final_eos():
  from rlhf_jax.sampling import decode_completions

  tokens = np.array([[5, 6, 2, 0], [7, 2, 8, 0], [9, 9, 9, 9]])
  got = decode_completions(tokens, np.array([3, 3, 4]), lambda ids: ",".join(map(str, ids)), eos_id=2)
  assert got == ["5,6", "7,2,8", "9,9,9,9"]  # only a final EOS goes; a mid-sample 2 is kept
  assert decode_completions(tokens[:1], np.array([3]), str) == ["[5, 6, 2]"]
