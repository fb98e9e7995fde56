"""``with_scalar_head``: a reward/value head on an existing (e.g. pre-trained) model, with and without LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import models
from rlhf_jax.models import lora
from rlhf_jax.parallel import make_mesh, mesh as mesh_lib

IDS = jnp.asarray([[5, 17, 3, 42, 7, 11], [1, 30, 8, 8, 21, 4]])


def _flat(model, filt=nnx.Param):
  return {k: v.get_value() for k, v in nnx.to_flat_state(nnx.state(model, filt))}


@pytest.fixture(scope="module")
def base():
  return models.create_model(models.get_config("tiny"), seed=0)


def test_head_is_added_and_the_lm_is_unchanged(base):
  model = models.with_scalar_head(base, 3, seed=7)
  assert model.config == base.config.replace(scalar_head_outputs=3)
  assert model.layers[0].attn.config == model.config
  assert not base.config.scalar_head_outputs and not hasattr(base, "scalar_head")  # the input is untouched
  np.testing.assert_array_equal(np.asarray(model(IDS)), np.asarray(base(IDS)))
  h, _ = model.hidden_states(IDS)
  out = model.scalar(h)
  assert out.shape == (2, 6, 3) and out.dtype == jnp.float32

  # Every base parameter is the same array (shared, so sharded alike).
  old, new = _flat(base), _flat(model)
  assert set(new) - set(old) == {("scalar_head",), ("scalar_bias",)}
  for k in old:
    assert new[k] is old[k], k

  # Exactly the head create_model draws, and the same structure.
  ref = models.create_model(base.config.replace(scalar_head_outputs=3), seed=7)
  assert nnx.graphdef(model) == nnx.graphdef(ref)
  np.testing.assert_array_equal(np.asarray(model.scalar_head.get_value()), np.asarray(ref.scalar_head.get_value()))
  np.testing.assert_array_equal(np.asarray(model.scalar_bias.get_value()), np.zeros(3, np.float32))
  assert model.scalar_head.get_metadata()["axes"] == ("embed", "scalar_out")


def test_errors(base):
  with pytest.raises(ValueError, match="num_outputs"):
    models.with_scalar_head(base, 0)
  with pytest.raises(ValueError, match="already has a scalar head"):
    models.with_scalar_head(models.with_scalar_head(base, 1), 1)


def test_sharded_model_keeps_its_shardings():
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  cfg = models.get_config("tiny")
  base = models.create_sharded_model(cfg, mesh, seed=0)
  model = models.with_scalar_head(base, 1)  # the mesh is taken from the model
  head = model.scalar_head.get_value()
  assert head.sharding.mesh == mesh
  assert head.sharding == mesh_lib.state_shardings(nnx.state(model), mesh)["scalar_head"].get_value()
  for k, v in _flat(base).items():
    assert _flat(model)[k].sharding == v.sharding, k
  np.testing.assert_allclose(np.asarray(model(IDS)), np.asarray(base(IDS)), atol=1e-6)
  unsharded = models.with_scalar_head(models.create_model(cfg, seed=0), 1)
  np.testing.assert_array_equal(np.asarray(head), np.asarray(unsharded.scalar_head.get_value()))

  # A LoRA reward model on the mesh: the head is trained and sharded like the rest.
  rm = lora.apply_lora(model, targets="all", rank=2, rngs=nnx.Rngs(1))
  _, state, sh = lora.create_lora_train_state(rm, optax.adam(1e-3), mesh=mesh)
  assert ("scalar_head",) in dict(nnx.to_flat_state(state.params))
  assert ("scalar_head",) in dict(nnx.to_flat_state(sh.params))


def test_lora_skips_the_head_and_trains_it(base):
  model = lora.apply_lora(models.with_scalar_head(base, 1), targets="*", rank=2, rngs=nnx.Rngs(1))
  assert not any("scalar" in path for path, *_ in lora.adapters(model))
  assert len(lora.adapters(model)) == 7 * model.config.num_layers

  tx = optax.adam(1e-2)
  graphdef, state, _ = lora.create_lora_train_state(model, tx)
  params = dict(nnx.to_flat_state(state.params))
  frozen = dict(nnx.to_flat_state(state.extras["frozen_params"]))
  assert ("scalar_head",) in params and ("scalar_bias",) in params
  assert ("scalar_head",) not in frozen and ("embed",) in frozen
  assert all(isinstance(v, lora.LoRA) for k, v in params.items() if k[0] != "scalar_head" and k[0] != "scalar_bias")
  assert not any(isinstance(v, lora.LoRA) for v in frozen.values())
  assert len(params) == 2 + 2 * len(lora.adapters(model))

  # The head gets gradients: one step of a reward-style loss moves it, the base stays.
  def loss(params):
    m = nnx.merge(graphdef, params, state.extras["frozen_params"])
    h, _ = m.hidden_states(IDS)
    return jnp.mean((m.scalar(h)[:, -1, 0] - jnp.asarray([1.0, -1.0])) ** 2)

  grads = jax.grad(loss)(state.params)
  g = dict(nnx.to_flat_state(grads))
  assert float(jnp.abs(g[("scalar_head",)].get_value()).sum()) > 0
  assert float(jnp.abs(g[("scalar_bias",)].get_value()).sum()) > 0

  # train_head=False: the old behaviour (adapters only).
  _, state2, _ = lora.create_lora_train_state(model, tx, train_head=False)
  assert ("scalar_head",) in dict(nnx.to_flat_state(state2.extras["frozen_params"]))
  assert all(isinstance(v, lora.LoRA) for v in dict(nnx.to_flat_state(state2.params)).values())

  # A policy (no head) is unaffected by train_head.
  policy = lora.apply_lora(base, targets="all", rank=2, rngs=nnx.Rngs(1))
  _, state3, _ = lora.create_lora_train_state(policy, tx)
  assert all(isinstance(v, lora.LoRA) for v in dict(nnx.to_flat_state(state3.params)).values())


def test_head_on_a_hf_checkpoint_with_the_byte_tokenizer(tmp_path):
  """A random named config with the byte-level tokenizer, exported and re-loaded, then given a head."""
  tok = models.Tokenizer.byte_level()
  lm = models.create_model(models.get_config("tiny").replace(vocab_size=tok.vocab_size), seed=0)
  models.export_hf(lm, tok, str(tmp_path))
  loaded, tok2 = models.from_pretrained(str(tmp_path))
  assert tok2.encode("héllo<|im_end|>") == tok.encode("héllo<|im_end|>")
  rm = models.with_scalar_head(loaded, 1)
  ids = jnp.asarray([tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))])
  np.testing.assert_allclose(np.asarray(rm(ids)), np.asarray(lm(ids)), atol=1e-6)
  h, _ = rm.hidden_states(ids)
  assert rm.scalar(h).shape == (1, ids.shape[1], 1)
