"""Orbax checkpoints: async, keep-N, atomic; restore onto any mesh.

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
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def abstract_like(tree, shardings=None):
  """``jax.ShapeDtypeStruct`` leaves for ``tree`` (with ``shardings`` when given)."""
  if shardings is None:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
  """A thin wrapper over ``orbax.checkpoint.CheckpointManager``.

  Args:
    directory: where step folders are written (created if missing).
    max_to_keep: keep the newest N checkpoints (``None`` keeps all).
    async_save: write in a background thread while training continues.
    unsaved_extras: keys of ``state.extras`` that are never written (weights
      that do not change during training and are re-loaded from their source);
      by default the LoRA frozen base, ``"frozen_params"``.
  """

  def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True,
               unsaved_extras: tuple[str, ...] = ("frozen_params",)):
    self.directory = os.path.abspath(directory)
    self.unsaved_extras = tuple(unsaved_extras)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def _split_unsaved(self, state: Any) -> tuple[Any, dict]:
    """``(state without the unsaved extras, {key: the unsaved subtree})``."""
    extras = getattr(state, "extras", None)
    if not isinstance(extras, dict) or not any(k in extras for k in self.unsaved_extras):
      return state, {}
    kept = {k: v for k, v in extras.items() if k not in self.unsaved_extras}
    return state._replace(extras=kept), {k: v for k, v in extras.items() if k in self.unsaved_extras}

  def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False) -> bool:
    """Starts saving ``state`` (and the data position) as ``step``; returns whether it saves.

    ``state.extras`` entries named in ``unsaved_extras`` are left out.
    """
    state, _ = self._split_unsaved(state)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
    )
    return self._manager.save(int(step), args=args, force=force)

  def restore(self, abstract_state: Any, step: int | None = None, *, like: Any = None) -> tuple[Any, dict]:
    """Restores ``(state, data_state)`` into ``abstract_state``'s structure and shardings.

    The unsaved extras (e.g. a LoRA frozen base) are taken from ``like``, a
    concrete state built as for a fresh run (with the base loaded); they are
    required when ``abstract_state`` has them.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract_state, wanted = self._split_unsaved(abstract_state)
    unsaved = {}
    if wanted:
      unsaved = self._split_unsaved(like)[1] if like is not None else {}
      if set(unsaved) != set(wanted):
        raise ValueError(
            f"Checkpointer.restore: state.extras {sorted(wanted)} are not saved in checkpoints (frozen "
            "weights are re-loaded from their source): pass like=<the freshly built state>, which holds them")
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

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
