"""Online RL on your own model, prompts and reward functions: the GRPO family, and PPO with a critic.

Each iteration takes ``batch_size`` prompts of ``data.train_files`` (``prompt`` rows: a prompt
and any extra columns, or GSM8K rows), samples ``group_size`` completions of each with the
jitted KV-cache sampler, scores them with the reward functions (TRL's ``reward_funcs``:
``--config.reward.fns="('my_rewards.py:correct', 'rlhf_jax.rewards:format_reward')"`` with
``reward.weights``; a reward-model run as ``reward.model_path``), turns rewards into
advantages (``adv_estimator``: grpo, dr_grpo, rloo, reinforce_plus_plus, remax, ... of
``rlhf_jax.advantages``) and takes ``ppo_epochs`` x ``num_minibatches`` steps of the policy
loss (``loss_mode``: vanilla, gspo, cispo, ... with ``loss_agg_mode``, clip-higher, an
optional KL to the initial policy and entropy bonus). DAPO's dynamic sampling redraws prompts
whose groups all agree (``dynamic_sampling_max_tries``). ``--config.algorithm=ppo`` trains a
critic beside the policy (GAE, value clipping, KL-in-reward, reward normalisation).
With LoRA the frozen base is the KL reference.

A reward function is ``fn(completions: list[str], prompts: list[str], **row_fields) -> list[float]``
(the prompt file's extra columns arrive as keyword lists) or a per-row
``fn(completion, **row_fields) -> float`` such as ``rlhf_jax.rewards:math_reward`` (its
``reference`` is the row's ``answer``); see ``rlhf_jax.train.reward_fns``. Exceptions, ``None``
and non-finite values are counted (``reward/<name>_failures``) and get ``reward.default``.

Command:
  python -m rlhf_jax.run experiments/sft.py --workdir runs/sft      # a tiny model that answers sums
  python -m rlhf_jax.run experiments/grpo.py --config.model.path=runs/sft --workdir runs/grpo \\
      --config.optimizer.learning_rate=3e-4 --config.dynamic_sampling_max_tries=4   # 0.16 -> 0.25, 30 s
  python -m rlhf_jax.run experiments/grpo.py --config.model.path=smollm2 --config.lora.rank=8 \\
      --config.data.train_files=my_prompts.jsonl --config.reward.fns=my_rewards.py:correct --workdir runs/grpo_smollm2
  python -m rlhf_jax.run experiments/grpo.py --help

Headline (``result.json``): the mean reward of held-out prompts (greedy decoding, or sampled
with ``eval_sampling=sampled``), before -> after. Sample completions with their rewards go to
``samples.jsonl`` and TensorBoard text at each evaluation.
"""

import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from rlhf_jax import advantages as adv_lib
from rlhf_jax import losses as losses_lib
from rlhf_jax import sampling
from rlhf_jax.train import evaluation, online, recipe

CONFIG_HELP = {
    **recipe.SHARED_HELP,
    "num_steps": "iterations (sample, score, update); 0 = num_epochs passes over the prompts",
    "batch_size": "prompts per iteration (each sampled group_size times)",
    "max_len": "prompt + completion tokens; completions get max_len - max_prompt_len new tokens",
    "eval_every": "held-out evaluation (and sample logging) every N iterations (0 = before and after only)",
    "save_every": "checkpoint every N iterations (0 = at the end and on SIGTERM/SIGINT only)",
    "algorithm": "grpo (critic-free, advantages from adv_estimator) or ppo (a critic, GAE)",
    "group_size": "completions sampled per prompt (TRL num_generations)",
    "temperature": "sampling temperature",
    "top_p": "nucleus sampling mass (1 = off)",
    "top_k": "top-k sampling (0 = off)",
    "adv_estimator": "advantage estimator of algorithm=grpo (verl's names; ppo always uses gae): " + ", ".join(
        n for n in adv_lib.names() if n != "gae"),
    "loss_mode": "policy loss (verl's loss_mode): " + ", ".join(
        n for n in losses_lib.names() if losses_lib.info(n).kind == "policy"),
    "loss_agg_mode": "token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm",
    "clip_ratio_low": "PPO clip range below 1",
    "clip_ratio_high": "PPO clip range above 1 (DAPO clip-higher: 0.28)",
    "kl_coef": "KL penalty to the initial policy (TRL beta; in the reward for ppo); 0 = none",
    "kl_estimator": "KL estimator: k1, k2, k3, low_var_kl, ...",
    "entropy_coef": "entropy bonus",
    "ppo_epochs": "passes over each iteration's samples",
    "num_minibatches": "optimizer steps per pass (the samples are split into this many minibatches)",
    "old_logps": "sampler (the sampler's log-probs) or recompute (the trainer's forward)",
    "dynamic_sampling_max_tries": "DAPO dynamic sampling: redraw groups with identical rewards up to N times (0 = off)",
    **recipe.REWARD_HELP,
    "eval_sampling": "held-out evaluation decodes greedy or sampled (with the training temperature)",
    "log_samples": "sample completions written to samples.jsonl and TensorBoard at each evaluation",
    "critic.path": "ppo: initialise the critic from this reward_model run (empty: the policy with a fresh head)",
    "critic.vf_coef": "ppo: value-loss coefficient",
    "critic.value_clip": "ppo: value clipping range (0 = none)",
    "critic.gamma": "ppo: GAE discount",
    "critic.lam": "ppo: GAE lambda",
    "critic.normalize_rewards": "ppo: normalise rewards with running statistics",
    "critic.reward_clip": "ppo: clip normalised rewards to +-this (0 = none)",
    "critic.whiten_advantages": "ppo: whiten advantages per batch",
    "critic.value_head": "ppo: scalar (squared error, value_clip) or hl_gauss (categorical head, HL-Gauss loss)",
    "critic.num_bins": "ppo, hl_gauss: bins of the categorical head",
    "critic.v_min": "ppo, hl_gauss: lower end of the value support (after reward normalisation)",
    "critic.v_max": "ppo, hl_gauss: upper end of the value support",
}


def get_config(arg=None):
  c = recipe.shared_config(learning_rate=1e-4, batch_size=8, max_len=112, max_prompt_len=96, num_epochs=0)
  c.num_steps = 30
  c.optimizer.schedule = "constant"
  c.optimizer.b2 = 0.98
  c.algorithm = "grpo"
  c.group_size = 8
  c.temperature = 1.0
  c.top_p = 1.0
  c.top_k = 0
  c.adv_estimator = "grpo"
  c.loss_mode = "vanilla"
  c.loss_agg_mode = "token-mean"
  c.clip_ratio_low = 0.2
  c.clip_ratio_high = 0.28
  c.kl_coef = 0.0
  c.kl_estimator = "k3"
  c.entropy_coef = 0.0
  c.ppo_epochs = 1
  c.num_minibatches = 1
  c.old_logps = "sampler"
  c.dynamic_sampling_max_tries = 0
  c.reward = recipe.reward_config()
  c.eval_sampling = "greedy"
  c.eval_batch_size = 32
  c.data.max_eval_examples = 64
  c.log_samples = 4
  c.critic = ml_collections.ConfigDict(dict(path="", vf_coef=0.5, value_clip=0.2, gamma=1.0, lam=0.95,
                                            normalize_rewards=True, reward_clip=5.0, whiten_advantages=True,
                                            value_head="scalar", num_bins=51, v_min=-10.0, v_max=10.0))
  if arg == "runlocal":
    c.num_steps = 6
  elif arg not in (None, ""):
    raise recipe.ConfigError(f"unknown experiment argument {arg!r}; valid: 'runlocal'")
  return c


def _check(config):
  recipe.check_choice("algorithm", config.algorithm, ("grpo", "ppo"))
  recipe.check_choice("adv_estimator", config.adv_estimator, adv_lib.names())
  if config.algorithm == "grpo" and config.adv_estimator == "gae":
    raise recipe.ConfigError("config.adv_estimator=gae needs a critic: set config.algorithm=ppo")
  if config.algorithm == "ppo" and config.adv_estimator not in ("gae", "grpo"):
    raise recipe.ConfigError(f"config.algorithm=ppo computes advantages with GAE; config.adv_estimator="
                             f"{config.adv_estimator!r} is for algorithm=grpo (leave it, or set gae)")
  recipe.check_choice("loss_mode", config.loss_mode,
                      [n for n in losses_lib.names() if losses_lib.info(n).kind == "policy"])
  recipe.check_choice("old_logps", config.old_logps, ("sampler", "recompute"))
  recipe.check_choice("eval_sampling", config.eval_sampling, ("greedy", "sampled"))
  from rlhf_jax import ops

  try:
    ops.get_aggregation(config.loss_agg_mode)
  except ValueError as e:
    raise recipe.ConfigError(f"config.loss_agg_mode: {e}") from None
  if config.group_size < 1 or (config.algorithm == "grpo" and config.group_size < 2):
    raise recipe.ConfigError(f"config.group_size={config.group_size}: grpo needs at least 2 samples per prompt")
  if config.algorithm == "ppo" and config.lora.rank > 0:
    raise recipe.ConfigError("config.algorithm=ppo trains the policy and the critic in full: set config.lora.rank=0 "
                             "(LoRA works with algorithm=grpo)")
  if config.adv_estimator == "remax" and config.dynamic_sampling_max_tries:
    raise recipe.ConfigError("config.adv_estimator=remax scores a greedy baseline per sample: it does not combine "
                             "with config.dynamic_sampling_max_tries > 0")


def policy_hparams(config) -> dict:
  """``clip_ratio_low`` / ``clip_ratio_high`` for the policy losses that take them (``gpg``, ``reinforce``,
  ``sapo``, ... have no clip range)."""
  import inspect

  params = inspect.signature(losses_lib.get(config.loss_mode)).parameters
  hp = {"clip_ratio_low": float(config.clip_ratio_low), "clip_ratio_high": float(config.clip_ratio_high)}
  return {k: v for k, v in hp.items() if k in params}


def _processor(config):
  procs = [sampling.processors.temperature(float(config.temperature))]
  if config.top_k:
    procs.append(sampling.processors.top_k(int(config.top_k)))
  if config.top_p < 1.0:
    procs.append(sampling.processors.top_p(float(config.top_p)))
  return sampling.processors.chain(*procs)


def main(config, workdir):
  _check(config)
  data = recipe.load_data(config, allowed_kinds=("prompt", "prompt_answer"), workdir=workdir,
                          generate=lambda split, n: recipe.demo_rows("prompt", split, n, seed=config.seed))
  rewards = recipe.load_rewards(config, data)
  recipe.check_lengths(config)
  prompt_len, max_new = int(config.max_prompt_len), int(config.max_len - config.max_prompt_len)
  mesh = recipe.make_mesh(config.mesh)
  model, tok, info = recipe.build_model(config, mesh)
  rewards.attach(tok, mesh, prompt_len)
  iters = recipe.num_train_steps(config, len(data.train))
  tx, schedule = recipe.make_optimizer(config, iters * config.ppo_epochs * config.num_minibatches)
  ppo_mode = config.algorithm == "ppo"
  from rlhf_jax.data import tokenize
  from rlhf_jax.train import ppo

  policy_graphdef = nnx.graphdef(model)  # base + adapters under LoRA: what the sampler runs
  copy = lambda tree: jax.tree.map(lambda x: x.copy(), tree)
  categorical = None
  if ppo_mode:
    from rlhf_jax import models

    recipe.check_choice("critic.value_head", config.critic.value_head, ("scalar", "hl_gauss"))
    outputs = 1
    if config.critic.value_head == "hl_gauss":
      if not (int(config.critic.num_bins) >= 2 and float(config.critic.v_max) > float(config.critic.v_min)):
        raise recipe.ConfigError(f"config.critic: hl_gauss needs num_bins >= 2 and v_max > v_min; got "
                                 f"num_bins={config.critic.num_bins}, v_min={config.critic.v_min}, "
                                 f"v_max={config.critic.v_max}")
      categorical = ppo.CategoricalValue(int(config.critic.num_bins), float(config.critic.v_min),
                                         float(config.critic.v_max))
      outputs = categorical.num_bins
    if config.critic.path:
      critic, _ = recipe.load_run(config.critic.path, merge=True, mesh=mesh)
      if not critic.config.scalar_head_outputs:
        raise recipe.ConfigError(f"config.critic.path={config.critic.path!r} is not a reward_model run")
      if outputs != critic.config.scalar_head_outputs:  # the reward model's backbone, a fresh categorical head
        critic = models.with_scalar_head(critic, outputs, seed=config.seed + 1, mesh=mesh, replace=True)
    else:
      critic = models.with_scalar_head(nnx.merge(policy_graphdef, copy(nnx.state(model))), outputs,
                                       seed=config.seed + 1, mesh=mesh)
    ref = copy(nnx.state(model))
    graphdef, state, shardings = recipe.create_state(ppo.ActorCritic(model, critic), tx, config, mesh, info,
                                                     extras=ppo.init_extras(bool(config.critic.normalize_rewards)))
    state_params = lambda s: s.params["policy"]
    ref_params = ref
  else:
    graphdef, state, shardings = recipe.create_state(model, tx, config, mesh, info)
    if info["lora"]:
      init_adapters = copy(state.params)  # B = 0: base + these adapters is the base itself
      state_params = lambda s: recipe.params_of(s)
      ref_params = (lambda s: nnx.merge_state(s.extras["frozen_params"], init_adapters)) if config.kl_coef else None
    else:
      state_params = lambda s: s.params
      ref_params = copy(state.params) if config.kl_coef else None
  del model

  policy_kw = dict(policy_loss=config.loss_mode, aggregation=config.loss_agg_mode,
                   policy_hparams=policy_hparams(config), entropy_coef=float(config.entropy_coef))
  if ppo_mode:
    loss_fn = ppo.make_ppo_loss(num_response_tokens=max_new, vf_coef=float(config.critic.vf_coef),
                                value_clip=float(config.critic.value_clip) or None, categorical=categorical,
                                **policy_kw)
  else:
    loss_fn = online.make_policy_loss(num_response_tokens=max_new, kl_coef=float(config.kl_coef),
                                      kl_estimator=config.kl_estimator, **policy_kw)
  step = recipe.make_step(loss_fn, tx, graphdef, config, mesh, shardings, schedule, info)
  put = recipe.put_fn(mesh)
  rollout = online.make_rollout_fn(policy_graphdef, max_new_tokens=max_new, processor=_processor(config),
                                   eos_id=tok.eos_id, pad_id=tok.pad_id)

  # Prompts: tokenised once (the chat template's generation prompt; truncation policy of the config).
  train_tokens = recipe.prompt_tokens(config, tok, data.train, data.token_stats)
  eval_tokens = recipe.prompt_tokens(config, tok, data.eval, tokenize.new_token_stats())
  g, p = int(config.group_size), int(config.batch_size)
  if len(data.train) < p:
    raise recipe.UserError(f"config.batch_size={p} exceeds the {len(data.train)} training prompts")
  per_epoch = len(data.train) // p
  current = {}

  def prompt_fn(iteration, attempt=0):
    epoch, k = divmod(iteration * max(config.dynamic_sampling_max_tries, 1) + attempt, per_epoch)
    order = np.random.default_rng([config.seed, epoch]).permutation(len(data.train))
    idx = order[k * p:(k + 1) * p]
    current["examples"] = [data.train[i] for i in idx for _ in range(g)]
    return [train_tokens[i] for i in idx for _ in range(g)], np.repeat(np.arange(p), g)

  def reward_fn(prompts, tokens_BxN, lengths_B):
    return rewards(current["examples"], prompts, tokens_BxN, lengths_B)[0]

  estimator = adv_lib.get(config.adv_estimator)

  def advantage_fn(rewards_B, mask_BxN, group_ids_B):
    return np.asarray(estimator(rewards_B, mask_BxN, group_ids_B))

  batch_fn = None
  if ppo_mode:
    batch_fn = ppo.make_ppo_batch_fn(graphdef, num_response_tokens=max_new, put_batch=put,
                                     kl_coef=float(config.kl_coef), gamma=float(config.critic.gamma),
                                     lam=float(config.critic.lam),
                                     reward_clip=float(config.critic.reward_clip) or None,
                                     normalize_rewards=bool(config.critic.normalize_rewards),
                                     whiten_advantages=bool(config.critic.whiten_advantages),
                                     categorical=categorical)
  elif config.adv_estimator == "remax":
    greedy = online.make_rollout_fn(policy_graphdef, max_new_tokens=max_new, processor=None, eos_id=tok.eos_id,
                                    pad_id=tok.pad_id)
    batch_fn = online.make_remax_batch_fn(greedy, reward_fn, state_params_fn=state_params)

  # Held-out evaluation: mean reward of the held-out prompts (greedy, or sampled), with samples logged.
  eval_rollout = online.make_rollout_fn(policy_graphdef, max_new_tokens=max_new,
                                        processor=None if config.eval_sampling == "greedy" else _processor(config),
                                        eos_id=tok.eos_id, pad_id=tok.pad_id)
  held_out = evaluation.make_generation_eval(
      eval_rollout, eval_tokens,
      lambda idx, prompts, tokens, lengths: rewards([data.eval[i] for i in idx], prompts, tokens, lengths),
      batch_size=int(config.eval_batch_size), prompt_length=prompt_len, pad_id=tok.pad_id, seed=config.seed + 99)
  samples = evaluation.SampleLog(workdir, num_samples=int(config.log_samples))
  eval_prompts = [recipe.last_user_text(ex["prompt"]) for ex in data.eval]

  def evaluate(s, step_index):
    metrics, texts, rewards_B = held_out(state_params(s))
    samples.write(step_index, eval_prompts, texts, rewards_B)
    return metrics

  before = evaluate(state, 0)
  steps_per_iteration = int(config.ppo_epochs) * int(config.num_minibatches)

  def eval_fn(s):
    m = evaluate(s, int(jax.device_get(s.step)) // steps_per_iteration)
    m.update(rewards.failure_metrics())
    return m

  from rlhf_jax.checkpoint import Checkpointer

  ck = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=max(int(config.keep_checkpoints), 1),
                    unsaved_extras=("frozen_params", "ref_params"))
  try:
    res = online.run_online(
        state=state, state_shardings=shardings, graphdef=graphdef, step_fn=step, rollout_fn=rollout,
        prompt_fn=prompt_fn, reward_fn=reward_fn, advantage_fn=None if batch_fn else advantage_fn,
        num_iterations=iters, workdir=workdir, put_batch=put, seed=config.seed, epochs=int(config.ppo_epochs),
        num_minibatches=int(config.num_minibatches), old_logps=config.old_logps, ref_params=ref_params,
        checkpointer=ck, checkpoint_every=int(config.save_every), eval_fn=eval_fn,
        eval_every=int(config.eval_every), dynamic_sampling_max_tries=int(config.dynamic_sampling_max_tries),
        prompt_length=prompt_len, pad_id=tok.pad_id, progress=bool(config.progress), state_params_fn=state_params,
        policy_graphdef=policy_graphdef, batch_fn=batch_fn,
        run_config={**recipe.run_config("grpo", config)},
        plot_keys=("reward_mean", "eval/reward_mean", "kl", "entropy", "clip_fraction", "response_length"))
  finally:
    ck.close()
    samples.close()
  if res.preempted:
    return res
  after = evaluate(res.state, res.end)
  after.update(rewards.failure_metrics())
  paths = recipe.export(config, graphdef if not ppo_mode else policy_graphdef,
                        res.state if not ppo_mode else res.state._replace(params=res.state.params["policy"]),
                        tok, info=info)
  from rlhf_jax.train import loop

  out = loop.LoopResult(res.state, res.last_metrics, after, res.preempted, res.start, res.end, res.signum)
  out.result = recipe.finish(
      workdir, metric="reward_mean", before=before, after=after, res=out, paths=paths,
      extra={"model": info["source"], "data_format": data.format, "algorithm": config.algorithm,
             "num_train_prompts": len(data.train), "num_eval_prompts": len(data.eval),
             "reward_failures": dict(rewards.failures), "token_stats": dict(data.token_stats)})
  return out
