"""Readers of local JSONL / Parquet files in the common public post-training formats.

Every reader yields *normalised examples*: plain, JSON-able dicts whose ``"kind"`` says
which of six shapes it has. Prompts and responses are always lists of chat messages
(``{"role": ..., "content": ...}``); a plain-string prompt becomes one user message and a
plain-string response one assistant message.

=================  =======================================================================
kind               keys
=================  =======================================================================
``pair``           ``prompt``, ``chosen``, ``rejected`` (message lists)
``ranked``         ``prompt``, ``completions`` (message lists, best first), ``scores``
``unpaired``       ``prompt``, ``completion``, ``label`` (bool: desirable or not; KTO)
``prompt_answer``  ``prompt``, ``answer`` (reference final answer), ``solution`` (full text)
``sft``            ``messages``
``prompt``         ``prompt``, ``fields`` (every other column of the row, as JSON values; for
                   online RL: reward functions get them, e.g. ``{"answer": "42"}``)
=================  =======================================================================

Each example also has ``"source"``: ``"FILE:LINE"`` (JSONL, 1-based physical line) or
``"FILE:row N"`` (Parquet, 0-based row), so later errors (e.g. an over-long row) can name it.

Source formats (``fmt``), see `FORMATS`:

- ``"hh_rlhf"``: Anthropic HH-RLHF: ``chosen``/``rejected`` full transcripts
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; the shared turns before the final assistant
  turn become the prompt, the final assistant turns the chosen/rejected responses.
- ``"preference"``: ``prompt``/``chosen``/``rejected`` as plain strings or message lists;
  without ``prompt``, conversational ``chosen``/``rejected`` are split at their last
  common message (TRL's "implicit prompt").
- ``"ultrafeedback"``: ``prompt`` (or ``instruction``) and ``completions``: a list of
  ``{"response"|"text"|"content": str, "score"|"overall_score": number}`` (or a list of
  strings plus a parallel ``scores`` list) -> a ``ranked`` example, stable-sorted by score.
  ``"ultrafeedback_pairs"`` gives its best/worst ``pair`` instead (tied scores: bad row).
- ``"kto"``: ``prompt``, ``completion``, ``label`` (bool) -> ``unpaired``.
- ``"gsm8k"``: ``question``, ``answer`` whose final answer follows ``####`` ->
  ``prompt_answer`` (``"prompt"``/``"answer"`` with no ``####`` is accepted too).
- ``"sft"``: ``messages`` (list of role/content dicts) -> ``sft``.
- ``"prompt"``: ``prompt`` (a string or a message list) plus any other columns, kept as-is
  in ``fields`` -> ``prompt`` (values that are not JSON types, e.g. Parquet dates, become
  strings).

Bad rows (unparsable JSON, a missing field, a wrong type, an empty completion, ...) raise
`DataError` naming the file, the line (or row) and the field; with ``on_error="skip"`` they
are skipped and counted in ``stats`` (``stats["skipped"]``, ``stats["skipped_by_reason"]``
and the first few messages in ``stats["errors"]``): nothing is dropped silently.

Examples:
  >>> import json, os, tempfile
  >>> d = tempfile.mkdtemp(); path = os.path.join(d, "p.jsonl")
  >>> with open(path, "w") as f:
  ...   _ = f.write(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\\n")
  ...   _ = f.write(json.dumps({"prompt": "1+1?", "chosen": "", "rejected": "3"}) + "\\n")
  >>> stats = {}
  >>> [ex["chosen"] for ex in read_examples(path, "preference", on_error="skip", stats=stats)]
  [[{'role': 'assistant', 'content': '4'}]]
  >>> stats["ok"], stats["skipped"], stats["skipped_by_reason"]
  (1, 1, {'empty completion': 1})
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

from rlhf_jax.errors import UserError

__all__ = [
    "DataError",
    "FORMATS",
    "KIND_OF_FORMAT",
    "best_worst_pair",
    "load_examples",
    "new_stats",
    "stats_metrics",
    "parse_hh_transcript",
    "parse_row",
    "read_examples",
    "read_rows",
    "sample_rows",
    "write_sample_files",
]

KIND_OF_FORMAT = {
    "hh_rlhf": "pair",
    "preference": "pair",
    "ultrafeedback": "ranked",
    "ultrafeedback_pairs": "pair",
    "kto": "unpaired",
    "gsm8k": "prompt_answer",
    "sft": "sft",
    "prompt": "prompt",
}
FORMATS = tuple(KIND_OF_FORMAT)
_MAX_ERRORS_KEPT = 20


class DataError(UserError):
  """A bad row: ``path``, ``line`` (JSONL line, 1-based, or Parquet row, 0-based), ``field``, ``reason``."""

  def __init__(self, path: str, line: int | str, field: str | None, reason: str, detail: str = ""):
    self.path, self.line, self.field, self.reason = str(path), line, field, reason
    where = f"{path}:{line}"
    what = f"field {field!r}: " if field else ""
    super().__init__(f"{where}: {what}{reason}{': ' + detail if detail else ''}")


class _RowError(Exception):
  """Raised inside a row parser; turned into `DataError` with the file and line."""

  def __init__(self, field: str | None, reason: str, detail: str = ""):
    super().__init__(reason)
    self.field, self.reason, self.detail = field, reason, detail


def new_stats() -> dict[str, Any]:
  """A fresh stats dict: ``rows``, ``ok``, ``skipped``, ``skipped_by_reason``, ``errors``, ``blank_lines``."""
  return {"rows": 0, "ok": 0, "skipped": 0, "skipped_by_reason": {}, "errors": [], "blank_lines": 0}


def stats_metrics(*stats: Any, prefix: str = "data/") -> dict[str, float]:
  """Run metrics from data counters: parse stats (`new_stats`), truncation stats
  (`rlhf_jax.data.tokenize.new_token_stats`), or any dict of counts.

  Nested counts are flattened with ``/`` (``skipped_by_reason: {"missing_field": 2}``
  becomes ``data/skipped_by_reason/missing_field``); the error messages are not
  metrics and are left out, and so are keys starting with ``_`` (internal flags such as
  ``_warned``); counters of the same name in several dicts are summed.
  Pass the result (or the dicts, to `rlhf_jax.train.loop.train_loop`'s ``data_stats``)
  so skipped rows and truncations appear in the run's metrics.

  >>> stats_metrics({"rows": 5, "ok": 4, "skipped": 1, "skipped_by_reason": {"empty": 1}, "errors": ["..."]})
  {'data/rows': 5.0, 'data/ok': 4.0, 'data/skipped': 1.0, 'data/skipped_by_reason/empty': 1.0}
  """
  out: dict[str, float] = {}

  def add(name, value):
    if isinstance(value, dict):
      for k, v in value.items():
        add(f"{name}/{k}", v)
    elif isinstance(value, (bool, int, float)) and not isinstance(value, bool):
      out[name] = out.get(name, 0.0) + float(value)

  for st in stats:
    for key, value in (st or {}).items():
      if not str(key).startswith("_"):
        add(f"{prefix}{key}", value)
  return out


# ----------------------------------------------------------------------------- raw rows


def read_rows(path: str | os.PathLike) -> Iterator[tuple[int | str, Any]]:
  """Yields ``(line, row)`` from a ``.jsonl``/``.json`` (one JSON object a line) or ``.parquet`` file.

  JSONL lines are numbered from 1 (blank lines are skipped, yielded as ``(line, None)``);
  Parquet rows are named ``"row N"`` (0-based). A line that is not valid JSON, or not valid
  UTF-8, is yielded as ``(line, _BadJson)`` so the caller can report or skip that line alone
  (one bad byte does not abort the file). A UTF-8 byte-order mark on the first line is ignored.
  """
  path = os.fspath(path)
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # Imported lazily: only Parquet sources need pyarrow.

    table = pq.read_table(path)
    for i, row in enumerate(table.to_pylist()):
      yield f"row {i}", row
    return
  with open(path, "rb") as f:
    for i, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield i, _BadJson(f"byte {e.start} of the line is {raw[e.start:e.start + 1]!r} ({e.reason})",
                          reason="invalid UTF-8")
        continue
      if i == 1:
        text = text.removeprefix("\ufeff")
      if not text.strip():
        yield i, None
        continue
      try:
        yield i, json.loads(text)
      except json.JSONDecodeError as e:
        yield i, _BadJson(str(e))


class _BadJson:

  def __init__(self, message: str, reason: str = "invalid JSON"):
    self.message, self.reason = message, reason


# ----------------------------------------------------------------------------- field helpers


def _get(row: dict, *names: str) -> Any:
  for name in names:
    if name in row and row[name] is not None:
      return row[name]
  raise _RowError(names[0], "missing field")


def _string(value: Any, field: str, *, allow_empty: bool = False) -> str:
  if not isinstance(value, str):
    raise _RowError(field, "wrong type", f"expected a string, got {type(value).__name__}")
  if not allow_empty and not value.strip():
    raise _RowError(field, "empty string")
  return value


def _messages(value: Any, field: str) -> list[dict[str, str]]:
  """A list of ``{role, content}`` dicts, validated (content may not be empty)."""
  if not isinstance(value, (list, tuple)) or not value:
    raise _RowError(field, "wrong type", "expected a non-empty list of {role, content} messages")
  out = []
  for j, m in enumerate(value):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise _RowError(field, "wrong type", f"message {j} is not a {{role: str, content: str}} dict")
    out.append({"role": m["role"], "content": m["content"]})
  return out


def _prompt(value: Any, field: str) -> list[dict[str, str]]:
  if isinstance(value, str):
    return [{"role": "user", "content": _string(value, field)}]
  return _messages(value, field)


def _response(value: Any, field: str) -> list[dict[str, str]]:
  """A completion as assistant messages; empty text is the ``"empty completion"`` error."""
  if isinstance(value, str):
    if not value.strip():
      raise _RowError(field, "empty completion")
    return [{"role": "assistant", "content": value}]
  msgs = _messages(value, field)
  if not "".join(m["content"] for m in msgs).strip():
    raise _RowError(field, "empty completion")
  return msgs


# ----------------------------------------------------------------------------- HH-RLHF

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
  """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{user: a}, {assistant: b}]``.

  Examples:
    >>> parse_hh_transcript("\\n\\nHuman: hi\\n\\nAssistant: hello")
    [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]
  """
  parts = _HH_TURN.split(text)
  if parts[0].strip():
    raise ValueError("text before the first '\\n\\nHuman:' turn")
  msgs = []
  for speaker, content in zip(parts[1::2], parts[2::2]):
    msgs.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
  return msgs


def _hh_side(row: dict, field: str) -> list[dict[str, str]]:
  text = _string(_get(row, field), field)
  try:
    msgs = parse_hh_transcript(text)
  except ValueError as e:
    raise _RowError(field, "bad transcript", str(e)) from None
  if not msgs or msgs[-1]["role"] != "assistant":
    raise _RowError(field, "bad transcript", "it does not end with an '\\n\\nAssistant:' turn")
  return msgs


def _split_common(chosen: list, rejected: list, field: str = "chosen") -> tuple[list, list, list]:
  """Splits two conversations at their last common message before the final turns."""
  n = 0
  while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
    n += 1
  prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
  if not prompt:
    raise _RowError(field, "no shared prompt", "chosen and rejected share no leading turns")
  if any(m["role"] != "assistant" for m in c + r):
    raise _RowError(field, "bad transcript", "chosen and rejected differ before their final assistant turn")
  for side, msgs in (("chosen", c), ("rejected", r)):
    if not "".join(m["content"] for m in msgs).strip():
      raise _RowError(side, "empty completion")
  return prompt, c, r


# ----------------------------------------------------------------------------- row parsers


def _parse_hh(row: dict) -> dict:
  prompt, chosen, rejected = _split_common(_hh_side(row, "chosen"), _hh_side(row, "rejected"))
  return {"kind": "pair", "prompt": prompt, "chosen": chosen, "rejected": rejected}


def _parse_preference(row: dict) -> dict:
  if "prompt" not in row or row["prompt"] is None:
    chosen, rejected = _get(row, "chosen"), _get(row, "rejected")
    if isinstance(chosen, str) or isinstance(rejected, str):
      raise _RowError("prompt", "missing field")
    prompt, c, r = _split_common(_messages(chosen, "chosen"), _messages(rejected, "rejected"))
    return {"kind": "pair", "prompt": prompt, "chosen": c, "rejected": r}
  return {
      "kind": "pair",
      "prompt": _prompt(row["prompt"], "prompt"),
      "chosen": _response(_get(row, "chosen"), "chosen"),
      "rejected": _response(_get(row, "rejected"), "rejected"),
  }


def _number(value: Any, field: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise _RowError(field, "wrong type", f"expected a number, got {type(value).__name__}")
  if value != value:  # NaN
    raise _RowError(field, "wrong type", "score is NaN")
  return float(value)


def _parse_ultrafeedback(row: dict) -> dict:
  prompt = _prompt(_get(row, "prompt", "instruction"), "prompt")
  completions = _get(row, "completions")
  if not isinstance(completions, (list, tuple)) or len(completions) < 2:
    raise _RowError("completions", "wrong type", "expected a list of at least 2 completions")
  responses, scores = [], []
  plain_scores = row.get("scores")
  for j, c in enumerate(completions):
    field = f"completions[{j}]"
    if isinstance(c, dict):
      text = next((c[k] for k in ("response", "text", "content") if c.get(k) is not None), None)
      if text is None:
        raise _RowError(field, "missing field", "no 'response'/'text'/'content'")
      score = next((c[k] for k in ("score", "overall_score") if c.get(k) is not None), None)
      if score is None:
        raise _RowError(field, "missing field", "no 'score'/'overall_score'")
    else:
      if not isinstance(plain_scores, (list, tuple)) or len(plain_scores) != len(completions):
        raise _RowError("scores", "missing field", "plain-string completions need a parallel 'scores' list")
      text, score = c, plain_scores[j]
    responses.append(_response(text, field))
    scores.append(_number(score, f"{field}.score"))
  order = sorted(range(len(scores)), key=lambda j: -scores[j])  # stable: ties keep file order
  return {
      "kind": "ranked",
      "prompt": prompt,
      "completions": [responses[j] for j in order],
      "scores": [scores[j] for j in order],
  }


def best_worst_pair(ranked: dict) -> dict:
  """The ``pair`` (best vs worst scored completion) of a ``ranked`` example.

  Raises:
    ValueError: if all scores are equal (no preference).
  """
  if ranked["scores"][0] <= ranked["scores"][-1]:
    raise ValueError("all completions have the same score: no preference")
  pair = {"kind": "pair", "prompt": ranked["prompt"], "chosen": ranked["completions"][0],
          "rejected": ranked["completions"][-1]}
  if "source" in ranked:
    pair["source"] = ranked["source"]
  return pair


def _parse_ultrafeedback_pairs(row: dict) -> dict:
  ranked = _parse_ultrafeedback(row)
  try:
    return best_worst_pair(ranked)
  except ValueError as e:
    raise _RowError("completions", "tied scores", str(e)) from None


def _parse_kto(row: dict) -> dict:
  label = _get(row, "label")
  if not isinstance(label, bool):
    raise _RowError("label", "wrong type", f"expected a bool, got {type(label).__name__}")
  return {
      "kind": "unpaired",
      "prompt": _prompt(_get(row, "prompt"), "prompt"),
      "completion": _response(_get(row, "completion"), "completion"),
      "label": label,
  }


def _parse_gsm8k(row: dict) -> dict:
  question = _get(row, "question", "prompt")
  solution = _string(_get(row, "answer"), "answer")
  answer = solution.rsplit("####", 1)[-1].strip() if "####" in solution else solution.strip()
  if not answer:
    raise _RowError("answer", "empty completion", "nothing after '####'")
  answer = answer.replace(",", "") if re.fullmatch(r"-?[\d,]+(\.\d+)?", answer) else answer
  return {"kind": "prompt_answer", "prompt": _prompt(question, "question"), "answer": answer,
          "solution": solution}


def _parse_sft(row: dict) -> dict:
  msgs = _messages(_get(row, "messages"), "messages")
  if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
    raise _RowError("messages", "empty completion", "no non-empty assistant message")
  return {"kind": "sft", "messages": msgs}


def _json_value(value: Any) -> Any:
  """``value`` as plain JSON types (a copy); non-JSON values (dates, bytes, ...) become strings."""
  return json.loads(json.dumps(value, ensure_ascii=False, default=str))


def _parse_prompt(row: dict) -> dict:
  prompt = _prompt(_get(row, "prompt"), "prompt")
  fields = {str(k): _json_value(v) for k, v in row.items() if k != "prompt"}
  return {"kind": "prompt", "prompt": prompt, "fields": fields}


_PARSERS = {
    "hh_rlhf": _parse_hh,
    "preference": _parse_preference,
    "ultrafeedback": _parse_ultrafeedback,
    "ultrafeedback_pairs": _parse_ultrafeedback_pairs,
    "kto": _parse_kto,
    "gsm8k": _parse_gsm8k,
    "sft": _parse_sft,
    "prompt": _parse_prompt,
}


def parse_row(row: Any, fmt: str, *, path: str = "<row>", line: int | str = 0) -> dict:
  """Normalises one raw row (a dict) of format ``fmt``; raises `DataError` on a bad row."""
  if fmt not in _PARSERS:
    raise ValueError(f"Unknown format {fmt!r}; expected one of {FORMATS}.")
  if isinstance(row, _BadJson):
    raise DataError(path, line, None, row.reason, row.message)
  if not isinstance(row, dict):
    raise DataError(path, line, None, "wrong type", f"the row is a {type(row).__name__}, not an object")
  try:
    example = _PARSERS[fmt](row)
  except _RowError as e:
    raise DataError(path, line, e.field, e.reason, e.detail) from None
  example["source"] = f"{path}:{line}"
  return example


def read_examples(
    path: str | os.PathLike,
    fmt: str,
    *,
    on_error: str = "raise",
    stats: dict | None = None,
) -> Iterator[dict]:
  """Yields the normalised examples of a JSONL or Parquet file in format ``fmt``.

  Args:
    path: a ``.jsonl`` (or ``.json`` with one object a line) or ``.parquet`` file.
    fmt: one of `FORMATS`.
    on_error: ``"raise"`` (a `DataError` naming file, line and field) or ``"skip"`` (the
      row is skipped and counted in ``stats``).
    stats: a dict updated in place (see `new_stats`; missing keys are added): ``rows``
      (non-blank rows seen), ``ok``, ``skipped``, ``skipped_by_reason`` and ``errors`` (the
      first 20 messages). Pass the same dict to several calls to aggregate files.

  Raises:
    DataError: on a bad row when ``on_error="raise"``.
    ValueError: on an unknown ``fmt`` or ``on_error``.
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"`on_error` must be 'raise' or 'skip'; got {on_error!r}.")
  if fmt not in _PARSERS:
    raise ValueError(f"Unknown format {fmt!r}; expected one of {FORMATS}.")
  stats = new_stats() if stats is None else stats
  for key, value in new_stats().items():
    stats.setdefault(key, value)
  path = os.fspath(path)
  for line, row in read_rows(path):
    if row is None:
      stats["blank_lines"] += 1
      continue
    stats["rows"] += 1
    try:
      example = parse_row(row, fmt, path=path, line=line)
    except DataError as e:
      if on_error == "raise":
        raise
      stats["skipped"] += 1
      stats["skipped_by_reason"][e.reason] = stats["skipped_by_reason"].get(e.reason, 0) + 1
      if len(stats["errors"]) < _MAX_ERRORS_KEPT:
        stats["errors"].append(str(e))
      continue
    stats["ok"] += 1
    yield example


def load_examples(paths, fmt: str, *, on_error: str = "raise") -> tuple[list[dict], dict]:
  """All examples of one or several files as a list, with the stats (see `read_examples`)."""
  paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  stats = new_stats()
  examples = [ex for p in paths for ex in read_examples(p, fmt, on_error=on_error, stats=stats)]
  return examples, stats


# ----------------------------------------------------------------------------- sample files

_SAMPLE_ROWS: dict[str, list[dict]] = {
    "hh_rlhf": [
        {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
         "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: Blue.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: No."},
        {"chosen": "\n\nHuman: Sort 3 1 2\n\nAssistant: 1 2 3",
         "rejected": "\n\nHuman: Sort 3 1 2\n\nAssistant: 3 2 1"},
        {"chosen": "\n\nHuman: Capital of France?\n\nAssistant: Paris.",
         "rejected": "\n\nHuman: Capital of France?\n\nAssistant: Rome."},
    ],
    "preference": [
        {"prompt": "Sort 4 2 9", "chosen": "2 4 9", "rejected": "9 4 2"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort 7 1"}],
         "chosen": [{"role": "assistant", "content": "1 7"}],
         "rejected": [{"role": "assistant", "content": "7 1"}]},
        {"chosen": [{"role": "user", "content": "Sort 5 3"}, {"role": "assistant", "content": "3 5"}],
         "rejected": [{"role": "user", "content": "Sort 5 3"}, {"role": "assistant", "content": "5 3"}]},
        {"prompt": "Sort 8 6 7", "chosen": "6 7 8", "rejected": "8 7 6"},
    ],
    "ultrafeedback": [
        {"prompt": "Say hi", "completions": [
            {"response": "hey", "score": 6.0}, {"response": "Hello!", "score": 9.0},
            {"response": "...", "score": 1.0}]},
        {"instruction": "Add 1+2", "completions": [
            {"text": "3", "overall_score": 10}, {"text": "4", "overall_score": 2}]},
        {"prompt": "Sort 2 1", "completions": ["2 1", "1 2", "1, 2"], "scores": [1, 8, 5]},
        {"prompt": "Double 4", "completions": [
            {"response": "8", "score": 9}, {"response": "6", "score": 3}, {"response": "16", "score": 2}]},
    ],
    "kto": [
        {"prompt": "Sort 3 1", "completion": "1 3", "label": True},
        {"prompt": "Sort 3 1", "completion": "3 1", "label": False},
        {"prompt": [{"role": "user", "content": "Sort 9 2"}], "completion": "2 9", "label": True},
        {"prompt": "Sort 5 4", "completion": "5 4", "label": False},
    ],
    "gsm8k": [
        {"question": "Tom has 3 apples and buys 2 more. How many?",
         "answer": "He has 3 + 2 = <<3+2=5>>5 apples.\n#### 5"},
        {"question": "A box holds 12 eggs. How many eggs in 100 boxes?",
         "answer": "12 * 100 = 1,200\n#### 1,200"},
        {"question": "What is 10 - 4?", "answer": "10 - 4 = 6\n#### 6"},
        {"question": "Half of 18?", "answer": "18 / 2 = 9\n#### 9"},
    ],
    "sft": [
        {"messages": [{"role": "user", "content": "Sort 2 1"}, {"role": "assistant", "content": "1 2"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "Copy 5 5"}, {"role": "assistant", "content": "5 5"},
                      {"role": "user", "content": "Again"}, {"role": "assistant", "content": "5 5"}]},
        {"messages": [{"role": "user", "content": "Reverse 1 2 3"}, {"role": "assistant", "content": "3 2 1"}]},
    ],
    "prompt": [
        {"prompt": "What is 6 * 7?", "answer": "42", "difficulty": 2},
        {"prompt": [{"role": "system", "content": "Answer with a number."},
                    {"role": "user", "content": "What is 2 + 3?"}], "answer": "5", "difficulty": 1},
        {"prompt": "Sort 3 1 2", "answer": "1 2 3", "difficulty": 1},
        {"prompt": "Name a primary colour.", "answer": "red", "difficulty": 3},
    ],
}
_SAMPLE_ROWS["ultrafeedback_pairs"] = _SAMPLE_ROWS["ultrafeedback"]


def sample_rows(fmt: str, num_rows: int | None = None, *, flat_only: bool = False) -> list[dict]:
  """The built-in sample rows of format ``fmt``, cycled (with distinct prompts) to ``num_rows``.

  ``flat_only`` keeps only rows whose fields are all scalars (for Parquet, where one column
  cannot mix strings and message lists).
  """
  base = _SAMPLE_ROWS[fmt]
  if flat_only:
    base = [r for r in base if all(isinstance(v, (str, bool, int, float)) for v in r.values())] or base
  num_rows = len(base) if num_rows is None else num_rows
  rows = []
  for i in range(num_rows):
    row = json.loads(json.dumps(base[i % len(base)]))
    if i >= len(base):  # make repeated rows distinguishable: tag the first user turn
      _tag_row(row, f" #{i}")
    rows.append(row)
  return rows


def _tag_row(row: dict, tag: str) -> None:
  for key in ("prompt", "instruction", "question"):
    if isinstance(row.get(key), str):
      row[key] += tag
      return
    if isinstance(row.get(key), list):
      row[key][-1]["content"] += tag
      return
  if "messages" in row:
    row["messages"][0]["content"] += tag
  elif isinstance(row.get("chosen"), str):  # HH transcripts share the prompt: tag both sides
    row["chosen"] = row["chosen"].replace("\n\nAssistant:", tag + "\n\nAssistant:", 1)
    row["rejected"] = row["rejected"].replace("\n\nAssistant:", tag + "\n\nAssistant:", 1)
  else:
    row["chosen"][0]["content"] += tag
    row["rejected"][0]["content"] += tag


def write_sample_files(
    directory: str | os.PathLike,
    *,
    num_rows: int | None = None,
    parquet: tuple[str, ...] = ("preference",),
) -> dict[str, str]:
  """Writes a small file of every format in `FORMATS` to ``directory`` (no downloads).

  Args:
    directory: created if missing.
    num_rows: rows per file (default: the 4 built-in rows; more are cycled, tagged " #i").
    parquet: formats written as ``.parquet`` (needs pyarrow) instead of ``.jsonl``.

  Returns:
    ``{fmt: path}``.
  """
  os.makedirs(directory, exist_ok=True)
  paths = {}
  for fmt in FORMATS:
    rows = sample_rows(fmt, num_rows, flat_only=fmt in parquet)
    if fmt in parquet:
      import pyarrow as pa
      import pyarrow.parquet as pq

      path = os.path.join(os.fspath(directory), f"{fmt}.parquet")
      pq.write_table(pa.Table.from_pylist(rows), path)
    else:
      path = os.path.join(os.fspath(directory), f"{fmt}.jsonl")
      with open(path, "w", encoding="utf-8") as f:
        for row in rows:
          f.write(json.dumps(row) + "\n")
    paths[fmt] = path
  return paths
