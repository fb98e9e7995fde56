"""GGUF (llama.cpp) import: config, weights, tokenizer and chat template.

Reads the file with the ``gguf`` package (``gguf.GGUFReader``, memory-mapped),
maps the architecture metadata to a :class:`ModelConfig`, dequantises each
tensor (Q4_0/Q4_1/Q8_0/F16/F32/BF16 and every other type ``gguf.quants``
knows) and places it straight onto its mesh sharding, one tensor at a time.

llama.cpp's converter permutes the rows of the Llama q and k projections so
that its interleaved-pair RoPE gives the same result as Hugging Face's
half-rotation RoPE (``convert_hf_to_gguf.py``, ``LlamaModel.permute``: rows
``[n_head, 2, H/2] -> [n_head, H/2, 2]``). The loader undoes it, so the weights
are in the Hugging Face layout that :func:`rlhf_jax.models.apply_rope` expects.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from rlhf_jax.models.config import ModelConfig

# Architectures whose q/k rows llama.cpp permutes (interleaved RoPE in llama.cpp).
_PERMUTED_ARCHS = ("llama",)
_SUPPORTED_ARCHS = ("llama", "qwen2")


def _reader(path: str):
  try:
    import gguf
  except ImportError as e:  # pragma: no cover
    raise ImportError("reading GGUF files needs the `gguf` package: pip install 'gguf>=0.10'") from e
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path!r} does not exist")
  try:
    return gguf.GGUFReader(path, "r")
  except Exception as e:
    raise ValueError(f"{path!r} is not a readable GGUF file: {e}") from e


def read_metadata(reader) -> dict[str, Any]:
  """All metadata key/values of a ``GGUFReader`` as plain Python values."""
  from gguf import GGUFValueType

  out = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    types = list(field.types)
    if len(types) == 2 and types[0] == GGUFValueType.ARRAY and types[1] == GGUFValueType.STRING:
      # Fast path for the 50k-entry token and merge lists (contents() is slow on them).
      parts = field.parts
      out[key] = [bytes(parts[i]).decode("utf-8", errors="replace") for i in field.data]
      continue
    if len(types) == 2 and types[0] == GGUFValueType.ARRAY and types[1] != GGUFValueType.ARRAY:
      parts = field.parts
      out[key] = [parts[i].item() for i in field.data] if len(field.data) else []
      continue
    try:
      out[key] = field.contents()
    except Exception:  # an exotic field type: skip rather than fail the load
      continue
  return out


def _f32(x) -> float:
  """GGUF stores floats as float32: the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)."""
  return float(repr(np.float32(x)).removeprefix("np.float32(").removesuffix(")"))


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str], *, dtype: str = "float32",
                         param_dtype: str = "float32") -> ModelConfig:
  """A :class:`ModelConfig` from GGUF metadata (``{arch}.embedding_length`` etc.)."""
  arch = meta.get("general.architecture")
  if arch not in _SUPPORTED_ARCHS:
    raise NotImplementedError(
        f"GGUF architecture {arch!r} is not supported; supported: {list(_SUPPORTED_ARCHS)}"
    )

  def get(key, default=None):
    full = f"{arch}.{key}"
    if full not in meta:
      if default is None:
        raise ValueError(f"GGUF metadata lacks {full!r}")
      return default
    return meta[full]

  num_heads = int(get("attention.head_count"))
  hidden = int(get("embedding_length"))
  if "tokenizer.ggml.tokens" in meta:
    vocab = len(meta["tokenizer.ggml.tokens"])
  else:
    vocab = int(get("vocab_size"))
  head_dim = int(meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count",
                                                                    hidden // num_heads)))
  scaling = None
  if meta.get(f"{arch}.rope.scaling.type") not in (None, "none"):
    raise NotImplementedError(f"GGUF RoPE scaling {meta[f'{arch}.rope.scaling.type']!r} is not supported")
  return ModelConfig(
      vocab_size=vocab,
      hidden_size=hidden,
      intermediate_size=int(get("feed_forward_length")),
      num_layers=int(get("block_count")),
      num_heads=num_heads,
      num_kv_heads=int(get("attention.head_count_kv", num_heads)),
      head_dim=head_dim,
      rope_theta=_f32(get("rope.freq_base", 10000.0)),
      rope_scaling=scaling,
      rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
      qkv_bias="blk.0.attn_q.bias" in tensor_names,
      tie_embeddings="output.weight" not in tensor_names,
      max_position_embeddings=int(get("context_length", 2048)),
      dtype=dtype,
      param_dtype=param_dtype,
  )


def dequantize(tensor) -> np.ndarray:
  """A ``ReaderTensor`` as float32 numpy in its logical (row-major, PyTorch) shape."""
  from gguf import GGMLQuantizationType, quants

  t = tensor.tensor_type
  if t == GGMLQuantizationType.F32:
    arr = np.asarray(tensor.data, np.float32)
  elif t == GGMLQuantizationType.F16:
    arr = np.asarray(tensor.data).astype(np.float32)
  else:
    arr = quants.dequantize(tensor.data, t).astype(np.float32, copy=False)
  shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
  return arr.reshape(shape)


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (``[n, H/2, 2] -> [n, 2, H/2]`` on the rows)."""
  rows = w.shape[0]
  half = rows // n_head // 2
  return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(reader, config: ModelConfig, arch: str) -> Iterator[tuple[tuple, np.ndarray]]:
  c = config
  n, k, h, d = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
  permute = arch in _PERMUTED_ARCHS
  for t in reader.tensors:
    name = t.name
    if name == "rope_freqs.weight":
      raise NotImplementedError("GGUF with rope_freqs (Llama-3 RoPE scaling) is not supported yet")
    w = dequantize(t)
    if name == "token_embd.weight":
      yield ("embed",), w
    elif name == "output.weight":
      yield ("lm_head",), w.T
    elif name == "output_norm.weight":
      yield ("final_norm", "scale"), w
    elif name.startswith("blk."):
      _, idx, rest = name.split(".", 2)
      i = int(idx)
      p = ("layers", i)
      if rest == "attn_norm.weight":
        yield p + ("attn_norm", "scale"), w
      elif rest == "ffn_norm.weight":
        yield p + ("mlp_norm", "scale"), w
      elif rest == "attn_q.weight":
        if permute:
          w = unpermute_rope_rows(w, n)
        yield p + ("attn", "wq"), w.T.reshape(d, n, h)
      elif rest == "attn_k.weight":
        if permute:
          w = unpermute_rope_rows(w, k)
        yield p + ("attn", "wk"), w.T.reshape(d, k, h)
      elif rest == "attn_v.weight":
        yield p + ("attn", "wv"), w.T.reshape(d, k, h)
      elif rest == "attn_output.weight":
        yield p + ("attn", "wo"), w.T.reshape(n, h, d)
      elif rest in ("attn_q.bias", "attn_k.bias", "attn_v.bias"):
        heads = n if rest.startswith("attn_q") else k
        if permute and not rest.startswith("attn_v"):
          w = unpermute_rope_rows(w, heads)
        yield p + ("attn", "b" + rest[5]), w.reshape(heads, h)
      elif rest == "ffn_gate.weight":
        yield p + ("mlp", "w_gate"), w.T
      elif rest == "ffn_up.weight":
        yield p + ("mlp", "w_up"), w.T
      elif rest == "ffn_down.weight":
        yield p + ("mlp", "w_down"), w.T
      else:
        raise NotImplementedError(f"GGUF tensor {name!r} has no counterpart in the model")
    else:
      raise NotImplementedError(f"GGUF tensor {name!r} has no counterpart in the model")


def load_gguf(path: str, *, dtype: str = "float32", param_dtype: str = "float32", mesh=None, rules=None,
              **options):
  """``(model, tokenizer)`` from a GGUF file, each tensor placed on its sharding as it is read.

  ``options`` are runtime :class:`ModelConfig` fields (``remat``, ``scan_layers``, ...).
  """
  from rlhf_jax.models.pretrained import materialize
  from rlhf_jax.models.tokenizer import Tokenizer

  reader = _reader(path)
  meta = read_metadata(reader)
  names = {t.name for t in reader.tensors}
  config = config_from_metadata(meta, names, dtype=dtype, param_dtype=param_dtype).replace(**options)
  model = materialize(config, _gguf_tensors(reader, config, meta["general.architecture"]),
                      mesh=mesh, rules=rules, source=f"GGUF {path}")
  tokenizer = Tokenizer.from_gguf_metadata(meta) if "tokenizer.ggml.tokens" in meta else None
  return model, tokenizer


def load_gguf_config(path: str, **kw) -> ModelConfig:
  """Only the :class:`ModelConfig` of a GGUF file."""
  reader = _reader(path)
  return config_from_metadata(read_metadata(reader), {t.name for t in reader.tensors}, **kw)


def load_gguf_tokenizer(path: str):
  """Only the tokenizer (with chat template) of a GGUF file."""
  from rlhf_jax.models.tokenizer import Tokenizer

  return Tokenizer.from_gguf_metadata(read_metadata(_reader(path)))
