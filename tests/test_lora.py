"""LoRA: exact at init, only adapters train, merge, dropout, sharded == unsharded, Orbax, frozen base as DPO reference."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import data, models, parallel
from rlhf_jax.checkpoint import Checkpointer, abstract_like
from rlhf_jax.data import preference as pref_data
from rlhf_jax.models import lora
from rlhf_jax.train import preference, sft, step as step_lib

CFG = models.get_config("tiny")
IDS = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)))


def _sft_batches(n, batch_size=8, seed=0):
  it = data.synthetic_sft_iterator("sorting", batch_size=batch_size, seq_len=24, seed=seed, min_len=3, max_len=8)
  return [next(it) for _ in range(n)]


def _np(tree):
  """Host copies; ``nnx.State`` leaves become plain arrays (nested dicts)."""
  tree = jax.tree.map(lambda x: x.to_pure_dict() if isinstance(x, nnx.State) else x, tree,
                      is_leaf=lambda x: isinstance(x, nnx.State))
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _lora_model(base, targets="all", rank=4, alpha=8.0, dropout=0.0):
  return lora.apply_lora(base, targets=targets, rank=rank, alpha=alpha, dropout=dropout, rngs=nnx.Rngs(1))


def _train(model, batches, *, mesh=None, lr=1e-2, loss=None):
  tx = optax.adam(lr)
  graphdef, state, sh = lora.create_lora_train_state(model, tx, mesh=mesh)
  step = step_lib.make_train_step(loss or lora.lora_loss(sft.make_sft_loss()), tx, graphdef,
                                  mesh=mesh, state_shardings=sh)
  metrics = []
  for b in batches:
    state, m = step(state, b if mesh is None else parallel.host_local_to_global(b, mesh))
    metrics.append(jax.device_get(m))
  return graphdef, state, metrics, sh


def test_zero_b_is_exactly_the_base_and_adapters_have_axes():
  base = models.create_model(CFG, seed=0)
  model = _lora_model(base)
  np.testing.assert_array_equal(np.asarray(model(IDS)), np.asarray(base(IDS)))
  assert not lora.adapters(base)  # apply_lora returns a copy
  paths = [p for p, *_ in lora.adapters(model)]
  assert len(paths) == 7 * CFG.num_layers and "layers.0.attn.wo" in paths
  ad = model.layers[0].attn.wo_lora
  assert ad.a.shape == (CFG.num_heads, CFG.head_dim, 4) and ad.a.axes == ("heads", "head_dim", None)
  assert ad.b.shape == (4, CFG.hidden_size) and ad.b.axes == (None, "embed")
  assert not np.any(np.asarray(ad.b.get_value())) and np.any(np.asarray(ad.a.get_value()))
  assert ad.scale == 2.0
  # Target selection by name, glob or dotted path.
  only = [p for p, *_ in lora.adapters(_lora_model(base, targets=("wq", "w_*")))]
  assert {p.split(".")[-1] for p in only} == {"wq", "w_gate", "w_up", "w_down"}
  only = [p for p, *_ in lora.adapters(_lora_model(base, targets="layers.0.attn.*"))]
  assert only == ["layers.0.attn.wq", "layers.0.attn.wk", "layers.0.attn.wv", "layers.0.attn.wo"]
  with pytest.raises(ValueError, match="no kernel matches"):
    _lora_model(base, targets=("nope",))


def test_only_adapters_train_and_merge_equals_lora_model():
  base = models.create_model(CFG, seed=0)
  base_state = _np(nnx.state(base))
  base_logits = np.asarray(base(IDS))
  model = _lora_model(base, targets=("wq", "wv", "w_down"))
  init = _np(lora.lora_state(model))
  graphdef, state, metrics, _ = _train(model, _sft_batches(1) * 12)
  losses = [float(m["loss"]) for m in metrics]
  assert losses[-1] < 0.8 * losses[0], losses

  # Base params bit-identical, adapters moved.
  frozen = _np(state.extras["frozen_params"])
  assert jax.tree.structure(frozen) == jax.tree.structure(base_state)
  jax.tree.map(np.testing.assert_array_equal, frozen, base_state)
  trained = _np(state.params)  # (the step donates the state: model's and base's arrays are gone)
  assert jax.tree.structure(trained) == jax.tree.structure(init)
  assert np.any(trained["layers"][0]["attn"]["wq_lora"]["b"] != 0)
  assert not np.array_equal(trained["layers"][0]["attn"]["wq_lora"]["a"], init["layers"][0]["attn"]["wq_lora"]["a"])

  # The optimizer state holds only adapter-shaped leaves.
  adapter_shapes = {x.shape for x in jax.tree.leaves(init)}
  opt_shapes = {x.shape for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0}
  assert opt_shapes <= adapter_shapes and opt_shapes
  n_opt = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
  assert n_opt <= 2 * sum(x.size for x in jax.tree.leaves(init)) + 10

  trained_model = nnx.merge(graphdef, state.params, state.extras["frozen_params"])
  merged = lora.merge_lora(trained_model)
  assert not lora.adapters(merged) and isinstance(merged, models.Transformer)
  assert nnx.graphdef(merged) == nnx.graphdef(base)
  np.testing.assert_allclose(np.asarray(merged(IDS)), np.asarray(trained_model(IDS)), atol=1e-5, rtol=1e-5)
  assert not np.allclose(np.asarray(merged(IDS)), base_logits, atol=1e-3)
  # Dropping the adapters gives the base back.
  ref_graphdef, ref_params = lora.reference_from_lora(trained_model)
  np.testing.assert_array_equal(np.asarray(nnx.merge(ref_graphdef, ref_params)(IDS)), base_logits)


def test_dropout():
  base = models.create_model(CFG, seed=0)
  batch = _sft_batches(1)[0]

  def updated_params(model, rngs):
    tx = optax.sgd(1.0)
    graphdef, state, _ = lora.create_lora_train_state(model, tx)
    step = step_lib.make_train_step(lora.lora_loss(sft.make_sft_loss()), tx, graphdef, donate=False)
    return [_np(step(state, batch, jax.random.PRNGKey(r))[0].params) for r in rngs]

  b = lambda p: p["layers"][0]["attn"]["wq_lora"]["b"]
  # dropout=0: deterministic whatever the rng.
  p1, p2 = updated_params(_lora_model(base, dropout=0.0), [0, 1])
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  # dropout>0: the rng matters in training, reproducibly; outside training the adapters are deterministic.
  drop = _lora_model(base, dropout=0.5)
  np.testing.assert_array_equal(np.asarray(drop(IDS)), np.asarray(base(IDS)))  # eval forward, B = 0: the base
  q1, q1b, q2 = updated_params(drop, [0, 0, 1])
  jax.tree.map(np.testing.assert_array_equal, q1, q1b)
  assert not np.allclose(b(q1), b(q2))
  assert not np.allclose(b(q1), b(p1))


def test_sharded_lora_step_equals_unsharded():
  batches = _sft_batches(3)
  one_mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  _, one, m1, _ = _train(_lora_model(models.create_sharded_model(CFG, one_mesh, seed=0)), batches, mesh=one_mesh, lr=1e-3)
  _, eight, m8, sh = _train(_lora_model(models.create_sharded_model(CFG, mesh, seed=0)), batches, mesh=mesh, lr=1e-3)
  a = eight.params["layers"][0]["attn"]["wq_lora"]["a"].get_value()
  b = eight.params["layers"][0]["attn"]["wq_lora"]["b"].get_value()
  assert a.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert b.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)
  wq = eight.extras["frozen_params"]["layers"][0]["attn"]["wq"].get_value()
  assert wq.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5), _np(one.params), _np(eight.params))
  np.testing.assert_allclose([m["loss"] for m in m1], [m["loss"] for m in m8], rtol=1e-5)


def test_orbax_round_trip_of_lora_state(tmp_path):
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = _lora_model(models.create_sharded_model(CFG, mesh, seed=0), targets=("wq", "wv"))
  _, state, _ = lora.create_lora_train_state(model, optax.adam(1e-3), mesh=mesh)
  state = state._replace(params=jax.tree.map(lambda x: x + 1.0, state.params))  # non-zero B
  ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(int(state.step), state)
  ckpt.wait()
  # Only adapters, their optimizer state and the scalars are written, not the frozen base.
  saved = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "ckpt") for f in fs)
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(state.extras["frozen_params"]))
  adapter_bytes = 3 * sum(x.nbytes for x in jax.tree.leaves(state.params))  # params + Adam's two moments
  assert saved < base_bytes / 4 and saved > adapter_bytes / 2, (saved, base_bytes, adapter_bytes)
  with pytest.raises(ValueError, match="frozen_params.*like="):
    ckpt.restore(abstract_like(state))
  fresh = lora.create_lora_train_state(model, optax.adam(1e-3), mesh=mesh)[1]  # base re-loaded, new adapters
  restored, _ = ckpt.restore(abstract_like(state), like=fresh)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, _np(restored), _np(state))
  a = restored.params["layers"][0]["attn"]["wq_lora"]["a"].get_value()
  assert a.sharding == state.params["layers"][0]["attn"]["wq_lora"]["a"].get_value().sharding


def test_dpo_with_frozen_base_as_reference():
  pairs = pref_data.SortingPreferences(8, seed=0, seq_len=20)
  batch = {k: v for k, v in pref_data.collate([pairs[i] for i in range(8)]).items() if k != "index_B"}
  model = _lora_model(models.create_model(CFG, seed=3), rank=8, alpha=16.0)
  loss = lora.lora_loss(preference.make_preference_loss(beta=0.5, ref_graphdef=lora.base_graphdef(model)),
                        base_as_reference=True)
  _, state, metrics, _ = _train(model, [batch] * 10, lr=3e-3, loss=loss)
  first, last = metrics[0], metrics[-1]
  assert float(first["rewards/margins"]) == 0.0 and float(first["rewards/chosen"]) == 0.0
  assert float(first["loss"]) == pytest.approx(np.log(2.0), abs=1e-6)
  assert float(last["rewards/margins"]) > float(first["rewards/margins"]) and float(last["loss"]) < float(first["loss"])
  assert "ref_params" not in state.extras  # the reference is the frozen base, not a second copy
