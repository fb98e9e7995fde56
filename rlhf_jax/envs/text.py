"""Text ↔ tokens for episodes: a character tokenizer and message renderers.

A *renderer* decides which tokens an episode is made of, so the sampler and an SFT
demonstration lay them out the same way:

* ``prompt_ids(messages)``: the first observation (with the generation prompt, if any);
* ``observation_ids(messages, after_eos=...)``: what follows an assistant turn, up to and
  including the next generation prompt; these tokens are masked out of the loss;
* ``assistant_ids(text)``: the tokens of a scripted assistant turn (for demonstrations);
* ``assistant_text(ids)``: an assistant turn as the text the environment reads;
* ``stop_sequences``: token sequences that end an assistant turn (besides ``eos_id``).

:class:`PlainRenderer` concatenates message contents (tiny models, no template);
:class:`ChatRenderer` uses a tokenizer's chat template (:class:`rlhf_jax.models.Tokenizer`),
e.g. ChatML: an observation is ``\\n<|im_start|>tool\\n...<|im_end|>\\n<|im_start|>assistant\\n``.

:class:`CharTokenizer` is a file-free tokenizer for tiny models: one token per printable
ASCII character, plus multi-character tokens (the tool tags) matched longest-first.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DEFAULT_TAG_TOKENS", "CharTokenizer", "ChatRenderer", "PlainRenderer"]

DEFAULT_TAG_TOKENS = ("<call>", "</call>", "<result>", "</result>", "<answer>", "</answer>", "<error>", "</error>")
_CONTROL = ("<pad>", "<bos>", "<eos>", "<unk>")


class CharTokenizer:
  """Characters and tags as tokens: ids 0-3 are ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``,
  then ``tokens`` (multi-character, e.g. ``<call>``), then the printable ASCII characters.

  Encoding never fails: a character outside the vocabulary is ``<unk>``. The control
  tokens are not produced from text (``"<eos>"`` in text is five characters).

  Examples:
    >>> tok = CharTokenizer()
    >>> ids = tok.encode("<call>calc(2*3)</call>")
    >>> len(ids), tok.decode(ids)
    (11, '<call>calc(2*3)</call>')
  """

  def __init__(self, tokens: Sequence[str] = DEFAULT_TAG_TOKENS,
               chars: str = "".join(chr(i) for i in range(32, 127))):
    vocab = list(_CONTROL) + list(tokens) + [c for c in chars if c not in tokens]
    if len(set(vocab)) != len(vocab):
      raise ValueError("duplicate tokens in the vocabulary")
    self._id = {t: i for i, t in enumerate(vocab)}
    self._tok = vocab
    self._multi = sorted((t for t in tokens if len(t) > 1), key=len, reverse=True)
    self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
    self.eos_token = "<eos>"

  @property
  def vocab_size(self) -> int:
    return len(self._tok)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    del add_special_tokens  # never adds BOS/EOS
    ids, i = [], 0
    while i < len(text):
      for t in self._multi:
        if text.startswith(t, i):
          ids.append(self._id[t])
          i += len(t)
          break
      else:
        ids.append(self._id.get(text[i], self.unk_id))
        i += 1
    return ids

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    out = []
    for i in ids:
      i = int(i)
      if i < len(_CONTROL):
        if not skip_special_tokens:
          out.append(_CONTROL[i] if i >= 0 else "")
      elif i < len(self._tok):
        out.append(self._tok[i])
      else:
        raise ValueError(f"token id {i} is outside [0, {len(self._tok)})")
    return "".join(out)


def _encode(tokenizer, text: str) -> list[int]:
  try:
    return list(tokenizer.encode(text, add_special_tokens=False))
  except TypeError:
    return list(tokenizer.encode(text))


def _contents(messages) -> str:
  return "".join(str(m["content"]) for m in (messages or []))


class PlainRenderer:
  """Messages as their concatenated contents; the prompt starts with BOS (``add_bos``).

  Args:
    tokenizer: ``encode(text)``, ``decode(ids)`` and ``eos_id`` / ``pad_id`` / ``bos_id``.
    stop_strings: texts that end an assistant turn (e.g. ``ToolEnv.stop_strings``).
    add_bos: start the prompt with ``tokenizer.bos_id``.
  """

  def __init__(self, tokenizer, *, stop_strings: Sequence[str] = (), add_bos: bool = True):
    self.tokenizer = tokenizer
    self.eos_id = tokenizer.eos_id
    self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    self.add_bos = add_bos and tokenizer.bos_id is not None
    self.stop_sequences = [_encode(tokenizer, s) for s in stop_strings]

  def prompt_ids(self, messages) -> list[int]:
    return ([self.tokenizer.bos_id] if self.add_bos else []) + _encode(self.tokenizer, _contents(messages))

  def observation_ids(self, messages, *, after_eos: bool = True) -> list[int]:
    del after_eos
    return _encode(self.tokenizer, _contents(messages))

  def assistant_ids(self, text: str) -> list[int]:
    return _encode(self.tokenizer, text)

  def assistant_text(self, ids) -> str:
    ids = [int(i) for i in ids if int(i) not in (self.eos_id, self.pad_id)]
    return self.tokenizer.decode(ids)


class ChatRenderer:
  """Messages through the tokenizer's chat template; an assistant turn ends with EOS.

  The observation after an assistant turn is what the template writes between that turn's
  content (and its end-of-turn token, the tokenizer's EOS) and the next generation prompt,
  found by rendering a conversation with a placeholder assistant turn; a turn that ended on a
  stop string instead of EOS gets the EOS token first (masked, like the rest).

  Args:
    tokenizer: with ``apply_chat_template``, ``encode``, ``decode``, ``eos_id``, ``eos_token``.
    stop_strings: texts that also end an assistant turn.
  """

  _PLACEHOLDER = "\x00ASSISTANT\x00"

  def __init__(self, tokenizer, *, stop_strings: Sequence[str] = ()):
    if tokenizer.eos_id is None:
      raise ValueError("ChatRenderer needs a tokenizer with an EOS (end-of-turn) token")
    self.tokenizer = tokenizer
    self.eos_id = tokenizer.eos_id
    self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    self.stop_sequences = [_encode(tokenizer, s) for s in stop_strings]
    self._eos_text = tokenizer.eos_token or tokenizer.decode([tokenizer.eos_id])

  def prompt_ids(self, messages) -> list[int]:
    text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    return _encode(self.tokenizer, text)

  def observation_ids(self, messages, *, after_eos: bool = True) -> list[int]:
    base = [{"role": "user", "content": "?"}, {"role": "assistant", "content": self._PLACEHOLDER}]
    full = self.tokenizer.apply_chat_template(base + list(messages), add_generation_prompt=True)
    i = full.find(self._PLACEHOLDER)
    if i < 0:
      raise ValueError("the chat template does not render assistant content verbatim")
    rest = full[i + len(self._PLACEHOLDER):]
    if not rest.startswith(self._eos_text):
      raise ValueError(f"the chat template does not end an assistant turn with EOS {self._eos_text!r}")
    rest = rest[len(self._eos_text):]
    return ([] if after_eos else [self.eos_id]) + _encode(self.tokenizer, rest)

  def assistant_ids(self, text: str) -> list[int]:
    return _encode(self.tokenizer, text) + [self.eos_id]

  def assistant_text(self, ids) -> str:
    ids = [int(i) for i in ids if int(i) not in (self.eos_id, self.pad_id)]
    return self.tokenizer.decode(ids)
