"""Transformer: shapes, KV cache == full forward, padding invariance, remat, named configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import models
from rlhf_jax.models import init_cache, positions_from_mask, rope_frequencies


def _ids(key, b, t, v):
  return jax.random.randint(jax.random.key(key), (b, t), 0, v)


@pytest.fixture(scope="module")
def tiny():
  return models.create_model(models.get_config("tiny"), seed=0)


def test_shapes_and_dtypes(tiny):
  c = tiny.config
  ids = _ids(0, 3, 7, c.vocab_size)
  logits = tiny(ids)
  assert logits.shape == (3, 7, c.vocab_size) and logits.dtype == jnp.float32
  h, cache = tiny.hidden_states(ids)
  assert h.shape == (3, 7, c.hidden_size) and cache is None
  assert tiny.unembed_matrix().shape == (c.hidden_size, c.vocab_size)


@pytest.mark.parametrize("tie,bias", [(False, False), (True, True)])
def test_kv_cache_decode_equals_full_forward(tie, bias):
  c = models.get_config("tiny", tie_embeddings=tie, qkv_bias=bias)
  m = models.create_model(c, seed=1)
  ids = _ids(1, 2, 12, c.vocab_size)
  full = m(ids)
  cache = init_cache(c, 2, 16)
  logits, cache = m(ids[:, :5], cache=cache)
  outs = [logits]
  for t in range(5, 12):
    step_logits, cache = m(ids[:, t:t + 1], cache=cache)
    outs.append(step_logits)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5)
  assert int(cache.index) == 12
  np.testing.assert_array_equal(cache.next_position, [12, 12])


def test_left_padding_does_not_change_real_token_logits(tiny):
  c = tiny.config
  ids = _ids(2, 2, 6, c.vocab_size)
  ref = tiny(ids)
  pad = 3
  padded = jnp.concatenate([jnp.zeros((2, pad), ids.dtype), ids], axis=1)
  mask = jnp.concatenate([jnp.zeros((2, pad), jnp.int32), jnp.ones((2, 6), jnp.int32)], axis=1)
  out = tiny(padded, attention_mask_BxT=mask)
  np.testing.assert_allclose(out[:, pad:], ref, atol=1e-5)


def test_left_padded_prefill_then_decode_matches_unpadded(tiny):
  """Rows of different prompt lengths, left-padded, decode like unpadded rows."""
  c = tiny.config
  long = _ids(3, 1, 8, c.vocab_size)
  short = _ids(4, 1, 5, c.vocab_size)
  cont = _ids(5, 2, 3, c.vocab_size)
  prompts = jnp.concatenate([long, jnp.concatenate([jnp.zeros((1, 3), short.dtype), short], 1)], 0)
  mask = jnp.array([[1] * 8, [0] * 3 + [1] * 5], jnp.int32)
  cache = init_cache(c, 2, 12)
  _, cache = tiny(prompts, attention_mask_BxT=mask, cache=cache)
  steps = []
  for t in range(3):
    lg, cache = tiny(cont[:, t:t + 1], cache=cache)
    steps.append(lg)
  got = jnp.concatenate(steps, 1)
  for row, prompt in enumerate([long, short]):
    ref = tiny(jnp.concatenate([prompt, cont[row:row + 1]], 1))[:, -3:]
    np.testing.assert_allclose(got[row:row + 1], ref, atol=1e-5)


def test_positions_from_mask():
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
  np.testing.assert_array_equal(positions_from_mask(mask, jnp.array([4, 0]))[:, -1], [6, 4])


def test_rope_llama3_scaling_matches_reference_formula():
  c = models.get_config("llama3.1-8b")
  got = np.asarray(rope_frequencies(c))
  h, theta = c.head_dim, c.rope_theta
  s = c.rope_scaling
  ref = []
  for f in 1.0 / theta ** (np.arange(0, h, 2) / h):
    wl = 2 * np.pi / f
    if wl < s["original_max_position_embeddings"] / s["high_freq_factor"]:
      ref.append(f)
    elif wl > s["original_max_position_embeddings"] / s["low_freq_factor"]:
      ref.append(f / s["factor"])
    else:
      sm = (s["original_max_position_embeddings"] / wl - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
      ref.append((1 - sm) * f / s["factor"] + sm * f)
  np.testing.assert_allclose(got, np.array(ref), rtol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_gives_identical_gradients(policy):
  c = models.get_config("tiny")
  ids = _ids(6, 2, 8, c.vocab_size)

  def grads(cfg):
    m = models.create_model(cfg, seed=3)
    g, params = nnx.split(m)
    loss = lambda p: jnp.mean(nnx.merge(g, p)(ids) ** 2)
    return jax.grad(loss)(params)

  ref = grads(c)
  got = grads(c.replace(remat=policy))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), ref, got)


def test_bf16_compute_close_to_fp32():
  c = models.get_config("tiny")
  ids = _ids(7, 2, 8, c.vocab_size)
  f32 = models.create_model(c, seed=0)(ids)
  bf16 = models.create_model(c.replace(dtype="bfloat16"), seed=0)(ids)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, f32, atol=0.1)
  m = models.create_model(c.replace(param_dtype="bfloat16"), seed=0)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(m)))


def test_every_parameter_has_logical_axes():
  m = models.create_model(models.get_config("tiny", scalar_head_outputs=2, qkv_bias=True))
  for path, var in nnx.to_flat_state(nnx.state(m)):
    axes = var.get_metadata().get("axes")
    assert axes is not None and len(axes) == var.get_value().ndim, path


def test_scalar_head():
  c = models.get_config("tiny", scalar_head_outputs=3)
  m = models.create_model(c)
  h, _ = m.hidden_states(_ids(8, 2, 5, c.vocab_size))
  assert m.scalar(h).shape == (2, 5, 3)
  with pytest.raises(ValueError, match="scalar_head_outputs"):
    models.create_model(models.get_config("tiny")).scalar(h)


@pytest.mark.parametrize(
    "name,expected",
    [("smollm2-135m", 134.5e6), ("tinyllama-1.1b", 1.100e9), ("qwen2.5-0.5b", 494.0e6),
     ("qwen2.5-7b", 7.616e9), ("llama3-8b", 8.030e9)],
)
def test_named_config_parameter_counts_match_model_cards(name, expected):
  c = models.get_config(name)
  assert abs(c.num_params() - expected) / expected < 0.01
  # The formula agrees with the module actually built (abstractly, no memory).
  abstract = models.init.abstract_model(c)
  counted = sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract)))
  assert counted == c.num_params()


def test_config_errors_name_field_and_choices():
  with pytest.raises(ValueError, match="remat.*valid choices"):
    models.get_config("tiny", remat="sometimes")
  with pytest.raises(ValueError, match="unknown model config 'gpt5'.*tiny"):
    models.get_config("gpt5")
  with pytest.raises(ValueError, match="unknown ModelConfig fields.*hidden"):
    models.get_config("tiny", hiden_size=3)
  with pytest.raises(ValueError, match="num_kv_heads"):
    models.get_config("tiny", num_kv_heads=3)


def test_config_from_section_names_the_config_and_overrides_fields():
  section = {"name": "tiny", "num_layers": 3, "remat": "full"}
  c = models.config_from_section(section, scalar_head_outputs=1)
  assert c == models.get_config("tiny").replace(num_layers=3, remat="full", scalar_head_outputs=1)
  with pytest.raises(ValueError, match="no_such_field"):
    models.config_from_section({"name": "tiny", "no_such_field": 1})
