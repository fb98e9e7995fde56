"""Rejection-sampling fine-tuning (RAFT, ReST, SuperHF, Sharpening) on a generated task, after a short SFT.

Task: sort a digit string. A brief SFT leaves the tiny transformer a partial sorter.
Then each iteration samples K answers per prompt (best-of-N in one jitted call), scores
them, keeps some and fine-tunes on the kept ones (``rlhf_jax.train.rejection`` composed
into ``rlhf_jax.train.iterative.run_iterations``). ``config.method``:

* ``raft`` (Dong et al. 2023): the best of K per prompt by the rule verifier, kept when its
  score reaches ``rs.min_score`` (1 = exactly sorted); with ``rs.top_fraction > 0`` the top
  fraction of the whole batch instead (RAFT's global ranking). SFT loss.
* ``rest`` (Gulcehre et al. 2023): one Grow step (sampling) every ``len(rs.rest_thresholds)``
  iterations, each iteration an Improve step keeping the Grow samples whose score exceeds
  that step's threshold (rising). SFT loss.
* ``superhf`` (Mukobi et al. 2023): best of K as RAFT, loss SFT + ``rs.kl_coef``·KL(π_θ‖π_SFT)
  on the kept tokens (``rs.kl_estimator``).
* ``sharpening`` (Huang et al. 2024): no verifier; the SFT model's own sequence
  log-likelihood is the reward (``rs.length_normalize`` for the per-token mean), best of K,
  SFT loss (SFT-Sharpening, amortised best-of-N).

The score is the rule verifier with partial credit: matched positions / max(answer
length, expected length), which is 1 exactly when the answer is right (so thresholds
below 1 mean something for ReST).

Command:
  python -m rlhf_jax.run experiments/rejection_sampling_tiny.py --workdir /tmp/rs_tiny
  python -m rlhf_jax.run experiments/rejection_sampling_tiny.py:runlocal --workdir /tmp/rs_tiny_local
  python -m rlhf_jax.run experiments/rejection_sampling_tiny.py --config.method=rest --workdir /tmp/rs_rest

Hardware: 2 CPU cores, about 1 to 1.5 minutes per run (shared cores). The headline of
``<workdir>/result.json`` is greedy held-out accuracy (256 held-out prompts), before = the
SFT model the iterations start from (not the untrained one), after = the fine-tuned policy.
Measured (defaults: 20 iterations of 64 prompts x 8 samples, seed 0):

=========================================  ===============  ==============================================
run                                        greedy accuracy  notes
=========================================  ===============  ==============================================
``raft`` (default)                         0.488 -> 0.836   eval 0.61/0.74/0.76/0.84 at 5/10/15/20
``:runlocal`` (raft, 6 iterations)         0.488 -> 0.668   tests/test_rejection_sampling.py asserts +0.08
``--config.method=rest``                   0.488 -> 0.652   a third of the samples (7 Grow steps)
``--config.method=superhf``                0.488 -> 0.762   KL to the SFT model 0.04-0.14
``--config.method=sharpening``             0.488 -> 0.461   self-reward of the samples -2.37 -> ~-1.4
``--config.rs.top_fraction=0.125`` (raft)  0.488 -> 0.449   global top 1/8 keeps wrong answers
=========================================  ===============  ==============================================

Sharpening does what it optimises (the SFT model's log-likelihood of the policy's samples
rises) but not accuracy: the base model's likelihood is no better a judge of a sorted
answer than its greedy decode. RAFT's global ranking keeps the top eighth by partial
credit, right or not, and drifts; the per-prompt best with ``min_score=1`` keeps only
correct answers. A run stopped by SIGTERM mid-iteration and started again gives the same
headline (``:runlocal``: 0.668).

Results: ``<workdir>/result.json``; iteration rows in ``rs/iterations/``, the samples
with scores and kept flags in ``rs/samples/``, curves in ``rs/curves.png``.
"""

import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from rlhf_jax import data, models, parallel, sampling
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.errors import ConfigError
from rlhf_jax.train import iterative, loop, optim, rejection, sft, state as state_lib, step as step_lib, writers

METHODS = ("raft", "rest", "superhf", "sharpening")

CONFIG_HELP = {
    "resume_changed": "ok: resume although model/optimizer/data keys changed since the checkpoint",
    "method": f"one of {METHODS}",
    "rs.num_samples": "K, samples per prompt (best-of-K)",
    "rs.min_score": "raft/superhf: a prompt's best sample is kept only with at least this score",
    "rs.top_fraction": "raft: > 0 keeps this fraction of the whole batch (global ranking) instead of one per prompt",
    "rs.rest_thresholds": "rest: the Improve steps' thresholds (one Grow step per len() iterations)",
    "rs.kl_coef": "superhf: beta of the KL term",
    "rs.kl_estimator": "superhf: the KL estimator on the kept tokens (k1, k2, k3, ...)",
    "rs.length_normalize": "sharpening: per-token mean log-likelihood instead of the sequence sum",
}


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.method = "raft"
  c.seed = 0
  c.progress = True
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.model = ml_collections.ConfigDict(dict(name="tiny", dtype="float32"))
  c.data = ml_collections.ConfigDict(dict(task="sorting", min_len=3, max_len=8, seq_len=24, seed=0))
  c.sft = ml_collections.ConfigDict(dict(num_steps=200, batch_size=32, learning_rate=3e-3))
  c.rs = ml_collections.ConfigDict(dict(
      num_iterations=20, prompts_per_iteration=64, num_samples=8, temperature=1.0,
      learning_rate=3e-4, batch_size=16, epochs=2.0,
      min_score=1.0, top_fraction=0.0, rest_thresholds=(0.7, 0.85, 0.95),
      kl_coef=0.1, kl_estimator="k3", length_normalize=False,
  ))
  c.eval = ml_collections.ConfigDict(dict(num_prompts=256, every=5))
  c.resume_changed = ""  # "ok": resume although model/optimizer/data keys changed since the checkpoint
  c.checkpoint_every = 0
  if arg == "runlocal":
    c.rs.num_iterations, c.eval.every = 6, 3
  elif arg not in (None, ""):
    raise ConfigError(f"unknown experiment argument {arg!r}; valid: 'runlocal'")
  return c


def partial_credit(task, prompt_ids, completion_ids) -> float:
  """Matched positions / max(answer length, expected length): 1.0 exactly when ``is_correct``."""
  expected = data.expected_completion(task, prompt_ids)
  c = np.asarray(completion_ids).reshape(-1)
  eos = np.flatnonzero(c == data.EOS_ID)
  c = c[: eos[0]] if eos.size else c
  c = c[c != data.PAD_ID]
  n = max(len(c), len(expected), 1)
  m = min(len(c), len(expected))
  return float(np.sum(c[:m] == expected[:m]) / n)


def make_greedy_accuracy(graphdef, task, prompts, max_new_tokens):
  """``accuracy(params)``: the fraction of ``prompts`` whose greedy answer is exactly right (one compilation)."""
  gen = sampling.make_generate_fn(graphdef, max_new_tokens=max_new_tokens, eos_id=data.EOS_ID)
  ids, mask = sampling.left_pad([data.make_prompt(p) for p in prompts])

  def accuracy(params):
    out = jax.device_get(gen(params, ids, mask, jax.random.PRNGKey(0)))
    return float(np.mean([data.is_correct(task, p, t[: int(n)])
                          for p, t, n in zip(prompts, out.tokens_BxN, out.lengths_B)]))

  return accuracy


def main(config, workdir):
  """Runs the stages in order; a stage stopped by SIGTERM/SIGINT ends the run with its (preempted) result
  (``python -m rlhf_jax.run`` exits 143/130), and the next run resumes stage by stage."""
  with loop._StopFlag():  # a signal between stages stops the next stage before its first step
    return _run(config, workdir)


def _run(config, workdir):
  if config.method not in METHODS:
    raise ConfigError(f"config.method={config.method!r}; valid: {METHODS}")
  if config.rs.top_fraction > 0 and config.method not in ("raft", "superhf"):
    raise ConfigError(f"config.rs.top_fraction selects RAFT's global ranking; method {config.method!r} does not use it")
  mesh = parallel.make_mesh(dict(config.mesh))
  cfg = models.config_from_section(config.model)
  d, rs = config.data, config.rs
  put = lambda b: parallel.host_local_to_global(b, mesh)
  max_new = d.max_len + 1  # the answer and EOS
  prompt_length = d.max_len + 2  # BOS, digits, SEP

  # Stage 1: a short SFT.
  tx, _ = optim.make_optimizer(dict(learning_rate=config.sft.learning_rate, warmup_steps=10,
                                    schedule="constant", max_grad_norm=1.0), total_steps=config.sft.num_steps)
  graphdef, state, shardings = state_lib.create_train_state(
      models.create_sharded_model(cfg, mesh, seed=config.seed), tx, mesh=mesh, seed=config.seed)
  sft_step = step_lib.make_train_step(sft.make_sft_loss(), tx, graphdef, mesh=mesh, state_shardings=shardings)
  batches = data.synthetic_sft_iterator(d.task, batch_size=config.sft.batch_size, seq_len=d.seq_len, seed=d.seed,
                                        min_len=d.min_len, max_len=d.max_len)
  ck = Checkpointer(os.path.join(workdir, "sft", "checkpoints"), max_to_keep=1)
  try:
    sft_res = loop.train_loop(step_fn=sft_step, state=state, batches=batches, num_steps=config.sft.num_steps,
                              workdir=os.path.join(workdir, "sft"), put_batch=put, checkpointer=ck,
                              state_shardings=shardings, progress=config.progress)
  finally:
    ck.close()
  if sft_res.preempted:
    return sft_res
  sft_params = sft_res.state.params

  held_rng = np.random.default_rng(d.seed + 4242)
  held_out = [data.make_sft_example(held_rng, d.task, min_len=d.min_len, max_len=d.max_len)[0]
              for _ in range(config.eval.num_prompts)]
  greedy_accuracy = make_greedy_accuracy(graphdef, d.task, held_out, max_new)
  sft_accuracy = greedy_accuracy(sft_params)

  # Stage 2: iterations of sample K -> score -> select -> SFT on the kept samples.
  copy = lambda p: jax.tree.map(lambda x: x.copy(), p)
  tx, _ = optim.make_optimizer(dict(learning_rate=rs.learning_rate, schedule="constant", max_grad_norm=1.0),
                               total_steps=rs.num_iterations)
  extras = {"ref_params": copy(sft_params)} if config.method == "superhf" else None
  graphdef, state, shardings = state_lib.create_train_state(nnx.merge(graphdef, copy(sft_params)), tx, mesh=mesh,
                                                            seed=config.seed, extras=extras)
  if config.method == "superhf":
    loss_fn = rejection.make_superhf_loss(graphdef, beta=rs.kl_coef, kl_estimator=rs.kl_estimator)
  else:
    loss_fn = sft.make_sft_loss()
  step = step_lib.make_train_step(loss_fn, tx, graphdef, mesh=mesh, state_shardings=shardings)
  best_of_n = sampling.make_best_of_n_fn(graphdef, n=rs.num_samples, max_new_tokens=max_new,
                                         processor=sampling.processors.temperature(rs.temperature),
                                         eos_id=data.EOS_ID, pad_id=data.PAD_ID)

  def prompt_fn(iteration):
    rng = np.random.default_rng([d.seed, iteration])
    digits = [data.make_sft_example(rng, d.task, min_len=d.min_len, max_len=d.max_len)[0]
              for _ in range(rs.prompts_per_iteration)]
    return rejection.PromptBatch([data.make_prompt(p) for p in digits], {"digits": digits})

  def verifier_score_fn(prompts, ids, mask):
    del ids, mask

    def score_fn(tokens_BKxN, mask_BKxN, lengths_BK, prompt_index_BK):
      return np.array([partial_credit(d.task, prompts.fields["digits"][i], t[: int(n)])
                       for t, n, i in zip(tokens_BKxN, lengths_BK, prompt_index_BK)], np.float32)

    return score_fn

  grow_every, grow_dir = 1, None
  if config.method == "sharpening":
    self_scorer = rejection.self_reward_scorer(graphdef, length_normalize=rs.length_normalize)
    base_params = copy(sft_params)
    make_score_fn = lambda prompts, ids, mask: self_scorer(base_params, ids, mask)
    select_fn = lambda s, it: rejection.select_best(s)
  elif config.method == "rest":
    schedule = rejection.ReSTSchedule(tuple(float(t) for t in rs.rest_thresholds)).check()
    make_score_fn = verifier_score_fn
    select_fn = lambda s, it: rejection.select_threshold(s, schedule.threshold(it))
    grow_every, grow_dir = schedule.grow_every, os.path.join(workdir, "rs", "grow")
  else:  # raft, superhf
    make_score_fn = verifier_score_fn
    if rs.top_fraction > 0:
      select_fn = lambda s, it: rejection.select_top_fraction(s, rs.top_fraction)
    else:
      select_fn = lambda s, it: rejection.select_best(s, min_score=rs.min_score)

  make_data = rejection.make_rejection_data(
      best_of_n=best_of_n, prompt_fn=prompt_fn, make_score_fn=make_score_fn, select_fn=select_fn,
      seq_len=d.seq_len, seed=config.seed, prompt_length=prompt_length, pad_id=data.PAD_ID,
      grow_every=grow_every, grow_dir=grow_dir, decode_fn=data.decode)
  eval_fn = lambda s: {"accuracy": greedy_accuracy(s.params)}
  unsaved = ("frozen_params", "ref_params")  # the reference is the SFT stage's result, rebuilt on a resume
  ck = Checkpointer(os.path.join(workdir, "rs", "checkpoints"), max_to_keep=1, unsaved_extras=unsaved)
  try:
    res = iterative.run_iterations(
        state=state, step_fn=step, make_data=make_data, num_iterations=rs.num_iterations,
        batch_size=rs.batch_size, workdir=os.path.join(workdir, "rs"), epochs=rs.epochs, seed=config.seed,
        put_batch=put, checkpointer=ck, state_shardings=shardings, checkpoint_every=config.checkpoint_every,
        eval_fn=eval_fn, eval_every=config.eval.every, progress=config.progress, run_config=config.to_dict(),
        plot_keys=("loss", "iteration/reward_mean", "iteration/kept_fraction", "eval/accuracy"), desc=config.method)
  finally:
    ck.close()
  if res.preempted:
    return res
  accuracy = res.eval_metrics.get("eval/accuracy")  # the loop evaluated the final state, unless resumed at the end
  if accuracy is None:
    accuracy = greedy_accuracy(res.state.params)
  result = {"headline": writers.make_headline("greedy_accuracy", sft_accuracy, accuracy),  # sft -> fine-tuned
            "method": config.method, "sft_accuracy": sft_accuracy, "accuracy": accuracy,
            "improvement": accuracy - sft_accuracy, "num_iterations": rs.num_iterations,
            "final_metrics": res.last_metrics}
  writers.write_result(workdir, result, not_printed=("final_metrics",), train_metrics=res.last_metrics,
                       eval_metrics={"accuracy": accuracy})
  return res
