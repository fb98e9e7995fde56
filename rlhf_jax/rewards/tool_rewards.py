r"""ToolRL's decomposed reward for tool calls: format + tool name + parameter names + parameter values.

Qian et al. 2025, "ToolRL: Reward is All Tool Learning Needs" (arXiv:2504.13958), §3.3. A
response is scored against the ground-truth response of the same row:

* **Format** ``R_format ∈ {0, 1}``: 1 when the response has exactly the special-token blocks
  the ground truth has (``<think>…</think>``, ``<tool_call>…</tool_call>``,
  ``<response>…</response>``), each once and in the ground truth's order, and nothing outside
  them (the paper's anchored patterns, with any whitespace between blocks).
* **Correctness** ``R_correct ∈ [−3, 3]`` compares the predicted calls ``P = {P_1..P_m}`` with the
  ground truth's ``G = {G_1..G_n}`` (each ``{"name", "parameters"}``; one JSON object per line
  inside ``<tool_call>``):

  - tool names: ``r_name = |N_G ∩ N_P| / |N_G ∪ N_P|`` (multisets) ``∈ [0, 1]``;
  - for a matched pair ``(G_j, P_i)`` (same tool name): parameter names
    ``r_param = |keys(G_j) ∩ keys(P_i)| / |keys(G_j) ∪ keys(P_i)| ∈ [0, 1]`` and parameter values
    ``r_value = Σ_{k ∈ keys(G_j)} 1[P_i[k] = G_j[k]] ∈ [0, |keys(G_j)|]``;
  - ``R_max = r_name + max over one-to-one matchings of Σ (r_param + r_value)``, with the
    maximum ``S_max = 1 + n + Σ_j |keys(G_j)|``;
  - ``R_correct = 6 · R_max / S_max − 3``.

  An exact match scores 3; a response without a parseable ``<tool_call>`` block when the ground
  truth has one scores −3; a ground truth without tool calls gives ``R_correct = 0`` (as the
  released code).
* ``R_final = R_format + R_correct ∈ [−3, 4]`` (:func:`toolrl_reward`).

The matching is optimal (an assignment problem, as the paper states); the authors' released
code matches greedily, ground-truth call by call, which can score lower with repeated tool
names. The component functions take call lists, so other call syntaxes plug in through
their own parser.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "multiset_jaccard",
    "parse_toolrl_calls",
    "toolrl_components",
    "toolrl_correctness",
    "toolrl_format",
    "toolrl_reward",
]

_BLOCK_TAGS = ("think", "tool_call", "response")
_BLOCK_RE = re.compile(r"<(think|tool_call|response)>(.*?)</\1>", re.DOTALL)


def multiset_jaccard(a: Sequence[Any], b: Sequence[Any]) -> float:
  """``|A ∩ B| / |A ∪ B|`` of two multisets (1.0 when both are empty).

  Examples:
    >>> multiset_jaccard(["a", "a", "b"], ["a", "c"])
    0.25
  """
  if not a and not b:
    return 1.0
  ca, cb = Counter(map(_key, a)), Counter(map(_key, b))
  inter = sum((ca & cb).values())
  return inter / (len(a) + len(b) - inter)


def _key(x):
  return json.dumps(x, sort_keys=True) if isinstance(x, (dict, list)) else x


def parse_toolrl_calls(text: str | None) -> list[dict] | None:
  r"""The calls of the first ``<tool_call>`` block (one JSON object per non-empty line, each with a
  string ``name`` and an object ``parameters``, or ``arguments``); ``None`` when there is no block or a
  line does not parse.

  Examples:
    >>> parse_toolrl_calls('<tool_call>\n{"name": "f", "parameters": {"x": 1}}\n</tool_call>')
    [{'name': 'f', 'parameters': {'x': 1}}]
    >>> parse_toolrl_calls("<tool_call>{bad}</tool_call>") is None
    True
  """
  if not isinstance(text, str):
    return None
  m = re.search(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL)
  if m is None:
    return None
  calls = []
  for line in m.group(1).strip().split("\n"):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
      return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
      return None
    params = obj.get("parameters", obj.get("arguments", {}))
    if not isinstance(params, dict):
      return None
    calls.append({"name": obj["name"], "parameters": params})
  return calls


def _calls(x) -> list[dict] | None:
  if x is None or isinstance(x, str):
    return parse_toolrl_calls(x)
  return [{"name": c["name"], "parameters": dict(c.get("parameters", c.get("arguments", {})))} for c in x]


def toolrl_components(predicted: Sequence[Mapping], ground_truth: Sequence[Mapping]) -> dict[str, float]:
  """``r_name``, the best matching's ``r_param`` and ``r_value`` sums, ``R_max`` (``match``) and ``S_max``.

  Examples:
    >>> gt = [{"name": "calc", "parameters": {"expression": "2*3", "precision": 2}}]
    >>> pd = [{"name": "calc", "parameters": {"expression": "2*3", "round": 2}}]
    >>> c = toolrl_components(pd, gt)
    >>> c["r_name"], round(c["r_param"], 4), c["r_value"], c["s_max"]
    (1.0, 0.3333, 1.0, 4.0)
  """
  predicted, ground_truth = list(predicted), list(ground_truth)
  r_name = multiset_jaccard([c["name"] for c in ground_truth], [c["name"] for c in predicted])
  s_max = 1.0 + len(ground_truth) + sum(len(g["parameters"]) for g in ground_truth)
  param = np.zeros((len(ground_truth), len(predicted)))
  value = np.zeros_like(param)
  for j, g in enumerate(ground_truth):
    for i, p in enumerate(predicted):
      if g["name"] != p["name"]:
        continue
      gp, pp = g["parameters"], p["parameters"]
      param[j, i] = multiset_jaccard(list(gp), list(pp))
      value[j, i] = sum(1.0 for k, v in gp.items() if k in pp and _key(pp[k]) == _key(v))
  r_param = r_value = 0.0
  if param.size:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-(param + value))
    r_param, r_value = float(param[rows, cols].sum()), float(value[rows, cols].sum())
  match = r_name + r_param + r_value
  return {"r_name": r_name, "r_param": r_param, "r_value": r_value, "match": match, "s_max": s_max}


def toolrl_correctness(predicted, ground_truth, *, max_reward: float = 3.0, min_reward: float = -3.0) -> float:
  """``R_correct = (max − min) · R_max / S_max + min`` (the paper's ``6 · R_max / S_max − 3``).

  ``predicted`` / ``ground_truth``: call lists or response texts (parsed by
  :func:`parse_toolrl_calls`). Unparseable predicted calls score ``min_reward``; a ground truth
  without calls scores 0.

  Examples:
    >>> gt = [{"name": "calc", "parameters": {"expression": "2*3"}}]
    >>> toolrl_correctness(gt, gt), toolrl_correctness([{"name": "search", "parameters": {}}], gt)
    (3.0, -3.0)
    >>> toolrl_correctness([{"name": "calc", "parameters": {"expression": "2+3"}}], gt)
    1.0
  """
  gt = _calls(ground_truth)
  if not gt:
    return 0.0
  pd = _calls(predicted)
  if pd is None:
    return float(min_reward)
  c = toolrl_components(pd, gt)
  return float((max_reward - min_reward) * c["match"] / c["s_max"] + min_reward)


def _blocks(text: str) -> list[str] | None:
  """The block tags of ``text`` in order, or ``None`` when something lies outside the blocks."""
  tags, pos = [], 0
  s = text.strip()
  for m in _BLOCK_RE.finditer(s):
    if s[pos:m.start()].strip():
      return None
    tags.append(m.group(1))
    pos = m.end()
  if s[pos:].strip():
    return None
  return tags


def toolrl_format(completion: str | None, reference: str | None) -> float:
  r"""``R_format``: 1.0 when ``completion`` is exactly the reference's blocks (in order, each once).

  Examples:
    >>> ref = "<think>x</think>\n<tool_call>\n{}\n</tool_call>"
    >>> toolrl_format("<think>a</think>\n<tool_call>\n{}\n</tool_call>", ref), toolrl_format("<tool_call>{}</tool_call>", ref)
    (1.0, 0.0)
  """
  if not isinstance(completion, str) or not isinstance(reference, str):
    return 0.0
  want, got = _blocks(reference), _blocks(completion)
  if want is None:  # a reference with free text: its tags in order, as found
    want = [m.group(1) for m in _BLOCK_RE.finditer(reference)]
  return float(got is not None and got == want)


def toolrl_reward(completion: str | None, reference: str | None, *, format_weight: float = 1.0,
                  max_reward: float = 3.0, min_reward: float = -3.0) -> float:
  r"""``R_final = format_weight · R_format + R_correct ∈ [−3, 4]`` for one response (ToolRL).

  A per-row reward function (``fn(completion, reference)``, as
  :func:`rlhf_jax.rewards.math_reward`), so a config can name it
  ``rlhf_jax.rewards:toolrl_reward`` and wrap it with
  :func:`rlhf_jax.rewards.batched_reward_fn`.

  Examples:
    >>> ref = '<think>.</think>\n<tool_call>\n{"name": "calc", "parameters": {"expression": "2*3"}}\n</tool_call>'
    >>> toolrl_reward(ref.replace(".", "I should multiply"), ref)
    4.0
    >>> toolrl_reward("<response>6</response>", ref)
    -3.0
  """
  return float(format_weight * toolrl_format(completion, reference)
               + toolrl_correctness(completion, reference, max_reward=max_reward, min_reward=min_reward))
