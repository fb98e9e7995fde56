"""Multi-turn rollouts: the jitted sampler talks to host-side environments, turn by turn.

Each turn, every unfinished episode generates with :func:`rlhf_jax.sampling.make_generate_fn`
until EOS, a stop sequence (e.g. ``</call>``) or ``max_turn_tokens``; the decoded turn goes to
its environment's ``step`` (:mod:`rlhf_jax.envs`), and the observation's tokens are appended to
the episode. An episode ends when its environment says so, after ``max_turns`` turns, or when its
``max_response_tokens`` budget (assistant and observation tokens together) is spent (then it is
*truncated*: a cut assistant turn keeps the tokens that fit; an observation that does not fit,
with room for one more token, is dropped).

**Re-prefill, no KV-cache reuse.** The existing sampler builds a fresh cache per call, so each
turn re-prefills the whole history (prompt + earlier turns + observations, left-padded to
``max_prompt_tokens + max_response_tokens``). That costs one prefill of the history per turn
(quadratic in the number of turns), and nothing else: the log-probs are exactly those of the
full sequence. Unfinished episodes are batched together, padded to a bucket size (``min_bucket``
× a power of two, capped at the batch), so a few shapes compile and finished episodes cost
nothing.

The output, :class:`Episodes`, has the fields of :class:`rlhf_jax.train.online.Rollout` and the
same layout, ``[prompt (left-padded to P) | response window (right-padded to N)]``, so it
feeds the GRPO loss (:func:`rlhf_jax.train.online.make_policy_loss`) unchanged. The response
window holds every turn, in order: assistant tokens (``response_mask_BxN`` 1, the sampler's
log-probs in ``sampler_logps_BxN``) and observation tokens (``response_mask_BxN`` 0 and
``observation_mask_BxN`` 1, log-prob 0), so observations carry no gradient. Rewards: per turn
(``turn_rewards``, and ``token_rewards_BxN`` with each turn's reward on its last token, for
token-level estimators) and per episode (``rewards_B``, their sum).

:class:`EpisodeSource` plugs episodes into :func:`rlhf_jax.train.online.run_online` as its
``prompt_fn`` / ``rollout_fn`` / ``reward_fn``. :func:`scripted_episode` lays out a scripted
(demonstration) episode with the same tokens the sampler would produce, and
:func:`sft_batch` turns such episodes into an SFT batch that trains on assistant tokens only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from rlhf_jax.envs.base import Step, merge_counts
from rlhf_jax.envs.tools import ERROR_KINDS
from rlhf_jax.sampling.generate import left_pad, make_generate_fn, stop_sequences_array

__all__ = ["EpisodeSource", "Episodes", "MultiTurnRollout", "ScriptedEpisode", "make_multiturn_rollout_fn",
           "scripted_episode", "sft_batch"]


class Episodes(NamedTuple):
  """A batch of finished episodes (NumPy, host side).

  The first seven fields are :class:`rlhf_jax.train.online.Rollout`'s, with ``T = P + N - 1``.

  Attributes:
    input_ids_BxT / attention_mask_BxT / targets_BxT: trainer rows (the attention mask is 1
      on prompt, assistant and observation tokens).
    response_mask_BxN: 1 on assistant (generated) tokens, 0 on observations and padding.
    tokens_BxN: the response window: every turn's assistant and observation tokens.
    sampler_logps_BxN: the sampler's log-probs of the assistant tokens, 0 elsewhere.
    group_ids_B: which prompt each episode answers.
    observation_mask_BxN: 1 on observation tokens.
    token_rewards_BxN: each turn's reward on the turn's last assistant token.
    rewards_B: the episode's return (sum of its turn rewards).
    num_turns_B: assistant turns played.
    truncated_B: ended by ``max_turns`` or the token budget (or the environment ended it on a
      turn the budget cut).
    turn_rewards: per episode, the list of its turn rewards.
    infos: per episode, the list of its environment ``info`` dicts.
    transcripts: per episode, the decoded prompt and response window.
    metrics: batch metrics (see :meth:`MultiTurnRollout.play`).
  """

  input_ids_BxT: np.ndarray
  attention_mask_BxT: np.ndarray
  targets_BxT: np.ndarray
  response_mask_BxN: np.ndarray
  tokens_BxN: np.ndarray
  sampler_logps_BxN: np.ndarray
  group_ids_B: np.ndarray
  observation_mask_BxN: np.ndarray
  token_rewards_BxN: np.ndarray
  rewards_B: np.ndarray
  num_turns_B: np.ndarray
  truncated_B: np.ndarray
  turn_rewards: list
  infos: list
  transcripts: list
  metrics: dict


def _as_step(out) -> Step:
  if isinstance(out, Step):
    return out
  obs, reward, done, info = out
  return Step(obs, float(reward), bool(done), dict(info or {}))


def episode_metrics(rewards_B, num_turns_B, truncated_B, response_mask_BxN, observation_mask_BxN,
                    infos) -> dict[str, float]:
  """Batch metrics: means per episode, and error totals over the batch.

  ``episode_reward``, ``turns``, ``truncated`` (fraction), ``assistant_tokens`` and
  ``observation_tokens`` (means), ``tool_calls`` (mean executed calls per episode),
  ``correct`` (fraction of episodes whose last ``info["correct"]`` is true) and
  ``errors/<kind>``: the total count of each error kind in the batch (every kind of
  :data:`rlhf_jax.envs.tools.ERROR_KINDS`, zeros included, plus any other an environment reports),
  with ``errors/total``.
  """
  errors = {k: 0 for k in ERROR_KINDS}
  calls = 0
  correct = 0
  for ep in infos:
    for info in ep:
      merge_counts(errors, info.get("errors"))
      calls += int(info.get("tool_calls", 0) or 0)
    correct += int(bool(ep and ep[-1].get("correct")))
  b = max(len(infos), 1)
  m = {"episode_reward": float(np.mean(rewards_B)), "turns": float(np.mean(num_turns_B)),
       "truncated": float(np.mean(truncated_B)), "assistant_tokens": float(response_mask_BxN.sum(-1).mean()),
       "observation_tokens": float(observation_mask_BxN.sum(-1).mean()), "tool_calls": calls / b,
       "correct": correct / b}
  m.update({f"errors/{k}": float(v) for k, v in errors.items()})
  m["errors/total"] = float(sum(errors.values()))
  return m


class MultiTurnRollout:
  """Plays batches of episodes; build it with :func:`make_multiturn_rollout_fn`."""

  def __init__(self, graphdef, *, renderer, max_turns: int, max_prompt_tokens: int, max_response_tokens: int,
               max_turn_tokens: int, processor=None, min_bucket: int = 8):
    for name, v in (("max_turns", max_turns), ("max_prompt_tokens", max_prompt_tokens),
                    ("max_response_tokens", max_response_tokens), ("max_turn_tokens", max_turn_tokens),
                    ("min_bucket", min_bucket)):
      if int(v) < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    self.renderer = renderer
    self.max_turns, self.max_turn_tokens = int(max_turns), int(max_turn_tokens)
    self.max_prompt_tokens, self.max_response_tokens = int(max_prompt_tokens), int(max_response_tokens)
    self.min_bucket = int(min_bucket)
    self.pad_id = renderer.pad_id
    self.eos_id = renderer.eos_id
    self._stops = [list(s) for s in renderer.stop_sequences if len(s)]
    self._generate = make_generate_fn(graphdef, max_new_tokens=self.max_turn_tokens, processor=processor,
                                      eos_id=self.eos_id, pad_id=self.pad_id)

  def _bucket(self, n: int, b: int) -> int:
    size = self.min_bucket
    while size < n:
      size *= 2
    return min(size, b)

  def start(self, envs: Sequence[Any], rows: Sequence[Any]) -> list[list[int]]:
    """Resets each environment with its row; returns the prompts' token ids."""
    if len(envs) != len(rows):
      raise ValueError(f"{len(envs)} environments for {len(rows)} rows")
    prompts = []
    for i, (env, row) in enumerate(zip(envs, rows)):
      ids = list(self.renderer.prompt_ids(env.reset(row)))
      if not ids or len(ids) > self.max_prompt_tokens:
        raise ValueError(f"episode {i}: the prompt has {len(ids)} tokens; need 1..max_prompt_tokens="
                         f"{self.max_prompt_tokens}")
      prompts.append(ids)
    return prompts

  def play(self, params, envs: Sequence[Any], prompts: Sequence[Sequence[int]], rng,
           group_ids_B=None) -> Episodes:
    """Plays the episodes of already-reset ``envs`` from their ``prompts`` to the end.

    ``rng`` is folded with the turn index for each turn's sampling. Returns :class:`Episodes`;
    its ``metrics`` are :func:`episode_metrics`.
    """
    b, p_len, n_len = len(envs), self.max_prompt_tokens, self.max_response_tokens
    if len(prompts) != b:
      raise ValueError(f"{len(prompts)} prompts for {b} environments")
    prompts = [list(map(int, x)) for x in prompts]
    resp: list[list[int]] = [[] for _ in range(b)]
    is_obs: list[list[int]] = [[] for _ in range(b)]
    logps: list[list[float]] = [[] for _ in range(b)]
    token_rewards = np.zeros((b, n_len), np.float32)
    turn_rewards: list[list[float]] = [[] for _ in range(b)]
    infos: list[list[dict]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    truncated = np.zeros(b, bool)
    turns = np.zeros(b, np.int32)
    for turn in range(self.max_turns):
      active = [i for i in range(b) if not done[i]]
      if not active:
        break
      size = self._bucket(len(active), b)
      slots = active + [active[0]] * (size - len(active))  # padding rows: outputs discarded
      ids, mask = left_pad([prompts[i] + resp[i] for i in slots], pad_id=self.pad_id, length=p_len + n_len)
      stop = stop_sequences_array([self._stops] * size) if self._stops else None
      gen = jax.device_get(self._generate(params, ids, mask, jax.random.fold_in(rng, turn), stop))
      for j, i in enumerate(active):
        n = int(gen.lengths_B[j])
        room = n_len - len(resp[i])
        toks = [int(t) for t in gen.tokens_BxN[j, :min(n, room)]]
        resp[i] += toks
        is_obs[i] += [0] * len(toks)
        logps[i] += [float(x) for x in gen.logps_BxN[j, :len(toks)]]
        turns[i] += 1
        step = _as_step(envs[i].step(self.renderer.assistant_text(toks)))
        token_rewards[i, max(len(resp[i]) - 1, 0)] += step.reward
        turn_rewards[i].append(float(step.reward))
        infos[i].append(step.info)
        if step.done:
          done[i], truncated[i] = True, n > room  # a turn cut by the budget counts as truncated
          continue
        obs = list(self.renderer.observation_ids(step.observation, after_eos=bool(toks) and toks[-1] == self.eos_id)
                   ) if step.observation else []
        if n > room or turn == self.max_turns - 1 or len(resp[i]) + len(obs) >= n_len:
          done[i] = truncated[i] = True  # out of tokens or turns
          continue
        resp[i] += obs
        is_obs[i] += [1] * len(obs)
        logps[i] += [0.0] * len(obs)
    tokens = np.full((b, n_len), self.pad_id, np.int32)
    resp_mask = np.zeros((b, n_len), np.float32)
    obs_mask = np.zeros((b, n_len), np.float32)
    lps = np.zeros((b, n_len), np.float32)
    for i in range(b):
      k = len(resp[i])
      tokens[i, :k] = resp[i]
      obs_mask[i, :k] = is_obs[i]
      resp_mask[i, :k] = 1 - np.asarray(is_obs[i], np.float32)
      lps[i, :k] = logps[i]
    prompt_ids, prompt_mask = left_pad(prompts, pad_id=self.pad_id, length=p_len)
    seq = np.concatenate([prompt_ids, tokens], 1)
    attn = np.concatenate([prompt_mask, ((resp_mask + obs_mask) > 0).astype(np.int32)], 1)
    rewards = np.asarray([sum(r) for r in turn_rewards], np.float32)
    group_ids = np.arange(b, dtype=np.int32) if group_ids_B is None else np.asarray(group_ids_B, np.int32)
    decode = self.renderer.tokenizer.decode
    transcripts = [decode(prompts[i] + resp[i]) for i in range(b)]
    metrics = episode_metrics(rewards, turns, truncated, resp_mask, obs_mask, infos)
    return Episodes(
        input_ids_BxT=seq[:, :-1].astype(np.int32), attention_mask_BxT=attn[:, :-1].astype(np.int32),
        targets_BxT=seq[:, 1:].astype(np.int32), response_mask_BxN=resp_mask, tokens_BxN=tokens,
        sampler_logps_BxN=lps, group_ids_B=group_ids, observation_mask_BxN=obs_mask,
        token_rewards_BxN=token_rewards, rewards_B=rewards, num_turns_B=turns, truncated_B=truncated,
        turn_rewards=turn_rewards, infos=infos, transcripts=transcripts, metrics=metrics)

  def __call__(self, params, envs: Sequence[Any], rows: Sequence[Any], rng, group_ids_B=None) -> Episodes:
    """``start`` then ``play``: one episode per (environment, row)."""
    return self.play(params, envs, self.start(envs, rows), rng, group_ids_B)


def make_multiturn_rollout_fn(graphdef, *, renderer, max_turns: int, max_prompt_tokens: int,
                              max_response_tokens: int, max_turn_tokens: int, processor=None,
                              min_bucket: int = 8) -> MultiTurnRollout:
  """``rollout(params, envs, rows, rng, group_ids_B=None) -> Episodes`` (a :class:`MultiTurnRollout`).

  Args:
    graphdef: the policy's graph definition (``nnx.split``).
    renderer: messages ↔ tokens (:class:`rlhf_jax.envs.text.PlainRenderer`, ``ChatRenderer``);
      its ``eos_id`` and ``stop_sequences`` end a turn.
    max_turns: assistant turns per episode at most.
    max_prompt_tokens: P, the prompt width (a longer prompt is an error).
    max_response_tokens: N, the response window: all turns' assistant and observation tokens.
    max_turn_tokens: tokens one assistant turn may generate.
    processor: sampling logits processor (``None``: greedy).
    min_bucket: the smallest batch a turn is padded to (see the module docstring).
  """
  return MultiTurnRollout(graphdef, renderer=renderer, max_turns=max_turns, max_prompt_tokens=max_prompt_tokens,
                          max_response_tokens=max_response_tokens, max_turn_tokens=max_turn_tokens,
                          processor=processor, min_bucket=min_bucket)


class EpisodeSource:
  """Multi-turn episodes as :func:`rlhf_jax.train.online.run_online`'s ``prompt_fn``,
  ``rollout_fn`` and ``reward_fn``.

  ``prompt_fn(iteration, attempt=0)`` draws ``rows_fn(iteration, attempt) -> (rows, group_ids_B)``
  (one row per episode: each prompt repeated G times for GRPO), builds ``make_env(row)`` for each
  and resets them; ``rollout_fn`` plays those episodes (the prompt arrays ``run_online`` passes are
  the same prompts, left-padded) and calls ``on_episodes(iteration, attempt, episodes)`` if given
  (e.g. to log ``episodes.metrics``, which ``run_online`` does not see); ``reward_fn`` returns the
  episodes' returns. The three are called in that order, once per draw (DAPO's dynamic sampling
  redraws with ``attempt > 0``).
  """

  def __init__(self, rollout: MultiTurnRollout, make_env: Callable[[Any], Any],
               rows_fn: Callable[..., tuple[Sequence[Any], np.ndarray]],
               on_episodes: Callable[[int, int, Episodes], None] | None = None):
    self.rollout, self.make_env, self.rows_fn, self.on_episodes = rollout, make_env, rows_fn, on_episodes
    self._pending = None
    self._last: Episodes | None = None

  def prompt_fn(self, iteration: int, attempt: int = 0):
    rows, group_ids = self.rows_fn(iteration, attempt)
    envs = [self.make_env(r) for r in rows]
    prompts = self.rollout.start(envs, rows)
    self._pending = (envs, prompts, iteration, attempt)
    return prompts, np.asarray(group_ids, np.int32)

  def rollout_fn(self, params, prompt_ids_BxP, prompt_mask_BxP, rng, group_ids_B) -> Episodes:
    if self._pending is None:
      raise RuntimeError("EpisodeSource.rollout_fn called before prompt_fn")
    envs, prompts, iteration, attempt = self._pending
    self._pending = None
    if len(prompts) != len(prompt_ids_BxP):
      raise ValueError(f"rollout_fn got {len(prompt_ids_BxP)} prompts; prompt_fn drew {len(prompts)}")
    episodes = self.rollout.play(params, envs, prompts, rng, group_ids_B)
    self._last = episodes
    if self.on_episodes is not None:
      self.on_episodes(iteration, attempt, episodes)
    return episodes

  def reward_fn(self, prompts, tokens_BxN, lengths_B) -> np.ndarray:
    del prompts, lengths_B
    if self._last is None or len(self._last.rewards_B) != len(tokens_BxN):
      raise RuntimeError("EpisodeSource.reward_fn called before rollout_fn")
    return self._last.rewards_B


class ScriptedEpisode(NamedTuple):
  """A scripted episode's tokens: ``ids`` (prompt + all turns), ``assistant_mask`` (1 on
  assistant tokens), the turn rewards and the environment's infos."""

  ids: list[int]
  assistant_mask: list[int]
  turn_rewards: list[float]
  infos: list[dict]


def scripted_episode(env, row, renderer, assistant_texts: Sequence[str]) -> ScriptedEpisode:
  """Plays ``assistant_texts`` as the assistant's turns against ``env`` (e.g. a demonstration).

  The tokens are those :class:`MultiTurnRollout` would lay out had the model written these
  turns: ``renderer.assistant_ids`` per turn, the environment's real observations between them.
  Turns after the environment ends the episode are not played.
  """
  ids = list(renderer.prompt_ids(env.reset(row)))
  mask = [0] * len(ids)
  rewards, infos = [], []
  for text in assistant_texts:
    toks = list(renderer.assistant_ids(text))
    ids += toks
    mask += [1] * len(toks)
    step = _as_step(env.step(renderer.assistant_text(toks)))
    rewards.append(float(step.reward))
    infos.append(step.info)
    if step.done:
      break
    if step.observation:
      obs = list(renderer.observation_ids(step.observation, after_eos=bool(toks) and toks[-1] == renderer.eos_id))
      ids += obs
      mask += [0] * len(obs)
  return ScriptedEpisode(ids, mask, rewards, infos)


def sft_batch(episodes: Sequence[ScriptedEpisode], *, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Right-padded SFT rows (``input_ids_BxT``, ``targets_BxT``, ``loss_mask_BxT``,
  ``attention_mask_BxT``, ``T = seq_len``) that train on the assistant tokens only.

  An episode longer than ``seq_len + 1`` tokens is an error (no silent truncation).
  """
  b = len(episodes)
  seq = np.full((b, seq_len + 1), pad_id, np.int32)
  msk = np.zeros((b, seq_len + 1), np.float32)
  real = np.zeros((b, seq_len + 1), np.int32)
  for i, ep in enumerate(episodes):
    k = len(ep.ids)
    if k > seq_len + 1:
      raise ValueError(f"episode {i} has {k} tokens, more than seq_len + 1 = {seq_len + 1}")
    seq[i, :k], msk[i, :k], real[i, :k] = ep.ids, ep.assistant_mask, 1
  return {"input_ids_BxT": seq[:, :-1], "targets_BxT": seq[:, 1:], "loss_mask_BxT": msk[:, 1:],
          "attention_mask_BxT": real[:, :-1]}
