"""Optimizers and learning-rate schedules from a config."""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import jax
import optax

from rlhf_jax.errors import ConfigError

SCHEDULES = ("constant", "cosine", "linear")


def _is_number(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def make_schedule(
    *, learning_rate: float, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
    end_value_ratio: float = 0.0, prefix: str = "optimizer",
) -> optax.Schedule:
  """Linear warm-up then ``constant``, ``cosine`` or ``linear`` decay.

  Raises `rlhf_jax.errors.ConfigError` (a ``ValueError``), one line naming
  ``<prefix>.<key>``, for a learning rate that is not a positive finite number, a
  negative ``warmup_steps`` or ``end_value_ratio``, a negative ``total_steps``
  (``num_steps``) or an unknown ``schedule``.
  """
  if not _is_number(learning_rate) or not (math.isfinite(float(learning_rate)) and float(learning_rate) > 0):
    raise ConfigError(f"{prefix}.learning_rate={learning_rate!r} must be a positive number")
  if not _is_number(warmup_steps) or warmup_steps < 0:
    raise ConfigError(f"{prefix}.warmup_steps={warmup_steps!r} must be >= 0")
  if not _is_number(total_steps) or total_steps < 0:
    raise ConfigError(f"num_steps={total_steps!r} (the schedule's total steps) must be >= 0")
  if not _is_number(end_value_ratio) or not end_value_ratio >= 0:
    raise ConfigError(f"{prefix}.end_value_ratio={end_value_ratio!r} must be >= 0")
  if schedule not in SCHEDULES:
    raise ValueError(f"{prefix}.schedule={schedule!r}; valid choices: {SCHEDULES}")
  decay_steps = max(total_steps - warmup_steps, 1)
  end = learning_rate * end_value_ratio
  if schedule == "constant":
    main = optax.constant_schedule(learning_rate)
  elif schedule == "cosine":
    main = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_value_ratio)
  else:
    main = optax.linear_schedule(learning_rate, end, decay_steps)
  if warmup_steps <= 0:
    return main
  warm = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warm, main], [warmup_steps])


def _decay_mask(params):
  # Weight decay on matrices only, not on norms and biases.
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(config: Mapping[str, Any], *, total_steps: int,
                   prefix: str = "optimizer") -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (or Adafactor / SGD) with global-norm clipping and a schedule.

  Config keys: ``name`` ("adamw", "adafactor", "sgd"), ``learning_rate``,
  ``warmup_steps``, ``schedule``, ``end_value_ratio``, ``b1``, ``b2``, ``eps``,
  ``weight_decay``, ``max_grad_norm`` (0 or None disables clipping).

  ``prefix``: the config section these keys sit in, named by the errors
  (``optimizer.learning_rate=-0.001 must be a positive number``): a learning rate
  that is not positive, a negative ``warmup_steps``, ``end_value_ratio`` or
  ``max_grad_norm``, or a negative ``total_steps`` raise `rlhf_jax.errors.ConfigError`.
  """
  c = dict(config)
  if "learning_rate" not in c:
    raise ConfigError(f"{prefix}.learning_rate is missing")
  clip = c.get("max_grad_norm")
  if clip is not None and (not _is_number(clip) or not clip >= 0):
    raise ConfigError(f"{prefix}.max_grad_norm={clip!r} must be >= 0 (0 disables clipping)")
  sched = make_schedule(
      learning_rate=c["learning_rate"], total_steps=total_steps,
      warmup_steps=c.get("warmup_steps", 0), schedule=c.get("schedule", "cosine"),
      end_value_ratio=c.get("end_value_ratio", 0.0), prefix=prefix,
  )
  name = c.get("name", "adamw")
  if name == "adamw":
    tx = optax.adamw(
        sched, b1=c.get("b1", 0.9), b2=c.get("b2", 0.999), eps=c.get("eps", 1e-8),
        weight_decay=c.get("weight_decay", 0.0), mask=_decay_mask,
    )
  elif name == "adafactor":
    tx = optax.adafactor(sched)
  elif name == "sgd":
    tx = optax.sgd(sched, momentum=c.get("momentum") or None)
  else:
    raise ValueError(f"{prefix}.name={name!r}; valid choices: ('adamw', 'adafactor', 'sgd')")
  if c.get("max_grad_norm"):
    tx = optax.chain(optax.clip_by_global_norm(c["max_grad_norm"]), tx)
  return tx, sched
