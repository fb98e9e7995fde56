"""The environment interface for multi-turn rollouts (plain Python, host side).

An environment plays one episode at a time::

    observation = env.reset(row)                    # list of messages: the prompt
    observation, reward, done, info = env.step(text) # the assistant's turn, as decoded text

Messages are dicts ``{"role": ..., "content": ...}`` (roles ``system``, ``user``, ``tool``), so
a chat template can render them; :mod:`rlhf_jax.envs.text` turns them into tokens.
``step`` returns a :class:`Step` (a NamedTuple, so it unpacks as the 4-tuple): the next
observation (``None`` or ``[]`` when there is none), this turn's reward, whether the episode is
over, and an ``info`` dict. Counted problems go into ``info["errors"]``, a dict from an error
kind (:data:`rlhf_jax.envs.tools.ERROR_KINDS`) to a count, and executed calls into
``info["tool_calls"]``; :func:`rlhf_jax.sampling.multiturn.make_multiturn_rollout_fn` sums them
over a batch into its metrics. ``step`` must not raise on anything the model wrote.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

__all__ = ["Env", "Message", "Step", "merge_counts"]

Message = dict  # {"role": str, "content": str}


class Step(NamedTuple):
  """The result of :meth:`Env.step`; unpacks as ``(observation, reward, done, info)``."""

  observation: list[Message] | None
  reward: float
  done: bool
  info: dict


class Env(Protocol):
  """What a multi-turn rollout needs of an environment (one instance per episode)."""

  def reset(self, row: Any) -> list[Message]:
    """Starts an episode for a data row; returns the prompt messages."""
    ...

  def step(self, assistant_text: str) -> Step:
    """Consumes one assistant turn; returns the observation, reward, done flag and info."""
    ...


def merge_counts(into: dict[str, int], more: dict[str, int] | None) -> dict[str, int]:
  """Adds the counts of ``more`` into ``into`` (in place) and returns it."""
  for k, v in (more or {}).items():
    into[k] = into.get(k, 0) + int(v)
  return into
