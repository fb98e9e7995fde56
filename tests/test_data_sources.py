"""User data sources: file resolution, format detection, loading with bad rows, tfds round trip,
the ``prompt`` format's extra fields, turn-level truncation and the one-time truncation warning."""

import json
import logging
import os

import pytest

from rlhf_jax import data
from rlhf_jax.data import formats as F
from rlhf_jax.data import sources as S
from rlhf_jax.data import tokenize as T
from rlhf_jax.errors import ConfigError, UserError
from tests.test_data_formats import CharTokenizer


def _write_jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def _msg(role, content):
  return {"role": role, "content": content}


# ----------------------------------------------------------------------------- resolve_files


def test_resolve_files(tmp_path):
  a = _write_jsonl(tmp_path / "a.jsonl", F.sample_rows("sft"))
  b = _write_jsonl(tmp_path / "b.jsonl", F.sample_rows("sft"))
  (tmp_path / "README.md").write_text("not data")
  assert S.resolve_files(a) == [a]  # a bare string is one entry
  assert S.resolve_files(str(tmp_path / "*.jsonl")) == [a, b]
  assert S.resolve_files((b, "", a, b)) == [b, a]  # tuple order, empties ignored, no repeats
  assert S.resolve_files([str(tmp_path)]) == [a, b]  # a directory: its data files only
  with pytest.raises(ConfigError, match=r"^config\.data\.train_files: '.*my\.jsonl' matches no file$"):
    S.resolve_files(str(tmp_path / "my.jsonl"))
  with pytest.raises(ConfigError, match=r"config\.data\.eval_files: '.*\*\.parquet' matches no file"):
    S.resolve_files(str(tmp_path / "*.parquet"), key="data.eval_files")
  with pytest.raises(ConfigError, match=r"README\.md' is not a data file \(expected \.jsonl, \.json or \.parquet"):
    S.resolve_files(str(tmp_path / "README.md"))
  with pytest.raises(ConfigError, match="no data files given"):
    S.resolve_files(["", " "])
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ConfigError, match="holds no data files"):
    S.resolve_files(str(empty))


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize("fmt", F.FORMATS)
def test_detect_format_of_every_sample(fmt):
  expected = "ultrafeedback" if fmt == "ultrafeedback_pairs" else fmt  # same rows; pairs must be named
  assert S.detect_format(F.sample_rows(fmt)) == expected
  assert S.detect_format(F.sample_rows(fmt, 30)) == expected


def test_detect_format_cases(tmp_path):
  implicit = {"chosen": [_msg("user", "Sort 5 3"), _msg("assistant", "3 5")],
              "rejected": [_msg("user", "Sort 5 3"), _msg("assistant", "5 3")]}
  assert S.detect_format([implicit]) == "preference"  # TRL implicit prompt, conversational
  assert S.detect_format([{"prompt": [_msg("user", "q")], "chosen": [_msg("assistant", "a")],
                           "rejected": [_msg("assistant", "b")]}]) == "preference"
  assert S.detect_format([{"prompt": "q", "answer": "reason\n#### 4"}]) == "gsm8k"
  assert S.detect_format([{"prompt": "q", "answer": "4"}]) == "prompt"
  # the majority wins; non-dict rows are ignored
  rows = [{"prompt": "p", "completion": "c", "label": True}] * 3 + [{"messages": []}] + [None]
  assert S.detect_format(rows) == "kto"
  with pytest.raises(ConfigError) as e:
    S.detect_format([{"text": "hello", "id": 3}], where="'x.jsonl'")
  msg = str(e.value)
  assert "config.data.format='auto'" in msg and "keys seen: id, text" in msg and "'x.jsonl'" in msg
  assert all(f in msg for f in F.FORMATS) and "\n" not in msg
  path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, "{bad json", {"text": "b"}])
  with pytest.raises(ConfigError, match="keys seen: text"):
    S.detect_file_format(path)
  with pytest.raises(ConfigError, match="keys seen: text"):
    S.load_dataset(path)


def test_detect_file_format_jsonl_and_parquet(tmp_path):
  files = F.write_sample_files(tmp_path, num_rows=5, parquet=("preference", "prompt"))
  assert files["prompt"].endswith(".parquet")
  for fmt, path in files.items():
    assert S.detect_file_format(path) == ("ultrafeedback" if fmt == "ultrafeedback_pairs" else fmt), fmt


# ----------------------------------------------------------------------------- load_dataset


def test_load_dataset_detects_and_logs(tmp_path, caplog):
  a = _write_jsonl(tmp_path / "a.jsonl", F.sample_rows("preference", 25))
  b = _write_jsonl(tmp_path / "b.jsonl", F.sample_rows("preference", 3))
  with caplog.at_level(logging.INFO, logger="rlhf_jax"):
    examples, stats, fmt = S.load_dataset(str(tmp_path / "*.jsonl"))
  assert fmt == "preference" and len(examples) == 28 and stats["ok"] == 28 and stats["skipped"] == 0
  assert all(ex["kind"] == "pair" for ex in examples) and examples[0]["source"] == f"{a}:1"
  assert examples[-1]["source"] == f"{b}:3"
  assert f"data.train_files: detected format 'preference' (kind pair) from 20 rows of {a}" in caplog.text
  # an explicit format is used as given; unknown formats and kinds a recipe does not take are config errors
  assert S.load_dataset(a, "preference")[2] == "preference"
  with pytest.raises(ConfigError, match=r"config\.data\.format='dpo': unknown format; expected 'auto' or one of"):
    S.load_dataset(a, "dpo")
  with pytest.raises(ConfigError, match=r"format 'preference' \(kind 'pair'\); this recipe takes kinds sft \(formats sft"):
    S.load_dataset(a, allowed_kinds=("sft",))
  assert S.load_dataset(a, allowed_kinds=("pair", "unpaired", "ranked"))[2] == "preference"
  # files of one spec must share a format
  k = _write_jsonl(tmp_path / "k.jsonl", F.sample_rows("kto"))
  with pytest.raises(ConfigError, match=r"different formats \(.*'preference'.*'kto'"):
    S.load_dataset([a, k])


def test_load_dataset_bad_rows_under_and_over_threshold(tmp_path, caplog):
  good = F.sample_rows("preference", 40, flat_only=True)
  path = _write_jsonl(tmp_path / "p.jsonl", good[:20] + [{"prompt": "p", "chosen": "", "rejected": "r"}] + good[20:])
  with caplog.at_level(logging.WARNING, logger="rlhf_jax"):
    examples, stats, _ = S.load_dataset(path)
  assert len(examples) == 40 and stats["skipped"] == 1 and stats["rows"] == 41
  assert "skipped 1 of 41 bad rows (empty completion: 1)" in caplog.text
  bad = _write_jsonl(tmp_path / "bad.jsonl", good[:10] + [
      {"prompt": "p", "rejected": "r"}, "{oops", {"prompt": "p", "rejected": "r"}, {"prompt": "p", "chosen": 3,
                                                                                   "rejected": "r"}])
  with pytest.raises(S.BadRowsError) as e:
    S.load_dataset(bad)
  msg = str(e.value)
  assert isinstance(e.value, UserError) and "\n" not in msg
  assert msg.startswith("config.data.train_files: 4 of 14 rows are bad (28.6% > max_skipped_fraction 5%)")
  assert "top reasons: missing field: 2, invalid JSON: 1, wrong type: 1" in msg
  assert f"first: {bad}:11: field 'chosen': missing field" in msg
  assert e.value.skipped == 4 and e.value.rows == 14
  assert len(S.load_dataset(bad, max_skipped_fraction=0.5)[0]) == 10


def test_arrayrecord_round_trip(tmp_path):
  from rlhf_jax.data import tfds_builders as TB

  files = F.write_sample_files(tmp_path / "src", num_rows=8)
  data_dir = tmp_path / "hh_tfds"
  TB.build_dataset(None, files["hh_rlhf"], source_format="hh_rlhf", data_dir=str(data_dir))
  expected = F.load_examples(files["hh_rlhf"], "hh_rlhf")[0]
  version_dir = next(p for p in data_dir.rglob("dataset_info.json")).parent
  for spec in (str(data_dir), str(version_dir), [str(data_dir.parent / "hh_tfds")]):
    assert S.resolve_files(spec) == [spec if isinstance(spec, str) else spec[0]]
    examples, stats, fmt = S.load_dataset(spec, allowed_kinds=("pair",))
    assert fmt == "hh_rlhf" and stats["rows"] == stats["ok"] == 8 and stats["skipped"] == 0
    key = lambda ex: ex["source"]
    assert sorted(examples, key=key) == sorted(expected, key=key)  # tfds orders records by key hash
  assert S.detect_file_format(str(data_dir)) == "hh_rlhf"
  assert S.load_dataset(str(data_dir), "preference")[2] == "preference"  # same kind: fine
  with pytest.raises(ConfigError, match="tfds dataset of 'pair' examples, but config.data.format='kto'"):
    S.load_dataset(str(data_dir), "kto")
  with pytest.raises(ConfigError, match="this recipe takes kinds sft"):
    S.load_dataset(str(data_dir), allowed_kinds=("sft",))


# ----------------------------------------------------------------------------- prompt format


def test_prompt_format_keeps_extra_fields(tmp_path):
  rows = F.sample_rows("prompt") + [{"prompt": "x", "answer": 7, "meta": {"tags": ["a"]}, "ok": None}]
  path = _write_jsonl(tmp_path / "r.jsonl", rows)
  examples, _, fmt = S.load_dataset(path)
  assert fmt == "prompt" and [ex["kind"] for ex in examples] == ["prompt"] * 5
  assert examples[0]["fields"] == {"answer": "42", "difficulty": 2}
  assert examples[1]["prompt"][0] == _msg("system", "Answer with a number.")
  tok = CharTokenizer()
  b = T.tokenize_prompts(examples, tok, max_prompt_len=40)
  assert b["fields"][4] == {"answer": 7, "meta": {"tags": ["a"]}, "ok": None}
  assert b["answers"] == ["42", "5", "1 2 3", "red", "7"]
  assert b["prompt_ids_BxP"][0, -len(tok.encode("<u>What is 6 * 7?|<a>")):].tolist() == tok.encode(
      "<u>What is 6 * 7?|<a>")
  # mixed with prompt_answer; no answers when one example has none
  gsm = F.load_examples(F.write_sample_files(tmp_path / "s")["gsm8k"], "gsm8k")[0][:1]
  mixed = T.tokenize_prompts(gsm + [dict(examples[0], fields={"level": 1})], tok, max_prompt_len=64)
  assert mixed["fields"][0]["answer"] == "5" and "#### 5" in mixed["fields"][0]["solution"]
  assert mixed["fields"][1] == {"level": 1} and "answers" not in mixed
  collate = T.make_collate("prompt", tok, max_prompt_len=64, truncation="turns")
  assert collate([json.dumps(examples[0])])["answers"] == ["42"]
  with pytest.raises(ValueError, match="takes 'prompt' or 'prompt_answer'"):
    T.tokenize_prompts([{"kind": "sft", "messages": []}], tok, max_prompt_len=8)


# ----------------------------------------------------------------------------- turn truncation

CONVO = [_msg("system", "Be brief."), _msg("user", "u1 aaaa"), _msg("assistant", "a1 bbbb"),
         _msg("user", "u2 cccc"), _msg("assistant", "a2 dddd"), _msg("user", "last?")]
# CharTokenizer: one token a character; "<s>Be brief.|" 13, each middle turn 11, "<u>last?|" 9, "<a>" 3.


def test_turns_truncation_drops_whole_turns_and_keeps_system_and_last_user():
  tok = CharTokenizer()
  pair = {"kind": "pair", "prompt": CONVO, "chosen": [_msg("assistant", "ok")],
          "rejected": [_msg("assistant", "no")], "source": "f.jsonl:3"}
  stats = T.new_token_stats()
  b = T.tokenize_pairs([pair], tok, max_len=64, max_prompt_len=40, stats=stats, truncation="turns")
  kept = tok.encode("<s>Be brief.|<u>last?|<a>")  # 25 tokens: 47 with one exchange kept, > 40
  assert b["chosen_input_ids_BxT"][0, :28].tolist() == kept + tok.encode("ok|")
  assert b["rejected_input_ids_BxT"][0, :28].tolist() == kept + tok.encode("no|")
  assert stats == {"sequences": 2, "prompt_truncated": 2, "prompt_tokens_dropped": 2 * 44, "prompt_turns_dropped": 8,
                   "response_truncated": 0, "response_tokens_dropped": 0, "list_truncated": 0, "truncated": 2}
  # one exchange fits: only the first is dropped
  stats = T.new_token_stats()
  p = T.tokenize_prompts([dict(pair, kind="prompt", fields={})], tok, max_prompt_len=47, stats=stats,
                         truncation="turns")
  assert p["prompt_ids_BxP"][0].tolist() == tok.encode("<s>Be brief.|<u>u2 cccc|<a>a2 dddd|<u>last?|<a>")
  assert stats["prompt_turns_dropped"] == 2 and stats["prompt_tokens_dropped"] == 22
  # system + last turn too long: the system tokens stay first, the rest is cut from the left
  stats = T.new_token_stats()
  b = T.tokenize_pairs([pair], tok, max_len=30, max_prompt_len=20, stats=stats, truncation="turns")
  assert b["chosen_input_ids_BxT"][0, :23].tolist() == tok.encode("<s>Be brief.|") + tok.encode(
      "st?|<a>") + tok.encode("ok|")
  assert stats["prompt_tokens_dropped"] == 2 * 49 and stats["prompt_turns_dropped"] == 8
  # the token policy (the functions' default) keeps the prompt's end instead
  tokens = T.tokenize_pairs([pair], tok, max_len=64, max_prompt_len=40)["chosen_input_ids_BxT"][0, :40]
  full = tok.encode(tok.apply_chat_template(CONVO, add_generation_prompt=True))
  assert tokens.tolist() == full[-40:]
  # overlong="raise" still refuses any truncation
  with pytest.raises(F.DataError, match=r"^f\.jsonl:3 \(record 0 of the batch\): field 'chosen': over-long"):
    T.tokenize_pairs([pair], tok, max_len=64, max_prompt_len=40, truncation="turns", overlong="raise")
  with pytest.raises(ValueError, match="`truncation` must be one of"):
    T.tokenize_pairs([pair], tok, max_len=64, truncation="words")


def test_turns_truncation_of_multi_turn_sft():
  tok = CharTokenizer()
  msgs = CONVO + [_msg("assistant", "a3 eeee")]
  sft = {"kind": "sft", "messages": msgs}
  stats = T.new_token_stats()
  s = T.tokenize_sft([sft], tok, max_len=40, max_prompt_len=30, stats=stats, truncation="turns")
  row = {k: s[f"{k}_BxT"][0] for k in T.ROW_KEYS}
  # 13 + 44 + 9 + 11 = 77 > 40: both earlier exchanges go, the system turn and the last exchange stay
  assert row["input_ids"][:33].tolist() == tok.encode("<s>Be brief.|<u>last?|<a>a3 eeee|")
  assert row["targets"][row["loss_mask"] > 0].tolist() == tok.encode("a3 eeee|")
  assert stats["prompt_turns_dropped"] == 4 and stats["prompt_tokens_dropped"] == 44 and stats["truncated"] == 1
  # with room for two exchanges, only the first goes; loss on both kept replies
  stats = T.new_token_stats()
  s = T.tokenize_sft([sft], tok, max_len=60, max_prompt_len=30, stats=stats, truncation="turns")
  row = {k: s[f"{k}_BxT"][0] for k in T.ROW_KEYS}
  assert row["targets"][row["loss_mask"] > 0].tolist() == tok.encode("a2 dddd|") + tok.encode("a3 eeee|")
  assert stats["prompt_turns_dropped"] == 2 and stats["response_truncated"] == 0
  # one exchange left and still too long: the response is right-truncated
  stats = T.new_token_stats()
  one = {"kind": "sft", "messages": [_msg("user", "hi"), _msg("assistant", "x" * 40)]}
  s = T.tokenize_sft([one], tok, max_len=20, stats=stats, truncation="turns")
  assert stats["response_truncated"] == 1 and stats["response_tokens_dropped"] == 9 + 41 - 20
  assert stats["prompt_turns_dropped"] == 0 and stats["prompt_truncated"] == 0


def test_truncation_warning_fires_once(caplog):
  tok = CharTokenizer()
  long = {"kind": "pair", "prompt": CONVO, "chosen": [_msg("assistant", "ok")], "rejected": [_msg("assistant", "no")]}
  short = dict(long, prompt=[_msg("user", "q")])
  collate = T.make_collate("pair", tok, max_len=64, max_prompt_len=40, truncation="turns")
  with caplog.at_level(logging.WARNING, logger="rlhf_jax"):
    collate([json.dumps(short)] * 3)
    assert not caplog.records  # nothing truncated yet
    for _ in range(3):
      collate([json.dumps(long), json.dumps(short)])
  warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
  assert len(warnings) == 1
  msg = warnings[0].getMessage()
  assert "config.data.train_files: 2 of 10 sequences (20.0%, more than 5.0%) were truncated" in msg
  assert "8 turns" in msg and "config.max_len / config.max_prompt_len" in msg
  assert collate.stats["_warned"] == 1 and "data/_warned" not in F.stats_metrics(collate.stats)
  assert F.stats_metrics(collate.stats)["data/truncated"] == 6.0
  # a fresh stats dict warns again; under the threshold, never
  st = {"sequences": 100, "prompt_truncated": 5, "response_truncated": 3}
  assert not T.warn_if_truncated(st) and T.warn_if_truncated(st, threshold=0.01, what="data.eval_files")
  assert not T.warn_if_truncated(st, threshold=0.01)
  assert "config.data.eval_files: 5 of 100" in caplog.text


def test_exports():
  for name in ("resolve_files", "detect_format", "detect_file_format", "load_dataset", "BadRowsError",
               "warn_if_truncated", "TRUNCATIONS"):
    assert name in data.__all__ and hasattr(data, name)
  assert os.path.basename(S.__file__) == "sources.py"
