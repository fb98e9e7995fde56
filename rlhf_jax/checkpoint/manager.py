"""Orbax checkpoints: async, keep-N, atomic, checksummed; restore onto any mesh.

A checkpoint holds two items: ``state`` (the train state pytree: params,
optimizer state, step, rng, non-finite counters, and any extra pytrees an
algorithm adds, e.g. controller states) and ``data`` (the data iterator's
position, JSON). Restoring takes an abstract target whose leaves carry the
*new* shardings, so a run saved on one mesh resumes on another.

Frozen weights are not saved: they are re-loaded from where they came from. A
LoRA state (``create_train_state(trainable=...)``) keeps its frozen base in
``state.extras["frozen_params"]``; checkpoints hold only the adapters, their
optimizer state and the rest (megabytes instead of the whole model), and
:meth:`Checkpointer.restore` takes the base from ``like``, the freshly built state.

Reliability (see :class:`Checkpointer`):

* **integrity**: once a save is on disk, ``<step>/rlhf_integrity.json`` records the
  SHA-256 of every file of the step and whether the step is *healthy*; a restore
  checks it, so flipped bytes, truncated or deleted files are found before they are
  loaded;
* **fallback**: resuming from a damaged newest step falls back to the newest intact
  one, with a one-line warning naming the damage (the damaged step is moved aside to
  ``<step>.damaged``, out of Orbax's sight, so the resumed run saves again);
* **no poisoned rotation**: a step saved while ``state.nonfinite_streak > 0`` (updates
  being skipped as non-finite) is not healthy; keep-N never deletes the newest
  healthy step, and a resume prefers it to newer unhealthy ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax.errors import UserError

log = logging.getLogger("rlhf_jax")

INTEGRITY_FILE = "rlhf_integrity.json"  # inside each step folder; Orbax ignores it
DAMAGED_SUFFIX = ".damaged"  # a damaged step moved aside on fallback
NONFINITE_SUFFIX = ".nonfinite"  # a newer unhealthy step moved aside when an older healthy one is resumed


class CheckpointDamagedError(UserError):
  """No intact checkpoint to restore (each candidate is named with its damage)."""


def abstract_like(tree, shardings=None):
  """``jax.ShapeDtypeStruct`` leaves for ``tree`` (with ``shardings`` when given)."""
  if shardings is None:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _scalar(x) -> int:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:  # multi-host: a replicated scalar
    x = x.addressable_shards[0].data
  return int(np.asarray(jax.device_get(x)))


def nonfinite_streak(state: Any) -> int:
  """``state.nonfinite_streak`` (``state["nonfinite_streak"]`` for a dict) as an int; 0 when absent."""
  v = state.get("nonfinite_streak") if isinstance(state, dict) else getattr(state, "nonfinite_streak", None)
  return 0 if v is None else _scalar(v)


def file_digests(step_dir: str) -> dict[str, str]:
  """``{relative path: sha256 hex}`` of every file under ``step_dir`` but the integrity record."""
  out = {}
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel == INTEGRITY_FILE or rel.endswith(".tmp"):
        continue
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          h.update(chunk)
      out[rel] = h.hexdigest()
  return dict(sorted(out.items()))


def _first_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


class Checkpointer:
  """A thin wrapper over ``orbax.checkpoint.CheckpointManager``.

  Args:
    directory: where step folders are written (created if missing).
    max_to_keep: keep the newest N checkpoints (``None`` keeps all), and in any
      case the newest *healthy* one (saved with ``state.nonfinite_streak == 0``):
      a run whose last saves were taken while updates were being skipped as
      non-finite can still go back to the state before.
    async_save: write in a background thread while training continues.
    unsaved_extras: keys of ``state.extras`` that are never written (weights
      that do not change during training and are re-loaded from their source);
      by default the LoRA frozen base, ``"frozen_params"``.
    checksums: after each save is on disk, write ``<step>/rlhf_integrity.json``
      with the SHA-256 of its files (in the background with ``async_save``) and
      check them on restore. The health record is written either way.
    prefer_healthy: on a resume (see :meth:`restore`) skip newer steps saved
      during a non-finite streak when an older healthy one exists.

  After :meth:`restore`, ``restored_step`` is the step actually restored and
  ``warnings`` the lines warned about (damaged or unhealthy steps skipped).
  """

  def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True,
               unsaved_extras: tuple[str, ...] = ("frozen_params",), checksums: bool = True,
               prefer_healthy: bool = True):
    self.directory = os.path.abspath(directory)
    self.unsaved_extras = tuple(unsaved_extras)
    self.max_to_keep = max_to_keep
    self.async_save = async_save
    self.checksums = checksums
    self.prefer_healthy = prefer_healthy
    self.restored_step: int | None = None
    self.warnings: list[str] = []
    self._health: dict[int, dict] = {}  # step -> {"healthy", "nonfinite_streak"} of this process's saves
    self._finalizer: threading.Thread | None = None
    self._finalizer_error: BaseException | None = None
    # Orbax keeps everything; `_rotate` applies keep-N itself so the newest healthy step survives.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  # --- health and integrity records ---------------------------------------------------------

  def _record(self, step: int) -> dict | None:
    """The step's integrity record, ``None`` when it has none, ``{"unreadable": msg}`` when broken."""
    path = os.path.join(self.step_dir(step), INTEGRITY_FILE)
    if not os.path.exists(path):
      return None
    try:
      with open(path) as f:
        rec = json.load(f)
      if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
      return rec
    except (OSError, ValueError) as e:
      return {"unreadable": _first_line(e)}

  def is_healthy(self, step: int) -> bool | None:
    """Whether ``step`` was saved outside a non-finite streak; ``None`` when unknown (no record)."""
    if step in self._health:
      return self._health[step]["healthy"]
    rec = self._record(step)
    if rec is None or "healthy" not in rec:
      return None
    return bool(rec["healthy"])

  def verify(self, step: int) -> str | None:
    """``None`` when ``step``'s files match its integrity record (or it has none), else the damage."""
    d = self.step_dir(step)
    if not os.path.isdir(d):
      return "step folder missing"
    rec = self._record(step)
    if rec is None:
      return None
    if "unreadable" in rec:
      return f"unreadable {INTEGRITY_FILE} ({rec['unreadable']})"
    files = rec.get("files")
    if not isinstance(files, dict):
      return None  # a health-only record (checksums=False)
    for rel, digest in files.items():
      path = os.path.join(d, rel)
      if not os.path.isfile(path):
        return f"missing file {rel}"
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          h.update(chunk)
      if h.hexdigest() != digest:
        return f"checksum mismatch in {rel}"
    return None

  def _finalize(self, step: int, health: dict) -> None:
    """After a save is on disk: write its integrity record, then apply keep-N."""
    self._manager.wait_until_finished()
    if step not in self._manager.all_steps():
      return
    if jax.process_index() == 0:
      d = self.step_dir(step)
      rec = {"format": 1, "step": int(step), **health}
      try:
        if self.checksums:
          rec["algorithm"], rec["files"] = "sha256", file_digests(d)
        tmp = os.path.join(d, INTEGRITY_FILE + ".tmp")
        with open(tmp, "w") as f:
          json.dump(rec, f, indent=0)
        os.replace(tmp, os.path.join(d, INTEGRITY_FILE))
      except OSError as e:
        log.warning("checkpoint step %d in %s: cannot write %s (%s)", step, self.directory, INTEGRITY_FILE,
                    _first_line(e))
    self._rotate()

  def _run_finalizer(self, step: int, health: dict) -> None:
    try:
      self._finalize(step, health)
    except BaseException as e:  # re-raised in the caller's thread by `_join`
      self._finalizer_error = e

  def _join(self) -> None:
    t, self._finalizer = self._finalizer, None
    if t is not None:
      t.join()
    err, self._finalizer_error = self._finalizer_error, None
    if err is not None:
      raise err

  def protected_steps(self) -> set[int]:
    """The steps keep-N leaves: the newest ``max_to_keep`` and the newest healthy one."""
    steps = sorted(self._manager.all_steps())
    if self.max_to_keep is None:
      return set(steps)
    keep = set(steps[-self.max_to_keep:]) if self.max_to_keep > 0 else set()
    healthy = [s for s in steps if self.is_healthy(s) is not False]  # unknown counts as healthy
    if healthy:
      keep.add(healthy[-1])
    return keep

  def _rotate(self) -> None:
    if self.max_to_keep is None:
      return
    keep = self.protected_steps()
    for s in sorted(self._manager.all_steps()):
      if s not in keep:
        self._manager.delete(s)
        self._health.pop(s, None)

  # --- the API ---------------------------------------------------------------------------------

  def _split_unsaved(self, state: Any) -> tuple[Any, dict]:
    """``(state without the unsaved extras, {key: the unsaved subtree})``."""
    extras = getattr(state, "extras", None)
    if not isinstance(extras, dict) or not any(k in extras for k in self.unsaved_extras):
      return state, {}
    kept = {k: v for k, v in extras.items() if k not in self.unsaved_extras}
    return state._replace(extras=kept), {k: v for k, v in extras.items() if k in self.unsaved_extras}

  def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False) -> bool:
    """Starts saving ``state`` (and the data position) as ``step``; returns whether it saves.

    ``state.extras`` entries named in ``unsaved_extras`` are left out. The step's
    health (``state.nonfinite_streak == 0``) and, with ``checksums``, its file
    digests are recorded once it is on disk; then old steps are rotated out.
    """
    if not force and not self._manager.should_save(int(step)):
      return False
    streak = nonfinite_streak(state)
    health = {"healthy": streak == 0, "nonfinite_streak": streak}
    state, _ = self._split_unsaved(state)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
    )
    self._join()  # the previous save's record and rotation are done before the next save starts
    saved = self._manager.save(int(step), args=args, force=force)
    if saved:
      self._health[int(step)] = health
      if self.async_save:
        self._finalizer = threading.Thread(target=self._run_finalizer, args=(int(step), health),
                                           name=f"rlhf_jax-checkpoint-{int(step)}", daemon=True)
        self._finalizer.start()
      else:
        self._finalize(int(step), health)
    return saved

  def _restore_step(self, step: int, abstract_state: Any, unsaved: dict) -> tuple[Any, dict]:
    out = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
        ),
    )
    state = out["state"]
    if unsaved:
      state = state._replace(extras={**state.extras, **unsaved})
    return state, dict(out["data"] or {})

  def _warn(self, line: str) -> None:
    self.warnings.append(line)
    if jax.process_index() == 0:
      log.warning("%s", line)

  def _move_aside(self, step: int, suffix: str) -> str:
    """Renames ``<step>`` to ``<step><suffix>`` (``<step><suffix>.N`` if taken); returns the new name."""
    name = f"{step}{suffix}"
    n = 1
    while os.path.exists(os.path.join(self.directory, name)):
      name, n = f"{step}{suffix}.{n}", n + 1
    if jax.process_index() == 0:
      os.rename(self.step_dir(step), os.path.join(self.directory, name))
    return name

  def restore(self, abstract_state: Any, step: int | None = None, *, like: Any = None,
              fallback: bool | None = None) -> tuple[Any, dict]:
    """Restores ``(state, data_state)`` into ``abstract_state``'s structure and shardings.

    The unsaved extras (e.g. a LoRA frozen base) are taken from ``like``, a
    concrete state built as for a fresh run (with the base loaded); they are
    required when ``abstract_state`` has them.

    Each candidate step is checked against its integrity record first. On a
    resume (``step`` None or the latest step, or ``fallback=True``) a damaged step
    (a checksum mismatch, a missing file, a failing Orbax restore) is skipped with
    a one-line warning naming the damage, and the newest intact one is restored;
    with ``prefer_healthy`` newer steps saved during a non-finite streak are
    skipped too when an older healthy one exists. Skipped steps newer than the one
    restored are moved aside (``<step>.damaged`` / ``<step>.nonfinite``) so the run
    saves its next steps again. An explicit older ``step`` (or ``fallback=False``)
    restores exactly that step or raises. `CheckpointDamagedError` when no
    candidate is intact.
    """
    self._join()
    latest = self.latest_step()
    step = latest if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    auto = (step == latest) if fallback is None else bool(fallback)
    if not auto and step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory} (steps: {self.all_steps()})")
    abstract_state, wanted = self._split_unsaved(abstract_state)
    unsaved = {}
    if wanted:
      unsaved = self._split_unsaved(like)[1] if like is not None else {}
      if set(unsaved) != set(wanted):
        raise ValueError(
            f"Checkpointer.restore: state.extras {sorted(wanted)} are not saved in checkpoints (frozen "
            "weights are re-loaded from their source): pass like=<the freshly built state>, which holds them")
    candidates = sorted((s for s in self.all_steps() if s <= step), reverse=True) if auto else [step]
    damaged: list[tuple[int, str]] = []
    unhealthy: list[tuple[int, int]] = []  # (step, streak): intact but saved during a non-finite streak
    chosen = None
    for s in candidates:
      damage = self.verify(s)
      if damage is None and self.prefer_healthy and auto and self.is_healthy(s) is False:
        rec = self._health.get(s) or self._record(s) or {}
        unhealthy.append((s, int(rec.get("nonfinite_streak", 0))))
        continue
      if damage is None:
        try:
          state, data = self._restore_step(s, abstract_state, unsaved)
        except Exception as e:  # noqa: BLE001 - any failure to read a step is damage to report
          damage = f"restore failed: {_first_line(e)}"
      if damage is not None:
        damaged.append((s, damage))
        if not auto:
          raise CheckpointDamagedError(f"checkpoint {self.step_dir(s)} is damaged ({damage})")
        continue
      streak = nonfinite_streak(state)
      if self.prefer_healthy and auto and streak > 0 and s != candidates[-1]:
        unhealthy.append((s, streak))
        del state, data
        continue
      chosen = s
      break
    if chosen is None and unhealthy:  # no healthy step left: the newest intact one, streak and all
      chosen = unhealthy.pop(0)[0]
      state, data = self._restore_step(chosen, abstract_state, unsaved)
      self._warn(f"checkpoint {self.step_dir(chosen)} was saved during a non-finite streak and no healthy one "
                 "is left: resuming from it")
    if chosen is None:
      listed = "; ".join(f"step {s}: {d}" for s, d in damaged) or "no steps"
      raise CheckpointDamagedError(f"no intact checkpoint in {self.directory} ({listed})")
    moved = False
    for s, d in damaged:
      where = ""
      if s > chosen:
        try:
          where = f"; moved aside to {self._move_aside(s, DAMAGED_SUFFIX)}"
          moved = True
        except OSError as e:
          where = f"; could not move it aside: {_first_line(e)}"
      self._warn(f"checkpoint {self.step_dir(s)} is damaged ({d}): falling back to step {chosen}{where}")
    for s, streak in unhealthy:
      if s > chosen:
        try:
          where = f"; moved aside to {self._move_aside(s, NONFINITE_SUFFIX)}"
          moved = True
        except OSError as e:
          where = f"; could not move it aside: {_first_line(e)}"
        self._warn(f"checkpoint {self.step_dir(s)} was saved during a non-finite streak ({streak} updates "
                   f"skipped): resuming from step {chosen}, the newest healthy one{where}")
    if moved:
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("rlhf_jax_checkpoint_move_aside")
      self._manager.reload()
    self.restored_step = chosen
    return state, data

  def wait(self) -> None:
    """Blocks until pending async saves are on disk (with their integrity records)."""
    self._manager.wait_until_finished()
    self._join()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    """``with Checkpointer(...) as ck:`` waits for pending saves and closes, on any exit."""
    self.close()

  def close(self) -> None:
    try:
      self._manager.wait_until_finished()
      self._join()
    finally:
      self._manager.close()
