"""Flax NNX decoder-only transformer for the Llama, Qwen2 and Qwen3 families.

RMSNorm, rotary position embeddings (with Llama-3 frequency scaling), SwiGLU,
grouped-query attention with optional QKV bias and per-head q/k RMSNorm (Qwen3),
tied or untied embeddings, packed sequences (block-diagonal causal attention from
segment ids), a functional KV cache, and an optional scalar head (value or reward). Every
parameter carries logical axis names (``axes`` metadata) that
:mod:`rlhf_jax.parallel` maps to mesh axes.

Shape letters: B batch, T tokens (queries), S key/value slots, D width, N query
heads, K key/value heads, G = N // K, H head width, F SwiGLU width, V vocabulary.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.parallel import with_logical_constraint

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)

_LAYER: contextvars.ContextVar = contextvars.ContextVar("rlhf_jax_layer_index", default=0)


def current_layer():
  """The index of the block being traced (a Python int, or a traced int32 scalar
  under ``scan_layers``); 0 outside a block. Layer-dependent randomness (LoRA
  dropout) folds it into its key, so all blocks can share one structure."""
  return _LAYER.get()


@contextlib.contextmanager
def _in_layer(index):
  token = _LAYER.set(index)
  try:
    yield
  finally:
    _LAYER.reset(token)


def _dtype(name: str):
  return jnp.dtype(name)


def _param(rngs: nnx.Rngs, shape, axes, dtype, *, fan_in: int | None = None, init: str = "normal"):
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    std = 1.0 / math.sqrt(fan_in) if fan_in else 0.02
    value = (std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, axes=tuple(axes))


def _linear(module: nnx.Module, name: str, equation: str, x):
  """``einsum(equation, x, module.<name>)`` in ``x``'s dtype, plus the LoRA adapter
  ``module.<name>_lora`` when one is attached (see :mod:`rlhf_jax.models.lora`)."""
  y = jnp.einsum(equation, x, getattr(module, name).astype(x.dtype))
  adapter = getattr(module, f"{name}_lora", None)
  return y if adapter is None else y + adapter(equation, x)


class KVCache(NamedTuple):
  """Functional key/value cache, one entry per layer, stacked on a leading L axis.

  Attributes:
    k: keys ``[L, B, S, K, H]``.
    v: values ``[L, B, S, K, H]``.
    mask: ``[B, S]``, 1 where a slot holds a real (non-pad) token.
    index: scalar int32, the next slot to write.
    next_position: ``[B]`` int32, the position id the next real token of each row gets.
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array
  next_position: jax.Array


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache with ``max_len`` slots per row."""
  dtype = _dtype(config.dtype) if dtype is None else dtype
  shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
  return KVCache(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      mask=jnp.zeros((batch_size, max_len), jnp.int32),
      index=jnp.zeros((), jnp.int32),
      next_position=jnp.zeros((batch_size,), jnp.int32),
  )


def positions_from_mask(attention_mask_BxT: jax.Array, start_B: jax.Array | None = None) -> jax.Array:
  """Position ids that count only real tokens (correct for left-padded rows)."""
  m = attention_mask_BxT.astype(jnp.int32)
  pos = jnp.cumsum(m, axis=-1) - 1
  if start_B is not None:
    pos = pos + start_B[:, None]
  return jnp.maximum(pos, 0)


def positions_from_segments(segment_ids_BxT: jax.Array) -> jax.Array:
  """Position ids restarting at 0 in every segment (a new segment starts where the id changes)."""
  seg = segment_ids_BxT.astype(jnp.int32)
  t = seg.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), seg.shape)
  starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=-1)
  first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=seg.ndim - 1)
  return idx - first


def rope_frequencies(config: ModelConfig) -> jax.Array:
  """Inverse frequencies ``[H/2]``, with Llama-3 scaling when configured."""
  h = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  s = config.rope_scaling
  if s is None:
    return inv_freq
  factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  old_ctx = s["original_max_position_embeddings"]
  wavelen = 2 * jnp.pi / inv_freq
  smooth = (old_ctx / wavelen - lo) / (hi - lo)
  scaled = jnp.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
  mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  is_mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
  return jnp.where(is_mid, mid, scaled)


def apply_rope(x_BTnH: jax.Array, positions_BxT: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates the two halves of each head (the Hugging Face Llama convention)."""
  angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x = x_BTnH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTnH.dtype)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs, axes=("norm",)):
    self.eps = eps
    self.scale = _param(rngs, (dim,), axes, param_dtype, init="ones")

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale.astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    pd = _dtype(c.param_dtype)
    d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    self.config = c
    self.wq = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), pd, fan_in=d)
    self.wk = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd, fan_in=d)
    self.wv = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd, fan_in=d)
    self.wo = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), pd, fan_in=n * h)
    if c.qkv_bias:
      self.bq = _param(rngs, (n, h), ("heads", "head_dim"), pd, init="zeros")
      self.bk = _param(rngs, (k, h), ("kv_heads", "head_dim"), pd, init="zeros")
      self.bv = _param(rngs, (k, h), ("kv_heads", "head_dim"), pd, init="zeros")
    if c.qk_norm:  # Qwen3: one [H] scale shared by all heads, applied per head.
      self.q_norm = RMSNorm(h, eps=c.rms_norm_eps, param_dtype=pd, rngs=rngs, axes=("head_dim",))
      self.k_norm = RMSNorm(h, eps=c.rms_norm_eps, param_dtype=pd, rngs=rngs, axes=("head_dim",))

  def __call__(self, x_BxTxD, positions_BxT, inv_freq, *, mask_Bx1xTxS, is_causal, layer_cache):
    c = self.config
    dt = x_BxTxD.dtype
    q = _linear(self, "wq", "BTD,DNH->BTNH", x_BxTxD)
    k = _linear(self, "wk", "BTD,DKH->BTKH", x_BxTxD)
    v = _linear(self, "wv", "BTD,DKH->BTKH", x_BxTxD)
    if c.qkv_bias:
      q = q + self.bq.astype(dt)
      k = k + self.bk.astype(dt)
      v = v + self.bv.astype(dt)
    if c.qk_norm:
      q = self.q_norm(q)
      k = self.k_norm(k)
    q = with_logical_constraint(q, ("batch", "length", "act_heads", None))
    q = apply_rope(q, positions_BxT, inv_freq)
    k = apply_rope(k, positions_BxT, inv_freq)
    new_layer_cache = None
    if layer_cache is not None:
      k_cache, v_cache, index = layer_cache
      k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
      v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
      new_layer_cache = (k_cache, v_cache)
      k, v = k_cache.astype(dt), v_cache.astype(dt)
    out = attention(q, k, v, mask_Bx1xTxS=mask_Bx1xTxS, is_causal=is_causal, impl=c.attention_impl)
    y = _linear(self, "wo", "BTNH,NHD->BTD", out)
    return y, new_layer_cache


def attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, mask_Bx1xTxS=None, is_causal=False, impl="auto"):
  """Grouped-query softmax attention in fp32 (XLA) or fused (cuDNN)."""
  if impl == "auto":
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  if impl == "cudnn" and mask_Bx1xTxS is None:
    return jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, is_causal=is_causal, implementation="cudnn"
    )
  b, t, n, h = q_BxTxNxH.shape
  kh = k_BxSxKxH.shape[2]
  q = q_BxTxNxH.reshape(b, t, kh, n // kh, h)
  scores = jnp.einsum(
      "BTKGH,BSKH->BKGTS", q, k_BxSxKxH, preferred_element_type=jnp.float32
  ) / math.sqrt(h)
  s = k_BxSxKxH.shape[1]
  if is_causal:
    causal = jnp.tril(jnp.ones((t, s), jnp.bool_), k=s - t)
    scores = jnp.where(causal, scores, _NEG_INF)
  if mask_Bx1xTxS is not None:
    scores = jnp.where(mask_Bx1xTxS[:, :, None], scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxH.dtype)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_BxSxKxH)
  return out.reshape(b, t, n, h)


class MLP(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    pd = _dtype(config.param_dtype)
    d, f = config.hidden_size, config.intermediate_size
    self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), pd, fan_in=d)
    self.w_up = _param(rngs, (d, f), ("embed", "mlp"), pd, fan_in=d)
    self.w_down = _param(rngs, (f, d), ("mlp", "embed"), pd, fan_in=f)

  def __call__(self, x_BxTxD):
    gate = _linear(self, "w_gate", "BTD,DF->BTF", x_BxTxD)
    up = _linear(self, "w_up", "BTD,DF->BTF", x_BxTxD)
    h = with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return _linear(self, "w_down", "BTF,FD->BTD", h)


class Block(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    pd = _dtype(config.param_dtype)
    self.attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=pd, rngs=rngs)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=pd, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, inv_freq, mask, is_causal, layer_cache):
    h, new_layer_cache = self.attn(
        self.attn_norm(x), positions, inv_freq,
        mask_Bx1xTxS=mask, is_causal=is_causal, layer_cache=layer_cache,
    )
    x = x + h
    x = x + self.mlp(self.mlp_norm(x))
    x = with_logical_constraint(x, ("batch", "length", "act_embed"))
    return x, new_layer_cache


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
  """Decoder-only language model.

  ``model(input_ids_BxT)`` returns fp32 logits ``[B, T, V]``. Training code that
  only needs log-probs of targets calls :meth:`hidden_states` and
  :meth:`unembed_matrix` and lets :func:`rlhf_jax.ops.token_logprobs` avoid the
  full ``[B, T, V]`` tensor.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    pd = _dtype(config.param_dtype)
    d, v = config.hidden_size, config.vocab_size
    self.embed = _param(rngs, (v, d), ("vocab", "embed"), pd, init="normal")
    self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(d, eps=config.rms_norm_eps, param_dtype=pd, rngs=rngs)
    if not config.tie_embeddings:
      self.lm_head = _param(rngs, (d, v), ("embed", "vocab"), pd, fan_in=d)
    if config.scalar_head_outputs:
      self.scalar_head = _param(rngs, (d, config.scalar_head_outputs), ("embed", "scalar_out"), pd, fan_in=d)
      self.scalar_bias = _param(rngs, (config.scalar_head_outputs,), ("scalar_out",), pd, init="zeros")

  def hidden_states(
      self,
      input_ids_BxT: jax.Array,
      *,
      attention_mask_BxT: jax.Array | None = None,
      positions_BxT: jax.Array | None = None,
      cache: KVCache | None = None,
      segment_ids_BxT: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Final-normed hidden states ``[B, T, D]`` (compute dtype) and the updated cache.

    Args:
      input_ids_BxT: token ids.
      attention_mask_BxT: 1 on real tokens, 0 on padding (left or right). ``None``
        means no padding; right padding may also pass ``None`` since causal
        attention never lets a real token see a later pad.
      positions_BxT: position ids; by default counted over real tokens, so
        left-padded rows get the same positions as unpadded ones.
      cache: a :class:`KVCache`; the tokens are written at slots
        ``[cache.index, cache.index + T)`` and attend to every earlier real slot.
      segment_ids_BxT: packed sequences: 1, 2, ... per sequence in a row, 0 on padding
        (as :func:`rlhf_jax.data.tokenize.pack_rows` emits). Attention is causal and
        within a segment (block-diagonal); positions default to restarting at 0 in each
        segment. Not supported with ``cache``.
    """
    c = self.config
    b, t = input_ids_BxT.shape
    if input_ids_BxT.ndim != 2:
      raise ValueError(f"input_ids_BxT must be [B, T], got shape {input_ids_BxT.shape}")
    if segment_ids_BxT is not None:
      if cache is not None:
        raise ValueError("segment_ids_BxT (packed sequences) cannot be combined with a KV cache; "
                         "decode each sequence in its own row")
      if segment_ids_BxT.shape != input_ids_BxT.shape:
        raise ValueError(f"segment_ids_BxT has shape {segment_ids_BxT.shape}, "
                         f"input_ids_BxT {input_ids_BxT.shape}")
    dt = _dtype(c.dtype)
    has_mask = attention_mask_BxT is not None
    mask_BxT = jnp.ones((b, t), jnp.int32) if not has_mask else attention_mask_BxT.astype(jnp.int32)
    if positions_BxT is None and segment_ids_BxT is not None:
      positions_BxT = positions_from_segments(segment_ids_BxT)
    if positions_BxT is None:
      start = cache.next_position if cache is not None else None
      positions_BxT = positions_from_mask(mask_BxT, start)
    inv_freq = rope_frequencies(c)

    if cache is not None:
      s = cache.k.shape[2]
      slot_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, mask_BxT, cache.index, axis=1)
      q_slot = cache.index + jnp.arange(t)
      causal_TxS = jnp.arange(s)[None, :] <= q_slot[:, None]
      mask = (slot_mask[:, None, :].astype(bool) & causal_TxS[None])[:, None]  # [B, 1, T, S]
      is_causal = False
    elif segment_ids_BxT is not None:
      seg = segment_ids_BxT.astype(jnp.int32)
      causal_TxT = jnp.tril(jnp.ones((t, t), jnp.bool_))
      same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)  # [B, T, T]
      if has_mask:
        same = same & mask_BxT[:, None, :].astype(bool)
      mask = (same & causal_TxT[None])[:, None]
      is_causal = False
    elif has_mask:
      causal_TxT = jnp.tril(jnp.ones((t, t), jnp.bool_))
      mask = (mask_BxT[:, None, :].astype(bool) & causal_TxT[None])[:, None]
      is_causal = False
    else:
      mask, is_causal = None, True

    x = jnp.take(self.embed.astype(dt), input_ids_BxT, axis=0)
    x = with_logical_constraint(x, ("batch", "length", "act_embed"))

    block_def = self._shared_block_graphdef() if c.scan_layers else None
    if block_def is not None:
      x, new_k, new_v = self._scan_blocks(block_def, x, positions_BxT, inv_freq, mask, is_causal, cache)
    else:
      def run_block(block, x, layer_cache):
        return block(x, positions_BxT, inv_freq, mask, is_causal, layer_cache)

      if c.remat != "none" and cache is None:
        run_block = nnx.remat(run_block, policy=_REMAT[c.remat], prevent_cse=True)

      new_k, new_v = [], []
      for i, block in enumerate(self.layers):
        layer_cache = None if cache is None else (cache.k[i], cache.v[i], cache.index)
        with _in_layer(i):
          x, out_cache = run_block(block, x, layer_cache)
        if out_cache is not None:
          new_k.append(out_cache[0])
          new_v.append(out_cache[1])
      if cache is not None:
        new_k, new_v = jnp.stack(new_k), jnp.stack(new_v)
    x = self.final_norm(x)

    new_cache = None
    if cache is not None:
      new_cache = KVCache(
          k=new_k, v=new_v, mask=slot_mask,
          index=cache.index + t, next_position=cache.next_position + mask_BxT.sum(-1),
      )
    return x, new_cache

  def _shared_block_graphdef(self):
    """The blocks' common graphdef, or ``None`` when their structures differ
    (e.g. LoRA on some layers only): then the layer loop is used."""
    graphdef = nnx.graphdef(self.layers[0])
    if all(nnx.graphdef(block) == graphdef for block in self.layers[1:]):
      return graphdef
    return None

  def _scan_blocks(self, block_def, x, positions_BxT, inv_freq, mask, is_causal, cache):
    """``lax.scan`` over the blocks (``ModelConfig.scan_layers``).

    The per-block parameters are stacked on a leading layer axis inside the
    computation (one copy of the weights, sharded like the weights), and one block
    body is traced and compiled instead of ``num_layers``: compile time no longer
    grows with depth. Returns ``(x, new_k, new_v)`` (``None`` caches without ``cache``).
    """
    c = self.config
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(block) for block in self.layers])
    layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)

    def body(x, xs):
      params, i, layer_k, layer_v = xs
      layer_cache = None if cache is None else (layer_k, layer_v, cache.index)
      with _in_layer(i):
        x, out_cache = nnx.merge(block_def, params)(x, positions_BxT, inv_freq, mask, is_causal, layer_cache)
      return x, (None, None) if out_cache is None else out_cache

    if c.remat != "none" and cache is None:
      body = jax.checkpoint(body, policy=_REMAT[c.remat], prevent_cse=False)
    xs = (stacked, layer_ids, None if cache is None else cache.k, None if cache is None else cache.v)
    x, (new_k, new_v) = jax.lax.scan(body, x, xs)
    return x, new_k, new_v

  def unembed_matrix(self) -> jax.Array:
    """The ``[D, V]`` output projection (the transposed embedding when tied)."""
    if self.config.tie_embeddings:
      return self.embed.get_value().T
    return self.lm_head.get_value()

  def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
    """fp32 logits from hidden states."""
    w = self.unembed_matrix().astype(hidden_BxTxD.dtype)
    out = jnp.einsum("BTD,DV->BTV", hidden_BxTxD, w, preferred_element_type=jnp.float32)
    return with_logical_constraint(out, ("batch", "length", "act_vocab"))

  def scalar(self, hidden_BxTxD: jax.Array) -> jax.Array:
    """Scalar-head outputs ``[B, T, O]`` in fp32 (value or reward per position)."""
    if not self.config.scalar_head_outputs:
      raise ValueError("this model has no scalar head: set ModelConfig.scalar_head_outputs > 0")
    w = self.scalar_head.astype(hidden_BxTxD.dtype)
    out = jnp.einsum("BTD,DO->BTO", hidden_BxTxD, w, preferred_element_type=jnp.float32)
    return out + self.scalar_bias.astype(jnp.float32)

  def __call__(self, input_ids_BxT, *, attention_mask_BxT=None, positions_BxT=None, cache=None,
               segment_ids_BxT=None):
    """Logits ``[B, T, V]``; with a cache, ``(logits, new_cache)``."""
    h, new_cache = self.hidden_states(
        input_ids_BxT, attention_mask_BxT=attention_mask_BxT, positions_BxT=positions_BxT, cache=cache,
        segment_ids_BxT=segment_ids_BxT,
    )
    logits = self.logits(h)
    return logits if cache is None else (logits, new_cache)
