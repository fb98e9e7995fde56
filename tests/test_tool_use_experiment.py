"""Learning test: multi-turn GRPO with a calculator tool raises held-out accuracy after a flawed SFT."""

import json
import math
import os

from rlhf_jax import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tool_use_tiny_runlocal_raises_accuracy(tmp_path):
  module, _ = run.load_experiment(os.path.join(REPO, "experiments", "tool_use_tiny.py"))
  config = module.get_config("runlocal")
  run.apply_overrides(config, [("progress", "false")])
  module.main(config, str(tmp_path))
  with open(tmp_path / "result.json") as f:
    result = json.load(f)
  head = result["headline"]  # sft -> rl, greedy multi-turn episodes on 256 held-out problems
  assert head["metric"] == "greedy_accuracy" and math.isfinite(head["before"]) and math.isfinite(head["after"]), head
  assert head["before"] == result["sft_accuracy"] and head["after"] == result["rl_accuracy"]
  assert result["improvement"] >= 0.15, result  # measured +0.22 (0.51 -> 0.73)
  # The flawed demonstrator guessed for two of the four phrasings; GRPO makes the policy call the tool.
  assert result["sft_tool_call_rate"] < 0.7 and result["rl_tool_call_rate"] >= 0.9, result
  assert all(k in result["rl_eval"] for k in ("errors/malformed_call", "errors/tool_timeout", "errors/no_action"))
  m = result["final_metrics"]
  for key in ("reward_mean", "clip_fraction", "entropy", "response_length", "eval/accuracy"):
    assert key in m, key
  with open(tmp_path / "rl" / "episodes.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert {r["step"] for r in rows} == set(range(1, config.rl.num_iterations + 1))
  assert all("errors/total" in r and 0.0 <= r["truncated"] <= 1.0 for r in rows)
