"""Online preference optimisation on a task with a known gold judge, after SFT.

Task (as ``dpo_tiny``): a prompt is a digit string; the SFT stage teaches the tiny
transformer to answer with the digits sorted ascending or descending, half of the
time each. A gold judge prefers ascending: ``r(y) = 1[y sorts the prompt
ascending] + 0.5·sortedness(y)``. Each iteration the loop samples completions for
fresh prompts, the judge scores them, pairs are built and the policy takes DPO
steps (:mod:`rlhf_jax.train.online_preference`, :func:`rlhf_jax.train.iterative.run_iterations`).

``config.algorithm`` picks a preset (``online_dpo``, ``iterative_dpo``, ``xpo``,
``inpo``, ``dno``, ``rso``, ``egpo``, ``sharpening``, ``dice``, ``spin``, ``nash_md``; see
``ALGORITHMS`` there); ``config.online.source=reference`` is the *offline* control:
the same loop, the same number of prompts, samples and steps, but every pair is
sampled from the SFT model (what an offline DPO dataset of the SFT model holds).

Command:
  python -m rlhf_jax.run experiments/online_dpo_tiny.py --workdir runs/online_dpo_tiny
  python -m rlhf_jax.run experiments/online_dpo_tiny.py --workdir runs/offline --config.online.source=reference
  python -m rlhf_jax.run experiments/online_dpo_tiny.py --config.algorithm=xpo   # or inpo, dno, iterative_dpo, ...

Hardware: 2 CPU cores, about 2 minutes. The headline of ``<workdir>/result.json`` is
the held-out ascending rate of sampled answers (temperature 1, 512 held-out
prompts), before = the SFT model, after = the policy. Measured with the defaults
(20 iterations of 64 prompts; ``--config.algorithm=<name>``), ascending / wrong-answer
rate after, win rate against the SFT model under the gold judge, pairs trained on:

  online_dpo            0.49 -> 0.87   wrong 0.04   win 0.69   479 pairs
  offline (source=reference)  -> 0.83  wrong 0.16   win 0.68   646 pairs
  iterative_dpo (K=4)        -> 0.92   wrong 0.06   win 0.71   649 pairs
  dno (win rates, K=4+gold)  -> 0.94   wrong 0.04   win 0.72   663 pairs
  xpo                        -> 0.89   wrong 0.05   win 0.70   1280 pairs
  nash_md (nash_md_tiny.py)  -> 0.89   wrong 0.04   win 0.70   1280 pairs
  inpo                       -> 0.84   wrong 0.04   win 0.67   494 pairs
  rso (K=8 SFT samples)      -> 0.83   wrong 0.09   win 0.67   470 pairs
  spin (spin_tiny.py)        -> 0.79   wrong 0.17   win 0.66   512 pairs
  egpo                       -> 0.72   wrong 0.02   win 0.61   1280 pairs
  sharpening                 -> 0.49   wrong 0.08   win 0.50   826 pairs (its self-judge does not know the order)

The SFT model answers ascending 49%, descending 48%, wrong 3%. On-policy pairs beat
the offline control with fewer pairs, and without its displacement of probability
onto wrong answers. tests/test_online_preference.py asserts, at ``runlocal`` size,
online > offline, SPIN's rising gold margin and Nash-MD's win rate.
"""

import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from rlhf_jax import data, models, parallel
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.data import preference as pref_data
from rlhf_jax.errors import ConfigError
from rlhf_jax.train import iterative, loop, online_preference as op, optim, sft, state as state_lib
from rlhf_jax.train import step as step_lib, writers


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.progress = True
  c.algorithm = "online_dpo"
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.model = ml_collections.ConfigDict(dict(name="tiny", dtype="float32", param_dtype="float32"))
  c.data = ml_collections.ConfigDict(dict(seq_len=20, min_len=3, max_len=8, seed=0, num_sft=8192))
  c.sft = ml_collections.ConfigDict(dict(num_steps=1500, batch_size=32, learning_rate=3e-3))
  c.online = ml_collections.ConfigDict(dict(
      num_iterations=20, prompts_per_iteration=64, batch_size=32, epochs=1.0, learning_rate=3e-4,
      temperature=1.0, beta=0.5, losses=("sigmoid", "sft"), loss_weights=(1.0, 1.0),
      objective="", hparams=ml_collections.ConfigDict(dict()),
      # Overrides of the algorithm's preset (empty / -1: the preset's value).
      num_samples=-1, source="", reference="", pairing="", mix_alpha=-1.0, min_margin=0.0,
      tr_dpo_alpha=0.6, tr_dpo_every=16,
  ))
  c.eval = ml_collections.ConfigDict(dict(num_prompts=512, temperature=1.0, seed=12345, every=5))
  c.resume_changed = ""  # "ok": resume although model/optimizer/data keys changed since the checkpoint
  c.checkpoint_every = 50
  if arg == "runlocal":
    c.sft.num_steps, c.online.num_iterations, c.eval.num_prompts = 600, 8, 256
  elif arg not in (None, ""):
    raise ConfigError(f"unknown experiment argument {arg!r}; valid: 'runlocal'")
  return c


CONFIG_HELP = {
    "resume_changed": "ok: resume although model/optimizer/data keys changed since the checkpoint",
    "seed": "model init and sampling seed",
    "progress": "progress bars",
    "algorithm": f"online preset: {', '.join(op.ALGORITHMS)}",
    "mesh.data": "data-parallel mesh axis size", "mesh.fsdp": "FSDP axis (-1: the rest)",
    "mesh.tensor": "tensor-parallel axis size",
    "model.name": "named model config", "model.dtype": "compute dtype", "model.param_dtype": "parameter dtype",
    "data.seq_len": "row length", "data.min_len": "shortest prompt (digits)", "data.max_len": "longest prompt",
    "data.seed": "prompt seed", "data.num_sft": "SFT examples",
    "sft.num_steps": "SFT steps", "sft.batch_size": "SFT batch", "sft.learning_rate": "SFT peak learning rate",
    "online.num_iterations": "iterations (sample, judge, pair, train)",
    "online.prompts_per_iteration": "fresh prompts per iteration",
    "online.batch_size": "pairs per step", "online.epochs": "passes over each iteration's pairs",
    "online.learning_rate": "peak learning rate", "online.temperature": "sampling temperature",
    "online.beta": "β of the preference loss", "online.losses": "pairwise losses (objective=dpo)",
    "online.loss_weights": "their weights",
    "online.objective": "dpo | xpo | nash_md | inpo | dno | online_ipo (empty: the algorithm's)",
    "online.hparams": "hyper-parameters of the objective or losses (free-form)",
    "online.num_samples": "K samples per prompt (-1: preset)",
    "online.source": "policy | reference | mixture (empty: preset); reference = offline control",
    "online.reference": "fixed | iteration | tr_dpo (empty: preset)",
    "online.pairing": f"{' | '.join(op.PAIRINGS)} (empty: preset)",
    "online.mix_alpha": "geometric-mixture α (-1: preset)", "online.min_margin": "score gap a pair needs",
    "online.tr_dpo_alpha": "TR-DPO soft-sync α (reference=tr_dpo)", "online.tr_dpo_every": "TR-DPO sync period",
    "eval.num_prompts": "held-out prompts", "eval.temperature": "eval sampling temperature",
    "eval.seed": "held-out prompt seed", "eval.every": "evaluate every N iterations",
    "checkpoint_every": "also checkpoint every N steps inside an iteration",
}


def gold_reward(prompt_ids, completion_ids) -> float:
  """The gold judge: 1 for the ascending sort, plus half the completion's sortedness."""
  return float(pref_data.is_ascending(prompt_ids, completion_ids)) + 0.5 * pref_data.sortedness(completion_ids)


def gold_judge(kind: str = "reward"):
  """The gold judge as a :class:`RewardJudge` or (``kind="preference"``) a Bradley-Terry :class:`PreferenceJudge`."""
  fn = lambda prompts, comps: [gold_reward(p, c) for p, c in zip(prompts, comps)]
  if kind == "reward":
    return op.RewardJudge(fn, temperature=0.25)
  bt = lambda prompts, a, b: jax.nn.sigmoid((np.asarray(fn(prompts, a)) - np.asarray(fn(prompts, b))) / 0.25)
  return op.PreferenceJudge(bt)


def decode(ids) -> str:
  """Task tokens as text; ids outside the task's vocabulary (the model's is larger) as ``<id>``."""
  return " ".join(data.decode([i]) if 0 <= i < data.VOCAB_SIZE else f"<{i}>" for i in np.asarray(ids).tolist())


def sample_orders(sampler, params, prompts, *, seed):
  """How the model's own samples order the prompt's digits: ascending / descending / other rates."""
  s = sampler(params, [data.make_prompt(p) for p in prompts], 1, jax.random.PRNGKey(seed))
  comps = [s.completion(i, 0) for i in range(len(prompts))]
  asc = np.mean([pref_data.is_ascending(p, c) for p, c in zip(prompts, comps)])
  desc = np.mean([data.is_correct("reversal", pref_data.ascending(p), c) for p, c in zip(prompts, comps)])
  return {"ascending": float(asc), "descending": float(desc), "other": float(1 - asc - desc)}


def _optimizer(lr, steps, warmup=10):
  return optim.make_optimizer(dict(learning_rate=lr, warmup_steps=warmup, schedule="cosine", end_value_ratio=0.1,
                                   b2=0.98, weight_decay=0.0, max_grad_norm=1.0), total_steps=steps)


def sft_stage(config, mesh, workdir):
  """Stage 1: SFT on the 50/50 ascending/descending mixture (checkpointed, resumable); a ``LoopResult``."""
  cfg, d = models.config_from_section(config.model), config.data
  tx, sched = _optimizer(config.sft.learning_rate, config.sft.num_steps)
  graphdef, state, shardings = state_lib.create_train_state(
      models.create_sharded_model(cfg, mesh, seed=config.seed), tx, mesh=mesh, seed=config.seed)
  step = step_lib.make_train_step(sft.make_sft_loss(), tx, graphdef, mesh=mesh, state_shardings=shardings,
                                  learning_rate_fn=sched)
  sft_data = pref_data.MixedSortingSFT(d.num_sft, seed=d.seed, seq_len=d.seq_len, min_len=d.min_len, max_len=d.max_len)
  batches = data.BatchIterator.from_dataset(sft_data, batch_size=config.sft.batch_size, seed=config.seed,
                                            collate=pref_data.collate)
  ck = Checkpointer(os.path.join(workdir, "sft", "checkpoints"), max_to_keep=1)
  try:
    result = loop.train_loop(step_fn=step, state=state, batches=batches, num_steps=config.sft.num_steps,
                             workdir=os.path.join(workdir, "sft"), put_batch=lambda b: parallel.host_local_to_global(
                                 b, mesh), checkpointer=ck, state_shardings=shardings,
                             checkpoint_every=config.checkpoint_every, progress=config.progress)
  finally:
    ck.close()
  return graphdef, result


def _preset(config) -> op.OnlineConfig:
  o = config.online
  over = {}
  if o.num_samples > 0:
    over["num_samples"] = int(o.num_samples)
  for key in ("source", "reference", "pairing"):
    if o[key]:
      over[key] = o[key]
  if o.mix_alpha >= 0:
    over["mix_alpha"] = float(o.mix_alpha)
  if o.min_margin:
    over["min_margin"] = float(o.min_margin)
  try:
    return op.online_config(config.algorithm, **over)
  except ValueError as e:
    raise ConfigError(f"config.algorithm / config.online: {e}") from None


def main(config, workdir):
  """Runs the stages in order; a stage stopped by SIGTERM/SIGINT ends the run with its (preempted) result
  (``python -m rlhf_jax.run`` exits 143/130), and the next run resumes stage by stage."""
  with loop._StopFlag():  # a signal between stages stops the next stage before its first step
    return _run(config, workdir)


def _run(config, workdir):
  """SFT (stage 1, resumable), then the online loop of ``config.algorithm`` (stage 2); writes ``result.json``."""
  mesh = parallel.make_mesh(dict(config.mesh))
  d, o = config.data, config.online
  cfg = _preset(config)
  objective = o.objective or op.OBJECTIVES[config.algorithm]
  if objective not in op.ONLINE_OBJECTIVES:
    raise ConfigError(f"config.online.objective={objective!r}; valid: {op.ONLINE_OBJECTIVES}")
  put = lambda b: parallel.host_local_to_global(b, mesh)

  graphdef, sft_result = sft_stage(config, mesh, workdir)
  if sft_result.preempted:
    return sft_result
  ref_params = sft_result.state.params

  # Stage 2: the online loop from the SFT model against it.
  prompts_ds = pref_data.SortingPreferences(1 << 30, seed=d.seed + 7, seq_len=d.seq_len, min_len=d.min_len,
                                            max_len=d.max_len)
  n = o.prompts_per_iteration

  def prompts_fn(it):
    raw = [prompts_ds.prompt(it * n + i) for i in range(n)]
    golds = [np.concatenate([pref_data.ascending(p), [data.EOS_ID]]).astype(np.int32) for p in raw]
    return [data.make_prompt(p) for p in raw], golds

  sampler = op.make_sampler(graphdef, max_new_tokens=d.max_len + 1, temperature=o.temperature, eos_id=data.EOS_ID,
                            pad_id=data.PAD_ID)
  judge = gold_judge("preference" if config.algorithm in ("dno", "nash_md") else "reward")
  make_data = op.make_preference_data(
      cfg, prompts_fn=prompts_fn, sampler=sampler, judge=judge,
      logps_fn=op.make_sequence_logps_fn(graphdef), seq_len=d.seq_len, ref_params=ref_params,
      seed=config.seed, pad_id=data.PAD_ID, prompt_length=d.max_len + 2, decode=decode)
  # Steps: about one pass per iteration over its pairs; the schedule is sized for the expected count.
  expected_pairs = n * (1 if cfg.pairing in ("opponent", "gold") else max(1, cfg.num_samples // 2))
  total = o.num_iterations * iterative.steps_for(expected_pairs, batch_size=o.batch_size, epochs=o.epochs)
  tx, sched = _optimizer(o.learning_rate, max(total, 1))
  extras, extras_update, ref_graphdef = None, None, None
  if cfg.reference == "tr_dpo":
    from rlhf_jax.train import preference

    extras, ref_graphdef = {"ref_params": jax.tree.map(lambda x: x.copy(), ref_params)}, graphdef
    extras_update = preference.tr_dpo_sync(mode="soft", alpha=o.tr_dpo_alpha, every=o.tr_dpo_every)
  begin = None
  if config.algorithm == "egpo":
    if o.num_iterations % 2:
      raise ConfigError(f"config.online.num_iterations={o.num_iterations}: EGPO's extragradient iterations come in "
                        "pairs (extrapolation, update); give an even number")
    extras, begin = op.extragradient_extras(ref_params), op.extragradient_begin
  policy = nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), ref_params))
  graphdef, state, shardings = state_lib.create_train_state(policy, tx, mesh=mesh, seed=config.seed, extras=extras)
  specs = [(name, w, dict(o.hparams)) for name, w in zip(o.losses, o.loss_weights)]
  loss_fn = op.make_online_loss(objective, beta=o.beta, losses=specs, hparams=dict(o.hparams) if objective != "dpo"
                                else None, ref_graphdef=ref_graphdef)
  step = step_lib.make_train_step(loss_fn, tx, graphdef, mesh=mesh, state_shardings=shardings,
                                  learning_rate_fn=sched, extras_update=extras_update)

  held_out = pref_data.SortingPreferences(config.eval.num_prompts, seed=config.eval.seed, seq_len=d.seq_len,
                                          min_len=d.min_len, max_len=d.max_len)
  eval_prompts = [held_out.prompt(i) for i in range(len(held_out))]
  eval_sampler = op.make_sampler(graphdef, max_new_tokens=d.max_len + 1, temperature=config.eval.temperature,
                                 eos_id=data.EOS_ID, pad_id=data.PAD_ID)
  win_rate = op.make_win_rate_eval(eval_sampler, gold_judge("reward"), [data.make_prompt(p) for p in eval_prompts],
                                   opponent_params=ref_params, seed=config.eval.seed, prompt_length=d.max_len + 2)

  # SPIN's quantity: how much likelier the gold answer is than the SFT model's own samples, under the policy.
  logps_fn = op.make_sequence_logps_fn(graphdef)
  eval_inputs = [data.make_prompt(p) for p in eval_prompts]
  own = eval_sampler(ref_params, eval_inputs, 1, jax.random.PRNGKey(config.eval.seed + 1))
  golds = [np.concatenate([pref_data.ascending(p), [data.EOS_ID]]).astype(np.int32) for p in eval_prompts]
  differ = [i for i in range(len(golds)) if own.completion(i, 0).tolist() != golds[i].tolist()]
  gold_rows = op.completion_rows([eval_inputs[i] for i in differ], [golds[i] for i in differ], seq_len=d.seq_len)
  own_rows = op.completion_rows([eval_inputs[i] for i in differ], [own.completion(i, 0) for i in differ],
                                seq_len=d.seq_len)

  def eval_fn(st):
    out = win_rate(st)
    out.update({f"{k}_rate": v for k, v in sample_orders(eval_sampler, st.params, eval_prompts,
                                                         seed=config.eval.seed).items()})
    gold_lp, own_lp = logps_fn(st.params, gold_rows)[0], logps_fn(st.params, own_rows)[0]
    out.update(gold_logp=float(gold_lp.mean()), gold_margin=float((gold_lp - own_lp).mean()))
    return out

  ck = Checkpointer(os.path.join(workdir, "online", "checkpoints"), max_to_keep=2)
  try:
    result = iterative.run_iterations(
        state=state, step_fn=step, make_data=make_data, num_iterations=o.num_iterations, batch_size=o.batch_size,
        epochs=o.epochs, seed=config.seed, workdir=os.path.join(workdir, "online"), put_batch=put,
        checkpointer=ck, state_shardings=shardings, checkpoint_every=config.checkpoint_every, eval_fn=eval_fn,
        begin_iteration=begin,
        eval_every=config.eval.every, progress=config.progress, run_config=config,
        plot_keys=("loss", "iteration/score_mean", "eval/win_rate", "eval/ascending_rate"), desc=config.algorithm)
  finally:
    ck.close()
  if result.preempted:
    return result
  if begin is not None:  # the last update step onto its anchor (EGPO)
    result.state = begin(result.state, o.num_iterations)

  ref_orders = sample_orders(eval_sampler, ref_params, eval_prompts, seed=config.eval.seed)
  pol_orders = sample_orders(eval_sampler, result.state.params, eval_prompts, seed=config.eval.seed)
  rows = writers.read_jsonl(os.path.join(workdir, "online", "metrics.jsonl"))
  it_rows = [r for r in rows if "iteration/pairs" in r]
  result_json = {
      "headline": writers.make_headline("ascending_rate", ref_orders["ascending"], pol_orders["ascending"]),
      "algorithm": config.algorithm,
      "objective": objective,
      "source": cfg.source,
      "win_rate_vs_sft": result.eval_metrics.get("eval/win_rate"),
      "gold_margin_sft": float((logps_fn(ref_params, gold_rows)[0] - logps_fn(ref_params, own_rows)[0]).mean()),
      "gold_margin_per_eval": [r["eval/gold_margin"] for r in rows if "eval/gold_margin" in r],
      "reference_samples": ref_orders,
      "policy_samples": pol_orders,
      "pairs_total": float(sum(r["iteration/pairs"] for r in it_rows)),
      "steps_total": int(jax.device_get(result.state.step)),
      "score_mean_per_iteration": [r.get("iteration/score_mean") for r in it_rows],
      "logp_margin_per_iteration": [r.get("iteration/logp_margin") for r in it_rows],
      "final_metrics": result.last_metrics,
  }
  writers.write_result(workdir, result_json, not_printed=("final_metrics", "score_mean_per_iteration", "gold_margin_per_eval",
                                                          "logp_margin_per_iteration"),
                       train_metrics=result.last_metrics, eval_metrics=result.eval_metrics)
  result.eval_metrics = {k: v for k, v in result_json.items() if k != "final_metrics"}
  return result
