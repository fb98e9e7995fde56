"""``Tokenizer.byte_level``: one token per UTF-8 byte plus ChatML specials, no files needed."""

import json
import os

import pytest

from rlhf_jax.data import tokenize
from rlhf_jax.models.tokenizer import BYTE_LEVEL_SPECIALS, CHATML_TEMPLATE, Tokenizer

TEXTS = [
    "",
    "Hello, world!",
    "Café, naïve, Ångström — déjà vu.",
    "日本語のテキストと中文文本，한국어 텍스트도.",
    "Emoji: 🤗🎉👍🏽 and 🇫🇷 flags, ZWJ 👩‍👩‍👧",
    "a   b\t\tc\n\n\n  d    \r\n",
    "\x00\x01\x7f control \u200b zero width \ufeff bom \U0010ffff",
    "  leading spaces and 'quotes' \"double\" \\ backslash",
]

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there ñ"},
    {"role": "assistant", "content": "Hello! 🤗"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
]


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.byte_level()


def test_vocabulary_and_special_ids(tok):
  assert tok.vocab_size == 256 + len(BYTE_LEVEL_SPECIALS)
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
  assert not tok.add_bos and not tok.add_eos
  assert tok.chat_template == CHATML_TEMPLATE


@pytest.mark.parametrize("text", TEXTS)
def test_every_byte_is_one_token_and_decode_is_lossless(tok, text):
  ids = tok.encode(text)
  assert ids == list(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.decode(ids, skip_special_tokens=True) == text
  assert tok.encode_batch([text, text]) == [ids, ids]


def test_all_256_bytes_round_trip(tok):
  assert len({tok.id_to_token(b) for b in range(256)}) == 256
  assert all(tok.decode([b]) == chr(b) for b in range(128))
  # Every valid UTF-8 code point range survives.
  text = "".join(chr(c) for c in list(range(1, 0xD800, 97)) + list(range(0xE000, 0x110000, 4099)))
  assert tok.decode(tok.encode(text)) == text


def test_specials_are_one_token_and_skipped_on_decode(tok):
  text = "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>x"
  ids = tok.encode(text)
  assert ids == [256] + list(b"user\nhi") + [257] + list(b"\n") + [258] + list(b"x")
  assert tok.decode(ids) == text
  assert tok.decode(ids, skip_special_tokens=True) == "user\nhi\nx"
  # A partial special is plain bytes.
  assert tok.encode("<|im_end") == list(b"<|im_end")


def test_chatml_rendering_and_prefix_property(tok):
  assert tok.apply_chat_template(CHAT[:2], add_generation_prompt=True) == (
      "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there ñ<|im_end|>\n"
      "<|im_start|>assistant\n")
  for i in (i for i, m in enumerate(CHAT) if m["role"] == "assistant"):
    prompt = tok.apply_chat_template(CHAT[:i], add_generation_prompt=True)
    full = tok.apply_chat_template(CHAT[:i + 1], add_generation_prompt=False)
    assert full.startswith(prompt)
  ids, mask = tok.encode_chat(CHAT)
  assert ids == tok.encode(tok.apply_chat_template(CHAT))
  got = [i for i, m in zip(ids, mask) if m]
  assert got == list("Hello! 🤗".encode()) + [257] + list(b"\n") + list(b"4.") + [257] + list(b"\n")


def test_data_tokenize_accepts_it(tok):
  ex = {"kind": "sft", "messages": CHAT, "source": "test"}
  batch = tokenize.tokenize_sft([ex], tok, max_len=256, pad_id=tok.pad_id)
  n = int(batch["attention_mask_BxT"].sum())
  ids = batch["input_ids_BxT"][0, :n].tolist()
  assert ids == tok.encode(tok.apply_chat_template(CHAT))
  assert (batch["input_ids_BxT"][0, n:] == tok.pad_id).all()


def test_custom_chat_template():
  tpl = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
  tok = Tokenizer.byte_level(chat_template=tpl)
  assert tok.apply_chat_template(CHAT[1:2]) == "user: Hi there ñ\n"


def test_save_reload_and_transformers(tok, tmp_path):
  out = str(tmp_path / "tok")
  tok.save(out)
  assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
  cfg = json.load(open(os.path.join(out, "tokenizer_config.json")))
  assert cfg["chat_template"] == CHATML_TEMPLATE
  assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"

  back = Tokenizer.from_hf_dir(out)
  assert (back.bos_id, back.eos_id, back.pad_id, back.vocab_size) == (tok.bos_id, tok.eos_id, tok.pad_id,
                                                                     tok.vocab_size)
  assert back.chat_template == tok.chat_template and not back.add_bos
  texts = TEXTS + [tok.apply_chat_template(CHAT), "<|im_start|>a<|endoftext|>"]
  for text in texts:
    assert back.encode(text) == tok.encode(text)
    assert back.decode(tok.encode(text)) == text

  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoTokenizer.from_pretrained(out)
  assert (hf.eos_token_id, hf.pad_token_id) == (tok.eos_id, tok.pad_id)
  assert len(hf) == tok.vocab_size
  for text in texts:
    assert list(hf(text)["input_ids"]) == tok.encode(text), text
    assert hf.decode(tok.encode(text)) == text
  assert hf.decode(tok.encode(texts[-2]), skip_special_tokens=True) == tok.decode(
      tok.encode(texts[-2]), skip_special_tokens=True)
  rendered = hf.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)
  assert rendered == tok.apply_chat_template(CHAT[:4], add_generation_prompt=True)
