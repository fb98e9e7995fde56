"""Transformer shapes and numerics, with named configs of public model families."""

from __future__ import annotations

import dataclasses
from typing import Any

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "cudnn", "auto")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only transformer of the Llama / Qwen2 families.

  Attributes:
    vocab_size: V.
    hidden_size: D, the model width.
    intermediate_size: F, the SwiGLU width.
    num_layers: L.
    num_heads: query heads N.
    num_kv_heads: key/value heads K (grouped-query attention; N % K == 0).
    head_dim: per-head width; defaults to D // N.
    rope_theta: RoPE base.
    rope_scaling: ``None`` or a dict ``{"type": "llama3", "factor", "low_freq_factor",
      "high_freq_factor", "original_max_position_embeddings"}`` (Llama 3.1+).
    rms_norm_eps: RMSNorm epsilon.
    qkv_bias: bias on the q, k, v projections (Qwen2).
    qk_norm: RMSNorm (learned ``[H]`` scale, shared across heads) on each query and
      key head after the projections and before RoPE (Qwen3's ``q_norm``/``k_norm``).
    tie_embeddings: the LM head is the transposed embedding table.
    max_position_embeddings: the context the model was trained for.
    scalar_head_outputs: outputs of a scalar head on the final hidden state (value or
      reward); 0 builds none.
    param_dtype: storage dtype of parameters ("float32" master weights by default).
    dtype: compute dtype of activations and matmuls ("bfloat16" or "float32").
    remat: activation checkpointing per block: "none", "full" (save nothing),
      "dots" (save all matmul outputs), "dots_no_batch" (save matmuls without batch
      dimensions, i.e. the weight projections).
    scan_layers: run the blocks with ``lax.scan`` over their parameters stacked on a
      layer axis, instead of a Python loop: one block is compiled instead of
      ``num_layers``, so compile time stops growing with depth (SmolLM2-135M's LoRA
      train step compiles in seconds instead of minutes on a CPU). The parameter
      layout (and so checkpoints and Hugging Face files) is unchanged; the stacked
      copy costs one extra copy of the block weights during the forward. Falls back
      to the loop when the blocks differ in structure (LoRA on some layers only).
    attention_impl: "xla" (einsum attention), "cudnn" (fused flash attention on
      NVIDIA GPUs, via ``jax.nn.dot_product_attention``) or "auto" (cudnn on GPU,
      xla elsewhere).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rope_scaling: dict[str, Any] | None = None
  rms_norm_eps: float = 1e-5
  qkv_bias: bool = False
  qk_norm: bool = False
  tie_embeddings: bool = False
  max_position_embeddings: int = 2048
  scalar_head_outputs: int = 0
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: str = "none"
  attention_impl: str = "auto"
  scan_layers: bool = False

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
    for name, valid in (("remat", REMAT_POLICIES), ("attention_impl", ATTENTION_IMPLS),
                        ("dtype", DTYPES), ("param_dtype", DTYPES)):
      if getattr(self, name) not in valid:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; valid choices: {valid}")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"ModelConfig.scan_layers must be a bool, got {self.scan_layers!r}")
    if not isinstance(self.qk_norm, bool):
      raise ValueError(f"ModelConfig.qk_norm must be a bool, got {self.qk_norm!r}")
    if self.rope_scaling is not None and self.rope_scaling.get("type") != "llama3":
      raise ValueError(f"ModelConfig.rope_scaling type must be 'llama3', got {self.rope_scaling!r}")

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self, *, include_embeddings: bool = True) -> int:
    """Parameter count (the N of 6·N·tokens)."""
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * h * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * h * d
    if self.qkv_bias:
      attn += h * (self.num_heads + 2 * self.num_kv_heads)
    if self.qk_norm:
      attn += 2 * h
    per_layer = attn + 3 * d * f + 2 * d
    n = self.num_layers * per_layer + d
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    n += self.scalar_head_outputs * (d + 1)
    return n + emb if include_embeddings else n

  def train_flops_per_token(self) -> float:
    """Model FLOPs per trained token, 6·N with N all parameters (the field's MFU convention)."""
    return 6.0 * self.num_params()


_LLAMA3_SCALING = {
    "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

CONFIGS: dict[str, ModelConfig] = {
    # For tests and CPU quickstarts.
    "tiny": ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, max_position_embeddings=512,
    ),
    # HuggingFaceTB/SmolLM2-135M(-Instruct).
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_embeddings=True, max_position_embeddings=8192,
    ),
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T.
    "tinyllama-1.1b": ModelConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
        num_heads=32, num_kv_heads=4, rope_theta=10000.0, rms_norm_eps=1e-5,
        max_position_embeddings=2048,
    ),
    # Qwen/Qwen2.5-0.5B.
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
        qkv_bias=True, tie_embeddings=True, max_position_embeddings=32768,
    ),
    # Qwen/Qwen2.5-7B.
    "qwen2.5-7b": ModelConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, rope_theta=1000000.0, rms_norm_eps=1e-6,
        qkv_bias=True, max_position_embeddings=131072,
    ),
    # Qwen/Qwen3-0.6B (and -Base): q/k norm, no QKV bias, head_dim 128 != D / N.
    "qwen3-0.6b": ModelConfig(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
        num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
        qk_norm=True, tie_embeddings=True, max_position_embeddings=40960,
    ),
    # meta-llama/Meta-Llama-3-8B.
    "llama3-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
        max_position_embeddings=8192,
    ),
    # meta-llama/Llama-3.1-8B: as llama3-8b with Llama-3 RoPE scaling.
    "llama3.1-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling=_LLAMA3_SCALING, max_position_embeddings=131072,
    ),
}


def get_config(name: str, **overrides) -> ModelConfig:
  """Returns the named config, with field overrides (e.g. ``dtype="bfloat16"``)."""
  if name not in CONFIGS:
    raise ValueError(f"unknown model config {name!r}; valid choices: {sorted(CONFIGS)}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  bad = set(overrides) - fields
  if bad:
    raise ValueError(f"unknown ModelConfig fields {sorted(bad)}; valid fields: {sorted(fields)}")
  return CONFIGS[name].replace(**overrides)


def config_from_section(section, **overrides) -> ModelConfig:
  """The :class:`ModelConfig` an experiment's ``config.model`` section names: ``name`` picks
  the named config and every other key (and ``overrides``) replaces a field of it."""
  fields = {k: v for k, v in dict(section).items() if k != "name"}
  return get_config(section["name"], **fields, **overrides)
