"""The host loop of iterative algorithms: generate an iteration's data, train on it, repeat.

Online and iterative DPO, SPIN, DNO, INPO, Nash-MD, rejection-sampling
fine-tuning (RAFT, ReST, SuperHF, ...) share one shape: each iteration samples
from the current policy, judges the samples and turns them into a dataset (pairs,
kept completions), then takes optimizer steps on it. What differs is a
``make_data`` function and a step; this module is the loop around them
(:func:`run_iterations`), algorithm-free like :func:`rlhf_jax.train.loop.train_loop`:

* an iteration's data is written to ``<workdir>/iterations/`` before training on it
  (:class:`IterationStore`), so a run interrupted mid-iteration resumes on the same
  data (the policy that sampled it no longer exists) and reproduces an
  uninterrupted run;
* checkpoints hold the train state and the position ``{"iteration", "step_in_iteration"}``;
  they are saved every ``checkpoint_every`` steps, at the end of every iteration
  and on SIGTERM / SIGINT;
* ``begin_iteration(state, it)`` runs once at the start of each iteration (before
  sampling): a reference reset (iterative DPO, SPIN, DNO) lives there;
* metrics: the steps' to ``metrics.jsonl`` (global step), the iteration's
  (``make_data``'s: rewards, pair counts, win rates) with the prefix ``iteration/``
  at the iteration's first step, the samples to ``samples/iteration_<i>.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import jax
import numpy as np

from rlhf_jax.train.loop import (LoopResult, NonFiniteError, _any_process, _StopFlag, progress_bar, resume_message,
                                 resume_run)
from rlhf_jax.train.writers import MetricWriter, plot_curves

log = logging.getLogger("rlhf_jax")


class IterationData(NamedTuple):
  """What ``make_data`` returns for one iteration.

  Attributes:
    arrays: host arrays with one leading row dimension (the training rows).
    metrics: scalar metrics of the iteration (logged as ``iteration/<name>``).
    samples: optional JSON-able rows (decoded prompts, completions, scores) written
      to ``samples/iteration_<i>.jsonl`` by the main process.
  """

  arrays: dict[str, np.ndarray]
  metrics: dict[str, float]
  samples: list[dict] | None = None


class IterationStore:
  """One iteration's generated rows on disk, written atomically (``os.replace``).

  Files are ``<directory>/iteration_<i>.p<process>.npz`` (each process keeps its
  own rows) with the iteration's metrics as JSON beside them.
  """

  def __init__(self, directory: str):
    self.directory = directory

  def _path(self, iteration: int, suffix: str) -> str:
    return os.path.join(self.directory, f"iteration_{iteration:06d}.p{jax.process_index()}{suffix}")

  def save(self, iteration: int, data: IterationData) -> None:
    os.makedirs(self.directory, exist_ok=True)
    path = self._path(iteration, ".npz")
    tmp = path + ".tmp.npz"
    np.savez(tmp, **{k: np.asarray(v) for k, v in data.arrays.items()})
    with open(self._path(iteration, ".json.tmp"), "w") as f:
      json.dump({"metrics": {k: float(v) for k, v in data.metrics.items()}}, f)
    os.replace(self._path(iteration, ".json.tmp"), self._path(iteration, ".json"))
    os.replace(tmp, path)  # the npz last: its presence means the iteration is complete

  def load(self, iteration: int) -> IterationData | None:
    path = self._path(iteration, ".npz")
    if not os.path.exists(path):
      return None
    with np.load(path) as z:
      arrays = {k: z[k] for k in z.files}
    metrics = {}
    if os.path.exists(self._path(iteration, ".json")):
      with open(self._path(iteration, ".json")) as f:
        metrics = json.load(f).get("metrics", {})
    return IterationData(arrays, metrics)


def num_rows(arrays: Mapping[str, np.ndarray]) -> int:
  """The rows of an iteration's arrays (all share the leading dimension)."""
  sizes = {k: np.shape(v)[0] for k, v in arrays.items()}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"iteration arrays disagree on the number of rows: {sizes}")
  return next(iter(sizes.values()), 0)


def steps_for(rows: int, *, batch_size: int, epochs: float = 1.0) -> int:
  """Optimizer steps an iteration of ``rows`` takes: ``ceil(epochs · rows / batch_size)`` (0 without rows)."""
  return 0 if rows == 0 else max(1, math.ceil(epochs * rows / batch_size))


def iteration_batches(arrays: Mapping[str, np.ndarray], *, batch_size: int, num_steps: int, seed: int,
                      iteration: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """``num_steps`` batches of ``batch_size`` rows from fresh shuffles, starting at batch ``start``.

  The row order is a stream of permutations seeded by ``(seed, iteration)``, so every
  row is used once per epoch; a batch that runs past a permutation takes the rest
  from the next one (fixed shapes: one compilation whatever the row count).
  """
  n = num_rows(arrays)
  if n == 0 or num_steps <= start:  # an iteration without rows takes no step
    return
  rng = np.random.default_rng([seed, iteration])
  need = num_steps * batch_size
  order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
  for s in range(start, num_steps):
    idx = order[s * batch_size:(s + 1) * batch_size]
    yield {k: np.asarray(v)[idx] for k, v in arrays.items()}


def _global_steps(rows: int, *, batch_size: int, epochs: float) -> int:
  """Steps of an iteration, the same on every process: sized by the process with the most rows (the others
  cycle through theirs, ``iteration_batches``), none when any process has no row (it could not fill a batch)."""
  if jax.process_count() == 1:
    return steps_for(rows, batch_size=batch_size, epochs=epochs)
  from jax.experimental import multihost_utils

  counts = np.asarray(multihost_utils.process_allgather(np.array([rows], np.int64))).reshape(-1)
  if counts.min() == 0:
    return 0
  return steps_for(int(counts.max()), batch_size=batch_size, epochs=epochs)


def _write_samples(path: str, samples: list[dict]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for row in samples:
      f.write(json.dumps(row, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x)) + "\n")
  os.replace(tmp, path)


def run_iterations(
    *,
    state: Any,
    step_fn: Callable,
    make_data: Callable[[Any, int], IterationData],
    num_iterations: int,
    batch_size: int,
    workdir: str,
    epochs: float = 1.0,
    seed: int = 0,
    put_batch: Callable[[Mapping[str, np.ndarray]], Any] = lambda b: b,
    begin_iteration: Callable[[Any, int], Any] | None = None,
    checkpointer=None,
    state_shardings: Any = None,
    checkpoint_every: int = 0,
    eval_fn: Callable[[Any], Mapping[str, Any]] | None = None,
    eval_every: int = 1,
    max_nonfinite_streak: int = 10,
    progress: bool = True,
    run_config: Mapping | None = None,
    plot_keys: tuple[str, ...] = ("loss", "iteration/reward_mean", "eval/win_rate"),
    desc: str = "iterations",
) -> LoopResult:
  """Runs ``num_iterations`` of: ``begin_iteration`` → ``make_data`` → steps on its rows.

  Args:
    state: the initial train state (replaced by the newest checkpoint when one exists).
    step_fn: ``step(state, batch) -> (state, metrics)`` (``make_train_step``).
    make_data: ``make_data(state, iteration) -> IterationData``; must be deterministic
      in ``(state, iteration)`` (seed its sampler with the iteration), so that a run
      killed while generating regenerates the same rows.
    num_iterations: iterations to reach (total, not additional).
    batch_size: rows per step (host-local rows per process under multi-host).
    workdir: metrics, samples, iteration data and curves go here.
    epochs: passes over each iteration's rows (``steps_for``).
    seed: seeds the row order of each iteration (``iteration_batches``).
    put_batch: moves a host batch onto devices (e.g. ``parallel.host_local_to_global``).
    begin_iteration: ``begin_iteration(state, iteration) -> state``, once per iteration
      before sampling (reference resets); ``None`` for none.
    checkpointer: a :class:`rlhf_jax.checkpoint.Checkpointer`; restored from on start.
    state_shardings: the shardings to restore into (defaults to ``state``'s).
    checkpoint_every: also save every this many steps inside an iteration (0: only at
      the end of iterations and on a signal).
    eval_fn: ``eval_fn(state) -> metrics`` every ``eval_every`` iterations and after the
      last, written with the prefix ``eval/``.
    max_nonfinite_streak: consecutive skipped (non-finite) updates that stop the run
      with :class:`rlhf_jax.train.loop.NonFiniteError`.
    progress: a progress bar over steps.
    run_config: the run's config, saved as ``<workdir>/run_config.json`` and compared on
      a resume (:func:`rlhf_jax.train.loop.record_run_config`).

  Returns:
    a :class:`rlhf_jax.train.loop.LoopResult` (steps in ``start_step`` / ``end_step``;
    ``preempted`` and ``signum`` after SIGTERM / SIGINT, which end the loop after the
    current step with a checkpoint).
  """
  main = jax.process_index() == 0
  store = IterationStore(os.path.join(workdir, "iterations"))
  state, pos, resume_step = resume_run(workdir=workdir, checkpointer=checkpointer, state=state,
                                       state_shardings=state_shardings, run_config=run_config)
  it0, s0 = int((pos or {}).get("iteration", 0)), int((pos or {}).get("step_in_iteration", 0))
  start_step = int(jax.device_get(state.step))
  if resume_step is not None and main:
    msg = resume_message(it0, num_iterations, checkpointer.directory, unit="iteration")
    print(msg if s0 == 0 else f"{msg}, at step {s0} of the iteration", flush=True)
  writer = MetricWriter(workdir, enabled=main, resume_step=start_step if resume_step is not None else None)
  bar = progress_bar(progress, total=num_iterations, initial=it0, desc=desc)

  def save(position, force=False):
    step = int(jax.device_get(state.step))
    if checkpointer is not None and checkpointer.latest_step() != step:  # an iteration without rows saves nothing
      checkpointer.save(step, state, position, force=force)

  last: dict[str, float] = {}
  eval_metrics: dict[str, float] = {}
  preempted, signum = False, None
  it, s = it0, s0
  with _StopFlag() as stop:
    while it < num_iterations:
      t0 = time.perf_counter()
      data = store.load(it)
      fresh = data is None
      if fresh:
        if s != 0:
          raise FileNotFoundError(
              f"resuming iteration {it} at step {s} needs its rows in {store.directory}, which are missing")
        if begin_iteration is not None:
          state = begin_iteration(state, it)
        data = make_data(state, it)
        store.save(it, data)
        if main and data.samples:
          _write_samples(os.path.join(workdir, "samples", f"iteration_{it:06d}.jsonl"), data.samples)
      elif s == 0 and begin_iteration is not None:
        state = begin_iteration(state, it)  # a run killed after saving the rows, before its first step
      t_data = time.perf_counter() - t0
      rows = num_rows(data.arrays)
      num_steps = _global_steps(rows, batch_size=batch_size, epochs=epochs)
      step_metrics = []
      if s == 0:
        it_metrics = dict(data.metrics, rows=float(rows), steps=float(num_steps), seconds=t_data)
        last.update(writer.write(int(jax.device_get(state.step)) + 1, it_metrics, prefix="iteration/"))
      if rows == 0 and main:
        log.warning("iteration %d produced no training rows; no update", it)
      t1 = time.perf_counter()
      for batch in iteration_batches(data.arrays, batch_size=batch_size, num_steps=num_steps, seed=seed,
                                     iteration=it, start=s):
        state, metrics = step_fn(state, put_batch(batch))
        s += 1
        host = jax.device_get(metrics)
        step = int(jax.device_get(state.step))
        streak = int(np.asarray(host.get("nonfinite_streak", 0)))
        if streak >= max_nonfinite_streak:
          raise NonFiniteError(f"iteration {it}, step {step}: {streak} consecutive updates skipped as non-finite "
                               f"(limit max_nonfinite_streak={max_nonfinite_streak})")
        step_metrics.append(host)
        last.update(writer.write(step, host))
        if s < num_steps and checkpoint_every and step % checkpoint_every == 0:
          save({"iteration": it, "step_in_iteration": s})
        if s < num_steps and _any_process(stop.signum is not None):
          preempted = True
          break
      if preempted:
        save({"iteration": it, "step_in_iteration": s}, force=True)
        break
      if step_metrics:
        t_train = time.perf_counter() - t1
        last.update(writer.write(int(jax.device_get(state.step)),
                                 {"steps_per_sec": len(step_metrics) / max(t_train, 1e-9)}, prefix="iteration/"))
      it, s = it + 1, 0
      if eval_fn is not None and (it % max(eval_every, 1) == 0 or it == num_iterations):
        eval_metrics = writer.write(int(jax.device_get(state.step)), eval_fn(state), prefix="eval/")
        last.update(eval_metrics)
      save({"iteration": it, "step_in_iteration": 0}, force=True)
      if bar is not None:
        bar.update(1)
        bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in last.items()
                         if k in ("loss", "iteration/reward_mean", "eval/win_rate")})
      if it < num_iterations and _any_process(stop.signum is not None):
        preempted = True
        break
    signum = int(stop.signum) if preempted and stop.signum is not None else None
  if checkpointer is not None:
    checkpointer.wait()
  if bar is not None:
    bar.close()
  writer.close()
  if main:
    if preempted:
      log.warning("stopped by signal at iteration %d, step %d of the iteration; checkpoint saved", it, s)
    plot_curves(writer.path, os.path.join(workdir, "curves.png"), keys=plot_keys)
  return LoopResult(state, last, eval_metrics, preempted, start_step, int(jax.device_get(state.step)),
                    signum=signum)
