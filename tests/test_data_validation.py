"""Bad input to the readers and collates: a one-line error naming file:line (or batch record) and
field, or a counted skip -- never a silent acceptance.

Covers non-finite numbers, unknown chat roles, malformed records at collate time, duplicate rows,
empty files and stale tfds builds.
"""

import json
import logging
import os

import numpy as np
import pytest

from rlhf_jax.data import BatchIterator
from rlhf_jax.data import formats as F
from rlhf_jax.data import sources as S
from rlhf_jax.data import tokenize as T
from rlhf_jax.errors import ConfigError
from tests.test_data_formats import CharTokenizer


def _write(tmp_path, name, lines):
  """Writes ``lines`` (dicts as JSON, strings as they are) to ``tmp_path/name``; returns the path."""
  path = tmp_path / name
  path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
  return str(path)


def _msg(role, content):
  return {"role": role, "content": content}


GOOD_PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}

# (name, format, raw JSONL line, field named, reason): each must be a DataError naming FILE:2 and the
# field, and a counted skip with on_error="skip".
BAD_LINES = [
    ("uf Infinity score", "ultrafeedback",
     '{"prompt": "p", "completions": [{"response": "a", "score": Infinity}, {"response": "b", "score": 1}]}',
     "completions[0].score", "non-finite number"),
    ("uf -Infinity overall_score", "ultrafeedback_pairs",
     '{"prompt": "p", "completions": [{"text": "a", "overall_score": 2}, {"text": "b", "overall_score": -Infinity}]}',
     "completions[1].score", "non-finite number"),
    ("uf NaN in plain scores", "ultrafeedback", '{"prompt": "p", "completions": ["a", "b"], "scores": [1, NaN]}',
     "completions[1].score", "non-finite number"),
    ("prompt field Infinity", "prompt", '{"prompt": "p", "reward": Infinity}', "reward", "non-finite number"),
    ("prompt nested NaN", "prompt", '{"prompt": "p", "meta": {"w": [1, NaN]}}', "meta.w[1]", "non-finite number"),
    ("kto NaN label", "kto", '{"prompt": "p", "completion": "c", "label": NaN}', "label", "wrong type"),
    ("sft role bot", "sft",
     json.dumps({"messages": [_msg("user", "q"), _msg("bot", "a"), _msg("assistant", "a")]}),
     "messages[1].role", "unknown role"),
    ("preference prompt role human", "preference",
     json.dumps({"prompt": [_msg("human", "q")], "chosen": "a", "rejected": "b"}), "prompt[0].role", "unknown role"),
    ("implicit prompt role gpt", "preference",
     json.dumps({"chosen": [_msg("user", "q"), _msg("gpt", "a")], "rejected": [_msg("user", "q"), _msg("gpt", "b")]}),
     "chosen[1].role", "unknown role"),
    ("ranked completion role", "ultrafeedback",
     json.dumps({"prompt": "p", "completions": [{"response": [_msg("model", "a")], "score": 1},
                                                {"response": "b", "score": 2}]}),
     "completions[0][0].role", "unknown role"),
]


@pytest.mark.parametrize("name,fmt,line,field,reason", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_value_is_an_error_naming_file_line_and_field_or_a_counted_skip(tmp_path, name, fmt, line, field,
                                                                            reason):
  good = {"ultrafeedback": {"prompt": "q", "completions": ["a", "b"], "scores": [1, 2]},
          "ultrafeedback_pairs": {"prompt": "q", "completions": ["a", "b"], "scores": [1, 2]},
          "prompt": {"prompt": "q", "reward": 1.5}, "kto": {"prompt": "q", "completion": "c", "label": True},
          "sft": {"messages": [_msg("system", "s"), _msg("user", "q"), _msg("assistant", "a")]},
          "preference": GOOD_PAIR}[fmt]
  path = _write(tmp_path, "d.jsonl", [good, line])
  with pytest.raises(F.DataError) as e:
    list(F.read_examples(path, fmt))
  msg = str(e.value)
  assert msg.startswith(f"{path}:2: field {field!r}: {reason}") and "\n" not in msg, msg
  assert (e.value.line, e.value.field, e.value.reason) == (2, field, reason)
  stats = F.new_stats()
  assert len(list(F.read_examples(path, fmt, on_error="skip", stats=stats))) == 1
  assert stats["skipped_by_reason"] == {reason: 1} and stats["errors"] == [msg]


def test_error_texts_spell_the_value_and_the_allowed_roles(tmp_path):
  path = _write(tmp_path, "u.jsonl", ['{"prompt": "p", "completions": ["a", "b"], "scores": [Infinity, 1]}'])
  with pytest.raises(F.DataError, match=r"u\.jsonl:1: field 'completions\[0\]\.score': non-finite number: Infinity"):
    list(F.read_examples(path, "ultrafeedback"))
  path = _write(tmp_path, "s.jsonl", [{"messages": [_msg("user", "q"), _msg("bot", "a")]}])
  with pytest.raises(F.DataError, match=r"s\.jsonl:1: field 'messages\[1\]\.role': unknown role: message 1 has "
                                        r"role 'bot'; expected one of system, user, assistant, tool$"):
    list(F.read_examples(path, "sft"))
  assert F.ROLES == ("system", "user", "assistant", "tool")


def test_every_allowed_role_and_finite_numbers_pass(tmp_path):
  msgs = [_msg("system", "s"), _msg("user", "q"), _msg("assistant", "call"), _msg("tool", "42"),
          _msg("assistant", "it is 42")]
  path = _write(tmp_path, "ok.jsonl", [{"messages": msgs}])
  assert F.load_examples(path, "sft")[0][0]["messages"] == msgs
  path = _write(tmp_path, "p.jsonl", [{"prompt": "p", "reward": -1e308, "n": 3, "x": None}])
  assert F.load_examples(path, "prompt")[0][0]["fields"] == {"reward": -1e308, "n": 3, "x": None}


def test_load_dataset_skips_and_counts_non_finite_and_unknown_roles(tmp_path):
  rows = [dict(GOOD_PAIR, prompt=f"p{i}") for i in range(18)]
  lines = rows + [json.dumps({"prompt": [_msg("bot", "q")], "chosen": "a", "rejected": "b"})]
  path = _write(tmp_path, "pairs.jsonl", lines)
  examples, stats, _ = S.load_dataset(path, "preference", max_skipped_fraction=0.1)
  assert len(examples) == 18 and stats["skipped_by_reason"] == {"unknown role": 1}
  ranked = [json.dumps({"prompt": f"p{i}", "completions": ["a", "b"], "scores": [1, 2]}) for i in range(3)]
  path = _write(tmp_path, "uf.jsonl", ranked + ['{"prompt": "p", "completions": ["a", "b"], "scores": [NaN, 2]}'])
  with pytest.raises(S.BadRowsError, match=r"1 of 4 rows are bad .* non-finite number: 1; first: .*uf\.jsonl:4: "
                                           r"field 'completions\[0\]\.score': non-finite number: NaN"):
    S.load_dataset(path, "ultrafeedback")


# ----------------------------------------------------------------------------- collate

PAIR = {"kind": "pair", "prompt": [_msg("user", "hi")], "chosen": [_msg("assistant", "a")],
        "rejected": [_msg("assistant", "b")], "source": "x.jsonl:3"}


def _bad(**changes):
  ex = dict(PAIR, source="x.jsonl:9")
  for k, v in changes.items():
    if v is None:
      ex.pop(k)
    else:
      ex[k] = v
  return ex


COLLATE_CASES = [
    # (name, collate kind, kwargs, bad record, expected message start)
    ("missing field", "pair", {}, _bad(rejected=None),
     "x.jsonl:9 (record 1 of the batch): field 'rejected': missing field"),
    ("wrong type", "pair", {}, _bad(chosen="a string"),
     "x.jsonl:9 (record 1 of the batch): field 'chosen': wrong type: expected a non-empty list"),
    ("no source", "pair", {}, _bad(source=None, prompt=7),
     "record 1 of the batch: field 'prompt': wrong type"),
    ("unknown role", "pair", {}, _bad(prompt=[_msg("bot", "hi")]),
     "x.jsonl:9 (record 1 of the batch): field 'prompt[0].role': unknown role: message 0 has role 'bot'"),
    ("wrong kind", "ranked", {"num_completions": 2}, _bad(),
     "x.jsonl:9 (record 1 of the batch): field 'kind': wrong kind: a 'pair' example, but this batch takes 'ranked'"),
    ("no kind", "sft", {}, _bad(kind=None), "x.jsonl:9 (record 1 of the batch): field 'kind': missing field"),
    ("sft without assistant", "sft", {}, {"kind": "sft", "messages": [_msg("user", "q")], "source": "s.jsonl:2"},
     "s.jsonl:2 (record 1 of the batch): field 'messages': empty completion: no assistant message"),
    ("non-finite score", "ranked", {"num_completions": 2},
     {"kind": "ranked", "prompt": [_msg("user", "q")], "completions": [[_msg("assistant", "a")]] * 2,
      "scores": [1.0, float("inf")], "source": "r.jsonl:5"},
     "r.jsonl:5 (record 1 of the batch): field 'scores[1]': non-finite number: Infinity"),
    ("scores length", "ranked", {"num_completions": 2},
     {"kind": "ranked", "prompt": [_msg("user", "q")], "completions": [[_msg("assistant", "a")]] * 2,
      "scores": [1.0], "source": "r.jsonl:6"},
     "r.jsonl:6 (record 1 of the batch): field 'scores': wrong type: expected a list of 2 numbers"),
    ("label not bool", "unpaired", {},
     {"kind": "unpaired", "prompt": [_msg("user", "q")], "completion": [_msg("assistant", "a")], "label": "yes",
      "source": "k.jsonl:4"},
     "k.jsonl:4 (record 1 of the batch): field 'label': wrong type: expected a bool, got str"),
    ("prompt fields NaN", "prompt", {"max_prompt_len": 32},
     {"kind": "prompt", "prompt": [_msg("user", "q")], "fields": {"w": float("nan")}, "source": "q.jsonl:8"},
     "q.jsonl:8 (record 1 of the batch): field 'fields.w': non-finite number: NaN"),
    ("undecodable record", "pair", {}, b'{"kind": "pair", ',
     "record 1 of the batch: field 'json': invalid record: JSONDecodeError"),
    ("not a dict", "pair", {}, json.dumps([1, 2]),
     "record 1 of the batch: wrong type: the record is a list, not a normalised example dict"),
    ("over-long", "pair", {"max_len": 24, "overlong": "raise"}, _bad(chosen=[_msg("assistant", "x" * 40)]),
     "x.jsonl:9 (record 1 of the batch): field 'chosen': over-long: "),
]


@pytest.mark.parametrize("name,kind,kw,record,expected", COLLATE_CASES, ids=[c[0] for c in COLLATE_CASES])
def test_collate_names_the_record_its_source_and_the_field(name, kind, kw, record, expected):
  kw = {"max_len": 64, **kw} if kind not in ("prompt", "prompt_answer") else kw
  good = {"ranked": {"kind": "ranked", "prompt": [_msg("user", "q")], "completions": [[_msg("assistant", "a")]] * 2,
                     "scores": [2.0, 1.0], "source": "r.jsonl:1"},
          "unpaired": {"kind": "unpaired", "prompt": [_msg("user", "q")], "completion": [_msg("assistant", "a")],
                       "label": True, "source": "k.jsonl:1"},
          "prompt": {"kind": "prompt", "prompt": [_msg("user", "q")], "fields": {}, "source": "q.jsonl:1"}
          }.get(kind, PAIR)
  collate = T.make_collate(kind, CharTokenizer(), **kw)
  collate([json.dumps(good)])  # the good record alone is fine
  with pytest.raises(F.DataError) as e:
    collate([json.dumps(good), record if isinstance(record, (bytes, str)) else json.dumps(record)])
  msg = str(e.value)
  assert msg.startswith(expected) and "\n" not in msg, msg


def test_a_template_error_names_the_record():

  class Picky(CharTokenizer):

    def apply_chat_template(self, messages, add_generation_prompt):
      if any(m["content"] == "boom" for m in messages):
        raise RuntimeError("template refuses\nthis conversation")
      return super().apply_chat_template(messages, add_generation_prompt)

  collate = T.make_collate("sft", Picky(), max_len=64)
  bad = {"kind": "sft", "messages": [_msg("user", "boom"), _msg("assistant", "a")], "source": "c.jsonl:12"}
  with pytest.raises(F.DataError, match=r"^c\.jsonl:12 \(record 1 of the batch\): field 'messages': tokenisation "
                                        r"failed: RuntimeError: template refuses\\nthis conversation$"):
    collate([PAIR, bad])


def test_batch_iterator_surfaces_the_collate_error():
  data = [PAIR] * 3 + [_bad(rejected=None)]
  it = BatchIterator.from_dataset(data, batch_size=4, seed=0, shuffle=False,
                                  collate=T.make_collate("pair", CharTokenizer(), max_len=32),
                                  process_index=0, process_count=1)
  with pytest.raises(F.DataError, match=r"^x\.jsonl:9 \(record 3 of the batch\): field 'rejected': missing field$"):
    next(it)


def test_validate_example_accepts_every_reader_output(tmp_path):
  files = F.write_sample_files(tmp_path, num_rows=5)
  for fmt, path in files.items():
    for ex in F.load_examples(path, fmt)[0]:
      assert F.validate_example(ex, ex["kind"]) is ex


# ----------------------------------------------------------------------------- duplicates


def test_exact_duplicates_are_kept_counted_and_warned_once(tmp_path, caplog):
  a, b = dict(GOOD_PAIR), dict(GOOD_PAIR, prompt="q")
  reordered = '{"rejected": "b", "chosen": "a", "prompt": "p"}'  # the same row, keys in another order
  first = _write(tmp_path, "a.jsonl", [a, b, a, "", reordered])
  second = _write(tmp_path, "b.jsonl", [dict(GOOD_PAIR, prompt="r"), b])
  with caplog.at_level(logging.WARNING, logger="rlhf_jax"):
    examples, stats, _ = S.load_dataset([first, second], "preference")
  assert len(examples) == 6 and stats["duplicates"] == 3 and stats["first_duplicate"] == f"{first}:3"
  warnings = [r.getMessage() for r in caplog.records if r.name == "rlhf_jax"]
  assert warnings == [f"data.train_files: 3 of 6 rows are exact duplicates of earlier rows (first: {first}:3); "
                      "kept, counted in stats['duplicates']"]
  assert F.stats_metrics(stats)["data/duplicates"] == 3.0
  # the reader alone: one warning per file, and duplicates across files with load_examples
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="rlhf_jax"):
    per_file = F.new_stats()
    assert len(list(F.read_examples(first, "preference", stats=per_file))) == 4
  assert per_file["duplicates"] == 2 and len([r for r in caplog.records if r.name == "rlhf_jax"]) == 1
  assert F.load_examples([first, second], "preference")[1]["duplicates"] == 3
  # no duplicates: no warning, a zero count
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="rlhf_jax"):
    assert F.load_examples(second, "preference")[1]["duplicates"] == 0
  assert not [r for r in caplog.records if r.name == "rlhf_jax"]


# ----------------------------------------------------------------------------- empty sources


def test_empty_file_is_an_error_naming_it(tmp_path):
  empty = _write(tmp_path, "empty.jsonl", [])
  blank = _write(tmp_path, "blank.jsonl", ["", "  "])
  for path in (empty, blank):
    with pytest.raises(F.EmptyDataError, match=rf"^{path}: no data rows: the file is empty or holds only blank lines$"):
      list(F.read_examples(path, "preference", on_error="skip"))
    assert list(F.read_examples(path, "preference", allow_empty=True)) == []
  good = _write(tmp_path, "good.jsonl", [GOOD_PAIR])
  with pytest.raises(ConfigError, match=rf"config.data.train_files: '{empty}' holds no data rows"):
    S.load_dataset([good, empty], "preference")
  with pytest.raises(ConfigError, match=rf"config.data.eval_files: '{blank}' holds no data rows"):
    S.load_dataset([blank], key="data.eval_files")


def test_a_file_whose_rows_are_all_bad_is_an_error_naming_it(tmp_path):
  good = _write(tmp_path, "good.jsonl", [dict(GOOD_PAIR, prompt=f"p{i}") for i in range(9)])
  bad = _write(tmp_path, "bad.jsonl", [dict(GOOD_PAIR, chosen="")])
  stats = F.new_stats()  # the reader alone counts them (on_error="skip" asked for it)
  assert list(F.read_examples(bad, "preference", on_error="skip", stats=stats)) == []
  assert stats["skipped"] == stats["rows"] == 1
  with pytest.raises(S.BadRowsError, match=rf"config.data.train_files: all 1 rows of '{bad}' are bad; top reasons: "
                                           rf"empty completion: 1; first: {bad}:1: field 'chosen'"):
    S.load_dataset([good, bad], "preference", max_skipped_fraction=0.5)


# ----------------------------------------------------------------------------- tfds builds


def _records(builder):
  src = builder.as_data_source(split="train")
  return sorted(T.decode_record(src[i])["prompt"][0]["content"] for i in range(len(src)))


def test_a_stale_tfds_build_is_rebuilt_for_another_source(tmp_path, caplog):
  from rlhf_jax.data import tfds_builders as TB

  data_dir = str(tmp_path / "tfds")
  a = _write(tmp_path, "a.jsonl", [dict(GOOD_PAIR, prompt="A")])
  b = _write(tmp_path, "b.jsonl", [dict(GOOD_PAIR, prompt="B"), dict(GOOD_PAIR, prompt="C")])
  built = TB.build_dataset(None, a, source_format="preference", data_dir=data_dir)
  assert _records(built) == ["A"]
  shard = sorted(p for p in os.listdir(built.data_dir) if ".array_record" in p)[0]
  stamp = os.stat(os.path.join(built.data_dir, shard)).st_mtime_ns
  with caplog.at_level(logging.WARNING, logger="rlhf_jax"):
    again = TB.build_dataset(None, a, source_format="preference", data_dir=data_dir)  # same source: reused
  assert _records(again) == ["A"] and not [r for r in caplog.records if r.name == "rlhf_jax"]
  assert os.stat(os.path.join(built.data_dir, shard)).st_mtime_ns == stamp
  with caplog.at_level(logging.WARNING, logger="rlhf_jax"):
    other = TB.build_dataset(None, b, source_format="preference", data_dir=data_dir)  # another source: rebuilt
  assert _records(other) == ["B", "C"]
  stale = [r.getMessage() for r in caplog.records if r.name == "rlhf_jax" and "is stale" in r.getMessage()]
  assert len(stale) == 1 and a in stale[0] and b in stale[0]
  assert TB.parse_stats(other)["ok"] == 2
  assert other.info.metadata["fingerprint"] == TB.source_fingerprint(b, source_format="preference", kind="pair",
                                                                     version="1.0.0")
  # the same path with other bytes is another source too
  with open(b, "a") as f:
    f.write(json.dumps(dict(GOOD_PAIR, prompt="D")) + "\n")
  assert _records(TB.build_dataset(None, b, source_format="preference", data_dir=data_dir)) == ["B", "C", "D"]
  # and so is another on_error
  fp = TB.source_fingerprint(b, source_format="preference", kind="pair")
  assert fp != TB.source_fingerprint(b, source_format="preference", kind="pair", on_error="skip")
  # load_dataset reads the rebuilt dataset directory
  examples, stats, fmt = S.load_dataset(data_dir)
  assert sorted(ex["prompt"][0]["content"] for ex in examples) == ["B", "C", "D"] and fmt == "preference"


def test_tfds_build_of_an_empty_or_all_bad_file_fails(tmp_path):
  from rlhf_jax.data import tfds_builders as TB

  empty = _write(tmp_path, "e.jsonl", [])
  with pytest.raises(F.EmptyDataError, match=rf"{empty}: no data rows"):
    TB.build_dataset(None, empty, source_format="preference", data_dir=str(tmp_path / "d1"))
  bad = _write(tmp_path, "bad.jsonl", [dict(GOOD_PAIR, chosen="")])
  with pytest.raises(F.EmptyDataError, match=rf"{bad}: all rows bad: all 1 rows were skipped \(empty completion: "
                                             rf"1\); first: {bad}:1: field 'chosen': empty completion"):
    TB.build_dataset(None, bad, source_format="preference", data_dir=str(tmp_path / "d2"), on_error="skip")
  assert np.all([not os.path.isdir(os.path.join(tmp_path, d, "rlhf_jax_preference_pairs", "1.0.0"))
                 for d in ("d1", "d2")])
