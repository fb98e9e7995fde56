"""Learning test on the real SmolLM2-135M-Instruct: DPO with LoRA (frozen base = reference).

Runs ``experiments/dpo_smollm2.py:runlocal`` and checks that the held-out
preference accuracy rises clearly, the DPO loss falls (train and held-out), and
only the LoRA adapters changed: the frozen base equals the GGUF weights bit for bit.
"""

import json
import math
import os

import jax
import numpy as np
from flax import nnx

from rlhf_jax import run
from rlhf_jax.models import lora
from rlhf_jax.models.pretrained import from_pretrained
from tests._smollm2 import smollm2_gguf_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flat(state):
  state = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state))}


def test_dpo_lora_smollm2_learns_heldout_preference_and_trains_only_adapters(tmp_path):
  path = smollm2_gguf_path()
  module, _ = run.load_experiment(os.path.join(REPO, "experiments", "dpo_smollm2.py"))
  config = module.get_config("runlocal")
  run.apply_overrides(config, [("progress", "false"), ("gguf_path", path)])
  result = module.main(config, str(tmp_path))

  with open(tmp_path / "result.json") as f:
    saved = json.load(f)
  before, after = saved["heldout_before"], saved["heldout_after"]
  # Held-out preference accuracy (the model ranks the correct sum above the wrong one) rises clearly.
  assert after["logp_accuracy"] >= before["logp_accuracy"] + 0.15, saved
  head = saved["headline"]
  assert head["metric"] == "logp_accuracy" and math.isfinite(head["before"]) and math.isfinite(head["after"]), head
  assert head["before"] == before["logp_accuracy"] and head["after"] >= head["before"] + 0.15, head
  assert after["logp_margin"] > before["logp_margin"] + 1.0, saved
  # DPO's implicit reward on held-out pairs: 0 before (policy == reference), mostly right after.
  assert before["reward_accuracy"] == 0.0 and before["reward_margin"] == 0.0, saved
  assert after["reward_accuracy"] >= 0.7 and after["reward_margin"] > 0, saved
  # The DPO loss went down: held-out (log 2 at the start) and in training.
  assert abs(before["dpo_loss"] - np.log(2)) < 1e-5, saved
  assert after["dpo_loss"] < before["dpo_loss"] - 0.05, saved
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
  losses = [r["loss"] for r in rows]
  assert rows[-1]["data/sequences"] > 0 and rows[-1]["data/prompt_truncated"] == 0  # data counters in the metrics
  assert len(losses) == config.dpo.num_steps
  assert abs(losses[0] - np.log(2)) < 1e-5
  assert np.mean(losses[-4:]) < np.log(2) - 0.05, losses
  assert saved["token_stats"]["prompt_truncated"] == saved["token_stats"]["response_truncated"] == 0

  # Only LoRA adapters were trained; the frozen base is the GGUF model, unchanged.
  state = result.state
  trained = _flat(state.params)
  n_layers = 30
  assert len(trained) == n_layers * len(config.lora.targets) * 2, sorted(trained)[:4]
  assert all(any(f"'{t}_lora'" in k for t in config.lora.targets) for k in trained), sorted(trained)[:4]
  assert saved["num_trainable_params"] == sum(v.size for v in trained.values())
  b_norm = sum(float(np.abs(v).sum()) for k, v in trained.items() if k.endswith("['b']"))
  assert b_norm > 0  # adapters moved from B = 0
  assert jax.tree.leaves(state.opt_state)  # the optimizer holds adapter moments only:
  assert sum(x.size for x in jax.tree.leaves(state.opt_state)) <= 3 * sum(v.size for v in trained.values()) + 16
  base, _ = from_pretrained(path, dtype="float32", param_dtype="float32", scan_layers=True)
  want = _flat(nnx.state(base))
  got = _flat(state.extras["frozen_params"])
  assert set(got) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  assert not lora.adapters(base)
  # A checkpoint of the final step, for resuming.
  assert os.listdir(tmp_path / "checkpoints")
