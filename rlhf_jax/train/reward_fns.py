"""User reward functions for online RL, named in a config as TRL's ``reward_funcs`` are.

``load_reward_fns(specs, weights)`` turns ``("my_rewards.py:correct", "rlhf_jax.rewards:format_reward")``
into one host function ``score(completions, prompts, fields) -> (rewards_B, per_fn_B, failures)``.
Each spec is ``FILE.py:NAME`` or ``package.module:NAME``. Two calling conventions:

* **batched** (TRL's): the first parameter is named ``completions``:
  ``fn(completions: list[str], prompts: list[str], **row_fields) -> list[float]``; every
  extra column of the prompt file arrives as a keyword list (one entry per completion), and
  ``prompt_messages`` holds each prompt's message list. Keywords the function does not take
  are not passed (unless it has ``**kwargs``).
* **per row**: anything else is called once per completion,
  ``fn(completion: str, **row_fields) -> float`` (e.g. ``rlhf_jax.rewards:math_reward``,
  ``fn(completion, reference)``); a ``reference`` parameter receives the row's ``answer``
  column when the row has no ``reference`` column.

Bad output never stops a run: an exception, ``None``, a non-number, a non-finite value, or a
batched function returning the wrong number of values gives that row ``default`` and is
counted (``failures[name]``), as :func:`rlhf_jax.rewards.batched_reward_fn` does.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from rlhf_jax.errors import ConfigError

log = logging.getLogger("rlhf_jax")


def load_function(spec: str, *, key: str = "reward.fns") -> Callable:
  """The function named by ``FILE.py:NAME`` or ``module:NAME``; a ConfigError naming ``key`` otherwise."""
  target, sep, name = str(spec).rpartition(":")
  if not sep or not target or not name:
    raise ConfigError(f"config.{key}: {spec!r} is not 'FILE.py:NAME' or 'package.module:NAME'")
  if target.endswith(".py"):
    if not os.path.isfile(target):
      raise ConfigError(f"config.{key}: {target!r} (in {spec!r}) does not exist")
    mod_name = "rlhf_jax_user_" + os.path.splitext(os.path.basename(target))[0].replace("-", "_")
    module_spec = importlib.util.spec_from_file_location(mod_name, target)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
      module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 — a user's file that does not import is a config problem
      raise ConfigError(f"config.{key}: importing {target!r} failed: {type(e).__name__}: {e}") from None
  else:
    try:
      module = importlib.import_module(target)
    except ImportError as e:
      raise ConfigError(f"config.{key}: cannot import {target!r} (in {spec!r}): {e}") from None
  fn = getattr(module, name, None)
  if not callable(fn):
    raise ConfigError(f"config.{key}: {target!r} has no function {name!r}")
  return fn


def _params(fn):
  try:
    ps = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):
    return [], True
  return ps, any(p.kind == p.VAR_KEYWORD for p in ps)


def _is_batched(fn) -> bool:
  ps, _ = _params(fn)
  return bool(ps) and ps[0].name == "completions"


class RewardFunction:
  """One user reward with its calling convention resolved; ``__call__`` never raises on bad output."""

  def __init__(self, fn: Callable, *, name: str, default: float = 0.0):
    self.fn, self.name, self.default = fn, name, float(default)
    self.batched = _is_batched(fn)
    ps, self.var_kw = _params(fn)
    self.accepted = {p.name for p in ps if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    skip = 1  # the completion(s)
    self.required = {p.name for p in ps[skip:] if p.default is p.empty
                     and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    self.failures = 0
    self.calls = 0

  def check_fields(self, available: set[str]) -> None:
    """ConfigError when a required parameter has no column (``reference`` falls back to ``answer``)."""
    have = set(available) | {"prompts", "prompt", "prompt_messages"}
    if "answer" in have:
      have.add("reference")
    missing = sorted(self.required - have)
    if missing:
      raise ConfigError(f"config.reward.fns: {self.name} needs {missing}, which the prompt data does not have "
                        f"(its columns: {sorted(available)})")

  def _kwargs(self, fields: dict[str, list]) -> dict[str, list]:
    kw = dict(fields)
    if "reference" not in kw and "answer" in kw:
      kw["reference"] = kw["answer"]
    if self.var_kw:
      return kw
    return {k: v for k, v in kw.items() if k in self.accepted}

  def __call__(self, completions: list[str], prompts: list[str], fields: dict[str, list]) -> tuple[np.ndarray, int]:
    b = len(completions)
    out = np.full((b,), self.default, np.float32)
    failed = 0
    self.calls += 1
    fields = {"prompts": prompts, "prompt": prompts, **fields}
    if self.batched:
      kw = self._kwargs(fields)
      try:
        values = list(self.fn(list(completions), **kw))
      except Exception as e:  # noqa: BLE001 — a user's reward must not kill the run
        log.warning("reward %s raised %s: %s; %d rows get %s", self.name, type(e).__name__, e, b, self.default)
        self.failures += b
        return out, b
      if len(values) != b:
        log.warning("reward %s returned %d values for %d completions; all get %s", self.name, len(values), b,
                    self.default)
        self.failures += b
        return out, b
    else:
      values = []
      for i, c in enumerate(completions):
        row = self._kwargs({k: v[i] for k, v in fields.items()})
        row.pop("prompts", None)
        try:
          values.append(self.fn(c, **row))
        except Exception as e:  # noqa: BLE001
          values.append(e)
    for i, v in enumerate(values):
      try:
        x = float(v) if v is not None and not isinstance(v, (Exception, bool, str)) else float("nan")
      except (TypeError, ValueError):
        x = float("nan")
      if math.isfinite(x):
        out[i] = x
      else:
        failed += 1
    self.failures += failed
    return out, failed


class RewardSum:
  """``score(completions, prompts, fields) -> (rewards_B, {name: values_B}, {name: failed})``: the weighted sum."""

  def __init__(self, fns: Sequence[RewardFunction], weights: Sequence[float]):
    self.fns, self.weights = list(fns), [float(w) for w in weights]

  def __call__(self, completions, prompts, fields):
    total = np.zeros((len(completions),), np.float32)
    parts, failures = {}, {}
    for fn, w in zip(self.fns, self.weights):
      values, failed = fn(completions, prompts, fields)
      parts[fn.name], failures[fn.name] = values, failed
      total += w * values
    return total, parts, failures


def load_reward_fns(specs: Sequence[str], weights: Sequence[Any] = (), *, default: float = 0.0) -> RewardSum:
  """The weighted sum of the reward functions ``specs`` (weights default to 1 each)."""
  specs = [s for s in specs if s]
  weights = [float(w) for w in weights] or [1.0] * len(specs)
  if len(weights) != len(specs):
    raise ConfigError(f"config.reward.weights has {len(weights)} weights for {len(specs)} reward functions")
  fns = []
  for spec in specs:
    name = str(spec).rpartition(":")[2]
    fns.append(RewardFunction(load_function(spec), name=name, default=default))
  return RewardSum(fns, weights)
