"""``experiments/dpo.py --config.online=true``: online preference optimisation on your prompts and reward.

Runs on the tiny model (random init, byte-level tokenizer) with prompt files written here and a
shaped text reward a random model can climb (the fraction of the completion's characters that
are letters of the row's ``answer`` word; the eval file asks for the same 12 words): the
policy's held-out mean reward rises and it beats the initial model, a run stopped by SIGTERM
mid-iteration resumes there and trains every iteration's pairs exactly once, SPIN pairs the
chosen responses, and bad online config is a one-line error naming the key. (That a resumed
run reproduces an uninterrupted one is ``tests/test_online_preference.py``'s.)
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from rlhf_jax import run as run_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DPO = os.path.join(REPO, "experiments", "dpo.py")
WORDS = ["apple", "river", "stone", "cloud", "green", "music", "tiger", "paper", "light", "ocean", "bread", "chair"]

REWARDS = '''
import os
import signal

ITERATIONS = [0]

def letters(completions, prompts, answer, split, **kwargs):
    """Fraction of the completion's characters that are letters of the answer word."""
    if split[0] == "train":  # an iteration's judging (not the held-out evaluation's)
        ITERATIONS[0] += 1
        if ITERATIONS[0] == int(os.environ.get("KILL_AT_ITERATION", "0")):
            os.kill(os.getpid(), signal.SIGTERM)  # the loop saves and stops
    return [sum(ch in a for ch in c) / max(len(c), 1) for c, a in zip(completions, answer)]

def constant(completions, **kwargs):
    return [0.0] * len(completions)

def needs_gold(completions, gold):
    return [0.0] * len(completions)
'''

# Sized for seconds on 2 CPU cores: 16 prompts x 4 samples per iteration, 16 new tokens; the 64 held-out
# prompts make the same sampler shape (one compilation).
SMALL = ("--config.max_len=48", "--config.max_prompt_len=32", "--config.prompts_per_iteration=16",
         "--config.num_samples=4", "--config.batch_size=4", "--config.optimizer.warmup_steps=0",
         "--config.optimizer.schedule=constant", "--config.beta=0.5", "--config.eval_batch_size=32")


def write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


def prompt_rows(n, offset=0, split="train"):
  return [{"prompt": f"Say {WORDS[i % len(WORDS)]}", "answer": WORDS[i % len(WORDS)], "split": split}
          for i in range(offset, offset + n)]


def pair_rows(n, offset=0):
  return [{"prompt": [{"role": "user", "content": f"Say {w}"}], "chosen": [{"role": "assistant", "content": w}],
           "rejected": [{"role": "assistant", "content": w[::-1]}]}
          for w in (WORDS[i % len(WORDS)] for i in range(offset, offset + n))]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  d = tmp_path_factory.mktemp("online_task")
  (d / "my_rewards.py").write_text(REWARDS)
  return {"dir": d, "train": write_jsonl(d / "train.jsonl", prompt_rows(64)),
          "eval": write_jsonl(d / "eval.jsonl", prompt_rows(64, offset=1000, split="eval")),
          "pairs": write_jsonl(d / "pairs.jsonl", pair_rows(32)), "rewards": str(d / "my_rewards.py")}


def run(workdir, *overrides, expect=0):
  rc = run_lib.main([DPO, "--workdir", str(workdir), "--config.progress=false", "--config.online=true", *overrides])
  assert rc == expect, f"dpo.py exited {rc}"
  if rc:
    return None
  with open(os.path.join(workdir, "result.json")) as f:
    return json.load(f)


def online_args(task, *extra):
  return (f"--config.data.train_files={task['train']}", f"--config.data.eval_files={task['eval']}",
          f"--config.reward.fns={task['rewards']}:letters", *SMALL, *extra)


def test_lora_online_dpo_killed_mid_iteration_resumes_and_raises_the_held_out_reward(task, tmp_path, capsys,
                                                                                   monkeypatch):
  """LoRA (the frozen base is the reference): SIGTERM while iteration 2 of 5 is judged stops the run after that
  iteration's first step (exit 143, a checkpoint); the rerun resumes there and finishes; the policy's held-out
  reward rises and it beats the initial model; the adapters are exported."""
  wd = tmp_path / "run"
  args = online_args(task, "--config.num_iterations=5", "--config.lora.rank=8", "--config.optimizer.learning_rate=1e-2",
                     f"--config.export.adapter_dir={tmp_path / 'adapter'}")
  monkeypatch.setenv("KILL_AT_ITERATION", "3")
  assert run(wd, *args, expect=143) is None
  assert not (wd / "result.json").exists() and (wd / "iterations" / "iteration_000002.p0.npz").exists()
  monkeypatch.delenv("KILL_AT_ITERATION")
  capsys.readouterr()
  r = run(wd, *args)
  out = capsys.readouterr().out
  assert "resumed from iteration 2 of 5" in out and "at step 1 of the iteration" in out, out
  h = r["headline"]
  assert h["metric"] == "reward_mean" and h["after"] > h["before"], h
  assert r["win_rate_vs_initial"] > 0.5 and r["online"] and r["online_algorithm"] == "online_dpo"
  assert r["heldout_before"]["letters_failures"] == 0 and r["resumed_from"] is not None
  # Each iteration's rows were trained on once: no step lost or repeated across the kill.
  rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]
  per_iteration = [x["iteration/steps"] for x in rows if "iteration/steps" in x]
  assert r["iterations"] == len(per_iteration) == 5 and r["steps"] == sum(per_iteration) > 5
  samples = [json.loads(l) for l in open(wd / "samples" / "iteration_000004.jsonl")]
  assert samples and len(samples[0]["completions"]) == 4 and len(samples[0]["scores"]) == 4
  assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
  with open(wd / "run_config.json") as f:
    assert json.load(f)["recipe"] == "dpo"


def test_spin_with_the_chosen_response_as_gold(task, tmp_path):
  r = run(tmp_path / "spin", f"--config.data.train_files={task['pairs']}", "--config.online_algorithm=spin",
          f"--config.reward.fns={task['rewards']}:constant", "--config.num_iterations=2", *SMALL,
          "--config.num_samples=1", "--config.prompts_per_iteration=8", "--config.optimizer.learning_rate=3e-3")
  assert r["online_algorithm"] == "spin" and r["pairs_total"] == 16  # each sample against its prompt's gold
  assert np.isfinite(r["headline"]["after"]) and r["heldout_after"]["win_rate"] >= 0
  from rlhf_jax.models.tokenizer import Tokenizer

  tok = Tokenizer.byte_level()
  with np.load(tmp_path / "spin" / "iterations" / "iteration_000001.p0.npz") as z:
    golds = [tok.decode(t[m > 0].tolist()) for t, m in zip(z["chosen_targets_BxT"], z["chosen_loss_mask_BxT"])]
  assert all(g in {w + "<|im_end|>" for w in WORDS} for g in golds), golds  # the chosen turn, to its end


def test_bad_online_config_is_one_line_naming_the_key(task, tmp_path, capsys):
  cases = [
      (("--config.online_algorithm=nope",), "config.online_algorithm='nope'"),
      (("--config.num_samples=1",), "config.num_samples=1"),
      (("--config.temperature=0",), "config.temperature=0"),
      (("--config.num_iterations=0",), "config.num_iterations=0"),
      (("--config.online_algorithm=spin",), "config.online_algorithm='spin'"),  # prompt rows have no chosen
      ((f"--config.reward.fns={task['rewards']}:needs_gold",), "needs_gold needs ['gold']"),
      (("--config.reward.fns=()",), "config.reward.fns"),
      (("--config.ld_alpha=0.5",), "config.ld_alpha"),
      (("--config.loss=kto",), "config.loss='kto'"),
  ]
  base = (f"--config.data.train_files={task['train']}", f"--config.reward.fns={task['rewards']}:letters")
  for overrides, key in cases:
    run(tmp_path / "bad", *base, *overrides, expect=2)
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (overrides, err)


def test_online_keys_are_documented(capsys):
  module, arg = run_lib.load_experiment(DPO)
  assert run_lib.undocumented_keys(module.get_config(arg), module.CONFIG_HELP) == []
  assert run_lib.main([DPO, "--help"]) == 0
  out = capsys.readouterr().out
  assert "online_algorithm" in out and "reward.fns" in out and "prompts_per_iteration" in out


def test_an_iteration_without_pairs_takes_no_step():
  """A judge that scores every sample alike makes no pair (the default reward on a random model does)."""
  from rlhf_jax.train import iterative

  empty = {"chosen_input_ids_BxT": np.zeros((0, 8), np.int32)}
  assert list(iterative.iteration_batches(empty, batch_size=4, num_steps=0, seed=0, iteration=3)) == []
