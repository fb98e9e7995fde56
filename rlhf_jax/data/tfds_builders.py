"""tensorflow-datasets builders from local JSONL/Parquet files to ArrayRecord (no TensorFlow).

One `GeneratorBasedBuilder` per example kind; each reads local files with
`rlhf_jax.data.formats.read_examples` and writes ArrayRecord shards
(``file_format="array_record"``), which ``tfds.data_source`` (or
``builder.as_data_source``) reads back with random access and without TensorFlow:

=============================  ===============  ==========================================
builder (tfds name)            kind             source formats
=============================  ===============  ==========================================
`PreferencePairs`              ``pair``         hh_rlhf, preference, ultrafeedback_pairs
`RankedLists`                  ``ranked``       ultrafeedback
`UnpairedExamples`             ``unpaired``     kto
`PromptsWithAnswers`           ``prompt_answer`` gsm8k
`Prompts`                      ``prompt``        prompt
`SftConversations`             ``sft``          sft
=============================  ===============  ==========================================

(tfds names are ``rlhf_jax_preference_pairs`` etc.) Every record is ``{"json": bytes}``, the
normalised example as JSON (nested message lists do not map well onto fixed tfds features);
`rlhf_jax.data.tokenize.make_collate` decodes and tokenises it. One split, ``"train"``.
The parse stats (rows, ok, skipped, skipped_by_reason, errors) of the build are stored in
the dataset's metadata (``builder.info.metadata["parse_stats"]``, `parse_stats`), so rows
skipped with ``on_error="skip"`` stay visible after the build.

Typical use::

    builder = build_dataset("pair", ["hh.jsonl"], source_format="hh_rlhf", data_dir=d)
    source = builder.as_data_source(split="train")        # or tfds.data_source(...)
    it = BatchIterator.from_dataset(source, batch_size=64, seed=0,
                                    collate=make_collate("pair", tok, max_len=512))

Each host builds (or reads a shared copy of) the same dataset and `BatchIterator` takes its
slice of every global batch; ``it.get_state()`` goes into the checkpoint.
Note: tfds orders records by a hash of their key (``FILE:LINE``), not by file order.

**Stale builds.** tfds keys a build by name and version only, so `build_dataset` also stores a
fingerprint of what it was built from (`source_fingerprint`: the sha256 of the source files'
bytes, their paths, the source format, the kind and ``on_error``) in
``builder.info.metadata["fingerprint"]``. A later call whose sources differ (other files, an
edited file, another format) finds the stored build stale, logs one warning and rebuilds it
in place; a call with the same sources reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence

import tensorflow_datasets as tfds

from rlhf_jax.data.formats import KIND_OF_FORMAT, EmptyDataError, merge_stats, new_stats, read_examples

__all__ = [
    "BUILDERS",
    "PreferencePairs",
    "Prompts",
    "PromptsWithAnswers",
    "RankedLists",
    "SftConversations",
    "UnpairedExamples",
    "build_dataset",
    "parse_stats",
    "source_fingerprint",
]

_log = logging.getLogger("rlhf_jax")


def source_fingerprint(paths, *, source_format: str, kind: str, on_error: str = "raise",
                       version: str = "") -> str:
  """The hex sha256 identifying a build's inputs: each path (as given, as records name it), the
  sha256 of its bytes, and the ``source_format``, ``kind``, ``on_error`` and builder ``version``.

  Two builds have the same fingerprint exactly when they would hold the same records.
  """
  paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths or [])
  h = hashlib.sha256(json.dumps({"format": source_format, "kind": kind, "on_error": on_error,
                                 "version": str(version)}, sort_keys=True).encode())
  for p in paths:
    content = hashlib.sha256()
    with open(os.fspath(p), "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        content.update(chunk)
    h.update(json.dumps([os.fspath(p), content.hexdigest()]).encode())
  return h.hexdigest()


class _LocalFileBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base: ``paths`` of one ``source_format`` -> records ``{"json": normalised example}``."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  KIND: str = ""

  # No downloads, so no checksums file. (Also sidesteps tfds 4.9.x looking the module's
  # path up through `importlib_resources`, which it does not declare as a dependency.)
  @tfds.core.utils.classproperty
  @classmethod
  def _checksums_path(cls):
    return None

  def __init__(self, *, paths: Sequence[str] | str | None = None, source_format: str | None = None,
               on_error: str = "raise", data_dir: str | None = None, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    self._paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths or [])
    self._source_format = source_format
    self._on_error = on_error
    if source_format is not None and KIND_OF_FORMAT.get(source_format) != self.KIND:
      ok = sorted(f for f, k in KIND_OF_FORMAT.items() if k == self.KIND)
      raise ValueError(f"{type(self).__name__} builds {self.KIND!r} examples from {ok}; got {source_format!r}.")
    super().__init__(data_dir=data_dir, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"rlhf_jax {self.KIND} examples from local files (normalised JSON records).",
        features=tfds.features.FeaturesDict({"json": tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if not self._paths or self._source_format is None:
      raise ValueError(f"{type(self).__name__}: pass `paths` and `source_format` to build the dataset.")
    return {"train": self._generate_examples()}

  def fingerprint(self) -> str:
    """`source_fingerprint` of this builder's ``paths``, format, kind, ``on_error`` and version."""
    return source_fingerprint(self._paths, source_format=self._source_format, kind=self.KIND,
                              on_error=self._on_error, version=str(self.VERSION))

  def _generate_examples(self):
    stats, seen = new_stats(), set()
    for path in self._paths:  # an empty file, or one whose rows are all bad, fails the build (EmptyDataError)
      file_stats = new_stats()
      for ex in read_examples(path, self._source_format, on_error=self._on_error, stats=file_stats, seen=seen):
        yield ex["source"], {"json": json.dumps(ex, ensure_ascii=False)}
      if not file_stats["ok"]:
        raise EmptyDataError(os.fspath(path), rows=file_stats["rows"], skipped=file_stats["skipped"],
                             reasons=file_stats["skipped_by_reason"],
                             first=(file_stats["errors"] or [None])[0])
      merge_stats(stats, file_stats)
    self.info.metadata["parse_stats"] = stats
    self.info.metadata["source_format"] = self._source_format
    self.info.metadata["paths"] = [os.fspath(p) for p in self._paths]
    self.info.metadata["fingerprint"] = self.fingerprint()


class PreferencePairs(_LocalFileBuilder):
  """``pair`` examples (hh_rlhf, preference, ultrafeedback_pairs)."""
  name = "rlhf_jax_preference_pairs"
  KIND = "pair"


class RankedLists(_LocalFileBuilder):
  """``ranked`` examples (ultrafeedback)."""
  name = "rlhf_jax_ranked_lists"
  KIND = "ranked"


class UnpairedExamples(_LocalFileBuilder):
  """``unpaired`` examples (kto)."""
  name = "rlhf_jax_unpaired_examples"
  KIND = "unpaired"


class PromptsWithAnswers(_LocalFileBuilder):
  """``prompt_answer`` examples (gsm8k)."""
  name = "rlhf_jax_prompts_with_answers"
  KIND = "prompt_answer"


class Prompts(_LocalFileBuilder):
  """``prompt`` examples (a prompt and its extra columns, for online RL)."""
  name = "rlhf_jax_prompts"
  KIND = "prompt"


class SftConversations(_LocalFileBuilder):
  """``sft`` examples (sft)."""
  name = "rlhf_jax_sft_conversations"
  KIND = "sft"


BUILDERS = {b.KIND: b for b in (PreferencePairs, RankedLists, UnpairedExamples, PromptsWithAnswers, Prompts,
                                 SftConversations)}


def build_dataset(kind: str | None, paths, *, source_format: str, data_dir: str,
                  on_error: str = "raise") -> _LocalFileBuilder:
  """Builds (once; later calls with the same sources reuse the files) the ArrayRecord dataset of
  ``paths`` under ``data_dir``.

  Args:
    kind: the example kind (a key of `BUILDERS`); ``None`` for the kind of ``source_format``.
    paths: one or several local ``.jsonl``/``.parquet`` files.
    source_format: one of `rlhf_jax.data.formats.FORMATS`.
    data_dir: where tfds writes ``<name>/1.0.0/*.array_record-*``. A build found there is
      reused only if its stored fingerprint (`source_fingerprint`) matches these sources;
      otherwise it is stale and rebuilt in place (one warning). Use one directory per source
      dataset, or each call with the other sources rebuilds it.
    on_error: ``"raise"`` or ``"skip"`` for bad rows (see `parse_stats`).

  Returns:
    The prepared builder: ``builder.as_data_source(split="train")``.

  Raises:
    rlhf_jax.data.formats.DataError: a bad row (``on_error="raise"``), an empty file or one
      whose rows are all bad (`rlhf_jax.data.formats.EmptyDataError`).
  """
  kind = KIND_OF_FORMAT[source_format] if kind is None else kind
  make = lambda: BUILDERS[kind](paths=paths, source_format=source_format, on_error=on_error, data_dir=data_dir)
  builder = make()
  if builder.is_prepared():
    stored = (builder.info.metadata or {}).get("fingerprint")
    wanted = builder.fingerprint()
    if stored != wanted:
      _log.warning("%s: the tfds build there is stale (built from %s as %r, fingerprint %s); rebuilding it from "
                   "%s as %r (fingerprint %s)", builder.data_dir, (builder.info.metadata or {}).get("paths"),
                   (builder.info.metadata or {}).get("source_format"), (stored or "none")[:12],
                   [os.fspath(p) for p in builder._paths], source_format, wanted[:12])
      shutil.rmtree(builder.data_dir)
      builder = make()
  builder.download_and_prepare()
  return builder


def parse_stats(builder_or_dir) -> dict:
  """The parse stats saved at build time (from a builder or a ``<name>/<version>`` directory)."""
  if isinstance(builder_or_dir, (str, os.PathLike)):
    builder_or_dir = tfds.builder_from_directory(os.fspath(builder_or_dir))
  return dict(builder_or_dir.info.metadata.get("parse_stats", {}))
