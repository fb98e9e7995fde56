"""The weighted / token-level SFT step: every offline objective trains; weights; reference paths; learning."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import data, models
from rlhf_jax.train import sft, state as state_lib, step as step_lib

CFG = dataclasses.replace(models.get_config("tiny"), num_layers=1)  # one layer: quick to compile
SEQ = 24


def _batch(rng, n, *, corrupt=None):
  """Sorting rows; ``corrupt[b]`` rows get a shuffled (wrong) completion."""
  rows = []
  for b in range(n):
    prompt, completion = data.make_sft_example(rng, "sorting", min_len=3, max_len=6)
    if corrupt is not None and corrupt[b]:
      completion = rng.permutation(completion)
    rows.append((prompt, completion))
  return data.make_sft_batch(rows, seq_len=SEQ)


def _fields(batch, rng):
  n = len(batch["input_ids_BxT"])
  return dict(batch, source_rewards_B=np.where(np.arange(n) % 2 == 0, 1.0, 0.1).astype(np.float32),
              advantages_B=rng.normal(size=n).astype(np.float32),
              correct_B=(np.arange(n) % 2).astype(np.float32), correct_rate_B=np.full(n, 0.5, np.float32))


@pytest.fixture(scope="module")
def tiny():
  model = models.create_model(CFG, seed=0)
  graphdef, params = nnx.split(model)
  return graphdef, params


@pytest.mark.parametrize("objective", sorted(sft.OFFLINE_OBJECTIVES))
def test_every_offline_objective_trains_three_steps(tiny, objective):
  graphdef, params = tiny
  tx = optax.adam(1e-2)
  loss_fn = sft.make_offline_loss(objective, ref_graphdef=graphdef)
  extras = {"ref_params": params} if sft.needs_reference(objective) else None
  _, state, _ = state_lib.create_train_state(nnx.merge(graphdef, params), tx, extras=extras)
  step = step_lib.make_train_step(loss_fn, tx, graphdef, donate=False)
  rng = np.random.default_rng(0)
  batch = _fields(_batch(rng, 8), rng)
  start = state.params
  for _ in range(3):
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])), (objective, metrics)
  moved = jax.tree.reduce(lambda a, b: a + b, jax.tree.map(lambda a, b: float(jnp.abs(a - b).sum()), start,
                                                           state.params))
  assert moved > 0, objective


def test_row_weight_k_counts_as_k_copies(tiny):
  graphdef, params = tiny
  model = nnx.merge(graphdef, params)
  rng = np.random.default_rng(1)
  batch = _batch(rng, 4)
  copies = np.array([1, 3, 0, 2])
  rep = {k: np.repeat(v, copies, axis=0) for k, v in batch.items()}
  for objective in ("nll", "dft"):
    loss_fn = sft.make_offline_loss(objective)
    weighted, _ = loss_fn(model, dict(batch, weight_B=copies.astype(np.float32)), None)
    repeated, _ = loss_fn(model, rep, None)
    np.testing.assert_allclose(weighted, repeated, rtol=1e-5, err_msg=objective)


def test_precomputed_reference_equals_the_reference_run_in_the_step(tiny):
  graphdef, params = tiny
  model = nnx.merge(graphdef, params)
  ref_params = nnx.split(models.create_model(CFG, seed=3))[1]
  rng = np.random.default_rng(2)
  batch = _fields(_batch(rng, 4), rng)
  ref_model = nnx.merge(graphdef, ref_params)
  from rlhf_jax import ops

  ref_lp = ops.logprobs_from_logits(ref_model(batch["input_ids_BxT"]), batch["targets_BxT"])
  for objective in ("a_lol", "a_lol_seq", "a_lol_kl", "nft"):
    loss_fn = sft.make_offline_loss(objective, ref_graphdef=graphdef)
    in_step, _ = loss_fn(model, dict(batch, extras={"ref_params": ref_params}), None)
    pre, _ = loss_fn(model, dict(batch, ref_logps_BxT=np.asarray(ref_lp)), None)
    np.testing.assert_allclose(in_step, pre, rtol=1e-5, err_msg=objective)


def test_missing_fields_are_clear_errors(tiny):
  graphdef, params = tiny
  model = nnx.merge(graphdef, params)
  batch = _batch(np.random.default_rng(3), 2)
  with pytest.raises(ValueError, match="advantages_B"):
    sft.make_offline_loss("a_lol_ref_free")(model, batch, None)
  with pytest.raises(ValueError, match="needs the reference"):
    sft.make_offline_loss("a_lol")(model, dict(batch, advantages_B=np.ones(2, np.float32)), None)
  with pytest.raises(ValueError, match="unknown SFT objective"):
    sft.make_offline_loss("nope")


def _train_on_mixture(objective, weights_fn, steps=100):
  """Half the rows are sorted (source 'expert', reward 1), half shuffled (source 'noisy', 0)."""
  model = models.create_model(CFG, seed=0)
  tx = optax.adam(3e-3)
  graphdef, state, _ = state_lib.create_train_state(model, tx)
  step = step_lib.make_train_step(sft.make_offline_loss(objective), tx, graphdef)
  rng = np.random.default_rng(4)
  for _ in range(steps):
    corrupt = np.arange(16) % 2 == 1
    batch = _batch(rng, 16, corrupt=corrupt)
    state, _ = step(state, dict(batch, **weights_fn(corrupt)))
  clean = _batch(np.random.default_rng(99), 64)
  lp = jax.jit(lambda p, b: sft.make_sft_loss()(nnx.merge(graphdef, p), b, None)[0])(state.params, clean)
  return float(lp)


def test_c_rlft_source_rewards_learn_the_expert_source_better_than_plain_sft():
  """Held-out NLL of correct (sorted) completions after training on a half-noisy mixture."""
  plain = _train_on_mixture("nll", lambda c: {})
  c_rlft = _train_on_mixture("c_rlft", lambda c: {"source_rewards_B": np.where(c, 0.1, 1.0).astype(np.float32)})
  assert c_rlft < plain - 0.1, (c_rlft, plain)
