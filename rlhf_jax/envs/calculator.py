"""The built-in offline environment: arithmetic word problems with a calculator tool.

* :func:`safe_eval` evaluates arithmetic (``+ - * / // % **``, parentheses, unary signs,
  integers and decimals) exactly, with :class:`fractions.Fraction`, by walking the AST: no
  names, calls or attributes, and bounded work (expression length, node count, exponent and
  magnitude), so it needs no timer. Anything else raises :class:`CalculatorError`.
* :func:`calculator_tool` is the ``calc(expression)`` tool built on it.
* :func:`make_arithmetic_problem` generates a problem such as ``"37 times 12 plus 5?"`` with
  its expression ``37*12+5`` and answer ``449``; :data:`TEMPLATES` lists the phrasings.
* :class:`CalculatorEnv` is a :class:`rlhf_jax.envs.tool_env.ToolEnv` with the calculator whose
  final answer earns 1 when it equals the row's ``answer`` numerically.
* :func:`demonstration` writes scripted assistant turns for SFT warm-starts: a correct call
  then the answer, or the flawed kinds of :data:`DEMO_KINDS`.

An episode: ``37 times 12 plus 5?`` → ``<call>calc(37*12+5)</call>`` → ``<result>449</result>``
→ ``<answer>449</answer>``.
"""

from __future__ import annotations

import ast
import math
import operator
from fractions import Fraction
from typing import Any

import numpy as np

from rlhf_jax.envs.tool_env import ToolEnv
from rlhf_jax.envs.tools import Tool

__all__ = [
    "DEMO_KINDS",
    "TEMPLATES",
    "CalculatorEnv",
    "CalculatorError",
    "calculate",
    "calculator_tool",
    "demonstration",
    "format_number",
    "make_arithmetic_problem",
    "numeric_answer_reward",
    "safe_eval",
]


class CalculatorError(ValueError):
  """An expression the calculator does not evaluate (the message says why)."""


_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def safe_eval(expression: str, *, max_chars: int = 200, max_nodes: int = 64, max_exponent: int = 64,
              max_abs: int = 10**30) -> Fraction:
  """The exact value of an arithmetic expression, or :class:`CalculatorError`.

  Examples:
    >>> safe_eval("37*12+5"), safe_eval("(7-2)/4"), safe_eval("2**-2")
    (Fraction(449, 1), Fraction(5, 4), Fraction(1, 4))
    >>> safe_eval("__import__('os')")
    Traceback (most recent call last):
    ...
    rlhf_jax.envs.calculator.CalculatorError: unsupported: a call
  """
  if not isinstance(expression, str):
    raise CalculatorError(f"expression must be text, got {type(expression).__name__}")
  text = expression.strip()
  if not text:
    raise CalculatorError("empty expression")
  if len(text) > max_chars:
    raise CalculatorError(f"expression longer than {max_chars} characters")
  try:
    tree = ast.parse(text, mode="eval")
  except (SyntaxError, ValueError, MemoryError, RecursionError):
    raise CalculatorError(f"cannot parse {text if len(text) <= 40 else text[:37] + '...'!r}") from None
  if sum(1 for _ in ast.walk(tree)) > max_nodes:
    raise CalculatorError(f"expression has more than {max_nodes} parts")

  def check(v: Fraction) -> Fraction:
    if abs(v) > max_abs or v.denominator > max_abs:
      raise CalculatorError("number too large")
    return v

  def ev(node) -> Fraction:
    if isinstance(node, ast.Expression):
      return ev(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
      if isinstance(node.value, float) and not math.isfinite(node.value):
        raise CalculatorError("number too large")
      return check(Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
      return _UNARY[type(node.op)](ev(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
      left, right = ev(node.left), ev(node.right)
      if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
        raise CalculatorError("division by zero")
      if isinstance(node.op, ast.Pow):
        if right.denominator != 1 or abs(right) > max_exponent:
          raise CalculatorError(f"exponent must be an integer of at most {max_exponent}")
        if left == 0 and right < 0:
          raise CalculatorError("division by zero")
        bits = max(abs(left.numerator).bit_length(), left.denominator.bit_length()) - 1  # log2 lower bound
        if abs(int(right)) * bits > max_abs.bit_length():
          raise CalculatorError("number too large")
        return check(left ** int(right))
      return check(Fraction(_BINOPS[type(node.op)](left, right)))
    kind = {ast.Call: "a call", ast.Name: "a name", ast.Attribute: "an attribute"}.get(type(node))
    raise CalculatorError(f"unsupported: {kind or type(node).__name__}")

  return ev(tree)


def format_number(value: Fraction | int | float, *, decimals: int = 6) -> str:
  """An integer as is, else a decimal rounded to ``decimals`` places without trailing zeros.

  Examples:
    >>> format_number(Fraction(449)), format_number(Fraction(5, 4)), format_number(Fraction(1, 3))
    ('449', '1.25', '0.333333')
  """
  v = Fraction(value)
  if v.denominator == 1:
    return str(v.numerator)
  q = round(v, decimals)
  sign = "-" if q < 0 else ""
  q = abs(q)
  whole, frac = divmod(q.numerator, q.denominator)
  digits = str(round(Fraction(frac, q.denominator) * 10**decimals)).rjust(decimals, "0").rstrip("0")
  return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def calculate(expression: str) -> str:
  """Evaluates an arithmetic expression (+ - * / // % ** and parentheses)."""
  return format_number(safe_eval(expression))


def calculator_tool(*, name: str = "calc", timeout_s: float = 1.0) -> Tool:
  """The ``calc(expression)`` tool: :func:`calculate` in-process (its evaluator bounds its own work)."""
  schema = {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}
  return Tool(name=name, fn=calculate, parameters=schema, timeout_s=timeout_s,
              description="Evaluates an arithmetic expression (+ - * / // % ** and parentheses).")


# (question, expression) formats; a, b are two-digit numbers and c one digit.
TEMPLATES = (
    ("what is {a}*{b}+{c}?", "{a}*{b}+{c}"),
    ("{a} times {b} plus {c}?", "{a}*{b}+{c}"),
    ("{a} plus {b} times {c}?", "{a}+{b}*{c}"),
    ("{a} minus {b}, times {c}?", "({a}-{b})*{c}"),
)


def make_arithmetic_problem(rng: np.random.Generator, *, template: int | None = None,
                            templates=TEMPLATES) -> dict[str, Any]:
  """A generated problem: ``{"question", "expression", "answer", "template"}`` (answer as text).

  Examples:
    >>> p = make_arithmetic_problem(np.random.default_rng(0), template=1)
    >>> p["question"], p["expression"], p["answer"]
    ('86 times 67 plus 5?', '86*67+5', '5767')
  """
  t = int(rng.integers(len(templates))) if template is None else int(template)
  a, b = (int(x) for x in rng.integers(10, 100, size=2))
  c = int(rng.integers(1, 10))
  question, expression = (f.format(a=a, b=b, c=c) for f in templates[t])
  return {"question": question, "expression": expression, "answer": calculate(expression), "template": t}


def numeric_answer_reward(answer_text: str, row: Any) -> float:
  """1.0 when ``answer_text`` is a number equal to ``row["answer"]`` (exactly, as fractions), else 0.0."""
  try:
    return float(Fraction(str(answer_text).strip()) == Fraction(str(row["answer"]).strip()))
  except (ValueError, ZeroDivisionError, KeyError, TypeError):
    return 0.0


class CalculatorEnv(ToolEnv):
  """:class:`ToolEnv` with the calculator; reward 1 for the right final answer (+ optional format terms).

  Args:
    timeout_s: the calculator's time bound.
    **kwargs: :class:`ToolEnv` options (``max_calls``, ``error_penalty``, ``format_bonus``, ...).
  """

  def __init__(self, *, timeout_s: float = 1.0, **kwargs):
    super().__init__([calculator_tool(timeout_s=timeout_s)], numeric_answer_reward, **kwargs)


# Scripted assistant turns for SFT warm-starts: "tool" is right; the others are the flaws of a
# weak demonstrator. "malformed" recovers after the error; "direct" and "slip" end wrong.
DEMO_KINDS = ("tool", "direct", "malformed", "slip")


def _perturb_digit(rng, text: str) -> str:
  idx = [i for i, ch in enumerate(text) if ch.isdigit()]
  i = idx[int(rng.integers(len(idx)))]
  d = (int(text[i]) + int(rng.integers(1, 10))) % 10
  if d == 0 and (i == 0 or not text[i - 1].isdigit()):
    d = 1  # no leading zero
  return text[:i] + str(d) + text[i + 1:]


def demonstration(row: dict, rng: np.random.Generator, kind: str = "tool") -> list[str]:
  """The assistant turns of one demonstration episode for ``row`` (see :data:`DEMO_KINDS`).

  ``tool``: a correct call, then the answer; ``direct``: a wrong answer without a call;
  ``malformed``: an unclosed call (an error observation), the correct call, the answer;
  ``slip``: a call with one digit wrong, then its (wrong) result as the answer.

  Examples:
    >>> row = {"expression": "37*12+5", "answer": "449"}
    >>> demonstration(row, np.random.default_rng(0))
    ['<call>calc(37*12+5)</call>', '<answer>449</answer>']
  """
  expr, ans = row["expression"], row["answer"]
  call, final = f"<call>calc({expr})</call>", f"<answer>{ans}</answer>"
  if kind == "tool":
    return [call, final]
  if kind == "malformed":
    return [f"<call>calc({expr}</call>", call, final]
  if kind == "direct":
    wrong = ans
    while wrong == ans:
      wrong = _perturb_digit(rng, ans)
    return [f"<answer>{wrong}</answer>"]
  if kind == "slip":
    slipped, value = expr, ans
    while value == ans:
      slipped = _perturb_digit(rng, expr)
      value = calculate(slipped)
    return [f"<call>calc({slipped})</call>", f"<answer>{value}</answer>"]
  raise ValueError(f"demonstration kind={kind!r}; valid: {DEMO_KINDS}")
