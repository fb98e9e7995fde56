"""Preference step factory: one concatenated forward, reference paths, loss combinations, TR-DPO, cache."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import losses, models, ops
from rlhf_jax.data import preference as pref_data
from rlhf_jax.train import optim, preference, state as state_lib, step as step_lib

CFG = models.get_config("tiny")
PAIRS = pref_data.SortingPreferences(16, seed=0, seq_len=20)


def _batch(n=4, start=0):
  return pref_data.collate([PAIRS[i] for i in range(start, start + n)])


def _seq_logps(model, ids, targets, mask):
  lp = ops.logprobs_from_logits(model(jnp.asarray(ids)), jnp.asarray(targets))
  return np.asarray((lp * mask).sum(-1))


def test_concatenated_forward_equals_separate_forwards():
  model = models.create_model(CFG, seed=1)
  b = _batch()
  out = preference.concatenated_logps(model, b)
  for side in ("chosen", "rejected"):
    ref = _seq_logps(model, b[f"{side}_input_ids_BxT"], b[f"{side}_targets_BxT"], b[f"{side}_loss_mask_BxT"])
    np.testing.assert_allclose(out[side][0], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[side][2], b[f"{side}_loss_mask_BxT"].sum(-1))


def test_loss_value_metrics_and_combination():
  policy, ref = models.create_model(CFG, seed=1), models.create_model(CFG, seed=2)
  b = _batch()
  pol = preference.concatenated_logps(policy, b)
  r = preference.concatenated_logps(ref, b)
  batch = {**{k: v for k, v in b.items() if k != "index_B"},
           "ref_chosen_logps_B": r["chosen"][0], "ref_rejected_logps_B": r["rejected"][0]}
  loss_fn = preference.make_preference_loss([("sigmoid", 0.8, {}), ("ipo", 0.2, {}), ("sft", 1.0, {})], beta=0.3)
  loss, aux = loss_fn(policy, batch, None)
  pc, pr, rc, rr = pol["chosen"][0], pol["rejected"][0], r["chosen"][0], r["rejected"][0]
  lens = dict(chosen_lengths=pol["chosen"][2], rejected_lengths=pol["rejected"][2])
  parts = {name: float(jnp.mean(losses.get(name)(pc, pr, rc, rr, beta=0.3, **lens))) for name in ("sigmoid", "ipo", "sft")}
  np.testing.assert_allclose(float(loss), 0.8 * parts["sigmoid"] + 0.2 * parts["ipo"] + parts["sft"], rtol=1e-5)
  for name, v in parts.items():
    np.testing.assert_allclose(float(aux[f"loss/{name}"]), v, rtol=1e-5)
  margin = 0.3 * ((pc - rc) - (pr - rr))
  np.testing.assert_allclose(float(aux["rewards/margins"]), float(margin.mean()), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(aux["rewards/accuracies"]), float((margin > 0).mean()))
  assert float(aux["weight"]) == 4.0
  # The sigmoid term equals TRL's DPO loss computed by hand.
  np.testing.assert_allclose(parts["sigmoid"], float(jnp.mean(-jax.nn.log_sigmoid(margin))), rtol=1e-5)


def test_in_step_reference_equals_precomputed_and_gets_no_gradient():
  policy, ref = models.create_model(CFG, seed=1), models.create_model(CFG, seed=2)
  graphdef, ref_params = nnx.split(ref)
  b = {k: v for k, v in _batch().items() if k != "index_B"}
  r = preference.concatenated_logps(ref, b)
  pre = preference.make_preference_loss(beta=0.1)
  in_step = preference.make_preference_loss(beta=0.1, ref_graphdef=graphdef)
  l1, _ = pre(policy, {**b, "ref_chosen_logps_B": r["chosen"][0], "ref_rejected_logps_B": r["rejected"][0]}, None)
  l2, _ = in_step(policy, {**b, "extras": {"ref_params": ref_params}}, None)
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
  g = jax.grad(lambda rp: in_step(policy, {**b, "extras": {"ref_params": rp}}, None)[0])(ref_params)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))
  with pytest.raises(ValueError, match="neither ref_chosen_logps_B"):
    pre(policy, b, None)


def test_dpo_step_raises_chosen_over_rejected():
  model = models.create_model(CFG, seed=3)
  graphdef, params = nnx.split(model)
  tx, _ = optim.make_optimizer({"learning_rate": 3e-3}, total_steps=20)
  _, state, _ = state_lib.create_train_state(model, tx, extras={"ref_params": jax.tree.map(jnp.copy, params)})
  step = step_lib.make_train_step(preference.make_preference_loss(beta=0.5, ref_graphdef=graphdef), tx, graphdef)
  batch = {k: v for k, v in _batch(8).items() if k != "index_B"}
  first = None
  for _ in range(15):
    state, m = step(state, batch)
    first = first or {k: float(v) for k, v in m.items()}
  assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
  assert float(m["rewards/margins"]) > 0.5 and float(m["rewards/accuracies"]) == 1.0
  assert float(m["loss"]) < first["loss"]


@pytest.mark.parametrize("mode,alpha", [("soft", 0.6), ("hard", 0.6)])
def test_tr_dpo_sync(mode, alpha):
  update = preference.tr_dpo_sync(mode=mode, alpha=alpha, every=4)
  params = {"w": jnp.full((3,), 2.0)}
  extras = {"ref_params": {"w": jnp.zeros((3,))}, "other": jnp.ones(())}
  same = update(extras, params, jnp.asarray(3))
  np.testing.assert_array_equal(same["ref_params"]["w"], 0.0)
  synced = update(extras, params, jnp.asarray(8))
  expected = 2.0 if mode == "hard" else alpha * 2.0
  np.testing.assert_allclose(synced["ref_params"]["w"], expected)
  assert synced["other"] == 1.0
  with pytest.raises(ValueError, match="valid choices"):
    preference.tr_dpo_sync(mode="warm")


def test_reference_precompute_is_cached_and_reused(tmp_path):
  model = models.create_model(CFG, seed=4)
  graphdef, params = nnx.split(model)
  kw = dict(collate=pref_data.collate, batch_size=5, cache_dir=str(tmp_path), fingerprint="ref-a")
  table = preference.precompute_reference_logps(graphdef, params, PAIRS, **kw)
  files = os.listdir(tmp_path)
  assert len(files) == 1 and files[0].startswith("ref_logps_")
  b = _batch(16)
  direct = preference.concatenated_logps(model, b)
  np.testing.assert_allclose(table["ref_chosen_logps"], direct["chosen"][0], rtol=1e-5, atol=1e-5)
  other_params = jax.tree.map(lambda x: x + 1.0, params)
  again = preference.precompute_reference_logps(graphdef, other_params, PAIRS, **kw)  # same fingerprint: the cache
  np.testing.assert_array_equal(again["ref_rejected_logps"], table["ref_rejected_logps"])
  preference.precompute_reference_logps(graphdef, other_params, PAIRS, **{**kw, "fingerprint": "ref-b"})
  assert len(os.listdir(tmp_path)) == 2
  attached = preference.attach_reference(pref_data.collate([PAIRS[i] for i in (7, 2)]), table)
  np.testing.assert_array_equal(attached["ref_chosen_logps_B"], table["ref_chosen_logps"][[7, 2]])
  assert "index_B" not in attached


def _list_batch(k=3, n=4):
  """K members per prompt: ascending (score 2), descending (score 0) and, for k=3, a copy of ascending (score 1)."""
  rows = [PAIRS[i] for i in range(n)]
  members = [("chosen", 2.0), ("rejected", 0.0), ("chosen", 1.0)][:k]
  out = {}
  for key in ("input_ids", "targets", "loss_mask"):
    out[f"{key}_BxKxT"] = np.stack([np.stack([r[f"{side}_{key}"] for side, _ in members]) for r in rows])
  out["scores_BxK"] = np.tile(np.array([s for _, s in members], np.float32), (n, 1))
  out["list_mask_BxK"] = np.ones((n, k), np.float32)
  return out


def test_listwise_k2_equals_pairwise_sigmoid():
  policy, ref = models.create_model(CFG, seed=1), models.create_model(CFG, seed=2)
  graphdef, ref_params = nnx.split(ref)
  lb = _list_batch(k=2)
  pb = {k: v for k, v in _batch(4).items() if k != "index_B"}
  pair = preference.make_preference_loss(beta=0.2, ref_graphdef=graphdef)(policy, {**pb, "extras": {"ref_params": ref_params}}, None)[0]
  for name in ("lipo_lambda", "pairwise_logistic"):
    lst, aux = preference.make_listwise_loss(name, beta=0.2, ref_graphdef=graphdef)(policy, {**lb, "extras": {"ref_params": ref_params}}, None)
    np.testing.assert_allclose(float(lst), float(pair), rtol=1e-5)
    assert 0.0 <= float(aux["top1_accuracy"]) <= 1.0


def test_listwise_masked_member_equals_shorter_list_and_reference_free():
  policy = models.create_model(CFG, seed=1)
  ref_lp, _ = preference.list_logps(models.create_model(CFG, seed=2), _list_batch(k=3))
  b3 = {**_list_batch(k=3), "ref_logps_BxK": ref_lp}
  b3["list_mask_BxK"][:, 2] = 0.0
  b2 = {k: (v[:, :2] if k.endswith(("BxKxT", "BxK")) else v) for k, v in b3.items()}
  loss = preference.make_listwise_loss("lipo_lambda", beta=0.2)
  np.testing.assert_allclose(float(loss(policy, b3, None)[0]), float(loss(policy, b2, None)[0]), rtol=1e-5)
  free = preference.make_listwise_loss("pro", reference_free=True)
  assert np.isfinite(float(free(policy, _list_batch(k=3), None)[0]))
  simpo = preference.make_preference_loss([("simpo", 1.0, {})], beta=2.0, reference_free=True)
  value, aux = simpo(policy, {k: v for k, v in _batch().items() if k != "index_B"}, None)
  assert np.isfinite(float(value)) and "rewards/margins" in aux


def test_ld_alpha_and_wpo_weighting_in_the_step():
  from rlhf_jax.losses import dpo

  policy, ref = models.create_model(CFG, seed=1), models.create_model(CFG, seed=2)
  graphdef, ref_params = nnx.split(ref)
  b = {k: v for k, v in _batch(6).items() if k != "index_B"}
  batch = {**b, "extras": {"ref_params": ref_params}}
  plain, _ = preference.make_preference_loss(beta=0.3, ref_graphdef=graphdef)(policy, batch, None)
  ld1, _ = preference.make_preference_loss(beta=0.3, ref_graphdef=graphdef, ld_alpha=1.0)(policy, batch, None)
  np.testing.assert_allclose(float(ld1), float(plain), rtol=1e-5)  # α = 1 is plain DPO
  # α = 0.5 by hand: both sequences recomputed with the tail down-weighted.
  def ld(model):
    o = preference.concatenated_logps(model, b)
    return dpo.ld_sequence_logps(o["chosen"].token_BxT, o["chosen"].mask_BxT, o["rejected"].token_BxT,
                                 o["rejected"].mask_BxT, alpha=0.5)
  (pc, pr), (rc, rr) = ld(policy), ld(ref)
  ld_half, _ = preference.make_preference_loss(beta=0.3, ref_graphdef=graphdef, ld_alpha=0.5)(policy, batch, None)
  np.testing.assert_allclose(float(ld_half), float(jnp.mean(-jax.nn.log_sigmoid(0.3 * ((pc - rc) - (pr - rr))))), rtol=1e-5)
  # WPO: the loss is the weighted mean with w = w_c·w_r computed from the policy's logits.
  o = preference.concatenated_logps(policy, b, with_log_sum_p2=True)
  logits = policy(jnp.asarray(b["chosen_input_ids_BxT"]))
  np.testing.assert_allclose(o["chosen"].log_sum_p2_BxT, dpo.log_sum_p2_from_logits(logits), rtol=1e-5, atol=1e-6)
  w = dpo.wpo_weights(o["chosen"].token_BxT, o["chosen"].log_sum_p2_BxT, o["chosen"].mask_BxT,
                      o["rejected"].token_BxT, o["rejected"].log_sum_p2_BxT, o["rejected"].mask_BxT)
  r = preference.concatenated_logps(ref, b)
  per_pair = -jax.nn.log_sigmoid(0.3 * ((o["chosen"].seq_B - r["chosen"].seq_B) - (o["rejected"].seq_B - r["rejected"].seq_B)))
  wpo, aux = preference.make_preference_loss(beta=0.3, ref_graphdef=graphdef, use_weighting=True)(policy, batch, None)
  np.testing.assert_allclose(float(wpo), float(jnp.mean(per_pair * w)), rtol=1e-5)
  assert 0.0 < float(aux["wpo_weight"]) <= 1.0


# ----------------------------------------------------------------------------- per-pair columns reach the losses

def _byte_model(seed):
  """A tiny model whose vocabulary covers the byte-level tokenizer (ChatML specials included)."""
  import dataclasses

  from rlhf_jax.models.tokenizer import Tokenizer

  return models.create_model(dataclasses.replace(CFG, vocab_size=Tokenizer.byte_level().vocab_size), seed=seed)


def _column_batch(tmp_path, rows):
  import json as _json

  from rlhf_jax.data import formats, tokenize
  from rlhf_jax.models.tokenizer import Tokenizer

  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(_json.dumps(r) + "\n" for r in rows))
  examples, _ = formats.load_examples(str(path), "preference")
  tok = Tokenizer.byte_level()
  collate = tokenize.make_collate("pair", tok, max_len=48, max_prompt_len=16, pad_id=tok.pad_id, eos_id=tok.eos_id)
  return collate(examples)


def _rows(n=4, **columns):
  rows = [{"prompt": f"sort {i} {i + 2} 1", "chosen": f"1 {i} {i + 2}", "rejected": f"{i + 2} 1 {i}"} for i in range(n)]
  for name, values in columns.items():
    for r, v in zip(rows, values):
      r[name] = v
  return rows


def _with_ref(model_ref, b):
  r = preference.concatenated_logps(model_ref, b)
  return {**b, "ref_chosen_logps_B": r["chosen"].seq_B, "ref_rejected_logps_B": r["rejected"].seq_B}


def test_gold_column_trains_tpo_with_a_third_member_in_the_forward(tmp_path):
  policy, ref = _byte_model(1), _byte_model(2)
  b = _with_ref(ref, _column_batch(tmp_path, _rows(gold=[f"1 {i} {i + 2}!" for i in range(4)])))
  assert b["gold_input_ids_BxT"].shape == b["chosen_input_ids_BxT"].shape
  loss, _ = preference.make_preference_loss([("tpo", 1.0, {})], beta=0.2)(policy, b, None)
  gold = _seq_logps(policy, b["gold_input_ids_BxT"], b["gold_targets_BxT"], b["gold_loss_mask_BxT"])
  pol = preference.concatenated_logps(policy, b)
  want = losses.get("tpo")(pol["chosen"].seq_B, pol["rejected"].seq_B, b["ref_chosen_logps_B"], b["ref_rejected_logps_B"],
                           beta=0.2, policy_gold_logps=jnp.asarray(gold), gold_lengths=b["gold_loss_mask_BxT"].sum(-1),
                           chosen_lengths=pol["chosen"].lengths_B, rejected_lengths=pol["rejected"].lengths_B)
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), float(jnp.mean(want)), rtol=1e-5)
  with pytest.raises(ValueError, match="per-pair column 'gold'"):
    preference.make_preference_loss([("tpo", 1.0, {})])(policy, _with_ref(ref, _column_batch(tmp_path, _rows())), None)


def test_per_pair_beta_weight_and_modpo_margins(tmp_path):
  policy, ref = _byte_model(1), _byte_model(2)
  betas, margins_c, margins_r = [0.1, 0.5, 1.0, 2.0], [[1.0], [0.0], [2.0], [0.5]], [[0.0], [1.0], [0.5], [0.5]]
  b = _with_ref(ref, _column_batch(tmp_path, _rows(beta=betas, margin_rewards_chosen=margins_c,
                                                   margin_rewards_rejected=margins_r)))
  pol = preference.concatenated_logps(policy, b)
  pc, pr, rc, rr = pol["chosen"].seq_B, pol["rejected"].seq_B, b["ref_chosen_logps_B"], b["ref_rejected_logps_B"]
  loss, aux = preference.make_preference_loss([("sigmoid", 1.0, {})], beta=0.3)(policy, b, None)
  margin = np.asarray(betas) * np.asarray((pc - rc) - (pr - rr))
  assert np.all(np.isfinite(margin))
  np.testing.assert_allclose(float(loss), np.mean(np.logaddexp(0.0, -margin)), rtol=1e-5)
  np.testing.assert_allclose(float(aux["rewards/margins"]), margin.mean(), rtol=1e-4, atol=1e-6)
  w = np.array([0.7, 0.3], np.float32)
  loss, _ = preference.make_preference_loss([("modpo", 1.0, {"weights": w})], beta=0.3)(policy, b, None)
  want = losses.get("modpo")(pc, pr, rc, rr, beta=jnp.asarray(betas), margin_rewards_chosen_BxK=jnp.asarray(margins_c),
                             margin_rewards_rejected_BxK=jnp.asarray(margins_r), weights=w,
                             chosen_lengths=pol["chosen"].lengths_B, rejected_lengths=pol["rejected"].lengths_B)
  np.testing.assert_allclose(float(loss), float(jnp.mean(want)), rtol=1e-5)
  # A pair weight k counts the pair k times.
  copies = [1, 3, 0, 2]
  weighted = _with_ref(ref, _column_batch(tmp_path, _rows(weight=copies)))
  repeated = _with_ref(ref, _column_batch(tmp_path, [r for r, k in zip(_rows(), copies) for _ in range(k)]))
  fn = preference.make_preference_loss([("sigmoid", 1.0, {})], beta=0.3)
  (lw, aw), (lr, ar) = fn(policy, weighted, None), fn(policy, repeated, None)
  np.testing.assert_allclose(float(lw), float(lr), rtol=1e-5)
  assert float(aw["weight"]) == float(ar["weight"]) == 6.0


def test_per_pair_columns_in_some_rows_only_are_an_error(tmp_path):
  from rlhf_jax.data.formats import DataError

  with pytest.raises(DataError, match=r"record 1 of the batch\): field 'beta': missing field"):
    _column_batch(tmp_path, _rows(n=2, beta=[0.5]))
  with pytest.raises(DataError, match="field 'beta': bad value"):
    _column_batch(tmp_path, _rows(n=2, beta=[0.5, -1.0]))
