"""A user's own data files, named on the command line: resolve, detect the format, load.

``config.data.train_files`` (or any data key) is a path, a glob, or a list of them:

- a ``.jsonl`` (``.json`` with one object a line) or ``.parquet`` file;
- a glob (``data/*.jsonl``; matches sorted);
- a directory of such files (not recursive; other files in it are ignored);
- a tfds ArrayRecord dataset directory, as `rlhf_jax.data.tfds_builders.build_dataset`
  writes it (``<data_dir>/<name>/<version>/`` holding ``dataset_info.json`` and
  ``*.array_record*`` shards; the ``data_dir``, ``<name>`` or version directory may be
  given). Its records are already-normalised examples: their kind is their format.

`detect_format` tells the source format (`rlhf_jax.data.formats.FORMATS`) from the keys
and value types of a file's first rows, as TRL does:

=================================================================  ==============================
row keys                                                           format (kind)
=================================================================  ==============================
``chosen``/``rejected``: strings containing ``"\\n\\nHuman:"``     ``hh_rlhf`` (pair)
``chosen``/``rejected`` (``prompt`` optional: TRL implicit prompt)  ``preference`` (pair)
``completions``                                                    ``ultrafeedback`` (ranked)
``completion`` + ``label``                                         ``kto`` (unpaired)
``messages``                                                       ``sft`` (sft)
``question`` + ``answer``, or ``prompt`` + an answer with ``####``  ``gsm8k`` (prompt_answer)
``prompt`` (any other columns kept in ``fields``)                  ``prompt`` (prompt)
=================================================================  ==============================

The majority over the sampled rows wins (``ultrafeedback_pairs`` is never detected: name
it in ``config.data.format``). `load_dataset` puts it together: bad rows are skipped and
counted, and more than ``max_skipped_fraction`` of them, or a file whose rows are all bad, is
an error (`BadRowsError`); an empty file is an error; exact duplicate rows are kept, counted
(``stats["duplicates"]``, across the files) and reported in one warning.
Every user mistake is a one-line `rlhf_jax.errors.UserError` naming the config key.

Examples:
  >>> detect_format([{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
  'preference'
  >>> detect_format([{"prompt": "2+2?", "answer": "4", "level": 1}])
  'prompt'
"""

from __future__ import annotations

import collections
import glob
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from rlhf_jax.data.formats import _BadJson, FORMATS, KIND_OF_FORMAT, merge_stats, new_stats, read_examples, read_rows
from rlhf_jax.data.tokenize import decode_record
from rlhf_jax.errors import ConfigError, UserError

__all__ = [
    "BadRowsError",
    "FILE_EXTENSIONS",
    "detect_file_format",
    "detect_format",
    "is_tfds_dir",
    "load_dataset",
    "resolve_files",
]

FILE_EXTENSIONS = (".jsonl", ".json", ".parquet")
_ACCEPTED = ".jsonl, .json or .parquet files, or a tfds ArrayRecord dataset directory"
# The format reported for a tfds dataset of a kind whose build format is not recorded.
_FORMAT_OF_KIND = {"pair": "preference", "ranked": "ultrafeedback", "unpaired": "kto", "prompt_answer": "gsm8k",
                   "sft": "sft", "prompt": "prompt"}
_log = logging.getLogger("rlhf_jax")


class BadRowsError(UserError):
  """Too many bad rows (more than ``max_skipped_fraction``): ``skipped``, ``rows``, ``reasons``."""

  def __init__(self, message: str, *, skipped: int, rows: int, reasons: dict[str, int]):
    super().__init__(message)
    self.skipped, self.rows, self.reasons = skipped, rows, dict(reasons)


# ----------------------------------------------------------------------------- files


def _tfds_version_dirs(path: str) -> list[str]:
  """The tfds dataset (version) directories at ``path`` or up to two levels below it."""
  found = []
  for depth in range(3):
    for d in sorted(glob.glob(os.path.join(glob.escape(path), *["*"] * depth))):
      if "incomplete" in os.path.basename(d) or not os.path.isdir(d):
        continue
      if os.path.isfile(os.path.join(d, "dataset_info.json")) and glob.glob(
          os.path.join(glob.escape(d), "*.array_record*")):
        found.append(d)
    if found:
      return found
  return found


def _version_key(path: str) -> tuple:
  return tuple((1, int(x), "") if x.isdigit() else (0, 0, x) for x in re.split(r"[.]", os.path.basename(path)))


def _tfds_dir(path: str, key: str) -> str:
  """The one version directory of the tfds dataset at ``path`` (the newest version if several)."""
  found = _tfds_version_dirs(path)
  if not found:
    raise ConfigError(f"config.{key}: {path!r} is not a tfds ArrayRecord dataset directory")
  parents = sorted({os.path.dirname(d) for d in found})
  if len(parents) > 1:
    raise ConfigError(f"config.{key}: {path!r} holds several tfds datasets ({', '.join(parents)}); name one")
  return max(found, key=_version_key)


def is_tfds_dir(path: str | os.PathLike) -> bool:
  """Whether ``path`` is (or holds, up to ``<name>/<version>/``) a tfds ArrayRecord dataset."""
  path = os.fspath(path)
  return os.path.isdir(path) and bool(_tfds_version_dirs(path))


def _expand(path: str, key: str) -> list[str]:
  if os.path.isdir(path):
    if is_tfds_dir(path):
      return [path]
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.endswith(FILE_EXTENSIONS) and not f.startswith(".")
                   and os.path.isfile(os.path.join(path, f)))
    if not files:
      raise ConfigError(f"config.{key}: directory {path!r} holds no data files (expected {_ACCEPTED})")
    return files
  if not path.endswith(FILE_EXTENSIONS):
    raise ConfigError(f"config.{key}: {path!r} is not a data file (expected {_ACCEPTED})")
  return [path]


def resolve_files(spec: str | os.PathLike | Sequence[str | os.PathLike], *,
                  key: str = "data.train_files") -> list[str]:
  """The data files (and tfds dataset directories) that ``spec`` names, in order, without repeats.

  Args:
    spec: a path, a glob or a tuple/list of them; a bare string is one entry and empty
      strings are ignored. ``~`` is expanded; globs match sorted (``**`` recursive).
    key: the config key of ``spec``, named in errors.

  Returns:
    Paths: files with an accepted extension, and tfds ArrayRecord dataset directories as
    one entry each (as given).

  Raises:
    ConfigError: nothing given, an entry that matches no file, a directory without data
      files, or a file of another kind.
  """
  entries = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec or ())
  entries = [os.path.expanduser(os.fspath(e)) for e in entries if os.fspath(e).strip()]
  if not entries:
    raise ConfigError(f"config.{key}: no data files given (expected {_ACCEPTED})")
  out: list[str] = []
  for entry in entries:
    matches = sorted(glob.glob(entry, recursive=True)) if glob.has_magic(entry) else [entry]
    matches = [m for m in matches if os.path.exists(m)]
    if not matches:
      raise ConfigError(f"config.{key}: {entry!r} matches no file")
    for m in matches:
      out += [p for p in _expand(m, key) if p not in out]
  return out


# ----------------------------------------------------------------------------- formats


def _row_format(row: dict) -> str | None:
  """The format one row looks like, or None."""
  has = lambda k: row.get(k) is not None
  if has("chosen") and has("rejected"):
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str) and "\n\nHuman:" in chosen:
      return "hh_rlhf"
    return "preference"
  if has("completions"):
    return "ultrafeedback"
  if has("completion") and has("label"):
    return "kto"
  if has("messages"):
    return "sft"
  if has("question") and has("answer"):
    return "gsm8k"
  if has("prompt") and isinstance(row.get("answer"), str) and "####" in row["answer"]:
    return "gsm8k"
  if has("prompt"):
    return "prompt"
  return None


def detect_format(rows: Sequence[Any], *, max_rows: int = 20, where: str = "the data",
                  key: str = "data.format") -> str:
  """The source format of ``rows`` (dicts; others are ignored), by majority over the first ``max_rows``.

  Args:
    rows: raw rows, as read from a file.
    max_rows: how many valid (dict) rows to look at.
    where: what the rows are (a file name), for the error message.
    key: the config key to set instead, named in the error.

  Returns:
    One of `rlhf_jax.data.formats.FORMATS` (see the module docstring's table).

  Raises:
    ConfigError: no row looks like any format (it lists the keys seen and the formats).
  """
  sample = [r for r in rows if isinstance(r, dict)][:max_rows]
  votes = collections.Counter(f for f in map(_row_format, sample) if f is not None)
  if not votes:
    keys = sorted({str(k) for r in sample for k in r})
    raise ConfigError(
        f"config.{key}='auto': cannot tell the format of {where} from its first {len(sample)} rows "
        f"(keys seen: {', '.join(keys) or 'none'}); set config.{key} to one of {', '.join(FORMATS)}")
  return votes.most_common(1)[0][0]


def _head_rows(path: str, max_rows: int) -> list[dict]:
  """The first ``max_rows`` valid object rows of a JSONL/Parquet file (blank and bad lines skipped)."""
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # Imported lazily: only Parquet sources need pyarrow.

    for batch in pq.ParquetFile(path).iter_batches(batch_size=max_rows):
      return batch.to_pylist()[:max_rows]
    return []
  rows = []
  for _, row in read_rows(path):
    if row is None or isinstance(row, _BadJson) or not isinstance(row, dict):
      continue
    rows.append(row)
    if len(rows) >= max_rows:
      break
  return rows


def _tfds_source(path: str, key: str):
  """``(data_source, source_format or None)`` of the tfds dataset at ``path`` (train split)."""
  import tensorflow_datasets as tfds  # Imported lazily: only ArrayRecord sources need tfds.

  builder = tfds.builder_from_directory(_tfds_dir(path, key))
  splits = list(builder.info.splits.keys())
  if not splits:
    raise ConfigError(f"config.{key}: tfds dataset {path!r} has no splits")
  split = "train" if "train" in splits else splits[0]
  fmt = builder.info.metadata.get("source_format") if builder.info.metadata else None
  return builder.as_data_source(split=split), fmt


def _tfds_format(path: str, key: str) -> tuple[str, str, int]:
  """``(format, kind, records)`` of a tfds dataset: the stored kind, named by its build format."""
  source, fmt = _tfds_source(path, key)
  if not len(source):
    raise ConfigError(f"config.{key}: tfds dataset {path!r} holds no records")
  kind = decode_record(source[0]).get("kind")
  if kind not in _FORMAT_OF_KIND:
    raise ConfigError(f"config.{key}: tfds dataset {path!r} does not hold rlhf_jax examples (kind {kind!r})")
  if KIND_OF_FORMAT.get(fmt) != kind:
    fmt = _FORMAT_OF_KIND[kind]
  return fmt, kind, len(source)


def _file_format(path: str, max_rows: int, key: str) -> tuple[str, int]:
  """``(format, rows looked at)`` of one resolved entry."""
  if os.path.isdir(path):
    fmt, _, n = _tfds_format(path, key)
    return fmt, n
  rows = _head_rows(path, max_rows)
  if not rows:
    raise ConfigError(f"config.{key}: {path!r} holds no data rows")
  return detect_format(rows, max_rows=max_rows, where=repr(path)), len(rows)


def detect_file_format(path: str | os.PathLike, *, max_rows: int = 20, key: str = "data.train_files") -> str:
  """The source format of a ``.jsonl``/``.parquet`` file (`detect_format` on its first rows) or tfds dataset.

  Args:
    path: a data file, or a tfds ArrayRecord dataset directory (its stored kind, named by
      the format it was built from).
    max_rows: how many valid rows of a file to look at.
    key: the config key, named in errors.

  Returns:
    One of `rlhf_jax.data.formats.FORMATS`.

  Raises:
    ConfigError: an empty file, or rows of no known format.
  """
  return _file_format(os.fspath(path), max_rows, key)[0]


# ----------------------------------------------------------------------------- loading


def _accepted(allowed_kinds) -> str:
  formats = [f for f, k in KIND_OF_FORMAT.items() if k in allowed_kinds]
  return f"kinds {', '.join(allowed_kinds)} (formats {', '.join(formats)})"


def _read_tfds(path: str, key: str) -> list[dict]:
  source, _ = _tfds_source(path, key)
  getitems = getattr(source, "__getitems__", None)
  out = []
  for start in range(0, len(source), 4096):
    idx = list(range(start, min(start + 4096, len(source))))
    records = getitems(idx) if getitems is not None else [source[i] for i in idx]
    out += [decode_record(r) for r in records]
  return out


def _top_reasons(stats: dict) -> tuple[str, str]:
  """``("reason: n, ...", first error)`` of parse stats: the 3 commonest skip reasons, the first message."""
  top = sorted(stats["skipped_by_reason"].items(), key=lambda kv: -kv[1])[:3]
  reasons = ", ".join(f"{reason}: {n}" for reason, n in top)
  first = stats["errors"][0].replace("\n", "\\n") if stats["errors"] else "?"
  return reasons, first


def _check_skipped(stats: dict, key: str, max_skipped_fraction: float) -> None:
  rows, skipped = stats["rows"], stats["skipped"]
  if not skipped:
    return
  reasons, first = _top_reasons(stats)
  frac = skipped / max(rows, 1)
  if frac > max_skipped_fraction:
    raise BadRowsError(
        f"config.{key}: {skipped} of {rows} rows are bad ({100 * frac:.1f}% > max_skipped_fraction "
        f"{100 * max_skipped_fraction:g}%); top reasons: {reasons}; first: {first}",
        skipped=skipped, rows=rows, reasons=stats["skipped_by_reason"])
  _log.warning("%s: skipped %d of %d bad rows (%s); first: %s", key, skipped, rows, reasons, first)


def load_dataset(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    fmt: str = "auto",
    *,
    key: str = "data.train_files",
    max_skipped_fraction: float = 0.05,
    allowed_kinds: Sequence[str] | None = None,
    max_detect_rows: int = 20,
) -> tuple[list[dict], dict, str]:
  """All normalised examples of the files ``spec`` names, with their parse stats and format.

  Args:
    spec: see `resolve_files`.
    fmt: a format of `rlhf_jax.data.formats.FORMATS`, or ``"auto"`` to detect it per file
      (`detect_format` on the first ``max_detect_rows`` rows; logged at INFO). tfds datasets
      hold normalised examples: their kind must be ``fmt``'s.
    key: the config key of ``spec``, named in errors and logs.
    max_skipped_fraction: bad rows are skipped and counted; more than this fraction of the
      rows is an error.
    allowed_kinds: the example kinds the caller takes (e.g. ``("pair", "unpaired",
      "ranked")``); None: any.
    max_detect_rows: rows looked at per file to detect its format.

  Returns:
    ``(examples, stats, fmt)``: the examples in file order; parse stats (`new_stats`:
    ``rows``, ``ok``, ``skipped``, ``skipped_by_reason``, ``errors``, ``blank_lines``,
    ``duplicates`` (valid rows equal to an earlier one, in any file: kept, and logged in one
    warning with the first one's ``FILE:LINE``); tfds records count as rows); the format,
    shared by all files.

  Raises:
    ConfigError: a bad ``spec`` (`resolve_files`), an unknown ``fmt``, files of different
      formats (or kinds), rows of no known format, a kind not in ``allowed_kinds``, no rows,
      or a file with no data rows (empty, or only blank lines; named).
    BadRowsError: more than ``max_skipped_fraction`` of the rows are bad, or every row of one
      file is (one line: the counts, the top 3 reasons and the first error, naming file:line
      and field).
  """
  if fmt != "auto" and fmt not in FORMATS:
    raise ConfigError(f"config.data.format={fmt!r}: unknown format; expected 'auto' or one of {', '.join(FORMATS)}")
  paths = resolve_files(spec, key=key)
  detected = fmt == "auto"
  entries = []  # (path, is_tfds, format, kind, rows looked at or records)
  for path in paths:
    if os.path.isdir(path):
      t_fmt, kind, n = _tfds_format(path, key)
      if fmt != "auto" and kind != KIND_OF_FORMAT[fmt]:
        raise ConfigError(f"config.{key}: {path!r} is a tfds dataset of {kind!r} examples, but "
                          f"config.data.format={fmt!r} gives {KIND_OF_FORMAT[fmt]!r} examples")
      entries.append((path, True, t_fmt, kind, n))
    elif fmt == "auto":
      f_fmt, n = _file_format(path, max_detect_rows, key)
      entries.append((path, False, f_fmt, KIND_OF_FORMAT[f_fmt], n))
    else:
      entries.append((path, False, fmt, KIND_OF_FORMAT[fmt], 0))
  raw = [e for e in entries if not e[1]]
  if len({e[2] for e in raw}) > 1 or len({e[3] for e in entries}) > 1:
    seen = {}
    for e in entries:
      seen.setdefault(e[2], e[0])
    raise ConfigError(f"config.{key}: the files are of different formats ("
                      + ", ".join(f"{p!r} is {f!r}" for f, p in seen.items())
                      + "); use one format per data key")
  first = (raw or entries)[0]
  fmt = first[2] if detected else fmt
  kind = KIND_OF_FORMAT[fmt]
  if detected or first[1]:
    if first[1]:
      _log.info("%s: tfds dataset %s holds %d %r examples (format %r)", key, first[0], first[4], kind, fmt)
    elif first[4]:
      more = f" (and {len(paths) - 1} more, same format)" if len(paths) > 1 else ""
      _log.info("%s: detected format %r (kind %s) from %d rows of %s%s", key, fmt, kind, first[4], first[0], more)
  if allowed_kinds is not None and kind not in allowed_kinds:
    raise ConfigError(f"config.data.format: the data of config.{key} is format {fmt!r} (kind {kind!r}); "
                      f"this recipe takes {_accepted(tuple(allowed_kinds))}")
  stats = new_stats()
  examples: list[dict] = []
  seen: set = set()  # row hashes, for duplicates across the files
  per_file = []
  for path, is_tfds, *_ in entries:
    if is_tfds:
      records = _read_tfds(path, key)
      stats["rows"] += len(records)
      stats["ok"] += len(records)
      examples += records
    else:
      file_stats = new_stats()
      examples += read_examples(path, fmt, on_error="skip", stats=file_stats, seen=seen, allow_empty=True,
                                warn_duplicates=False)
      merge_stats(stats, file_stats)
      if not file_stats["rows"]:
        raise ConfigError(f"config.{key}: {path!r} holds no data rows (the file is empty or holds only blank lines)")
      per_file.append((path, file_stats))
  if not stats["rows"]:
    raise ConfigError(f"config.{key}: no data rows in {', '.join(map(repr, paths))}")
  _check_skipped(stats, key, max_skipped_fraction)
  for path, file_stats in per_file:
    if not file_stats["ok"]:
      reasons, first = _top_reasons(file_stats)
      raise BadRowsError(f"config.{key}: all {file_stats['rows']} rows of {path!r} are bad; top reasons: {reasons}; "
                         f"first: {first}", skipped=file_stats["skipped"], rows=file_stats["rows"],
                         reasons=file_stats["skipped_by_reason"])
  if stats["duplicates"]:
    _log.warning("%s: %d of %d rows are exact duplicates of earlier rows (first: %s); kept, counted in "
                 "stats['duplicates']", key, stats["duplicates"], stats["ok"], stats.get("first_duplicate"))
  return examples, stats, fmt
