"""Readers of local JSONL / Parquet files in the common public post-training formats.

Every reader yields *normalised examples*: plain, JSON-able dicts whose ``"kind"`` says
which of six shapes it has. Prompts and responses are always lists of chat messages
(``{"role": ..., "content": ...}``); a plain-string prompt becomes one user message and a
plain-string response one assistant message.

=================  =======================================================================
kind               keys
=================  =======================================================================
``pair``           ``prompt``, ``chosen``, ``rejected`` (message lists); ``fields`` with the
                   per-pair columns of `PAIR_FIELDS` when the row has any
``ranked``         ``prompt``, ``completions`` (message lists, best first), ``scores``
``unpaired``       ``prompt``, ``completion``, ``label`` (bool: desirable or not; KTO)
``prompt_answer``  ``prompt``, ``answer`` (reference final answer), ``solution`` (full text)
``sft``            ``messages``; ``fields`` when the row has other columns (e.g. ``weight``,
                   ``reward``, ``source``, ``correct``: read by the weighted SFT objectives)
``prompt``         ``prompt``, ``fields`` (every other column of the row, as JSON values; for
                   online RL: reward functions get them, e.g. ``{"answer": "42"}``)
``stepwise``       ``prompt``, ``steps`` (the reasoning steps of one solution, strings), ``labels``
                   (one float in ``[0, 1]`` per step: 1 correct, 0 wrong; process reward models)
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
- ``"sft"``: ``messages`` (list of role/content dicts) -> ``sft``; any other columns are kept
  in ``fields`` (finite numbers only, as for ``prompt``).
- ``"prompt"``: ``prompt`` (a string or a message list) plus any other columns, kept as-is
  in ``fields`` -> ``prompt`` (values that are not JSON types, e.g. Parquet dates, become
  strings).
- ``"stepwise"``: step-level supervision for process reward models (Lightman et al. 2023, PRM800K;
  Wang et al. 2024, Math-Shepherd): ``prompt`` (or ``question``; a string or a message list),
  ``steps`` (or ``completions``, the naming of TRL's stepwise-supervision datasets such as
  ``trl-lib/math_shepherd`` and ``trl-lib/prm800k``): a non-empty list of non-empty strings, and
  ``labels``: one per step, a bool or a soft label in ``[0, 1]`` (e.g. Math-Shepherd's estimated
  step value) -> ``stepwise``. Read it with ``read_examples(path, "stepwise")`` /
  ``load_examples``; it is not (yet) one of `FORMATS`, because format auto-detection and
  ``load_dataset`` (`rlhf_jax.data.sources`) do not know it.

Bad rows (unparsable JSON, a missing field, a wrong type, an empty completion, a chat role
outside `ROLES`, a non-finite number such as ``NaN``/``Infinity`` in a score or a ``prompt``
field, ...) raise `DataError` naming the file, the line (or row) and the field; with
``on_error="skip"`` they are skipped and counted in ``stats`` (``stats["skipped"]``,
``stats["skipped_by_reason"]`` and the first few messages in ``stats["errors"]``): nothing is
dropped silently. Rows that are exact copies of an earlier row are kept, but counted
(``stats["duplicates"]``, the first one's place in ``stats["first_duplicate"]``) and reported in
one warning per file. A file with no data rows is an `EmptyDataError` naming the file (and
`rlhf_jax.data.sources.load_dataset` and the tfds builders refuse a file whose rows were all
skipped too). `validate_example` checks an already-normalised example (as
stored in a tfds record) the same way.

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

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from typing import Any

from rlhf_jax.errors import UserError

__all__ = [
    "DataError",
    "EmptyDataError",
    "FORMATS",
    "KIND_OF_FORMAT",
    "ROLES",
    "STEPWISE_FORMAT",
    "best_worst_pair",
    "load_examples",
    "merge_stats",
    "new_stats",
    "stats_metrics",
    "parse_hh_transcript",
    "parse_row",
    "read_examples",
    "read_rows",
    "sample_rows",
    "validate_example",
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
# The chat roles a message may have: those of the Hugging Face / OpenAI chat format that chat
# templates render (ChatML, Llama 3 and Qwen templates take these; "tool" is a tool's reply).
ROLES = ("system", "user", "assistant", "tool")
_MAX_ERRORS_KEPT = 20
_log = logging.getLogger("rlhf_jax")


class DataError(UserError):
  """A bad row: ``path``, ``line`` (JSONL line, 1-based, or Parquet row, 0-based), ``field``, ``reason``.

  ``record`` (optional) says which record of a batch it is (e.g. ``"record 3 of the batch"``),
  for errors raised while collating; ``path``/``line`` may then be None when the example
  carries no ``"source"``. The message is one line: ``FILE:LINE (RECORD): field 'F': REASON: DETAIL``.
  """

  def __init__(self, path: str | None, line: int | str | None, field: str | None, reason: str, detail: str = "",
               *, record: str | None = None):
    self.path = None if path is None else str(path)
    self.line, self.field, self.reason, self.detail, self.record = line, field, reason, detail, record
    where = self.path if line is None else f"{self.path}:{line}"
    if record is not None:
      where = record if where is None else f"{where} ({record})"
    where = "<example without a source>" if where is None else where
    what = f"field {field!r}: " if field else ""
    detail = str(detail).replace("\n", "\\n")
    super().__init__(f"{where}: {what}{reason}{': ' + detail if detail else ''}")


class EmptyDataError(DataError):
  """A source with no usable rows: empty (or only blank lines), or every row skipped as bad.

  ``path``, ``rows`` (non-blank rows seen) and ``skipped``; ``reason`` is ``"no data rows"`` or
  ``"all rows bad"``. The message names the file (and, for bad rows, the top reasons and the
  first error).
  """

  def __init__(self, path: str, *, rows: int = 0, skipped: int = 0, reasons: dict | None = None,
               first: str | None = None):
    if not rows:
      reason, detail = "no data rows", "the file is empty or holds only blank lines"
    else:
      top = ", ".join(f"{r}: {n}" for r, n in sorted((reasons or {}).items(), key=lambda kv: -kv[1])[:3])
      reason = "all rows bad"
      detail = f"all {rows} rows were skipped ({top or '?'}); first: {first or '?'}"
    super().__init__(path, None, None, reason, detail)
    self.rows, self.skipped, self.reasons = rows, skipped, dict(reasons or {})


class _RowError(Exception):
  """Raised inside a row parser; turned into `DataError` with the file and line."""

  def __init__(self, field: str | None, reason: str, detail: str = ""):
    super().__init__(reason)
    self.field, self.reason, self.detail = field, reason, detail


def new_stats() -> dict[str, Any]:
  """A fresh stats dict: ``rows``, ``ok``, ``skipped``, ``skipped_by_reason``, ``errors``, ``blank_lines``,
  ``duplicates`` (valid rows that are exact copies of an earlier one; kept). A ``first_duplicate``
  key (``"FILE:LINE"``, not a metric) is added when the first duplicate is seen."""
  return {"rows": 0, "ok": 0, "skipped": 0, "skipped_by_reason": {}, "errors": [], "blank_lines": 0,
          "duplicates": 0}


def merge_stats(into: dict, more: dict) -> dict:
  """Adds the parse stats ``more`` (`new_stats`) to ``into`` in place (counts summed, reasons merged,
  the first `_MAX_ERRORS_KEPT` error messages and the first ``first_duplicate`` kept); returns ``into``.

  >>> a = {**new_stats(), "rows": 2, "ok": 2}
  >>> b = {**new_stats(), "rows": 1, "skipped": 1, "skipped_by_reason": {"empty completion": 1}, "errors": ["f:1: x"]}
  >>> m = merge_stats(a, b); m["rows"], m["ok"], m["skipped"], m["skipped_by_reason"], m["errors"]
  (3, 2, 1, {'empty completion': 1}, ['f:1: x'])
  """
  for key, value in new_stats().items():
    into.setdefault(key, value)
  for key in ("rows", "ok", "skipped", "blank_lines", "duplicates"):
    into[key] += more.get(key, 0)
  for reason, n in more.get("skipped_by_reason", {}).items():
    into["skipped_by_reason"][reason] = into["skipped_by_reason"].get(reason, 0) + n
  into["errors"] += list(more.get("errors", []))[:max(0, _MAX_ERRORS_KEPT - len(into["errors"]))]
  if more.get("first_duplicate") and not into.get("first_duplicate"):
    into["first_duplicate"] = more["first_duplicate"]
  return into


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
    if m["role"] not in ROLES:
      raise _RowError(f"{field}[{j}].role", "unknown role",
                      f"message {j} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
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


PAIR_FIELDS = ("gold", "beta", "weight", "margin_rewards_chosen", "margin_rewards_rejected")
"""Per-pair columns a ``preference`` row may carry, kept in the example's ``fields``: ``gold`` (a
gold response, TPO), ``beta`` (a per-pair β > 0, e.g. MM-DPO's reward-scaled β), ``weight`` (a
per-pair loss weight >= 0), ``margin_rewards_chosen``/``margin_rewards_rejected`` (MODPO: the
other objectives' reward-model scores of each response, equal-length lists)."""


def _pair_fields(row: dict) -> dict:
  out = {}
  if row.get("gold") is not None:
    out["gold"] = _response(row["gold"], "gold")
  if row.get("beta") is not None:
    out["beta"] = _number(row["beta"], "beta")
    if not out["beta"] > 0:
      raise _RowError("beta", "bad value", f"a per-pair beta must be > 0, got {out['beta']}")
  if row.get("weight") is not None:
    out["weight"] = _number(row["weight"], "weight")
    if not out["weight"] >= 0:
      raise _RowError("weight", "bad value", f"a pair weight must be >= 0, got {out['weight']}")
  margins = [k for k in ("margin_rewards_chosen", "margin_rewards_rejected") if row.get(k) is not None]
  if margins and len(margins) != 2:
    missing = ({"margin_rewards_chosen", "margin_rewards_rejected"} - set(margins)).pop()
    raise _RowError(missing, "missing field", "margin rewards need both the chosen and the rejected scores")
  for k in margins:
    v = row[k]
    if not isinstance(v, list) or not v:
      raise _RowError(k, "wrong type", f"expected a non-empty list of numbers, got {type(v).__name__}")
    out[k] = [_number(x, f"{k}[{i}]") for i, x in enumerate(v)]
  if margins and len(out["margin_rewards_chosen"]) != len(out["margin_rewards_rejected"]):
    raise _RowError("margin_rewards_rejected", "bad value", "the chosen and rejected margin rewards differ in length")
  return out


def _parse_preference(row: dict) -> dict:
  if "prompt" not in row or row["prompt"] is None:
    chosen, rejected = _get(row, "chosen"), _get(row, "rejected")
    if isinstance(chosen, str) or isinstance(rejected, str):
      raise _RowError("prompt", "missing field")
    prompt, c, r = _split_common(_messages(chosen, "chosen"), _messages(rejected, "rejected"))
    out = {"kind": "pair", "prompt": prompt, "chosen": c, "rejected": r}
  else:
    out = {
        "kind": "pair",
        "prompt": _prompt(row["prompt"], "prompt"),
        "chosen": _response(_get(row, "chosen"), "chosen"),
        "rejected": _response(_get(row, "rejected"), "rejected"),
    }
  fields = _pair_fields(row)
  if fields:
    out["fields"] = fields
  return out


def _number(value: Any, field: str) -> float:
  """``value`` as a finite float; a bool, a non-number or ``NaN``/``±Infinity`` is a bad row."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise _RowError(field, "wrong type", f"expected a number, got {type(value).__name__}")
  if not math.isfinite(value):
    raise _RowError(field, "non-finite number", f"{_json_number(value)} (scores must be finite)")
  return float(value)


def _json_number(value: float) -> str:
  """A non-finite float as JSON spells it (``NaN``, ``Infinity``, ``-Infinity``)."""
  return json.dumps(value)


def _check_finite(value: Any, field: str) -> None:
  """Raises the ``"non-finite number"`` row error for the first ``NaN``/``±Infinity`` in ``value``
  (nested lists and dicts are searched; the field is named as ``field[i].key``)."""
  if isinstance(value, float) and not math.isfinite(value):
    raise _RowError(field, "non-finite number", f"{_json_number(value)} (numbers in the data must be finite)")
  if isinstance(value, dict):
    for k, v in value.items():
      _check_finite(v, f"{field}.{k}")
  elif isinstance(value, (list, tuple)):
    for i, v in enumerate(value):
      _check_finite(v, f"{field}[{i}]")


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
  out = {"kind": "sft", "messages": msgs}
  fields = {str(k): _json_value(v) for k, v in row.items() if k != "messages"}
  if fields:  # per-row columns (weight, reward, source, correct, ...) for the weighted SFT objectives
    for k, v in fields.items():
      _check_finite(v, k)
    out["fields"] = fields
  return out


def _json_value(value: Any) -> Any:
  """``value`` as plain JSON types (a copy); non-JSON values (dates, bytes, ...) become strings."""
  return json.loads(json.dumps(value, ensure_ascii=False, default=str))


def _parse_prompt(row: dict) -> dict:
  prompt = _prompt(_get(row, "prompt"), "prompt")
  fields = {str(k): _json_value(v) for k, v in row.items() if k != "prompt"}
  for k, v in fields.items():  # they reach reward functions: NaN/Infinity would poison a reward
    _check_finite(v, k)
  return {"kind": "prompt", "prompt": prompt, "fields": fields}


STEPWISE_FORMAT = "stepwise"
"""The step-label source format (and example kind) of process reward models, read by `read_examples`."""


def _step_label(value: Any, field: str) -> float:
  """A step label as a float in [0, 1]: a bool (1.0 correct, 0.0 wrong) or a finite number in [0, 1]."""
  if isinstance(value, bool):
    return float(value)
  if not isinstance(value, (int, float)):
    raise _RowError(field, "wrong type", f"expected a bool or a number in [0, 1], got {type(value).__name__}")
  v = _number(value, field)
  if not 0.0 <= v <= 1.0:
    hint = " (map PRM800K ratings -1/0/1 to bools first, e.g. rating > 0)" if v == -1.0 else ""
    raise _RowError(field, "bad value", f"a step label must be a bool or lie in [0, 1], got {value}{hint}")
  return v


def _steps_and_labels(steps: Any, labels: Any, steps_field: str = "steps") -> tuple[list[str], list[float]]:
  """The validated steps (non-empty strings) and labels (one per step, floats in [0, 1])."""
  if not isinstance(steps, (list, tuple)):
    raise _RowError(steps_field, "wrong type", f"expected a list of step strings, got {type(steps).__name__}")
  if not steps:
    raise _RowError(steps_field, "empty completion", "the solution has no steps")
  out_steps = [_string(x, f"{steps_field}[{i}]") for i, x in enumerate(steps)]
  if not isinstance(labels, (list, tuple)):
    raise _RowError("labels", "wrong type", f"expected a list of step labels, got {type(labels).__name__}")
  if len(labels) != len(out_steps):
    raise _RowError("labels", "length mismatch",
                    f"{len(labels)} labels for {len(out_steps)} steps (one label per step)")
  return out_steps, [_step_label(x, f"labels[{i}]") for i, x in enumerate(labels)]


def _parse_stepwise(row: dict) -> dict:
  prompt = _prompt(_get(row, "prompt", "question"), "prompt")
  steps_field = "steps" if row.get("steps") is not None or row.get("completions") is None else "completions"
  steps, labels = _steps_and_labels(_get(row, steps_field), _get(row, "labels"), steps_field)
  return {"kind": STEPWISE_FORMAT, "prompt": prompt, "steps": steps, "labels": labels}


_PARSERS = {
    "hh_rlhf": _parse_hh,
    "preference": _parse_preference,
    "ultrafeedback": _parse_ultrafeedback,
    "ultrafeedback_pairs": _parse_ultrafeedback_pairs,
    "kto": _parse_kto,
    "gsm8k": _parse_gsm8k,
    "sft": _parse_sft,
    "prompt": _parse_prompt,
    STEPWISE_FORMAT: _parse_stepwise,  # not in FORMATS: rlhf_jax.data.sources cannot detect it yet
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


def _row_key(row: Any) -> int:
  """A 64-bit hash of a raw row's content (key order ignored): equal for exact duplicates."""
  text = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
  return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def read_examples(
    path: str | os.PathLike,
    fmt: str,
    *,
    on_error: str = "raise",
    stats: dict | None = None,
    seen: set | None = None,
    allow_empty: bool = False,
    warn_duplicates: bool = True,
) -> Iterator[dict]:
  """Yields the normalised examples of a JSONL or Parquet file in format ``fmt``.

  Args:
    path: a ``.jsonl`` (or ``.json`` with one object a line) or ``.parquet`` file.
    fmt: one of `FORMATS`.
    on_error: ``"raise"`` (a `DataError` naming file, line and field) or ``"skip"`` (the
      row is skipped and counted in ``stats``).
    stats: a dict updated in place (see `new_stats`; missing keys are added): ``rows``
      (non-blank rows seen), ``ok``, ``skipped``, ``skipped_by_reason``, ``errors`` (the
      first 20 messages) and ``duplicates`` (valid rows equal to an earlier valid row; they
      are yielded all the same). Pass the same dict to several calls to aggregate files.
    seen: hashes of the rows seen so far (updated in place); pass the same set to several
      calls to count duplicates across files. None: a fresh set (this file only).
    allow_empty: if False, a file with no data rows (empty, or only blank lines) raises
      `EmptyDataError` once it is read. (A file whose rows were all skipped is counted in
      ``stats``, as asked with ``on_error="skip"``; `rlhf_jax.data.sources.load_dataset` and
      `rlhf_jax.data.tfds_builders.build_dataset` refuse it.)
    warn_duplicates: log one warning (``"rlhf_jax"`` logger) at the end of the file if it
      held duplicates (their count and the first one's place).

  Raises:
    DataError: on a bad row when ``on_error="raise"``.
    EmptyDataError: no usable row in the file (unless ``allow_empty``).
    ValueError: on an unknown ``fmt`` or ``on_error``.
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"`on_error` must be 'raise' or 'skip'; got {on_error!r}.")
  if fmt not in _PARSERS:
    raise ValueError(f"Unknown format {fmt!r}; expected one of {FORMATS}.")
  stats = new_stats() if stats is None else stats
  for key, value in new_stats().items():
    stats.setdefault(key, value)
  seen = set() if seen is None else seen
  path = os.fspath(path)
  rows = duplicates = 0
  first_duplicate = None
  for line, row in read_rows(path):
    if row is None:
      stats["blank_lines"] += 1
      continue
    stats["rows"] += 1
    rows += 1
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
    key = _row_key(row)
    if key in seen:
      duplicates += 1
      stats["duplicates"] += 1
      first_duplicate = first_duplicate or example["source"]
      stats.setdefault("first_duplicate", first_duplicate)
    else:
      seen.add(key)
    stats["ok"] += 1
    yield example
  if duplicates and warn_duplicates:
    _log.warning("%s: %d of %d rows are exact duplicates of earlier rows (first: %s); kept, counted in "
                 "stats['duplicates']", path, duplicates, rows, first_duplicate)
  if not rows and not allow_empty:
    raise EmptyDataError(path)


def load_examples(paths, fmt: str, *, on_error: str = "raise") -> tuple[list[dict], dict]:
  """All examples of one or several files as a list, with the stats (see `read_examples`;
  duplicates are counted across the files)."""
  paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  stats, seen = new_stats(), set()
  examples = [ex for p in paths for ex in read_examples(p, fmt, on_error=on_error, stats=stats, seen=seen)]
  return examples, stats


# ----------------------------------------------------------------------------- normalised examples


def _where(example: Any) -> tuple[str | None, int | str | None]:
  """``(path, line)`` of an example's ``"source"`` (``"FILE:LINE"`` / ``"FILE:row N"``), or ``(None, None)``."""
  source = example.get("source") if isinstance(example, dict) else None
  if not isinstance(source, str) or not source:
    return None, None
  path, _, line = source.rpartition(":")
  return (path, line) if path else (source, None)


# Kinds of example each batch kind takes (see `rlhf_jax.data.tokenize`).
_TAKES = {"pair": ("pair",), "sft": ("sft", "pair", "unpaired"), "unpaired": ("unpaired",), "ranked": ("ranked",),
          "prompt": ("prompt", "prompt_answer"), "prompt_answer": ("prompt", "prompt_answer")}
_TAKES[STEPWISE_FORMAT] = (STEPWISE_FORMAT,)
_KINDS = frozenset(KIND_OF_FORMAT.values()) | {STEPWISE_FORMAT}


def _check_example(ex: Any, kinds: tuple[str, ...]) -> None:
  if not isinstance(ex, dict):
    raise _RowError(None, "wrong type", f"the record is a {type(ex).__name__}, not a normalised example dict")
  kind = ex.get("kind")
  if kind not in _KINDS:
    raise _RowError("kind", "wrong type" if "kind" in ex else "missing field",
                    f"{kind!r} is not an example kind ({', '.join(sorted(_TAKES))})")
  if kind not in kinds:
    raise _RowError("kind", "wrong kind", f"a {kind!r} example, but this batch takes {' or '.join(map(repr, kinds))}")
  req = lambda name: _get(ex, name)
  if kind == "sft":
    msgs = _messages(req("messages"), "messages")
    if not any(m["role"] == "assistant" for m in msgs):
      raise _RowError("messages", "empty completion", "no assistant message")
    return
  _messages(req("prompt"), "prompt")
  if kind == "pair":
    _messages(req("chosen"), "chosen")
    _messages(req("rejected"), "rejected")
  elif kind == "unpaired":
    _messages(req("completion"), "completion")
    if not isinstance(req("label"), bool):
      raise _RowError("label", "wrong type", f"expected a bool, got {type(ex['label']).__name__}")
  elif kind == "ranked":
    comps, scores = req("completions"), req("scores")
    if not isinstance(comps, (list, tuple)) or not comps:
      raise _RowError("completions", "wrong type", "expected a non-empty list of message lists")
    if not isinstance(scores, (list, tuple)) or len(scores) != len(comps):
      raise _RowError("scores", "wrong type", f"expected a list of {len(comps)} numbers (one per completion)")
    for j, (c, sc) in enumerate(zip(comps, scores)):
      _messages(c, f"completions[{j}]")
      _number(sc, f"scores[{j}]")
  elif kind == STEPWISE_FORMAT:
    _steps_and_labels(req("steps"), req("labels"))
  elif kind == "prompt_answer":
    _string(req("answer"), "answer", allow_empty=True)
  elif kind == "prompt":
    fields = ex.get("fields")
    if fields is not None and not isinstance(fields, dict):
      raise _RowError("fields", "wrong type", f"expected a dict, got {type(fields).__name__}")
    _check_finite(fields or {}, "fields")


def validate_example(example: Any, kinds: str | tuple[str, ...] | None = None, *, record: str | None = None) -> dict:
  """Checks a normalised example (e.g. a decoded tfds record) before it is tokenised; returns it.

  Checks the ``kind`` and that every key the kind needs is there with the right type: message
  lists of ``{role, content}`` with roles in `ROLES`, ranked ``scores`` finite and one per
  completion, a bool ``label``, an ``sft`` conversation with an assistant turn, no
  ``NaN``/``Infinity`` in a ``prompt`` example's ``fields``.

  Args:
    example: the example.
    kinds: the example kinds accepted: a batch kind of `rlhf_jax.data.tokenize.make_collate`
      (``"sft"`` takes pair/unpaired too, the prompt kinds take each other), a tuple of
      kinds, or None (any).
    record: where it is in a batch (e.g. ``"record 3 of the batch"``), named in the error.

  Raises:
    DataError: naming the example's source (``FILE:LINE``) when it has one, ``record``, the
      field and the reason (one line).

  >>> bad = {"kind": "sft", "messages": [{"role": "bot", "content": "hi"}], "source": "f.jsonl:4"}
  >>> try:
  ...   validate_example(bad, "sft", record="record 0 of the batch")
  ... except DataError as e:
  ...   print(e.field, "|", e.reason, "|", e)  # doctest: +ELLIPSIS
  messages[0].role | unknown role | f.jsonl:4 (record 0 of the batch): field 'messages[0].role': unknown role: ...
  """
  if kinds is None:
    kinds = tuple(_TAKES)
  elif isinstance(kinds, str):
    kinds = _TAKES.get(kinds, (kinds,))
  try:
    _check_example(example, tuple(kinds))
  except _RowError as e:
    path, line = _where(example)
    raise DataError(path, line, e.field, e.reason, e.detail, record=record) from None
  return example


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
_SAMPLE_ROWS[STEPWISE_FORMAT] = [
    {"prompt": "Add 3, 4 and 5.", "steps": ["3 + 4 = 7", "7 + 5 = 12", "The answer is 12."],
     "labels": [True, True, True]},
    {"prompt": "Add 2, 9 and 1.", "steps": ["2 + 9 = 10", "10 + 1 = 11", "The answer is 11."],
     "labels": [False, False, False]},
    {"prompt": [{"role": "user", "content": "Double 6, then add 1."}], "completions": ["6 * 2 = 12", "12 + 1 = 13"],
     "labels": [1.0, 0.75]},
    {"prompt": "Add 8 and 8.", "steps": ["8 + 8 = 16"], "labels": [True]},
]


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
