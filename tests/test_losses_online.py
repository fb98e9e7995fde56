"""Tests for rlhf_jax.losses.online: XPO, Nash-MD-PG, INPO, DNO, online IPO and win rates against
NumPy transcriptions of TRL / the papers, identities between them, the stop-gradient placement,
tabular checks that each loss's stationary point is its paper's target policy, and the registry."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlhf_jax.losses as losses
from rlhf_jax.losses import docs, dpo, online
from rlhf_jax.rewards import symmetrize_preference

B, T = 12, 7
RTOL = ATOL = 1e-5


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


def np_logsig(x):
  return -np.logaddexp(0.0, -x)


def np_sig(x):
  return np.exp(np_logsig(x))


def _seqs(n, seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  return [(-rng.uniform(0.5, scale, B)).astype(np.float32) for _ in range(n)]


def _prefs(seed=1):
  return np.random.default_rng(seed).uniform(0.0, 1.0, B).astype(np.float32)


def _grads(fn, args, argnums):
  return jax.grad(lambda *a: fn(*a).sum(), argnums=argnums)(*[jnp.asarray(a) for a in args])


# ----------------------------------------------------------------------------- XPO


def np_trl_xpo(model_model, model_ref, ref_ref, ref_model, chosen_mask, beta, alpha, loss_type):
  """TRL XPOTrainer._compute_losses on summed log-probs: pair = (policy sample, reference sample)."""
  chosen_model = np.where(chosen_mask, model_model, model_ref)
  chosen_ref = np.where(chosen_mask, ref_model, ref_ref)
  rejected_model = np.where(~chosen_mask, model_model, model_ref)
  rejected_ref = np.where(~chosen_mask, ref_model, ref_ref)
  logits = (chosen_model - chosen_ref) - (rejected_model - rejected_ref)
  dpo_l = -np_logsig(beta * logits) if loss_type == "sigmoid" else (logits - 1 / (2 * beta)) ** 2
  return dpo_l + alpha * model_ref, (chosen_model, rejected_model, chosen_ref, rejected_ref)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_xpo_matches_trl(loss_type):
  mm, mr, rr, rm = _seqs(4)
  chosen_mask = np.random.default_rng(3).uniform(size=B) < 0.5
  want, (pc, pr, rc, rj) = np_trl_xpo(mm, mr, rr, rm, chosen_mask, 0.2, 0.05, loss_type)
  got = jax.jit(lambda *a: online.xpo_loss(*a, beta=0.2, alpha=0.05, loss_type=loss_type))(pc, pr, rc, rj, mr)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  assert got.shape == (B,) and got.dtype == jnp.float32


def test_xpo_defaults_and_identities():
  pc, pr, rc, rr, px = _seqs(5, seed=4)
  got = online.xpo_loss(pc, pr, rc, rr, px)  # TRL defaults beta=0.1, alpha=1e-5
  want = -np_logsig(0.1 * ((pc - rc) - (pr - rr))) + 1e-5 * px
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  # alpha = 0 is online DPO; the IPO variant is un-normalised IPO = online IPO with a 0/1 outcome.
  np.testing.assert_allclose(online.xpo_loss(pc, pr, rc, rr, px, beta=0.3, alpha=0.0),
                             dpo.sigmoid_loss(pc, pr, rc, rr, beta=0.3), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(online.xpo_loss(pc, pr, rc, rr, px, beta=0.3, alpha=0.0, loss_type="ipo"),
                             online.online_ipo_loss(pc, pr, rc, rr, np.ones(B, np.float32), tau=0.3),
                             rtol=RTOL, atol=1e-4)
  ones = np.ones(B, np.float32)
  np.testing.assert_allclose(
      online.xpo_loss(pc, pr, rc, rr, px, beta=0.3, alpha=0.0, loss_type="ipo"),
      dpo.ipo_loss(pc, pr, rc, rr, beta=0.3, chosen_lengths=ones, rejected_lengths=ones), rtol=RTOL, atol=1e-4)


def test_xpo_gradients():
  pc, pr, rc, rr, px = _seqs(5, seed=5)
  alpha, beta = 0.7, 0.4
  g = _grads(lambda *a: online.xpo_loss(*a, beta=beta, alpha=alpha), (pc, pr, rc, rr, px), (0, 1, 2, 3, 4))
  d = (pc - rc) - (pr - rr)
  dl = -beta * np_sig(-beta * d)  # d/dΔ of −log σ(βΔ)
  np.testing.assert_allclose(g[0], dl, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(g[1], -dl, rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(g[2], 0.0)
  np.testing.assert_array_equal(g[3], 0.0)
  np.testing.assert_allclose(g[4], alpha, rtol=RTOL)  # the exploration term has gradient α
  g_free = _grads(lambda *a: online.xpo_loss(*a, stop_gradient=False), (pc, pr, rc, rr, px), (2,))
  assert np.all(np.asarray(g_free[0]) != 0.0)


# ----------------------------------------------------------------------------- Nash-MD


def _tokens(seed=6):
  rng = np.random.default_rng(seed)
  logp = np.log(rng.uniform(0.05, 0.95, (B, T))).astype(np.float32)
  ref = np.log(rng.uniform(0.05, 0.95, (B, T))).astype(np.float32)
  lengths = rng.integers(1, T + 1, B)
  mask = np.arange(T)[None, :] < lengths[:, None]
  return logp, ref, mask


def np_trl_nash_md(logp, ref, mask, prob, beta):
  """TRL NashMDTrainer._compute_losses after its masked_fill of padding with 0."""
  logp = np.where(mask, logp, 0.0)
  ref = np.where(mask, ref, 0.0)
  score = (prob - 0.5) * logp.sum(1)
  kl_loss = ((logp - ref) * logp).sum(1)
  return beta * kl_loss - score


def test_nash_md_matches_trl_and_paper_form():
  logp, ref, mask = _tokens()
  prob = _prefs()
  got = jax.jit(lambda *a: online.nash_md_loss(*a, beta=0.3))(logp, ref, mask, prob)
  np.testing.assert_allclose(got, np_trl_nash_md(logp, ref, mask, prob, 0.3), rtol=RTOL, atol=ATOL)
  seq = online.nash_md_loss(logp, ref, mask, prob, beta=0.3, kl_form="sequence")
  lp, rf = np.where(mask, logp, 0.0).sum(1), np.where(mask, ref, 0.0).sum(1)
  np.testing.assert_allclose(seq, 0.3 * (lp - rf) * lp - (prob - 0.5) * lp, rtol=RTOL, atol=ATOL)
  # beta = 0: pure self-play REINFORCE with the ½ control variate; one token: both forms agree.
  np.testing.assert_allclose(online.nash_md_loss(logp, ref, mask, prob, beta=0.0), -(prob - 0.5) * lp,
                             rtol=RTOL, atol=ATOL)
  one = np.ones((B, 1), bool)
  np.testing.assert_allclose(online.nash_md_loss(logp[:, :1], ref[:, :1], one, prob, beta=0.3),
                             online.nash_md_loss(logp[:, :1], ref[:, :1], one, prob, beta=0.3, kl_form="sequence"),
                             rtol=RTOL, atol=ATOL)


def test_nash_md_gradient_is_the_reinforce_direction():
  logp, ref, mask = _tokens(seed=7)
  prob = _prefs(seed=8)
  beta = 0.25
  w = mask.astype(np.float32)
  rho = np.where(mask, logp - ref, 0.0)
  for kl_form, coef in (("token", beta * rho), ("sequence", beta * rho.sum(1, keepdims=True))):
    g = _grads(lambda *a: online.nash_md_loss(*a, beta=beta, kl_form=kl_form), (logp, ref, mask, prob), (0, 1, 3))
    # ∂/∂ℓ_t = w_t·(β·sg(ratio) − (P − ½)): the log-ratio and P are stop-gradient targets.
    np.testing.assert_allclose(g[0], w * (coef - (prob[:, None] - 0.5)), rtol=RTOL, atol=ATOL, err_msg=kl_form)
    np.testing.assert_array_equal(g[1], 0.0)
    np.testing.assert_array_equal(g[2], 0.0)


def test_nash_md_masked_equals_sliced_and_ignores_garbage():
  logp, ref, _ = _tokens(seed=9)
  prob = _prefs(seed=10)
  mask = np.zeros((B, T), bool)
  mask[:, :4] = True
  bad_logp, bad_ref = logp.copy(), ref.copy()
  bad_logp[:, 4:], bad_ref[:, 4:] = -np.inf, np.nan
  for kl_form in online.NASH_MD_KL_FORMS:
    full = online.nash_md_loss(bad_logp, bad_ref, mask, prob, kl_form=kl_form)
    sliced = online.nash_md_loss(logp[:, :4], ref[:, :4], mask[:, :4], prob, kl_form=kl_form)
    np.testing.assert_allclose(full, sliced, rtol=RTOL, atol=ATOL)
    g = _grads(lambda a: online.nash_md_loss(a, bad_ref, mask, prob, kl_form=kl_form), (bad_logp,), 0)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[:, 4:] == 0.0)


# ----------------------------------------------------------------------------- INPO


def np_inpo(pc, pr, rc, rr, tc, tr, eta, tau):
  """ICLR 2025 INPO Algorithm 1 line 5, h_t with τ/η and (η−τ)/η, target 1/(2η)."""
  h = np.log(np.exp(pc) / np.exp(pr)) - tau / eta * (rc - rr) - (eta - tau) / eta * (tc - tr)
  return (h - 1 / (2 * eta)) ** 2


def test_inpo_matches_paper():
  arrays = _seqs(6, seed=11)
  for eta, tau in ((0.005, 0.005 / 3), (0.5, 0.2), (2.0, 0.0), (1.0, 1.0)):  # paper's η, τ = η/3; τ = 0; τ = η
    got = jax.jit(lambda *a: online.inpo_loss(*a, eta=eta, tau=tau))(*arrays)
    np.testing.assert_allclose(got, np_inpo(*arrays, eta, tau), rtol=1e-4, atol=ATOL)


def test_inpo_gradients_and_identities():
  pc, pr, rc, rr, tc, tr = _seqs(6, seed=12)
  eta, tau = 0.8, 0.3
  g = _grads(lambda *a: online.inpo_loss(*a, eta=eta, tau=tau), (pc, pr, rc, rr, tc, tr), tuple(range(6)))
  resid = np.sqrt(np_inpo(pc, pr, rc, rr, tc, tr, eta, tau)) * np.sign(
      (pc - pr) - tau / eta * (rc - rr) - (1 - tau / eta) * (tc - tr) - 1 / (2 * eta))
  np.testing.assert_allclose(g[0], 2 * resid, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(g[1], -2 * resid, rtol=1e-4, atol=1e-4)
  for k in range(2, 6):
    np.testing.assert_array_equal(g[k], 0.0)
  # τ = η anchors on π_ref only: un-normalised IPO with β = η (online IPO with a 0/1 outcome).
  np.testing.assert_allclose(online.inpo_loss(pc, pr, rc, rr, tc, tr, eta=0.4, tau=0.4),
                             online.online_ipo_loss(pc, pr, rc, rr, np.ones(B, np.float32), tau=0.4),
                             rtol=1e-4, atol=1e-4)
  # π_t = π_ref: the anchor is π_ref whatever τ is.
  np.testing.assert_allclose(online.inpo_loss(pc, pr, rc, rr, rc, rr, eta=0.4, tau=0.1),
                             online.inpo_loss(pc, pr, rc, rr, rc, rr, eta=0.4, tau=0.4), rtol=1e-4, atol=1e-4)


def _tabular_game(k=4, seed=13):
  rng = np.random.default_rng(seed)
  p = rng.uniform(0.05, 0.95, (k, k))
  p = np.triu(p, 1)
  p = p + np.tril(1.0 - p.T, -1)
  np.fill_diagonal(p, 0.5)  # P(i ≻ j) + P(j ≻ i) = 1
  pi_ref = rng.dirichlet(np.ones(k))
  pi_t = rng.dirichlet(np.ones(k))
  return p, pi_ref, pi_t


def _pair_grid(k):
  i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
  return i.ravel(), j.ravel()


def test_inpo_population_minimiser_is_the_omd_step():
  """Prop. 6: E_{y,y'~π_t, (y_w,y_l)~P}[INPO] is stationary at π_{t+1} ∝ e^{P(y≻π_t)/η}·π_ref^{τ/η}·π_t^{1−τ/η}."""
  p, pi_ref, pi_t = _tabular_game()
  k = len(pi_t)
  eta, tau = 0.7, 0.2
  log_next = (p @ pi_t) / eta + tau / eta * np.log(pi_ref) + (1 - tau / eta) * np.log(pi_t)
  i, j = _pair_grid(k)
  weight = pi_t[i] * pi_t[j]

  def expected_loss(theta):
    logpi = jax.nn.log_softmax(theta)
    f = lambda w, l: online.inpo_loss(logpi[w], logpi[l], jnp.log(pi_ref)[w], jnp.log(pi_ref)[l],
                                      jnp.log(pi_t)[w], jnp.log(pi_t)[l], eta=eta, tau=tau)
    return jnp.sum(weight * (p[i, j] * f(i, j) + (1 - p[i, j]) * f(j, i)))

  with jax.numpy_rank_promotion("allow"), jax.enable_x64(True):
    theta = jnp.asarray(log_next, jnp.float64)
    g = jax.grad(expected_loss)(theta)
    np.testing.assert_allclose(g, 0.0, atol=1e-10)
    # ... and it is not stationary at the brief's (η·τ, 1 − η·τ, η/2) parametrisation with these η, τ.
    wrong = eta * (p @ pi_t) + eta * tau * np.log(pi_ref) + (1 - eta * tau) * np.log(pi_t)
    assert np.abs(np.asarray(jax.grad(expected_loss)(jnp.asarray(wrong)))).max() > 1e-3


# ----------------------------------------------------------------------------- DNO


def test_dno_matches_paper():
  pc, pr, tc, tr = _seqs(4, seed=14)
  r1, r2 = _prefs(15), _prefs(16)  # win rates r_t(y1), r_t(y2)
  z = np_sig(r1 - r2)
  eta = 0.6
  got = jax.jit(lambda *a: online.dno_loss(*a, eta=eta))(pc, pr, tc, tr, z)
  d = eta * ((pc - tc) - (pr - tr))
  # Eq. (8) with σ(r1 − r2) and σ(r2 − r1) written out (a maximisation there, so the negative here).
  want = -(np_sig(r1 - r2) * np_logsig(d) + np_sig(r2 - r1) * np_logsig(-d))
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  # DNO-Prct (Algorithm 2, Eq. (13)) is DPO with β = η and reference π_t: the z = 1 case.
  np.testing.assert_allclose(online.dno_loss(pc, pr, tc, tr, np.ones(B, np.float32), eta=eta),
                             dpo.sigmoid_loss(pc, pr, tc, tr, beta=eta), rtol=RTOL, atol=ATOL)
  # Swapping the pair and the label leaves the loss unchanged.
  np.testing.assert_allclose(online.dno_loss(pr, pc, tr, tc, 1 - z, eta=eta), got, rtol=RTOL, atol=ATOL)


def test_dno_gradients_and_minimiser():
  pc, pr, tc, tr = _seqs(4, seed=17)
  z = _prefs(18)
  eta = 0.9
  g = _grads(lambda *a: online.dno_loss(*a, eta=eta), (pc, pr, tc, tr, z), (0, 1, 2, 3, 4))
  d = eta * ((pc - tc) - (pr - tr))
  np.testing.assert_allclose(g[0], eta * (np_sig(d) - z), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(g[1], -eta * (np_sig(d) - z), rtol=RTOL, atol=ATOL)
  for k in (2, 3, 4):
    np.testing.assert_array_equal(g[k], 0.0)
  # Each pair is minimised by the soft policy iteration target π ∝ π_t·exp(r_t/η) (Eq. (9)).
  rng = np.random.default_rng(19)
  r1, r2 = rng.uniform(size=B), rng.uniform(size=B)
  pc_star = (tc + r1 / eta - 0.37).astype(np.float32)  # any common log-normaliser
  pr_star = (tr + r2 / eta - 0.37).astype(np.float32)
  g = _grads(lambda a, b: online.dno_loss(a, b, tc, tr, np_sig(r1 - r2).astype(np.float32), eta=eta),
             (pc_star, pr_star), (0, 1))
  np.testing.assert_allclose(g[0], 0.0, atol=1e-6)


# ----------------------------------------------------------------------------- online IPO


def test_online_ipo_matches_egpo():
  pc, pr, rc, rr = _seqs(4, seed=20)
  p = _prefs(21)
  tau = 0.35
  got = jax.jit(lambda *a: online.online_ipo_loss(*a, tau=tau))(pc, pr, rc, rr, p)
  # EGPO ExtragradientTrainer._compute_losses with prefs = (P(y ≻ y'), ½): (Δ − (P − ½)/β)².
  want = (pc - pr - rc + rr - (p - 0.5) / tau) ** 2
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_online_ipo_equals_soft_label_ipo_up_to_a_constant():
  pc, pr, rc, rr = _seqs(4, seed=22)
  p = _prefs(23)
  tau = 0.5
  d = (pc - rc) - (pr - rr)
  c = 1 / (2 * tau)
  soft = p * (d - c) ** 2 + (1 - p) * (d + c) ** 2  # Calandriello et al. soft-label online IPO
  got = online.online_ipo_loss(pc, pr, rc, rr, p, tau=tau)
  np.testing.assert_allclose(np.asarray(got) - soft, -c ** 2 * 4 * p * (1 - p), rtol=1e-4, atol=1e-4)
  g = _grads(lambda *a: online.online_ipo_loss(*a, tau=tau), (pc, pr, rc, rr, p), (0, 1, 2, 3, 4))
  np.testing.assert_allclose(g[0], 2 * (d - (p - 0.5) / tau), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(g[1], -2 * (d - (p - 0.5) / tau), rtol=1e-4, atol=1e-4)
  for k in (2, 3, 4):
    np.testing.assert_array_equal(g[k], 0.0)


def _regularised_nash(p, pi_ref, tau, iters=5000):
  pi = np.full(len(pi_ref), 1.0 / len(pi_ref))
  for _ in range(iters):  # damped fixed point of π ∝ π_ref·exp(P(y ≻ π)/τ)
    target = pi_ref * np.exp((p @ pi) / tau)
    pi = 0.5 * pi + 0.5 * target / target.sum()
  return pi


def test_online_ipo_and_nash_md_are_stationary_at_the_regularised_nash():
  """Calandriello et al. Prop. 4.1/4.2: online IPO and self-play Nash-MD-PG (mixture 0) share the
  stationary point π* ∝ π_ref·exp(P(y ≻ π*)/τ)."""
  p, pi_ref, _ = _tabular_game(seed=24)
  tau = 1.0
  pi_star = _regularised_nash(p, pi_ref, tau)
  assert np.allclose(pi_star, pi_ref * np.exp(p @ pi_star / tau) / (pi_ref * np.exp(p @ pi_star / tau)).sum())
  k = len(pi_star)
  i, j = _pair_grid(k)
  weight = pi_star[i] * pi_star[j]  # y, y' ~ SG[π*]

  def ipo(theta):
    logpi = jax.nn.log_softmax(theta)
    lr = jnp.log(pi_ref)
    return jnp.sum(weight * online.online_ipo_loss(logpi[i], logpi[j], lr[i], lr[j], p[i, j], tau=tau))

  def nash(theta):
    logpi = jax.nn.log_softmax(theta)
    lr = jnp.log(pi_ref)
    ones = jnp.ones((k * k, 1))
    return jnp.sum(weight * online.nash_md_loss(logpi[i][:, None], lr[i][:, None], ones, p[i, j], beta=tau))

  with jax.numpy_rank_promotion("allow"), jax.enable_x64(True):
    theta = jnp.asarray(np.log(pi_star))
    np.testing.assert_allclose(jax.grad(ipo)(theta), 0.0, atol=1e-9)
    np.testing.assert_allclose(jax.grad(nash)(theta), 0.0, atol=1e-9)
    # not stationary elsewhere (e.g. at π_ref)
    assert np.abs(np.asarray(jax.grad(ipo)(jnp.asarray(np.log(pi_ref))))).max() > 1e-3


# ----------------------------------------------------------------------------- win rates


def test_preference_win_rates():
  rng = np.random.default_rng(25)
  k = 5
  pmat = rng.uniform(size=(B, k, k)).astype(np.float32)
  want = np.array([[sum(pmat[b, i, j] for j in range(k) if j != i) / (k - 1) for i in range(k)] for b in range(B)])
  got = jax.jit(online.preference_win_rates)(pmat)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  assert got.shape == (B, k)
  g = jax.grad(lambda x: online.preference_win_rates(x)[:, 0].sum())(jnp.asarray(pmat))
  want_g = np.zeros((B, k, k), np.float32)
  want_g[:, 0, 1:] = 1 / (k - 1)
  np.testing.assert_allclose(g, want_g, rtol=RTOL)
  # A consistent (symmetrised) matrix has mean win rate ½.
  logits = jnp.asarray(rng.normal(size=(B, k, k)).astype(np.float32))
  sym, _ = symmetrize_preference(logits, jnp.swapaxes(logits, -1, -2))
  r = online.preference_win_rates(jax.nn.sigmoid(sym))
  np.testing.assert_allclose(r.mean(-1), 0.5, rtol=1e-5)


# ----------------------------------------------------------------------------- checks


def test_input_validation():
  pc, pr, rc, rr, px, tc = _seqs(6, seed=26)
  p = _prefs()
  logp, ref, mask = _tokens()
  with pytest.raises(ValueError, match="loss_type"):
    online.xpo_loss(pc, pr, rc, rr, px, loss_type="hinge")
  with pytest.raises(ValueError, match="beta"):
    online.xpo_loss(pc, pr, rc, rr, px, beta=0.0)
  with pytest.raises(ValueError, match="alpha"):
    online.xpo_loss(pc, pr, rc, rr, px, alpha=-1.0)
  with pytest.raises(ValueError, match="same shape"):
    online.xpo_loss(pc, pr, rc, rr, px[:3])
  with pytest.raises(ValueError, match="rank 1"):
    online.xpo_loss(pc[None], pr[None], rc[None], rr[None], px[None])
  with pytest.raises(ValueError, match="floating"):
    online.inpo_loss(pc, pr, rc, rr, tc, np.ones(B, np.int32), eta=1.0, tau=0.1)
  with pytest.raises(ValueError, match="eta"):
    online.inpo_loss(pc, pr, rc, rr, tc, tc, eta=0.0, tau=0.0)
  with pytest.raises(ValueError, match="tau"):
    online.inpo_loss(pc, pr, rc, rr, tc, tc, eta=1.0, tau=-0.1)
  with pytest.raises(ValueError, match="tau.*<= `eta`"):
    online.inpo_loss(pc, pr, rc, rr, tc, tc, eta=0.1, tau=0.2)
  with pytest.raises(ValueError, match="eta"):
    online.dno_loss(pc, pr, rc, rr, p, eta=-1.0)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    online.dno_loss(pc, pr, rc, rr, p + 1.0, eta=1.0)
  with pytest.raises(ValueError, match="tau"):
    online.online_ipo_loss(pc, pr, rc, rr, p, tau=0.0)
  with pytest.raises(ValueError, match="same shape"):
    online.online_ipo_loss(pc, pr, rc, rr, p[:2], tau=1.0)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    online.online_ipo_loss(pc, pr, rc, rr, np.full(B, np.nan, np.float32), tau=1.0)
  with pytest.raises(ValueError, match="kl_form"):
    online.nash_md_loss(logp, ref, mask, p, kl_form="k3")
  with pytest.raises(ValueError, match="beta"):
    online.nash_md_loss(logp, ref, mask, p, beta=-0.1)
  with pytest.raises(ValueError, match="rank 2"):
    online.nash_md_loss(logp[0], ref[0], mask[0], p)
  with pytest.raises(ValueError, match="same shape"):
    online.nash_md_loss(logp, ref, mask[:, :2], p)
  with pytest.raises(ValueError, match="same shape"):
    online.nash_md_loss(logp, ref, mask, p[:3])
  with pytest.raises(ValueError, match="K >= 2"):
    online.preference_win_rates(np.ones((B, 1, 1), np.float32))
  with pytest.raises(ValueError, match="K >= 2"):
    online.preference_win_rates(np.ones((B, 2, 3), np.float32))
  with pytest.raises(ValueError, match="rank 3"):
    online.preference_win_rates(np.ones((2, 2), np.float32))
  # Traced hyper-parameters and preferences skip the concrete-value checks and still run.
  out = jax.jit(lambda e, t, q: online.inpo_loss(pc, pr, rc, rr, tc, tc, eta=e, tau=t)
                + online.online_ipo_loss(pc, pr, rc, rr, q, tau=t + 1.0))(1.0, 0.5, p)
  assert out.shape == (B,) and np.all(np.isfinite(out))


def test_bfloat16_inputs_keep_their_dtype():
  pc, pr, rc, rr, tc, tr = (jnp.asarray(x, jnp.bfloat16) for x in _seqs(6, seed=27))
  p = jnp.asarray(_prefs(), jnp.bfloat16)
  assert online.xpo_loss(pc, pr, rc, rr, pc).dtype == jnp.bfloat16
  assert online.inpo_loss(pc, pr, rc, rr, tc, tr, eta=1.0, tau=0.5).dtype == jnp.bfloat16
  assert online.dno_loss(pc, pr, tc, tr, p, eta=1.0).dtype == jnp.bfloat16
  assert online.online_ipo_loss(pc, pr, rc, rr, p, tau=1.0).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- registry, docs

NAMES = {
    "xpo": online.xpo_loss, "nash_md": online.nash_md_loss, "inpo": online.inpo_loss,
    "dno": online.dno_loss, "online_ipo": online.online_ipo_loss,
    "preference_win_rates": online.preference_win_rates,
}


def test_registry_and_exports():
  for name, fn in NAMES.items():
    assert losses.get(name) is fn, name
    e = losses.info(name)
    assert e.kind == "online" and e.formula and e.reference and "arXiv:" in e.reference, name
    assert getattr(losses, fn.__name__) is fn and fn.__name__ in losses.__all__
  assert set(online.__all__) == {fn.__name__ for fn in NAMES.values()}
  page = docs.render()
  assert "## Online and Nash preference objectives" in page
  for name in NAMES:
    assert f"| `{name}` |" in page


def test_docstring_examples():
  result = doctest.testmod(online, extraglobs={"jnp": jnp, "np": np}, verbose=False)
  assert result.attempted >= 6 and result.failed == 0
