"""Held-out evaluation functions: known answers and identities with the training losses."""

import numpy as np

from rlhf_jax import data, models
from rlhf_jax.train import evaluation, optim, recipe, sft, state as state_lib


def test_pair_metrics_known_values():
  pc, pr = np.array([-1.0, -5.0, -2.0]), np.array([-2.0, -1.0, -2.0])
  rc, rr = np.array([-1.5, -4.0, -2.0]), np.array([-1.5, -1.5, -2.0])
  m = evaluation.pair_metrics(pc, pr, rc, rr, beta=0.5)
  margin = 0.5 * np.array([0.5 + 0.5, -1.0 - 0.5, 0.0])
  assert m["logp_accuracy"] == 1 / 3 and np.isclose(m["logp_margin"], np.mean([1.0, -4.0, 0.0]))
  assert m["reward_accuracy"] == 1 / 3  # ties (the third pair) count as wrong, as TRL's rewards/accuracies
  assert np.isclose(m["reward_margin"], margin.mean())
  assert np.isclose(m["dpo_loss"], np.mean(-np.log(1 / (1 + np.exp(-margin)))))
  before = evaluation.pair_metrics(pc, pr, pc, pr, beta=0.5)  # policy == reference
  assert before["reward_accuracy"] == 0.0 and np.isclose(before["dpo_loss"], np.log(2))


def test_sft_eval_nll_equals_the_training_loss():
  model = models.create_model(models.get_config("tiny"), seed=0)
  tx, _ = optim.make_optimizer({"learning_rate": 1e-3}, total_steps=1)
  graphdef, st, _ = state_lib.create_train_state(model, tx)
  batch = data.synthetic_sft_batch("sorting", 0, batch_size=6, seq_len=24, seed=0)
  examples = [{k: v[i] for k, v in batch.items()} for i in range(6)]
  collate = lambda exs: {k: np.stack([e[k] for e in exs]) for k in exs[0]}
  # 6 examples in batches of 4: the second batch repeats its last row, which must not count.
  eval_fn = evaluation.make_sft_eval(graphdef, recipe.fixed_batches(examples, 4, collate), lambda b: b)
  loss, aux = sft.make_sft_loss()(model, batch, None)
  m = eval_fn(st)
  np.testing.assert_allclose(m["nll"], float(aux["nll"]), rtol=1e-5)
  assert np.isclose(m["perplexity"], np.exp(m["nll"]))
  logits = np.asarray(model(batch["input_ids_BxT"]))
  mask = batch["loss_mask_BxT"] > 0
  right = (logits.argmax(-1) == batch["targets_BxT"]) & mask
  assert np.isclose(m["token_accuracy"], right.sum() / mask.sum())
  assert np.isclose(m["exact_match"], np.mean(right.sum(-1) == mask.sum(-1)))
