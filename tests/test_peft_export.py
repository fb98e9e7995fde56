"""LoRA adapters exported in PEFT's format compute, in ``peft`` + ``transformers``, what rlhf_jax computes."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import models
from rlhf_jax.models import hf, lora

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = [[5, 17, 3, 42, 7, 11, 2, 9, 60, 1], [1, 30, 8, 8, 21, 4, 6, 12, 99, 0]]
HF_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  """A tiny random Llama (GQA, untied) saved by transformers, fp32."""
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
      rope_theta=10000.0)
  model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
  out = str(tmp_path_factory.mktemp("base"))
  model.save_pretrained(out)
  return out


def _randomize_b(model, seed=0):
  """Every ``B`` is zero after ``apply_lora``; give each random values so the adapters matter."""
  key = jax.random.PRNGKey(seed)
  for i, (_, _, _, adapter) in enumerate(lora.adapters(model)):
    b = adapter.b.get_value()
    adapter.b.set_value(0.05 * jax.random.normal(jax.random.fold_in(key, i), b.shape, b.dtype))
  return model


def _torch_logits(model):
  model.eval()
  with torch.no_grad():
    return model(torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def adapted(base_dir):
  base, _ = models.from_pretrained(base_dir)
  model = lora.apply_lora(base, targets="all", rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  return _randomize_b(model)


def test_peft_layout_follows_the_hf_mapping(adapted):
  """``lora_B @ lora_A * alpha/r`` is the Hugging Face layout of the kernel delta ``(alpha/r)·A·B``."""
  c = adapted.config
  for dotted, module, name, adapter in lora.adapters(adapted):
    path = tuple(int(p) if p.isdigit() else p for p in dotted.split("."))
    a_hf, b_hf = hf.adapter_to_peft(np.asarray(adapter.a.get_value()), np.asarray(adapter.b.get_value()))
    _, want = hf._ours_to_hf(path, np.asarray(adapter.delta()), c)
    np.testing.assert_allclose(b_hf @ a_hf * adapter.scale, want, atol=1e-6, err_msg=dotted)
    kernel_hf_shape = hf._ours_to_hf(path, np.asarray(getattr(module, name).get_value()), c)[1].shape
    assert (b_hf.shape[0], a_hf.shape[1]) == kernel_hf_shape


def test_exported_adapter_matches_peft_and_merged_export(adapted, base_dir, tmp_path):
  ours = np.asarray(adapted(jnp.asarray(IDS)))
  base_logits = np.asarray(lora.base_model(adapted)(jnp.asarray(IDS)))
  assert not np.allclose(ours, base_logits, atol=1e-3)  # the adapters change the output

  out = str(tmp_path / "adapter")
  models.export_adapter(adapted, out, base_model_name_or_path=base_dir)
  assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
  cfg = json.load(open(os.path.join(out, "adapter_config.json")))
  assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
  assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["bias"]) == (4, 8, 0.0, "none")
  assert sorted(cfg["target_modules"]) == sorted(HF_NAMES)
  assert cfg["base_model_name_or_path"] == base_dir and cfg["fan_in_fan_out"] is False

  from safetensors.numpy import load_file

  tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
  assert len(tensors) == 2 * 7 * 2
  assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
  assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (2 * 16, 4)
  assert tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (4, 64)
  assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 128)
  assert tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"].shape == (128, 4)

  base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
  peft_model = peft.PeftModel.from_pretrained(base, out)
  theirs = _torch_logits(peft_model)
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)

  # The merged model, exported as a plain checkpoint, agrees too.
  merged_dir = str(tmp_path / "merged")
  models.export_hf(lora.merge_lora(adapted), None, merged_dir)
  merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
  np.testing.assert_allclose(_torch_logits(merged), ours, atol=1e-4, rtol=0)
  # ... and so does PEFT's own merge.
  np.testing.assert_allclose(_torch_logits(peft_model.merge_and_unload()), ours, atol=1e-4, rtol=0)


def test_partial_targets_and_mixed_ranks(base_dir, tmp_path):
  """Adapters on some layers only, of two ranks: full module names and ``rank_pattern``/``alpha_pattern``."""
  base, _ = models.from_pretrained(base_dir)
  model = lora.apply_lora(base, targets=("wq", "w_down"), rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  model = lora.apply_lora(model, targets=("layers.1.attn.wv",), rank=2, alpha=6.0, rngs=nnx.Rngs(2))
  model = _randomize_b(model, seed=3)
  out = str(tmp_path / "adapter")
  models.export_adapter(model, out, dtype="float32")
  cfg = json.load(open(os.path.join(out, "adapter_config.json")))
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
  assert sorted(cfg["target_modules"]) == sorted(["q_proj", "down_proj", "model.layers.1.self_attn.v_proj"])
  assert cfg["rank_pattern"] == {"model.layers.1.self_attn.v_proj": 2}
  assert cfg["alpha_pattern"] == {"model.layers.1.self_attn.v_proj": 6}

  peft_model = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), out)
  np.testing.assert_allclose(_torch_logits(peft_model), np.asarray(model(jnp.asarray(IDS))), atol=1e-4, rtol=0)


def test_export_adapter_errors(base_dir, tmp_path):
  base, _ = models.from_pretrained(base_dir)
  with pytest.raises(ValueError, match="no LoRA adapters"):
    models.export_adapter(base, str(tmp_path / "x"))
  head = lora.apply_lora(models.with_scalar_head(base, 1), targets="all", rank=2, rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match="scalar head"):
    models.export_adapter(head, str(tmp_path / "y"))


def test_sharded_model_exports_the_same_adapter(adapted, base_dir, tmp_path):
  from safetensors.numpy import load_file

  from rlhf_jax.parallel import make_mesh

  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  base, _ = models.from_pretrained(base_dir, mesh=mesh)
  sharded = _randomize_b(lora.apply_lora(base, targets="all", rank=4, alpha=8.0, rngs=nnx.Rngs(1)))
  assert isinstance(sharded.layers[0].attn.wq_lora.a.get_value().sharding, jax.sharding.NamedSharding)
  models.export_adapter(sharded, str(tmp_path / "s"))
  models.export_adapter(adapted, str(tmp_path / "u"))
  want = load_file(str(tmp_path / "u" / "adapter_model.safetensors"))
  got = load_file(str(tmp_path / "s" / "adapter_model.safetensors"))
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=1e-6, err_msg=k)
