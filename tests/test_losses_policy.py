"""Tests for rlhf_jax.losses.policy: PPO/GRPO-family policy objectives, metrics, mismatch weights."""

import doctest
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlhf_jax.losses as losses
from rlhf_jax import ops
from rlhf_jax.losses import policy
from rlhf_jax.losses.policy import (
    TRL_GRPO_LOSS_TYPE_TO_AGGREGATION,
    cispo_loss,
    clip_cov_loss,
    geo_mean_loss,
    gpg_loss,
    gspo_loss,
    kimi_k15_loss,
    kl_cov_loss,
    ppo_clip_fraction,
    ppo_clip_loss,
    reinforce_loss,
    sapo_loss,
    truncated_importance_weights,
)

TOL = dict(rtol=1e-5, atol=1e-5)
B, T = 5, 7

ALL_LOSSES = {
    "vanilla": ppo_clip_loss,
    "gspo": gspo_loss,
    "cispo": cispo_loss,
    "sapo": sapo_loss,
    "gpg": gpg_loss,
    "clip_cov": clip_cov_loss,
    "kl_cov": kl_cov_loss,
    "geo_mean": geo_mean_loss,
    "reinforce": reinforce_loss,
    "kimi_k15": kimi_k15_loss,
}


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


@functools.lru_cache(maxsize=None)
def _jitted(fn, static_items):
  static = dict(static_items)
  return jax.jit(lambda args, traced: fn(*args, **static, **traced))


def _call(fn, *args, **kw):
  """``fn(*args, **kw)`` jitted once per (function, static keywords); floats are traced."""
  traced = {k: v for k, v in kw.items() if isinstance(v, float)}
  static = tuple(sorted((k, v) for k, v in kw.items() if k not in traced))
  return _jitted(fn, static)(args, traced)


def _batch(seed, *, spread=0.6, garbage=True):
  """Log-probs, old log-probs, per-token advantages and a mask with one empty row."""
  rng = np.random.default_rng(seed)
  logps = np.log(rng.uniform(0.05, 0.95, size=(B, T)))
  old = logps + rng.normal(0.0, spread, size=(B, T))
  adv = rng.normal(size=(B, T))
  mask = (rng.uniform(size=(B, T)) > 0.3).astype(np.float32)
  mask[:, 0] = 1.0
  mask[-1] = 0.0
  if garbage:
    logps = np.where(mask == 0, -np.inf, logps)
    old = np.where(mask == 0, np.nan, old)
    adv = np.where(mask == 0, np.nan, adv)
  f = lambda x: np.asarray(x, np.float32)
  return f(logps), f(old), f(adv), mask


def _clean(*xs, mask):
  out = tuple(np.where(mask != 0, x, 0.0).astype(np.float64) for x in xs)
  return out if len(out) > 1 else out[0]


def _grad(fn, logps, *args, **kw):
  return np.asarray(jax.grad(lambda lp: _call(fn, lp, *args, **kw).sum())(logps))


# ----------------------------------------------------------------------------- NumPy references


def _np_ratio(lp, old):
  return np.exp(np.clip(lp - old, -20, 20))


def _np_vanilla(lp, old, adv, m, lo, hi, c):
  lp, old, adv = _clean(lp, old, adv, mask=m)
  r = _np_ratio(lp, old)
  loss = np.maximum(-adv * r, -adv * np.clip(r, 1 - lo, 1 + hi))
  if c is not None:
    loss = np.where(adv < 0, np.minimum(loss, -adv * c), loss)
  return loss * m


def _np_seq_log_ratio_mean(lp, old, m):
  n = m.sum(-1)
  return np.where(n > 0, ((lp - old) * m).sum(-1) / np.maximum(n, 1), 0.0)


def _np_gspo(lp, old, adv, m, lo, hi):
  lp, old, adv = _clean(lp, old, adv, mask=m)
  s = np.exp(np.minimum(_np_seq_log_ratio_mean(lp, old, m), 10.0))[:, None]
  loss = np.maximum(-adv * s, -adv * np.clip(s, 1 - lo, 1 + hi))
  unclipped = (adv * s <= adv * np.clip(s, 1 - lo, 1 + hi))
  grad = np.where(unclipped, -adv * s, 0.0) * m
  return loss * m, grad


def _np_geo_mean(lp, old, adv, m, lo, hi):
  """verl compute_policy_loss_geo_mean, per sequence."""
  lp, old, adv = _clean(lp, old, adv, mask=m)
  nk = lp - old
  sgn = np.sign(adv)
  nk_min = sgn * np.minimum(sgn * nk, sgn * np.clip(nk, -lo, hi))
  n = m.sum(-1)
  ratio = np.exp((nk_min * m).sum(-1) / (n + 1e-8))
  a = (adv * m).sum(-1) / (n + 1e-8)
  return -a * ratio


# ----------------------------------------------------------------------------- vanilla PPO clip


@pytest.mark.parametrize("lo,hi,c", [(0.2, 0.2, 3.0), (0.2, 0.28, 3.0), (0.1, 0.3, None), (0.2, 0.2, 1.5)])
def test_vanilla_matches_numpy(lo, hi, c):
  logps, old, adv, mask = _batch(0, spread=0.8)
  got = _call(ppo_clip_loss, logps, old, adv, mask, clip_ratio_low=lo, clip_ratio_high=hi, clip_ratio_c=c)
  np.testing.assert_allclose(got, _np_vanilla(logps, old, adv, mask, lo, hi, c), **TOL)


def test_vanilla_gradient_matches_numpy():
  logps, old, adv, mask = _batch(1, spread=0.5)
  lp, o, a = _clean(logps, old, adv, mask=mask)
  r = _np_ratio(lp, o)
  pg1, pg2 = -a * r, -a * np.clip(r, 0.8, 1.2)
  unclipped = pg1 >= pg2
  g_clip1 = np.where(unclipped, -a * r, 0.0)
  dual = (a < 0) & (np.maximum(pg1, pg2) > -a * 3.0)
  want = np.where(dual, 0.0, g_clip1) * mask
  np.testing.assert_allclose(_grad(ppo_clip_loss, logps, old, adv, mask), want, **TOL)


def test_dual_clip_only_affects_negative_advantages():
  logps, old, adv, mask = _batch(2, spread=1.5)
  with_c = np.asarray(_call(ppo_clip_loss, logps, old, adv, mask, clip_ratio_c=3.0))
  without = np.asarray(_call(ppo_clip_loss, logps, old, adv, mask, clip_ratio_c=None))
  pos = (np.nan_to_num(adv) >= 0) & (mask != 0)
  np.testing.assert_array_equal(with_c[pos], without[pos])
  changed = ~np.isclose(with_c, without)
  assert changed.any(), "the test batch should trigger the dual clip"
  assert np.all(np.nan_to_num(adv)[changed] < 0)
  # where it acts it caps the loss at −c·A
  np.testing.assert_allclose(with_c[changed], (-3.0 * adv * mask)[changed], **TOL)


@pytest.mark.parametrize("name", ["vanilla", "cispo", "sapo", "reinforce", "gpg", "clip_cov"])
def test_on_policy_gradient_is_policy_gradient(name):
  """At ratio 1 (old = current) the gradient is −A·∇log π for the ratio-based objectives."""
  logps, _, adv, mask = _batch(3)
  old = np.where(mask != 0, logps, np.nan).astype(np.float32)
  kw = {"clip_cov_lb": 100.0} if name == "clip_cov" else {}  # no covariance candidates
  g = _grad(losses.get(name), logps, old, adv, mask, **kw)
  np.testing.assert_allclose(g, -_clean(adv, mask=mask) * mask, **TOL)


def test_gspo_one_token_equals_vanilla():
  rng = np.random.default_rng(4)
  logps = np.log(rng.uniform(0.05, 0.95, size=(12, 1))).astype(np.float32)
  old = (logps + rng.normal(0, 0.3, size=(12, 1))).astype(np.float32)
  adv = rng.normal(size=(12, 1)).astype(np.float32)
  mask = np.ones((12, 1), np.float32)
  for lo, hi in ((0.2, 0.28), (3e-4, 4e-4)):
    kw = dict(clip_ratio_low=lo, clip_ratio_high=hi)
    a = _call(gspo_loss, logps, old, adv, mask, **kw)
    b = _call(ppo_clip_loss, logps, old, adv, mask, clip_ratio_c=None, **kw)
    np.testing.assert_allclose(a, b, **TOL)
    np.testing.assert_allclose(
        _grad(gspo_loss, logps, old, adv, mask, **kw),
        _grad(ppo_clip_loss, logps, old, adv, mask, clip_ratio_c=None, **kw), **TOL)


@pytest.mark.parametrize("lo,hi", [(3e-4, 4e-4), (0.2, 0.2)])
def test_gspo_matches_numpy(lo, hi):
  logps, old, adv, mask = _batch(5, spread=0.1)
  want, want_grad = _np_gspo(logps, old, adv, mask, lo, hi)
  np.testing.assert_allclose(_call(gspo_loss, logps, old, adv, mask, clip_ratio_low=lo, clip_ratio_high=hi),
                             want, **TOL)
  np.testing.assert_allclose(_grad(gspo_loss, logps, old, adv, mask, clip_ratio_low=lo, clip_ratio_high=hi),
                             want_grad, **TOL)


def test_gspo_gradient_is_sequence_level_with_seq_mean_token_mean():
  """Reduced with seq-mean-token-mean and sequence advantages: −mean_b A_b·s_b·∇ mean_t log π."""
  logps, old, _, mask = _batch(6, spread=0.05)
  adv_B = np.array([1.0, -0.5, 2.0, 0.3, 0.0], np.float32)
  f = lambda lp: ops.seq_mean_token_mean(gspo_loss(lp, old, adv_B, mask, clip_ratio_low=10.0,
                                                   clip_ratio_high=10.0), mask)
  g = np.asarray(jax.jit(jax.grad(f))(logps))
  lp, o = _clean(logps, old, mask=mask)
  s = np.exp(_np_seq_log_ratio_mean(lp, o, mask))
  n = mask.sum(-1)
  nonempty = (n > 0).sum()
  want = -(adv_B * s / np.maximum(n, 1))[:, None] * mask / nonempty
  np.testing.assert_allclose(g, want, **TOL)


# ----------------------------------------------------------------------------- other objectives


def test_cispo_matches_numpy_and_keeps_every_gradient():
  logps, old, adv, mask = _batch(7, spread=1.0)
  lp, o, a = _clean(logps, old, adv, mask=mask)
  for lo, hi in ((1.0, 4.0), (0.2, 0.28)):
    w = np.clip(_np_ratio(lp, o), 1 - lo, 1 + hi)
    np.testing.assert_allclose(
        _call(cispo_loss, logps, old, adv, mask, clip_ratio_low=lo, clip_ratio_high=hi), -w * a * lp * mask, **TOL)
    g = _grad(cispo_loss, logps, old, adv, mask, clip_ratio_low=lo, clip_ratio_high=hi)
    np.testing.assert_allclose(g, -w * a * mask, **TOL)  # clipped weight, never a zeroed gradient
  # TRL's cap min(r, 5) is clip_ratio_low=1, clip_ratio_high=4
  np.testing.assert_allclose(
      _call(cispo_loss, logps, old, adv, mask), -np.minimum(_np_ratio(lp, o), 5.0) * a * lp * mask, **TOL)


def test_sapo_matches_numpy():
  logps, old, adv, mask = _batch(8, spread=0.7)
  lp, o, a = _clean(logps, old, adv, mask=mask)
  r = _np_ratio(lp, o)
  tau = np.where(a > 0, 1.0, 1.05)
  sig = 1 / (1 + np.exp(-tau * (r - 1)))
  np.testing.assert_allclose(_call(sapo_loss, logps, old, adv, mask), -sig * 4 / tau * a * mask, **TOL)
  np.testing.assert_allclose(_grad(sapo_loss, logps, old, adv, mask), -4 * sig * (1 - sig) * r * a * mask,
                             rtol=1e-4, atol=1e-5)
  got = _call(sapo_loss, logps, old, adv, mask, tau_pos=2.0, tau_neg=3.0)
  tau = np.where(a > 0, 2.0, 3.0)
  np.testing.assert_allclose(got, -a * 4 / tau / (1 + np.exp(-tau * (r - 1))) * mask, **TOL)


def test_gpg_and_reinforce_match_numpy():
  logps, old, adv, mask = _batch(9)
  lp, o, a = _clean(logps, old, adv, mask=mask)
  np.testing.assert_allclose(_call(gpg_loss, logps, old, adv, mask), -a * lp * mask, **TOL)
  np.testing.assert_allclose(_call(reinforce_loss, logps, old, adv, mask), -_np_ratio(lp, o) * a * mask, **TOL)
  np.testing.assert_allclose(_grad(reinforce_loss, logps, old, adv, mask), -_np_ratio(lp, o) * a * mask, **TOL)


def _np_cov(lp, adv, m):
  valid = m != 0
  return (adv - adv[valid].mean()) * (lp - lp[valid].mean())


def test_clip_cov_deterministic_matches_numpy():
  logps, old, adv, mask = _batch(10, spread=0.3)
  lp, o, a = _clean(logps, old, adv, mask=mask)
  kw = dict(clip_cov_ratio=0.15, clip_cov_lb=0.05, clip_cov_ub=5.0)
  r = _np_ratio(lp, o)
  pg1, pg2 = -a * r, -a * np.clip(r, 0.8, 1.2)
  cov = _np_cov(lp, a, mask)
  valid = mask != 0
  cand = valid & ~(pg2 > pg1) & (cov > 0.05) & (cov < 5.0)
  k = min(max(int(0.15 * valid.sum()), 1), cand.sum())
  assert 1 <= k < cand.sum(), "the test batch should have more candidates than the budget"
  order = np.argsort(-np.where(cand, cov, -np.inf).ravel(), kind="stable")[:k]
  detach = np.zeros(B * T, bool)
  detach[order] = True
  detach = detach.reshape(B, T)
  want = np.where(detach, 0.0, np.maximum(pg1, pg2)) * mask
  np.testing.assert_allclose(_call(clip_cov_loss, logps, old, adv, mask, **kw), want, **TOL)
  g = _grad(clip_cov_loss, logps, old, adv, mask, **kw)
  np.testing.assert_array_equal(g[detach], 0.0)


def test_clip_cov_random_selection():
  logps, old, adv, mask = _batch(10, spread=0.3)
  lp, o, a = _clean(logps, old, adv, mask=mask)
  kw = dict(clip_cov_ratio=0.15, clip_cov_lb=0.05, clip_cov_ub=5.0)
  base = np.asarray(_call(ppo_clip_loss, logps, old, adv, mask, clip_ratio_c=None))
  r = _np_ratio(lp, o)
  cov = _np_cov(lp, a, mask)
  cand = (mask != 0) & ~(-a * np.clip(r, 0.8, 1.2) > -a * r) & (cov > 0.05) & (cov < 5.0)
  k = min(max(int(0.15 * (mask != 0).sum()), 1), cand.sum())
  chosen = []
  f = jax.jit(lambda key: clip_cov_loss(logps, old, adv, mask, rng=key, **kw))
  for seed in range(4):
    got = np.asarray(f(jax.random.key(seed)))
    detached = (got == 0) & (base != 0)
    assert detached.sum() == k and np.all(cand[detached])
    np.testing.assert_allclose(got[~detached], base[~detached], **TOL)
    chosen.append(tuple(np.flatnonzero(detached)))
  assert len(set(chosen)) > 1, "different keys should pick different tokens"


def test_kl_cov_matches_numpy():
  logps, old, adv, mask = _batch(11, spread=0.4)
  lp, o, a = _clean(logps, old, adv, mask=mask)
  for ratio, coef in ((0.1, 1.0), (2e-4, 0.5)):
    cov = _np_cov(lp, a, mask)
    valid = mask != 0
    k = max(int(valid.sum() * ratio), 1)
    top = np.argsort(-np.where(valid, cov, -np.inf).ravel(), kind="stable")[:k]
    pen = np.zeros(B * T, bool)
    pen[top] = True
    pen = pen.reshape(B, T)
    r = _np_ratio(lp, o)
    want = (-a * r + np.where(pen, coef * np.abs(np.log(r)), 0.0)) * mask
    np.testing.assert_allclose(_call(kl_cov_loss, logps, old, adv, mask, kl_cov_ratio=ratio, ppo_kl_coef=coef),
                               want, **TOL)


def test_geo_mean_matches_verl():
  logps, old, adv, mask = _batch(12, spread=0.5)
  adv_B = np.array([1.0, -0.7, 0.4, -2.0, 0.5], np.float32)
  for a in (adv, adv_B):
    a_bt = a if a.ndim == 2 else np.broadcast_to(a[:, None], (B, T))
    seq = _np_geo_mean(logps, old, a_bt, mask, 0.4, 0.4)
    got = np.asarray(_call(geo_mean_loss, logps, old, a, mask))
    np.testing.assert_allclose(got, seq[:, None] * mask, **TOL)
  # seq-mean-token-mean of the broadcast loss is verl's mean over (non-empty) sequences
  full = np.ones((B, T), np.float32)
  seq = _np_geo_mean(logps, old, adv, full, 0.2, 0.3)
  agg = ops.seq_mean_token_mean(_call(geo_mean_loss, logps, old, adv, full, clip_ratio_low=0.2,
                                      clip_ratio_high=0.3), full)
  np.testing.assert_allclose(agg, seq.mean(), **TOL)


def test_kimi_k15_matches_numpy_and_gradient():
  logps, old, _, mask = _batch(13, spread=0.2)
  adv_B = np.array([1.0, -0.5, 0.25, 0.0, 3.0], np.float32)
  lp, o = _clean(logps, old, mask=mask)
  u = ((lp - o) * mask).sum(-1)
  for tau in (1.0, 0.1):
    want = 0.5 * (adv_B - tau * u) ** 2
    np.testing.assert_allclose(_call(kimi_k15_loss, logps, old, adv_B, mask, tau=tau), want[:, None] * mask, **TOL)
  # on-policy gradient of the sequence-mean objective: −τ·A_b/|S| on each token (policy gradient × τ)
  same = np.where(mask != 0, logps, np.nan).astype(np.float32)
  f = lambda x: ops.seq_mean_token_mean(kimi_k15_loss(x, same, adv_B, mask, tau=0.5), mask)
  g = np.asarray(jax.jit(jax.grad(f))(logps))
  nonempty = (mask.sum(-1) > 0).sum()
  np.testing.assert_allclose(g, -0.5 * adv_B[:, None] * mask / nonempty, **TOL)


# ----------------------------------------------------------------------------- common contract


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_masked_positions_are_zero_with_finite_gradients(name):
  fn = ALL_LOSSES[name]
  logps, old, adv, mask = _batch(14)

  adv_B = np.linspace(-1.0, 1.5, B).astype(np.float32)

  @jax.jit
  def value_and_grads(lp, o, a, m):
    out = fn(lp, o, a, m)
    grads = jax.grad(lambda *x: fn(*x, m).sum(), argnums=(0, 1, 2))(lp, o, a)
    # [B] advantages are broadcast to the tokens
    per_seq = fn(lp, o, adv_B, m), fn(lp, o, jnp.broadcast_to(adv_B[:, None], (B, T)), m)
    return out, grads, per_seq

  # logps are −inf and old log-probs / advantages NaN where masked: all of it must be ignored
  out, (g, g_old, g_adv), (per_seq, per_token) = value_and_grads(logps, old, adv, mask)
  np.testing.assert_allclose(per_seq, per_token, **TOL)
  out, g = np.asarray(out), np.asarray(g)
  assert out.shape == (B, T) and out.dtype == np.float32
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[mask == 0], 0.0)
  assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(g[mask == 0], 0.0)
  # old log-probs and advantages are stop-gradient targets
  np.testing.assert_array_equal(g_old, 0.0)
  np.testing.assert_array_equal(g_adv, 0.0)
  # masked equals sliced: dropping the empty last row changes nothing
  sliced = np.asarray(_call(fn, logps[:-1], old[:-1], adv[:-1], mask[:-1]))
  np.testing.assert_allclose(sliced, out[:-1], **TOL)


def test_stop_gradient_flag_off_lets_old_logps_gradient_through():
  logps, old, adv, mask = _batch(16, garbage=False)
  g = jax.jit(jax.grad(lambda o: ppo_clip_loss(logps, o, adv, mask, stop_gradient=False).sum()))(old)
  assert np.abs(np.asarray(g)).sum() > 0


def test_shape_and_hparam_errors():
  logps, old, adv, mask = _batch(17, garbage=False)
  with pytest.raises(ValueError, match="old_logps_BxT"):
    _call(ppo_clip_loss, logps, old[:, :-1], adv, mask)
  with pytest.raises(ValueError, match="advantages_BxT"):
    _call(gspo_loss, logps, old, adv[:, :-1], mask)
  with pytest.raises(ValueError, match="mask_BxT"):
    _call(sapo_loss, logps, old, adv, mask[:-1])
  with pytest.raises(ValueError, match="rank 2"):
    ppo_clip_loss(logps[0], old[0], adv[0], mask[0])
  with pytest.raises(ValueError, match="floating"):
    gpg_loss(logps.astype(np.int32), old, adv, mask)
  with pytest.raises(ValueError, match="clip_ratio_c"):
    ppo_clip_loss(logps, old, adv, mask, clip_ratio_c=0.5)
  with pytest.raises(ValueError, match="clip_ratio_low"):
    geo_mean_loss(logps, old, adv, mask, clip_ratio_low=-0.1)
  with pytest.raises(ValueError, match="tau_neg"):
    sapo_loss(logps, old, adv, mask, tau_neg=0.0)
  with pytest.raises(ValueError, match="tau"):
    kimi_k15_loss(logps, old, adv, mask, tau=-1.0)
  with pytest.raises(ValueError, match="kl_cov_ratio"):
    kl_cov_loss(logps, old, adv, mask, kl_cov_ratio=0.0)
  # traced hyper-parameters are accepted (schedules)
  np.testing.assert_allclose(_call(ppo_clip_loss, logps, old, adv, mask, clip_ratio_high=0.28),
                             _np_vanilla(logps, old, adv, mask, 0.2, 0.28, 3.0), **TOL)


def test_bf16_inputs_give_float32():
  logps, old, adv, mask = _batch(18, garbage=False)
  out = jax.jit(ppo_clip_loss)(jnp.asarray(logps, jnp.bfloat16), jnp.asarray(old, jnp.bfloat16), adv, mask)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(out)))


def test_registry():
  for name, fn in ALL_LOSSES.items():
    assert losses.get(name) is fn
    e = losses.info(name)
    assert e.kind == "policy" and e.formula and e.reference
  assert losses.get("vanilla") is ppo_clip_loss


# ----------------------------------------------------------------------------- metrics


def test_ppo_clip_fraction_matches_numpy():
  logps, old, adv, mask = _batch(19, spread=1.0)
  lp, o, a = _clean(logps, old, adv, mask=mask)
  m = jax.jit(functools.partial(ppo_clip_fraction, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0))(
      logps, old, adv, mask)
  valid = mask != 0
  r = _np_ratio(lp, o)
  pg1, pg2 = -a * r, -a * np.clip(r, 0.8, 1.28)
  mean = lambda x: x[valid].mean()
  np.testing.assert_allclose(m["clip_fraction"], mean(pg2 > pg1), **TOL)
  np.testing.assert_allclose(m["clip_fraction_lower"], mean((np.maximum(pg1, pg2) > -3 * a) & (a < 0)), **TOL)
  np.testing.assert_allclose(m["clip_fraction_low"], mean((r < 0.8) & (a < 0)), **TOL)
  np.testing.assert_allclose(m["clip_fraction_high"], mean((r > 1.28) & (a > 0)), **TOL)
  np.testing.assert_allclose(m["approx_kl"], mean(r - 1 - np.log(r)), rtol=1e-4)
  np.testing.assert_allclose(m["ppo_kl"], mean(o - lp), **TOL)
  np.testing.assert_allclose(m["ratio_mean"], mean(r), **TOL)
  np.testing.assert_allclose(m["ratio_min"], r[valid].min(), **TOL)
  np.testing.assert_allclose(m["ratio_max"], r[valid].max(), **TOL)
  np.testing.assert_allclose(m["ntokens"], valid.sum(), **TOL)
  assert float(m["approx_kl"]) >= 0
  empty = jax.jit(ppo_clip_fraction)(logps, old, adv, np.zeros_like(mask))
  assert all(np.isfinite(float(v)) and float(v) == 0.0 for v in empty.values())


# ----------------------------------------------------------------------------- mismatch correction


def _np_is_weights(tr, ro, m, level, cap, mode, lower=None):
  tr, ro = _clean(tr, ro, mask=m)
  lr = tr - ro
  if level == "sequence":
    lr = np.broadcast_to((lr * m).sum(-1, keepdims=True), lr.shape)
  rho = np.exp(np.clip(lr, -20, 20))
  if mode == "truncate":
    w = np.minimum(rho, cap)
    if lower is not None:
      w = np.maximum(w, lower)
  else:
    ok = rho <= cap
    if lower is not None:
      ok &= rho >= lower
    w = np.where(ok, rho, 0.0)
  return np.where(m != 0, w, 0.0)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("lower", [None, 0.5])
def test_truncated_importance_weights_match_numpy(level, mode, lower):
  trainer, rollout, _, mask = _batch(20, spread=0.3)
  kw = dict(level=level, mode=mode, cap=1.5, lower_cap=lower)
  got = np.asarray(jax.jit(functools.partial(truncated_importance_weights, **kw))(trainer, rollout, mask))
  want = _np_is_weights(trainer, rollout, mask, level, 1.5, mode, lower)
  np.testing.assert_allclose(got, want, **TOL)
  assert np.all(got[mask == 0] == 0.0)
  if mode == "mask":
    assert np.any((got == 0) & (mask != 0)), "the batch should have rejected tokens"
  if level == "sequence":  # one weight per sequence
    for b in range(B):
      vals = got[b][mask[b] != 0]
      assert np.allclose(vals, vals[:1])
  g = jax.grad(lambda t: truncated_importance_weights(t, rollout, mask, **kw).sum())(trainer)
  np.testing.assert_array_equal(g, 0.0)  # stop-gradient weights


def test_truncated_importance_weights_identity_and_errors():
  trainer, _, _, mask = _batch(21)
  same = np.where(mask != 0, trainer, np.nan).astype(np.float32)
  for level in ("token", "sequence"):
    for mode in ("truncate", "mask"):
      w = jax.jit(functools.partial(truncated_importance_weights, level=level, mode=mode))(trainer, same, mask)
      np.testing.assert_allclose(w, mask, **TOL)
  with pytest.raises(ValueError, match="level"):
    truncated_importance_weights(trainer, same, mask, level="tok")
  with pytest.raises(ValueError, match="mode"):
    truncated_importance_weights(trainer, same, mask, mode="clip")
  with pytest.raises(ValueError, match="cap"):
    truncated_importance_weights(trainer, same, mask, cap=0.0)
  with pytest.raises(ValueError, match="rollout_logps_BxT"):
    truncated_importance_weights(trainer, same[:, :-1], mask)


def test_trl_loss_type_mapping():
  assert TRL_GRPO_LOSS_TYPE_TO_AGGREGATION == {
      "grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm", "dapo": "token-mean"}
  for agg in TRL_GRPO_LOSS_TYPE_TO_AGGREGATION.values():
    assert agg in ops.AGGREGATIONS
  # TRL's grpo / bnpo / dr_grpo values on one micro-batch
  logps, old, adv, mask = _batch(22, garbage=False)
  x = np.asarray(ppo_clip_loss(logps, old, adv, mask, clip_ratio_c=None), np.float64)
  n = mask.sum(-1)
  keep = n > 0
  trl = {
      "grpo": ((x * mask).sum(-1)[keep] / n[keep]).mean(),
      "bnpo": (x * mask).sum() / mask.sum(),
      "dr_grpo": (x * mask).sum() / (B * T),
  }
  for name, want in trl.items():
    agg = ops.get_aggregation(TRL_GRPO_LOSS_TYPE_TO_AGGREGATION[name])
    kw = {"norm": B * T} if name == "dr_grpo" else {}
    np.testing.assert_allclose(agg(x, mask, **kw), want, **TOL)


def test_docstring_examples():
  result = doctest.testmod(policy, extraglobs={"jnp": jnp, "np": np, "math": math}, verbose=False)
  assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------- float masks weigh once


def _per_token_losses():
  """Every per-token loss of the registry that takes a mask, as ``f(x, mask) -> [B, T]``.

  ``x`` holds the inputs: log-probs, old log-probs, advantages, values, returns, logits.
  """
  out = {}
  hp = {"clip_cov": dict(clip_cov_lb=1e9, clip_cov_ub=2e9),  # no detached tokens: deterministic
        "kl_cov": dict(kl_cov_ratio=1.0)}  # every token penalised: independent of the count N
  for name in losses.names():
    if losses.info(name).kind == "policy":
      fn = functools.partial(losses.get(name), **hp.get(name, {}))
      out[name] = lambda x, m, fn=fn: fn(x["lp"], x["old"], x["adv"], m)
  out["clipped_value"] = lambda x, m: losses.value.clipped_value_loss(x["v"], x["v_old"], x["ret"], m, clip_range=0.2)
  out["hl_gauss_value"] = lambda x, m: losses.get("hl_gauss_value")(x["logits"], x["ret"], m, v_min=-3.0, v_max=3.0)
  out["kl_loss"] = lambda x, m: losses.kl.kl_loss(x["lp"], x["old"], m)
  out["entropy_bonus"] = lambda x, m: losses.get("entropy_bonus")(x["v"], m, coef=0.1)
  out["nll"] = lambda x, m: losses.get("nll")(x["lp"], m)
  out["prm_bce"] = lambda x, m: losses.get("prm_bce")(x["v"], (x["ret"] > 0).astype(jnp.float32), m)
  out["dft"] = lambda x, m: losses.get("dft")(x["lp"], m)
  out["a_lol_ref_free"] = lambda x, m: losses.get("a_lol_ref_free")(x["lp"], x["adv"], m)
  out["a_lol"] = lambda x, m: losses.get("a_lol")(x["lp"], x["old"], x["adv"], m)
  out["c_rlft"] = lambda x, m: losses.get("c_rlft")(x["lp"], m, x["adv"])
  return out


def _loss_inputs(b, t, rng):
  lp = np.log(rng.uniform(0.05, 0.95, (b, t))).astype(np.float32)
  return {"lp": lp, "old": (lp + rng.normal(0, 0.3, (b, t))).astype(np.float32),
          "adv": rng.normal(size=b).astype(np.float32), "v": rng.normal(size=(b, t)).astype(np.float32),
          "v_old": rng.normal(size=(b, t)).astype(np.float32), "ret": rng.normal(size=(b, t)).astype(np.float32),
          "logits": rng.normal(size=(b, t, 6)).astype(np.float32)}


@pytest.mark.parametrize("aggregation", ["token-mean", "token-sum"])
def test_float_mask_weighs_each_token_once(aggregation):
  """An integer weight k on a sequence counts as k copies of it: Σ w·l / Σ w, not Σ w²·l / Σ w.

  Independent computation: the same sequences repeated k times with a 0/1 mask.
  """
  rng = np.random.default_rng(0)
  x = _loss_inputs(B, T, rng)
  binary = (rng.uniform(size=(B, T)) > 0.3).astype(np.float32)
  binary[:, 0] = 1.0
  copies = np.array([1, 2, 3, 0, 2])
  weights = binary * copies[:, None].astype(np.float32)
  rep = {k: np.repeat(v, copies, axis=0) for k, v in x.items()}
  agg = ops.get_aggregation(aggregation)
  for name, fn in _per_token_losses().items():
    got = agg(fn(x, weights), weights)
    want = agg(fn(rep, np.repeat(binary, copies, axis=0)), np.repeat(binary, copies, axis=0))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_float_token_weights_enter_sequence_aggregations_once(aggregation):
  """Token weights w inside a sequence: the per-token loss does not carry w, the aggregation does.

  For the token-local losses the loss under float weights equals the loss under the 0/1 mask, and
  each aggregation equals its numpy formula with w applied once.
  """
  rng = np.random.default_rng(1)
  x = _loss_inputs(B, T, rng)
  weights = (rng.uniform(size=(B, T)) > 0.3) * rng.uniform(0.2, 2.0, (B, T)).astype(np.float32)
  weights[3] = 0.0
  keep = weights != 0
  sequence_level = {"gspo", "geo_mean", "kimi_k15", "kl_cov", "clip_cov"}
  for name, fn in _per_token_losses().items():
    losses_w = np.asarray(fn(x, weights))
    if name not in sequence_level:
      np.testing.assert_allclose(losses_w, np.asarray(fn(x, keep.astype(np.float32))), rtol=1e-5, atol=1e-6,
                                 err_msg=name)
    n = weights.sum(-1)
    sums = (weights * losses_w).sum(-1)
    nonempty = n > 0
    want = {"seq-mean-token-mean": np.mean(sums[nonempty] / n[nonempty]),
            "seq-mean-token-sum": np.mean(sums[nonempty]),
            "seq-mean-token-sum-norm": sums.sum() / T}[aggregation]
    got = ops.get_aggregation(aggregation)(jnp.asarray(losses_w), weights)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6, err_msg=name)
