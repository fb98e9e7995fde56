"""Environments and tools: the safe calculator, call parsing edge cases, bounded tool execution,
counted errors, renderers, demonstrations and ToolRL's reward decomposition."""

import functools
import json
import math
import re
import time
from fractions import Fraction

import numpy as np
import pytest

from rlhf_jax import envs, rewards, sampling
from rlhf_jax.envs import tools as tools_lib

CALC = envs.calculator_tool()


def _spin(seconds: float) -> str:
  end = time.time() + seconds
  while time.time() < end:
    pass
  return "done"


# ---------------------------------------------------------------------------- calculator


@pytest.mark.parametrize("expr,value", [
    ("37*12+5", 449), ("(7-2)/4", Fraction(5, 4)), ("2**-2", Fraction(1, 4)), ("-(3)**2", -9), ("7//2", 3),
    ("7 % 3", 1), ("2.5*2", 5), ("0.1+0.2", Fraction(3, 10)), ("((((1))))", 1), ("2**64", 2**64),
])
def test_safe_eval_known_answers(expr, value):
  assert envs.safe_eval(expr) == value


@pytest.mark.parametrize("expr,why", [
    ("__import__('os')", "a call"), ("x+1", "a name"), ("(1).real", "an attribute"), ("1/0", "division by zero"),
    ("0**-1", "division by zero"), ("9**9**9", "exponent"), ("10**31", "too large"), ("1e400", "too large"),
    ("", "empty"), ("1+", "cannot parse"), ("1" * 201, "longer than"), ("+".join(["1"] * 40), "parts"),
    ("[1, 2]", "List"), ("'a' * 3", "Constant"), ("True + 1", "Constant"),
])
def test_safe_eval_rejects_with_a_reason(expr, why):
  with pytest.raises(envs.CalculatorError, match=why):
    envs.safe_eval(expr)


def test_format_number():
  assert [envs.format_number(Fraction(x)) for x in (449, Fraction(5, 4), Fraction(1, 3), Fraction(-7, 2), 0)] == \
      ["449", "1.25", "0.333333", "-3.5", "0"]
  assert envs.format_number(Fraction(1, 10**9)) == "0"


def test_generated_problems_match_their_expressions():
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(200):
    p = envs.make_arithmetic_problem(rng)
    a, b, c = (int(x) for x in re.findall(r"\d+", p["question"]))
    question, expression = (f.format(a=a, b=b, c=c) for f in envs.TEMPLATES[p["template"]])
    assert (p["question"], p["expression"], p["answer"]) == (question, expression, envs.calculate(expression))
    assert 10 <= a < 100 and 10 <= b < 100 and 1 <= c < 10
    seen.add(p["template"])
  assert seen == set(range(len(envs.TEMPLATES)))


# ---------------------------------------------------------------------------- parsing


def _kinds(errors):
  return [e.kind for e in errors]


@pytest.mark.parametrize("text,args", [
    ("<call>calc(37*12+5)</call>", {"expression": "37*12+5"}),
    ("<call> calc( 37 * 12 ) </call>", {"expression": "37 * 12"}),
    ("<call>calc('1+2')</call>", {"expression": "1+2"}),
    ("<call>calc(expression=\"1+2\")</call>", {"expression": "1+2"}),
    ("<call>calc(449)</call>", {"expression": "449"}),
    ('<call>{"name": "calc", "arguments": {"expression": "2*3"}}</call>', {"expression": "2*3"}),
    ('<call>{"name": "calc", "parameters": {"expression": "2*3"}}</call>', {"expression": "2*3"}),
    ('<call>{"name": "calc", "arguments": "{\\"expression\\": \\"2*3\\"}"}</call>', {"expression": "2*3"}),
])
def test_parse_accepted_call_syntaxes(text, args):
  calls, errors = envs.parse_tool_calls(text, [CALC])
  assert errors == [] and [(c.name, c.arguments) for c in calls] == [("calc", args)]


@pytest.mark.parametrize("text,kinds", [
    ("<call>calc(1+2", ["malformed_call"]),                              # unclosed
    ("calc(1)</call>", ["malformed_call"]),                              # stray close tag
    ("<call></call>", ["malformed_call"]),                               # empty
    ("<call>calc(1+2</call>", ["malformed_call"]),                       # unbalanced parenthesis
    ("<call>just text</call>", ["malformed_call"]),                      # not a call
    ('<call>{"name": "calc", "arguments": {</call>', ["malformed_call"]),  # bad JSON
    ('<call>{"arguments": {}}</call>', ["malformed_call"]),              # no name
    ('<call>["calc"]</call>', ["malformed_call"]),                       # not an object
    ("<call>sin(1)</call>", ["unknown_tool"]),
    ('<call>{"name": "sin", "arguments": {}}</call>', ["unknown_tool"]),
    ("<call>calc()</call>", ["bad_arguments"]),                          # missing required
    ("<call>calc(expression='1', x=2)</call>", ["bad_arguments"]),       # unknown parameter
    ('<call>{"name": "calc", "arguments": {"expression": 3}}</call>', ["bad_arguments"]),  # wrong type
    ("<call>calc(1)<call>calc(2)</call>", ["malformed_call"]),           # nested open: first unclosed
])
def test_parse_rejects_with_counted_kinds(text, kinds):
  calls, errors = envs.parse_tool_calls(text, [CALC])
  assert _kinds(errors) == kinds, errors
  assert all(isinstance(e.message, str) and e.message for e in errors)
  if text.startswith("<call>calc(1)<call>"):
    assert [c.arguments for c in calls] == [{"expression": "2"}]
  else:
    assert calls == []


def test_parse_several_calls_in_order_and_non_text():
  calls, errors = envs.parse_tool_calls("a<call>calc(1)</call> b <call>calc(2)</call><call>x(", [CALC])
  assert [c.arguments["expression"] for c in calls] == ["1", "2"] and _kinds(errors) == ["malformed_call"]
  assert envs.parse_tool_calls("no calls here", [CALC]) == ([], [])
  calls, errors = envs.parse_tool_calls(None, [CALC])
  assert calls == [] and _kinds(errors) == ["malformed_call"]


def test_parse_positional_literals_map_to_schema_order():
  def area(width: float, height: float, unit: str = "m") -> str:
    return f"{width * height}{unit}"

  tool = envs.make_tool(area)
  calls, errors = envs.parse_tool_calls("<call>area(2, 3.5, unit='cm')</call><call>area(1, 2, 3, 4)</call>", [tool])
  assert [c.arguments for c in calls] == [{"width": 2, "height": 3.5, "unit": "cm"}]
  assert _kinds(errors) == ["malformed_call"]  # too many positional arguments


def test_make_tool_schema_and_validate_arguments():
  def f(a: int, b: str, c: bool = False, d: list = None, e=None):
    """First line.

    More."""

  t = envs.make_tool(f)
  assert t.description == "First line."
  assert t.parameters["required"] == ["a", "b"]
  assert t.parameters["properties"] == {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "boolean"},
                                        "d": {"type": "array"}, "e": {}}
  assert t.spec()["function"]["name"] == "f"
  v = envs.validate_arguments
  assert v(t.parameters, {"a": 1, "b": "x", "e": object()}) == []
  assert v(t.parameters, {"a": 2.0, "b": "x"}) == []  # an integral float is an integer (JSON)
  assert v(t.parameters, {"a": True, "b": "x"}) == ["parameter 'a' must be integer, got bool"]
  assert v({"type": "object", "properties": {"k": {"type": "string", "enum": ["x"]}}}, {"k": "y"}) == \
      ["parameter 'k' must be one of ['x']"]
  with pytest.raises(ValueError, match="name"):
    envs.Tool(name="bad name", fn=f, parameters={"type": "object"})
  with pytest.raises(ValueError, match="picklable"):
    envs.Tool(name="lam", fn=lambda: 1, parameters={"type": "object"}, isolation="subprocess")


# ---------------------------------------------------------------------------- execution


def test_run_tool_errors_are_results_not_exceptions():
  res = envs.run_tool(CALC, {"expression": "1/0"})
  assert res == envs.ToolResult(False, "CalculatorError: division by zero", "tool_error")
  assert envs.run_tool(CALC, {"expression": "6*7"}) == envs.ToolResult(True, "42", None)
  boom = envs.make_tool(lambda: {}["missing"], name="boom")
  assert envs.run_tool(boom, {}).error_kind == "tool_error"
  listy = envs.make_tool(lambda: [1, {"a": 2}], name="listy")
  assert envs.run_tool(listy, {}).output == '[1, {"a": 2}]'
  long = envs.Tool(name="long", fn=lambda: "x" * 100, parameters={"type": "object"}, max_output_chars=10)
  assert envs.run_tool(long, {}).output == "xxxxxxx..."


def test_inline_tool_timeout():
  slow = envs.make_tool(_spin, name="spin", timeout_s=0.2)
  t0 = time.time()
  res = envs.run_tool(slow, {"seconds": 5.0})
  assert res.error_kind == "tool_timeout" and not res.ok and time.time() - t0 < 2.0
  assert envs.run_tool(slow, {"seconds": 0.0}).output == "done"  # the timer was cleared


def test_subprocess_tool_timeout_error_and_result():
  # Picklable stdlib callables, so the child does not import this test module.
  sleep = envs.Tool(name="sleep", fn=functools.partial(time.sleep, 30), parameters={"type": "object"},
                    timeout_s=0.5, isolation="subprocess")
  bad_sqrt = envs.Tool(name="sqrt", fn=functools.partial(math.sqrt, -1), parameters={"type": "object"},
                       isolation="subprocess")
  dumps = envs.make_tool(json.dumps, name="dumps", parameters={"type": "object", "properties": {"obj": {}}},
                         isolation="subprocess", timeout_s=10.0)
  t0 = time.time()
  assert envs.run_tool(sleep, {}).error_kind == "tool_timeout"
  assert time.time() - t0 < 20.0
  assert envs.run_tool(dumps, {"obj": [1, 2]}) == envs.ToolResult(True, "[1, 2]", None)
  res = envs.run_tool(bad_sqrt, {})
  assert res.error_kind == "tool_error" and "ValueError" in res.output
  assert envs.run_tool(dumps, {"obj": [1], "x": 2}).error_kind == "tool_error"  # TypeError in the child


def test_python_tool_runs_code_in_a_subprocess_with_a_timeout():
  py = envs.python_tool(timeout_s=1.0)
  assert envs.run_tool(py, {"code": "print(2 + 3)"}) == envs.ToolResult(True, "5", None)
  res = envs.run_tool(py, {"code": "raise KeyError('k')"})
  assert res.error_kind == "tool_error" and "KeyError" in res.output
  t0 = time.time()
  assert envs.run_tool(py, {"code": "while True: pass"}).error_kind == "tool_timeout"
  assert time.time() - t0 < 5.0


# ---------------------------------------------------------------------------- environments


def test_calculator_env_counts_every_error_kind_and_never_raises():
  env = envs.CalculatorEnv(max_calls=2, error_penalty=-0.1)
  row = {"question": "what is 6*7+0?", "answer": "42"}
  assert env.reset(row) == [{"role": "user", "content": "what is 6*7+0?"}]
  obs, r, done, info = env.step("<call>calc(6*7</call>")
  assert not done and info["errors"] == {"malformed_call": 1} and r == pytest.approx(-0.1)
  assert obs == [{"role": "tool", "content": "<error>not a call: 'calc(6*7' (write name(arguments) or JSON)</error>"}]
  obs, r, done, info = env.step("<call>calc(1/0)</call><call>sqrt(2)</call>")
  assert info["errors"] == {"tool_error": 1, "unknown_tool": 1} and info["tool_calls"] == 1
  assert obs[0]["content"] == "<error>unknown tool 'sqrt'; tools: ['calc']</error><error>CalculatorError: division by zero</error>"
  obs, r, done, info = env.step("<call>calc(6*7)</call><call>calc(1)</call>")
  assert obs[0]["content"] == "<result>42</result><error>at most 2 calls per episode</error>"
  assert info["errors"] == {"too_many_calls": 1} and info["tool_calls"] == 1
  assert env.counts == {"malformed_call": 1, "tool_error": 1, "unknown_tool": 1, "too_many_calls": 1}
  step = env.step("<answer> 42.0 </answer>")
  assert step == envs.Step(None, 1.0, True, {"answer": "42.0", "correct": True, "tool_calls": 0, "errors": {}})


def test_calculator_env_answers_no_action_and_options():
  row = {"question": "q", "answer": "-3.5"}
  env = envs.CalculatorEnv(format_bonus=0.25)
  env.reset(row)
  assert env.step("<answer>-7/2</answer>").reward == 1.25
  env.reset(row)
  assert env.step("<answer>abc</answer>")[:3] == (None, 0.25, True)
  env.reset(row)
  assert env.step("I think it is 3")[1:3] == (0.0, True) and env.counts == {"no_action": 1}
  env = envs.CalculatorEnv(end_on_no_action=False, error_detail=False)
  env.reset(row)
  obs, r, done, info = env.step("hmm")
  assert not done and obs[0]["content"] == "<error>no_action</error>" and info["errors"] == {"no_action": 1}
  obs, *_ = env.step("<call>calc(</call>")
  assert obs[0]["content"] == "<error>malformed_call</error>"  # kinds only, for tiny models
  with pytest.raises(RuntimeError, match="before reset"):
    envs.CalculatorEnv().step("x")
  messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
  assert envs.CalculatorEnv().reset({"messages": messages, "answer": "1"}) == messages
  assert envs.CalculatorEnv(system_prompt="sys").reset(row)[0] == {"role": "system", "content": "sys"}


def test_extract_tagged_edge_cases():
  ex = envs.extract_tagged
  assert ex("<answer>1</answer><answer>2</answer>", "<answer>", "</answer>") == "2"
  assert ex("<answer>1</answer><answer>2", "<answer>", "</answer>") == "1"
  assert ex("</answer><answer>", "<answer>", "</answer>") is None
  assert ex(None, "<a>", "</a>") is None


# ---------------------------------------------------------------------------- text and demonstrations


def test_char_tokenizer_roundtrip_and_unknowns():
  tok = envs.CharTokenizer()
  text = "<bos>what is 2*3?<call>calc(2*3)</call><result>6</result>"
  ids = tok.encode(text)
  assert tok.decode(ids) == text and ids.count(tok.encode("<call>")[0]) == 1
  assert tok.encode("é") == [tok.unk_id] and tok.decode([tok.eos_id, tok.pad_id], skip_special_tokens=True) == ""
  assert tok.decode([tok.eos_id]) == "<eos>"
  with pytest.raises(ValueError):
    tok.decode([tok.vocab_size])


def test_plain_and_chat_renderers():
  from rlhf_jax.models import Tokenizer

  tok = envs.CharTokenizer()
  plain = envs.PlainRenderer(tok, stop_strings=("</call>",))
  assert plain.prompt_ids([{"role": "user", "content": "hi"}]) == [tok.bos_id] + tok.encode("hi")
  assert plain.stop_sequences == [tok.encode("</call>")]
  assert plain.assistant_text(tok.encode("ok") + [tok.eos_id, tok.pad_id]) == "ok"

  btok = Tokenizer.byte_level()
  chat = envs.ChatRenderer(btok, stop_strings=("</call>",))
  prompt = btok.decode(chat.prompt_ids([{"role": "user", "content": "2*3?"}]))
  assert prompt == "<|im_start|>user\n2*3?<|im_end|>\n<|im_start|>assistant\n"
  obs = [{"role": "tool", "content": "<result>6</result>"}]
  assert btok.decode(chat.observation_ids(obs)) == "\n<|im_start|>tool\n<result>6</result><|im_end|>\n<|im_start|>assistant\n"
  assert chat.observation_ids(obs, after_eos=False)[0] == btok.eos_id
  turn = chat.assistant_ids("<call>calc(2*3)</call>")
  assert turn[-1] == btok.eos_id and chat.assistant_text(turn) == "<call>calc(2*3)</call>"
  # The episode's tokens equal the template's rendering of the whole conversation.
  msgs = [{"role": "user", "content": "2*3?"}, {"role": "assistant", "content": "<call>calc(2*3)</call>"}] + obs
  whole = btok.encode(btok.apply_chat_template(msgs, add_generation_prompt=True), add_special_tokens=False)
  assert chat.prompt_ids(msgs[:1]) + turn + chat.observation_ids(obs) == whole


@pytest.mark.parametrize("kind,reward,errors", [("tool", 1.0, {}), ("direct", 0.0, {}),
                                                ("malformed", 1.0, {"malformed_call": 1}), ("slip", 0.0, {})])
def test_scripted_demonstrations_against_the_real_env(kind, reward, errors):
  tok = envs.CharTokenizer()
  renderer = envs.PlainRenderer(tok, stop_strings=envs.CalculatorEnv().stop_strings)
  rng = np.random.default_rng(3)
  for _ in range(20):
    row = envs.make_arithmetic_problem(rng)
    env = envs.CalculatorEnv(error_detail=False)
    ep = sampling.scripted_episode(env, row, renderer, envs.demonstration(row, rng, kind))
    assert sum(ep.turn_rewards) == reward and env.counts == errors
    assert len(ep.ids) == len(ep.assistant_mask)
    text = tok.decode(ep.ids)
    assert text.startswith("<bos>" + row["question"])
    if kind in ("tool", "malformed"):  # deterministic turns: the mask marks exactly them
      assistant = tok.decode([t for t, m in zip(ep.ids, ep.assistant_mask) if m])
      assert assistant == "".join(envs.demonstration(row, rng, kind))
      assert f"<result>{row['answer']}</result><answer>{row['answer']}</answer>" in text
  batch = sampling.sft_batch([ep], seq_len=len(ep.ids) - 1)
  np.testing.assert_array_equal(batch["loss_mask_BxT"][0], ep.assistant_mask[1:])
  with pytest.raises(ValueError, match="more than"):
    sampling.sft_batch([ep], seq_len=len(ep.ids) - 2)
  with pytest.raises(ValueError, match="kind"):
    envs.demonstration(row, rng, "other")


# ---------------------------------------------------------------------------- ToolRL reward


def _c(name, **params):
  return {"name": name, "parameters": params}


def _toolrl_by_hand(pred, gt):
  """The paper's formula, with the best matching found by trying every permutation."""
  import itertools
  from collections import Counter

  def jac(a, b):
    ca, cb = Counter(a), Counter(b)
    inter = sum((ca & cb).values())
    return 1.0 if not a and not b else inter / (len(a) + len(b) - inter)

  r_name = jac([g["name"] for g in gt], [p["name"] for p in pred])
  best = 0.0
  k = max(len(pred), len(gt))
  padded = pred + [None] * (k - len(pred))
  for perm in itertools.permutations(padded, len(gt)):
    s = 0.0
    for g, p in zip(gt, perm):
      if p is None or p["name"] != g["name"]:
        continue
      s += jac(list(g["parameters"]), list(p["parameters"]))
      s += sum(1.0 for key, v in g["parameters"].items() if key in p["parameters"] and p["parameters"][key] == v)
    best = max(best, s)
  s_max = 1 + len(gt) + sum(len(g["parameters"]) for g in gt)
  return 6 * (r_name + best) / s_max - 3


def test_toolrl_correctness_matches_the_formula():
  gt = [_c("search", query="jax", k=3), _c("calc", expression="2*3"), _c("search", query="flax", k=5)]
  cases = [
      gt,
      [_c("search", query="flax", k=5), _c("search", query="jax", k=3)],   # order does not matter; one missing
      [_c("search", query="jax", k=5), _c("search", query="flax")],          # optimal matching needed
      [_c("calc", expression="2+3", precision=2)],
      [_c("weather", city="x")],
      [],
      gt + [_c("calc", expression="1")],                                    # an extra call
  ]
  for pred in cases:
    got = rewards.toolrl_correctness(pred, gt)
    assert got == pytest.approx(_toolrl_by_hand(pred, gt)), pred
    assert -3.0 <= got <= 3.0
  assert rewards.toolrl_correctness(gt, gt) == 3.0
  assert rewards.toolrl_correctness([], gt) == pytest.approx(6 * 0 / 7 - 3)
  assert rewards.toolrl_correctness([_c("x")], []) == 0.0  # no ground-truth calls


def test_toolrl_optimal_matching_beats_greedy():
  gt = [_c("f", a=1, b=2), _c("f", a=1)]
  pred = [_c("f", a=1), _c("f", a=1, b=2)]
  c = rewards.toolrl_components(pred, gt)
  assert c["r_param"] == 2.0 and c["r_value"] == 3.0 and c["match"] == c["s_max"] == 6.0


def test_toolrl_format_parse_and_reward():
  call = '{"name": "calc", "parameters": {"expression": "2*3"}}'
  ref = f"<think>.</think>\n<tool_call>\n{call}\n</tool_call>"
  good = f"<think>multiply</think>\n<tool_call>\n{call}\n</tool_call>"
  assert rewards.toolrl_format(good, ref) == 1.0 and rewards.toolrl_reward(good, ref) == 4.0
  assert rewards.toolrl_format(good + " extra", ref) == 0.0
  assert rewards.toolrl_format(f"<tool_call>\n{call}\n</tool_call><think>x</think>", ref) == 0.0  # order
  assert rewards.toolrl_format(good + "<think>again</think>", ref) == 0.0
  assert rewards.toolrl_format("<response>hi</response>", "<think>a</think><response>b</response>") == 0.0
  assert rewards.toolrl_format("<think>a</think> <response>b</response>", "<think>c</think><response>d</response>") == 1.0
  assert rewards.toolrl_reward(None, ref) == -3.0 and rewards.toolrl_reward("<tool_call>{oops}</tool_call>", ref) == -3.0
  two = f"<tool_call>\n{call}\n\n{call}\n</tool_call>"
  assert rewards.parse_toolrl_calls(two) == [_c("calc", expression="2*3")] * 2
  assert rewards.parse_toolrl_calls('<tool_call>{"name": 1}</tool_call>') is None
  assert rewards.parse_toolrl_calls('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>') == [_c("f", x=1)]
  assert rewards.multiset_jaccard([], []) == 1.0 and rewards.multiset_jaccard(["a"], []) == 0.0
  batched = rewards.batched_reward_fn(rewards.toolrl_reward)
  np.testing.assert_allclose(batched([good, "nothing"], reference=[ref, ref]), [4.0, -3.0])


def test_error_kinds_are_documented_constants():
  assert set(tools_lib.CALL_ERROR_KINDS) <= set(envs.ERROR_KINDS)
  assert len(set(envs.ERROR_KINDS)) == len(envs.ERROR_KINDS)
