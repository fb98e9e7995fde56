"""Normalised examples (see `rlhf_jax.data.formats`) -> fixed-shape token batches.

The tokenizer is any object with ``encode(text) -> list[int]`` and
``apply_chat_template(messages, add_generation_prompt) -> str`` (a Hugging Face tokenizer
fits after wrapping ``apply_chat_template(..., tokenize=False)``). Nothing here depends on a model.

**Tokenisation.** The prompt is ``apply_chat_template(prompt, add_generation_prompt=True)``;
a response is the text that ``apply_chat_template(prompt + response, False)`` adds after it
(the template must render the prompt as a prefix of the conversation). Prompt and response
are encoded separately; ``eos_id``, if given, is appended to every response.
For multi-turn SFT, every assistant turn is a response and the other turns are context.

**Truncation policy** (explicit, counted in ``stats``), chosen by ``truncation``:

- ``"tokens"`` (the functions' default): the prompt (everything before the first response
  token) keeps its *last* ``max_prompt_len`` tokens (truncated from the LEFT); then the
  response keeps its *first* ``max_len - prompt_len`` tokens (truncated from the RIGHT).
- ``"turns"`` (the recipes' default): a prompt longer than ``max_prompt_len`` loses whole
  turns from the left, re-rendered with the chat template each time, never its leading
  system message(s) nor its last user turn (a dropped turn is a user message with the
  replies after it, so the rest still starts with a user turn). If system + last turn
  still do not fit, the tokens of the rendered system turn(s) stay first and the rest is
  cut from the left to fit. A multi-turn ``sft`` conversation longer than ``max_len`` first
  loses its earliest (user, assistant) exchanges after the system turn, while more than one
  exchange remains. Then the response is right-truncated to ``max_len`` as with ``"tokens"``.

``stats`` counts ``sequences``, ``prompt_truncated``/``prompt_tokens_dropped`` and
``response_truncated``/``response_tokens_dropped`` (and ``list_truncated`` for ranked lists
longer than ``num_completions``); with ``"turns"`` also ``prompt_turns_dropped`` (messages
removed; SFT exchanges included) and ``truncated`` (sequences cut in any way). Every token
removed from the left (dropped turns included) counts in ``prompt_tokens_dropped``, every
token cut at the right end in ``response_tokens_dropped``. With ``overlong="raise"``, an
example that would be truncated raises `rlhf_jax.data.formats.DataError` naming its file
and line instead. `warn_if_truncated` logs one warning per stats dict once too many
sequences were truncated (`make_collate` calls it after every batch).

**Bad examples.** Every ``tokenize_*`` function checks each example first
(`rlhf_jax.data.formats.validate_example`: its kind, the keys it needs, their types, chat
roles, finite scores) and any error while tokenising it (an over-long row with
``overlong="raise"``, a chat template that refuses it, an undecodable record in
`make_collate`) is a one-line `DataError` naming the example's source ``FILE:LINE`` (when it
has one), its place in the batch (``record K of the batch``) and the field.

**Row layout** (as `rlhf_jax.data.synthetic.make_sft_batch`): ``L = P + R <= max_len`` real
tokens right-padded with ``pad_id`` to ``T = max_len``. ``targets[t] = input_ids[t + 1]``
(last column ``pad_id``); ``loss_mask[t]`` (float32) is 1 exactly where ``targets[t]`` is a
response token (aligned with the targets, never on prompt or padding); ``attention_mask``
(int32) is 1 on the ``L`` real tokens.

Batch keys: pairs -> ``{chosen,rejected}_{input_ids,targets,loss_mask,attention_mask}_BxT``;
SFT -> ``{input_ids,targets,loss_mask,attention_mask}_BxT``; unpaired (KTO) -> the SFT keys
plus ``labels_B`` (1.0 desirable); ranked -> ``{...}_BxKxT``, ``scores_BxK``,
``list_mask_BxK``; prompts (``prompt`` and ``prompt_answer``) -> left-padded
``prompt_ids_BxP``, ``prompt_mask_BxP``, ``fields`` (a list of dicts, host-side only: a
``prompt`` example's extra columns, ``{"answer", "solution"}`` for ``prompt_answer``) and
``answers`` (a list of strings) when every example has one; step-labelled solutions
(``stepwise``, `tokenize_steps`) -> ``input_ids_BxT``, ``attention_mask_BxT``, ``step_mask_BxT``,
``step_labels_BxT``.

**Packing** (`pack_rows`): several SFT sequences per row, with ``segment_ids_BxT``
(1, 2, ... per sequence, 0 on padding) and ``positions_BxT`` (restarting at 0 in every
segment). Attention must then be block-diagonal (a token attends only within its segment);
the current model (`rlhf_jax.models`) takes no segment ids, so packed rows are a documented
helper only: feeding them to the model as-is would let sequences attend to earlier ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from rlhf_jax.data.formats import PAIR_FIELDS, STEPWISE_FORMAT, DataError, validate_example

__all__ = [
    "TRUNCATIONS",
    "Tokenizer",
    "make_collate",
    "new_token_stats",
    "pack_rows",
    "sequence_row",
    "tokenize_pairs",
    "tokenize_prompts",
    "tokenize_ranked",
    "tokenize_sft",
    "tokenize_steps",
    "tokenize_unpaired",
    "truncate",
    "warn_if_truncated",
]

ROW_KEYS = ("input_ids", "targets", "loss_mask", "attention_mask")
TRUNCATIONS = ("tokens", "turns")
_TURN_KEYS = ("prompt_turns_dropped", "truncated")
_log = logging.getLogger("rlhf_jax")


class Tokenizer(Protocol):

  def encode(self, text: str) -> list[int]:
    ...

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
    ...


def new_token_stats() -> dict[str, int]:
  """Zeroed truncation counters."""
  return {"sequences": 0, "prompt_truncated": 0, "prompt_tokens_dropped": 0,
          "response_truncated": 0, "response_tokens_dropped": 0, "list_truncated": 0}


def _stats(stats: dict | None, truncation: str = "tokens") -> dict:
  if truncation not in TRUNCATIONS:
    raise ValueError(f"`truncation` must be one of {TRUNCATIONS}; got {truncation!r}.")
  stats = new_token_stats() if stats is None else stats
  for k, v in new_token_stats().items():
    stats.setdefault(k, v)
  if truncation == "turns":
    for k in _TURN_KEYS:
      stats.setdefault(k, 0)
  return stats


def warn_if_truncated(stats: dict, *, threshold: float = 0.05, what: str = "data.train_files") -> bool:
  """Logs ONE warning (per stats dict) once more than ``threshold`` of the sequences were truncated.

  The warning (on the ``"rlhf_jax"`` logger) gives the counts and names the config keys to
  raise (``config.<section>.max_len``/``max_prompt_len``, the section taken from ``what``).
  The dict remembers it as ``stats["_warned"] = 1`` (left out of `stats_metrics`).

  Args:
    stats: truncation counters (`new_token_stats`); sequences cut in any way are
      ``stats["truncated"]`` (``"turns"``), else at least the larger of ``prompt_truncated``
      and ``response_truncated``.
    threshold: the fraction of truncated sequences above which to warn.
    what: the config key of the data, named in the message.

  Returns:
    Whether it warned now.
  """
  n = int(stats.get("sequences", 0))
  if stats.get("_warned") or not n:
    return False
  cut = stats.get("truncated")
  if cut is None:
    cut = max(stats.get("prompt_truncated", 0), stats.get("response_truncated", 0))
  if cut / n <= threshold:
    return False
  stats["_warned"] = 1
  turns = f", {stats['prompt_turns_dropped']} turns" if "prompt_turns_dropped" in stats else ""
  _log.warning(
      "config.%s: %d of %d sequences (%.1f%%, more than %.1f%%) were truncated (prompts: %d, %d tokens%s dropped; "
      "responses: %d, %d tokens dropped); raise config.max_len / config.max_prompt_len to keep them whole",
      what, cut, n, 100.0 * cut / n, 100.0 * threshold, stats.get("prompt_truncated", 0),
      stats.get("prompt_tokens_dropped", 0), turns, stats.get("response_truncated", 0),
      stats.get("response_tokens_dropped", 0))
  return True


# ----------------------------------------------------------------------------- encoding


def _encode(tokenizer, text: str) -> list[int]:
  return [int(t) for t in tokenizer.encode(text)] if text else []


def _segments(tokenizer, messages: list[dict], first_response: int) -> list[tuple[str, bool]]:
  """``(text, is_response)`` pieces of a rendered conversation.

  Messages before ``first_response`` are the prompt; from there on every assistant turn is a
  response and every other turn context.
  """
  pieces, prev = [], ""
  for i in range(first_response, len(messages)):
    if messages[i]["role"] != "assistant":
      continue
    # Context up to the assistant turn i (with generation prompt), then the turn itself.
    upto = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
    if not upto.startswith(prev):
      raise ValueError("The chat template does not render a conversation's prefix as a prefix of it.")
    if upto[len(prev):]:
      pieces.append((upto[len(prev):], False))
    full = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
    if not full.startswith(upto):
      raise ValueError("The chat template does not render the prompt as a prefix of prompt + response.")
    pieces.append((full[len(upto):], True))
    prev = full
  return pieces


def _encode_conversation(tokenizer, messages, first_response, eos_id):
  tokens, is_resp = [], []
  for text, resp in _segments(tokenizer, messages, first_response):
    ids = _encode(tokenizer, text)
    if resp and eos_id is not None:
      ids.append(int(eos_id))
    tokens += ids
    is_resp += [resp] * len(ids)
  return tokens, is_resp


def truncate(tokens, is_response, *, max_len: int, max_prompt_len: int, stats: dict | None = None,
             overlong: str = "truncate", source: str = "<example>", field: str | None = None):
  """Applies the truncation policy to one sequence; returns ``(tokens, is_response)``.

  The prompt is everything before the first response token. With ``overlong="raise"``, a
  sequence that would be cut raises `DataError` naming ``source`` (``FILE:LINE``) and ``field``.

  Examples:
    >>> st = new_token_stats()
    >>> truncate([1, 2, 3, 7, 8, 9], [0, 0, 0, 1, 1, 1], max_len=4, max_prompt_len=2, stats=st)
    ([2, 3, 7, 8], [0, 0, 1, 1])
    >>> st["prompt_tokens_dropped"], st["response_tokens_dropped"]
    (1, 1)
  """
  stats = _stats(stats)
  n_prompt = next((i for i, r in enumerate(is_response) if r), len(tokens))
  p_drop = max(0, n_prompt - max_prompt_len)
  kept = len(tokens) - p_drop
  r_drop = max(0, kept - max_len)
  stats["sequences"] += 1
  if (p_drop or r_drop) and overlong == "raise":
    raise DataError(*_split_source(source), field, "over-long",
                    f"{len(tokens)} tokens (prompt {n_prompt}) exceed max_prompt_len={max_prompt_len} / max_len={max_len}")
  if p_drop:
    stats["prompt_truncated"] += 1
    stats["prompt_tokens_dropped"] += p_drop
  if r_drop:
    stats["response_truncated"] += 1
    stats["response_tokens_dropped"] += r_drop
  if (p_drop or r_drop) and "truncated" in stats:
    stats["truncated"] += 1
  end = len(tokens) - r_drop
  return list(tokens[p_drop:end]), list(is_response[p_drop:end])


# ----------------------------------------------------------------------------- turn-level truncation


def _n_prompt(is_response) -> int:
  return next((i for i, r in enumerate(is_response) if r), len(is_response))


def _n_system(messages) -> int:
  return next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))


def _encode_messages(tokenizer, messages, first_response, eos_id):
  """`_encode_conversation`, or the prompt alone (generation prompt added) when nothing follows it."""
  if first_response >= len(messages):
    tokens = _encode(tokenizer, tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return tokens, [False] * len(tokens)
  return _encode_conversation(tokenizer, messages, first_response, eos_id)


def _first_prompt_turn(prompt) -> tuple[int, int] | None:
  """``(start, end)`` of the earliest droppable prompt turn, or None (only system + last user turn left).

  A turn starts after the system message(s) and runs to the next user message, so what is
  left still starts with a user turn (templates that require alternation keep working).
  """
  start = _n_system(prompt)
  last_user = max((i for i, m in enumerate(prompt) if m["role"] == "user"), default=len(prompt) - 1)
  if start >= last_user:
    return None
  end = next(j for j in range(start + 1, last_user + 1) if j == last_user or prompt[j]["role"] == "user")
  return start, end


def _first_exchange(messages) -> tuple[int, int] | None:
  """``(start, end)`` of the earliest (user, assistant...) exchange after the system turn, if more than one has a reply."""
  starts, has_reply = [_n_system(messages)], [False]
  for j in range(starts[0], len(messages)):
    role = messages[j]["role"]
    if role == "assistant":
      has_reply[-1] = True
    elif role == "user" and has_reply[-1]:
      starts.append(j)
      has_reply.append(False)
  if sum(has_reply) <= 1:
    return None
  return starts[0], starts[1]


def _system_len(tokenizer, prompt) -> int:
  """Tokens of the rendered leading system turn(s) at the start of the prompt's tokens (0 if none)."""
  n_sys = _n_system(prompt)
  if not n_sys or n_sys == len(prompt):
    return 0
  try:
    head = tokenizer.apply_chat_template(prompt[:n_sys], add_generation_prompt=False)
  except Exception:  # noqa: BLE001 -- some templates refuse a system-only conversation
    return 0
  full = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
  return len(_encode(tokenizer, head)) if head and full.startswith(head) else 0


def _truncate_turns(tokenizer, messages, first_response, eos_id, *, max_len, max_prompt_len, stats,
                    multi_turn=False):
  """The ``"turns"`` policy for one conversation; returns ``(tokens, is_response)``.

  ``messages[:first_response]`` is the prompt; with ``multi_turn`` (``sft`` conversations) the
  earliest exchanges go first when the whole sequence exceeds ``max_len``.
  """
  messages = list(messages)
  tokens, resp = _encode_messages(tokenizer, messages, first_response, eos_id)
  n_total0, turns = len(tokens), 0
  if multi_turn:
    while len(tokens) > max_len and (cut := _first_exchange(messages)) is not None:
      messages = messages[:cut[0]] + messages[cut[1]:]
      turns += cut[1] - cut[0]
      first_response = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
      tokens, resp = _encode_messages(tokenizer, messages, first_response, eos_id)
  prompt, rest = messages[:first_response], messages[first_response:]
  while _n_prompt(resp) > max_prompt_len and (cut := _first_prompt_turn(prompt)) is not None:
    prompt = prompt[:cut[0]] + prompt[cut[1]:]
    turns += cut[1] - cut[0]
    tokens, resp = _encode_messages(tokenizer, prompt + rest, len(prompt), eos_id)
  n_prompt = _n_prompt(resp)
  if n_prompt > max_prompt_len:  # system + last turn do not fit: cut tokens after the system turn(s)
    head = _system_len(tokenizer, prompt)
    head = head if head < max_prompt_len else 0
    cut_from = n_prompt - (max_prompt_len - head)
    tokens, resp = tokens[:head] + tokens[cut_from:], resp[:head] + resp[cut_from:]
  p_drop = max(0, n_total0 - len(tokens))
  r_drop = max(0, len(tokens) - max_len)
  stats["sequences"] += 1
  stats["prompt_turns_dropped"] += turns
  if p_drop:
    stats["prompt_truncated"] += 1
    stats["prompt_tokens_dropped"] += p_drop
  if r_drop:
    stats["response_truncated"] += 1
    stats["response_tokens_dropped"] += r_drop
  if p_drop or r_drop:
    stats["truncated"] += 1
  end = len(tokens) - r_drop
  return list(tokens[:end]), list(resp[:end])


def _encode_truncated(tokenizer, messages, first_response, eos_id, *, max_len, max_prompt_len, stats, overlong,
                      source, truncation, multi_turn=False):
  """Encodes one conversation and applies the ``truncation`` policy (``overlong="raise"``: no truncation)."""
  if truncation == "turns" and overlong != "raise":
    return _truncate_turns(tokenizer, messages, first_response, eos_id, max_len=max_len,
                           max_prompt_len=max_prompt_len, stats=stats, multi_turn=multi_turn)
  tokens, resp = _encode_messages(tokenizer, messages, first_response, eos_id)
  return truncate(tokens, resp, max_len=max_len, max_prompt_len=max_prompt_len, stats=stats, overlong=overlong,
                  source=source)


def _split_source(source: str | None) -> tuple[str | None, str | None]:
  """``(path, line)`` of a ``"FILE:LINE"`` source; ``(None, None)`` when unknown (None, ``"?"``)."""
  if source is None or source in ("?", "<example>", ""):
    return None, None
  path, _, line = str(source).rpartition(":")
  return (path, line) if path else (str(source), None)


@contextlib.contextmanager
def _naming(ex: Any, k: int, kinds: str | tuple[str, ...], field: str | None = None, *, check: bool = True):
  """Validates example ``k`` of a batch (`validate_example`, unless ``check`` is False: already
  done), then turns any error raised in the block into a one-line `DataError` naming its
  source, ``record k of the batch`` and ``field``."""
  record = f"record {k} of the batch"
  if check:
    validate_example(ex, kinds, record=record)
  try:
    yield
  except DataError as e:
    if e.record is not None:
      raise
    raise DataError(e.path, e.line, e.field or field, e.reason, e.detail, record=record) from None
  except Exception as e:  # noqa: BLE001 -- re-raised as a DataError that names the row
    path, line = _split_source(ex.get("source"))
    raise DataError(path, line, field, "tokenisation failed", f"{type(e).__name__}: {e}", record=record) from e


def sequence_row(tokens, is_response, *, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """One right-padded ``[T]`` row (``input_ids``, ``targets``, ``loss_mask``, ``attention_mask``).

  Examples:
    >>> r = sequence_row([5, 6, 7, 8], [0, 0, 1, 1], seq_len=6)
    >>> r["targets"].tolist(), r["loss_mask"].tolist(), r["attention_mask"].tolist()
    ([6, 7, 8, 0, 0, 0], [0.0, 1.0, 1.0, 0.0, 0.0, 0.0], [1, 1, 1, 1, 0, 0])
  """
  L = len(tokens)
  if L > seq_len:
    raise ValueError(f"{L} tokens do not fit in seq_len={seq_len}.")
  ids = np.full((seq_len,), pad_id, np.int32)
  ids[:L] = tokens
  targets = np.full((seq_len,), pad_id, np.int32)
  targets[:-1] = ids[1:]
  loss = np.zeros((seq_len,), np.float32)
  resp = np.asarray(is_response, bool)
  if L > 1:
    loss[: L - 1] = resp[1:L]
  attn = np.zeros((seq_len,), np.int32)
  attn[:L] = 1
  return {"input_ids": ids, "targets": targets, "loss_mask": loss, "attention_mask": attn}


def _check_lens(max_len: int, max_prompt_len: int | None) -> int:
  max_prompt_len = max_len - 1 if max_prompt_len is None else max_prompt_len
  if not 0 < max_prompt_len < max_len:
    raise ValueError(f"Need 0 < max_prompt_len ({max_prompt_len}) < max_len ({max_len}).")
  return max_prompt_len


def _prompt_response_row(tokenizer, prompt, response, *, max_len, max_prompt_len, pad_id, eos_id, stats,
                         overlong, source, truncation="tokens"):
  tokens, resp = _encode_truncated(tokenizer, list(prompt) + list(response), len(prompt), eos_id, max_len=max_len,
                                   max_prompt_len=max_prompt_len, stats=stats, overlong=overlong, source=source,
                                   truncation=truncation)
  return sequence_row(tokens, resp, seq_len=max_len, pad_id=pad_id)


def _stack(rows: list[dict], prefix: str = "", suffix: str = "_BxT") -> dict[str, np.ndarray]:
  return {f"{prefix}{k}{suffix}": np.stack([r[k] for r in rows]) for k in ROW_KEYS}


# ----------------------------------------------------------------------------- batches


def tokenize_pairs(examples: Sequence[dict], tokenizer, *, max_len: int, max_prompt_len: int | None = None,
                   pad_id: int = 0, eos_id: int | None = None, stats: dict | None = None,
                   overlong: str = "truncate", truncation: str = "tokens") -> dict[str, np.ndarray]:
  """``pair`` examples -> ``{chosen,rejected}_{input_ids,targets,loss_mask,attention_mask}_BxT``.

  Args:
    examples: normalised ``pair`` examples (`rlhf_jax.data.formats`).
    tokenizer: see `Tokenizer`.
    max_len: ``T``, the row length.
    max_prompt_len: the most prompt tokens kept (default ``max_len - 1``).
    pad_id, eos_id: padding id; id appended to every response (None: nothing).
    stats: truncation counters, updated in place (`new_token_stats`).
    overlong: ``"truncate"`` or ``"raise"`` (a `DataError` instead of any truncation).
    truncation: ``"tokens"`` or ``"turns"`` (see the module docstring).

  Returns:
    The batch (``B = len(examples)``).
  """
  max_prompt_len = _check_lens(max_len, max_prompt_len)
  stats = _stats(stats, truncation)
  kw = dict(max_len=max_len, max_prompt_len=max_prompt_len, pad_id=pad_id, eos_id=eos_id, stats=stats,
            overlong=overlong, truncation=truncation)
  rows = {"chosen": [], "rejected": []}
  for k, ex in enumerate(examples):
    for side in ("chosen", "rejected"):
      with _naming(ex, k, "pair", side, check=side == "chosen"):
        rows[side].append(_prompt_response_row(tokenizer, ex["prompt"], ex[side], source=ex.get("source"), **kw))
  per_pair = _pair_columns(examples)
  if "gold" in per_pair:
    rows["gold"] = []
    for k, ex in enumerate(examples):
      with _naming(ex, k, "pair", "gold", check=False):
        rows["gold"].append(_prompt_response_row(tokenizer, ex["prompt"], ex["fields"]["gold"],
                                                 source=ex.get("source"), **kw))
  out = {}
  for side in rows:
    out.update(_stack(rows[side], f"{side}_"))
  for name, key in (("beta", "beta_B"), ("weight", "weight_B"), ("margin_rewards_chosen", "margin_rewards_chosen_BxK"),
                    ("margin_rewards_rejected", "margin_rewards_rejected_BxK")):
    if name in per_pair:
      out[key] = np.asarray([ex["fields"][name] for ex in examples], np.float32)
  return out


def _pair_columns(examples: Sequence[dict]) -> set[str]:
  """The per-pair columns (`rlhf_jax.data.formats.PAIR_FIELDS`) of a batch: each must be in every
  row of the batch or in none (a `DataError` names the first row without it); margin lists must
  have one length."""
  have = [set((ex.get("fields") or {}).keys()) & set(PAIR_FIELDS) for ex in examples]
  used = set().union(*have) if have else set()
  for name in sorted(used):
    for k, (ex, h) in enumerate(zip(examples, have)):
      if name not in h:
        raise DataError(*_split_source(ex.get("source")), name, "missing field",
                        f"other rows of the batch have {name!r}: a per-pair column must be in every row or none",
                        record=f"record {k} of the batch")
  if "margin_rewards_chosen" in used:
    lengths = {len(ex["fields"]["margin_rewards_chosen"]) for ex in examples}
    if len(lengths) > 1:
      raise DataError(None, None, "margin_rewards_chosen", "bad value",
                      f"rows of one batch have different numbers of margin rewards: {sorted(lengths)}")
  return used


def tokenize_sft(examples: Sequence[dict], tokenizer, *, max_len: int, max_prompt_len: int | None = None,
                 pad_id: int = 0, eos_id: int | None = None, stats: dict | None = None,
                 overlong: str = "truncate", truncation: str = "tokens") -> dict[str, np.ndarray]:
  """``sft`` (loss on every assistant turn) or ``pair``/``unpaired`` (loss on the chosen/completion) -> SFT keys.

  Args: as `tokenize_pairs`; with ``truncation="turns"`` an over-long multi-turn ``sft``
  conversation first loses its earliest exchanges (see the module docstring).

  Returns:
    ``{input_ids,targets,loss_mask,attention_mask}_BxT``.
  """
  max_prompt_len = _check_lens(max_len, max_prompt_len)
  stats = _stats(stats, truncation)
  rows = []
  for k, ex in enumerate(examples):
    field = {"sft": "messages", "pair": "chosen"}.get(ex.get("kind") if isinstance(ex, dict) else None, "completion")
    with _naming(ex, k, "sft", field):
      if ex["kind"] == "sft":
        msgs = ex["messages"]
        first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
      else:
        response = ex["chosen"] if ex["kind"] == "pair" else ex["completion"]
        msgs, first = list(ex["prompt"]) + list(response), len(ex["prompt"])
      tokens, resp = _encode_truncated(tokenizer, msgs, first, eos_id, max_len=max_len,
                                       max_prompt_len=max_prompt_len, stats=stats, overlong=overlong,
                                       source=ex.get("source"), truncation=truncation,
                                       multi_turn=ex["kind"] == "sft")
      rows.append(sequence_row(tokens, resp, seq_len=max_len, pad_id=pad_id))
  return _stack(rows)


def tokenize_unpaired(examples: Sequence[dict], tokenizer, **kwargs) -> dict[str, np.ndarray]:
  """``unpaired`` (KTO) examples -> SFT keys plus ``labels_B`` (float32, 1 = desirable)."""
  for k, ex in enumerate(examples):
    validate_example(ex, "unpaired", record=f"record {k} of the batch")
  out = tokenize_sft(examples, tokenizer, **kwargs)
  out["labels_B"] = np.asarray([float(ex["label"]) for ex in examples], np.float32)
  return out


def tokenize_ranked(examples: Sequence[dict], tokenizer, *, num_completions: int, max_len: int,
                    max_prompt_len: int | None = None, pad_id: int = 0, eos_id: int | None = None,
                    stats: dict | None = None, overlong: str = "truncate",
                    truncation: str = "tokens") -> dict[str, np.ndarray]:
  """``ranked`` examples -> ``{input_ids,targets,loss_mask,attention_mask}_BxKxT``, ``scores_BxK``, ``list_mask_BxK``.

  Lists longer than ``K = num_completions`` keep their K best (counted in
  ``stats["list_truncated"]``); shorter ones are padded with all-padding members
  (``list_mask`` 0, score 0). Other arguments as `tokenize_pairs`.
  """
  max_prompt_len = _check_lens(max_len, max_prompt_len)
  stats = _stats(stats, truncation)
  K = int(num_completions)
  empty = sequence_row([], [], seq_len=max_len, pad_id=pad_id)
  lists, scores, masks = [], [], []
  for k, ex in enumerate(examples):
    with _naming(ex, k, "ranked", "completions"):
      comps, sc = ex["completions"], ex["scores"]
    if len(comps) > K:
      stats["list_truncated"] += 1
      comps, sc = comps[:K], sc[:K]
    rows = []
    for j, c in enumerate(comps):
      with _naming(ex, k, "ranked", f"completions[{j}]", check=False):
        rows.append(_prompt_response_row(tokenizer, ex["prompt"], c, max_len=max_len, max_prompt_len=max_prompt_len,
                                         pad_id=pad_id, eos_id=eos_id, stats=stats, overlong=overlong,
                                         source=ex.get("source"), truncation=truncation))
    n = len(rows)
    rows += [empty] * (K - n)
    lists.append({k: np.stack([r[k] for r in rows]) for k in ROW_KEYS})
    scores.append(list(sc) + [0.0] * (K - n))
    masks.append([1.0] * n + [0.0] * (K - n))
  out = _stack(lists, suffix="_BxKxT")
  out["scores_BxK"] = np.asarray(scores, np.float32)
  out["list_mask_BxK"] = np.asarray(masks, np.float32)
  return out


def _fields(ex: dict) -> dict:
  if ex["kind"] == "prompt_answer":
    return {k: ex[k] for k in ("answer", "solution") if k in ex}
  return dict(ex.get("fields") or {})


def _answer(ex: dict) -> str | None:
  if ex["kind"] == "prompt_answer":
    return ex["answer"]
  value = (ex.get("fields") or {}).get("answer")
  return None if value is None else value if isinstance(value, str) else json.dumps(value)


def tokenize_prompts(examples: Sequence[dict], tokenizer, *, max_prompt_len: int, pad_id: int = 0,
                     stats: dict | None = None, overlong: str = "truncate", truncation: str = "tokens",
                     **unused) -> dict[str, Any]:
  """``prompt`` or ``prompt_answer`` examples -> left-padded prompts, their fields and answers.

  Args:
    examples: normalised ``prompt`` (any extra columns in ``fields``) or ``prompt_answer``
      examples, mixed freely.
    tokenizer: see `Tokenizer`.
    max_prompt_len: ``P``; longer prompts are truncated by the ``truncation`` policy.
    pad_id: the left padding id.
    stats, overlong, truncation: as `tokenize_pairs`.
    **unused: ignored (``max_len``, ``eos_id``, ... of a shared config).

  Returns:
    ``prompt_ids_BxP``, ``prompt_mask_BxP`` (int32), ``fields`` (a list of dicts, for reward
    functions: a ``prompt`` example's ``fields``, ``{"answer", "solution"}`` for
    ``prompt_answer``) and, when every example has one, ``answers`` (a list of strings: the
    ``prompt_answer`` answer or the ``"answer"`` field, non-strings as JSON).
  """
  del unused
  stats = _stats(stats, truncation)
  ids = np.full((len(examples), max_prompt_len), pad_id, np.int32)
  mask = np.zeros((len(examples), max_prompt_len), np.int32)
  for b, ex in enumerate(examples):
    with _naming(ex, b, "prompt", "prompt"):
      prompt = list(ex["prompt"])
      tokens, _ = _encode_truncated(tokenizer, prompt, len(prompt), None, max_len=max_prompt_len + 1,
                                    max_prompt_len=max_prompt_len, stats=stats, overlong=overlong,
                                    source=ex.get("source"), truncation=truncation)
    if tokens:
      ids[b, -len(tokens):] = tokens
      mask[b, -len(tokens):] = 1
  out = {"prompt_ids_BxP": ids, "prompt_mask_BxP": mask, "fields": [_fields(ex) for ex in examples]}
  answers = [_answer(ex) for ex in examples]
  if all(a is not None for a in answers):
    out["answers"] = answers
  return out


def _steps_response(tokenizer, prompt, steps, labels, step_separator, eos_id):
  """``(tokens, step_marks, step_labels)`` of the response that renders ``step_separator.join(steps)``.

  The assistant text comes from the chat template as for the other kinds (what
  ``apply_chat_template(prompt + [assistant], False)`` adds after the generation prompt). The step
  texts are encoded one by one (``step + step_separator``, the last step alone), so a step's last
  token is known exactly whatever the tokenizer merges; the text the template puts around the
  content (e.g. an end-of-turn token) is encoded on its own.
  """
  content = step_separator.join(steps)
  upto = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
  full = tokenizer.apply_chat_template(list(prompt) + [{"role": "assistant", "content": content}],
                                       add_generation_prompt=False)
  if not full.startswith(upto):
    raise ValueError("The chat template does not render the prompt as a prefix of prompt + response.")
  response = full[len(upto):]
  at = response.find(content)
  if at < 0:
    raise ValueError("The chat template changes the assistant text (e.g. strips it), so the step ends cannot "
                     "be placed; strip the steps' outer whitespace")
  tokens = _encode(tokenizer, response[:at])
  marks, labs = [0.0] * len(tokens), [0.0] * len(tokens)
  pieces = [s + step_separator for s in steps[:-1]] + [steps[-1]]
  for j, (piece, label) in enumerate(zip(pieces, labels)):
    ids = _encode(tokenizer, piece)
    if not ids:
      raise ValueError(f"step {j} encodes to no tokens")
    tokens += ids
    marks += [0.0] * (len(ids) - 1) + [1.0]
    labs += [0.0] * (len(ids) - 1) + [float(label)]
  tail = _encode(tokenizer, response[at + len(content):]) + ([int(eos_id)] if eos_id is not None else [])
  return tokens + tail, marks + [0.0] * len(tail), labs + [0.0] * len(tail)


def tokenize_steps(examples: Sequence[dict], tokenizer, *, max_len: int, max_prompt_len: int | None = None,
                   step_separator: str = "\n", pad_id: int = 0, eos_id: int | None = None,
                   stats: dict | None = None, overlong: str = "truncate",
                   truncation: str = "tokens") -> dict[str, np.ndarray]:
  """``stepwise`` examples (step-labelled solutions) -> process-reward-model batches.

  The row is the prompt (``apply_chat_template(prompt, add_generation_prompt=True)``) followed by
  the assistant turn whose text is ``step_separator.join(steps)``, as the chat template renders
  it. Each step's score is read at its last token: the separator that ends it (the last step:
  its own last token, before the template's end of turn). The step texts are encoded one at a
  time (as TRL's ``PRMTrainer`` does), so the step ends are exact; a step may contain the
  separator. ``step_mask_BxT`` is aligned with the tokens themselves (not shifted like an SFT
  ``loss_mask``): the score of a step is the head's output at that token, which has seen the
  prompt and every step up to and including it (Lightman et al. 2023, *Let's Verify Step by
  Step*; Wang et al. 2024, *Math-Shepherd*).

  Truncation: the prompt by the ``truncation`` policy (as `tokenize_prompts`), then the
  solution is cut at the right to ``max_len``; a step whose last token is cut away loses its
  label (counted in ``stats["steps_dropped"]``).

  Args:
    examples: normalised ``stepwise`` examples (`rlhf_jax.data.formats`, format ``"stepwise"``).
    tokenizer: see `Tokenizer`.
    max_len: ``T``, the row length.
    max_prompt_len: the most prompt tokens kept (default ``max_len - 1``).
    step_separator: the text between two steps (``"\\n"``; Math-Shepherd's ``"ки"`` tag, or
      ``"\\n\\n"``).
    pad_id, eos_id: padding id; id appended after the assistant turn (None: nothing).
    stats: truncation counters, updated in place (`new_token_stats`, plus ``steps_dropped``).
    overlong: ``"truncate"`` or ``"raise"`` (a `DataError` naming the row instead of any cut).
    truncation: ``"tokens"`` or ``"turns"`` for the prompt (see the module docstring).

  Returns:
    ``input_ids_BxT``, ``attention_mask_BxT`` (int32, right-padded), ``step_mask_BxT`` (float32,
    1 at each step's last token) and ``step_labels_BxT`` (float32, the step's label there, 0
    elsewhere).

  Examples:
    >>> class Chars:  # one token per character; template "<role>content|"
    ...   def encode(self, text): return [ord(c) for c in text]
    ...   def apply_chat_template(self, messages, add_generation_prompt):
    ...     text = "".join(f"<{m['role'][0]}>{m['content']}|" for m in messages)
    ...     return text + ("<a>" if add_generation_prompt else "")
    >>> ex = {"kind": "stepwise", "prompt": [{"role": "user", "content": "q"}], "steps": ["ab", "c"],
    ...       "labels": [1.0, 0.0]}
    >>> b = tokenize_steps([ex], Chars(), max_len=14)
    >>> "".join(chr(t) for t in b["input_ids_BxT"][0] if t)  # prompt, "ab\\nc", end of turn
    '<u>q|<a>ab\\nc|'
    >>> b["step_mask_BxT"][0].tolist()  # the separator ends step 0; "c" ends step 1
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    >>> b["step_labels_BxT"][0, 10:12].tolist(), int(b["attention_mask_BxT"][0].sum())
    ([1.0, 0.0], 13)
  """
  max_prompt_len = _check_lens(max_len, max_prompt_len)
  stats = _stats(stats, truncation)
  stats.setdefault("steps_dropped", 0)
  if not isinstance(step_separator, str):
    raise ValueError(f"`step_separator` must be a string; got {type(step_separator).__name__}")
  B = len(examples)
  ids = np.full((B, max_len), pad_id, np.int32)
  attn = np.zeros((B, max_len), np.int32)
  step_mask = np.zeros((B, max_len), np.float32)
  step_labels = np.zeros((B, max_len), np.float32)
  for b, ex in enumerate(examples):
    with _naming(ex, b, STEPWISE_FORMAT, "steps"):
      prompt = list(ex["prompt"])
      truncated_before = stats.get("truncated")
      p_tokens, _ = _encode_truncated(tokenizer, prompt, len(prompt), None, max_len=max_prompt_len + 1,
                                      max_prompt_len=max_prompt_len, stats=stats, overlong=overlong,
                                      source=ex.get("source"), truncation=truncation)
      r_tokens, marks, labs = _steps_response(tokenizer, prompt, ex["steps"], ex["labels"], step_separator, eos_id)
      room = max_len - len(p_tokens)
      r_drop = max(0, len(r_tokens) - room)
      if r_drop:
        if overlong == "raise":
          raise DataError(*_split_source(ex.get("source")), "steps", "over-long",
                          f"{len(p_tokens) + len(r_tokens)} tokens (prompt {len(p_tokens)}) exceed max_len={max_len}")
        stats["response_truncated"] += 1
        stats["response_tokens_dropped"] += r_drop
        stats["steps_dropped"] += int(sum(marks[room:]))
        if "truncated" in stats and stats["truncated"] == truncated_before:
          stats["truncated"] += 1
      tokens = p_tokens + r_tokens[:room]
      n, p = len(tokens), len(p_tokens)
      ids[b, :n] = tokens
      attn[b, :n] = 1
      step_mask[b, p:n] = marks[:room]
      step_labels[b, p:n] = labs[:room]
  return {"input_ids_BxT": ids, "attention_mask_BxT": attn, "step_mask_BxT": step_mask,
          "step_labels_BxT": step_labels}


_BY_KIND = {
    "pair": tokenize_pairs,
    "sft": tokenize_sft,
    "unpaired": tokenize_unpaired,
    "ranked": tokenize_ranked,
    "prompt_answer": tokenize_prompts,
    "prompt": tokenize_prompts,
    STEPWISE_FORMAT: tokenize_steps,
}


def decode_record(record: Any) -> dict:
  """A normalised example from a stored record (``{"json": bytes}`` from tfds, a JSON string, or a dict)."""
  if isinstance(record, dict) and "json" in record:
    record = record["json"]
  if isinstance(record, (bytes, np.bytes_)):
    record = bytes(record).decode("utf-8")
  if isinstance(record, str):
    record = json.loads(record)
  return record


def make_collate(kind: str, tokenizer, *, stats: dict | None = None, truncation: str = "tokens",
                 warn_threshold: float | None = 0.05, what: str = "data.train_files",
                 **kwargs) -> Callable[[list], dict]:
  """A ``collate`` for `BatchIterator.from_dataset` that decodes records and tokenises them.

  Args:
    kind: the batch to build: ``"pair"``, ``"sft"``, ``"unpaired"``, ``"ranked"``,
      ``"prompt_answer"``, ``"prompt"`` (``"sft"`` also accepts pair/unpaired records: loss
      on the chosen; the two prompt kinds both accept either kind) or ``"stepwise"``
      (`tokenize_steps`).
    tokenizer: see `Tokenizer`.
    stats: truncation counters, updated in place (also ``collate.stats``).
    truncation: ``"tokens"`` or ``"turns"`` (see the module docstring).
    warn_threshold: after every batch, `warn_if_truncated` with this threshold (None: never).
    what: the data's config key, named in that warning.
    **kwargs: ``max_len``, ``max_prompt_len``, ``pad_id``, ``eos_id``, ``overlong`` (and
      ``num_completions`` for ranked, ``step_separator`` for stepwise) of the ``tokenize_*`` function.

  Returns:
    ``collate(records) -> batch``, with the counters as ``collate.stats``. A record that does
    not decode, or an example that is malformed (`rlhf_jax.data.formats.validate_example`) or
    fails to tokenise, raises a one-line `DataError` naming its ``FILE:LINE`` source (when it
    has one), ``record K of the batch`` and the field.
  """
  if kind not in _BY_KIND:
    raise ValueError(f"Unknown kind {kind!r}; expected one of {sorted(_BY_KIND)}.")
  fn = _BY_KIND[kind]
  stats = _stats(stats, truncation)

  def collate(records: list) -> dict:
    examples = []
    for k, r in enumerate(records):
      try:
        examples.append(decode_record(r))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(None, None, "json", "invalid record", f"{type(e).__name__}: {e}",
                        record=f"record {k} of the batch") from None
    batch = fn(examples, tokenizer, stats=stats, truncation=truncation, **kwargs)
    if warn_threshold is not None:
      warn_if_truncated(stats, threshold=warn_threshold, what=what)
    return batch

  collate.stats = stats
  return collate


# ----------------------------------------------------------------------------- packing


def pack_rows(sequences: Sequence[tuple[Sequence[int], Sequence[bool]]], *, seq_len: int,
              pad_id: int = 0) -> dict[str, np.ndarray]:
  """Packs ``(tokens, is_response)`` sequences (already truncated to ``seq_len``) into rows, in order.

  Greedy: a sequence goes into the current row if it fits, else starts a new row. Keys:
  the SFT keys plus ``segment_ids_BxT`` (1, 2, ... per sequence in a row, 0 on padding) and
  ``positions_BxT`` (0, 1, ... restarting in every segment). ``targets``/``loss_mask`` never
  cross a segment boundary (a segment's last token predicts nothing). The model needs a
  block-diagonal causal mask from ``segment_ids`` (not supported by `rlhf_jax.models` yet).

  Examples:
    >>> p = pack_rows([([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1])], seq_len=6)
    >>> p["segment_ids_BxT"].tolist(), p["positions_BxT"].tolist()
    ([[1, 1, 1, 2, 2, 0]], [[0, 1, 2, 0, 1, 0]])
    >>> p["loss_mask_BxT"].tolist()
    [[1.0, 1.0, 0.0, 1.0, 0.0, 0.0]]
  """
  rows: list[list[tuple]] = [[]]
  used = 0
  for tokens, resp in sequences:
    if len(tokens) > seq_len:
      raise ValueError(f"A sequence of {len(tokens)} tokens does not fit in seq_len={seq_len}; truncate first.")
    if used + len(tokens) > seq_len:
      rows.append([])
      used = 0
    rows[-1].append((list(tokens), list(resp)))
    used += len(tokens)
  B = len(rows)
  out = {k: np.zeros((B, seq_len), np.float32 if k == "loss_mask" else np.int32) for k in ROW_KEYS}
  out["input_ids"][:] = pad_id
  out["targets"][:] = pad_id
  seg = np.zeros((B, seq_len), np.int32)
  pos = np.zeros((B, seq_len), np.int32)
  for b, row in enumerate(rows):
    start = 0
    for s, (tokens, resp) in enumerate(row, start=1):
      r = sequence_row(tokens, resp, seq_len=len(tokens), pad_id=pad_id) if tokens else None
      if r is None:
        continue
      end = start + len(tokens)
      for k in ROW_KEYS:
        out[k][b, start:end] = r[k]
      out["targets"][b, end - 1] = pad_id
      seg[b, start:end] = s
      pos[b, start:end] = np.arange(len(tokens))
      start = end
  batch = {f"{k}_BxT": v for k, v in out.items()}
  batch["segment_ids_BxT"] = seg
  batch["positions_BxT"] = pos
  return batch
