"""Orbax checkpoints: exact round trip, keep-N, restore onto a different mesh."""

import jax
import numpy as np

from rlhf_jax import models, parallel
from rlhf_jax.checkpoint import Checkpointer, abstract_like
from rlhf_jax.train import optim, state as state_lib


def _state(mesh):
  tx, _ = optim.make_optimizer({"learning_rate": 1e-3}, total_steps=10)
  _, state, shardings = state_lib.create_train_state(models.create_sharded_model(models.get_config("tiny"), mesh, seed=3), tx, mesh=mesh, seed=5)
  return tx, state, shardings


def test_restore_onto_another_mesh_is_exact(tmp_path):
  mesh_a = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  tx, state, _ = _state(mesh_a)
  ck = Checkpointer(str(tmp_path), max_to_keep=2)
  ck.save(7, state, {"index": 7})
  ck.wait()
  mesh_b = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  shardings_b = state_lib.train_state_shardings(state.params, tx, mesh_b)
  restored, data = ck.restore(abstract_like(state, shardings_b))
  ck.close()
  assert data == {"index": 7}
  wq = restored.params["layers"][1]["attn"]["wq"].get_value()
  assert wq.sharding.mesh.shape == mesh_b.shape and wq.sharding.spec[0] == "fsdp"
  assert wq.addressable_shards[0].data.shape == (16, 2, 16)  # D=64 / 4 fsdp, N=4 / 2 tensor
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keep_n_and_latest(tmp_path):
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  _, state, _ = _state(mesh)
  ck = Checkpointer(str(tmp_path), max_to_keep=2, async_save=False)
  for s in (1, 2, 3):
    ck.save(s, state, {"index": s})
  ck.wait()
  assert ck.all_steps() == [2, 3] and ck.latest_step() == 3
  ck.close()


def test_context_manager_finishes_an_async_save_on_exit(tmp_path):
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  _, state, _ = _state(mesh)
  with Checkpointer(str(tmp_path), max_to_keep=2, async_save=True) as ck:
    ck.save(4, state, {"index": 4})  # no wait(): leaving the block finishes and closes
  with Checkpointer(str(tmp_path), max_to_keep=2) as again:
    restored, data = again.restore(abstract_like(state, None))
  assert data == {"index": 4}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
