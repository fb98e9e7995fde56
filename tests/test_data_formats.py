"""Readers of the public formats, bad-row handling, tokenisation/truncation policy and masks."""

import json

import numpy as np
import pytest

from rlhf_jax.data import formats as F
from rlhf_jax.data import tokenize as T


class CharTokenizer:
  """Character-level tokenizer with a toy chat template: ``<role>content|``."""

  pad_id, eos_id = 0, 1

  def encode(self, text):
    return [2 + ord(c) % 250 for c in text]

  def apply_chat_template(self, messages, add_generation_prompt):
    text = "".join(f"<{m['role'][0]}>{m['content']}|" for m in messages)
    return text + ("<a>" if add_generation_prompt else "")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  return F.write_sample_files(tmp_path_factory.mktemp("src"), num_rows=6)


def test_every_format_parses(files):
  assert files["preference"].endswith(".parquet")
  for fmt, path in files.items():
    examples, stats = F.load_examples(path, fmt)
    assert stats["ok"] == stats["rows"] == len(examples) > 0 and stats["skipped"] == 0, fmt
    assert all(ex["kind"] == F.KIND_OF_FORMAT[fmt] and ex["source"].startswith(path) for ex in examples)
  hh = F.load_examples(files["hh_rlhf"], "hh_rlhf")[0]
  assert hh[1]["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "Name a colour."}]
  assert hh[1]["chosen"] == [{"role": "assistant", "content": "Blue."}]
  assert hh[1]["rejected"] == [{"role": "assistant", "content": "No."}]
  uf = F.load_examples(files["ultrafeedback"], "ultrafeedback")[0]
  assert uf[0]["scores"] == [9.0, 6.0, 1.0] and uf[0]["completions"][0][0]["content"] == "Hello!"
  assert uf[2]["scores"] == [8.0, 5.0, 1.0] and uf[2]["completions"][0][0]["content"] == "1 2"
  pairs = F.load_examples(files["ultrafeedback_pairs"], "ultrafeedback_pairs")[0]
  assert pairs[0]["chosen"][0]["content"] == "Hello!" and pairs[0]["rejected"][0]["content"] == "..."
  gsm = F.load_examples(files["gsm8k"], "gsm8k")[0]
  assert [g["answer"] for g in gsm[:4]] == ["5", "1200", "6", "9"]
  kto = F.load_examples(files["kto"], "kto")[0]
  assert [k["label"] for k in kto[:4]] == [True, False, True, False]


def test_conversational_and_implicit_prompt(tmp_path):
  path = tmp_path / "p.jsonl"
  rows = F.sample_rows("preference")
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  ex = F.load_examples(str(path), "preference")[0]
  assert ex[1]["prompt"][0] == {"role": "system", "content": "Be brief."}
  assert ex[2]["prompt"] == [{"role": "user", "content": "Sort 5 3"}]
  assert ex[2]["chosen"] == [{"role": "assistant", "content": "3 5"}]


BAD_ROWS = [
    ({"prompt": "p", "rejected": "r"}, "chosen", "missing field"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "chosen", "wrong type"),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "chosen", "empty completion"),
]


@pytest.mark.parametrize("row,field,reason", BAD_ROWS)
def test_bad_row_names_file_line_field(tmp_path, row, field, reason):
  path = tmp_path / "bad.jsonl"
  good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
  path.write_text(good + "\n\n" + json.dumps(row) + "\n" + good + "\n")
  with pytest.raises(F.DataError) as e:
    list(F.read_examples(str(path), "preference"))
  assert (e.value.path, e.value.line, e.value.field, e.value.reason) == (str(path), 3, field, reason)
  assert f"{path}:3" in str(e.value) and field in str(e.value)
  stats = {}
  ok = list(F.read_examples(str(path), "preference", on_error="skip", stats=stats))
  assert len(ok) == 2 and stats["skipped"] == 1 and stats["skipped_by_reason"] == {reason: 1}
  assert stats["rows"] == 3 and stats["blank_lines"] == 1


def test_bad_json_and_other_formats(tmp_path):
  path = tmp_path / "k.jsonl"
  path.write_text('{"prompt": "p", "completion": "c", "label": "yes"}\n{oops\n')
  stats = {}
  assert list(F.read_examples(str(path), "kto", on_error="skip", stats=stats)) == []
  assert stats["skipped_by_reason"] == {"wrong type": 1, "invalid JSON": 1}
  assert "k.jsonl:1: field 'label'" in stats["errors"][0] and "k.jsonl:2" in stats["errors"][1]
  tie = tmp_path / "u.jsonl"
  tie.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"], "scores": [1, 1]}) + "\n")
  with pytest.raises(F.DataError, match="tied scores"):
    list(F.read_examples(str(tie), "ultrafeedback_pairs"))
  assert len(F.load_examples(str(tie), "ultrafeedback")[0]) == 1  # a tie is fine for a ranked list


def test_bad_parquet_row_names_row(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  path = str(tmp_path / "p.parquet")
  pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": "c", "rejected": "r"},
                                       {"prompt": "p", "chosen": "", "rejected": "r"}]), path)
  with pytest.raises(F.DataError, match=r"p\.parquet:row 1: field 'chosen': empty completion"):
    list(F.read_examples(path, "preference"))


def _resp(row):  # the response tokens, recovered from targets and the loss mask
  return row["targets"][row["loss_mask"] > 0].tolist()


def test_masks_aligned_with_targets_only_on_responses():
  tok = CharTokenizer()
  ex = {"kind": "pair", "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]}
  b = T.tokenize_pairs([ex], tok, max_len=20, eos_id=tok.eos_id)
  P = len(tok.encode("<u>hi|<a>"))
  for side, text in (("chosen", "yes|"), ("rejected", "no|")):
    ids, tg, lm, am = (b[f"{side}_{k}_BxT"][0] for k in T.ROW_KEYS)
    L = P + len(text) + 1
    assert ids[:P].tolist() == tok.encode("<u>hi|<a>") and am.tolist() == [1] * L + [0] * (20 - L)
    assert (tg[:-1] == ids[1:]).all()
    assert lm.tolist() == [0.0] * (P - 1) + [1.0] * (L - P) + [0.0] * (20 - L + 1)
    assert tg[lm > 0].tolist() == tok.encode(text) + [tok.eos_id]
  # multi-turn SFT: loss on both assistant turns, not on the user turn in between
  sft = {"kind": "sft", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
  s = T.tokenize_sft([sft], tok, max_len=32)
  row = {k: s[f"{k}_BxT"][0] for k in T.ROW_KEYS}
  assert _resp(row) == tok.encode("b|") + tok.encode("d|")
  u = T.tokenize_unpaired([dict(ex, kind="unpaired", completion=ex["chosen"], label=False)], tok, max_len=20)
  assert u["labels_B"].tolist() == [0.0] and set(u) == {f"{k}_BxT" for k in T.ROW_KEYS} | {"labels_B"}


def test_truncation_policy_sides_and_counts():
  tok = CharTokenizer()
  ex = {"kind": "pair", "prompt": [{"role": "user", "content": "0123456789"}],
        "chosen": [{"role": "assistant", "content": "abcdefghij"}], "rejected": [{"role": "assistant", "content": "xy"}]}
  prompt = tok.encode("<u>0123456789|<a>")  # 17 tokens
  stats = T.new_token_stats()
  b = T.tokenize_pairs([ex], tok, max_len=16, max_prompt_len=8, stats=stats)
  ids = b["chosen_input_ids_BxT"][0].tolist()
  assert ids[:8] == prompt[-8:]  # prompt keeps its END (truncated from the left)
  assert ids[8:] == tok.encode("abcdefghij|")[:8]  # response keeps its START (from the right)
  assert _resp({k: b[f"chosen_{k}_BxT"][0] for k in T.ROW_KEYS}) == tok.encode("abcdefgh")
  r = b["rejected_input_ids_BxT"][0].tolist()
  assert r[:11] == prompt[-8:] + tok.encode("xy|") and r[11:] == [0] * 5
  assert stats == {"sequences": 2, "prompt_truncated": 2, "prompt_tokens_dropped": 18,
                   "response_truncated": 1, "response_tokens_dropped": 3, "list_truncated": 0}
  with pytest.raises(F.DataError, match="over-long"):
    T.tokenize_pairs([dict(ex, source="f.jsonl:7")], tok, max_len=16, max_prompt_len=8, overlong="raise")


def test_ranked_and_prompts():
  tok = CharTokenizer()
  ranked = {"kind": "ranked", "prompt": [{"role": "user", "content": "q"}], "scores": [3.0, 2.0, 1.0],
            "completions": [[{"role": "assistant", "content": c}] for c in ("a", "bb", "ccc")]}
  stats = T.new_token_stats()
  b = T.tokenize_ranked([ranked, dict(ranked, scores=[5.0], completions=ranked["completions"][:1])], tok,
                        num_completions=2, max_len=12, stats=stats)
  assert b["input_ids_BxKxT"].shape == (2, 2, 12) and stats["list_truncated"] == 1
  assert b["scores_BxK"].tolist() == [[3.0, 2.0], [5.0, 0.0]] and b["list_mask_BxK"].tolist() == [[1, 1], [1, 0]]
  assert b["loss_mask_BxKxT"][1, 1].sum() == 0
  p = T.tokenize_prompts([{"kind": "prompt_answer", "prompt": [{"role": "user", "content": "hello"}], "answer": "5"}],
                         tok, max_prompt_len=6, stats=stats)
  assert p["prompt_ids_BxP"][0].tolist() == tok.encode("<u>hello|<a>")[-6:] and p["answers"] == ["5"]
  assert p["prompt_mask_BxP"].tolist() == [[1] * 6]


def test_pack_rows_segments():
  seqs = [([1, 2, 3], [0, 1, 1]), ([4, 5, 6, 7], [0, 0, 1, 1]), ([8, 9], [0, 1])]
  p = T.pack_rows(seqs, seq_len=8)
  assert p["segment_ids_BxT"].tolist() == [[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
  assert p["positions_BxT"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
  assert p["targets_BxT"][0].tolist() == [2, 3, 0, 5, 6, 7, 0, 0]  # no prediction across segments
  assert p["loss_mask_BxT"][0].tolist() == [1, 1, 0, 0, 1, 1, 0, 0]


def test_skipped_rows_and_truncations_reach_the_run_metrics(tmp_path):
  """Bad rows skipped (on_error="skip") and truncations are written as data/... metrics by the loop."""
  import types

  import jax.numpy as jnp

  from rlhf_jax.train import loop

  path = tmp_path / "prefs.jsonl"
  good = {"prompt": "0123456789", "chosen": "abcdefghij", "rejected": "xy"}
  path.write_text("\n".join(json.dumps(r) for r in [good, {"prompt": "p", "rejected": "r"}, good,
                                                      {"prompt": "p", "chosen": " ", "rejected": "r"}]) + "\n")
  parse = {}
  examples = list(F.read_examples(str(path), "preference", on_error="skip", stats=parse))
  trunc = T.new_token_stats()
  T.tokenize_pairs(examples, CharTokenizer(), max_len=16, max_prompt_len=8, stats=trunc)
  assert F.stats_metrics(parse, trunc) == {
      "data/rows": 4.0, "data/ok": 2.0, "data/skipped": 2.0, "data/blank_lines": 0.0, "data/duplicates": 1.0,
      "data/skipped_by_reason/missing field": 1.0, "data/skipped_by_reason/empty completion": 1.0,
      "data/sequences": 4.0, "data/prompt_truncated": 4.0, "data/prompt_tokens_dropped": 36.0,
      "data/response_truncated": 2.0, "data/response_tokens_dropped": 6.0, "data/list_truncated": 0.0}

  state = types.SimpleNamespace(step=jnp.zeros((), jnp.int32))
  step_fn = lambda s, b: (types.SimpleNamespace(step=s.step + 1), {"loss": jnp.float32(1.0)})
  batches = iter(lambda: {"input_ids_BxT": np.zeros((1, 2), np.int32)}, None)
  loop.train_loop(step_fn=step_fn, state=state, batches=batches, num_steps=2, workdir=str(tmp_path / "run"),
                  progress=False, data_stats=[parse, trunc])
  rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["data/skipped"] == 2 and rows[-1]["data/skipped_by_reason/missing_field"] == 1  # TensorBoard-safe tag
  assert rows[-1]["data/response_truncated"] == 2 and rows[-1]["loss"] == 1.0
