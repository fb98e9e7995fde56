"""Learning test: after SFT then DPO, the policy's own samples have the preferred property more often."""

import json
import math
import os

from rlhf_jax import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dpo_tiny_prefers_ascending(tmp_path):
  module, _ = run.load_experiment(os.path.join(REPO, "experiments", "dpo_tiny.py"))
  config = module.get_config("runlocal")  # 300 SFT + 60 DPO steps: ascending 0.21 -> 0.53 (full run 0.52 -> 0.97)
  run.apply_overrides(config, [("progress", "false")])
  result = module.main(config, str(tmp_path))
  with open(tmp_path / "result.json") as f:
    saved = json.load(f)
  assert saved["improvement"] >= 0.25, saved
  head = saved["headline"]
  assert head["metric"] == "ascending_rate" and math.isfinite(head["before"]) and math.isfinite(head["after"]), head
  assert head["after"] >= head["before"] + 0.25, head
  assert saved["policy_samples"]["descending"] < 0.1, saved
  assert result.last_metrics["rewards/accuracies"] > 0.9
  assert os.listdir(tmp_path / "cache")  # reference log-probs cached for later runs
