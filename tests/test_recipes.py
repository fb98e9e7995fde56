"""The generic recipes on the tiny model and a tiny Hugging Face Llama, with JSONL files written here.

Each run is short (tens of steps of a 2-layer model) and asserts that its headline, measured
on held-out rows, improves; files contain malformed rows, which are skipped and counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax import run as run_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(REPO, "experiments")

# A preference any model can learn from a few steps and that carries to held-out prompts:
# a polite, complete answer over a bare one.
WORDS = ["apple", "river", "stone", "cloud", "green", "music", "tiger", "paper", "light", "ocean", "bread", "chair"]


def _question(i):
  return f"Spell {WORDS[i % len(WORDS)]} {i}"


def _good(i):
  return f"Sure! {WORDS[i % len(WORDS)]} is spelled " + "-".join(WORDS[i % len(WORDS)]) + "."


def _bad(i):
  return WORDS[(i + 5) % len(WORDS)]


def write_jsonl(path, rows, bad_lines=()):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
    for b in bad_lines:
      f.write(b + "\n")
  return str(path)


def rows_for(fmt, n, offset=0):
  out = []
  for j in range(n):
    i = j + offset
    q, good, bad = _question(i), _good(i), _bad(i)
    if fmt == "hh_rlhf":
      out.append({"chosen": f"\n\nHuman: {q}\n\nAssistant: {good}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"})
    elif fmt == "conversational":
      out.append({"prompt": [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": q}],
                  "chosen": [{"role": "assistant", "content": good}],
                  "rejected": [{"role": "assistant", "content": bad}]})
    elif fmt == "implicit":
      out.append({"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
                  "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}]})
    elif fmt == "ultrafeedback":
      out.append({"prompt": q, "completions": [{"response": bad, "score": 2.0}, {"response": good, "score": 9.0},
                                               {"response": bad + " " + bad, "score": 1.0}]})
    elif fmt == "kto":
      label = j % 2 == 0
      out.append({"prompt": q, "completion": good if label else bad, "label": label})
    elif fmt == "sft":
      out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": good}]})
    elif fmt == "prompt":
      out.append({"prompt": q, "answer": WORDS[i % len(WORDS)], "difficulty": i % 3})
    else:
      raise ValueError(fmt)
  return out


BAD_LINES = ('{"not json', '{"prompt": "x"}')  # unparsable, and a row missing its fields


def files(tmp_path, fmt, n_train=96, n_eval=24):
  train = write_jsonl(tmp_path / f"{fmt}_train.jsonl", rows_for(fmt, n_train), BAD_LINES if fmt != "prompt" else ())
  held = write_jsonl(tmp_path / f"{fmt}_eval.jsonl", rows_for(fmt, n_eval, offset=1000))
  return train, held


def run(experiment, workdir, *overrides, expect=0):
  argv = [os.path.join(EXP, experiment), "--workdir", str(workdir), "--config.progress=false", *overrides]
  rc = run_lib.main(argv)
  assert rc == expect, f"{experiment} exited {rc}"
  if expect:
    return None
  with open(os.path.join(workdir, "result.json")) as f:
    return json.load(f)


def improved(result):
  h = result["headline"]
  assert np.isfinite(h["before"]) and np.isfinite(h["after"]), h
  if h.get("higher_is_better", True):
    assert h["after"] > h["before"], h
  else:
    assert h["after"] < h["before"], h
  return h


COMMON = ("--config.max_len=96", "--config.max_prompt_len=48", "--config.eval_batch_size=24")


@pytest.mark.parametrize("experiment", ["sft.py", "dpo.py"])  # reward_model.py: the rows of dpo.py; grpo.py: test_demo_files
def test_recipe_defaults_generate_their_data(tmp_path, experiment):
  """With no data.train_files a recipe writes its demo task to <workdir>/data and trains on it."""
  r = run(experiment, tmp_path / "run", "--config.num_steps=2", "--config.batch_size=8", "--config.eval_batch_size=8",
          "--config.data.max_eval_examples=8")
  assert os.path.exists(tmp_path / "run" / "data" / "train.jsonl") and np.isfinite(r["headline"]["after"])


def test_demo_files_and_their_reward(tmp_path):
  import importlib.util

  from rlhf_jax.train import demo_files

  paths = demo_files.write_demo_files(str(tmp_path), num_train=8, num_eval=4)
  spec = importlib.util.spec_from_file_location("my_rewards", paths["my_rewards"])
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert mod.correct(["12", "so 2 + 3 = 5", " 5 "], ["a", "b", "c"], answer=["12", "5", "6"]) == [1.0, 1.0, 0.0]
  assert mod.number_only(["12", "x 5"]) == [0.5, 0.0]
  from rlhf_jax import data as data_lib

  for name, fmt in (("chats", "sft"), ("pairs", "preference"), ("kto", "kto"), ("ranked", "ultrafeedback"),
                    ("prompts", "prompt")):
    examples, stats, detected = data_lib.load_dataset(paths[name])
    assert detected == fmt and len(examples) == 8 and stats["skipped"] == 0


@pytest.mark.parametrize("fmt", ["hh_rlhf", "implicit"])  # conversational: test_dpo_loss_mix_and_bad_loss
def test_dpo_pairs_formats(tmp_path, fmt):
  train, held = files(tmp_path, fmt)
  r = run("dpo.py", tmp_path / "run", f"--config.data.train_files={train}", f"--config.data.eval_files={held}",
          "--config.num_steps=30", "--config.batch_size=8", "--config.optimizer.learning_rate=2e-3", *COMMON)
  assert r["data_kind"] == "pair" and r["data_format"] == ("hh_rlhf" if fmt == "hh_rlhf" else "preference")
  h = improved(r)
  assert h["metric"] == "reward_accuracy" and h["after"] >= 0.9  # the implicit reward ranks held-out pairs
  assert r["heldout_after"]["dpo_loss"] < r["heldout_before"]["dpo_loss"]
  metrics = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert any(m.get("data/train/skipped") == 2 for m in metrics)  # the malformed rows, counted


def test_dpo_unpaired_kto_and_listwise(tmp_path):
  train, held = files(tmp_path, "kto")
  r = run("dpo.py", tmp_path / "kto", f"--config.data.train_files={train}", f"--config.data.eval_files={held}",
          "--config.num_steps=30", "--config.batch_size=8", "--config.optimizer.learning_rate=2e-3", *COMMON)
  assert r["data_kind"] == "unpaired" and r["losses"][0][0] == "kto"
  improved(r)
  train, held = files(tmp_path, "ultrafeedback")
  r = run("dpo.py", tmp_path / "list", f"--config.data.train_files={train}", f"--config.data.eval_files={held}",
          "--config.num_steps=30", "--config.batch_size=8", "--config.optimizer.learning_rate=2e-3",
          "--config.data.num_completions=3", *COMMON)
  assert r["data_kind"] == "ranked" and r["headline"]["metric"] == "reward_top1_accuracy"
  improved(r)


def test_dpo_loss_mix_and_bad_loss(tmp_path, capsys):
  train, held = files(tmp_path, "conversational")
  r = run("dpo.py", tmp_path / "rpo", f"--config.data.train_files={train}", f"--config.data.eval_files={held}",
          "--config.num_steps=20", "--config.batch_size=8", "--config.optimizer.learning_rate=2e-3",
          "--config.loss=ipo,sft", "--config.loss_weights=1.0,0.5", "--config.loss_kwargs.beta=0.2", *COMMON)
  assert r["losses"] == [["ipo", 1.0], ["sft", 0.5]]
  improved(r)
  run("dpo.py", tmp_path / "bad", f"--config.data.train_files={train}", "--config.loss=kto", expect=2)
  err = capsys.readouterr().err
  assert "config.loss='kto'" in err and "Traceback" not in err
  run("dpo.py", tmp_path / "no_gold", f"--config.data.train_files={train}", "--config.loss=tpo", expect=2)
  err = capsys.readouterr().err
  assert "needs the per-pair column 'gold'" in err and "Traceback" not in err, err
  # TPO: the preference rows carry a gold response (a third member of the forward).
  gold_rows = [{**r, "gold": [{"role": "assistant", "content": _good(i) + " Done."}]}
               for i, r in enumerate(rows_for("conversational", 96))]
  gold = write_jsonl(tmp_path / "gold.jsonl", gold_rows)
  r = run("dpo.py", tmp_path / "tpo", f"--config.data.train_files={gold}", f"--config.data.eval_files={held}",
          "--config.num_steps=20", "--config.batch_size=8", "--config.optimizer.learning_rate=2e-3",
          "--config.loss=tpo", *COMMON)
  improved(r)


def test_sft_recipe_weighted_objectives_read_their_row_columns(tmp_path, capsys):
  """Half the rows come from a noisy source (a wrong answer): C-RLFT weighs them down by source,
  A-LoL by reward; both lower the held-out NLL of the good answers. A missing column is one line."""
  mixed = []
  for r, j in zip(rows_for("sft", 96), range(96)):
    noisy = j % 2 == 1
    if noisy:
      r["messages"][-1]["content"] = _bad(j)
    mixed.append({**r, "source": "noisy" if noisy else "expert", "reward": 0.0 if noisy else 1.0})
  train = write_jsonl(tmp_path / "mixed.jsonl", mixed)
  held = write_jsonl(tmp_path / "held.jsonl", rows_for("sft", 24, offset=1000))
  args = (f"--config.data.train_files={train}", f"--config.data.eval_files={held}", "--config.num_steps=15",
          "--config.batch_size=8", "--config.optimizer.learning_rate=2e-3", *COMMON)
  r = run("sft.py", tmp_path / "c_rlft", *args, "--config.loss.objective=c_rlft",
          "--config.loss.source_rewards=expert:1,noisy:0.1")
  assert r["objective"] == "c_rlft"
  improved(r)
  r = run("sft.py", tmp_path / "a_lol", *args, "--config.loss.objective=a_lol", "--config.loss_kwargs.epsilon=0.5")
  improved(r)
  run("sft.py", tmp_path / "nft", *args, "--config.loss.objective=nft", expect=2)
  err = capsys.readouterr().err
  assert "mixed.jsonl:1: field 'correct': missing" in err and "Traceback" not in err, err


def test_sft_recipe_resume_load_run_and_export(tmp_path, capsys):
  import jax
  import torch
  import transformers

  from rlhf_jax.train import recipe

  train, held = files(tmp_path, "sft")
  wd = tmp_path / "sft"
  args = (f"--config.data.train_files={train}", f"--config.data.eval_files={held}", "--config.num_steps=40",
          "--config.batch_size=8", "--config.optimizer.learning_rate=3e-3", f"--config.export.hf_dir={wd / 'hf'}",
          *COMMON)
  r = run("sft.py", wd, *args)
  h = improved(r)
  assert h["metric"] == "nll" and r["data_format"] == "sft"
  out = capsys.readouterr().out
  assert "headline (held-out): nll" in out and "metrics.jsonl" in out
  # A second run finds the run complete; it says so and changes nothing.
  r2 = run("sft.py", wd, *args)
  assert "already complete at step 40" in capsys.readouterr().out
  assert r2["heldout_after"] == pytest.approx(r["heldout_after"])
  # The run loads back as a model + tokenizer, and as the start of another recipe.
  model, tok = recipe.load_run(str(wd))
  ids = np.asarray([tok.encode("Spell apple 3")], np.int32)
  ours = np.asarray(jax.device_get(model(ids)))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(wd / "hf"), torch_dtype=torch.float32)
  with torch.no_grad():
    theirs = hf_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(wd / "hf"))
  assert hf_tok.encode("Spell apple 3", add_special_tokens=False) == tok.encode("Spell apple 3")


def test_reward_model_recipe_two_heads(tmp_path):
  train, held = files(tmp_path, "hh_rlhf")
  r = run("reward_model.py", tmp_path / "rm", f"--config.data.train_files={train}",
          f"--config.data.eval_files={held}", "--config.num_steps=40", "--config.batch_size=8",
          "--config.optimizer.learning_rate=2e-3", "--config.num_heads=2", *COMMON)
  h = improved(r)
  assert h["metric"] == "accuracy" and h["after"] >= 0.9
  assert "accuracy_head1" in r["heldout_after"] and "ensemble_accuracy" in r["heldout_after"]


def test_reward_model_recipe_hf_llama_lora_ultrafeedback(tmp_path):
  """LoRA reward model on a Hugging Face Llama (adapters and the new head train), UltraFeedback rows."""
  from rlhf_jax.train import recipe

  tok, base = _hf_llama_dir(tmp_path / "base")
  train, held = files(tmp_path, "ultrafeedback")
  wd = tmp_path / "rm"
  r = run("reward_model.py", wd, f"--config.model.path={base}", "--config.lora.rank=8",
          f"--config.data.train_files={train}", f"--config.data.eval_files={held}", "--config.num_steps=40",
          "--config.batch_size=8", "--config.optimizer.learning_rate=3e-3", *COMMON)
  h = improved(r)
  assert r["data_format"] == "ultrafeedback" and h["after"] >= 0.8
  model, _ = recipe.load_run(str(wd))  # the adapters merged, the trained head restored
  assert model.config.scalar_head_outputs == 1


REWARDS = '''
CALLS = []

def digits(completions, prompts, answer, difficulty, **kwargs):
    """Fraction of characters that are letters of the word (a shaped reward a random model can climb)."""
    CALLS.append(len(completions))
    assert len(answer) == len(completions) == len(prompts) == len(difficulty)
    return [sum(ch in a for ch in c) / max(len(c), 1) for c, a in zip(completions, answer)]

def flaky(completion, answer):
    if "x" in completion:
        raise RuntimeError("boom")
    return None if "q" in completion else 0.0
'''


def test_grpo_recipe_user_rewards(tmp_path):
  train, held = files(tmp_path, "prompt")
  rewards = tmp_path / "my_rewards.py"
  rewards.write_text(REWARDS)
  wd = tmp_path / "grpo"
  r = run("grpo.py", wd, f"--config.data.train_files={train}", f"--config.data.eval_files={held}",
          f"--config.reward.fns=('{rewards}:digits', '{rewards}:flaky')", "--config.reward.weights=1,1",
          "--config.num_steps=12", "--config.batch_size=8", "--config.group_size=4",
          "--config.optimizer.learning_rate=3e-3", "--config.max_len=64", "--config.max_prompt_len=48",
          "--config.eval_sampling=sampled", "--config.eval_every=6", "--config.eval_batch_size=24",
          "--config.kl_coef=0.01")
  h = improved(r)
  assert h["metric"] == "reward_mean"
  assert r["reward_failures"]["flaky"] > 0  # exceptions and None were counted, not raised
  samples = [json.loads(l) for l in open(wd / "samples.jsonl")]
  assert {s["step"] for s in samples} >= {0, 6, 12} and all("completion" in s and "reward" in s for s in samples)


def test_grpo_reward_fn_needs_a_missing_column(tmp_path, capsys):
  train, _ = files(tmp_path, "prompt")
  (tmp_path / "r.py").write_text("def needs_gold(completions, prompts, gold):\n    return [0.0] * len(completions)\n")
  run("grpo.py", tmp_path / "g", f"--config.data.train_files={train}", f"--config.reward.fns={tmp_path / 'r.py'}:needs_gold",
      expect=2)
  err = capsys.readouterr().err
  assert "needs_gold needs ['gold']" in err and "Traceback" not in err
  run("grpo.py", tmp_path / "g2", f"--config.data.train_files={train}", "--config.reward.fns=no_such_module:fn", expect=2)
  assert "config.reward.fns" in capsys.readouterr().err


def test_user_errors_are_one_line(tmp_path, capsys):
  train, _ = files(tmp_path, "conversational")
  cases = [
      ("dpo.py", "--config.data.train_files=nope_*.jsonl", "config.data.train_files"),
      ("sft.py", "--config.model.path=/no/such/model", "config.model.path"),
      ("dpo.py", "--config.data.format=parquet_pairs", "config.data.format"),
  ]
  for exp, override, key in cases:
    run(exp, tmp_path / "e", f"--config.data.train_files={train}", override, expect=2)
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
  for override, key in (("--config.adv_estimator=gae", "config.adv_estimator=gae"),
                        ("--config.loss_mode=nope", "config.loss_mode='nope'")):
    run("grpo.py", tmp_path / "e3", override, expect=2)
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err, err
  # Too many malformed rows: stops before the model is loaded, naming the reasons and a row.
  bad = write_jsonl(tmp_path / "mostly_bad.jsonl", rows_for("conversational", 4), ['{"oops'] * 4)
  run("dpo.py", tmp_path / "e2", f"--config.data.train_files={bad}", expect=2)
  err = capsys.readouterr().err
  assert "invalid JSON" in err and "mostly_bad.jsonl:5" in err


@pytest.mark.parametrize("experiment", ["sft.py", "dpo.py", "reward_model.py", "grpo.py"])
def test_help_documents_every_key(experiment, capsys):
  module, arg = run_lib.load_experiment(os.path.join(EXP, experiment))
  config = module.get_config(arg)
  assert run_lib.undocumented_keys(config, module.CONFIG_HELP) == []
  assert run_lib.main([os.path.join(EXP, experiment), "--help"]) == 0
  out = capsys.readouterr().out
  assert "model.path" in out and "data.train_files" in out and "lora.rank" in out


def test_grpo_every_loss_mode_gets_only_its_hyper_parameters():
  import inspect

  import rlhf_jax.losses as L

  module, _ = run_lib.load_experiment(os.path.join(EXP, "grpo.py"))
  config = module.get_config()
  modes = [n for n in L.names() if L.info(n).kind == "policy"]
  assert {"vanilla", "gspo", "cispo", "gpg", "reinforce"} <= set(modes)
  for mode in modes:
    config.loss_mode = mode
    hp = module.policy_hparams(config)
    assert set(hp) <= set(inspect.signature(L.get(mode)).parameters), mode
    assert ("clip_ratio_low" in hp) == ("clip_ratio_low" in inspect.signature(L.get(mode)).parameters)


def _tiny_hf_llama(path, vocab_size):
  import torch
  import transformers

  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=False)
  transformers.LlamaForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True)


def _hf_llama_dir(path):
  """A tiny random Llama saved by transformers, with the byte-level tokenizer's files beside it."""
  from rlhf_jax.models.tokenizer import Tokenizer

  tok = Tokenizer.byte_level()
  _tiny_hf_llama(path, tok.vocab_size)
  tok.save(str(path))
  return tok, path


def test_hf_llama_lora_dpo_exports_adapter_and_merged(tmp_path):
  """A Hugging Face Llama saved by transformers, LoRA DPO, PEFT adapter + merged export load in transformers."""
  import torch
  import transformers

  from rlhf_jax.train import recipe

  tok, base = _hf_llama_dir(tmp_path / "base")
  train, held = files(tmp_path, "conversational")
  wd = tmp_path / "dpo"
  r = run("dpo.py", wd, f"--config.model.path={base}", "--config.lora.rank=8", "--config.lora.alpha=16",
          "--config.lora.targets=wq,wk,wv,wo,w_up", f"--config.data.train_files={train}",
          f"--config.data.eval_files={held}", "--config.num_steps=30", "--config.batch_size=8",
          "--config.optimizer.learning_rate=5e-3", f"--config.export.hf_dir={wd / 'hf'}",
          f"--config.export.adapter_dir={wd / 'adapter'}", *COMMON)
  improved(r)
  ids = np.asarray([tok.encode("Spell river 7")], np.int32)
  model, _ = recipe.load_run(str(wd))
  ours = np.asarray(model(ids))
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(wd / "hf"), torch_dtype=torch.float32)
  with torch.no_grad():
    np.testing.assert_allclose(merged(torch.tensor(ids, dtype=torch.long)).logits.numpy(), ours, atol=1e-4, rtol=1e-4)
  peft = pytest.importorskip("peft")
  plain = transformers.AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
  adapted = peft.PeftModel.from_pretrained(plain, str(wd / "adapter"))
  with torch.no_grad():
    np.testing.assert_allclose(adapted(torch.tensor(ids, dtype=torch.long)).logits.numpy(), ours, atol=1e-4, rtol=1e-4)


def test_sft_then_reward_model_then_grpo_lora_and_ppo(tmp_path):
  """One pipeline of runs, each starting from the last one's workdir: SFT -> reward model (from the SFT
  run) -> LoRA GRPO scored by a function and the reward-model run -> PPO with the critic from that run."""
  train_sft, held_sft = files(tmp_path, "sft", n_train=48, n_eval=8)
  short = ("--config.batch_size=8", "--config.num_steps=4", *COMMON)
  run("sft.py", tmp_path / "sft", f"--config.data.train_files={train_sft}", f"--config.data.eval_files={held_sft}",
      *short)
  train_rm, held_rm = files(tmp_path, "conversational", n_train=48, n_eval=8)
  run("reward_model.py", tmp_path / "rm", f"--config.data.train_files={train_rm}",
      f"--config.data.eval_files={held_rm}", f"--config.model.path={tmp_path / 'sft'}", *short)
  train, held = files(tmp_path, "prompt", n_train=32, n_eval=8)
  rewards = tmp_path / "my_rewards.py"
  rewards.write_text(REWARDS)
  online = (f"--config.model.path={tmp_path / 'sft'}", f"--config.data.train_files={train}",
            f"--config.data.eval_files={held}", f"--config.reward.model_path={tmp_path / 'rm'}",
            "--config.num_steps=2", "--config.batch_size=4", "--config.group_size=2", "--config.kl_coef=0.05",
            "--config.max_len=64", "--config.max_prompt_len=48", "--config.eval_batch_size=8")
  r = run("grpo.py", tmp_path / "grpo", "--config.lora.rank=4", f"--config.reward.fns={rewards}:digits", *online)
  assert "reward/reward_model" in r["heldout_after"] and "reward/digits" in r["heldout_after"]
  assert np.isfinite(r["headline"]["after"]) and "run" in r["model"]
  # The reward model's backbone under a fresh categorical (HL-Gauss) value head.
  r = run("grpo.py", tmp_path / "ppo", "--config.algorithm=ppo", f"--config.critic.path={tmp_path / 'rm'}",
          "--config.reward.fns=()", "--config.critic.value_head=hl_gauss", "--config.critic.num_bins=11",
          "--config.critic.v_min=-5", "--config.critic.v_max=5", *online)
  assert r["algorithm"] == "ppo" and np.isfinite(r["headline"]["after"])
  metrics = [json.loads(l) for l in open(tmp_path / "ppo" / "metrics.jsonl")]
  assert any("value_loss" in m for m in metrics)


@pytest.mark.slow
def test_sigint_saves_and_exits_130(tmp_path):
  """A SIGINT mid-training: the run saves, exits 130, and a rerun resumes from the saved step."""
  import signal
  import time

  train, held = files(tmp_path, "sft")
  wd = tmp_path / "sigint"
  cmd = [sys.executable, "-m", "rlhf_jax.run", os.path.join(EXP, "sft.py"), "--workdir", str(wd),
         f"--config.data.train_files={train}", f"--config.data.eval_files={held}", "--config.num_steps=100000",
         "--config.batch_size=8", "--config.progress=false", *COMMON]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
  deadline = time.time() + 240
  logged = lambda: (wd / "metrics.jsonl").exists() and (wd / "metrics.jsonl").read_text().count("\n") >= 2
  while time.time() < deadline and not logged():  # training steps are running (and being logged)
    time.sleep(0.5)
  assert logged(), proc.communicate(timeout=60)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 130, err[-2000:]
  steps = sorted(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit())
  assert steps and steps[-1] > 0
