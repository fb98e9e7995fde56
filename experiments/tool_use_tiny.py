"""Multi-turn GRPO with a calculator tool, after an SFT warm-start on flawed demonstrations.

Task: arithmetic word problems generated in code, in four phrasings (``what is 37*12+5?``,
``37 times 12 plus 5?``, ``37 plus 12 times 5?``, ``37 minus 12, times 5?``). The tiny
transformer (character tokenizer, the tool tags as single tokens) cannot multiply two-digit
numbers itself; it can call ``<call>calc(37*12+5)</call>``, read ``<result>449</result>`` and
answer ``<answer>449</answer>`` (``rlhf_jax.envs.CalculatorEnv``: reward 1 for the right
number).

1. SFT on scripted episodes played against the real environment
   (``rlhf_jax.sampling.scripted_episode``), trained on assistant tokens only. The demonstrator is
   flawed: for the last two phrasings it mostly answers directly with a wrong guess
   (``demo.call_rate`` per phrasing), and some of its calls slip a digit
   (``--config.demo.malformed=0.1`` adds unclosed calls, the error observation and a retry).
2. GRPO over multi-turn episodes (``rlhf_jax.sampling.make_multiturn_rollout_fn`` through
   ``EpisodeSource`` into ``rlhf_jax.train.online.run_online``): G episodes per problem, up to
   ``env.max_turns`` turns, observation tokens masked out of the loss, the clipped policy loss
   with DAPO's clip-higher, token-mean aggregation and dynamic sampling.

Command:
  python -m rlhf_jax.run experiments/tool_use_tiny.py --workdir runs/tool_use_tiny
  python -m rlhf_jax.run experiments/tool_use_tiny.py:runlocal --workdir runs/tool_use_tiny_local

Hardware: 2 CPU cores. The headline of ``<workdir>/result.json`` is greedy held-out accuracy
(256 held-out problems, multi-turn with the tool), before = the SFT model GRPO starts from,
after = the GRPO policy. Measured (seed 0; times on 2 cores shared with other jobs):

=================================  ==========  ===============  ==============  ==========================
run                                iterations  greedy accuracy  tool-call rate  time
=================================  ==========  ===============  ==============  ==========================
``:runlocal``                      10          0.51 -> 0.73     0.57 -> 1.00    ~1.5 min alone, 3 shared
default                            20          0.51 -> 0.73     0.57 -> 1.00    ~3.5 min (shared cores)
``--config.rl.num_iterations=40``  40          0.51 -> 0.74     0.57 -> 0.99    ~7 min (shared cores)
=================================  ==========  ===============  ==============  ==========================

The SFT model calls the tool for the first two phrasings and guesses for the other two.
GRPO's episodes that called the tool for those two phrasings earn reward 1, and within 10
iterations the policy calls the tool for every phrasing. The gain then plateaus. The remaining
errors are digit slips when the model copies the problem into the call or the result into the
answer, which the binary reward corrects only slowly. ``tests/test_tool_use_experiment.py``
asserts a rise of at least 0.15 at ``:runlocal``. ``result.json`` also records, before and
after, the held-out tool-call rate and the counted tool errors: malformed calls, unknown tools,
bad arguments, tool errors and timeouts, and turns without an action. The per-iteration episode
metrics are in ``<workdir>/rl/episodes.jsonl``.
Interrupting (SIGTERM, Ctrl-C) stops at the current stage with a checkpoint; running the command
again resumes stage by stage.
"""

import functools
import json
import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from rlhf_jax import advantages, envs, models, parallel, sampling
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.data import BatchIterator
from rlhf_jax.errors import ConfigError
from rlhf_jax.train import loop, online, optim, sft, state as state_lib, step as step_lib, writers

TOKENIZER = envs.CharTokenizer()

CONFIG_HELP = {
    "resume_changed": "ok: resume although model/optimizer/data keys changed since the checkpoint",
    "env.max_turns": "assistant turns per episode at most",
    "env.max_calls": "executed tool calls per episode at most (more are counted errors)",
    "env.max_prompt_tokens": "P: prompt width in tokens",
    "env.max_response_tokens": "N: the response window (all turns: assistant and observation tokens)",
    "env.max_turn_tokens": "tokens one assistant turn may generate",
    "env.error_penalty": "reward per counted tool error in a turn (e.g. -0.1)",
    "env.format_bonus": "reward added to any final <answer> (format term)",
    "demo.call_rate": "per phrasing (TEMPLATES order): the fraction of demonstrations that use the tool",
    "demo.malformed": "of the tool demonstrations: the fraction with an unclosed call first, an error "
                      "observation, then the right call (> 0 lengthens SFT rows from 56 to 88 tokens)",
    "demo.slip": "of the tool demonstrations: the fraction whose call slips a digit (wrong answer)",
}


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.progress = True
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.model = ml_collections.ConfigDict(dict(name="tiny", dtype="float32", vocab_size=TOKENIZER.vocab_size))
  c.env = ml_collections.ConfigDict(dict(max_turns=4, max_calls=2, max_prompt_tokens=24, max_response_tokens=64,
                                         max_turn_tokens=18, error_penalty=0.0, format_bonus=0.0))
  c.demo = ml_collections.ConfigDict(dict(call_rate=(0.95, 0.85, 0.3, 0.2), malformed=0.0, slip=0.05, seed=0))
  c.sft = ml_collections.ConfigDict(dict(num_steps=300, batch_size=32, learning_rate=3e-3, checkpoint_every=100))
  c.rl = ml_collections.ConfigDict(dict(
      num_iterations=20, prompts_per_iteration=16, group_size=8, temperature=1.0,
      adv_estimator="grpo", policy_loss="vanilla", clip_ratio_low=0.2, clip_ratio_high=0.28,
      aggregation="token-mean", learning_rate=3e-4, epochs=1, num_minibatches=2,
      old_logps="sampler", kl_coef=0.0, kl_estimator="k3", dynamic_sampling_max_tries=3,
  ))
  c.eval = ml_collections.ConfigDict(dict(num_prompts=256, every=10))
  c.checkpoint_every = 10  # RL iterations
  c.resume_changed = ""  # "ok": resume although model/optimizer/data keys changed since the checkpoint
  if arg == "runlocal":
    c.rl.num_iterations, c.eval.every = 10, 5
  elif arg not in (None, ""):
    raise ConfigError(f"unknown experiment argument {arg!r}; valid: 'runlocal'")
  return c


def _make_env(e):
  return envs.CalculatorEnv(max_calls=e.max_calls, error_penalty=e.error_penalty, format_bonus=e.format_bonus,
                            error_detail=False)


def _demo_kind(rng, template: int, demo) -> str:
  if rng.random() >= demo.call_rate[template]:
    return "direct"
  u = rng.random()
  return "malformed" if u < demo.malformed else "slip" if u < demo.malformed + demo.slip else "tool"


def make_demo_batch(index: int, *, config, renderer) -> dict:
  """SFT batch ``index``: scripted episodes of the flawed demonstrator (a pure function of the index)."""
  e, demo = config.env, config.demo
  rng = np.random.default_rng([demo.seed, index])
  episodes = []
  for _ in range(config.sft.batch_size):
    row = envs.make_arithmetic_problem(rng)
    turns = envs.demonstration(row, rng, _demo_kind(rng, row["template"], demo))
    episodes.append(sampling.scripted_episode(_make_env(e), row, renderer, turns))
  return sampling.sft_batch(episodes, seq_len=sft_seq_len(config), pad_id=TOKENIZER.pad_id)


def sft_seq_len(config) -> int:
  """SFT row width: the longest demonstration (22-token prompt; a recovery demonstration is 83 tokens,
  the others at most 51), capped by the episode window."""
  return min(config.env.max_prompt_tokens + config.env.max_response_tokens, 88 if config.demo.malformed > 0 else 56)


def make_evaluator(graphdef, config, renderer, rows):
  """``evaluate(params) -> metrics`` of greedy multi-turn episodes on ``rows`` (one compiled sampler)."""
  e = config.env
  greedy = sampling.make_multiturn_rollout_fn(
      graphdef, renderer=renderer, max_turns=e.max_turns, max_prompt_tokens=e.max_prompt_tokens,
      max_response_tokens=e.max_response_tokens, max_turn_tokens=e.max_turn_tokens, processor=None)

  def evaluate(params) -> dict:
    ep = greedy(params, [_make_env(e) for _ in rows], rows, jax.random.PRNGKey(0))
    called = [any(i.get("tool_calls", 0) for i in infos) for infos in ep.infos]
    return {"accuracy": float(np.mean(ep.rewards_B > 0)), "tool_call_rate": float(np.mean(called)),
            "turns": ep.metrics["turns"],
            **{k: v for k, v in ep.metrics.items() if k.startswith("errors/")}}

  return evaluate


def _trim_episodes(path: str, last_step: int) -> None:
  """Keeps the rows of iterations up to ``last_step`` (every draw of each: one row per attempt)."""
  with open(path) as f:
    rows = [line for line in f if line.strip()]
  kept = []
  for line in rows:
    try:
      if json.loads(line)["step"] <= last_step:
        kept.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError):  # a torn last line
      pass
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)


def main(config, workdir):
  """Runs the stages in order; a stage stopped by SIGTERM/SIGINT ends the run with its (preempted)
  result (``python -m rlhf_jax.run`` exits 143/130), and the next run resumes stage by stage."""
  with loop._StopFlag():  # a signal between stages stops the next stage before its first step
    return _run(config, workdir)


def _run(config, workdir):
  if config.model.vocab_size < TOKENIZER.vocab_size:
    raise ConfigError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the character "
                      f"tokenizer's {TOKENIZER.vocab_size}")
  if len(config.demo.call_rate) != len(envs.TEMPLATES):
    raise ConfigError(f"config.demo.call_rate needs {len(envs.TEMPLATES)} values (one per phrasing)")
  mesh = parallel.make_mesh(dict(config.mesh))
  cfg = models.config_from_section(config.model)
  e, rl = config.env, config.rl
  put = lambda b: parallel.host_local_to_global(b, mesh)
  renderer = envs.PlainRenderer(TOKENIZER, stop_strings=_make_env(e).stop_strings)

  # Stage 1: SFT on the flawed demonstrations (assistant tokens only).
  tx, _ = optim.make_optimizer(dict(learning_rate=config.sft.learning_rate, warmup_steps=10,
                                    schedule="constant", max_grad_norm=1.0), total_steps=config.sft.num_steps)
  graphdef, state, shardings = state_lib.create_train_state(
      models.create_sharded_model(cfg, mesh, seed=config.seed), tx, mesh=mesh, seed=config.seed)
  sft_step = step_lib.make_train_step(sft.make_sft_loss(), tx, graphdef, mesh=mesh, state_shardings=shardings)
  batches = BatchIterator(functools.partial(make_demo_batch, config=config, renderer=renderer))
  ck = Checkpointer(os.path.join(workdir, "sft", "checkpoints"), max_to_keep=2)
  try:
    sft_result = loop.train_loop(step_fn=sft_step, state=state, batches=batches, num_steps=config.sft.num_steps,
                                 workdir=os.path.join(workdir, "sft"), put_batch=put, checkpointer=ck,
                                 state_shardings=shardings, checkpoint_every=config.sft.checkpoint_every,
                                 progress=config.progress,
                                 run_config=loop.config_subset(config, "seed", "model", "env", "demo", "sft",
                                                               "resume_changed"))
  finally:
    ck.close()
  if sft_result.preempted:  # GRPO must start from the finished SFT policy: stop here, resume later
    return sft_result
  sft_state = sft_result.state

  held_rng = np.random.default_rng(config.seed + 4242)
  held_out = [envs.make_arithmetic_problem(held_rng) for _ in range(config.eval.num_prompts)]
  evaluate = make_evaluator(graphdef, config, renderer, held_out)
  before = evaluate(sft_state.params)

  # Stage 2: GRPO over multi-turn episodes from the SFT policy.
  tx, _ = optim.make_optimizer(dict(learning_rate=rl.learning_rate, schedule="constant", b2=0.98,
                                    max_grad_norm=1.0), total_steps=rl.num_iterations)
  policy = nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), sft_state.params))
  graphdef, state, shardings = state_lib.create_train_state(policy, tx, mesh=mesh, seed=config.seed)
  loss_fn = online.make_policy_loss(
      num_response_tokens=e.max_response_tokens, policy_loss=rl.policy_loss, aggregation=rl.aggregation,
      policy_hparams=dict(clip_ratio_low=rl.clip_ratio_low, clip_ratio_high=rl.clip_ratio_high),
      kl_coef=rl.kl_coef, kl_estimator=rl.kl_estimator)
  step = step_lib.make_train_step(loss_fn, tx, graphdef, mesh=mesh, state_shardings=shardings)
  rollout = sampling.make_multiturn_rollout_fn(
      graphdef, renderer=renderer, max_turns=e.max_turns, max_prompt_tokens=e.max_prompt_tokens,
      max_response_tokens=e.max_response_tokens, max_turn_tokens=e.max_turn_tokens,
      processor=sampling.processors.temperature(rl.temperature))

  def rows_fn(iteration, attempt=0):
    rng = np.random.default_rng([config.seed, iteration, attempt])
    problems = [envs.make_arithmetic_problem(rng) for _ in range(rl.prompts_per_iteration)]
    rows = [p for p in problems for _ in range(rl.group_size)]
    return rows, np.repeat(np.arange(rl.prompts_per_iteration), rl.group_size)

  rl_dir = os.path.join(workdir, "rl")
  episodes_path = os.path.join(rl_dir, "episodes.jsonl")
  ck = Checkpointer(os.path.join(rl_dir, "checkpoints"), max_to_keep=2)
  if os.path.exists(episodes_path):  # a resumed run rewrites the iterations after its checkpoint
    _trim_episodes(episodes_path, ck.latest_step() or 0)

  def on_episodes(iteration, attempt, ep):
    if jax.process_index() == 0:
      os.makedirs(rl_dir, exist_ok=True)
      with open(episodes_path, "a") as f:
        f.write(json.dumps({"step": iteration + 1, "attempt": attempt, **ep.metrics}) + "\n")

  source = sampling.EpisodeSource(rollout, lambda row: _make_env(e), rows_fn, on_episodes=on_episodes)
  estimator = advantages.get(rl.adv_estimator)

  def advantage_fn(rewards_B, mask_BxN, group_ids_B):
    return np.asarray(estimator(rewards_B, mask_BxN, group_ids_B))

  try:
    rl_result = online.run_online(
        state=state, state_shardings=shardings, graphdef=graphdef, step_fn=step, rollout_fn=source.rollout_fn,
        prompt_fn=source.prompt_fn, reward_fn=source.reward_fn, advantage_fn=advantage_fn,
        num_iterations=rl.num_iterations, workdir=rl_dir, put_batch=put, seed=config.seed, epochs=rl.epochs,
        num_minibatches=rl.num_minibatches, old_logps=rl.old_logps,
        ref_params=sft_state.params if rl.kl_coef else None, checkpointer=ck,
        checkpoint_every=config.checkpoint_every, eval_fn=lambda s: evaluate(s.params),
        eval_every=config.eval.every, dynamic_sampling_max_tries=rl.dynamic_sampling_max_tries,
        prompt_length=e.max_prompt_tokens, pad_id=TOKENIZER.pad_id, progress=config.progress, run_config=config)
  finally:
    ck.close()
  if rl_result.preempted:
    return rl_result
  state, last = rl_result
  after = evaluate(state.params)
  result = {"headline": writers.make_headline("greedy_accuracy", before["accuracy"], after["accuracy"]),
            "sft_accuracy": before["accuracy"], "rl_accuracy": after["accuracy"],
            "improvement": after["accuracy"] - before["accuracy"],
            "sft_tool_call_rate": before["tool_call_rate"], "rl_tool_call_rate": after["tool_call_rate"],
            "sft_eval": before, "rl_eval": after, "final_metrics": last}
  writers.write_result(workdir, result, not_printed=("final_metrics", "sft_eval", "rl_eval"), train_metrics=last,
                       eval_metrics={"accuracy": after["accuracy"], "tool_call_rate": after["tool_call_rate"]},
                       paths={"episodes": episodes_path})
  return loop.LoopResult(state, last, result, False, rl_result.start, rl_result.end)
