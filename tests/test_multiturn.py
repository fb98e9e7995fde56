"""Multi-turn rollouts: layout and masks, log-probs equal to one forward of the final history,
no gradient through observation tokens, turn/token budgets, counted tool errors, run_online wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import envs, losses, models, ops, sampling
from rlhf_jax.train import online

TOK = envs.CharTokenizer()
P, N = 8, 40


class EchoEnv:
  """Answers every turn with a fixed observation; done after ``finish_after`` turns (reward 1)."""

  def __init__(self, finish_after=3, obs="<result>ok</result>"):
    self.finish_after, self.obs = finish_after, obs
    self.texts = []

  def reset(self, row):
    self.texts = []
    return [{"role": "user", "content": f"q{row}"}]

  def step(self, text):
    self.texts.append(text)
    if len(self.texts) >= self.finish_after:
      return envs.Step(None, 1.0, True, {"correct": True})
    return [{"role": "tool", "content": self.obs}], 0.25, False, {"tool_calls": 1}  # a plain tuple works too


class ForcedEnv:
  """Ignores the model and plays ``script`` against a CalculatorEnv (counted errors through a rollout)."""

  def __init__(self, script, **kwargs):
    self.inner, self.script, self.turn = envs.CalculatorEnv(**kwargs), script, 0

  def reset(self, row):
    self.turn = 0
    return self.inner.reset(row)

  def step(self, text):
    del text
    self.turn += 1
    return self.inner.step(self.script[min(self.turn, len(self.script)) - 1])


@pytest.fixture(scope="module")
def policy():
  model = models.create_model(models.get_config("tiny").replace(vocab_size=TOK.vocab_size), seed=0)
  return nnx.split(model)


@pytest.fixture(scope="module")
def rollout(policy):
  graphdef, _ = policy
  renderer = envs.PlainRenderer(TOK)
  return sampling.make_multiturn_rollout_fn(graphdef, renderer=renderer, max_turns=4, max_prompt_tokens=P,
                                            max_response_tokens=N, max_turn_tokens=6,
                                            processor=sampling.processors.temperature(1.0), min_bucket=4)


@pytest.fixture(scope="module")
def played(policy, rollout):
  _, params = policy
  env_list = [EchoEnv(finish_after=k) for k in (1, 2, 3, 3, 5)]
  ep = rollout(params, env_list, list(range(5)), jax.random.key(1), np.array([0, 0, 1, 1, 2]))
  return env_list, ep


def test_layout_masks_and_observation_tokens(played):
  env_list, ep = played
  b = len(env_list)
  obs_ids = TOK.encode("<result>ok</result>")
  assert ep.input_ids_BxT.shape == (b, P + N - 1) and ep.tokens_BxN.shape == (b, N)
  assert set(online.Rollout._fields) <= set(ep._fields)
  assert np.all(ep.response_mask_BxN * ep.observation_mask_BxN == 0)
  np.testing.assert_array_equal(ep.num_turns_B, [1, 2, 3, 3, 4])
  np.testing.assert_array_equal(ep.truncated_B, [False, False, False, False, True])  # max_turns=4 < 5
  for i, env in enumerate(env_list):
    k = int((ep.response_mask_BxN[i] + ep.observation_mask_BxN[i]).sum())
    toks, rmask, omask = ep.tokens_BxN[i, :k], ep.response_mask_BxN[i, :k], ep.observation_mask_BxN[i, :k]
    assert np.all(ep.tokens_BxN[i, k:] == TOK.pad_id) and ep.sampler_logps_BxN[i, k:].sum() == 0
    # Walk the window: turn j's generated tokens, then (unless last) the observation.
    pos = 0
    for j, text in enumerate(env.texts):
      n = int(rmask[pos:].argmin()) if (rmask[pos:] == 0).any() else k - pos
      assert TOK.decode([t for t in toks[pos:pos + n] if t not in (TOK.eos_id, TOK.pad_id)]) == text
      assert np.all(ep.sampler_logps_BxN[i, pos:pos + n] < 0)
      pos += n
      if j < len(env.texts) - 1:
        np.testing.assert_array_equal(toks[pos:pos + len(obs_ids)], obs_ids)
        assert omask[pos:pos + len(obs_ids)].all() and not rmask[pos:pos + len(obs_ids)].any()
        assert np.all(ep.sampler_logps_BxN[i, pos:pos + len(obs_ids)] == 0)
        pos += len(obs_ids)
    assert pos == k
    # Prompt left-padded, attention on every real token.
    prompt = [TOK.bos_id] + TOK.encode(f"q{i}")
    full = np.concatenate([np.zeros(P - len(prompt), np.int32), prompt, toks])
    np.testing.assert_array_equal(ep.input_ids_BxT[i, :P + k - 1], full[:-1])
    assert ep.attention_mask_BxT[i].sum() == len(prompt) + k - (k == N)
    assert ep.transcripts[i] == TOK.decode(prompt + list(toks))


def test_rewards_per_turn_and_per_episode(played):
  env_list, ep = played
  for i, env in enumerate(env_list):
    expected = [0.25] * (len(env.texts) - 1) + ([1.0] if env.finish_after <= 4 else [0.25])
    assert ep.turn_rewards[i] == expected
    assert ep.rewards_B[i] == pytest.approx(sum(expected))
    assert ep.token_rewards_BxN[i].sum() == pytest.approx(sum(expected))
    nz = np.flatnonzero(ep.token_rewards_BxN[i])
    assert np.all(ep.response_mask_BxN[i, nz] == 1)  # on the turns' last generated tokens
  m = ep.metrics
  assert m["turns"] == pytest.approx(13 / 5) and m["truncated"] == pytest.approx(0.2)
  calls = sum(len(env.texts) - (env.finish_after <= 4) for env in env_list)  # every non-final step
  assert m["correct"] == pytest.approx(0.8) and m["tool_calls"] == pytest.approx(calls / 5)


def test_multiturn_logps_equal_one_forward_of_the_final_history(policy, played):
  graphdef, params = policy
  _, ep = played
  batch = {"input_ids_BxT": ep.input_ids_BxT, "attention_mask_BxT": ep.attention_mask_BxT,
           "targets_BxT": ep.targets_BxT}
  logps = np.asarray(online.make_logps_fn(graphdef, N)(params, batch))
  m = ep.response_mask_BxN
  assert m.sum() > 20
  np.testing.assert_allclose(logps * m, ep.sampler_logps_BxN * m, atol=2e-5)


def test_observation_tokens_carry_no_gradient(policy, played):
  graphdef, params = policy
  _, ep = played
  rng = np.random.default_rng(0)
  obs = ep.observation_mask_BxN
  adv = np.repeat(rng.normal(size=(len(ep.rewards_B), 1)), N, 1).astype(np.float32)
  batch = {"input_ids_BxT": ep.input_ids_BxT, "attention_mask_BxT": ep.attention_mask_BxT,
           "targets_BxT": ep.targets_BxT, "response_mask_BxN": ep.response_mask_BxN,
           "old_logps_BxN": ep.sampler_logps_BxN, "advantages_BxN": adv}
  noisy = dict(batch, advantages_BxN=adv + 100.0 * obs * rng.normal(size=adv.shape).astype(np.float32),
               old_logps_BxN=ep.sampler_logps_BxN - 5.0 * obs)
  loss_fn = online.make_policy_loss(num_response_tokens=N, policy_loss="vanilla", aggregation="token-mean")

  @jax.jit
  def grads(b):
    return jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), b, None)[0])(params)

  g1, g2 = grads(batch), grads(noisy)
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g1))
  jax.tree.map(lambda a, c: np.testing.assert_array_equal(np.asarray(a), np.asarray(c)), g1, g2)
  # Per token: d loss / d logp is exactly zero on observation tokens.
  logps = jnp.asarray(ep.sampler_logps_BxN) + 0.1
  d = jax.grad(lambda lp: ops.token_mean(losses.get("vanilla")(lp, batch["old_logps_BxN"], adv,
                                                               batch["response_mask_BxN"]),
                                         batch["response_mask_BxN"]))(logps)
  assert np.all(np.asarray(d)[obs > 0] == 0) and np.any(np.asarray(d)[ep.response_mask_BxN > 0] != 0)


def test_token_budget_truncates_and_never_overflows(policy, rollout):
  _, params = policy
  long_obs = "<result>" + "x" * 12 + "</result>"  # 14 tokens: two observations nearly fill N = 40
  env_list = [EchoEnv(finish_after=99, obs=long_obs) for _ in range(5)]
  ep = rollout(params, env_list, list(range(5)), jax.random.key(3))
  assert ep.truncated_B.all() and ep.tokens_BxN.shape == (5, N)
  used = ep.response_mask_BxN + ep.observation_mask_BxN
  assert np.all(used.sum(-1) <= N) and np.all(ep.observation_mask_BxN.sum(-1) <= 28)
  np.testing.assert_array_equal(ep.group_ids_B, np.arange(5))
  with pytest.raises(ValueError, match="prompt has"):
    rollout.start([EchoEnv()], ["x" * 20])


def test_tool_errors_and_timeouts_are_counted_not_raised(policy, rollout):
  _, params = policy
  slow = envs.make_tool(lambda: __import__("time").sleep(5), name="slow", timeout_s=0.1)
  scripts = [["<call>calc(1+</call>", "<answer>2</answer>"], ["<call>sqrt(2)</call>", "<answer>2</answer>"],
             ["<call>calc(1/0)</call>", "<answer>2</answer>"], ["<call>slow()</call>", "<answer>2</answer>"],
             ["no action"]]
  env_list = [ForcedEnv(s, error_detail=False) for s in scripts]
  env_list[3].inner.tools["slow"] = slow
  ep = rollout(params, env_list, [{"question": "1+1?", "answer": "2"}] * 5, jax.random.key(0))
  m = ep.metrics
  assert m["errors/malformed_call"] == 1 and m["errors/unknown_tool"] == 1 and m["errors/tool_error"] == 1
  assert m["errors/tool_timeout"] == 1 and m["errors/no_action"] == 1 and m["errors/total"] == 5
  assert m["tool_calls"] == pytest.approx(2 / 5)  # calc(1/0) and slow() ran
  np.testing.assert_array_equal(ep.rewards_B, [1.0, 1.0, 1.0, 1.0, 0.0])
  np.testing.assert_array_equal(ep.num_turns_B, [2, 2, 2, 2, 1])
  for i, kind in enumerate(("malformed_call", "unknown_tool", "tool_error", "tool_timeout")):
    assert f"<error>{kind}</error>" in ep.transcripts[i]
    assert ep.infos[i][0]["errors"] == {kind: 1}


def test_episode_source_feeds_run_online_pieces(policy, rollout):
  _, params = policy
  calls = []
  src = sampling.EpisodeSource(rollout, lambda row: EchoEnv(finish_after=2),
                               lambda it, attempt=0: (list(range(5)), np.array([0, 0, 1, 1, 2])),
                               on_episodes=lambda it, a, ep: calls.append((it, a, ep.metrics["turns"])))
  with pytest.raises(RuntimeError, match="before prompt_fn"):
    src.rollout_fn(params, None, None, jax.random.key(0), None)
  prompts, gids = src.prompt_fn(7, 1)
  ids, mask = sampling.left_pad(prompts, length=P)
  ep = src.rollout_fn(params, ids, mask, jax.random.key(0), gids)
  np.testing.assert_array_equal(src.reward_fn(prompts, ep.tokens_BxN, ep.response_mask_BxN.sum(-1)), [1.25] * 5)
  assert calls == [(7, 1, 2.0)]
  # run_online's dynamic sampling keeps the GRPO fields of these episodes.
  ro, r = online._select_informative_groups([(ep, ep.rewards_B + np.array([0, 1, 0, 0, 0], np.float32))])
  assert isinstance(ro, online.Rollout) and ro.input_ids_BxT.shape == ep.input_ids_BxT.shape


def test_scripted_episode_matches_the_rollout_layout(policy):
  graphdef, params = policy
  renderer = envs.PlainRenderer(TOK, stop_strings=("</call>", "</answer>"))
  row = {"question": "6*7?", "answer": "42"}
  ep = sampling.scripted_episode(envs.CalculatorEnv(), row, renderer, ["<call>calc(6*7)</call>", "<answer>42</answer>"])
  text = TOK.decode(ep.ids)
  assert text == "<bos>6*7?<call>calc(6*7)</call><result>42</result><answer>42</answer>" and ep.turn_rewards == [0.0, 1.0]
  assistant = TOK.decode([t for t, m in zip(ep.ids, ep.assistant_mask) if m])
  assert assistant == "<call>calc(6*7)</call><answer>42</answer>"
  # The sampler with these stop strings stops exactly at the end of each scripted turn.
  assert renderer.stop_sequences == [TOK.encode("</call>"), TOK.encode("</answer>")]
