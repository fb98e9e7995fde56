"""Step factory: sharded == unsharded, exact gradient accumulation, non-finite guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import data, models, parallel
from rlhf_jax.train import optim, sft, state as state_lib, step as step_lib

CFG = models.get_config("tiny")


def _batches(n, batch_size=8, seed=0):
  it = data.synthetic_sft_iterator("sorting", batch_size=batch_size, seq_len=24, seed=seed, min_len=3, max_len=8)
  return [next(it) for _ in range(n)]


def _run(mesh_shape, batches, *, num_microbatches=1, devices=None):
  devices = jax.devices()[: int(np.prod(list(mesh_shape.values())))] if devices is None else devices
  mesh = parallel.make_mesh(mesh_shape, devices=devices)
  # eps keeps Adam from normalising reduction-order noise of near-zero gradients up to lr scale.
  tx, sched = optim.make_optimizer(
      {"learning_rate": 1e-3, "eps": 1e-6, "max_grad_norm": 1.0, "weight_decay": 0.1}, total_steps=10
  )
  model = models.create_sharded_model(CFG, mesh, seed=0)
  graphdef, state, shardings = state_lib.create_train_state(model, tx, mesh=mesh)
  step = step_lib.make_train_step(
      sft.make_sft_loss(), tx, graphdef, num_microbatches=num_microbatches, mesh=mesh,
      state_shardings=shardings, learning_rate_fn=sched,
  )
  metrics = []
  for b in batches:
    state, m = step(state, parallel.host_local_to_global(b, mesh))
    metrics.append(jax.device_get(m))
  return state, metrics, shardings


def _params_np(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


def test_sharded_equals_unsharded():
  batches = _batches(3)
  one, m1, _ = _run({"data": 1, "fsdp": 1, "tensor": 1}, batches)
  eight, m8, sh = _run({"data": 2, "fsdp": 2, "tensor": 2}, batches)
  wq = eight.params["layers"][0]["attn"]["wq"].get_value()
  assert wq.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert len(wq.sharding.device_set) == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), _params_np(one), _params_np(eight))
  np.testing.assert_allclose([m["loss"] for m in m1], [m["loss"] for m in m8], rtol=1e-5)
  assert int(eight.step) == 3


def test_parameters_and_optimizer_state_are_born_sharded():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  tx, _ = optim.make_optimizer({"learning_rate": 1e-3}, total_steps=10)
  _, state, _ = state_lib.create_train_state(models.create_sharded_model(CFG, mesh), tx, mesh=mesh)
  embed = state.params["embed"].get_value()
  # [V, D] = [256, 64] split 2 ways on vocab (tensor) and 2 on embed (fsdp).
  assert embed.addressable_shards[0].data.shape == (128, 32)
  mu = state.opt_state[0].mu["embed"].get_value()
  assert mu.sharding == embed.sharding


def test_gradient_accumulation_equals_full_batch():
  batches = _batches(2)
  full, mf, _ = _run({"data": 2, "fsdp": 2, "tensor": 2}, batches, num_microbatches=1)
  accum, ma, _ = _run({"data": 2, "fsdp": 2, "tensor": 2}, batches, num_microbatches=4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), _params_np(full), _params_np(accum))
  for a, b in zip(mf, ma):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    assert a["weight"] == b["weight"]


def test_microbatch_count_must_divide_batch():
  with pytest.raises(ValueError, match="not divisible by num_microbatches=3"):
    _run({"data": 1, "fsdp": 1, "tensor": 1}, _batches(1), num_microbatches=3)


def _quadratic_setup():
  class Lin(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((3,)), axes=("embed",))

  model = Lin()
  tx = optax.sgd(0.1)
  graphdef, state, _ = state_lib.create_train_state(model, tx)

  def loss_fn(m, batch, rng):
    return jnp.sum((m.w.get_value() - batch["x"]) ** 2), {}

  return graphdef, state, tx, loss_fn


def test_nonfinite_update_is_skipped_and_counted():
  graphdef, state, tx, loss_fn = _quadratic_setup()
  step = step_lib.make_train_step(loss_fn, tx, graphdef, donate=False)
  good = {"x": jnp.zeros((3,))}
  bad = {"x": jnp.array([0.0, jnp.nan, 0.0])}
  s1, m1 = step(state, good)
  assert float(m1["update_skipped"]) == 0.0
  np.testing.assert_allclose(s1.params["w"].get_value(), 0.8)  # w - 0.1 * 2w
  s2, m2 = step(s1, bad)
  assert float(m2["update_skipped"]) == 1.0 and float(m2["loss_finite"]) == 0.0
  np.testing.assert_array_equal(s2.params["w"].get_value(), s1.params["w"].get_value())
  jax.tree.map(np.testing.assert_array_equal, s2.opt_state, s1.opt_state)
  s3, m3 = step(s2, bad)
  assert int(s3.nonfinite_streak) == 2 and int(s3.nonfinite_total) == 2 and int(s3.step) == 3
  s4, _ = step(s3, good)
  assert int(s4.nonfinite_streak) == 0 and int(s4.nonfinite_total) == 2


def test_loop_stops_after_consecutive_nonfinite_steps(tmp_path):
  from rlhf_jax.train import loop

  graphdef, state, tx, loss_fn = _quadratic_setup()
  step = step_lib.make_train_step(loss_fn, tx, graphdef)

  def batches():
    for i in range(100):
      yield {"x": jnp.full((3,), jnp.inf if i >= 2 else 0.0)}

  with pytest.raises(loop.NonFiniteError, match=r"step 5: 3 consecutive .*\['grad_norm', 'loss'\]"):
    loop.train_loop(step_fn=step, state=state, batches=batches(), num_steps=50, workdir=str(tmp_path),
                    max_nonfinite_streak=3, progress=False, count_tokens=lambda b: 0)



# ---------------------------------------------------------------------------------------------
# Update guards: max_param_norm, loss_spike_factor (off by default).


def _quadratic_steps(tx, **guards):
  """``(state, step)`` of the 3-weight quadratic ``sum((w - x)^2)`` (w = 1) under ``tx``."""
  graphdef, _, _, loss_fn = _quadratic_setup()
  model = nnx.merge(graphdef, _quadratic_setup()[1].params)
  graphdef, state, _ = state_lib.create_train_state(model, tx)
  return state, step_lib.make_train_step(loss_fn, tx, graphdef, donate=False, **guards)


def _x(v):
  return {"x": jnp.full((3,), v, jnp.float32)}


def test_guards_off_by_default_give_the_unguarded_update_bit_for_bit():
  tx, _ = optim.make_optimizer({"learning_rate": 0.05, "schedule": "constant"}, total_steps=10)
  state, plain = _quadratic_steps(tx)
  _, guarded = _quadratic_steps(tx, max_param_norm=1e30, loss_spike_factor=1e30, loss_spike_warmup=0)
  a = b = state
  # The same updates by hand: optax on the gradients of the same loss.
  params, opt_state = state.params, tx.init(state.params)
  loss_of = lambda p, x: jnp.sum((p["w"].get_value() - x) ** 2)
  for v in (0.0, 3.0, -1.0, 0.5):
    a, ma = plain(a, _x(v))
    b, mb = guarded(b, _x(v))
    grads = jax.grad(loss_of)(params, jnp.full((3,), v))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    assert float(ma["update_skipped"]) == float(ma["skipped_param_norm"]) == float(ma["skipped_loss_spike"]) == 0.0
    assert "proposed_param_norm" not in ma and float(mb["update_skipped"]) == 0.0
    np.testing.assert_allclose(ma["param_norm"], np.linalg.norm(np.asarray(a.params["w"].get_value())), rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  jax.tree.map(np.testing.assert_array_equal, a.opt_state, b.opt_state)
  np.testing.assert_allclose(a.params["w"].get_value(), params["w"].get_value(), rtol=1e-6)
  assert int(a.nonfinite_total) == 0 and int(a.loss_count) == 4


def test_max_param_norm_skips_an_lr_10_update_and_a_huge_gradient():
  # lr=10: Adam's first update moves each weight by ~10, |w| 1.7 -> ~15.6.
  tx, _ = optim.make_optimizer({"learning_rate": 10.0, "schedule": "constant", "max_grad_norm": 0}, total_steps=10)
  state, step = _quadratic_steps(tx, max_param_norm=5.0)
  s1, m1 = step(state, _x(0.0))
  assert float(m1["update_skipped"]) == float(m1["skipped_param_norm"]) == 1.0
  assert float(m1["proposed_param_norm"]) > 10.0 and float(m1["skipped_loss_spike"]) == 0.0
  np.testing.assert_array_equal(s1.params["w"].get_value(), state.params["w"].get_value())
  jax.tree.map(np.testing.assert_array_equal, s1.opt_state, state.opt_state)
  assert int(s1.nonfinite_streak) == 1 and int(s1.nonfinite_total) == 1 and int(s1.step) == 1
  np.testing.assert_allclose(m1["param_norm"], np.sqrt(3.0), rtol=1e-6)
  # SGD 0.1: a batch whose gradient is huge (x = 1e6) is dropped, the next ordinary one is taken.
  state, step = _quadratic_steps(optax.sgd(0.1), max_param_norm=100.0)
  s1, m1 = step(state, _x(1e6))
  assert float(m1["skipped_param_norm"]) == 1.0 and float(m1["grads_finite"]) == 1.0
  np.testing.assert_allclose(float(m1["proposed_param_norm"]), np.sqrt(3) * (1 + 0.2 * (1e6 - 1)), rtol=1e-5)
  np.testing.assert_array_equal(s1.params["w"].get_value(), jnp.ones(3))
  s2, m2 = step(s1, _x(0.0))
  assert float(m2["update_skipped"]) == 0.0 and int(s2.nonfinite_streak) == 0 and int(s2.nonfinite_total) == 1
  np.testing.assert_allclose(s2.params["w"].get_value(), 0.8)


def test_loss_spike_is_skipped_after_warmup_and_the_mean_follows_accepted_losses():
  state, step = _quadratic_steps(optax.sgd(0.01), loss_spike_factor=3.0, loss_spike_warmup=3)
  s, m = step(state, _x(10.0))  # a spike before the warm-up is taken (nothing to compare with)
  losses = [float(m["loss"])]
  assert float(m["update_skipped"]) == 0.0
  for _ in range(3):
    s, m = step(s, _x(9.0))
    assert float(m["update_skipped"]) == 0.0
    losses.append(float(m["loss"]))
  assert int(s.loss_count) == 4
  np.testing.assert_allclose(float(s.loss_ema), np.mean(losses), rtol=1e-6)  # a plain mean of the first 20
  before = s
  s, m = step(s, _x(-60.0))  # loss ~ 3 * 61^2, far above 3 x the mean (~200)
  assert float(m["update_skipped"]) == float(m["skipped_loss_spike"]) == 1.0 and float(m["skipped_param_norm"]) == 0
  np.testing.assert_array_equal(s.params["w"].get_value(), before.params["w"].get_value())
  assert float(s.loss_ema) == float(before.loss_ema) and int(s.loss_count) == 4 and int(s.nonfinite_streak) == 1
  s, m = step(s, _x(9.5))  # an ordinary loss again
  assert float(m["update_skipped"]) == 0.0 and int(s.nonfinite_streak) == 0 and int(s.loss_count) == 5


def test_guard_arguments_are_checked():
  graphdef, _, tx, loss_fn = _quadratic_setup()
  for kw, msg in ((dict(max_param_norm=-1.0), "max_param_norm=-1.0 must be >= 0"),
                  (dict(loss_spike_factor=0.5), "loss_spike_factor=0.5 must be > 1"),
                  (dict(loss_spike_warmup=-1), "loss_spike_warmup=-1 must be >= 0"),
                  (dict(loss_ema_decay=1.0), r"loss_ema_decay=1.0 must be in \[0, 1\)")):
    with pytest.raises(ValueError, match=msg):
      step_lib.make_train_step(loss_fn, tx, graphdef, **kw)


def test_loop_stops_a_run_whose_updates_the_param_norm_guard_keeps_dropping(tmp_path, caplog):
  from rlhf_jax.train import loop

  tx, _ = optim.make_optimizer({"learning_rate": 10.0, "schedule": "constant"}, total_steps=10)
  state, step = _quadratic_steps(tx, max_param_norm=5.0)
  batches = iter([_x(0.0)] * 100)
  with caplog.at_level("WARNING", logger="rlhf_jax"):
    with pytest.raises(loop.NonFiniteError, match=r"^step 4: 4 consecutive updates skipped, the last because the "
                       r"update would take the parameter norm to \d.* \(above max_param_norm\) \(limit "
                       r"max_nonfinite_streak=4\); lower optimizer.learning_rate"):
      loop.train_loop(step_fn=step, state=state, batches=batches, num_steps=50, workdir=str(tmp_path),
                      max_nonfinite_streak=4, progress=False, count_tokens=lambda b: 0, plot_keys=())
  assert sum("update skipped: the update would take the parameter norm" in r.message for r in caplog.records) == 3


def test_loop_warns_once_when_the_loss_grows_far_over_the_first_one(tmp_path, caplog):
  from rlhf_jax.train import loop

  def run(lr, workdir):
    tx, _ = optim.make_optimizer({"learning_rate": lr, "schedule": "constant", "max_grad_norm": 0}, total_steps=10)
    state, step = _quadratic_steps(tx)  # no guard: the run goes on, the loop only warns
    caplog.clear()
    with caplog.at_level("WARNING", logger="rlhf_jax"):
      res = loop.train_loop(step_fn=step, state=state, batches=iter([_x(0.0)] * 20), num_steps=8,
                            workdir=str(workdir), progress=False, count_tokens=lambda b: 0, plot_keys=())
    return res, [r.message for r in caplog.records if "the run's first loss" in r.message]

  res, lines = run(10.0, tmp_path / "lr10")  # loss 3 at step 1, then ~3 * 10^2
  assert res.end_step == 8 and len(lines) == 1, lines
  assert lines[0].startswith("step 2: the loss ") and "x the run's first loss 3 (step 1): training is diverging" in lines[0]
  assert "lower optimizer.learning_rate" in lines[0] and "\n" not in lines[0]
  res, lines = run(0.1, tmp_path / "lr01")
  assert res.end_step == 8 and lines == []


def test_resume_from_a_checkpoint_of_the_older_train_state_without_loss_fields(tmp_path):
  from typing import Any, NamedTuple

  from rlhf_jax.checkpoint import Checkpointer
  from rlhf_jax.train import loop

  class OldTrainState(NamedTuple):  # TrainState before loss_ema / loss_count
    step: Any
    params: Any
    opt_state: Any
    rng: Any
    nonfinite_streak: Any
    nonfinite_total: Any
    extras: Any = None

  tx = optax.sgd(0.1)
  state, step = _quadratic_steps(tx, loss_spike_factor=2.0, loss_spike_warmup=1)
  old = OldTrainState(*[getattr(state, f) for f in OldTrainState._fields])._replace(
      step=jnp.asarray(3, jnp.int32), params=jax.tree.map(lambda p: p * 0.5, state.params))
  ck = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ck.save(3, old, {})
  ck.close()
  ck = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  try:
    res = loop.train_loop(step_fn=step, state=state, batches=iter([_x(0.0)] * 10), num_steps=5,
                          workdir=str(tmp_path), checkpointer=ck, progress=False, count_tokens=lambda b: 0,
                          plot_keys=())
  finally:
    ck.close()
  assert res.start_step == 3 and res.end_step == 5 and ck.restored_step == 3 and ck.warnings == []
  # Restored at 0.5, then two SGD steps of w - 0.1 * 2w; the loss mean restarted from the resumed steps.
  np.testing.assert_allclose(res.state.params["w"].get_value(), 0.5 * 0.8 * 0.8, rtol=1e-6)
  assert int(res.state.loss_count) == 2
  np.testing.assert_allclose(float(res.state.loss_ema), np.mean([3 * 0.25, 3 * 0.16]), rtol=1e-6)


def test_recipe_config_keys_reach_the_guards():
  from rlhf_jax.errors import ConfigError
  from rlhf_jax.train import recipe

  config = recipe.shared_config()
  assert (config.max_param_norm, config.loss_spike_factor, config.loss_spike_warmup) == (0.0, 0.0, 10)
  assert all(k in recipe.SHARED_HELP for k in ("max_param_norm", "loss_spike_factor", "loss_spike_warmup"))
  tx = optax.sgd(0.1)
  graphdef, _, _, loss_fn = _quadratic_setup()
  make = lambda c: recipe.make_step(loss_fn, tx, graphdef, c, None, None, None, {"lora": False})
  _, m = make(config)(_quadratic_steps(tx)[0], _x(0.0))  # the recipe's step donates its state
  assert float(m["update_skipped"]) == 0.0
  config.max_param_norm = 1.0  # |w| = 1.73 -> 1.39 after the step: above 1
  _, m = make(config)(_quadratic_steps(tx)[0], _x(0.0))
  assert float(m["skipped_param_norm"]) == 1.0
  config.loss_spike_factor = 0.5
  with pytest.raises(ConfigError, match=r"^config.loss_spike_factor=0.5 must be > 1, or 0 to disable the guard$"):
    make(config)
