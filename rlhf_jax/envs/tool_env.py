"""A tool-using environment: the model calls tools until it gives a final answer.

Each assistant turn is read in this order:

1. an ``<answer>...</answer>`` (the last complete one) ends the episode; its reward is
   ``answer_fn(answer_text, row)`` plus ``format_bonus`` (calls in the same turn are ignored);
2. otherwise the turn's tool calls (``<call>...</call>``, :func:`rlhf_jax.envs.tools.parse_tool_calls`)
   are run, each bounded in time (:func:`rlhf_jax.envs.tools.run_tool`), and the observation is
   one ``tool`` message holding ``<result>output</result>`` for each call and
   ``<error>message</error>`` for each rejected call, failed or timed-out tool, or call over
   ``max_calls``; the turn's reward is ``error_penalty`` times its number of errors
   (0 by default);
3. a turn with neither a call nor an answer is ``no_action``: the episode ends with reward 0
   (``end_on_no_action=True``) or the model is told to call a tool or answer.

The observation's tags are arguments, so a tokenizer can make each one token
(:class:`rlhf_jax.envs.text.CharTokenizer`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rlhf_jax.envs.base import Message, Step, merge_counts
from rlhf_jax.envs.tools import Tool, parse_tool_calls, run_tool

__all__ = ["ToolEnv", "extract_tagged"]


def extract_tagged(text: str, open_tag: str, close_tag: str) -> str | None:
  """The text inside the last complete ``open_tag ... close_tag`` pair, stripped; ``None`` if none.

  Examples:
    >>> extract_tagged("<answer>4</answer> <answer> 5 </answer>", "<answer>", "</answer>")
    '5'
    >>> extract_tagged("<answer>4", "<answer>", "</answer>") is None
    True
  """
  if not isinstance(text, str):
    return None
  end = text.rfind(close_tag)
  while end != -1:
    start = text.rfind(open_tag, 0, end)
    if start != -1:
      return text[start + len(open_tag):end].strip()
    end = text.rfind(close_tag, 0, end)
  return None


class ToolEnv:
  """One episode of tool use for a data row (see the module docstring for the rules).

  Args:
    tools: the tools the model may call.
    answer_fn: ``answer_fn(answer_text, row) -> float``, the final answer's reward.
    question_key: the row's field rendered as the user message by :meth:`reset`
      (a row with ``"messages"`` uses those instead).
    system_prompt: an optional system message before the question.
    max_calls: executed calls allowed per episode; more are ``too_many_calls`` errors.
    error_penalty: reward added per counted error in a turn (e.g. ``-0.1``).
    format_bonus: reward added to a final answer (format term).
    end_on_no_action: end the episode on a turn with neither a call nor an answer.
    call_tags / answer_tags / result_tags / error_tags: the (open, close) tags.
    observation_role: the role of observation messages (``"tool"``).
    error_detail: observations carry the error's message (else only its kind, e.g.
      ``<error>malformed_call</error>``: shorter, for tiny models).
  """

  def __init__(self, tools: Sequence[Tool], answer_fn: Callable[[str, Any], float], *,
               question_key: str = "question", system_prompt: str | None = None, max_calls: int = 4,
               error_penalty: float = 0.0, format_bonus: float = 0.0, end_on_no_action: bool = True,
               call_tags: tuple[str, str] = ("<call>", "</call>"),
               answer_tags: tuple[str, str] = ("<answer>", "</answer>"),
               result_tags: tuple[str, str] = ("<result>", "</result>"),
               error_tags: tuple[str, str] = ("<error>", "</error>"),
               observation_role: str = "tool", error_detail: bool = True):
    self.tools = {t.name: t for t in tools}
    if len(self.tools) != len(tools):
      raise ValueError(f"tool names must be unique, got {[t.name for t in tools]}")
    self.answer_fn = answer_fn
    self.question_key = question_key
    self.system_prompt = system_prompt
    self.max_calls = max_calls
    self.error_penalty = float(error_penalty)
    self.format_bonus = float(format_bonus)
    self.end_on_no_action = end_on_no_action
    self.call_tags, self.answer_tags = call_tags, answer_tags
    self.result_tags, self.error_tags = result_tags, error_tags
    self.observation_role = observation_role
    self.error_detail = error_detail
    self.row = None
    self.calls_made = 0
    self.counts: dict[str, int] = {}

  @property
  def stop_strings(self) -> tuple[str, ...]:
    """Where an assistant turn ends: after a call or a final answer."""
    return (self.call_tags[1], self.answer_tags[1])

  def reset(self, row: Mapping[str, Any]) -> list[Message]:
    self.row = row
    self.calls_made = 0
    self.counts = {}
    if "messages" in row:
      return [dict(m) for m in row["messages"]]
    msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
    return msgs + [{"role": "user", "content": str(row[self.question_key])}]

  def _wrap(self, tags, text) -> str:
    return f"{tags[0]}{text}{tags[1]}"

  def _error(self, kind: str, message: str) -> str:
    return self._wrap(self.error_tags, message if self.error_detail else kind)

  def step(self, assistant_text: str) -> Step:
    if self.row is None:
      raise RuntimeError("ToolEnv.step before reset")
    errors: dict[str, int] = {}
    answer = extract_tagged(assistant_text, *self.answer_tags)
    if answer is not None:
      try:
        reward = float(self.answer_fn(answer, self.row))
      except Exception:  # noqa: BLE001 — a bad answer scores 0, it does not stop the run
        reward = 0.0
      info = {"answer": answer, "correct": reward > 0, "tool_calls": 0, "errors": errors}
      return Step(None, reward + self.format_bonus, True, info)
    calls, call_errors = parse_tool_calls(assistant_text, self.tools, open_tag=self.call_tags[0],
                                          close_tag=self.call_tags[1])
    parts = []
    n_calls = 0
    for err in call_errors:
      merge_counts(errors, {err.kind: 1})
      parts.append(self._error(err.kind, err.message))
    for call in calls:
      if self.calls_made >= self.max_calls:
        merge_counts(errors, {"too_many_calls": 1})
        parts.append(self._error("too_many_calls", f"at most {self.max_calls} calls per episode"))
        continue
      self.calls_made += 1
      n_calls += 1
      res = run_tool(self.tools[call.name], call.arguments)
      if res.ok:
        parts.append(self._wrap(self.result_tags, res.output))
      else:
        merge_counts(errors, {res.error_kind: 1})
        parts.append(self._error(res.error_kind, res.output))
    merge_counts(self.counts, errors)
    if not parts:  # neither a call nor an answer
      errors["no_action"] = 1
      merge_counts(self.counts, {"no_action": 1})
      info = {"answer": None, "correct": False, "tool_calls": 0, "errors": errors}
      if self.end_on_no_action:
        return Step(None, 0.0, True, info)
      msg = self._error("no_action", "call a tool or give the final answer")
      return Step([{"role": self.observation_role, "content": msg}], self.error_penalty, False, info)
    reward = self.error_penalty * sum(errors.values())
    info = {"answer": None, "correct": None, "tool_calls": n_calls, "errors": errors}
    return Step([{"role": self.observation_role, "content": "".join(parts)}], reward, False, info)
