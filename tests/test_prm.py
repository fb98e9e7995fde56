"""Process reward models: the stepwise format, step masks, the PRM loss, best-of-N and a learning test."""

import json
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import models, run
from rlhf_jax.data import formats as F
from rlhf_jax.data import tokenize as T
from rlhf_jax.rewards import heads
from rlhf_jax.train import prm
from tests.test_data_formats import CharTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(tmp_path, rows, name="steps.jsonl"):
  path = tmp_path / name
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def _ex(steps, labels, prompt="q", source=None):
  ex = {"kind": "stepwise", "prompt": [{"role": "user", "content": prompt}], "steps": steps, "labels": labels}
  if source:
    ex["source"] = source
  return ex


# ----------------------------------------------------------------------------- format


def test_stepwise_rows_parse_with_both_namings(tmp_path):
  path = _write(tmp_path, F.sample_rows("stepwise"))
  examples, stats = F.load_examples(path, "stepwise")
  assert stats["ok"] == stats["rows"] == 4 and stats["skipped"] == 0
  assert all(ex["kind"] == "stepwise" and ex["source"].startswith(path) for ex in examples)
  assert examples[0]["steps"] == ["3 + 4 = 7", "7 + 5 = 12", "The answer is 12."]
  assert examples[0]["labels"] == [1.0, 1.0, 1.0] and examples[1]["labels"] == [0.0, 0.0, 0.0]
  # TRL's stepwise-supervision naming (completions/labels), a message-list prompt, soft labels
  assert examples[2]["steps"] == ["6 * 2 = 12", "12 + 1 = 13"] and examples[2]["labels"] == [1.0, 0.75]
  assert examples[2]["prompt"] == [{"role": "user", "content": "Double 6, then add 1."}]
  assert F.validate_example(examples[3], "stepwise") is examples[3]


@pytest.mark.parametrize("row, field, reason", [
    ({"prompt": "q", "steps": ["a", "b"], "labels": [True]}, "labels", "length mismatch"),
    ({"prompt": "q", "completions": ["a"], "labels": [True, False]}, "labels", "length mismatch"),
    ({"prompt": "q", "steps": ["a", "b"], "labels": [True, "no"]}, "labels[1]", "wrong type"),
    ({"prompt": "q", "steps": ["a"], "labels": [None]}, "labels[0]", "wrong type"),
    ({"prompt": "q", "steps": ["a"], "labels": [2]}, "labels[0]", "bad value"),
    ({"prompt": "q", "steps": ["a"], "labels": [-1]}, "labels[0]", "bad value"),
    ({"prompt": "q", "steps": ["a"], "labels": [float("nan")]}, "labels[0]", "non-finite number"),
    ({"prompt": "q", "steps": [], "labels": []}, "steps", "empty completion"),
    ({"prompt": "q", "steps": ["a", "  "], "labels": [1, 0]}, "steps[1]", "empty string"),
    ({"prompt": "q", "steps": "a\nb", "labels": [1, 0]}, "steps", "wrong type"),
    ({"prompt": "q", "labels": [1]}, "steps", "missing field"),
    ({"steps": ["a"], "labels": [1]}, "prompt", "missing field"),
    ({"prompt": "q", "steps": ["a"]}, "labels", "missing field"),
])
def test_bad_stepwise_rows_name_file_line_and_field(tmp_path, row, field, reason):
  path = _write(tmp_path, [F.sample_rows("stepwise")[0], row])
  with pytest.raises(F.DataError) as e:
    F.load_examples(path, "stepwise")
  err = e.value
  assert (err.path, str(err.line), err.field, err.reason) == (path, "2", field, reason)
  msg = str(err)
  assert msg.startswith(f"{path}:2: field '{field}': {reason}") and "\n" not in msg
  # skipped and counted with on_error="skip"
  examples, stats = F.load_examples(path, "stepwise", on_error="skip")
  assert len(examples) == 1 and stats["skipped"] == 1 and stats["skipped_by_reason"] == {reason: 1}


def test_prm800k_rating_hint_and_bad_json(tmp_path):
  path = _write(tmp_path, [{"prompt": "q", "steps": ["a"], "labels": [-1]}, "{not json"])
  examples, stats = F.load_examples(path, "stepwise", on_error="skip")
  assert not examples and stats["skipped_by_reason"] == {"bad value": 1, "invalid JSON": 1}
  assert "rating > 0" in stats["errors"][0]


def test_validate_and_collate_name_the_record():
  bad = _ex(["a", "b"], [1.0], source="f.jsonl:9")
  with pytest.raises(F.DataError, match=r"^f\.jsonl:9 \(record 1 of the batch\): field 'labels': length mismatch"):
    T.tokenize_steps([_ex(["a"], [1.0]), bad], CharTokenizer(), max_len=32)
  collate = T.make_collate("stepwise", CharTokenizer(), max_len=32)
  with pytest.raises(F.DataError, match="wrong kind"):
    collate([{"kind": "sft", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}])


# ----------------------------------------------------------------------------- step masks


def _independent_ends(tok, ex, sep):
  """Step-end token positions built from strings alone: render the whole conversation, then the
  conversation cut after each step, and count the tokens of each prefix (one token per character
  for CharTokenizer, whose template does not end the assistant turn before its content ends)."""
  prompt_text = tok.apply_chat_template(ex["prompt"], add_generation_prompt=True)
  ends, text = [], prompt_text
  for j, step in enumerate(ex["steps"]):
    text += step + (sep if j < len(ex["steps"]) - 1 else "")
    ends.append(len(tok.encode(text)) - 1)
  return ends


@pytest.mark.parametrize("sep", ["\n", " ки\n", "\n\n"])
def test_step_mask_is_at_step_ends(sep):
  tok = CharTokenizer()
  rng = np.random.default_rng(0)
  exs = []
  for b in range(6):
    n = int(rng.integers(1, 5))
    steps = ["".join(rng.choice(list("abc xyz"), size=int(rng.integers(1, 6)))).strip() or "s" for _ in range(n)]
    exs.append(_ex(steps, [float(rng.random() < 0.5) for _ in range(n)], prompt=f"question {b}"))
  exs.append(_ex(["line one\nline two", "end"], [1.0, 0.0]))  # a step holding the separator
  batch = T.tokenize_steps(exs, tok, max_len=64, step_separator=sep)
  assert set(batch) == set(prm.PRM_BATCH_KEYS)
  for b, ex in enumerate(exs):
    ends = np.flatnonzero(batch["step_mask_BxT"][b])
    assert ends.tolist() == _independent_ends(tok, ex, sep), (b, ex)
    assert batch["step_labels_BxT"][b, ends].tolist() == ex["labels"]
    assert batch["step_labels_BxT"][b].sum() == sum(ex["labels"])  # 0 off the step ends
    full = tok.apply_chat_template(ex["prompt"] + [{"role": "assistant", "content": sep.join(ex["steps"])}], False)
    assert batch["input_ids_BxT"][b, :batch["attention_mask_BxT"][b].sum()].tolist() == tok.encode(full)


def test_step_mask_with_the_byte_level_chatml_tokenizer():
  tok = models.Tokenizer.byte_level()
  ex = _ex(["3+4=7", "7+5=2", "2-1=1"], [1.0, 1.0, 0.0], prompt="3 4 5 1")
  b = T.tokenize_steps([ex], tok, max_len=64, pad_id=tok.pad_id)
  ids, n = b["input_ids_BxT"][0], int(b["attention_mask_BxT"][0].sum())
  assert tok.decode(ids[:n]) == tok.apply_chat_template(
      ex["prompt"] + [{"role": "assistant", "content": "3+4=7\n7+5=2\n2-1=1"}], add_generation_prompt=False)
  ends = np.flatnonzero(b["step_mask_BxT"][0])
  # the decoded text up to each step end ends with that step (and its separator)
  assert [tok.decode(ids[:t + 1]).endswith(s) for t, s in zip(ends, ("3+4=7\n", "7+5=2\n", "2-1=1"))] == [True] * 3
  assert tok.decode(ids[ends[-1] + 1:n]) == "<|im_end|>\n"
  assert (ids[n:] == tok.pad_id).all() and b["step_labels_BxT"][0, ends].tolist() == [1.0, 1.0, 0.0]


def test_truncation_drops_late_steps_and_counts_them():
  tok = CharTokenizer()
  ex = _ex(["aaaa", "bbbb", "cccc"], [1.0, 1.0, 0.0], source="f.jsonl:3")
  stats = {}
  b = T.tokenize_steps([ex], tok, max_len=18, stats=stats)  # prompt "<u>q|<a>" (8) + 10 of the 15 solution tokens
  assert b["step_mask_BxT"][0].sum() == 2 and b["attention_mask_BxT"][0].sum() == 18
  assert stats["steps_dropped"] == 1 and stats["response_truncated"] == 1 and stats["sequences"] == 1
  with pytest.raises(F.DataError, match=r"^f\.jsonl:3 \(record 0 of the batch\): field 'steps': over-long"):
    T.tokenize_steps([ex], tok, max_len=18, overlong="raise")


# ----------------------------------------------------------------------------- the loss


@pytest.fixture(scope="module")
def tiny_prm():
  cfg = models.get_config("tiny", scalar_head_outputs=2, dtype="float32")
  model = models.create_model(cfg, seed=0)
  graphdef, params = nnx.split(model)
  return cfg, model, graphdef, params


def _np_bce(logits, labels):
  p = 1.0 / (1.0 + np.exp(-logits))
  return -(labels * np.log(p) + (1 - labels) * np.log(1 - p))


def test_prm_loss_equals_numpy_bce_over_steps(tiny_prm):
  cfg, model, graphdef, params = tiny_prm
  rng = np.random.default_rng(1)
  B, Tn = 3, 10
  ids = rng.integers(3, 200, size=(B, Tn)).astype(np.int32)
  attn = np.ones((B, Tn), np.int32)
  attn[2, 7:] = 0
  mask = np.zeros((B, Tn), np.float32)
  mask[0, [2, 5, 9]] = 1
  mask[1, [4]] = 1
  mask[2, [3, 6]] = 1
  labels = np.where(mask > 0, rng.choice([0.0, 1.0, 0.3], size=(B, Tn)), -100.0).astype(np.float32)
  batch = {"input_ids_BxT": ids, "attention_mask_BxT": attn, "step_mask_BxT": mask, "step_labels_BxT": labels}

  @jax.jit
  def run_all(p, b):
    m = nnx.merge(graphdef, p)
    head_logits = m.scalar(m.hidden_states(b["input_ids_BxT"], attention_mask_BxT=b["attention_mask_BxT"])[0])
    losses = [prm.make_prm_loss(head=h)(m, b, None) for h in (0, 1)]
    grads = jax.grad(lambda q: prm.make_prm_loss()(nnx.merge(graphdef, q), b, None)[0])(p)
    return head_logits, losses, grads

  head_logits, losses, grads = run_all(params, batch)
  keep = mask > 0
  for head, (loss, aux) in enumerate(losses):
    logits = np.asarray(head_logits[..., head], np.float64)
    expected = _np_bce(logits[keep], labels[keep].astype(np.float64)).mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)
    acc = np.mean((logits[keep] > 0) == (labels[keep] > 0.5))
    np.testing.assert_allclose(float(aux["step_accuracy"]), acc, atol=1e-6)
    assert float(aux["weight"]) == 6.0
    np.testing.assert_allclose(float(aux["step_label_mean"]), labels[keep].mean(), rtol=1e-6)
    held = prm.step_metrics(logits, labels, mask)
    np.testing.assert_allclose(held["step_loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(held["step_accuracy"], acc)
  # the per-token logits are step_logits' (padding and all)
  np.testing.assert_allclose(np.asarray(prm.make_step_scorer(graphdef, batch_size=2)(params, ids, attn)),
                             np.asarray(head_logits[..., 0]), rtol=1e-5, atol=1e-5)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_prm_loss_needs_a_scalar_head():
  model = models.create_model(models.get_config("tiny", dtype="float32"), seed=0)
  batch = {k: np.ones((1, 4), np.int32 if "ids" in k or "attention" in k else np.float32) for k in prm.PRM_BATCH_KEYS}
  with pytest.raises(ValueError, match="scalar_head_outputs"):
    prm.make_prm_loss()(model, batch, None)


# ----------------------------------------------------------------------------- best-of-N


def test_best_of_n_against_a_direct_computation():
  rng = np.random.default_rng(2)
  Q, N, Tn = 5, 4, 8
  logits = rng.normal(size=(Q * N, Tn)).astype(np.float32)
  mask = (rng.random((Q * N, Tn)) < 0.4).astype(np.float32)
  mask[:, -1] = 1
  correct = (rng.random(Q * N) < 0.5).astype(np.float32)
  for how in heads.PRM_AGGREGATIONS:
    r = prm.best_of_n(logits, mask, correct, num_candidates=N, how=how)
    assert set(r["selected"]) == {1, 2, 4}
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    agg = []
    for row in range(Q * N):
      s = p[row][mask[row] > 0]
      agg.append({"min": s.min(), "last": s[-1], "product": s.prod(), "mean": s.mean()}[how])
    agg = np.asarray(agg).reshape(Q, N)
    c = correct.reshape(Q, N)
    for n in (1, 2, 4):
      pick = agg[:, :n].argmax(1)
      assert r["selected"][n] == pytest.approx(c[np.arange(Q), pick].mean())
      assert r["random"][n] == pytest.approx(c[:, :n].mean())
      assert r["oracle"][n] == pytest.approx(c[:, :n].max(1).mean())
  with pytest.raises(ValueError, match="num_candidates"):
    prm.best_of_n(logits, mask, correct, num_candidates=3)


# ----------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def prm_module():
  return run.load_experiment(os.path.join(REPO, "experiments", "prm_tiny.py"))[0]


@pytest.fixture(scope="module")
def prm_run(prm_module, tmp_path_factory):
  module = prm_module
  config = module.get_config("runlocal")
  run.apply_overrides(config, [("progress", "false")])
  workdir = str(tmp_path_factory.mktemp("prm_tiny"))
  return module, config, workdir, module.main(config, workdir)


def test_prm_tiny_task_labels_are_math_shepherd(prm_module):
  module = prm_module
  ex = module.solution([3, 4, 5, 1], error_at=2, kind="operator")
  assert ex["steps"] == ["3+4=7", "7-5=2", "2+1=3"] and ex["labels"] == [1.0, 0.0, 0.0]
  ex = module.solution([3, 4, 5, 1], error_at=1, kind="arithmetic", offset=2)
  assert ex["steps"] == ["3+4=9", "9+5=4", "4+1=5"] and ex["labels"] == [0.0, 0.0, 0.0]
  ex = module.solution([3, 4, 5, 1], error_at=3, kind="carry", offset=1)
  assert ex["steps"] == ["3+4=7", "7+5=2", "3+1=4"] and ex["labels"] == [1.0, 1.0, 0.0]
  assert module.solution([3, 4])["labels"] == [1.0]
  # operator errors only where they change the value (2t != 0 mod 10); None left when there is no such term
  rng = np.random.default_rng(0)
  for _ in range(50):
    ex = module.random_solution(rng, [1, 5, 0, 5], error_prob=1.0, error_kinds=("operator",), modulus=10)
    assert ex["error"] == "none" and ex["labels"] == [1.0, 1.0, 1.0]


def test_prm_tiny_learns_step_correctness(prm_run):
  _, _, workdir, result = prm_run
  out = result.eval_metrics
  assert out["step_accuracy"] >= 0.85, out
  with open(os.path.join(workdir, "result.json")) as f:
    res = json.load(f)
  head = res["headline"]
  assert head["metric"] == "step_accuracy" and math.isfinite(head["before"])
  assert head["after"] == out["step_accuracy"] and head["before"] == out["step_accuracy_before"]
  assert head["after"] > res["heldout_majority_baseline"] + 0.1, res  # not the constant "correct" answer
  assert out["step_accuracy_wrong"] >= 0.8, out  # wrong steps found, not only correct ones
  bon = res["best_of_n"]
  assert bon["aggregation"] == "min" and bon["num_candidates"] == 8
  assert bon["selected"] > bon["random"] + 0.3, bon  # best-of-8 by the PRM beats a random pick
  assert bon["selected"] <= bon["oracle"] + 1e-9

