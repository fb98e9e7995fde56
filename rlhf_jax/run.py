"""Runs an experiment file: ``python -m rlhf_jax.run experiments/<name>.py[:arg] [--config.x.y=v ...] [--workdir DIR]``.

An experiment is a Python file with ``get_config(arg=None) -> ml_collections.ConfigDict``
and ``main(config, workdir)``. Overrides are type-checked against the config:
an unknown key or a value of the wrong type is an error naming the key and the
valid choices.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import sys
from typing import Any, Sequence

import ml_collections

USAGE = "usage: python -m rlhf_jax.run EXPERIMENT.py[:ARG] [--config.KEY=VALUE ...] [--workdir DIR]"


from rlhf_jax.errors import ConfigError, UserError  # noqa: E402,F401  (re-exported)


def load_experiment(spec: str):
  """Imports ``path.py[:arg]``; returns ``(module, arg)``."""
  path, _, arg = spec.partition(":")
  if not path.endswith(".py") or not os.path.exists(path):
    raise ConfigError(f"experiment file {path!r} not found ({USAGE})")
  name = "rlhf_jax_experiment_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[name] = module
  module_spec.loader.exec_module(module)
  for attr in ("get_config", "main"):
    if not hasattr(module, attr):
      raise ConfigError(f"experiment {path} must define {attr}()")
  return module, (arg or None)


def _parse_value(key: str, raw: str, current: Any) -> Any:
  def fail(expected):
    raise ConfigError(f"--config.{key}={raw!r}: expected {expected}, got a value of another type")

  if isinstance(current, bool):
    low = raw.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    fail("a bool (true/false)")
  if isinstance(current, int):
    try:
      return int(raw)
    except ValueError:
      fail("an int")
  if isinstance(current, float):
    try:
      return float(raw)
    except ValueError:
      fail("a float")
  if isinstance(current, str):
    return raw
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      fail("a tuple or list literal, e.g. (1,2)")
    if not isinstance(value, (tuple, list)):
      fail("a tuple or list literal, e.g. (1,2)")
    return type(current)(value)
  if current is None:
    try:
      return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      return raw
  raise ConfigError(f"--config.{key}: cannot override a value of type {type(current).__name__}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]) -> ml_collections.ConfigDict:
  """Sets ``a.b.c=value`` pairs, checking keys and types."""
  for key, raw in overrides:
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
      where = ".".join(parts[:i]) or "<top level>"
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f"unknown config key {key!r}: {part!r} is not under {where}; valid keys there: {valid}")
      if i < len(parts) - 1:
        node = node[part]
    last = parts[-1]
    value = _parse_value(key, raw, node[last])
    with node.unlocked() if hasattr(node, "unlocked") else _null():
      node[last] = value
  return config


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def parse_args(argv: Sequence[str]) -> tuple[str, list[tuple[str, str]], str | None]:
  if not argv or argv[0].startswith("-"):
    raise ConfigError(USAGE)
  spec, overrides, workdir = argv[0], [], None
  rest = list(argv[1:])
  while rest:
    a = rest.pop(0)
    if a.startswith("--workdir"):
      workdir = a.split("=", 1)[1] if "=" in a else (rest.pop(0) if rest else None)
      if not workdir:
        raise ConfigError("--workdir needs a directory")
    elif a.startswith("--config."):
      body = a[len("--config."):]
      if "=" in body:
        k, v = body.split("=", 1)
      elif rest:
        k, v = body, rest.pop(0)
      else:
        raise ConfigError(f"{a} needs a value")
      overrides.append((k, v))
    else:
      raise ConfigError(f"unknown argument {a!r} ({USAGE})")
  return spec, overrides, workdir


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  for noisy in ("absl", "orbax", "jax._src"):  # Orbax logs every save phase at INFO
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    spec, overrides, workdir = parse_args(argv)
    from rlhf_jax.parallel import initialize

    initialize()  # multi-host start-up; a no-op for one process
    module, arg = load_experiment(spec)
    config = module.get_config(arg)
    apply_overrides(config, overrides)
    config.lock()
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if workdir is None:
    base = os.path.splitext(os.path.basename(spec.partition(":")[0]))[0]
    workdir = os.path.join("runs", base)
  os.makedirs(workdir, exist_ok=True)
  result = module.main(config, workdir)
  if getattr(result, "preempted", False):
    return 143
  return 0


if __name__ == "__main__":
  sys.exit(main())
