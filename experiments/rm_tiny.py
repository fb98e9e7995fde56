"""A Bradley-Terry reward model (3-head ensemble) on a task whose true preference is known.

Task: a prompt is a digit string; a response is a random permutation of its
digits; the gold reward is its sortedness (the fraction of adjacent pairs in
ascending order). Pairs prefer the more sorted permutation. The reward model is
the tiny transformer with a 3-output scalar head (an ensemble on one backbone).

Command:
  python -m rlhf_jax.run experiments/rm_tiny.py --workdir runs/rm_tiny

Hardware: 2 CPU cores, about 40 s. Expected: the headline of
``<workdir>/result.json`` is held-out pair accuracy (ensemble mean, 1024
held-out pairs) of the initial and the trained model, measured 0.48 -> 0.965
(tests/test_rm_experiment.py asserts > 0.8 on a reduced run), and best-of-N
curves whose gold reward rises with N for the mean, min and mean−λ·var
ensemble aggregations.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from rlhf_jax import data, models, parallel
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.data import preference as pref_data
from rlhf_jax.errors import ConfigError
from rlhf_jax.rewards import ensembles, metrics
from rlhf_jax.train import loop, optim, reward, state as state_lib, step as step_lib, writers


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.progress = True
  c.num_steps = 600
  c.batch_size = 32
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.model = ml_collections.ConfigDict(dict(name="tiny", scalar_head_outputs=3, dtype="float32"))
  c.optimizer = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=20, schedule="cosine",
                                               end_value_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0))
  c.loss = ml_collections.ConfigDict(dict(name="bt", label_smoothing=0.0, center_rewards_coefficient=0.01))
  c.data = ml_collections.ConfigDict(dict(num_pairs=16384, seq_len=20, min_len=4, max_len=8, seed=0))
  c.eval = ml_collections.ConfigDict(dict(num_pairs=1024, bon_prompts=256, bon_samples=16, uwo_lambda=1.0))
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
  put = lambda b: parallel.host_local_to_global(b, mesh)
  strip = lambda b: {k: v for k, v in b.items() if not k.endswith("_B") or k == "margin_B"}

  tx, sched = optim.make_optimizer(dict(config.optimizer), total_steps=config.num_steps)
  graphdef, state, shardings = state_lib.create_train_state(
      models.create_sharded_model(cfg, mesh, seed=config.seed), tx, mesh=mesh, seed=config.seed)
  hp = {k: v for k, v in config.loss.items() if k != "name"}
  loss_fn = reward.make_reward_loss(config.loss.name, hparams=hp)
  train_step = step_lib.make_train_step(loss_fn, tx, graphdef, mesh=mesh, state_shardings=shardings,
                                        learning_rate_fn=sched)
  pairs = pref_data.PermutationPreferences(d.num_pairs, seed=d.seed, seq_len=d.seq_len, min_len=d.min_len,
                                           max_len=d.max_len)
  batches = data.BatchIterator.from_dataset(pairs, batch_size=config.batch_size, seed=config.seed,
                                            collate=pref_data.collate)
  @jax.jit
  def score(params, ids, mask):
    return reward.sequence_rewards(nnx.merge(graphdef, params), ids, mask)  # [B, K]

  # Held-out pairs, scored by the ensemble mean.
  held = pref_data.PermutationPreferences(config.eval.num_pairs, seed=d.seed + 777, seq_len=d.seq_len,
                                          min_len=d.min_len, max_len=d.max_len)
  b = pref_data.collate([held[i] for i in range(len(held))])

  def heldout_rewards(params):
    rc = np.asarray(score(params, b["chosen_input_ids_BxT"], b["chosen_attention_mask_BxT"])).mean(-1)
    rr = np.asarray(score(params, b["rejected_input_ids_BxT"], b["rejected_attention_mask_BxT"])).mean(-1)
    return rc, rr

  # The initial model's accuracy, before the loop (the step donates the state; a resumed loop replaces it).
  accuracy_before = metrics.preference_accuracy(*heldout_rewards(state.params))
  ck = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1)
  try:
    result = loop.train_loop(step_fn=train_step, state=state, batches=batches, num_steps=config.num_steps,
                             workdir=workdir, put_batch=lambda b: put(strip(b)), checkpointer=ck,
                             state_shardings=shardings, checkpoint_every=config.checkpoint_every,
                             progress=config.progress, plot_keys=("loss", "accuracy", "margin"))
  finally:
    ck.close()
  params = result.state.params

  # Held-out pairs: accuracy, margin, calibration of the ensemble mean.
  rc, rr = heldout_rewards(params)
  out = {
      "heldout_accuracy": metrics.preference_accuracy(rc, rr),
      "heldout_accuracy_before": accuracy_before,
      "heldout_margin": metrics.mean_margin(rc, rr),
      "heldout_calibration_error": metrics.pairwise_calibration_error(rc, rr),
  }

  # Best-of-N against the gold reward, for three ensemble aggregations.
  rng = np.random.default_rng(d.seed + 999)
  n_p, n_s = config.eval.bon_prompts, config.eval.bon_samples
  prompts = [pref_data._prompt(d.seed + 999, i, d.min_len, d.max_len) for i in range(n_p)]
  perms = [[rng.permutation(p) for _ in range(n_s)] for p in prompts]
  rows = data.make_sft_batch([(p, y) for p, ys in zip(prompts, perms) for y in ys], seq_len=d.seq_len)
  k_scores = np.asarray(score(params, rows["input_ids_BxT"], rows["attention_mask_BxT"]))  # [P·N, K]
  gold = np.array([[pref_data.sortedness(y) for y in ys] for ys in perms])
  k_scores_KxB = jnp.asarray(k_scores.T)
  aggregations = {
      "mean": ensembles.ensemble_mean(k_scores_KxB),
      "min": ensembles.ensemble_min(k_scores_KxB),
      "uwo": ensembles.ensemble_uncertainty_weighted(k_scores_KxB, lam=config.eval.uwo_lambda),
  }
  out["best_of_n_gold"] = {name: metrics.best_of_n_curve(np.asarray(v).reshape(n_p, n_s), gold)
                           for name, v in aggregations.items()}
  out["random_gold"] = float(gold.mean())
  out["oracle_gold"] = float(gold.max(1).mean())
  out["headline"] = writers.make_headline("heldout_accuracy", accuracy_before, out["heldout_accuracy"])
  final_eval = {k: out[k] for k in ("heldout_accuracy", "heldout_margin", "heldout_calibration_error",
                                    "random_gold", "oracle_gold")}
  writers.write_result(workdir, out, train_metrics=result.last_metrics, eval_metrics=final_eval)
  result.eval_metrics = out
  return result
