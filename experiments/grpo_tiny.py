"""GRPO with a verifiable reward on a generated task, after a short SFT.

Task: sort a digit string. A brief SFT leaves the tiny transformer a partial
sorter; GRPO then samples G answers per prompt, rewards exactly-correct ones
with 1 (a rule checks them), and updates with group-normalised advantages,
the clipped policy loss with DAPO's clip-higher and token-level aggregation.

Command:
  python -m rlhf_jax.run experiments/grpo_tiny.py --workdir runs/grpo_tiny
  python -m rlhf_jax.run experiments/grpo_tiny.py --config.rl.adv_estimator=rloo   # any estimator

Hardware: 2 CPU cores, about 1.5 minutes. Expected (measured): the headline of
``<workdir>/result.json`` is greedy held-out accuracy (256 held-out prompts),
before = the SFT model GRPO starts from (not the untrained model), after = the
GRPO policy: 0.49 -> 0.69-0.70 in 40 iterations of 16 prompts x 8 samples;
tests/test_grpo_experiment.py asserts a rise of at least 0.12. DAPO's dynamic
sampling matters here: with binary rewards most groups agree (all right or all
wrong) and carry no gradient; without it the same run gains only 0.05.
Results: ``<workdir>/result.json``.
Interrupting (SIGTERM, Ctrl-C) stops at the current stage with a checkpoint (exit
143/130); running the command again resumes stage by stage (a finished stage is
restored, not retrained; tests/test_faults.py).
"""

import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from rlhf_jax import advantages, data, models, parallel, sampling
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.errors import ConfigError
from rlhf_jax.train import loop, online, optim, sft, state as state_lib, step as step_lib, writers


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.progress = True
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.model = ml_collections.ConfigDict(dict(name="tiny", dtype="float32"))
  c.data = ml_collections.ConfigDict(dict(task="sorting", min_len=3, max_len=8, seq_len=24, seed=0))
  c.sft = ml_collections.ConfigDict(dict(num_steps=200, batch_size=32, learning_rate=3e-3, checkpoint_every=50))
  c.rl = ml_collections.ConfigDict(dict(
      num_iterations=40, prompts_per_iteration=16, group_size=8, temperature=1.0,
      adv_estimator="grpo", policy_loss="vanilla", clip_ratio_low=0.2, clip_ratio_high=0.28,
      aggregation="token-mean", learning_rate=3e-4, epochs=1, num_minibatches=2,
      old_logps="sampler", kl_coef=0.0, kl_estimator="k3", dynamic_sampling_max_tries=4,
  ))
  c.eval = ml_collections.ConfigDict(dict(num_prompts=256, every=10))
  c.checkpoint_every = 10  # RL iterations
  c.resume_changed = ""  # "ok": resume although model/optimizer/data keys changed since the checkpoint
  if arg == "runlocal":
    c.rl.num_iterations, c.eval.every = 10, 5
  elif arg not in (None, ""):
    raise ConfigError(f"unknown experiment argument {arg!r}; valid: 'runlocal'")
  return c


def greedy_accuracy(graphdef, params, task, prompts, max_new_tokens):
  gen = sampling.make_generate_fn(graphdef, max_new_tokens=max_new_tokens, eos_id=data.EOS_ID)
  ids, mask = sampling.left_pad([data.make_prompt(p) for p in prompts])
  out = jax.device_get(gen(params, ids, mask, jax.random.PRNGKey(0)))
  return float(np.mean([data.is_correct(task, p, t[: int(n)]) for p, t, n in zip(prompts, out.tokens_BxN, out.lengths_B)]))


def main(config, workdir):
  """Runs the stages in order; a stage stopped by SIGTERM/SIGINT ends the run with its (preempted)
  result (``python -m rlhf_jax.run`` exits 143/130), and the next run resumes stage by stage."""
  with loop._StopFlag():  # a signal between stages stops the next stage before its first step
    return _run(config, workdir)


def _run(config, workdir):
  mesh = parallel.make_mesh(dict(config.mesh))
  cfg = models.config_from_section(config.model)
  d, rl = config.data, config.rl
  put = lambda b: parallel.host_local_to_global(b, mesh)
  max_new = d.max_len + 1  # the answer and EOS

  # Stage 1: a short SFT.
  tx, sched = optim.make_optimizer(dict(learning_rate=config.sft.learning_rate, warmup_steps=10,
                                        schedule="constant", max_grad_norm=1.0), total_steps=config.sft.num_steps)
  graphdef, state, shardings = state_lib.create_train_state(
      models.create_sharded_model(cfg, mesh, seed=config.seed), tx, mesh=mesh, seed=config.seed)
  sft_step = step_lib.make_train_step(sft.make_sft_loss(), tx, graphdef, mesh=mesh, state_shardings=shardings)
  batches = data.synthetic_sft_iterator(d.task, batch_size=config.sft.batch_size, seq_len=d.seq_len, seed=d.seed,
                                        min_len=d.min_len, max_len=d.max_len)
  ck = Checkpointer(os.path.join(workdir, "sft", "checkpoints"), max_to_keep=2)
  try:
    sft_result = loop.train_loop(step_fn=sft_step, state=state, batches=batches, num_steps=config.sft.num_steps,
                                 workdir=os.path.join(workdir, "sft"), put_batch=put, checkpointer=ck,
                                 state_shardings=shardings, checkpoint_every=config.sft.checkpoint_every,
                                 progress=config.progress,
                                 run_config=loop.config_subset(config, "seed", "model", "data", "sft",
                                                               "resume_changed"))
  finally:
    ck.close()
  if sft_result.preempted:  # GRPO must start from the finished SFT policy: stop here, resume later
    return sft_result
  sft_state = sft_result.state

  held_rng = np.random.default_rng(d.seed + 4242)
  held_out = [data.make_sft_example(held_rng, d.task, min_len=d.min_len, max_len=d.max_len)[0]
              for _ in range(config.eval.num_prompts)]
  sft_accuracy = greedy_accuracy(graphdef, sft_state.params, d.task, held_out, max_new)

  # Stage 2: GRPO from the SFT policy.
  tx, _ = optim.make_optimizer(dict(learning_rate=rl.learning_rate, schedule="constant", b2=0.98,
                                    max_grad_norm=1.0), total_steps=rl.num_iterations)
  policy = nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), sft_state.params))
  graphdef, state, shardings = state_lib.create_train_state(policy, tx, mesh=mesh, seed=config.seed)
  loss_fn = online.make_policy_loss(
      num_response_tokens=max_new, policy_loss=rl.policy_loss, aggregation=rl.aggregation,
      policy_hparams=dict(clip_ratio_low=rl.clip_ratio_low, clip_ratio_high=rl.clip_ratio_high),
      kl_coef=rl.kl_coef, kl_estimator=rl.kl_estimator)
  step = step_lib.make_train_step(loss_fn, tx, graphdef, mesh=mesh, state_shardings=shardings)
  rollout = online.make_rollout_fn(graphdef, max_new_tokens=max_new,
                                   processor=sampling.processors.temperature(rl.temperature), eos_id=data.EOS_ID)

  def prompt_fn(iteration, attempt=0):
    rng = np.random.default_rng([d.seed, iteration, attempt])
    digits = [data.make_sft_example(rng, d.task, min_len=d.min_len, max_len=d.max_len)[0]
              for _ in range(rl.prompts_per_iteration)]
    prompts = [data.make_prompt(p) for p in digits for _ in range(rl.group_size)]
    return prompts, np.repeat(np.arange(rl.prompts_per_iteration), rl.group_size)

  def reward_fn(prompts, tokens_BxN, lengths_B):
    return np.array([float(data.is_correct(d.task, p[1:-1], t[: int(n)]))
                     for p, t, n in zip(prompts, tokens_BxN, lengths_B)], np.float32)

  estimator = advantages.get(rl.adv_estimator)

  def advantage_fn(rewards_B, mask_BxN, group_ids_B):
    return np.asarray(estimator(rewards_B, mask_BxN, group_ids_B))

  eval_fn = lambda s: {"accuracy": greedy_accuracy(graphdef, s.params, d.task, held_out, max_new)}
  ck = Checkpointer(os.path.join(workdir, "rl", "checkpoints"), max_to_keep=2)
  try:
    rl_result = online.run_online(
        state=state, state_shardings=shardings, graphdef=graphdef, step_fn=step, rollout_fn=rollout,
        prompt_fn=prompt_fn, reward_fn=reward_fn, advantage_fn=advantage_fn, num_iterations=rl.num_iterations,
        workdir=os.path.join(workdir, "rl"), put_batch=put, seed=config.seed, epochs=rl.epochs,
        num_minibatches=rl.num_minibatches, old_logps=rl.old_logps,
        ref_params=sft_state.params if rl.kl_coef else None, checkpointer=ck,
        checkpoint_every=config.checkpoint_every, eval_fn=eval_fn, eval_every=config.eval.every,
        dynamic_sampling_max_tries=rl.dynamic_sampling_max_tries, prompt_length=d.max_len + 2,
        progress=config.progress, run_config=config)
  finally:
    ck.close()
  if rl_result.preempted:
    return rl_result
  state, last = rl_result
  rl_accuracy = greedy_accuracy(graphdef, state.params, d.task, held_out, max_new)
  result = {"headline": writers.make_headline("greedy_accuracy", sft_accuracy, rl_accuracy),  # sft -> rl
            "sft_accuracy": sft_accuracy, "rl_accuracy": rl_accuracy}
  result["improvement"] = result["rl_accuracy"] - result["sft_accuracy"]
  result["final_metrics"] = last
  writers.write_result(workdir, result, not_printed=("final_metrics",), train_metrics=last,
                       eval_metrics={"accuracy": rl_accuracy})
  return loop.LoopResult(state, last, result, False, rl_result.start, rl_result.end)
