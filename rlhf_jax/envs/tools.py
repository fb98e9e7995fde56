"""Tools for multi-turn environments: JSON-schema signatures, call parsing, bounded execution.

A :class:`Tool` is a Python function with a JSON-schema signature (the ``parameters`` object
of an OpenAI / Hermes function spec, :meth:`Tool.spec`). :func:`make_tool` infers the schema
from the function's signature and type hints.

The model calls tools inside ``<call>...</call>`` (the tags are arguments). Two call syntaxes
are accepted by :func:`parse_tool_calls`:

* JSON, as Hermes / Qwen / ToolRL write it:
  ``<call>{"name": "calc", "arguments": {"expression": "37*12+5"}}</call>``
  (``"parameters"`` is accepted for ``"arguments"``);
* a function call: ``<call>calc(37*12+5)</call>``. Arguments are Python literals, positional
  (in the schema's property order) or keyword (``calc(expression="1+2")``); a tool with a
  single ``string`` parameter also takes the raw text between the parentheses, unquoted, so
  ``calc(37*12+5)`` passes ``"37*12+5"``.

Malformed calls never raise: each is a :class:`CallError` with one of the counted kinds of
:data:`ERROR_KINDS` and a one-line message the environment returns to the model as an
observation. Execution (:func:`run_tool`) is bounded in time and never raises either: an
exception in the tool is a ``tool_error`` result, an overrun a ``tool_timeout`` result.

* ``isolation="inline"`` runs the function in this process; in the main thread the call is
  interrupted after ``timeout_s`` by ``SIGALRM`` (pure-Python code only: a long C call ends
  when it returns). Off the main thread there is no timer, so give such tools their own
  bound (the built-in calculator's evaluator bounds its own work).
* ``isolation="subprocess"`` runs every call in a fresh process (``forkserver`` start method,
  safe next to JAX's threads) that is killed ``timeout_s`` after it has started (start-up, which
  imports the function's module, is not counted); the function and its arguments must be
  picklable (a module-level function).
* :func:`python_tool` runs model-written code with ``python -I`` in a subprocess with a
  timeout. It bounds time, not what the code may do: it is not a security sandbox.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import multiprocessing
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import threading
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

__all__ = [
    "CALL_ERROR_KINDS",
    "ERROR_KINDS",
    "CallError",
    "Tool",
    "ToolCall",
    "ToolResult",
    "ToolTimeout",
    "make_tool",
    "parse_tool_calls",
    "python_tool",
    "run_tool",
    "validate_arguments",
]

# Errors of the model's text (a call the parser rejects).
CALL_ERROR_KINDS = ("malformed_call", "unknown_tool", "bad_arguments")
# Every counted error kind: the call errors, a tool's failure or overrun, calls over the episode's
# limit, and a turn with neither a call nor an answer.
ERROR_KINDS = CALL_ERROR_KINDS + ("tool_error", "tool_timeout", "too_many_calls", "no_action")

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list, tuple), "object": (dict,), "null": (type(None),),
}
_PY_TO_JSON = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", tuple: "array",
               dict: "object"}
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_CALL_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\-]*)\s*\((.*)\)$", re.DOTALL)


class ToolTimeout(Exception):
  """Raised by (or inside) a tool that ran out of time; :func:`run_tool` reports ``tool_timeout``."""


class ToolCall(NamedTuple):
  """A parsed, schema-valid call: the tool's name, its arguments, and the text inside the tags."""

  name: str
  arguments: dict
  raw: str


class CallError(NamedTuple):
  """A rejected call: ``kind`` in :data:`CALL_ERROR_KINDS`, a one-line message, the raw text."""

  kind: str
  message: str
  raw: str


class ToolResult(NamedTuple):
  """The outcome of one call: ``ok``, the output text (or error message), and ``error_kind``
  (``None``, ``"tool_error"`` or ``"tool_timeout"``)."""

  ok: bool
  output: str
  error_kind: str | None = None


@dataclasses.dataclass(frozen=True)
class Tool:
  """A function the model may call, with its JSON-schema signature.

  Attributes:
    name: what the model writes (``calc``).
    fn: called as ``fn(**arguments)``; its return value becomes the observation text
      (``str``; dicts and lists as JSON; anything else through ``str``).
    parameters: a JSON schema of type ``object`` (``properties``, ``required``;
      ``additionalProperties`` false unless set true).
    description: one line for the model / the tool spec.
    timeout_s: the bound on one call's wall time.
    isolation: ``"inline"`` or ``"subprocess"`` (see the module docstring).
    max_output_chars: longer outputs are cut (with ``...``).
  """

  name: str
  fn: Callable[..., Any]
  parameters: Mapping[str, Any]
  description: str = ""
  timeout_s: float = 2.0
  isolation: str = "inline"
  max_output_chars: int = 500

  def __post_init__(self):
    if not _NAME_RE.match(self.name):
      raise ValueError(f"tool name {self.name!r} must match {_NAME_RE.pattern}")
    if self.parameters.get("type", "object") != "object":
      raise ValueError(f"tool {self.name!r}: parameters must be a JSON schema of type 'object'")
    if self.isolation not in ("inline", "subprocess"):
      raise ValueError(f"tool {self.name!r}: isolation={self.isolation!r}; valid: ('inline', 'subprocess')")
    if not self.timeout_s > 0:
      raise ValueError(f"tool {self.name!r}: timeout_s must be > 0, got {self.timeout_s}")
    if self.isolation == "subprocess":
      try:
        pickle.dumps(self.fn)
      except Exception as e:  # noqa: BLE001 — any pickling failure means the same thing
        raise ValueError(f"tool {self.name!r}: isolation='subprocess' needs a picklable (module-level) "
                         f"function; {self.fn!r} is not ({type(e).__name__})") from None

  @property
  def properties(self) -> dict:
    return dict(self.parameters.get("properties", {}))

  def spec(self) -> dict:
    """The OpenAI-style function spec ``{"type": "function", "function": {name, description, parameters}}``."""
    return {"type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)}}


def _json_type(annotation) -> str | None:
  origin = typing.get_origin(annotation) or annotation
  return _PY_TO_JSON.get(origin)


def make_tool(fn: Callable[..., Any], *, name: str | None = None, description: str | None = None,
              parameters: Mapping[str, Any] | None = None, timeout_s: float = 2.0, isolation: str = "inline",
              max_output_chars: int = 500) -> Tool:
  """A :class:`Tool` for ``fn``; the schema is inferred from its signature unless ``parameters`` is given.

  Parameters without a default are ``required``; type hints ``str``, ``int``, ``float``, ``bool``,
  ``list`` and ``dict`` map to the JSON types (no hint: any type). The description defaults to the
  first line of the docstring.

  Examples:
    >>> def add(a: int, b: int = 0) -> int:
    ...   '''Adds two integers.'''
    ...   return a + b
    >>> t = make_tool(add)
    >>> t.parameters["required"], t.parameters["properties"]["a"], t.description
    (['a'], {'type': 'integer'}, 'Adds two integers.')
  """
  if parameters is None:
    props, required = {}, []
    try:
      hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 — unresolvable hints: no types
      hints = {}
    for p in inspect.signature(fn).parameters.values():
      if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
        continue
      jt = _json_type(hints.get(p.name))
      props[p.name] = {"type": jt} if jt else {}
      if p.default is p.empty:
        required.append(p.name)
    parameters = {"type": "object", "properties": props, "required": required}
  if description is None:
    description = (inspect.getdoc(fn) or "").strip().split("\n")[0]
  return Tool(name=name or fn.__name__, fn=fn, parameters=dict(parameters), description=description,
              timeout_s=timeout_s, isolation=isolation, max_output_chars=max_output_chars)


def _type_ok(value, schema: Mapping) -> bool:
  t = schema.get("type")
  if t is None:
    return True
  types = t if isinstance(t, (list, tuple)) else [t]
  for name in types:
    py = _JSON_TYPES.get(name)
    if py is None:
      continue
    if isinstance(value, bool) and name in ("integer", "number"):
      continue  # JSON booleans are not numbers
    if name == "integer" and isinstance(value, float) and value.is_integer():
      return True
    if isinstance(value, py):
      return True
  return False


def validate_arguments(parameters: Mapping[str, Any], arguments: Mapping[str, Any]) -> list[str]:
  """Problems of ``arguments`` against the object schema ``parameters`` (empty when valid).

  Checked: required keys present, no keys outside ``properties`` (unless
  ``additionalProperties`` is true), each value's JSON ``type`` and ``enum``.

  Examples:
    >>> schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    >>> validate_arguments(schema, {"x": 3}), validate_arguments(schema, {"x": "3", "y": 1})
    ([], ["unknown parameter 'y'", "parameter 'x' must be integer, got str"])
  """
  props = dict(parameters.get("properties", {}))
  problems = []
  for key in parameters.get("required", []):
    if key not in arguments:
      problems.append(f"missing required parameter {key!r}")
  if not parameters.get("additionalProperties", False):
    problems += [f"unknown parameter {k!r}" for k in arguments if k not in props]
  for key, value in arguments.items():
    schema = props.get(key)
    if schema is None:
      continue
    if not _type_ok(value, schema):
      problems.append(f"parameter {key!r} must be {schema['type']}, got {type(value).__name__}")
    elif "enum" in schema and value not in schema["enum"]:
      problems.append(f"parameter {key!r} must be one of {list(schema['enum'])}")
  return problems


def _short(text: str, n: int = 60) -> str:
  text = " ".join(text.split())
  return text if len(text) <= n else text[: n - 3] + "..."


def _parse_json_call(body: str) -> tuple[str, dict] | str:
  try:
    obj = json.loads(body)
  except (json.JSONDecodeError, RecursionError) as e:
    return f"bad JSON: {e.msg if hasattr(e, 'msg') else 'too deeply nested'}"
  if not isinstance(obj, dict):
    return "a JSON call must be an object with 'name' and 'arguments'"
  name = obj.get("name")
  if not isinstance(name, str):
    return "a JSON call needs a string 'name'"
  args = obj.get("arguments", obj.get("parameters", {}))
  if isinstance(args, str):  # OpenAI writes arguments as a JSON string
    try:
      args = json.loads(args)
    except json.JSONDecodeError:
      return "'arguments' is a string that is not JSON"
  if not isinstance(args, dict):
    return "'arguments' must be an object"
  return name, args


def _parse_function_call(name: str, argtext: str, tool: Tool) -> dict | str:
  props = list(tool.properties)
  single_string = len(props) == 1 and tool.properties[props[0]].get("type") == "string"
  try:
    node = ast.parse(f"f({argtext})", mode="eval").body
    if not isinstance(node, ast.Call):
      raise SyntaxError("not a call")
    args = [ast.literal_eval(a) for a in node.args]
    kwargs = {}
    for kw in node.keywords:
      if kw.arg is None:
        raise ValueError("** arguments are not allowed")
      kwargs[kw.arg] = ast.literal_eval(kw.value)
  except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as e:
    if single_string and argtext.strip():
      return {props[0]: argtext.strip()}  # raw text: calc(37*12+5)
    return f"cannot read the arguments of {name}(...): {type(e).__name__}"
  if single_string and not kwargs and len(args) == 1 and not isinstance(args[0], str):
    return {props[0]: argtext.strip()}  # calc(449) passes "449"
  if len(args) > len(props):
    return f"{name} takes {len(props)} positional argument(s), got {len(args)}"
  out = dict(zip(props, args))
  for k, v in kwargs.items():
    if k in out:
      return f"{name} got parameter {k!r} twice"
    out[k] = v
  return out


def parse_tool_calls(text: str, tools: Mapping[str, Tool] | Sequence[Tool], *, open_tag: str = "<call>",
                     close_tag: str = "</call>") -> tuple[list[ToolCall], list[CallError]]:
  """The calls in ``text`` (in order) and the rejected ones; never raises.

  Every ``open_tag`` starts a call that runs to the next ``close_tag``; a call without one is
  ``malformed_call`` (unclosed), as is a stray ``close_tag``, an empty call, bad JSON or a body
  that is neither JSON nor ``name(...)``. A name not in ``tools`` is ``unknown_tool``;
  arguments that do not fit the tool's schema are ``bad_arguments``.

  Examples:
    >>> from rlhf_jax.envs.calculator import calculator_tool
    >>> calls, errors = parse_tool_calls("<call>calc(2*3)</call><call>sin(1)</call><call>calc(", [calculator_tool()])
    >>> [(c.name, c.arguments) for c in calls]
    [('calc', {'expression': '2*3'})]
    >>> [e.kind for e in errors]
    ['unknown_tool', 'malformed_call']
  """
  if not isinstance(text, str):
    return [], [CallError("malformed_call", "the turn is not text", repr(text))]
  by_name = dict(tools) if isinstance(tools, Mapping) else {t.name: t for t in tools}
  calls: list[ToolCall] = []
  errors: list[CallError] = []
  pos = 0
  while True:
    start = text.find(open_tag, pos)
    stray = text.find(close_tag, pos)
    if stray != -1 and (start == -1 or stray < start):
      errors.append(CallError("malformed_call", f"{close_tag} without {open_tag}", text[pos:stray]))
      pos = stray + len(close_tag)
      continue
    if start == -1:
      break
    end = text.find(close_tag, start + len(open_tag))
    nested = text.find(open_tag, start + len(open_tag))
    if end == -1 or (nested != -1 and nested < end):
      stop = len(text) if nested == -1 else nested
      errors.append(CallError("malformed_call", f"{open_tag} is not closed by {close_tag}",
                              text[start + len(open_tag):stop]))
      if nested == -1:
        break
      pos = nested
      continue
    body = text[start + len(open_tag):end].strip()
    pos = end + len(close_tag)
    if not body:
      errors.append(CallError("malformed_call", "empty call", body))
      continue
    if body.startswith("{"):
      parsed = _parse_json_call(body)
      if isinstance(parsed, str):
        errors.append(CallError("malformed_call", parsed, body))
        continue
      name, args = parsed
    else:
      m = _CALL_RE.match(body)
      if not m:
        errors.append(CallError("malformed_call", f"not a call: {_short(body)!r} (write name(arguments) or JSON)",
                                body))
        continue
      name, argtext = m.group(1), m.group(2)
      if name not in by_name:
        errors.append(CallError("unknown_tool", f"unknown tool {name!r}; tools: {sorted(by_name)}", body))
        continue
      args = _parse_function_call(name, argtext, by_name[name])
      if isinstance(args, str):
        errors.append(CallError("malformed_call", args, body))
        continue
    if name not in by_name:
      errors.append(CallError("unknown_tool", f"unknown tool {name!r}; tools: {sorted(by_name)}", body))
      continue
    problems = validate_arguments(by_name[name].parameters, args)
    if problems:
      errors.append(CallError("bad_arguments", f"{name}: " + "; ".join(problems), body))
      continue
    calls.append(ToolCall(name, args, body))
  return calls, errors


def _render_output(value: Any, limit: int) -> str:
  if isinstance(value, str):
    out = value
  elif isinstance(value, (dict, list, tuple)):
    try:
      out = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
      out = str(value)
  else:
    out = str(value)
  return out if len(out) <= limit else out[: max(limit - 3, 0)] + "..."


def _error_text(e: BaseException) -> str:
  msg = str(e).strip().split("\n")[-1] if str(e).strip() else ""
  return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class _Alarm(Exception):
  pass


def _run_inline(tool: Tool, arguments: dict) -> ToolResult:
  use_timer = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")
  old = None
  if use_timer:
    def on_alarm(signum, frame):
      raise _Alarm()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, tool.timeout_s)
  try:
    value = tool.fn(**arguments)
    return ToolResult(True, _render_output(value, tool.max_output_chars))
  except (_Alarm, ToolTimeout):
    return ToolResult(False, f"{tool.name} timed out after {tool.timeout_s:g}s", "tool_timeout")
  except Exception as e:  # noqa: BLE001 — a failing tool is an observation, never a crash
    return ToolResult(False, _short(_error_text(e), tool.max_output_chars), "tool_error")
  finally:
    if use_timer:
      signal.setitimer(signal.ITIMER_REAL, 0)
      signal.signal(signal.SIGALRM, old)


def _subprocess_child(conn, fn, arguments, limit):
  try:
    conn.send(("ready", ""))  # the time bound starts now, not at process start-up
    conn.send(("ok", _render_output(fn(**arguments), limit)))
  except ToolTimeout:
    conn.send(("timeout", ""))
  except BaseException as e:  # noqa: BLE001 — report anything to the parent
    conn.send(("error", _error_text(e)))
  finally:
    conn.close()


_START_TIMEOUT_S = 60.0  # process start-up (unpickling the function may import its module)


def _run_subprocess(tool: Tool, arguments: dict) -> ToolResult:
  ctx = multiprocessing.get_context("forkserver")
  recv, send = ctx.Pipe(duplex=False)
  proc = ctx.Process(target=_subprocess_child, args=(send, tool.fn, arguments, tool.max_output_chars), daemon=True)
  try:
    proc.start()
  except Exception as e:  # noqa: BLE001 — e.g. unpicklable arguments
    return ToolResult(False, _short(f"could not start {tool.name}: {_error_text(e)}"), "tool_error")
  send.close()
  try:
    if not recv.poll(_START_TIMEOUT_S):
      return ToolResult(False, f"{tool.name} did not start within {_START_TIMEOUT_S:g}s", "tool_error")
    try:
      recv.recv()  # "ready"
    except EOFError:
      proc.join(1.0)
      return ToolResult(False, f"{tool.name} exited with code {proc.exitcode} before it started", "tool_error")
    if recv.poll(tool.timeout_s):
      try:
        status, payload = recv.recv()
      except EOFError:
        proc.join(1.0)
        return ToolResult(False, f"{tool.name} exited with code {proc.exitcode} without a result", "tool_error")
      if status == "ok":
        return ToolResult(True, payload)
      if status == "timeout":
        return ToolResult(False, f"{tool.name} timed out after {tool.timeout_s:g}s", "tool_timeout")
      return ToolResult(False, _short(payload, tool.max_output_chars), "tool_error")
    return ToolResult(False, f"{tool.name} timed out after {tool.timeout_s:g}s", "tool_timeout")
  finally:
    recv.close()
    if proc.is_alive():
      proc.kill()
    proc.join(5.0)


def run_tool(tool: Tool, arguments: Mapping[str, Any]) -> ToolResult:
  """Calls ``tool`` with ``arguments`` within ``tool.timeout_s``; a failure is a result, never an exception.

  Examples:
    >>> run_tool(make_tool(lambda x: 1 // x, name="inv"), {"x": 0})
    ToolResult(ok=False, output='ZeroDivisionError: integer division or modulo by zero', error_kind='tool_error')
  """
  if tool.isolation == "subprocess":
    return _run_subprocess(tool, dict(arguments))
  return _run_inline(tool, dict(arguments))


def _run_python(code: str, *, timeout_s: float) -> str:
  with tempfile.TemporaryDirectory() as cwd:
    try:
      proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=timeout_s,
                            cwd=cwd, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
      raise ToolTimeout() from None
  if proc.returncode != 0:
    lines = [l for l in proc.stderr.strip().split("\n") if l.strip()]
    raise RuntimeError(lines[-1] if lines else f"exit status {proc.returncode}")
  return proc.stdout.strip()


def python_tool(*, name: str = "python", timeout_s: float = 5.0, max_output_chars: int = 500) -> Tool:
  """A tool that runs the model's Python ``code`` in ``python -I`` (a fresh process, a temporary
  working directory) and returns its stdout; an exception is a ``tool_error`` with the last
  line of stderr, an overrun (killed at ``timeout_s``) a ``tool_timeout``. Not a security sandbox.
  """
  def run(code: str) -> str:
    return _run_python(code, timeout_s=timeout_s)

  schema = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}
  # The subprocess enforces the bound; the inline timer is a backstop a little later.
  return Tool(name=name, fn=run, parameters=schema, description="Runs Python code and returns what it prints.",
              timeout_s=timeout_s + 2.0, isolation="inline", max_output_chars=max_output_chars)
