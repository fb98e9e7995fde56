"""The thin host loop shared by every algorithm.

It iterates data, calls a jitted step, logs, evaluates, checkpoints and resumes.
It holds no algorithm logic: what a step does is the step factory's business.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from rlhf_jax.checkpoint import Checkpointer, abstract_like
from rlhf_jax.train.writers import MetricWriter, plot_curves

log = logging.getLogger("rlhf_jax")


class NonFiniteError(RuntimeError):
  """Raised after too many consecutive skipped updates (non-finite, or dropped by a step guard)."""


@dataclasses.dataclass
class LoopResult:
  state: Any
  last_metrics: dict[str, float]
  eval_metrics: dict[str, float]
  preempted: bool
  start_step: int
  end_step: int
  signum: int | None = None  # the signal that stopped a preempted run (SIGTERM, SIGINT), else None


class _StopFlag:
  """Turns SIGTERM/SIGINT into a flag checked between steps.

  Flags nest: an experiment wraps its stages in one (``with loop._StopFlag() as stop``)
  and each stage's loop enters its own. A signal received by an inner flag is also
  recorded by the outer ones (so the experiment sees it after the stage returns), and a
  flag entered while an outer one already holds a signal (one that arrived between
  stages, e.g. during an evaluation or a model build) starts with it set, so the next
  loop stops before its first step. Leaving a flag restores the handlers it replaced.

  ``signals``: the signals it turns into the flag (default SIGTERM and SIGINT); the
  runner's own outer flag takes SIGTERM only, so Ctrl-C outside a loop still interrupts.
  """

  _active: list["_StopFlag"] = []  # the entered flags, outermost first

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
    self.signum = None
    self.signals = tuple(signals)
    self._old = {}

  def __enter__(self):
    for outer in reversed(_StopFlag._active):
      if outer.signum is not None:
        self.signum = outer.signum
        break
    for s in self.signals:
      try:
        self._old[s] = signal.signal(s, self._handle)
      except ValueError:  # not the main thread
        pass
    _StopFlag._active.append(self)
    return self

  def _handle(self, signum, frame):
    self.signum = signum
    for outer in _StopFlag._active:
      outer.signum = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}
    if self in _StopFlag._active:
      _StopFlag._active.remove(self)
    return False


RUN_CONFIG_FILE = "run_config.json"

# A resumed run warns when a config key containing one of these changed since the checkpoint.
WATCHED_CONFIG_KEYS = ("num_steps", "num_epochs", "num_iterations", "optimizer.", "learning_rate", "schedule",
                       "warmup_steps", "batch_size")


# A resume refuses a changed key under one of these sections (they decide what the checkpoint
# means: the model's shapes and dtypes, the optimizer and its state, the data and its order),
# unless the config sets RESUME_OVERRIDE_KEY to "ok". Schedule keys (SCHEDULE_CONFIG_KEYS) and
# layout/speed keys (RESUME_FREE_CONFIG_KEYS) only warn or pass.
REFUSED_CONFIG_SECTIONS = ("model", "optimizer", "data")
SCHEDULE_CONFIG_KEYS = ("num_steps", "num_epochs", "num_iterations", "learning_rate", "schedule", "warmup_steps",
                        "end_value", "batch_size")
RESUME_FREE_CONFIG_KEYS = ("remat", "attention_impl", "logprob_chunk_size", "num_microbatches", "progress", "mesh")
RESUME_OVERRIDE_KEY = "resume_changed"


def flatten_config(config: Any) -> dict[str, Any]:
  """``{"a.b.c": value}`` for a nested dict or an ``ml_collections.ConfigDict`` (via ``to_dict()``)."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  out: dict[str, Any] = {}

  def walk(node, prefix):
    for k, v in node.items():
      key = f"{prefix}.{k}" if prefix else str(k)
      if hasattr(v, "to_dict"):
        v = v.to_dict()
      if isinstance(v, Mapping) and v:
        walk(v, key)
      else:
        out[key] = v

  walk(config, "")
  return out


def _show(v: Any) -> str:
  return repr(v) if isinstance(v, str) else str(v)


def config_drift(saved: Mapping, current: Mapping, watched: Sequence[str] = WATCHED_CONFIG_KEYS) -> list[str]:
  """The warning lines for watched keys whose value differs between two (nested) configs."""
  old, new = flatten_config(saved), flatten_config(current)
  lines = []
  for key in sorted(set(old) | set(new)):
    if not any(w in key for w in watched):
      continue
    a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
    if a != b:
      lines.append(f"config changed since the checkpoint: {key} {_show(a)} -> {_show(b)} "
                   "(the run resumes with the new value)")
  return lines


def refused_config_changes(saved: Mapping, current: Mapping,
                           sections: Sequence[str] = REFUSED_CONFIG_SECTIONS) -> list[str]:
  """``"key old -> new"`` for changed keys under ``sections`` (any level, e.g. ``model.param_dtype``,
  ``data.seed``, ``optimizer.b2``), but not schedule keys (`SCHEDULE_CONFIG_KEYS`, which
  `config_drift` warns about), layout/speed keys (`RESUME_FREE_CONFIG_KEYS`), nor keys present
  on one side only (added or removed by another version of the code, which keeps its default)."""
  old, new = flatten_config(saved), flatten_config(current)
  out = []
  for key in sorted(set(old) | set(new)):
    parts = key.split(".")
    if not any(p in sections for p in parts[:-1]) or key == RESUME_OVERRIDE_KEY:
      continue
    if any(w in key for w in SCHEDULE_CONFIG_KEYS) or any(p in RESUME_FREE_CONFIG_KEYS for p in parts):
      continue
    if key not in old or key not in new:  # a key added or removed by another code version: its default
      continue
    if old[key] != new[key]:
      out.append(f"{key} {_show(old[key])} -> {_show(new[key])}")
  return out


def _resume_override(current: Mapping) -> bool:
  return str(flatten_config(current).get(RESUME_OVERRIDE_KEY, "")).strip().lower() in ("ok", "true", "1", "yes")


def _saved_run_config(path: str) -> Mapping | None:
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    if jax.process_index() == 0:
      log.warning("cannot read %s (%s); not checking the config against the checkpoint", path, e)
    return None
  return saved if isinstance(saved, Mapping) else None


def record_run_config(workdir: str, run_config: Any, *, resumed: bool) -> list[str]:
  """Writes ``<workdir>/run_config.json``; on a resume first checks it against the saved one.

  ``run_config`` is the run's config (a dict or a ``ConfigDict``). On a resume the
  saved file (when there is one) is compared with it. A changed key under the
  ``model``, ``optimizer`` or ``data`` sections (`refused_config_changes`: e.g.
  ``model.param_dtype``, ``data.seed``, ``optimizer.b2``) refuses the resume with a
  `rlhf_jax.errors.ConfigError` naming the keys (on every process), unless the config
  has ``resume_changed="ok"`` (``--config.resume_changed=ok``). Each changed key of
  `WATCHED_CONFIG_KEYS` (step counts, optimizer, schedule, batch size), and each
  refused key let through by the override, is printed and logged as one warning
  line, then the file is rewritten with the new config. Process 0 writes; returns
  the warning lines.
  """
  if run_config is None:
    return []
  if hasattr(run_config, "to_dict"):
    run_config = run_config.to_dict()
  current = json.loads(json.dumps(run_config, default=str))  # tuples -> lists, as read back from the file
  path = os.path.join(workdir, RUN_CONFIG_FILE)
  saved = _saved_run_config(path) if resumed else None
  refused = refused_config_changes(saved, current) if saved is not None else []
  override = _resume_override(current)
  if refused and not override:
    from rlhf_jax.errors import ConfigError

    how = (f"pass --config.{RESUME_OVERRIDE_KEY}=ok to resume with the new values"
           if RESUME_OVERRIDE_KEY in flatten_config(current) else f"delete {path} to resume with the new values")
    raise ConfigError(
        f"cannot resume {workdir}: config changed since its checkpoint: {'; '.join(refused)} (model, optimizer "
        f"and data keys change what the checkpoint means); use a new workdir, restore the old values, or {how}")
  if jax.process_index() != 0:
    return []
  lines = config_drift(saved, current) if saved is not None else []
  warned = {line.split()[5] for line in lines}  # "config changed since the checkpoint: KEY ..."
  lines += [f"config changed since the checkpoint: {r} (the run resumes with the new value: "
            f"{RESUME_OVERRIDE_KEY}=ok)" for r in refused if r.split()[0] not in warned]
  for line in lines:
    print(line, flush=True)
    log.warning("%s", line)
  os.makedirs(workdir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(json.dumps(run_config, default=str, indent=1) + "\n")
  os.replace(tmp, path)
  return lines


def config_subset(config: Any, *keys: str) -> dict[str, Any]:
  """``{key: config[key]}`` (plain dicts) for the ``keys`` present: the part of an experiment's
  config one stage depends on, for its ``run_config`` (so an earlier stage is not warned about,
  or refused for, keys of a later one)."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return {k: config[k] for k in keys if k in config}


def resume_message(restored: int, total: int, directory: str, *, unit: str = "step") -> str:
  """``resumed from step N of M (dir)``, or ``already complete at step N (dir): nothing to train``."""
  if restored >= total:
    return f"already complete at {unit} {restored} ({directory}): nothing to train"
  return f"resumed from {unit} {restored} of {total} ({directory})"


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def default_token_count(batch: Mapping[str, np.ndarray]) -> int:
  """Real tokens of a host batch: every ``*attention_mask*`` summed (all sides of a pair batch)."""
  masks = [k for k in batch if "attention_mask" in k]
  if masks:
    return int(sum(np.asarray(batch[k]).sum() for k in masks))
  return int(sum(np.asarray(batch[k]).size for k in batch if "input_ids" in k))


def _data_metrics(data_stats) -> dict[str, float]:
  from rlhf_jax.data.formats import stats_metrics

  if data_stats is None:
    return {}
  if callable(data_stats):
    data_stats = data_stats()
  if isinstance(data_stats, Mapping):
    data_stats = [data_stats]
  return stats_metrics(*data_stats)


def _scalar(host: Mapping, key: str) -> float | None:
  v = host.get(key)
  if v is None or np.size(v) != 1:
    return None
  return float(np.asarray(v, np.float64).reshape(()))


def _guard_reason(host: Mapping) -> str | None:
  """Why a step guard (`rlhf_jax.train.step.make_train_step`) dropped this step's update, or None."""
  if (_scalar(host, "skipped_param_norm") or 0.0) > 0:
    norm = _scalar(host, "proposed_param_norm")
    return ("the update would take the parameter norm" + (f" to {norm:.4g}" if norm is not None else "")
            + " (above max_param_norm)")
  if (_scalar(host, "skipped_loss_spike") or 0.0) > 0:
    loss, mean = _scalar(host, "loss"), _scalar(host, "loss_ema")
    return (f"the loss {loss:.4g} is a spike over the running mean {mean:.4g} (loss_spike_factor)"
            if loss is not None and mean is not None else "the loss is a spike (loss_spike_factor)")
  return None


def _first_logged_loss(path: str) -> tuple[int, float] | None:
  """``(step, loss)`` of the first row of a metrics file with a finite ``loss``, or None."""
  try:
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:  # a torn line
          continue
        v = row.get("loss") if isinstance(row, dict) else None
        if isinstance(v, (int, float)) and np.isfinite(v):
          return int(row.get("step", 0)), float(v)
  except OSError:
    pass
  return None


def _warn_loss_growth(step: int, host: Mapping, growth: dict, factor: float) -> None:
  """Logs one line the first time the loss exceeds ``factor`` × the run's first loss."""
  loss = _scalar(host, "loss")
  if loss is None or not np.isfinite(loss) or (_scalar(host, "update_skipped") or 0.0) > 0:
    return
  if growth["first"] is None:
    growth["first"] = (step, loss)
    return
  first_step, first = growth["first"]
  if first > 0 and loss > factor * first:
    growth["warned"] = True
    log.warning("step %d: the loss %.4g is %.0fx the run's first loss %.4g (step %d): training is diverging; "
                "lower optimizer.learning_rate (max_param_norm / loss_spike_factor skip such updates)",
                step, loss, loss / first, first, first_step)


def resume_run(*, workdir: str, checkpointer, state, state_shardings, run_config=None):
  """The start every host loop shares: ``(state, data_state, resume_step)``.

  The run's config is recorded (a changed model/optimizer/data key refuses the resume, see
  `record_run_config`) before anything is restored; then the newest intact checkpoint is
  restored (a damaged newest one falls back to an older intact one, `Checkpointer.restore`; a
  checkpoint of an older `TrainState` restores with the later fields at 0,
  `rlhf_jax.train.state.restore_compatible`). Without a checkpoint the state is returned as
  given with ``data_state = None`` and ``resume_step = None``; ``resume_step`` is the step
  actually restored (after any fallback).
  """
  from rlhf_jax.train.state import restore_compatible

  resuming = checkpointer is not None and checkpointer.latest_step() is not None
  record_run_config(workdir, run_config, resumed=resuming)
  if not resuming:
    return state, None, None
  resume_step = checkpointer.latest_step()
  state, data_state = restore_compatible(checkpointer, abstract_like(state, state_shardings), resume_step, like=state)
  return state, data_state, getattr(checkpointer, "restored_step", None) or resume_step


def progress_bar(progress: bool, *, total: int, initial: int, desc: str):
  """A tqdm bar on process 0 when ``progress``, else None."""
  if not (progress and jax.process_index() == 0):
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, initial=initial, dynamic_ncols=True, desc=desc)


def train_loop(
    *,
    step_fn: Callable,
    state: Any,
    batches: Iterator,
    num_steps: int,
    workdir: str,
    put_batch: Callable[[Mapping[str, np.ndarray]], Any] = lambda b: b,
    checkpointer: Checkpointer | None = None,
    state_shardings: Any = None,
    checkpoint_every: int = 0,
    eval_fn: Callable[[Any], Mapping[str, Any]] | None = None,
    eval_every: int = 0,
    log_every: int = 1,
    max_nonfinite_streak: int = 10,
    count_tokens: Callable[[Mapping[str, np.ndarray]], int] = default_token_count,
    progress: bool = True,
    plot_keys: tuple[str, ...] = ("loss", "eval/loss", "grad_norm", "learning_rate"),
    data_stats: Mapping | Sequence[Mapping] | Callable[[], Mapping] | None = None,
    run_config: Mapping | None = None,
    loss_growth_warning: float = 10.0,
    batch_key: str = "batch_size",
) -> LoopResult:
  """Runs ``step_fn`` until ``state.step == num_steps``, resuming from the newest checkpoint.

  Args:
    step_fn: ``step(state, batch) -> (state, metrics)``.
    state: the initial train state (replaced by the checkpoint when one exists).
    batches: an iterator of host batches with ``get_state()`` / ``set_state()``.
    num_steps: the step count to reach (total, not additional).
    workdir: metrics, TensorBoard events and the curves PNG go here.
    put_batch: moves a host batch onto devices (e.g. sharded ``device_put``).
    checkpointer: saves every ``checkpoint_every`` steps, at the end and on
      SIGTERM/SIGINT; on start the newest checkpoint is restored.
    state_shardings: the shardings to restore into (defaults to ``state``'s).
    eval_fn: ``eval_fn(state) -> metrics``, every ``eval_every`` steps and at the end.
    max_nonfinite_streak: after this many consecutive skipped updates (the
      step's ``nonfinite_streak``: non-finite ones, and those dropped by the step's
      ``max_param_norm`` / ``loss_spike_factor`` guards) the run stops with
      :class:`NonFiniteError`, whose message names the reason.
    data_stats: the data pipeline's counters (parse stats with skipped rows by
      reason, truncation stats; a dict, a list of dicts, or a function returning
      a dict), read at each logged step and written as ``data/...`` metrics
      (`rlhf_jax.data.stats_metrics`), so rows skipped or truncated by the
      pipeline are in the run's metrics. Live dicts that grow as batches are made
      are fine: the current counts are written.
    run_config: the run's config (a dict or a ``ConfigDict``), saved as
      ``<workdir>/run_config.json``; on a resume, changed step counts, optimizer,
      schedule or batch size keys are warned about, and changed model, optimizer or
      data keys refuse the resume unless ``resume_changed="ok"`` (`record_run_config`).
    loss_growth_warning: one warning line (logged once per run) when a step's loss
      exceeds this factor times the run's first loss (its first step's; after a
      resume, the first loss in ``metrics.jsonl``), e.g. a learning rate far too
      high; 0 disables it. It only warns: the step's guards are what drop updates.
    batch_key: the config key of the training batch size, named by the error
      raised when a batch does not split over the mesh's data-parallel devices
      (`rlhf_jax.parallel.check_batch_divisible`), before the first step.

  On a resume it prints ``resumed from step N of M (<checkpoint dir>)``, or
  ``already complete at step N (<checkpoint dir>): nothing to train`` when the
  checkpoint is at ``num_steps`` or beyond. A damaged newest checkpoint falls back
  to an older intact one (`Checkpointer.restore`). ``<workdir>/metrics.jsonl``
  keeps one row per step: rows beyond the step the run starts from (a restart from
  scratch, steps after the checkpoint) are dropped, and a checkpointed step's row is
  written before its save.

  A run stopped by SIGTERM/SIGINT returns ``preempted=True`` and the signal in
  ``signum``, after a checkpoint; a signal already received by an enclosing
  `_StopFlag` (an experiment's, between its stages) stops it before its first step.
  A multi-stage experiment returns the first preempted stage's result.
  """
  main = jax.process_index() == 0
  state, data_state, resume_step = resume_run(workdir=workdir, checkpointer=checkpointer, state=state,
                                              state_shardings=state_shardings, run_config=run_config)
  if data_state and hasattr(batches, "set_state"):
    batches.set_state(data_state)
  start = int(jax.device_get(state.step))
  if resume_step is not None and main:
    log.info("resumed from step %d in %s", resume_step, checkpointer.directory)
    print(resume_message(start, num_steps, checkpointer.directory), flush=True)
  # Rows beyond the state's step (a run killed before its next checkpoint, a restart from
  # scratch, an abandoned lineage) are dropped, so the file reads as one run.
  writer = MetricWriter(workdir, enabled=main, resume_step=start)

  def save(step, force=False):
    if checkpointer is None:
      return
    data_state = batches.get_state() if hasattr(batches, "get_state") else {}
    checkpointer.save(step, state, data_state, force=force)

  bar = progress_bar(progress, total=num_steps, initial=start, desc="train")

  last: dict[str, float] = {}
  eval_metrics: dict[str, float] = {}
  pending = None  # (step, metrics on device, tokens, time): fetched one step late.
  window_tokens, window_start = 0, time.perf_counter()
  preempted = False
  growth = {"first": _first_logged_loss(writer.path) if start and main else None, "warned": False}

  def flush(pend):
    nonlocal last, window_tokens, window_start
    step, metrics, tokens = pend
    host = jax.device_get(metrics)
    window_tokens += tokens
    bad = [k for k, v in host.items() if np.size(v) == 1 and not np.isfinite(np.asarray(v, np.float64)).all()]
    streak = int(np.asarray(host.get("nonfinite_streak", 0)))
    guard = _guard_reason(host)
    if streak >= max_nonfinite_streak:
      if guard and not bad:
        raise NonFiniteError(
            f"step {step}: {streak} consecutive updates skipped, the last because {guard} "
            f"(limit max_nonfinite_streak={max_nonfinite_streak}); lower optimizer.learning_rate, or loosen the guard")
      raise NonFiniteError(
          f"step {step}: {streak} consecutive updates skipped as non-finite "
          f"(limit max_nonfinite_streak={max_nonfinite_streak}); non-finite metrics at this step: "
          f"{bad or ['(gradients)']}"
      )
    if bad and main:
      log.warning("step %d: non-finite %s; update skipped", step, bad)
    elif guard and main:
      log.warning("step %d: update skipped: %s", step, guard)
    if loss_growth_warning and main and not growth["warned"]:
      _warn_loss_growth(step, host, growth, loss_growth_warning)
    if step % log_every == 0 or step == num_steps:
      elapsed = max(time.perf_counter() - window_start, 1e-9)
      host["tokens_per_sec"] = window_tokens / elapsed
      host.update(_data_metrics(data_stats))
      window_tokens, window_start = 0, time.perf_counter()
      last = writer.write(step, host)
      if bar is not None:
        bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}", tok_s=f"{host['tokens_per_sec']:.0f}")

  with _StopFlag() as stop:
    step = start
    while step < num_steps:
      # Checked before each step: a signal that arrived before the loop started (between
      # the stages of an experiment, see `_StopFlag`) stops it before its first step.
      if _any_process(stop.signum is not None):
        preempted = True
        break
      host_batch = next(batches)
      tokens = count_tokens(host_batch)
      device_batch = put_batch(host_batch)
      if step == start:  # a batch replicated on every data-parallel device is an error, not a slow run
        from rlhf_jax.parallel import check_batch_divisible

        check_batch_divisible(device_batch, key=batch_key)
      state, metrics = step_fn(state, device_batch)
      step += 1
      if pending is not None:
        flush(pending)
      pending = (step, metrics, tokens)
      if bar is not None:
        bar.update(1)
      if eval_fn is not None and eval_every and step % eval_every == 0 and step < num_steps:
        eval_metrics = writer.write(step, eval_fn(state), prefix="eval/")
      if checkpoint_every and step % checkpoint_every == 0:
        if pending is not None:  # the metrics row of a checkpointed step is written before its save
          flush(pending)
          pending = None
        save(step)
    if pending is not None:
      flush(pending)

  if eval_fn is not None and not preempted and step > start:
    eval_metrics = writer.write(step, eval_fn(state), prefix="eval/")
  if checkpointer is not None:
    if step > start and checkpointer.latest_step() != step:
      save(step, force=True)
    checkpointer.wait()
  if bar is not None:
    bar.close()
  writer.close()
  if main:
    if preempted:
      saved = "" if checkpointer is None else ("; checkpoint saved" if step > start else
                                               "; no step taken since the last checkpoint, nothing saved")
      log.warning("stopped by signal at step %d%s", step, saved)
    plot_curves(writer.path, os.path.join(workdir, "curves.png"), keys=plot_keys)
  return LoopResult(state, last, eval_metrics, preempted, start, step,
                    signum=int(stop.signum) if preempted and stop.signum is not None else None)
