"""Metric sinks of the host loop: console, JSONL, TensorBoard, and a PNG of the curves."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Mapping

import numpy as np


_BAD_TAG_CHARS = re.compile(r"_*(?:[^A-Za-z0-9_./-]+_*)+")  # with the underscores around them


def metric_name(key: str) -> str:
  """``key`` as a valid TensorBoard tag: characters outside ``[A-Za-z0-9_./-]`` become ``_``.

  A run of them (with underscores next to it) becomes one ``_``
  (``data/skipped_by_reason/empty completion`` ->
  ``data/skipped_by_reason/empty_completion``); a leading ``/`` is dropped. Valid
  names are unchanged.
  """
  name = _BAD_TAG_CHARS.sub("_", str(key)).lstrip("/")
  return name or "_"


def _scalars(metrics: Mapping) -> dict[str, float]:
  out = {}
  for k, v in metrics.items():
    a = np.asarray(v)
    if a.size == 1:
      out[k] = float(a.reshape(()))
  return out


class MetricWriter:
  """Writes scalar metrics to ``<workdir>/metrics.jsonl`` and TensorBoard events.

  Only the main process writes (``enabled=False`` on the others). Appending to
  an existing JSONL keeps the history of a resumed run in one file. With
  ``resume_step`` (the step the run continues from: a checkpoint's, or 0 for a
  run starting from scratch) lines of steps beyond it are dropped first, and so
  are earlier copies of a row written again for the same step (same step, same
  metric names: a file left duplicated by an older run keeps the newest copy),
  so the file reads as one uninterrupted run. ``resume_step=None`` appends as is.
  Metric names are made valid TensorBoard tags (`metric_name`), the same in both
  sinks.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None and os.path.exists(self.path):
      trim_jsonl(self.path, resume_step)
    self._file = open(self.path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping, *, prefix: str = "") -> dict[str, float]:
    """Writes the scalar entries of ``metrics`` (names prefixed, then `metric_name`d); returns them."""
    scalars = {metric_name(prefix + k): v for k, v in _scalars(metrics).items()}
    if not self.enabled:
      return scalars
    row = {"step": int(step), **{k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, int(step))
    return scalars

  def write_text(self, step: int, tag: str, text: str) -> None:
    """A TensorBoard text summary (e.g. sample completions) under ``tag`` (`metric_name`d)."""
    if not self.enabled or self._tb is None:
      return
    self._tb.add_text(metric_name(tag), str(text), int(step))
    self._tb.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def trim_jsonl(path: str, last_step: int) -> int:
  """Rewrites a metrics JSONL as one run up to ``last_step``; returns the rows dropped.

  Drops rows of steps beyond ``last_step`` and, of rows with the same step and the
  same metric names, all but the last copy. A torn last line (a run killed while
  writing it) is dropped too. Rewritten atomically.
  """
  rows, torn = [], 0
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except ValueError:
        torn += 1
        continue
      if isinstance(row, dict):
        rows.append(row)
  last = {}
  for i, r in enumerate(rows):
    last[(r.get("step", 0), tuple(sorted(r)))] = i
  kept = [r for i, r in enumerate(rows)
          if r.get("step", 0) <= last_step and last[(r.get("step", 0), tuple(sorted(r)))] == i]
  dropped = len(rows) - len(kept) + torn
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      for r in kept:
        f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
  return dropped


def read_jsonl(path: str) -> list[dict]:
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        rows.append(json.loads(line))
  return rows


def plot_curves(jsonl_path: str, png_path: str, keys: tuple[str, ...] = ("loss", "eval/loss", "grad_norm", "learning_rate")) -> str | None:
  """Saves a PNG with one panel per metric found among ``keys``."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_jsonl(jsonl_path) if os.path.exists(jsonl_path) else []
  present = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
  if not present:
    return None
  fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3), squeeze=False)
  for ax, k in zip(axes[0], present):
    pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
    ax.set_title(k)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
  return png_path


def make_headline(metric: str, before: float, after: float, *, higher_is_better: bool = True) -> dict:
  """The one figure that tells whether a run worked: ``metric`` on held-out data before and after training."""
  return {"metric": str(metric), "before": float(before), "after": float(after),
          "higher_is_better": bool(higher_is_better)}


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


_BOOKKEEPING = frozenset({"grads_finite", "loss_finite", "nonfinite_streak", "update_skipped", "weight",
                          "loss_tokens"})


def summary_lines(workdir: str, result: Mapping, *, train_metrics: Mapping | None = None,
                  eval_metrics: Mapping | None = None, paths: Mapping[str, str] | None = None,
                  max_metrics: int = 8) -> list[str]:
  """The short human summary printed at the end of a run (see `write_result`)."""
  h = result["headline"]
  arrow = "better" if (h["after"] > h["before"]) == h.get("higher_is_better", True) else "NOT better"
  if h["after"] == h["before"]:
    arrow = "unchanged"
  lines = [f"headline (held-out): {h['metric']} {_fmt(h['before'])} -> {_fmt(h['after'])} ({arrow})"]
  for name, metrics in (("final train", train_metrics), ("final eval", eval_metrics)):
    if metrics:
      items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and k not in _BOOKKEEPING and not k.startswith("data/")]
      items.sort(key=lambda kv: (kv[0] != "loss", 0))
      shown = ", ".join(f"{k} {_fmt(v)}" for k, v in items[:max_metrics])
      lines.append(f"{name}: {shown}" + (" ..." if len(items) > max_metrics else ""))
  files = {"result": os.path.join(workdir, "result.json")}
  for name in ("metrics.jsonl", "curves.png", "samples.jsonl"):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      files[name] = path
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    files["checkpoints"] = os.path.join(workdir, "checkpoints")
  files.update({k: v for k, v in (paths or {}).items() if v})
  lines += [f"  {k}: {v}" for k, v in files.items()]
  return lines


def write_result(workdir: str, result: Mapping, *, not_printed: tuple[str, ...] = (),
                 train_metrics: Mapping | None = None, eval_metrics: Mapping | None = None,
                 paths: Mapping[str, str] | None = None) -> None:
  """An experiment's summary: ``<workdir>/result.json``, one JSON line on stdout (without the
  ``not_printed`` keys, e.g. the full final metrics) and a short human summary, from process 0 only.

  ``result["headline"]`` is required: ``{"metric", "before", "after"}`` (`make_headline`), the
  held-out figure before and after training. The summary names the final train and eval
  metrics (``train_metrics``, ``eval_metrics``) and where the outputs are (``paths``, e.g.
  ``{"hf_export": dir}``, plus metrics.jsonl, curves.png and checkpoints when present).
  """
  import jax

  head = result.get("headline")
  if not isinstance(head, Mapping) or not {"metric", "before", "after"} <= set(head):
    raise ValueError("write_result: result['headline'] must be {'metric', 'before', 'after'} (make_headline)")
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, "result.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: v for k, v in result.items() if k not in not_printed}))
  print("\n".join(summary_lines(workdir, result, train_metrics=train_metrics, eval_metrics=eval_metrics,
                                paths=paths)), flush=True)
