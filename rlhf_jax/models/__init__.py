"""Flax NNX transformers, heads and named configs."""

from rlhf_jax.models.config import CONFIGS, ModelConfig, config_from_section, get_config
from rlhf_jax.models.heads import GatingNetwork
from rlhf_jax.models.init import create_model, create_sharded_model, with_scalar_head
from rlhf_jax.models.transformer import (
    KVCache,
    Transformer,
    apply_rope,
    init_cache,
    positions_from_mask,
    rope_frequencies,
)

__all__ = [
    "CONFIGS", "GatingNetwork", "KVCache", "ModelConfig", "Transformer", "apply_rope", "create_model",
    "config_from_section", "create_sharded_model", "get_config", "init_cache", "positions_from_mask",
    "rope_frequencies", "with_scalar_head",
]

# Pre-trained weights (GGUF / Hugging Face), tokenizer and export.
from rlhf_jax.models.hf import export_adapter, export_hf, load_hf  # noqa: E402
from rlhf_jax.models.gguf import load_gguf  # noqa: E402
from rlhf_jax.models.pretrained import fetch_smollm2, from_pretrained  # noqa: E402
from rlhf_jax.models.tokenizer import Tokenizer  # noqa: E402

__all__ += ["Tokenizer", "export_adapter", "export_hf", "fetch_smollm2", "from_pretrained", "load_gguf",
            "load_hf"]

# LoRA adapters.
from rlhf_jax.models import lora  # noqa: E402
from rlhf_jax.models.lora import LoRA, apply_lora, merge_lora  # noqa: E402

__all__ += ["LoRA", "apply_lora", "lora", "merge_lora"]
