"""Writes example data files for the recipes: ``python -m rlhf_jax.train.demo_files DIR``.

The README's "Bring your own model and data" commands run as written on these files (swap in
your own). They hold the generated "What is a + b?" task of
:func:`rlhf_jax.train.recipe.demo_rows` in the formats users bring:

==================  ==============================================  ======================
file                rows                                            recipe
==================  ==============================================  ======================
``chats.jsonl``     ``{"messages": [...]}``                           sft
``pairs.jsonl``     ``{"prompt", "chosen", "rejected"}`` (TRL)        dpo, reward_model
``kto.jsonl``       ``{"prompt", "completion", "label"}``             dpo (unpaired: kto)
``ranked.jsonl``    ``{"prompt", "completions": [{response, score}]}``  dpo (listwise), reward_model
``prompts.jsonl``   ``{"prompt", "answer"}``                          grpo
``my_rewards.py``   ``correct``, ``number_only`` (TRL signature)          grpo (``reward.fns``)
==================  ==============================================  ======================

Each comes with a held-out ``eval_<name>.jsonl`` on disjoint questions.
"""

from __future__ import annotations

import json
import os
import sys

from rlhf_jax.train.recipe import demo_rows

FILES = {"chats": "sft", "pairs": "preference", "kto": "kto", "ranked": "ultrafeedback", "prompts": "prompt"}

REWARDS = '''"""Example reward functions for experiments/grpo.py (TRL's reward_funcs signature)."""

import re

from rlhf_jax.rewards import math_reward


def correct(completions, prompts, answer, **kwargs):
    """1.0 when the completion's final number is the prompt file's `answer` column."""
    return [math_reward(c, a) for c, a in zip(completions, answer)]


def number_only(completions, **kwargs):
    """0.5 for a bare number, as the system prompt asks."""
    return [0.5 if re.fullmatch(r"\\s*-?\\d+\\s*", c) else 0.0 for c in completions]
'''


def write_demo_files(directory: str, *, num_train: int = 512, num_eval: int = 64, seed: int = 0) -> dict[str, str]:
  """Writes the files of the module doc into ``directory``; returns ``{name: path}``."""
  os.makedirs(directory, exist_ok=True)
  out = {}
  for name, fmt in FILES.items():
    for prefix, split, n in (("", "train", num_train), ("eval_", "eval", num_eval)):
      path = os.path.join(directory, f"{prefix}{name}.jsonl")
      with open(path, "w") as f:
        for row in demo_rows(fmt, split, n, seed=seed):
          f.write(json.dumps(row) + "\n")
      out[prefix + name] = path
  path = os.path.join(directory, "my_rewards.py")
  with open(path, "w") as f:
    f.write(REWARDS)
  out["my_rewards"] = path
  return out


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1 or argv[0].startswith("-"):
    print("usage: python -m rlhf_jax.train.demo_files DIR", file=sys.stderr)
    return 2
  for name, path in write_demo_files(argv[0]).items():
    print(f"{name}: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
