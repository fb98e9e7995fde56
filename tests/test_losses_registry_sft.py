"""Tests for rlhf_jax.losses: the name registry and the SFT (masked NLL) loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlhf_jax.losses as losses
from rlhf_jax.data import PAD_ID, make_sft_batch, make_sft_example
from rlhf_jax.losses import Registry, sft_loss
from rlhf_jax.ops import logprobs_from_logits, token_mean


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


# ----------------------------------------------------------------------------- registry


def test_global_registry_lookup():
  assert "nll" in losses.names()
  assert losses.names() == sorted(losses.names())
  assert losses.get("nll") is sft_loss
  assert losses.get("sft") is not losses.sft_loss  # "sft" is TRL's DPO loss_type, not the token NLL


def test_unknown_name_lists_sorted_choices():
  with pytest.raises(ValueError) as err:
    losses.get("no-such-loss")
  msg = str(err.value)
  assert "no-such-loss" in msg and str(losses.names()) in msg


def test_registry_register_get_names():
  reg = Registry("widget")

  @reg.register("b")
  def fb():
    return "b"

  @reg.register("a")
  def fa():
    return "a"

  assert fb() == "b"  # the decorator returns the function unchanged
  assert reg.get("a") is fa and reg.get("b") is fb
  assert reg.names() == ["a", "b"] and list(reg) == ["a", "b"] and len(reg) == 2
  assert "a" in reg and "c" not in reg
  reg.register("a")(fa)  # registering the same object again is a no-op
  assert reg.get("a") is fa

  with pytest.raises(ValueError, match="widget name 'a' is already registered"):
    reg.register("a")(fb)
  assert reg.get("a") is fa  # unchanged after the failed registration
  with pytest.raises(ValueError, match=r"Unknown widget 'c'; valid names are \['a', 'b'\]"):
    reg.get("c")
  with pytest.raises(ValueError, match="non-empty string"):
    reg.register("")
  with pytest.raises(ValueError, match="non-empty string"):
    reg.register(3)
  with pytest.raises(ValueError, match="callables"):
    reg.register("x")(42)


def test_global_register_rejects_duplicates():
  with pytest.raises(ValueError, match="already registered"):
    losses.register("nll")(lambda logps_BxT, mask_BxT: logps_BxT)
  assert losses.get("nll") is sft_loss


# ----------------------------------------------------------------------------- sft_loss

sft_jit = jax.jit(sft_loss)


def test_sft_loss_matches_numpy_and_masks_garbage():
  rng = np.random.default_rng(0)
  logps = np.log(rng.uniform(0.05, 1.0, size=(3, 5))).astype(np.float32)
  mask = (rng.uniform(size=(3, 5)) > 0.4).astype(np.float32)
  logps[mask == 0] = -np.inf  # e.g. padding: must give 0, not NaN
  logps[0, 0] = np.nan if mask[0, 0] == 0 else logps[0, 0]
  got = sft_jit(logps, mask)
  assert got.shape == (3, 5) and got.dtype == jnp.float32
  want = np.where(mask != 0, -np.where(mask != 0, logps, 0.0) * mask, 0.0)
  np.testing.assert_allclose(got, want, atol=1e-6)
  # bool and float-weight masks
  np.testing.assert_allclose(sft_jit(logps, mask > 0), want, atol=1e-6)
  # float weights select the same tokens; the aggregation (not the loss) applies them, once
  weights = mask * rng.uniform(0.1, 2.0, size=mask.shape).astype(np.float32)
  np.testing.assert_allclose(sft_jit(logps, weights), want, atol=1e-6)
  nll = -np.where(mask != 0, logps, 0.0)
  np.testing.assert_allclose(token_mean(sft_jit(logps, weights), weights),
                             (weights * nll).sum() / weights.sum(), rtol=1e-6)


def test_sft_loss_gradient_is_minus_mask():
  rng = np.random.default_rng(1)
  logps = np.log(rng.uniform(0.05, 1.0, size=(2, 4))).astype(np.float32)
  mask = np.array([[0, 1, 1, 0], [1, 1, 0, 0]], np.float32)
  grad = jax.jit(jax.grad(lambda lp: sft_loss(lp, mask).sum()))(logps)
  np.testing.assert_array_equal(grad, -mask)


def test_sft_loss_errors():
  with pytest.raises(ValueError, match=r"logps_BxT.*mask_BxT.*\(2, 3\).*\(2, 4\)"):
    sft_loss(np.zeros((2, 3), np.float32), np.ones((2, 4)))
  with pytest.raises(ValueError, match="logps_BxT.*floating"):
    sft_loss(np.zeros((2, 3), np.int32), np.ones((2, 3)))


def test_sft_loss_on_a_data_batch_is_the_completion_nll():
  # End to end with the data layout: mean NLL over completion tokens + EOS only.
  rng = np.random.default_rng(2)
  examples = [make_sft_example(rng, "sorting", min_len=2, max_len=5) for _ in range(4)]
  batch = make_sft_batch(examples, seq_len=16)
  V = 14
  logits = rng.standard_normal((4, 16, V)).astype(np.float32)

  def loss_fn(logits):
    logps = logprobs_from_logits(logits, batch["targets_BxT"])
    mask = batch["loss_mask_BxT"]
    return token_mean(sft_loss(logps, mask), mask)

  got = jax.jit(loss_fn)(logits)
  # NumPy: walk each sequence, score the tokens after the SEP (completion and EOS).
  nll, count = 0.0, 0
  for b, (prompt, completion) in enumerate(examples):
    sequence = batch["input_ids_BxT"][b]
    start = len(prompt) + 1  # position of SEP; it predicts the first completion token
    for t in range(start, start + len(completion) + 1):
      z = logits[b, t].astype(np.float64)
      nll -= z[sequence[t + 1]] - np.log(np.exp(z - z.max()).sum()) - z.max()
      count += 1
    assert sequence[start + len(completion) + 2 :].tolist() == [PAD_ID] * (
        16 - len(prompt) - len(completion) - 3
    )
  np.testing.assert_allclose(got, nll / count, rtol=1e-5)
