"""Tokenizer: Hugging Face ``tokenizers`` plus the model's own Jinja chat template.

Built from a ``tokenizer.json`` (:meth:`Tokenizer.from_file`,
:meth:`Tokenizer.from_hf_dir`), from GGUF metadata (byte-level BPE: vocabulary
+ merges, :meth:`Tokenizer.from_gguf_metadata`), or from nothing
(:meth:`Tokenizer.byte_level`: one token per UTF-8 byte plus ChatML specials, for
randomly initialised models). Chat templates are rendered in a
sandboxed jinja2 environment with the globals Hugging Face templates use
(``raise_exception``, ``strftime_now``, a ``tojson`` filter that keeps
non-ASCII). :meth:`Tokenizer.encode_chat` returns ids with a mask marking only
the assistant turns' tokens.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

# llama.cpp pre-tokenizer names -> split regex (before byte-level mapping).
# "smollm" (SmolLM/SmolLM2): GPT-2 splitting with every digit its own piece, as
# the original tokenizer.json (Digits(individual_digits=True) + ByteLevel) and llama.cpp do.
_SPLIT_DIGITS_PRE = ("smollm", "starcoder", "refact")

# ChatML, as SmolLM2 and Qwen write it: each turn ``<|im_start|>{role}\n{content}<|im_end|>\n``.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BYTE_LEVEL_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (the ``ByteLevel`` pre-tokenizer's alphabet)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
      list(range(ord("\xae"), ord("\xff") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {b: chr(c) for b, c in zip(bs, cs)}


def _raise_exception(message):
  from jinja2.exceptions import TemplateError

  raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


def _compile_template(source: str):
  from jinja2.ext import loopcontrols
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env.from_string(source)


class Tokenizer:
  """Text <-> token ids, special ids, and chat-template rendering.

  Attributes:
    bos_id, eos_id, pad_id: special token ids (``pad_id`` falls back to ``eos_id``).
    chat_template: the Jinja source, or ``None``.
  """

  def __init__(self, tokenizer, *, bos_id: int | None = None, eos_id: int | None = None,
               pad_id: int | None = None, chat_template: str | None = None,
               add_bos: bool = False, add_eos: bool = False):
    self._tok = tokenizer  # a tokenizers.Tokenizer
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = pad_id if pad_id is not None else eos_id
    self.add_bos = add_bos
    self.add_eos = add_eos
    self.chat_template = chat_template
    self._template = None

  # ---- construction -------------------------------------------------------

  @classmethod
  def from_gguf_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
    """Byte-level BPE from ``tokenizer.ggml.*`` metadata (the gpt2 tokenizer model)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
      raise NotImplementedError(
          f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _SPLIT_DIGITS_PRE:
      tok.pre_tokenizer = pre_tokenizers.Sequence(
          [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("qwen2", "llama-bpe", "llama3"):
      split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               if pre == "qwen2" else r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}")
      split += r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
      tok.pre_tokenizer = pre_tokenizers.Sequence([
          pre_tokenizers.Split(Regex(split), behavior="isolated"),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
      tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == 3]
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4]
    if special:
      tok.add_special_tokens(special)
    if user:
      tok.add_tokens(user)

    def tid(key):
      v = meta.get(f"tokenizer.ggml.{key}_token_id")
      return None if v is None else int(v)

    return cls(tok, bos_id=tid("bos"), eos_id=tid("eos"), pad_id=tid("padding"),
               chat_template=meta.get("tokenizer.chat_template"),
               add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
               add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)))

  @classmethod
  def byte_level(cls, *, chat_template: str | None = None) -> "Tokenizer":
    """A tokenizer that needs no files: every UTF-8 byte is one token (id = byte value).

    Ids 0..255 are the bytes (GPT-2's byte-level alphabet, no merges), so any
    text encodes and decodes losslessly; 256, 257, 258 are the special tokens
    ``<|im_start|>`` (BOS), ``<|im_end|>`` (EOS, ends every chat turn) and
    ``<|endoftext|>`` (padding): written in text they encode as one token each,
    and ``decode(..., skip_special_tokens=True)`` drops them. BOS/EOS are never
    added by :meth:`encode`. ``vocab_size`` is 259: set the model's
    ``vocab_size`` to it (e.g. ``get_config("tiny").replace(vocab_size=tok.vocab_size)``).

    Args:
      chat_template: Jinja source; default :data:`CHATML_TEMPLATE` (generation
        prompt ``<|im_start|>assistant\\n``).
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in BYTE_LEVEL_SPECIALS])
    bos, eos, pad = (tok.token_to_id(t) for t in BYTE_LEVEL_SPECIALS)
    return cls(tok, bos_id=bos, eos_id=eos, pad_id=pad,
               chat_template=CHATML_TEMPLATE if chat_template is None else chat_template)

  @classmethod
  def from_file(cls, tokenizer_json: str, *, bos_token: str | None = None, eos_token: str | None = None,
                pad_token: str | None = None, chat_template: str | None = None) -> "Tokenizer":
    """From a ``tokenizer.json``; special tokens given by their text."""
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(tokenizer_json)
    tok.no_padding()
    tok.no_truncation()
    ids = {name: (tok.token_to_id(t) if t else None)
           for name, t in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token))}
    return cls(tok, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], chat_template=chat_template)

  @classmethod
  def from_hf_dir(cls, path: str) -> "Tokenizer | None":
    """From a Hugging Face directory (``tokenizer.json`` + ``tokenizer_config.json``,
    optional ``chat_template.jinja``); ``None`` if it has no ``tokenizer.json``."""
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
      return None
    cfg = {}
    cfg_path = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
      with open(cfg_path) as f:
        cfg = json.load(f)

    def text(v):
      return v.get("content") if isinstance(v, dict) else v

    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
      template = {t["name"]: t["template"] for t in template}.get("default")
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
      with open(jinja_path) as f:
        template = f.read()
    out = cls.from_file(tj, bos_token=text(cfg.get("bos_token")), eos_token=text(cfg.get("eos_token")),
                        pad_token=text(cfg.get("pad_token")), chat_template=template)
    out.add_bos = bool(cfg.get("add_bos_token", False)) and out.bos_id is not None
    return out

  # ---- encode / decode ----------------------------------------------------

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def id_to_token(self, i: int) -> str | None:
    return self._tok.id_to_token(i)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  @property
  def bos_token(self) -> str | None:
    return None if self.bos_id is None else self._tok.id_to_token(self.bos_id)

  @property
  def eos_token(self) -> str | None:
    return None if self.eos_id is None else self._tok.id_to_token(self.eos_id)

  @property
  def pad_token(self) -> str | None:
    return None if self.pad_id is None else self._tok.id_to_token(self.pad_id)

  def _wrap(self, ids: list[int], add_special_tokens: bool) -> list[int]:
    if add_special_tokens:
      if self.add_bos and self.bos_id is not None:
        ids = [self.bos_id] + ids
      if self.add_eos and self.eos_id is not None:
        ids = ids + [self.eos_id]
    return ids

  def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text`` (special-token strings in it map to their ids); BOS/EOS
    are added only when the tokenizer's config says so."""
    return self._wrap(list(self._tok.encode(text, add_special_tokens=False).ids), add_special_tokens)

  def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
    return [self._wrap(list(e.ids), add_special_tokens)
            for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
    ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

  # ---- chat ---------------------------------------------------------------

  def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                          **kwargs) -> str:
    """Renders ``messages`` (``[{"role", "content"}, ...]``) with the model's Jinja template.

    Extra keyword arguments (``tools``, ``documents``, ...) are passed to the template.
    """
    if not self.chat_template:
      raise ValueError("this tokenizer has no chat template (none in the checkpoint)")
    if self._template is None:
      self._template = _compile_template(self.chat_template)
    ctx = dict(bos_token=self.bos_token or "", eos_token=self.eos_token or "",
               pad_token=self.pad_token or "", unk_token="")
    ctx.update(kwargs)
    return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **ctx)

  def encode_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False,
                  **kwargs) -> tuple[list[int], list[int]]:
    """``(ids, assistant_mask)`` for a conversation rendered with the chat template.

    ``ids`` equal ``encode(apply_chat_template(messages))``. The mask is 1 on the
    tokens of each assistant turn after its header: the content and the template's
    end-of-turn text (e.g. ``<|im_end|>\\n``), so a model learns to stop; 0 on
    system/user turns and on the headers the template writes before an assistant
    reply. The assistant spans are found by rendering prefixes of the
    conversation, so the template must render each prefix as a prefix of the
    whole (every common template does; otherwise this raises ``ValueError``).
    """
    messages = list(messages)
    full = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    spans = []
    for i, m in enumerate(messages):
      if m.get("role") != "assistant":
        continue
      start_text = self.apply_chat_template(messages[:i], add_generation_prompt=True, **kwargs) if i else ""
      end_text = self.apply_chat_template(messages[:i + 1], add_generation_prompt=False, **kwargs)
      if not full.startswith(end_text) or not end_text.startswith(start_text):
        raise ValueError("the chat template does not render conversation prefixes as prefixes of the "
                         "whole conversation; cannot locate assistant turns for the mask")
      spans.append((len(start_text), len(end_text)))
    enc = self._tok.encode(full, add_special_tokens=False)
    ids = list(enc.ids)
    mask = []
    for (s, e) in enc.offsets:
      mask.append(int(any(a <= s < b for a, b in spans)))
    wrapped = self._wrap(ids, True)
    if len(wrapped) != len(ids):
      pre = 1 if (self.add_bos and self.bos_id is not None) else 0
      mask = [0] * pre + mask + [0] * (len(wrapped) - len(ids) - pre)
    return wrapped, mask

  # ---- export -------------------------------------------------------------

  def save(self, out_dir: str) -> None:
    """Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
    (and ``chat_template.jinja``) so that ``transformers.AutoTokenizer`` loads them."""
    os.makedirs(out_dir, exist_ok=True)
    self._tok.save(os.path.join(out_dir, "tokenizer.json"))
    special = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                 ("pad_token", self.pad_token)) if v is not None}
    cfg = dict(special, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=self.add_bos,
               add_eos_token=self.add_eos, clean_up_tokenization_spaces=False,
               model_max_length=1_000_000_000)
    if self.chat_template:
      cfg["chat_template"] = self.chat_template
      with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
        f.write(self.chat_template)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
      json.dump(cfg, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
      json.dump(special, f, indent=2, ensure_ascii=False)
