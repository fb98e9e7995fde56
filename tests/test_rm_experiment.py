"""Learning test: the reward model ranks held-out pairs and best-of-N tracks the gold reward."""

import json
import math
import os

from rlhf_jax import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _headline(workdir, metric):
  with open(os.path.join(workdir, "result.json")) as f:
    head = json.load(f)["headline"]
  assert head["metric"] == metric and math.isfinite(head["before"]) and math.isfinite(head["after"]), head
  return head


def test_rm_tiny_learns_the_true_preference(tmp_path):
  module, _ = run.load_experiment(os.path.join(REPO, "experiments", "rm_tiny.py"))
  config = module.get_config()
  # Reduced for CI (the full 600-step run: accuracy 0.965, best-of-16 gold 0.775 vs random 0.550).
  run.apply_overrides(config, [("progress", "false"), ("num_steps", "250"), ("eval.num_pairs", "512"),
                               ("eval.bon_prompts", "128")])
  out = module.main(config, str(tmp_path)).eval_metrics
  assert out["heldout_accuracy"] > 0.8, out
  head = _headline(tmp_path, "heldout_accuracy")
  assert head["after"] == out["heldout_accuracy"] and head["before"] == out["heldout_accuracy_before"], head
  assert head["after"] > head["before"] + 0.2, head  # the untrained model is near chance
  assert 0.0 <= out["heldout_calibration_error"] < 0.25, out
  for name, curve in out["best_of_n_gold"].items():
    assert curve[16] > curve[1] + 0.1, (name, curve)
    assert curve[16] <= out["oracle_gold"] + 1e-9


def test_pm_tiny_learns_a_symmetric_preference(tmp_path):
  module, _ = run.load_experiment(os.path.join(REPO, "experiments", "pm_tiny.py"))
  config = module.get_config()
  run.apply_overrides(config, [("progress", "false"), ("num_steps", "300"), ("eval.num_pairs", "512")])
  out = module.main(config, str(tmp_path)).eval_metrics
  assert out["heldout_accuracy"] > 0.7, out
  head = _headline(tmp_path, "heldout_accuracy")
  assert head["after"] == out["heldout_accuracy"] and head["before"] == out["heldout_accuracy_before"], head
  assert head["after"] > head["before"] + 0.1, head  # the untrained model is near chance
  assert out["symmetry_error"] < 1e-5, out
