"""Runs an experiment file: ``python -m rlhf_jax.run experiments/<name>.py[:arg] [--config.x.y=v ...] [--workdir DIR]``.

An experiment is a Python file with ``get_config(arg=None) -> ml_collections.ConfigDict``
and ``main(config, workdir)``. Overrides are type-checked against the config:
an unknown key or a value of the wrong type is an error naming the key and the
valid choices. A tuple or list key takes a bare value (``--config.data.train_files=a.jsonl``),
a comma-separated list (``--config.lora.targets=wq,wv``) or a Python literal.

``--help`` after the experiment file lists its config keys with their defaults
and meanings (from the experiment's optional ``CONFIG_HELP = {"dotted.key": "one line"}``).

Exit status: 0 done; 2 a user error (`rlhf_jax.errors.UserError`: a bad config
value, a missing or malformed data file, a ``--workdir`` that is a file or cannot
be written), printed as one ``error: ...`` line; 1 training stopped after
``max_nonfinite_streak`` consecutive skipped updates (non-finite, or dropped by the
``max_param_norm`` / ``loss_spike_factor`` guards: `rlhf_jax.train.loop.NonFiniteError`),
one ``error: training stopped: ...`` line; 143 stopped by SIGTERM and 130 by SIGINT
(Ctrl-C), after saving a checkpoint the next run resumes from.

A signal that arrives before training (while Python imports JAX and the
experiment, or while the config is read) stops the run at once with the same
status and one line, ``stopped by SIGTERM before training started ...``: nothing
has been written yet. Once the experiment's ``main`` runs, a SIGTERM (e.g. during
the model build) is held until the next train loop, which stops before its first
step, so no file is left half-written (one that arrives after the last loop, e.g.
during the final export, lets the run finish: exit 0).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import logging
import os
import signal
import sys
from typing import Any, Mapping, Sequence

PREEMPTED_EXIT = {signal.SIGTERM: 143, signal.SIGINT: 130}
"""The exit status of a run stopped by each signal (128 + the signal number, as a shell reports)."""


class Preempted(SystemExit):
  """Raised by the start-up signal handler: a ``SystemExit`` with status 143 (SIGTERM) or 130 (SIGINT),
  so a signal during the imports of ``python -m rlhf_jax.run`` exits with that status and no traceback."""

  def __init__(self, signum: int):
    super().__init__(PREEMPTED_EXIT.get(signum, 128 + int(signum)))
    self.signum = int(signum)


def _startup_signal(signum, frame):
  name = signal.Signals(signum).name
  # os.write: safe even if the signal interrupted another write to stderr.
  os.write(2, f"stopped by {name} before training started (exit {PREEMPTED_EXIT.get(signum, 128 + signum)}): "
              "no checkpoint was written; rerun the same command to start\n".encode())
  raise Preempted(signum)


def install_startup_handlers() -> dict:
  """Makes SIGTERM/SIGINT exit at once (`Preempted`) until a train loop takes them over; returns the
  handlers replaced (for `restore_handlers`). Outside the main thread it does nothing."""
  old = {}
  for s in PREEMPTED_EXIT:
    try:
      old[s] = signal.signal(s, _startup_signal)
    except ValueError:  # not the main thread
      pass
  return old


def restore_handlers(old: Mapping) -> None:
  for s, h in old.items():
    signal.signal(s, signal.SIG_DFL if h is None else h)  # None: a handler not installed from Python


if __name__ == "__main__":  # before the imports below (ml_collections, JAX through the experiment)
  install_startup_handlers()

import ml_collections  # noqa: E402

USAGE = "usage: python -m rlhf_jax.run EXPERIMENT.py[:ARG] [--config.KEY=VALUE ...] [--workdir DIR] [--help]"

HELP_FLAGS = ("-h", "--help")


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


def _flat_items(config: Any, prefix: str = "") -> list[tuple[str, Any]]:
  """``(dotted key, value)`` of every leaf, in the config's order; an empty section is a leaf."""
  if isinstance(config, ml_collections.ConfigDict):
    items = list(config.items())
  elif isinstance(config, Mapping):
    items = list(config.items())
  else:
    return [(prefix, config)]
  if not items and prefix:
    return [(prefix, config.to_dict() if hasattr(config, "to_dict") else dict(config))]
  out = []
  for k, v in items:
    key = f"{prefix}.{k}" if prefix else str(k)
    if isinstance(v, (ml_collections.ConfigDict, Mapping)):
      out += _flat_items(v, key)
    else:
      out.append((key, v))
  return out


def config_help_lines(config: ml_collections.ConfigDict, help: Mapping[str, str]) -> list[str]:
  """One line per config key: ``  dotted.key  default  meaning`` (meaning from ``help``, may be absent)."""
  items = [(k, repr(v)) for k, v in _flat_items(config)]
  if not items:
    return []
  kw = max(len(k) for k, _ in items)
  vw = min(max(len(v) for _, v in items), 28)
  lines = []
  for k, v in items:
    meaning = (help or {}).get(k, "")
    lines.append(f"  {k:<{kw}}  {v:<{vw}}  {meaning}".rstrip())
  return lines


def undocumented_keys(config: ml_collections.ConfigDict, help: Mapping[str, str]) -> list[str]:
  """The dotted config keys with no entry in ``help`` (an experiment's ``CONFIG_HELP``)."""
  return [k for k, _ in _flat_items(config) if k not in (help or {})]


def experiment_help(module, config: ml_collections.ConfigDict, spec: str) -> str:
  """The ``--help`` text: the docstring's first paragraph, the usage and every config key."""
  doc = inspect.cleandoc(module.__doc__ or "").split("\n\n")[0].strip()
  path = spec.partition(":")[0]
  parts = [doc] if doc else []
  parts.append(USAGE.replace("EXPERIMENT.py", path))
  keys = "\n".join(config_help_lines(config, getattr(module, "CONFIG_HELP", None) or {}))
  parts.append("config keys (--config.KEY=VALUE; key, default, meaning):\n" + keys)
  return "\n\n".join(parts)


_TUPLE_HINT = "a bare value, a comma-separated list (a,b) or a literal ('a', 'b')"


def _element_type(current: Sequence) -> type | None:
  """The one element type of a non-empty homogeneous default tuple (bool, int, float or str), else None."""
  kinds = {type(x) for x in current}
  if len(kinds) == 1 and next(iter(kinds)) in (bool, int, float, str):
    return next(iter(kinds))
  if kinds and kinds <= {int, float}:
    return float
  return None


def _parse_sequence(key: str, raw: str, current: Sequence) -> Sequence:
  elem = _element_type(current)
  what = f"a tuple or list{f' of {elem.__name__}' if elem else ''}: {_TUPLE_HINT}"

  def fail(got):
    raise ConfigError(f"--config.{key}={raw!r}: expected {what}; got a value of another type ({got})")

  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    value = tuple(p.strip() for p in raw.split(",") if p.strip())  # bare words: a,b or one path
  if isinstance(value, str):
    value = (value,)
  if not isinstance(value, (tuple, list)):
    fail(type(value).__name__)
  if elem is not None:
    out = []
    for x in value:
      if elem is float and isinstance(x, (int, float)) and not isinstance(x, bool):
        out.append(float(x))
      elif type(x) is elem:
        out.append(x)
      else:
        fail(f"{type(x).__name__} element {x!r}")
    value = out
  return type(current)(value)


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
    return _parse_sequence(key, raw, current)
  if current is None:
    try:
      return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      return raw
  raise ConfigError(f"--config.{key}: cannot override a value of type {type(current).__name__}")


FREE_FORM_SUFFIX = "_kwargs"
"""Sections whose name ends with this take any key (hyper-parameters of a named function)."""


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]) -> ml_collections.ConfigDict:
  """Sets ``a.b.c=value`` pairs, checking keys and types.

  A section named ``*_kwargs`` (e.g. ``loss_kwargs``) is free-form: a new key may be set
  there, its value read as a Python literal (``0.1``, ``True``, ``(1, 2)``) or else a string.
  """
  for key, raw in overrides:
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
      where = ".".join(parts[:i]) or "<top level>"
      if (i == len(parts) - 1 and isinstance(node, ml_collections.ConfigDict) and part not in node
          and where.endswith(FREE_FORM_SUFFIX)):
        break  # a free-form section (e.g. loss_kwargs): any key, its value parsed as a literal
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f"unknown config key {key!r}: {part!r} is not under {where}; valid keys there: {valid}")
      if i < len(parts) - 1:
        node = node[part]
    last = parts[-1]
    value = _parse_value(key, raw, node[last] if last in node else None)
    with node.unlocked() if hasattr(node, "unlocked") else _null():
      node[last] = value
  return config


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def _parse(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str]], str | None, bool]:
  """``(spec, overrides, workdir, help)``; ``spec`` is None for a bare ``--help``."""
  if argv and argv[0] in HELP_FLAGS:
    return None, [], None, True
  if not argv or argv[0].startswith("-"):
    raise ConfigError(USAGE)
  spec, overrides, workdir, want_help = argv[0], [], None, False
  rest = list(argv[1:])
  while rest:
    a = rest.pop(0)
    if a in HELP_FLAGS:
      want_help = True
    elif a.startswith("--workdir"):
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
  return spec, overrides, workdir, want_help


def parse_args(argv: Sequence[str]) -> tuple[str, list[tuple[str, str]], str | None]:
  """``(experiment spec, [(dotted key, raw value)], workdir or None)``; ``--help`` is ignored here."""
  spec, overrides, workdir, _ = _parse(argv)
  if spec is None:
    raise ConfigError(USAGE)
  return spec, overrides, workdir


def exit_status(result: Any) -> int:
  """0, or 130 / 143 when ``result.preempted`` (SIGINT / SIGTERM, from ``result.signum``)."""
  if not getattr(result, "preempted", False):
    return 0
  return 130 if getattr(result, "signum", None) == signal.SIGINT else 143


def check_workdir(workdir: str) -> None:
  """Creates ``workdir`` if needed and checks that files can be written there.

  Raises:
    ConfigError: one line, when ``workdir`` is a file, cannot be created (a parent
      is a file, no permission) or is not writable (read-only).
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir!r} is a file, not a directory; give a directory (created if missing)")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--workdir {workdir!r} cannot be created: {e.strerror or e}") from None
  probe = os.path.join(workdir, f".rlhf_jax_write_test.{os.getpid()}")
  try:
    try:
      with open(probe, "w") as f:
        f.write("ok")
    finally:
      if os.path.exists(probe):
        os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir {workdir!r} is not writable: {e.strerror or e}") from None


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (see the module docstring)."""
  argv = sys.argv[1:] if argv is None else argv
  startup = install_startup_handlers()
  try:
    return _main(argv, startup)
  except Preempted as e:  # a signal before training: the handler printed its line
    return int(e.code)
  finally:
    restore_handlers(startup)


def _main(argv: Sequence[str], startup: Mapping) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  for noisy in ("absl", "orbax", "jax._src"):  # Orbax logs every save phase at INFO
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    spec, overrides, workdir, want_help = _parse(argv)
    if spec is None:
      print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1].strip(), flush=True)
      return 0
    if not want_help:
      from rlhf_jax.parallel import initialize

      initialize()  # multi-host start-up; a no-op for one process
    module, arg = load_experiment(spec)
    config = module.get_config(arg)
    apply_overrides(config, overrides)
    if want_help:
      print(experiment_help(module, config, spec), flush=True)
      return 0
    config.lock()
    if workdir is None:
      base = os.path.splitext(os.path.basename(spec.partition(":")[0]))[0]
      workdir = os.path.join("runs", base)
    check_workdir(workdir)
    from rlhf_jax.train import loop

    # From here a SIGTERM is held for the experiment's train loops (the next one stops before
    # its first step, and saves) instead of interrupting a model build or a file being written;
    # Ctrl-C outside a loop interrupts as it always did (KeyboardInterrupt).
    sigint = startup.get(signal.SIGINT)
    if signal.SIGINT in startup:
      signal.signal(signal.SIGINT, signal.default_int_handler if sigint in (None, _startup_signal) else sigint)
    with loop._StopFlag(signals=(signal.SIGTERM,)):
      result = module.main(config, workdir)
  except UserError as e:
    message = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2
  except KeyboardInterrupt:
    print("interrupted (SIGINT)", file=sys.stderr, flush=True)
    return 130
  except Exception as e:  # noqa: BLE001 - only the loops' NonFiniteError is reported here
    from rlhf_jax.train.loop import NonFiniteError

    if not isinstance(e, NonFiniteError):
      raise
    print(f"error: training stopped: {e}", file=sys.stderr, flush=True)
    return 1
  return exit_status(result)


if __name__ == "__main__":
  sys.exit(main())
