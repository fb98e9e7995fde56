"""Host-side environments and tools for multi-turn rollouts.

* `base`: the interface, ``reset(row) -> messages`` and ``step(text) -> Step(observation, reward, done, info)``;
* `tools`: tools with JSON-schema signatures, call parsing with counted errors, time-bounded execution;
* `tool_env`: `ToolEnv`, an episode of tool calls ending in an ``<answer>``;
* `calculator`: the safe calculator, generated arithmetic word problems, `CalculatorEnv`, demonstrations;
* `text`: `CharTokenizer` and the renderers that turn messages into tokens.

Rollouts over these environments: :mod:`rlhf_jax.sampling.multiturn`.
"""

from rlhf_jax.envs.base import Env, Message, Step, merge_counts
from rlhf_jax.envs.calculator import (
    DEMO_KINDS,
    TEMPLATES,
    CalculatorEnv,
    CalculatorError,
    calculate,
    calculator_tool,
    demonstration,
    format_number,
    make_arithmetic_problem,
    numeric_answer_reward,
    safe_eval,
)
from rlhf_jax.envs.text import DEFAULT_TAG_TOKENS, CharTokenizer, ChatRenderer, PlainRenderer
from rlhf_jax.envs.tool_env import ToolEnv, extract_tagged
from rlhf_jax.envs.tools import (
    CALL_ERROR_KINDS,
    ERROR_KINDS,
    CallError,
    Tool,
    ToolCall,
    ToolResult,
    ToolTimeout,
    make_tool,
    parse_tool_calls,
    python_tool,
    run_tool,
    validate_arguments,
)

__all__ = [
    "CALL_ERROR_KINDS",
    "DEFAULT_TAG_TOKENS",
    "DEMO_KINDS",
    "ERROR_KINDS",
    "TEMPLATES",
    "CalculatorEnv",
    "CalculatorError",
    "CallError",
    "CharTokenizer",
    "ChatRenderer",
    "Env",
    "Message",
    "PlainRenderer",
    "Step",
    "Tool",
    "ToolCall",
    "ToolEnv",
    "ToolResult",
    "ToolTimeout",
    "calculate",
    "calculator_tool",
    "demonstration",
    "extract_tagged",
    "format_number",
    "make_arithmetic_problem",
    "make_tool",
    "merge_counts",
    "numeric_answer_reward",
    "parse_tool_calls",
    "python_tool",
    "run_tool",
    "safe_eval",
    "validate_arguments",
]
