"""PPO with a critic against a learned reward model, with KL-in-reward.

1. A reward model learns sortedness from preference pairs (as ``rm_tiny.py``).
2. A policy is SFT'd to answer prompts with their digits sorted ascending or
   descending, half the time each (as ``dpo_tiny.py``).
3. PPO (policy + critic initialised from the reward model, PPO-max reward
   normalisation and clipping, GAE, whitened advantages, clipped value loss,
   KL-to-SFT penalty in the reward) maximises the reward model's score, with a
   rule judge (CGPO-style) penalising answers that are not a permutation of the
   prompt: the reward model only saw permutations, and without the judge PPO
   learns to game it (measured: reward-model score -1.2 -> 4.8 while the gold
   sortedness fell 0.41 -> 0.37; ``--config.ppo.judge_penalty=0`` shows it).

Command:
  python -m rlhf_jax.run experiments/ppo_tiny.py --workdir runs/ppo_tiny

Hardware: 2 CPU cores, about 2 minutes. Expected (measured): the headline of
``<workdir>/result.json`` is the held-out gold sortedness of sampled answers
(temperature 1, 256 held-out prompts; counted only for true permutations of the
prompt), before = the SFT policy PPO starts from, after = the PPO policy: 0.41
-> 0.75; the reward model's mean score rises from -1.2 to 3.9, with a KL to the
SFT reference of 1.7 nats per answer. tests/test_ppo_experiment.py asserts a
reduced run (gold up by more than 0.1).
Interrupting (SIGTERM, Ctrl-C) stops at the current stage with a checkpoint (exit
143/130); running the command again resumes stage by stage (a finished stage is
restored, not retrained; tests/test_faults.py).
"""

import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from rlhf_jax import data, models, parallel, sampling
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.data import preference as pref_data
from rlhf_jax.errors import ConfigError
from rlhf_jax.rewards import shaping
from rlhf_jax.train import loop, online, optim, ppo, reward, sft, state as state_lib, step as step_lib, writers


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.progress = True
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.model = ml_collections.ConfigDict(dict(name="tiny", dtype="float32"))
  c.data = ml_collections.ConfigDict(dict(seq_len=20, min_len=4, max_len=8, seed=0))
  c.rm = ml_collections.ConfigDict(dict(num_steps=300, batch_size=32, learning_rate=1e-3, checkpoint_every=100))
  c.sft = ml_collections.ConfigDict(dict(num_steps=600, batch_size=32, learning_rate=3e-3, checkpoint_every=100))
  c.ppo = ml_collections.ConfigDict(dict(
      num_iterations=30, prompts_per_iteration=32, temperature=1.0, learning_rate=2e-4, epochs=2,
      num_minibatches=2, clip_ratio=0.2, kl_coef=0.05, gamma=1.0, lam=0.95, vf_coef=0.5, value_clip=0.2,
      reward_clip=5.0, aggregation="token-mean",
      judge_penalty=-5.0,  # reward of answers that are not a permutation of the prompt (CGPO judge); 0 disables
  ))
  c.eval = ml_collections.ConfigDict(dict(num_prompts=256, every=10))
  c.checkpoint_every = 10  # PPO iterations
  c.resume_changed = ""  # "ok": resume although model/optimizer/data keys changed since the checkpoint
  if arg == "runlocal":
    c.rm.num_steps, c.sft.num_steps, c.ppo.num_iterations = 100, 200, 5
  elif arg not in (None, ""):
    raise ConfigError(f"unknown experiment argument {arg!r}; valid: 'runlocal'")
  return c


def gold_reward(prompt_digits, completion) -> float:
  """Sortedness of the answer when it is a permutation of the prompt's digits, else 0."""
  c = np.asarray(completion)
  c = c[c != data.EOS_ID]
  if sorted(c.tolist()) != sorted(np.asarray(prompt_digits).tolist()):
    return 0.0
  return pref_data.sortedness(c)


def _train(step_fn, state, shardings, batches, num_steps, workdir, put, progress, checkpoint_every, run_config):
  """One offline stage; returns its `loop.LoopResult` (``preempted`` when a signal stopped it)."""
  ck = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2)
  try:
    return loop.train_loop(step_fn=step_fn, state=state, batches=batches, num_steps=num_steps, workdir=workdir,
                           put_batch=put, checkpointer=ck, state_shardings=shardings, progress=progress,
                           checkpoint_every=checkpoint_every, run_config=run_config)
  finally:
    ck.close()


def main(config, workdir):
  """Runs the stages in order; a stage stopped by SIGTERM/SIGINT ends the run with its (preempted)
  result (``python -m rlhf_jax.run`` exits 143/130), and the next run resumes stage by stage."""
  with loop._StopFlag():  # a signal between stages stops the next stage before its first step
    return _run(config, workdir)


def _run(config, workdir):
  mesh = parallel.make_mesh(dict(config.mesh))
  policy_cfg = models.config_from_section(config.model)
  critic_cfg = models.config_from_section(config.model, scalar_head_outputs=1)
  d, p = config.data, config.ppo
  put = lambda b: parallel.host_local_to_global(b, mesh)
  strip = lambda b: {k: v for k, v in b.items() if not k.endswith("_B")}
  opt = lambda lr, steps: optim.make_optimizer(dict(learning_rate=lr, warmup_steps=10, schedule="cosine",
                                                    end_value_ratio=0.1, max_grad_norm=1.0), total_steps=steps)

  # 1. Reward model.
  tx, _ = opt(config.rm.learning_rate, config.rm.num_steps)
  rm_graphdef, state, sh = state_lib.create_train_state(models.create_sharded_model(critic_cfg, mesh, seed=1), tx,
                                                        mesh=mesh)
  rm_step = step_lib.make_train_step(reward.make_reward_loss("bt"), tx, rm_graphdef, mesh=mesh, state_shardings=sh)
  pairs = pref_data.PermutationPreferences(16384, seed=d.seed, seq_len=d.seq_len, min_len=d.min_len, max_len=d.max_len)
  rm_result = _train(rm_step, state, sh, data.BatchIterator.from_dataset(pairs, batch_size=config.rm.batch_size,
                                                                         seed=1, collate=pref_data.collate),
                     config.rm.num_steps, os.path.join(workdir, "rm"), lambda b: put(strip(b)), config.progress,
                     config.rm.checkpoint_every,
                     loop.config_subset(config, "seed", "model", "data", "rm", "resume_changed"))
  if rm_result.preempted:  # later stages need the finished reward model: stop here, resume later
    return rm_result
  rm_params = rm_result.state.params

  # 2. SFT policy (ascending or descending, half each).
  tx, _ = opt(config.sft.learning_rate, config.sft.num_steps)
  graphdef, state, sh = state_lib.create_train_state(models.create_sharded_model(policy_cfg, mesh, seed=0), tx,
                                                     mesh=mesh)
  sft_step = step_lib.make_train_step(sft.make_sft_loss(), tx, graphdef, mesh=mesh, state_shardings=sh)
  mix = pref_data.MixedSortingSFT(16384, seed=d.seed + 1, seq_len=d.seq_len, min_len=d.min_len, max_len=d.max_len)
  sft_result = _train(sft_step, state, sh, data.BatchIterator.from_dataset(mix, batch_size=config.sft.batch_size,
                                                                           seed=2, collate=pref_data.collate),
                      config.sft.num_steps, os.path.join(workdir, "sft"), put, config.progress,
                      config.sft.checkpoint_every,
                      loop.config_subset(config, "seed", "model", "data", "sft", "resume_changed"))
  if sft_result.preempted:
    return sft_result
  sft_params = sft_result.state.params

  # 3. PPO: actor-critic with the critic initialised from the reward model.
  copy = lambda tree: jax.tree.map(lambda x: x.copy(), tree)
  ac = ppo.ActorCritic(nnx.merge(graphdef, copy(sft_params)), nnx.merge(rm_graphdef, copy(rm_params)))
  tx, _ = optim.make_optimizer(dict(learning_rate=p.learning_rate, schedule="constant", max_grad_norm=1.0),
                               total_steps=p.num_iterations)
  ac_graphdef, state, sh = state_lib.create_train_state(ac, tx, mesh=mesh, extras=ppo.init_extras())
  max_new = d.max_len + 1
  loss_fn = ppo.make_ppo_loss(num_response_tokens=max_new, vf_coef=p.vf_coef, value_clip=p.value_clip,
                              aggregation=p.aggregation,
                              policy_hparams=dict(clip_ratio_low=p.clip_ratio, clip_ratio_high=p.clip_ratio))
  step = step_lib.make_train_step(loss_fn, tx, ac_graphdef, mesh=mesh, state_shardings=sh)
  rollout = online.make_rollout_fn(graphdef, max_new_tokens=max_new,
                                   processor=sampling.processors.temperature(p.temperature), eos_id=data.EOS_ID)
  score = jax.jit(lambda params, ids, mask: reward.sequence_rewards(nnx.merge(rm_graphdef, params), ids, mask)[:, 0])

  def prompt_fn(iteration, attempt=0):
    rng = np.random.default_rng([d.seed, 7, iteration, attempt])
    prompts = [data.make_prompt(mix.pairs.prompt(int(i))) for i in rng.integers(0, len(mix), p.prompts_per_iteration)]
    return prompts, np.arange(len(prompts))

  def rm_scores(prompts, tokens_BxN, lengths_B):
    rows = data.make_sft_batch([(q[1:-1], t[: int(n)][t[: int(n)] != data.EOS_ID])
                                for q, t, n in zip(prompts, tokens_BxN, lengths_B)], seq_len=d.seq_len)
    return np.asarray(score(rm_params, rows["input_ids_BxT"], rows["attention_mask_BxT"]))

  def invalid(prompts, tokens_BxN, lengths_B):
    """The rule judge: the answer is not a permutation of the prompt's digits."""
    return np.array([sorted(t[: int(n)][t[: int(n)] != data.EOS_ID].tolist()) != sorted(q[1:-1].tolist())
                     for q, t, n in zip(prompts, tokens_BxN, lengths_B)])

  def reward_fn(prompts, tokens_BxN, lengths_B):
    r = rm_scores(prompts, tokens_BxN, lengths_B)
    if not p.judge_penalty:
      return r
    flags = invalid(prompts, tokens_BxN, lengths_B)
    return np.asarray(shaping.apply_judge_mask(r, flags, mode="penalty", penalty=p.judge_penalty))

  held_rng = np.random.default_rng(d.seed + 31)
  held = [data.make_prompt(mix.pairs.prompt(int(i))) for i in held_rng.integers(0, len(mix), config.eval.num_prompts)]
  sample_eval = online.make_rollout_fn(graphdef, max_new_tokens=max_new, processor=sampling.processors.temperature(1.0),
                                       eos_id=data.EOS_ID)
  ref_logps = online.make_logps_fn(graphdef, max_new)

  def evaluate(policy_params):
    ids, mask = sampling.left_pad(held, length=d.max_len + 2)
    ro = sample_eval(policy_params, ids, mask, jax.random.PRNGKey(123), np.arange(len(held)))
    n = ro.response_mask_BxN.sum(-1)
    b = {"input_ids_BxT": ro.input_ids_BxT, "attention_mask_BxT": ro.attention_mask_BxT, "targets_BxT": ro.targets_BxT}
    kl = ((ro.sampler_logps_BxN - np.asarray(ref_logps(sft_params, put(b)))) * ro.response_mask_BxN).sum(-1)
    return {"rm_reward": float(np.mean(rm_scores(held, ro.tokens_BxN, n))),
            "gold": float(np.mean([gold_reward(q[1:-1], t[: int(k)]) for q, t, k in zip(held, ro.tokens_BxN, n)])),
            "valid_fraction": float(1 - np.mean(invalid(held, ro.tokens_BxN, n))),
            "kl_to_sft": float(np.mean(kl))}

  before = evaluate(sft_params)
  batch_fn = ppo.make_ppo_batch_fn(ac_graphdef, num_response_tokens=max_new, put_batch=put, kl_coef=p.kl_coef,
                                   gamma=p.gamma, lam=p.lam, reward_clip=p.reward_clip)
  ck = Checkpointer(os.path.join(workdir, "ppo", "checkpoints"), max_to_keep=2)
  try:
    ppo_result = online.run_online(
        state=state, state_shardings=sh, graphdef=ac_graphdef, step_fn=step, rollout_fn=rollout,
        prompt_fn=prompt_fn, reward_fn=reward_fn, advantage_fn=None, num_iterations=p.num_iterations,
        workdir=os.path.join(workdir, "ppo"), put_batch=put, seed=config.seed, epochs=p.epochs,
        num_minibatches=p.num_minibatches, ref_params=sft_params, checkpointer=ck,
        checkpoint_every=config.checkpoint_every, eval_fn=lambda s: evaluate(s.params["policy"]),
        eval_every=config.eval.every, prompt_length=d.max_len + 2, progress=config.progress,
        policy_params_fn=lambda params: params["policy"], policy_graphdef=graphdef, batch_fn=batch_fn,
        run_config=config)
  finally:
    ck.close()
  if ppo_result.preempted:
    return ppo_result
  state, last = ppo_result
  after = evaluate(state.params["policy"])
  result = {"headline": writers.make_headline("gold", before["gold"], after["gold"]),
            "before": before, "after": after, "final_metrics": last}
  writers.write_result(workdir, result, not_printed=("final_metrics",), train_metrics=last, eval_metrics=after)
  return loop.LoopResult(state, last, result, False, ppo_result.start, ppo_result.end)
