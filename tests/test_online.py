"""Online RL plumbing: rollouts, trainer log-probs == sampler log-probs, policy loss, minibatches, dynamic sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import data, models, sampling
from rlhf_jax.train import online

CFG = models.get_config("tiny")


def _rollout(seed=0, temperature=1.0, n=6):
  model = models.create_model(CFG, seed=seed)
  graphdef, params = nnx.split(model)
  prompts = [data.make_prompt(np.array(data.DIGIT_IDS)[list(p)]) for p in ([3, 1, 4], [1, 5, 9, 2, 6, 5], [8])]
  prompts = [p for p in prompts for _ in range(2)]
  ids, mask = sampling.left_pad(prompts, length=10)
  rollout = online.make_rollout_fn(graphdef, max_new_tokens=n, processor=sampling.processors.temperature(temperature),
                                   eos_id=data.EOS_ID)
  ro = rollout(params, ids, mask, jax.random.key(seed), np.repeat(np.arange(3), 2))
  return graphdef, params, ro


def test_trainer_logps_equal_sampler_logps_on_left_padded_rollouts():
  graphdef, params, ro = _rollout()
  batch = {"input_ids_BxT": ro.input_ids_BxT, "attention_mask_BxT": ro.attention_mask_BxT, "targets_BxT": ro.targets_BxT}
  logps = online.make_logps_fn(graphdef, ro.tokens_BxN.shape[1])(params, batch)
  m = ro.response_mask_BxN
  np.testing.assert_allclose(np.asarray(logps) * m, ro.sampler_logps_BxN * m, atol=2e-5)
  assert ro.input_ids_BxT.shape == (6, 10 + 6 - 1)


def test_policy_loss_matches_hand_computation_and_kl_term():
  from rlhf_jax import losses, ops

  graphdef, params, ro = _rollout(seed=1)
  model = nnx.merge(graphdef, params)
  n = ro.tokens_BxN.shape[1]
  rng = np.random.default_rng(0)
  batch = {"input_ids_BxT": ro.input_ids_BxT, "attention_mask_BxT": ro.attention_mask_BxT,
           "targets_BxT": ro.targets_BxT, "response_mask_BxN": ro.response_mask_BxN,
           "old_logps_BxN": ro.sampler_logps_BxN + rng.normal(0, 0.1, ro.sampler_logps_BxN.shape).astype(np.float32),
           "advantages_BxN": rng.normal(0, 1, ro.sampler_logps_BxN.shape).astype(np.float32),
           "ref_logps_BxN": ro.sampler_logps_BxN - 0.3}
  loss_fn = online.make_policy_loss(num_response_tokens=n, aggregation="seq-mean-token-mean",
                                    policy_hparams=dict(clip_ratio_low=0.2, clip_ratio_high=0.28),
                                    kl_coef=0.05, kl_estimator="k3")
  loss, aux = loss_fn(model, batch, None)
  logps = jnp.asarray(ro.sampler_logps_BxN)  # == the trainer's log-probs (tested above)
  m = batch["response_mask_BxN"]
  pg = losses.get("vanilla")(logps, batch["old_logps_BxN"], batch["advantages_BxN"], m,
                             clip_ratio_low=0.2, clip_ratio_high=0.28)
  kl = losses.kl.kl_penalty(logps, batch["ref_logps_BxN"], kind="k3")
  expected = ops.seq_mean_token_mean(pg, m) + 0.05 * ops.seq_mean_token_mean(kl, m)
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-4, atol=1e-5)
  assert float(aux["kl"]) > 0 and 0 <= float(aux["clip_fraction"]) <= 1


def test_minibatches_cover_the_rollout_each_epoch():
  batch = {"x": np.arange(12), "y": np.arange(12) * 10}
  mbs = list(online.minibatches(batch, num_minibatches=3, epochs=2, seed=0))
  assert len(mbs) == 6 and all(len(m["x"]) == 4 for m in mbs)
  for e in range(2):
    assert sorted(np.concatenate([m["x"] for m in mbs[3 * e:3 * e + 3]])) == list(range(12))
  assert all((m["y"] == m["x"] * 10).all() for m in mbs)
  with pytest.raises(ValueError, match="not divisible"):
    list(online.minibatches(batch, num_minibatches=5, epochs=1, seed=0))


def test_dynamic_sampling_keeps_informative_groups_first():
  _, _, ro = _rollout(seed=2)  # groups 0, 1, 2 of two samples each
  flat = np.array([1, 1, 0, 1, 0, 0], np.float32)  # group 0 agrees, 1 differs, 2 agrees
  ro2 = ro._replace(tokens_BxN=ro.tokens_BxN + 100)
  second = np.array([0, 1, 1, 1, 1, 0], np.float32)  # groups 0 and 2 differ
  sel, rewards = online._select_informative_groups([(ro, flat), (ro2, second)])
  np.testing.assert_array_equal(rewards, [0, 1, 0, 1, 1, 0])
  np.testing.assert_array_equal(sel.group_ids_B, [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(sel.tokens_BxN[:2], ro.tokens_BxN[2:4])  # the informative group of draw 1
  np.testing.assert_array_equal(sel.tokens_BxN[2:], ro2.tokens_BxN[[0, 1, 4, 5]])
  stats = online.group_stats(flat, ro.group_ids_B)
  assert stats["zero_variance_groups"] == pytest.approx(2 / 3) and stats["reward_mean"] == pytest.approx(0.5)


def test_pf_ppo_weights():
  r = np.array([0.1, 0.9, 0.5, 0.3, 2.0, 1.0, 5.0], np.float32)
  g = np.array([0, 0, 0, 1, 1, 1, 2])
  np.testing.assert_array_equal(online.pf_ppo_weights(r, g, method="max_min"), [1, 1, 0, 1, 1, 0, 1])
  np.testing.assert_array_equal(online.pf_ppo_weights(r, g, method="best"), [0, 1, 0, 0, 1, 0, 1])
  mr = online.pf_ppo_weights(r, g, method="max_random", seed=3)
  assert mr[1] == 1 and mr[4] == 1 and mr[6] == 1 and mr.sum() == 5
  pw = online.pf_ppo_weights(r, g, method="pow", seed=0, weight_pow=4.0)
  assert pw[[0, 1, 2]].sum() == 3 and pw[[3, 4, 5]].sum() == 3 and pw[6] == 1
  counts = sum(online.pf_ppo_weights(r, g, method="pow", seed=s, weight_pow=2.0)[[3, 4, 5]] for s in range(300))
  assert counts[1] > counts[2] > counts[0]  # ∝ r²: 4.0 > 1.0 > 0.09
  with pytest.raises(ValueError, match="valid choices"):
    online.pf_ppo_weights(r, g, method="median")


def test_remax_batch_fn_subtracts_the_greedy_reward():
  graphdef, params, ro = _rollout(seed=3)
  greedy = online.make_rollout_fn(graphdef, max_new_tokens=ro.tokens_BxN.shape[1], processor=None, eos_id=data.EOS_ID)
  reward_fn = lambda prompts, toks, lens: np.array([float(t[0] % 7) for t in toks], np.float32)
  fn = online.make_remax_batch_fn(greedy, reward_fn)

  import types

  state = types.SimpleNamespace(params=params)
  batch = {"response_mask_BxN": ro.response_mask_BxN}
  rewards = reward_fn(None, ro.tokens_BxN, None)
  _, out = fn(state, batch, rewards, ro)
  p = ro.input_ids_BxT.shape[1] - ro.tokens_BxN.shape[1] + 1
  g = greedy(params, ro.input_ids_BxT[:, :p], ro.attention_mask_BxT[:, :p], jax.random.key(0), ro.group_ids_B)
  expected = (rewards - reward_fn(None, g.tokens_BxN, None))[:, None] * ro.response_mask_BxN
  np.testing.assert_allclose(out["advantages_BxN"], expected, atol=1e-6)


def test_sampling_layout_reshard_gives_the_same_rollout():
  from jax.sharding import PartitionSpec as P

  from rlhf_jax import parallel

  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = models.create_sharded_model(CFG, mesh, seed=5)
  graphdef, params = nnx.split(model)
  sample_sh = parallel.state_shardings(params, mesh, parallel.SAMPLE_RULES)
  sample_params = jax.device_put(params, sample_sh)
  wq = sample_params["layers"][0]["attn"]["wq"].get_value()
  assert wq.sharding.spec == P(None, "tensor", None)  # no FSDP split while sampling
  assert params["layers"][0]["attn"]["wq"].get_value().sharding.spec == P("fsdp", "tensor", None)
  prompts = [data.make_prompt(np.array(data.DIGIT_IDS)[[1, 2, 3]])] * 4
  ids, mask = sampling.left_pad(prompts)
  rollout = online.make_rollout_fn(graphdef, max_new_tokens=5, processor=sampling.processors.temperature(1.0),
                                   eos_id=data.EOS_ID)
  a = rollout(params, ids, mask, jax.random.key(0), np.arange(4))
  b = rollout(sample_params, ids, mask, jax.random.key(0), np.arange(4))
  np.testing.assert_array_equal(a.tokens_BxN, b.tokens_BxN)
  np.testing.assert_allclose(a.sampler_logps_BxN, b.sampler_logps_BxN, atol=1e-5)


def test_rollout_correction_weights_the_policy_loss():
  from rlhf_jax import losses, ops

  graphdef, params, ro = _rollout(seed=4)
  model = nnx.merge(graphdef, params)
  n = ro.tokens_BxN.shape[1]
  rng = np.random.default_rng(1)
  trainer = ro.sampler_logps_BxN  # the trainer's log-probs equal the sampler's here (tested above)
  sampler = trainer + rng.normal(0, 0.8, trainer.shape).astype(np.float32)  # a mismatched sampler
  batch = {"input_ids_BxT": ro.input_ids_BxT, "attention_mask_BxT": ro.attention_mask_BxT,
           "targets_BxT": ro.targets_BxT, "response_mask_BxN": ro.response_mask_BxN, "old_logps_BxN": trainer,
           "sampler_logps_BxN": sampler, "advantages_BxN": rng.normal(0, 1, trainer.shape).astype(np.float32)}
  corr = dict(level="token", cap=2.0, mode="truncate")
  loss, aux = online.make_policy_loss(num_response_tokens=n, rollout_correction=corr)(model, batch, None)
  m = batch["response_mask_BxN"]
  w = np.minimum(np.exp(trainer - sampler), 2.0)
  pg = losses.get("vanilla")(jnp.asarray(trainer), trainer, batch["advantages_BxN"], m)
  np.testing.assert_allclose(float(loss), float(ops.token_mean(pg * w, m)), rtol=1e-4, atol=1e-6)
  assert 0 < float(aux["rollout_is_weight"]) <= 2.0


def test_ppo_batch_fn_with_adaptive_kl_controller():
  import optax

  from rlhf_jax.losses import kl
  from rlhf_jax.train import state as state_lib
  from rlhf_jax.train import ppo

  critic = models.create_model(models.get_config("tiny", scalar_head_outputs=1), seed=7)
  graphdef_p, params, ro = _rollout(seed=5)
  ac = ppo.ActorCritic(nnx.merge(graphdef_p, params), critic)
  graphdef, _ = nnx.split(ac)
  ctl = kl.adaptive_kl_controller(0.1, target=0.01, horizon=100)
  _, state, _ = state_lib.create_train_state(ac, optax.sgd(0.0), extras=ppo.init_extras(kl_controller=ctl))
  fn = ppo.make_ppo_batch_fn(graphdef, num_response_tokens=ro.tokens_BxN.shape[1], put_batch=lambda b: b,
                             kl_controller=ctl)
  batch = {"input_ids_BxT": ro.input_ids_BxT, "attention_mask_BxT": ro.attention_mask_BxT,
           "targets_BxT": ro.targets_BxT, "response_mask_BxN": ro.response_mask_BxN,
           "old_logps_BxN": ro.sampler_logps_BxN, "ref_logps_BxN": ro.sampler_logps_BxN - 0.5}
  new_state, out = fn(state, batch, np.ones(6, np.float32), ro)
  assert float(new_state.extras["kl_ctl"].coef) > 0.1  # KL (0.5/token) above target: the coefficient grows
  m = ro.response_mask_BxN
  np.testing.assert_array_equal(out["advantages_BxN"] * (1 - m), 0.0)
  assert out["returns_BxN"].shape == m.shape and np.isfinite(out["old_values_BxN"]).all()


def test_ppo_dense_rewards_at_the_last_token_equal_the_sequence_reward_and_credit_earlier_tokens():
  import optax

  from rlhf_jax.rewards import shaping
  from rlhf_jax.train import ppo
  from rlhf_jax.train import state as state_lib

  critic = models.create_model(models.get_config("tiny", scalar_head_outputs=1), seed=7)
  graphdef_p, params, ro = _rollout(seed=5)
  ac = ppo.ActorCritic(nnx.merge(graphdef_p, params), critic)
  graphdef, _ = nnx.split(ac)
  _, state, _ = state_lib.create_train_state(ac, optax.sgd(0.0), extras=ppo.init_extras(normalize_rewards=False))
  n = ro.tokens_BxN.shape[1]
  fn = ppo.make_ppo_batch_fn(graphdef, num_response_tokens=n, put_batch=lambda b: b, normalize_rewards=False,
                             lam=1.0, whiten_advantages=False, kl_coef=0.05)
  batch = {"input_ids_BxT": ro.input_ids_BxT, "attention_mask_BxT": ro.attention_mask_BxT,
           "targets_BxT": ro.targets_BxT, "response_mask_BxN": ro.response_mask_BxN,
           "old_logps_BxN": ro.sampler_logps_BxN, "ref_logps_BxN": ro.sampler_logps_BxN - 0.5}
  m = np.asarray(ro.response_mask_BxN)
  seq = np.arange(6, dtype=np.float32) - 2.0
  last = shaping.place_segment_rewards(jnp.asarray(seq)[:, None], jnp.asarray(m.sum(-1) - 1, jnp.int32)[:, None],
                                       jnp.ones((6, 1)), n)
  _, a = fn(state, dict(batch), seq, ro)
  _, b = fn(state, dict(batch), np.asarray(last), ro)
  np.testing.assert_allclose(b["returns_BxN"], a["returns_BxN"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(b["advantages_BxN"], a["advantages_BxN"], rtol=1e-6, atol=1e-6)
  # The same total given at the first response token: with γ = λ = 1 the return of the first token is
  # unchanged, and the later tokens' returns lose it (credit given where the reward was earned).
  first = np.zeros_like(m)
  first[:, 0] = seq
  _, c = fn(state, dict(batch), first, ro)
  np.testing.assert_allclose(c["returns_BxN"][:, 0], a["returns_BxN"][:, 0], rtol=1e-5, atol=1e-5)
  later = m[:, 1:] > 0
  np.testing.assert_allclose((a["returns_BxN"][:, 1:] - c["returns_BxN"][:, 1:])[later],
                             np.broadcast_to(seq[:, None], later.shape)[later], rtol=1e-5, atol=1e-5)
  # Outcome estimators and group statistics see the totals.
  np.testing.assert_allclose(online.sequence_rewards(first), seq)


def test_categorical_hl_gauss_critic_learns_the_returns():
  import optax

  from rlhf_jax.train import ppo
  from rlhf_jax.train import state as state_lib
  from rlhf_jax.train import step as step_lib

  cat = ppo.CategoricalValue(num_bins=21, v_min=-3.0, v_max=3.0)
  critic = models.create_model(models.get_config("tiny", scalar_head_outputs=cat.num_bins), seed=7)
  graphdef_p, params, ro = _rollout(seed=5)
  ac = ppo.ActorCritic(nnx.merge(graphdef_p, params), critic)
  tx = optax.adam(3e-3)
  graphdef, state, _ = state_lib.create_train_state(ac, tx, extras=ppo.init_extras(normalize_rewards=False))
  n = ro.tokens_BxN.shape[1]
  fn = ppo.make_ppo_batch_fn(graphdef, num_response_tokens=n, put_batch=lambda b: b, normalize_rewards=False,
                             categorical=cat)
  batch = {"input_ids_BxT": ro.input_ids_BxT, "attention_mask_BxT": ro.attention_mask_BxT,
           "targets_BxT": ro.targets_BxT, "response_mask_BxN": ro.response_mask_BxN,
           "old_logps_BxN": ro.sampler_logps_BxN, "ref_logps_BxN": ro.sampler_logps_BxN}
  state, batch = fn(state, batch, np.linspace(-2.0, 2.0, 6).astype(np.float32), ro)
  m = np.asarray(ro.response_mask_BxN)
  values = ppo.response_values(nnx.merge(graphdef, state.params).critic, batch, n, cat)
  np.testing.assert_allclose(batch["old_values_BxN"], np.asarray(values) * m, rtol=1e-5, atol=1e-6)
  assert np.all(np.abs(batch["old_values_BxN"]) <= 3.0)
  loss_fn = ppo.make_ppo_loss(num_response_tokens=n, categorical=cat, vf_coef=1.0)
  step = step_lib.make_train_step(loss_fn, tx, graphdef, donate=False)

  def value_error(s):
    v = ppo.response_values(nnx.merge(graphdef, s.params).critic, batch, n, cat)
    return float((np.abs(np.asarray(v) - batch["returns_BxN"]) * m).sum() / m.sum())

  before = value_error(state)
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics["value_loss"]))
  assert losses[-1] < 0.7 * losses[0], losses
  assert value_error(state) < 0.5 * before, (before, value_error(state))
