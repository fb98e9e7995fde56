"""ModelConfig.scan_layers: lax.scan over the blocks equals the layer loop; one compile; no double compile."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import models, parallel
from rlhf_jax.models import init_cache, lora
from rlhf_jax.models.pretrained import materialize
from rlhf_jax.train import sft, step as step_lib

CFG = models.get_config("tiny")
IDS = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9)))
MASK = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])  # left padding on row 0


def _pair(cfg=CFG, **scan_overrides):
  """The same weights as a loop model and a scanned model."""
  loop = models.create_model(cfg, seed=0)
  scan = models.create_model(cfg.replace(scan_layers=True, **scan_overrides), seed=0)
  nnx.update(scan, nnx.state(loop))
  return loop, scan


def test_forward_and_gradients_equal_the_loop():
  loop, scan = _pair()
  assert scan._shared_block_graphdef() is not None  # the scan path is really taken
  forward = nnx.jit(lambda m: m(IDS, attention_mask_BxT=MASK))
  np.testing.assert_allclose(forward(scan), forward(loop), atol=2e-5)

  def grads(model):
    g, p = nnx.split(model)
    return jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(g, p)(IDS, attention_mask_BxT=MASK) ** 2)))(p)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads(loop), grads(scan))


@pytest.mark.parametrize("policy", ["full", "dots_no_batch"])
def test_remat_inside_the_scan(policy):
  loop, scan = _pair(remat=policy)

  def grads(model):
    g, p = nnx.split(model)
    return jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(g, p)(IDS) ** 2)))(p)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads(loop), grads(scan))


def test_kv_cache_prefill_and_decode_equal_the_loop():
  loop, scan = _pair()
  outs = []
  for model in (loop, scan):
    cache = init_cache(model.config, 2, 12)
    logits, cache = model(IDS, attention_mask_BxT=MASK, cache=cache)
    step_logits, cache = model(IDS[:, :1], attention_mask_BxT=jnp.ones((2, 1), jnp.int32), cache=cache)
    outs.append((logits, step_logits, cache.k, cache.v))
  for a, b in zip(*outs):
    np.testing.assert_allclose(a, b, atol=2e-5)
  # Decoding with the cache equals the full forward of the longer sequence.
  full = scan(jnp.concatenate([IDS, IDS[:, :1]], 1), attention_mask_BxT=jnp.concatenate([MASK, jnp.ones((2, 1), int)], 1))
  np.testing.assert_allclose(outs[1][1][:, 0], full[:, -1], atol=2e-5)


def test_lora_dropout_masks_match_the_loop_and_partial_lora_falls_back():
  loop, scan = _pair()
  batch = {"input_ids_BxT": np.asarray(IDS), "targets_BxT": np.asarray(IDS),
           "loss_mask_BxT": np.ones(IDS.shape, np.float32)}

  def updated(base):
    model = lora.apply_lora(base, targets="all", rank=4, dropout=0.5, rngs=nnx.Rngs(1))
    assert model._shared_block_graphdef() is not None  # one structure per block: the scan path is taken
    tx = optax.sgd(1.0)
    graphdef, state, _ = lora.create_lora_train_state(model, tx)
    step = step_lib.make_train_step(lora.lora_loss(sft.make_sft_loss()), tx, graphdef, donate=False)
    return jax.device_get(step(state, batch, jax.random.PRNGKey(3))[0].params)

  # Dropout keys fold in the block index, so both paths draw the same masks per layer.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), updated(loop), updated(scan))
  # Adapters on one layer only: blocks differ in structure; the loop runs, same numbers.
  some = lora.apply_lora(scan, targets="layers.0.*", rank=4, rngs=nnx.Rngs(1))
  assert some._shared_block_graphdef() is None
  np.testing.assert_allclose(some(IDS), loop(IDS), atol=2e-5)


def test_sharded_scan_equals_unsharded():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  cfg = CFG.replace(scan_layers=True)
  sharded = models.create_sharded_model(cfg, mesh, seed=0)
  single = models.create_model(cfg, seed=0)
  nnx.update(single, jax.device_get(nnx.state(sharded)))
  with jax.set_mesh(mesh):
    got = jax.jit(lambda m, x: m(x, attention_mask_BxT=MASK))(sharded, IDS)
  np.testing.assert_allclose(got, single(IDS, attention_mask_BxT=MASK), atol=2e-5)


def test_scan_compiles_one_block():
  """The compiled program holds one block body, whatever the depth: its size does not grow with layers."""
  sizes = {}
  for layers in (2, 6):
    model = models.create_model(CFG.replace(num_layers=layers, scan_layers=True), seed=0)
    g, p = nnx.split(model)
    text = jax.jit(lambda p: nnx.merge(g, p)(IDS)).lower(p).as_text()
    sizes[layers] = text.count("dot_general")
  assert sizes[2] == sizes[6]


def test_a_loaded_lora_model_compiles_its_step_once():
  """Frozen base tensors arrive committed (loaded onto a mesh) and adapters fresh: the state
  from create_train_state is committed throughout, so step 1 and step 2 share one compile."""
  base = models.create_model(CFG, seed=0)
  loaded = materialize(CFG, [(tuple(k), np.asarray(v)) for k, v in nnx.to_flat_state(nnx.state(base))])
  model = lora.apply_lora(loaded, rank=4, rngs=nnx.Rngs(1))
  tx = optax.adam(1e-3)
  graphdef, state, _ = lora.create_lora_train_state(model, tx)
  step = step_lib.make_train_step(lora.lora_loss(sft.make_sft_loss()), tx, graphdef, donate=False)
  batch = {"input_ids_BxT": np.asarray(IDS), "targets_BxT": np.asarray(IDS),
           "loss_mask_BxT": np.ones(IDS.shape, np.float32)}
  for _ in range(3):
    state, _ = step(state, batch)
  assert step._cache_size() == 1


def test_scan_layers_must_be_a_bool_and_from_pretrained_rejects_unknown_options(tmp_path):
  with pytest.raises(ValueError, match="scan_layers"):
    CFG.replace(scan_layers="yes")
  with pytest.raises(TypeError, match="num_layers"):
    models.from_pretrained(str(tmp_path), num_layers=2)
