"""A pairwise preference model P(y1 ≻ y2 | x), antisymmetric by construction.

Same task as ``rm_tiny.py`` (prefer the more sorted permutation of the prompt's
digits), but the model reads both responses in one row and outputs the
probability that the first is preferred; both orders are scored and combined as
``½(l₁₂ − l₂₁)``, so P(y1 ≻ y2) + P(y2 ≻ y1) = 1 exactly. This is the
preference oracle that Nash-MD / general-preference methods query.

Command:
  python -m rlhf_jax.run experiments/pm_tiny.py --workdir runs/pm_tiny

Hardware: 2 CPU cores, about 1 minute. Expected: the headline of
``<workdir>/result.json`` is held-out accuracy (1024 held-out pairs) of the
initial and the trained model, measured 0.48 -> 0.84 (tests/test_rm_experiment.py
asserts > 0.7 on a reduced run), and a symmetry error of 0 (float rounding).
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
from rlhf_jax.rewards import metrics
from rlhf_jax.train import loop, optim, reward, state as state_lib, step as step_lib, writers


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.progress = True
  c.num_steps = 600
  c.batch_size = 32
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.model = ml_collections.ConfigDict(dict(name="tiny", scalar_head_outputs=1, dtype="float32"))
  c.optimizer = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=20, schedule="cosine",
                                               end_value_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0))
  c.data = ml_collections.ConfigDict(dict(num_pairs=16384, seq_len=28, min_len=4, max_len=8, seed=0))
  c.eval = ml_collections.ConfigDict(dict(num_pairs=1024))
  c.checkpoint_every = 200
  if arg == "runlocal":
    c.num_steps = 150
  elif arg not in (None, ""):
    raise ConfigError(f"unknown experiment argument {arg!r}; valid: 'runlocal'")
  return c


def main(config, workdir):
  mesh = parallel.make_mesh(dict(config.mesh))
  cfg = models.config_from_section(config.model)
  d = config.data
  put = lambda b: parallel.host_local_to_global({k: v for k, v in b.items() if k != "index_B"}, mesh)
  make = lambda n, seed: pref_data.PreferenceModelPairs(
      pref_data.PermutationPreferences(n, seed=seed, seq_len=2 * d.max_len + 3, min_len=d.min_len,
                                       max_len=d.max_len), seq_len=d.seq_len)
  tx, sched = optim.make_optimizer(dict(config.optimizer), total_steps=config.num_steps)
  graphdef, state, shardings = state_lib.create_train_state(
      models.create_sharded_model(cfg, mesh, seed=config.seed), tx, mesh=mesh, seed=config.seed)
  step = step_lib.make_train_step(reward.make_preference_model_loss(), tx, graphdef, mesh=mesh,
                                  state_shardings=shardings, learning_rate_fn=sched)
  batches = data.BatchIterator.from_dataset(make(d.num_pairs, d.seed), batch_size=config.batch_size,
                                            seed=config.seed, collate=pref_data.collate)
  held = make(config.eval.num_pairs, d.seed + 777)
  b = pref_data.collate([held[i] for i in range(len(held))])
  logits_fn = jax.jit(lambda p, batch: reward.preference_logits(nnx.merge(graphdef, p), batch))
  accuracy = lambda l12: float(np.mean((l12 > 0) == (b["label_B"] > 0.5)))
  # The initial model's accuracy, before the loop (the step donates the state; a resumed loop replaces it).
  accuracy_before = accuracy(np.asarray(logits_fn(state.params, b)))
  ck = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1)
  try:
    result = loop.train_loop(step_fn=step, state=state, batches=batches, num_steps=config.num_steps,
                             workdir=workdir, put_batch=put, checkpointer=ck, state_shardings=shardings,
                             checkpoint_every=config.checkpoint_every, progress=config.progress,
                             plot_keys=("loss", "accuracy"))
  finally:
    ck.close()

  l12 = np.asarray(logits_fn(result.state.params, b))
  swapped = {"input_ids_BxT": b["swapped_input_ids_BxT"], "attention_mask_BxT": b["swapped_attention_mask_BxT"],
             "swapped_input_ids_BxT": b["input_ids_BxT"], "swapped_attention_mask_BxT": b["attention_mask_BxT"]}
  l21 = np.asarray(logits_fn(result.state.params, swapped))
  p12, p21 = 1 / (1 + np.exp(-l12)), 1 / (1 + np.exp(-l21))
  out = {
      "heldout_accuracy": accuracy(l12),
      "heldout_accuracy_before": accuracy_before,
      "heldout_calibration_error": metrics.calibration_error(p12, b["label_B"]),
      "symmetry_error": float(np.max(np.abs(p12 + p21 - 1))),
  }
  out["headline"] = writers.make_headline("heldout_accuracy", accuracy_before, out["heldout_accuracy"])
  writers.write_result(workdir, out, train_metrics=result.last_metrics,
                       eval_metrics={k: v for k, v in out.items() if k not in ("headline", "heldout_accuracy_before")})
  result.eval_metrics = out
  return result
