"""Sampler with a second model: Nash-MD geometric mixing and NLPO invalid-action masking."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import models
from rlhf_jax.sampling import left_pad, make_generate_fn, processors

CFG = models.get_config("tiny")
N = 6
PROMPTS = [[5, 9, 3, 7, 1], [11, 4]]


@pytest.fixture(scope="module")
def policy():
  return nnx.split(models.create_model(CFG, seed=2))


@pytest.fixture(scope="module")
def other():
  return nnx.split(models.create_model(CFG, seed=5))


@pytest.fixture(scope="module")
def greedy_mix(policy, other):
  return make_generate_fn(policy[0], max_new_tokens=N, mix_graphdef=other[0], mix_alpha=0.5)


@functools.cache
def _forward(graphdef):
  return jax.jit(lambda params, ids: jax.nn.log_softmax(nnx.merge(graphdef, params)(ids).astype(jnp.float32), -1))


def _full_log_softmax(graphdef, params, seqs):
  """``[len(seqs), 16, V]`` next-token log-probs from one full (cache-free, causal) forward.

  Rows are right-padded to a fixed ``[16, 16]`` so that one compiled forward serves
  every test; causal attention keeps padding from changing earlier positions.
  """
  ids = np.zeros((16, 16), np.int32)
  for i, seq in enumerate(seqs):
    ids[i, :len(seq)] = seq
  return np.asarray(_forward(graphdef)(params, ids))[:len(seqs)]


def _completion_rows(prompt, tokens):
  """Full sequence and the positions whose logits predict each generated token."""
  seq = list(prompt) + [int(t) for t in tokens]
  return seq, np.arange(len(prompt) - 1, len(seq) - 1)


def test_alpha_zero_equals_plain_sampling(policy, other):
  ids, mask = left_pad([[1, 2, 3], [7, 8]] * 8)
  proc = processors.temperature(1.5)
  plain = make_generate_fn(policy[0], max_new_tokens=N, processor=proc)(policy[1], ids, mask, jax.random.key(4))
  mixed = make_generate_fn(policy[0], max_new_tokens=N, processor=proc, mix_graphdef=other[0])(
      policy[1], ids, mask, jax.random.key(4), None, other[1], mix_alpha=jnp.float32(0.0))
  assert plain.mix_logps_BxN is None
  assert len({tuple(r) for r in np.asarray(plain.tokens_BxN)}) > 2  # it does sample
  np.testing.assert_array_equal(mixed.tokens_BxN, plain.tokens_BxN)
  np.testing.assert_allclose(mixed.logps_BxN, plain.logps_BxN, atol=1e-6)
  np.testing.assert_allclose(mixed.mix_logps_BxN, plain.logps_BxN, atol=1e-5)


def test_alpha_one_greedy_equals_greedy_of_second_model(policy, other, greedy_mix):
  ids, mask = left_pad(PROMPTS)
  ref = make_generate_fn(other[0], max_new_tokens=N)(other[1], ids, mask, jax.random.key(0))
  gen = greedy_mix(policy[1], ids, mask, jax.random.key(0), None, other[1], mix_alpha=1.0)
  np.testing.assert_array_equal(gen.tokens_BxN, ref.tokens_BxN)
  np.testing.assert_allclose(gen.mix_logps_BxN, ref.logps_BxN, atol=1e-5)
  # logps stay the policy's: what a trainer recomputes for these tokens.
  rows = [_completion_rows(prompt, gen.tokens_BxN[i]) for i, prompt in enumerate(PROMPTS)]
  lp_theta = _full_log_softmax(*policy, [seq for seq, _ in rows])
  for i, (seq, pos) in enumerate(rows):
    np.testing.assert_allclose(gen.logps_BxN[i], lp_theta[i, pos, seq[len(PROMPTS[i]):]], atol=1e-5)


def test_half_mixture_greedy_is_argmax_of_geometric_mixture(policy, other, greedy_mix):
  ids, mask = left_pad(PROMPTS)
  gen = greedy_mix(policy[1], ids, mask, jax.random.key(0), None, other[1], mix_alpha=0.5)
  rows = [_completion_rows(prompt, gen.tokens_BxN[i]) for i, prompt in enumerate(PROMPTS)]
  all_theta = _full_log_softmax(*policy, [seq for seq, _ in rows])
  all_ref = _full_log_softmax(*other, [seq for seq, _ in rows])
  differs = False
  for row, (seq, pos) in enumerate(rows):
    lp_theta, lp_ref = all_theta[row, pos], all_ref[row, pos]
    mix = 0.5 * lp_theta + 0.5 * lp_ref
    toks = np.asarray(gen.tokens_BxN[row])
    np.testing.assert_array_equal(toks, mix.argmax(-1))
    differs |= bool((toks != lp_theta.argmax(-1)).any() or (toks != lp_ref.argmax(-1)).any())
    mix_lsm = mix - np.log(np.exp(mix).sum(-1, keepdims=True))
    np.testing.assert_allclose(gen.mix_logps_BxN[row], mix_lsm[np.arange(N), toks], atol=1e-5)
    np.testing.assert_allclose(gen.logps_BxN[row], lp_theta[np.arange(N), toks], atol=1e-5)
  assert differs  # the mixture is neither model's greedy choice somewhere


def _nucleus(logps_V, p):
  order = np.argsort(-logps_V, kind="stable")
  probs = np.exp(logps_V[order])
  before = np.cumsum(probs) - probs
  return set(order[before < p].tolist())


def test_nlpo_samples_stay_in_masking_policy_nucleus(policy, other):
  p = 0.3
  prompts = [[1, 2, 3], [7, 8], [4]] * 4
  ids, mask = left_pad(prompts)
  gen = make_generate_fn(policy[0], max_new_tokens=N, processor=processors.temperature(3.0),
                         mask_graphdef=other[0], nlpo_top_p=p)(policy[1], ids, mask, jax.random.key(7), None, None,
                                                               other[1])
  rows = [_completion_rows(prompt, gen.tokens_BxN[i]) for i, prompt in enumerate(prompts)]
  all_mask = _full_log_softmax(*other, [seq for seq, _ in rows])
  all_theta = _full_log_softmax(*policy, [seq for seq, _ in rows])
  sizes, outside_policy_nucleus = [], 0
  for row, (seq, pos) in enumerate(rows):
    lp_mask, lp_theta = all_mask[row, pos], all_theta[row, pos]
    for t, tok in enumerate(np.asarray(gen.tokens_BxN[row])):
      allowed = _nucleus(lp_mask[t], p)
      sizes.append(len(allowed))
      assert int(tok) in allowed, (row, t)
      outside_policy_nucleus += int(tok) not in _nucleus(lp_theta[t], p)
    np.testing.assert_allclose(gen.logps_BxN[row], lp_theta[np.arange(N), np.asarray(gen.tokens_BxN[row])], atol=1e-5)
  assert 1 < np.mean(sizes) < CFG.vocab_size / 2  # the mask is neither trivial nor everything
  assert outside_policy_nucleus > 0  # the masking model, not the policy, decides


def test_mask_tokens_processor_never_samples_disallowed(policy):
  allowed_V = np.zeros(CFG.vocab_size, bool)
  allowed_V[[3, 17, 42, 200]] = True
  ids, mask = left_pad([[1, 2, 3], [9]] * 8)
  proc = processors.chain(processors.mask_tokens(allowed_V), processors.temperature(2.0))
  gen = make_generate_fn(policy[0], max_new_tokens=N, processor=proc)(policy[1], ids, mask, jax.random.key(1))
  toks = np.asarray(gen.tokens_BxN)
  assert set(toks.ravel().tolist()) <= {3, 17, 42, 200} and len(set(toks.ravel().tolist())) > 1
  # Per-row sets.
  allowed_BxV = np.zeros((2, 8), bool)
  allowed_BxV[0, [1, 2]] = allowed_BxV[1, [6]] = True
  draws = jax.random.categorical(jax.random.key(0), processors.mask_tokens(allowed_BxV)(jnp.zeros((2, 8))),
                                 shape=(500, 2))
  assert set(np.asarray(draws[:, 0]).tolist()) == {1, 2} and set(np.asarray(draws[:, 1]).tolist()) == {6}


def test_nlpo_top_p_mask_and_errors(policy, other):
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
  allowed = processors.nlpo_top_p_mask(logits, 0.7)
  assert np.asarray(allowed).tolist() == [[True, True, False, False], [False, False, True, True]]
  allowed = processors.nlpo_top_p_mask(logits, 0.1, always_allowed_ids=3)
  assert np.asarray(allowed).tolist() == [[True, False, False, True], [False, False, False, True]]
  with pytest.raises(ValueError, match="no allowed token"):
    processors.mask_tokens(np.array([[True, False], [False, False]]))
  with pytest.raises(ValueError, match=r"\[V\] or \[B, V\]"):
    processors.mask_tokens(np.ones((1, 2, 3), bool))
  with pytest.raises(ValueError, match="mix_alpha must be in"):
    make_generate_fn(policy[0], max_new_tokens=2, mix_graphdef=other[0], mix_alpha=1.5)
  with pytest.raises(ValueError, match="nlpo_top_p"):
    make_generate_fn(policy[0], max_new_tokens=2, mask_graphdef=other[0], nlpo_top_p=0.0)
  ids, mask = left_pad([[1, 2]])
  plain = make_generate_fn(policy[0], max_new_tokens=2)
  with pytest.raises(ValueError, match="built without mix_graphdef"):
    plain(policy[1], ids, mask, jax.random.key(0), None, other[1])
  with pytest.raises(ValueError, match="pass mask_params"):
    make_generate_fn(policy[0], max_new_tokens=2, mask_graphdef=other[0])(policy[1], ids, mask, jax.random.key(0))


def test_apply_mask_shared_and_per_row():
  logits = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], jnp.bfloat16)
  shared = processors.apply_mask(logits, jnp.asarray([True, False, True]))
  assert shared.dtype == jnp.float32
  np.testing.assert_array_equal(shared, [[1.0, -np.inf, 3.0], [4.0, -np.inf, 6.0]])
  rows = processors.apply_mask(logits, jnp.asarray([[False, True, True], [True, True, False]]))
  np.testing.assert_array_equal(rows, [[-np.inf, 2.0, 3.0], [4.0, 5.0, -np.inf]])
