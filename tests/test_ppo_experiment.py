"""Learning test: PPO raises the learned reward and the gold reward with bounded KL."""

import json
import math
import os

from rlhf_jax import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ppo_tiny_raises_reward_with_bounded_kl(tmp_path):
  module, _ = run.load_experiment(os.path.join(REPO, "experiments", "ppo_tiny.py"))
  config = module.get_config()
  # Reduced for CI (the full run: reward-model score -1.2 -> 3.9, gold 0.41 -> 0.75, KL 1.7).
  run.apply_overrides(config, [("progress", "false"), ("ppo.num_iterations", "15"), ("eval.every", "15")])
  module.main(config, str(tmp_path))
  with open(tmp_path / "result.json") as f:
    result = json.load(f)
  before, after = result["before"], result["after"]
  assert after["rm_reward"] > before["rm_reward"] + 1.0, result
  assert after["gold"] > before["gold"] + 0.1, result
  head = result["headline"]
  assert head["metric"] == "gold" and math.isfinite(head["before"]) and math.isfinite(head["after"]), head
  assert head["before"] == before["gold"] and head["after"] > head["before"] + 0.1, head
  assert 0.0 < after["kl_to_sft"] < 5.0, result
  m = result["final_metrics"]
  for key in ("value_loss", "value_explained_variance", "clip_fraction", "reward_mean", "entropy"):
    assert key in m, key
