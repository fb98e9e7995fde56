"""Hugging Face checkpoints: import (Llama, Mistral, Qwen2/2.5, Qwen3) and export (safetensors).

Import reads ``config.json`` and the ``*.safetensors`` files (a sharded
``model.safetensors.index.json`` included) with a small memory-mapped reader,
so each tensor is read, transposed into the model's layout and placed on its
mesh sharding before the next is touched (no full host copy). bf16/f16/f32
tensors are supported (bf16 via ``ml_dtypes``, which JAX ships).

Qwen3 (dense) maps its per-head ``q_norm``/``k_norm`` to ``ModelConfig.qk_norm``;
Qwen3-MoE is refused.

Export writes ``model.safetensors`` + ``config.json`` (+ ``generation_config.json``
and the tokenizer files) that ``transformers.AutoModelForCausalLM`` loads, also
streamed: each parameter is gathered to the host only while its bytes are written.
Import -> export -> import is exact.

:func:`export_adapter` writes the LoRA adapters of a model from
:func:`rlhf_jax.models.lora.apply_lora` in PEFT's format
(``adapter_model.safetensors`` + ``adapter_config.json``), for
``peft.PeftModel.from_pretrained(base, adapter_dir)`` on the exported (or original)
base checkpoint. Each adapter is reshaped the way :func:`_ours_to_hf` maps its
kernel: every target kernel ``W [in..., out...]`` becomes
``W.reshape(prod(in), prod(out)).T``, so ``A [in..., r]`` -> ``lora_A [r, in]`` and
``B [r, out...]`` -> ``lora_B [out, r]``. GGUF-loaded models use the same layout
(llama.cpp's q/k row permutation is undone at load time).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import numpy as np

from rlhf_jax.models.config import ModelConfig

_LLAMA_TYPES = ("llama", "mistral")
_QWEN2_TYPES = ("qwen2",)
_QWEN3_TYPES = ("qwen3",)
def _st_name(dtype) -> str:
  dtype = np.dtype(dtype)
  if dtype.name == "bfloat16":
    return "BF16"
  return {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}[dtype]


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """``(name, array)`` for each tensor of a ``.safetensors`` file, one at a time (``safetensors.safe_open``).

  F32, F16 and BF16 (as ``ml_dtypes.bfloat16``) tensors; any other dtype is a ValueError naming it.
  """
  from safetensors import safe_open

  with safe_open(path, framework="np") as f:
    for name in f.keys():
      arr = f.get_tensor(name)
      if np.dtype(arr.dtype).name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"{path}: tensor {name!r} has dtype {arr.dtype}; supported: F32, F16, BF16")
      yield name, arr


def write_safetensors(path: str, tensors, metadata: dict | None = None) -> None:
  """Writes a ``.safetensors`` file (F32/F16/BF16), tensor by tensor.

  ``tensors`` maps names to arrays, or to ``(shape, dtype, thunk)`` triples whose
  ``thunk()`` produces the array when it is written (so only one is on the host at a time).
  Written here rather than with ``safetensors.numpy.save_file``, which needs every tensor in
  host memory at once (the whole model, for an export of a sharded one); the layout is the
  format's (8-byte header length, JSON header padded to 8 bytes, the tensors in header order),
  and files are read back with the library (`iter_safetensors`).
  """
  entries = {}
  for name, v in tensors.items():
    if isinstance(v, tuple):
      entries[name] = v
    else:
      entries[name] = (v.shape, v.dtype, (lambda v=v: v))
  header = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, (shape, dtype, _) in entries.items():
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _st_name(dtype), "shape": [int(d) for d in shape], "data_offsets": [offset, offset + n]}
    offset += n
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, (shape, dtype, thunk) in entries.items():
      arr = np.ascontiguousarray(thunk(), dtype=dtype)
      if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"tensor {name}: shape {arr.shape} differs from the declared {tuple(shape)}")
      f.write(arr.tobytes())


def config_from_hf(cfg: dict, *, dtype: str = "float32", param_dtype: str = "float32") -> ModelConfig:
  """A :class:`ModelConfig` from a Hugging Face ``config.json`` dict."""
  mt = cfg.get("model_type")
  supported = _LLAMA_TYPES + _QWEN2_TYPES + _QWEN3_TYPES
  if mt == "qwen3_moe":
    raise NotImplementedError("model_type 'qwen3_moe' (mixture of experts) is not supported; dense qwen3 is")
  if mt not in supported:
    raise NotImplementedError(f"model_type {mt!r} is not supported; supported: {list(supported)}")
  if mt == "mistral" and cfg.get("sliding_window"):
    pass  # sliding window only matters beyond its length; full attention is exact within it
  if mt in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
    raise NotImplementedError(f"{mt} with use_sliding_window=true is not supported")
  if mt == "qwen3" and cfg.get("attention_bias"):
    raise NotImplementedError("Qwen3 with attention_bias=true is not supported")
  if cfg.get("mlp_bias"):
    raise NotImplementedError("Llama with mlp_bias=true is not supported")
  if mt in _LLAMA_TYPES and cfg.get("attention_bias"):
    raise NotImplementedError("Llama with attention_bias=true (o_proj bias) is not supported")
  # transformers >= 5 writes ``rope_parameters`` (theta and scaling together); older
  # versions a top-level ``rope_theta`` and ``rope_scaling``.
  rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
  theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
  rtype = rope.get("rope_type", rope.get("type", "default"))
  scaling = None
  if rtype == "llama3":
    scaling = {"type": "llama3", "factor": float(rope["factor"]),
               "low_freq_factor": float(rope["low_freq_factor"]),
               "high_freq_factor": float(rope["high_freq_factor"]),
               "original_max_position_embeddings": int(rope["original_max_position_embeddings"])}
  elif rtype not in ("default", None):
    raise NotImplementedError(f"RoPE scaling {rtype!r} is not supported (only llama3)")
  n = int(cfg["num_attention_heads"])
  return ModelConfig(
      vocab_size=int(cfg["vocab_size"]),
      hidden_size=int(cfg["hidden_size"]),
      intermediate_size=int(cfg["intermediate_size"]),
      num_layers=int(cfg["num_hidden_layers"]),
      num_heads=n,
      num_kv_heads=int(cfg.get("num_key_value_heads") or n),
      head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // n),
      rope_theta=float(theta),
      rope_scaling=scaling,
      rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      qkv_bias=mt in _QWEN2_TYPES,
      qk_norm=mt in _QWEN3_TYPES,
      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
      dtype=dtype,
      param_dtype=param_dtype,
  )


def config_to_hf(c: ModelConfig) -> dict:
  """The ``config.json`` dict for a :class:`ModelConfig` (Qwen3 with q/k norm, Qwen2 with QKV bias, else Llama)."""
  if c.scalar_head_outputs:
    raise NotImplementedError("export of a model with a scalar head is not supported (LM policies only)")
  common = dict(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
      head_dim=c.head_dim, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
      tie_word_embeddings=c.tie_embeddings, max_position_embeddings=c.max_position_embeddings,
      hidden_act="silu", initializer_range=0.02, attention_dropout=0.0, use_cache=True,
      torch_dtype=c.param_dtype, dtype=c.param_dtype,
  )
  # Both spellings: ``rope_theta``/``rope_scaling`` (transformers 4) and ``rope_parameters`` (5).
  common["rope_parameters"] = {"rope_theta": c.rope_theta, "rope_type": "default"}
  if c.rope_scaling is not None:
    s = c.rope_scaling
    common["rope_scaling"] = {"rope_type": "llama3", "factor": s["factor"], "low_freq_factor": s["low_freq_factor"],
                              "high_freq_factor": s["high_freq_factor"],
                              "original_max_position_embeddings": s["original_max_position_embeddings"]}
    common["rope_parameters"] = dict(common["rope_scaling"], rope_theta=c.rope_theta)
  if c.qk_norm:
    if c.qkv_bias:
      raise NotImplementedError("export of q/k norm together with QKV bias has no Hugging Face architecture")
    if c.rope_scaling is not None:
      raise NotImplementedError("export of a Qwen3 (q/k norm) model with llama3 RoPE scaling is not supported")
    return dict(common, architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False,
                use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers)
  if c.qkv_bias:
    return dict(common, architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
                sliding_window=None, max_window_layers=c.num_layers)
  return dict(common, architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False,
              mlp_bias=False, pretraining_tp=1)


def _hf_to_ours(name: str, w: np.ndarray, c: ModelConfig):
  """Maps one HF tensor to ``(path, array)`` in the model's layout, or ``None`` to skip."""
  n, k, h, d = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
  if name == "model.embed_tokens.weight":
    return ("embed",), w
  if name == "lm_head.weight":
    return None if c.tie_embeddings else (("lm_head",), w.T)
  if name == "model.norm.weight":
    return ("final_norm", "scale"), w
  if not name.startswith("model.layers."):
    if name.endswith("rotary_emb.inv_freq"):
      return None
    raise ValueError(f"tensor {name!r} has no counterpart in the model")
  _, _, idx, rest = name.split(".", 3)
  p = ("layers", int(idx))
  table = {
      "input_layernorm.weight": (("attn_norm", "scale"), lambda w: w),
      "post_attention_layernorm.weight": (("mlp_norm", "scale"), lambda w: w),
      "self_attn.q_proj.weight": (("attn", "wq"), lambda w: w.T.reshape(d, n, h)),
      "self_attn.k_proj.weight": (("attn", "wk"), lambda w: w.T.reshape(d, k, h)),
      "self_attn.v_proj.weight": (("attn", "wv"), lambda w: w.T.reshape(d, k, h)),
      "self_attn.o_proj.weight": (("attn", "wo"), lambda w: w.T.reshape(n, h, d)),
      "self_attn.q_proj.bias": (("attn", "bq"), lambda w: w.reshape(n, h)),
      "self_attn.k_proj.bias": (("attn", "bk"), lambda w: w.reshape(k, h)),
      "self_attn.v_proj.bias": (("attn", "bv"), lambda w: w.reshape(k, h)),
      "self_attn.q_norm.weight": (("attn", "q_norm", "scale"), lambda w: w),
      "self_attn.k_norm.weight": (("attn", "k_norm", "scale"), lambda w: w),
      "mlp.gate_proj.weight": (("mlp", "w_gate"), lambda w: w.T),
      "mlp.up_proj.weight": (("mlp", "w_up"), lambda w: w.T),
      "mlp.down_proj.weight": (("mlp", "w_down"), lambda w: w.T),
  }
  if rest.endswith("rotary_emb.inv_freq"):
    return None
  if rest not in table:
    raise ValueError(f"tensor {name!r} has no counterpart in the model")
  sub, fn = table[rest]
  return p + sub, fn(w)


def _ours_to_hf(path: tuple, w, c: ModelConfig):
  """``(hf_name, array)`` for one parameter; with ``w=None`` only the name (no data touched)."""
  n, k, h, d = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
  ident = lambda w: w  # noqa: E731
  if path == ("embed",):
    name, fn = "model.embed_tokens.weight", ident
  elif path == ("lm_head",):
    name, fn = "lm_head.weight", lambda w: w.T
  elif path == ("final_norm", "scale"):
    name, fn = "model.norm.weight", ident
  else:
    table = {
        ("attn_norm", "scale"): ("input_layernorm.weight", ident),
        ("mlp_norm", "scale"): ("post_attention_layernorm.weight", ident),
        ("attn", "wq"): ("self_attn.q_proj.weight", lambda w: w.reshape(d, n * h).T),
        ("attn", "wk"): ("self_attn.k_proj.weight", lambda w: w.reshape(d, k * h).T),
        ("attn", "wv"): ("self_attn.v_proj.weight", lambda w: w.reshape(d, k * h).T),
        ("attn", "wo"): ("self_attn.o_proj.weight", lambda w: w.reshape(n * h, d).T),
        ("attn", "bq"): ("self_attn.q_proj.bias", lambda w: w.reshape(n * h)),
        ("attn", "bk"): ("self_attn.k_proj.bias", lambda w: w.reshape(k * h)),
        ("attn", "bv"): ("self_attn.v_proj.bias", lambda w: w.reshape(k * h)),
        ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", ident),
        ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", ident),
        ("mlp", "w_gate"): ("mlp.gate_proj.weight", lambda w: w.T),
        ("mlp", "w_up"): ("mlp.up_proj.weight", lambda w: w.T),
        ("mlp", "w_down"): ("mlp.down_proj.weight", lambda w: w.T),
    }
    sub = tuple(path[2:])
    if len(path) < 3 or path[0] != "layers" or sub not in table:
      raise ValueError(f"parameter {'.'.join(map(str, path))} has no Hugging Face counterpart")
    name, fn = table[sub]
    name = f"model.layers.{path[1]}." + name
  return name, (None if w is None else fn(w))


def _hf_shape(path: tuple, shape: tuple, c: ModelConfig) -> tuple:
  """The Hugging Face shape of a parameter of the given (model-layout) shape."""
  if len(shape) == 3:  # [D, N, H] -> [N*H, D]; [N, H, D] -> [D, N*H]
    return (shape[1] * shape[2], shape[0]) if path[-1] != "wo" else (shape[2], shape[0] * shape[1])
  if len(shape) == 2:
    if path[-1] in ("bq", "bk", "bv"):
      return (shape[0] * shape[1],)
    return shape if path == ("embed",) else (shape[1], shape[0])
  return shape


def safetensors_files(path: str) -> list[str]:
  """The ``.safetensors`` files of a HF directory (from the index when sharded)."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
    missing = [x for x in files if not os.path.isfile(os.path.join(path, x))]
    if missing:
      raise FileNotFoundError(f"{index} names shard files that are missing: {missing}")
    return [os.path.join(path, x) for x in files]
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(single):
    return [single]
  files = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"Hugging Face directory {path!r} has no *.safetensors weights "
                            "(PyTorch .bin checkpoints are not supported; convert them to safetensors)")
  return [os.path.join(path, x) for x in files]


def load_hf_config(path: str, **kw) -> ModelConfig:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{path!r} has no config.json (not a Hugging Face model directory)")
  with open(cfg_path) as f:
    return config_from_hf(json.load(f), **kw)


def load_hf(path: str, *, dtype: str = "float32", param_dtype: str = "float32", mesh=None, rules=None,
            **options):
  """``(model, tokenizer)`` from a local Hugging Face directory, streamed tensor by tensor.

  ``options`` are runtime :class:`ModelConfig` fields (``remat``, ``scan_layers``, ...).

  ``tokenizer`` is ``None`` when the directory has no ``tokenizer.json``.
  """
  from rlhf_jax.models.pretrained import materialize
  from rlhf_jax.models.tokenizer import Tokenizer

  config = load_hf_config(path, dtype=dtype, param_dtype=param_dtype).replace(**options)
  files = safetensors_files(path)

  def tensors():
    for file in files:
      for name, w in iter_safetensors(file):
        mapped = _hf_to_ours(name, w, config)
        if mapped is not None:
          yield mapped

  model = materialize(config, tensors(), mesh=mesh, rules=rules, source=f"Hugging Face checkpoint {path}")
  return model, Tokenizer.from_hf_dir(path)


def export_hf(model, tokenizer, out_dir: str, *, dtype: str | None = None,
              max_shard_bytes: int | None = None) -> None:
  """Writes a Hugging Face checkpoint that ``transformers`` loads.

  Args:
    model: a :class:`rlhf_jax.models.Transformer` (sharded or not; each
      parameter is gathered to the host one at a time).
    tokenizer: a :class:`rlhf_jax.models.tokenizer.Tokenizer` or ``None``.
    out_dir: created if needed.
    dtype: storage dtype ("float32", "bfloat16", "float16"); default the
      model's ``param_dtype`` (so import -> export -> import is exact).
    max_shard_bytes: split the weights into ``model-0000i-of-0000n.safetensors``
      files of about this size with a ``model.safetensors.index.json``.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  c = model.config
  dtype = dtype or c.param_dtype
  np_dtype = np.dtype(jnp.dtype(dtype))
  os.makedirs(out_dir, exist_ok=True)
  cfg = config_to_hf(c.replace(param_dtype=dtype))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  gen = {"do_sample": False}
  if tokenizer is not None:
    gen.update({k: v for k, v in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                                  ("pad_token_id", tokenizer.pad_id)) if v is not None})
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump(gen, f, indent=2)

  # Streamed: each parameter is gathered to the host only when its bytes are written.
  tensors = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = var.get_value()
    probe_name, _ = _ours_to_hf(tuple(path), None, c)  # the name only
    shape = _hf_shape(tuple(path), tuple(value.shape), c)

    def thunk(value=value, path=tuple(path)):
      host = np.asarray(jax.device_get(value)).astype(np_dtype)
      return _ours_to_hf(path, host, c)[1]

    tensors[probe_name] = (shape, np_dtype, thunk)
  nbytes = {k: int(np.prod(v[0], dtype=np.int64)) * np_dtype.itemsize for k, v in tensors.items()}
  if max_shard_bytes is None:
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
  else:
    shards, cur, size = [], {}, 0
    for name, entry in tensors.items():
      if cur and size + nbytes[name] > max_shard_bytes:
        shards.append(cur)
        cur, size = {}, 0
      cur[name] = entry
      size += nbytes[name]
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      write_safetensors(os.path.join(out_dir, fname), shard)
      weight_map.update({name: fname for name in shard})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}, f, indent=2)
  if tokenizer is not None:
    tokenizer.save(out_dir)


# PEFT adapter export ---------------------------------------------------------

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_to_peft(a, b) -> tuple[np.ndarray, np.ndarray]:
  """PEFT's ``(lora_A [r, in], lora_B [out, r])`` from ``A [in..., r]`` and ``B [r, out...]``.

  Every LoRA target kernel is mapped to Hugging Face as ``W.reshape(in, out).T``
  (see :func:`_ours_to_hf`), so ``(s·A·B).reshape(in, out).T = s·lora_B·lora_A``.
  """
  return _peft_a(a), _peft_b(b)


def _peft_a(a) -> np.ndarray:
  a = np.asarray(a)
  return a.reshape(-1, a.shape[-1]).T


def _peft_b(b) -> np.ndarray:
  b = np.asarray(b)
  return b.reshape(b.shape[0], -1).T


def export_adapter(model, out_dir: str, *, base_model_name_or_path: str = "", dtype: str | None = None) -> None:
  """Writes the model's LoRA adapters as a PEFT adapter directory.

  ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)``
  then computes what the adapted model computes (adapter dropout off), with
  ``base`` the checkpoint the model was loaded from or ``export_hf(lora.base_model(model), ...)``.

  Args:
    model: a :class:`rlhf_jax.models.Transformer` with adapters from
      :func:`rlhf_jax.models.lora.apply_lora` (sharded or not; each adapter is
      gathered to the host one at a time). Adapters of differing rank or alpha
      are written with PEFT's ``rank_pattern``/``alpha_pattern``.
    out_dir: created if needed; gets ``adapter_model.safetensors`` (keys
      ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ...)
      and ``adapter_config.json``.
    base_model_name_or_path: recorded in ``adapter_config.json`` (the hub name or
      directory of the base model, which PEFT's ``AutoPeftModel`` loads).
    dtype: storage dtype ("float32", "bfloat16", "float16"); default the adapters' own.

  Raises:
    ValueError: the model has no adapters, or its dropout rates differ.
    NotImplementedError: the model has a scalar head (PEFT's causal-LM format has no place for it).
  """
  import jax
  import jax.numpy as jnp

  from rlhf_jax.models import lora as lora_lib

  c = model.config
  if c.scalar_head_outputs:
    raise NotImplementedError("export_adapter: the model has a scalar head, which a PEFT causal-LM adapter "
                              "cannot hold (export LM policies only)")
  found = lora_lib.adapters(model)
  if not found:
    raise ValueError("export_adapter: the model has no LoRA adapters (call lora.apply_lora first)")
  entries = []  # (hf module name, short module name, adapter, num_in)
  for dotted, _, name, adapter in found:
    path = tuple(int(p) if p.isdigit() else p for p in dotted.split("."))
    weight_name, _ = _ours_to_hf(path, None, c)
    module = weight_name[: -len(".weight")]
    entries.append((module, module.rsplit(".", 1)[-1], adapter, lora_lib.KERNELS[name]))

  ranks = [int(ad.a.get_value().shape[-1]) for _, _, ad, _ in entries]
  alphas = [ad.scale * r for (_, _, ad, _), r in zip(entries, ranks)]
  dropouts = sorted({ad.dropout for _, _, ad, _ in entries})
  if len(dropouts) > 1:
    raise ValueError(f"export_adapter: adapters have different dropout rates {dropouts}; PEFT has one lora_dropout")
  r0 = max(set(ranks), key=ranks.count)
  a0 = max(set(alphas), key=alphas.count)
  rank_pattern = {m: r for (m, _, _, _), r in zip(entries, ranks) if r != r0}
  alpha_pattern = {m: a for (m, _, _, _), a in zip(entries, alphas) if a != a0}

  # Targets by short name when every layer has that adapter, else by full module name.
  by_short = {}
  for module, short, _, _ in entries:
    by_short.setdefault(short, []).append(module)
  targets = []
  for short, modules in by_short.items():
    targets += [short] if len(modules) == c.num_layers else modules

  tensors = {}
  for module, _, adapter, _ in entries:
    key = f"base_model.model.{module}"
    a_shape, b_shape = tuple(adapter.a.get_value().shape), tuple(adapter.b.get_value().shape)
    r = a_shape[-1]
    for part, var, shape in (("A", adapter.a, (r, int(np.prod(a_shape[:-1])))),
                             ("B", adapter.b, (int(np.prod(b_shape[1:])), r))):
      np_dtype = np.dtype(jnp.dtype(dtype)) if dtype else np.dtype(var.get_value().dtype)

      def thunk(var=var, part=part, np_dtype=np_dtype):
        host = np.asarray(jax.device_get(var.get_value()))
        return (_peft_a if part == "A" else _peft_b)(host).astype(np_dtype)

      tensors[f"{key}.lora_{part}.weight"] = (shape, np_dtype, thunk)

  def num(x):
    return int(x) if float(x).is_integer() else float(x)

  config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path or None,
      "revision": None,
      "inference_mode": True,
      "r": int(r0),
      "lora_alpha": num(a0),
      "lora_dropout": float(dropouts[0]),
      "target_modules": targets,
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "init_lora_weights": True,
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
      "rank_pattern": rank_pattern,
      "alpha_pattern": {m: num(a) for m, a in alpha_pattern.items()},
  }
  os.makedirs(out_dir, exist_ok=True)
  write_safetensors(os.path.join(out_dir, ADAPTER_WEIGHTS), tensors)
  with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)
