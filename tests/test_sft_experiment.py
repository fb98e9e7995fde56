"""Learning test: the SFT experiment's model learns to sort digits (not just runs)."""

import json
import math
import os

from rlhf_jax import run
from rlhf_jax.train.writers import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sft_tiny_learns_sorting(tmp_path):
  module, _ = run.load_experiment(os.path.join(REPO, "experiments", "sft_tiny.py"))
  config = module.get_config()
  # A reduced run (300 of 600 steps) to keep CI short; the full run reaches ~0.01 loss.
  run.apply_overrides(config, [("num_steps", "300"), ("progress", "false"), ("eval.every", "100"),
                               ("checkpoint.every", "0")])
  result = module.main(config, str(tmp_path))
  rows = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[0] > 1.5  # near log(vocab) at the start
  assert result.last_metrics["loss"] < 0.15, result.last_metrics
  assert result.eval_metrics["eval/loss"] < 0.15, result.eval_metrics
  assert result.eval_metrics["eval/exact_match"] > 0.7, result.eval_metrics
  with open(os.path.join(tmp_path, "result.json")) as f:
    head = json.load(f)["headline"]
  assert head["metric"] == "exact_match" and math.isfinite(head["before"]) and math.isfinite(head["after"]), head
  assert head["after"] == result.eval_metrics["eval/exact_match"], head
  assert head["after"] > head["before"] + 0.5, head  # the untrained model sorts almost nothing
  assert os.path.exists(os.path.join(tmp_path, "curves.png"))
  assert os.listdir(os.path.join(tmp_path, "tensorboard"))
