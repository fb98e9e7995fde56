"""The online preference loop: sampling, judges, pairing, precomputed log-probs, resume, learning."""

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import data, models, run
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.train import iterative, online_preference as op, state as state_lib, step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = models.get_config("tiny")
SEQ = 20


@pytest.fixture(scope="module")
def tiny():
  model = models.create_model(CFG, seed=0)
  graphdef, params = nnx.split(model)
  ref = nnx.split(models.create_model(CFG, seed=1))[1]
  _SHARED["sampler"] = op.make_sampler(graphdef, max_new_tokens=8, temperature=1.0, eos_id=data.EOS_ID)
  _SHARED["logps"] = op.make_sequence_logps_fn(graphdef)
  return graphdef, params, ref


_SHARED = {}  # one compiled sampler and log-prob program for the module


def _prompts(n, seed=0):
  rng = np.random.default_rng(seed)
  raw = [(data.DIGIT_IDS[0] + rng.integers(0, 10, size=int(rng.integers(3, 6)))).astype(np.int32) for _ in range(n)]
  return [data.make_prompt(p) for p in raw], [np.concatenate([np.sort(p), [data.EOS_ID]]).astype(np.int32)
                                               for p in raw]


def _sum_judge():
  # Completions with the larger token sum win: a rule with a known ordering.
  return op.RewardJudge(lambda prompts, comps: [float(np.sum(c)) for c in comps])


def test_pairings_against_brute_force():
  s = np.array([[0.1, 0.9, 0.5], [0.3, 0.3, 0.3], [2.0, -1.0, 0.0]])
  assert op.best_vs_worst(s) == [(0, 1, 0), (2, 0, 1)]  # the all-tied prompt gives no pair
  assert op.best_vs_worst(s, min_margin=1.0) == [(2, 0, 1)]
  brute = [(b, i, j) for b in range(3) for i in range(3) for j in range(3) if s[b, i] > s[b, j]]
  assert sorted(op.all_pairs(s)) == sorted(brute)
  pairs = op.rso_pairs(np.array([[0.0, 3.0, 1.0, 2.0]]), jax.random.PRNGKey(0), beta=100.0, num_samples=4)
  scores = np.array([[0.0, 3.0, 1.0, 2.0]])
  assert pairs and all(scores[0, c] > scores[0, r] for _, c, r in pairs)


def test_preference_judge_win_rates_and_symmetry():
  rng = np.random.default_rng(0)
  raw = rng.random((2, 4, 4))  # an asymmetric, position-biased "model": P(a ≻ b) = raw[b, a, b]

  def pm(prompts, a, b):
    return [raw[int(p[0]), int(x[0]), int(y[0])] for p, x, y in zip(prompts, a, b)]

  judge = op.PreferenceJudge(pm)
  prompts = [np.array([0]), np.array([1])]
  samples = [[np.array([k]) for k in range(4)] for _ in range(2)]
  wins = judge.scores(prompts, samples)
  sym = 0.5 * (raw + 1 - np.swapaxes(raw, 1, 2))
  expect = np.array([[np.mean([sym[b, x, y] for y in range(4) if y != x]) for x in range(4)] for b in range(2)])
  np.testing.assert_allclose(wins, expect, rtol=1e-6)
  np.testing.assert_allclose(wins.sum(-1), 2.0, rtol=1e-6)  # K/2: each pair hands out one win in total
  rj = op.RewardJudge(lambda p, c: [float(x[0]) for x in c], temperature=2.0)
  np.testing.assert_allclose(rj.preference(prompts, [np.array([3])] * 2, [np.array([1])] * 2),
                             [1 / (1 + np.exp(-1.0))] * 2, rtol=1e-6)


def test_mixture_with_alpha_zero_samples_the_policy(tiny):
  graphdef, params, ref = tiny
  sampler = op.make_sampler(graphdef, max_new_tokens=6, temperature=1.0, eos_id=None)
  prompts, _ = _prompts(3)
  a = sampler(params, prompts, 2, jax.random.PRNGKey(3))
  b = sampler(params, prompts, 2, jax.random.PRNGKey(3), mix_params=ref, mix_alpha=0.0)
  c = sampler(params, prompts, 2, jax.random.PRNGKey(3), mix_params=ref, mix_alpha=1.0)
  d = sampler(ref, prompts, 2, jax.random.PRNGKey(3))
  assert a.tokens_BxKxN.shape == (3, 2, 6)
  np.testing.assert_array_equal(a.tokens_BxKxN, b.tokens_BxKxN)
  np.testing.assert_array_equal(c.tokens_BxKxN, d.tokens_BxKxN)  # α = 1: the reference alone


def test_sequence_logps_match_a_full_forward(tiny):
  graphdef, params, _ = tiny
  prompts, golds = _prompts(5)
  rows = op.completion_rows(prompts, golds, seq_len=SEQ)
  seq, tok = op.make_sequence_logps_fn(graphdef, chunk=2)(params, rows)
  logits = nnx.merge(graphdef, params)(jnp.asarray(rows["input_ids"]))
  logits = logits[0] if isinstance(logits, tuple) else logits
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.asarray(rows["targets"])[..., None], -1)[..., 0]
  expect = np.asarray((lp * rows["loss_mask"]).sum(-1))
  np.testing.assert_allclose(seq, expect, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tok.sum(-1), seq, rtol=1e-6, atol=1e-6)
  assert rows["loss_mask"].sum(-1).tolist() == [len(g) for g in golds]  # the loss covers the completion only


def _make_data(tiny, algorithm, *, judge=None, **over):
  graphdef, params, ref = tiny
  cfg = op.online_config(algorithm, **over)
  return op.make_preference_data(
      cfg, prompts_fn=lambda it: _prompts(4, seed=it), sampler=_SHARED["sampler"], judge=judge or _sum_judge(),
      logps_fn=_SHARED["logps"], seq_len=SEQ, ref_params=ref, seed=0, prompt_length=8)


class _State:
  def __init__(self, params):
    self.params = params


def test_iteration_data_per_algorithm(tiny):
  graphdef, params, ref = tiny
  st = _State(params)
  logps = _SHARED["logps"]
  a = _make_data(tiny, "iterative_dpo")(st, 0)
  b = _make_data(tiny, "iterative_dpo")(st, 0)
  for k in a.arrays:  # deterministic in (state, iteration): a killed run regenerates the same rows
    np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
  assert a.metrics["pairs"] == iterative.num_rows(a.arrays) > 0
  # Chosen rows are the judge's favourites, and the iteration reference is the sampling policy.
  total = lambda side: (a.arrays[f"{side}_targets_BxT"] * a.arrays[f"{side}_loss_mask_BxT"]).sum(-1)
  assert (total("chosen") > total("rejected")).all()
  chosen = {k[len("chosen_"):-len("_BxT")]: v for k, v in a.arrays.items() if k.startswith("chosen_")}
  np.testing.assert_allclose(a.arrays["ref_chosen_logps_B"], logps(params, chosen)[0], rtol=1e-6)
  # online DPO: the fixed reference's log-probs.
  o = _make_data(tiny, "online_dpo")(st, 0)
  oc = {k[len("chosen_"):-len("_BxT")]: v for k, v in o.arrays.items() if k.startswith("chosen_")}
  np.testing.assert_allclose(o.arrays["ref_chosen_logps_B"], logps(ref, oc)[0], rtol=1e-6)
  # SPIN: every sample is paired against the gold answer, which is the chosen side.
  s = _make_data(tiny, "spin")(st, 0)
  _, golds = _prompts(4, seed=0)
  assert iterative.num_rows(s.arrays) == 4
  for targets, mask, gold in zip(s.arrays["chosen_targets_BxT"], s.arrays["chosen_loss_mask_BxT"], golds):
    assert targets[mask > 0].tolist() == gold.tolist()
  # XPO: the policy's sample against the reference's; the reference's is the exploration row.
  x = _make_data(tiny, "xpo")(st, 0)
  assert "explore_input_ids_BxT" in x.arrays and iterative.num_rows(x.arrays) == 4
  # INPO keeps π_t's log-probs next to the fixed reference's.
  i = _make_data(tiny, "inpo")(st, 0)
  ic = {k[len("chosen_"):-len("_BxT")]: v for k, v in i.arrays.items() if k.startswith("chosen_")}
  np.testing.assert_allclose(i.arrays["prev_chosen_logps_B"], logps(params, ic)[0], rtol=1e-6)
  np.testing.assert_allclose(i.arrays["ref_chosen_logps_B"], logps(ref, ic)[0], rtol=1e-6)
  # Self-judges: the chosen side has the higher implicit reward (DICE) / normalised likelihood (Sharpening).
  side = lambda d, name: {k[len(name) + 1:-len("_BxT")]: v for k, v in d.arrays.items()
                          if k.startswith(name + "_") and k.endswith("_BxT")}
  dc = _make_data(tiny, "dice")(st, 0)
  imp = lambda rows: logps(params, rows)[0] - logps(ref, rows)[0]
  assert (imp(side(dc, "chosen")) > imp(side(dc, "rejected"))).all()
  sh = _make_data(tiny, "sharpening")(st, 0)
  norm = lambda rows: logps(params, rows)[0] / rows["loss_mask"].sum(-1)
  assert (norm(side(sh, "chosen")) > norm(side(sh, "rejected"))).all()
  # Nash-MD: a probability per pair and the reference's token log-probs of the policy's sample.
  n = _make_data(tiny, "nash_md")(st, 0)
  assert ((n.arrays["preference_B"] >= 0) & (n.arrays["preference_B"] <= 1)).all()
  np.testing.assert_allclose(n.arrays["ref_chosen_token_logps_BxT"].sum(-1), n.arrays["ref_chosen_logps_B"],
                             rtol=1e-5, atol=1e-5)
  assert 0.0 <= n.metrics["win_rate_vs_opponent"] <= 1.0


# One preset per objective and data path (the other dpo presets' rows are checked in test_iteration_data_per_algorithm).
@pytest.mark.parametrize("algorithm", ["online_dpo", "rso", "dno", "xpo", "inpo", "nash_md", "egpo"])
def test_every_preset_trains_its_objective(tiny, algorithm):
  """Each objective trains on its preset's rows: a finite loss with a non-zero gradient."""
  graphdef, params, _ = tiny
  judge = None
  if algorithm in ("dno", "nash_md"):
    judge = op.PreferenceJudge(lambda p, a, b: [float(np.sum(x) > np.sum(y)) * 0.8 + 0.1 for x, y in zip(a, b)])
  d = _make_data(tiny, algorithm, judge=judge)(_State(params), 0)
  assert iterative.num_rows(d.arrays) > 0, d.metrics
  loss_fn = op.make_online_loss(op.OBJECTIVES[algorithm], beta=0.5)
  batch = jax.tree.map(jnp.asarray, d.arrays)

  def f(p):
    return loss_fn(nnx.merge(graphdef, p), batch, None)

  (loss, aux), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  gnorm = optax.tree.norm(grads)
  assert np.isfinite(float(loss)) and float(gnorm) > 0, (algorithm, loss, gnorm)
  assert f"loss/{op.OBJECTIVES[algorithm]}" in aux or "loss/sigmoid" in aux


def test_extragradient_iterations_are_the_extragradient_method():
  """With SGD, two loop iterations per EGPO step give θ_{t+1} = θ_t − η·∇f(θ_t − η·∇f(θ_t))."""
  a = jnp.array([[2.0, 1.0], [0.0, 3.0]])
  grad = lambda w: a.T @ (a @ w - jnp.array([1.0, -1.0]))
  eta, w0 = 0.05, jnp.array([0.3, -0.2])
  state = state_lib.TrainState(step=0, params=w0, opt_state=None, rng=None, nonfinite_streak=0, nonfinite_total=0,
                               extras=op.extragradient_extras(w0))
  for it in range(6):  # 3 extragradient steps
    state = op.extragradient_begin(state, it)
    state = state._replace(params=state.params - eta * grad(state.params))
  state = op.extragradient_begin(state, 6)
  w = w0
  for _ in range(3):
    w = w - eta * grad(w - eta * grad(w))
  np.testing.assert_allclose(state.params, w, rtol=1e-6)


def test_bad_presets_are_clear_errors():
  with pytest.raises(ValueError, match="algorithm='nope'"):
    op.online_config("nope")
  with pytest.raises(ValueError, match="pairing='opponent'"):
    op.online_config("online_dpo", pairing="opponent")
  with pytest.raises(ValueError, match="source="):
    op.online_config("online_dpo", source="teacher")


def _pair_step(graphdef, params, lr=1e-2):
  """A fresh DPO train state; the jitted step is built once for the module (one compilation)."""
  tx = optax.adam(lr)
  model = nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), params))
  graphdef, state, _ = state_lib.create_train_state(model, tx, seed=0)
  if "step" not in _SHARED:
    _SHARED["step"] = step_lib.make_train_step(op.make_online_loss("dpo", beta=0.5), tx, graphdef)
  return state, _SHARED["step"]


def _run(tiny, workdir, *, num_iterations, step_wrapper=None):
  graphdef, params, _ = tiny
  state, step = _pair_step(graphdef, params)
  if step_wrapper is not None:
    step = step_wrapper(step)
  ck = Checkpointer(os.path.join(workdir, "ck"), max_to_keep=2, async_save=False)
  try:
    return iterative.run_iterations(
        state=state, step_fn=step, make_data=_make_data(tiny, "iterative_dpo", num_samples=3),
        num_iterations=num_iterations, batch_size=2, epochs=2.0, workdir=workdir, checkpointer=ck,
        checkpoint_every=2, progress=False)
  finally:
    ck.close()


def test_resume_mid_iteration_reproduces_an_uninterrupted_run(tiny, tmp_path):
  full = _run(tiny, str(tmp_path / "full"), num_iterations=3)
  calls = {"n": 0}

  def dies_at(n):
    def wrap(step):
      def inner(state, batch):
        calls["n"] += 1
        if calls["n"] == n:
          raise RuntimeError("killed")
        return step(state, batch)
      return inner
    return wrap

  with pytest.raises(RuntimeError, match="killed"):
    _run(tiny, str(tmp_path / "cut"), num_iterations=3, step_wrapper=dies_at(5))
  calls["n"] = 0

  def sigterm_at(n):
    def wrap(step):
      def inner(state, batch):
        calls["n"] += 1
        if calls["n"] == n:
          os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop: it saves and returns
        return step(state, batch)
      return inner
    return wrap

  stopped = _run(tiny, str(tmp_path / "cut"), num_iterations=3, step_wrapper=sigterm_at(3))
  assert stopped.preempted and stopped.signum == signal.SIGTERM
  resumed = _run(tiny, str(tmp_path / "cut"), num_iterations=3)
  assert not resumed.preempted
  assert int(resumed.state.step) == int(full.state.step)
  for a, b in zip(jax.tree.leaves(full.state.params), jax.tree.leaves(resumed.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = [json.loads(line) for line in open(tmp_path / "cut" / "metrics.jsonl")]
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == sorted(set(steps)) == list(range(1, int(full.state.step) + 1))  # no step logged twice


# ----------------------------------------------------------------------------- learning (runlocal size)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
  """One SFT stage shared by the learning tests (each copies it into its workdir and resumes it, complete)."""
  module, _ = run.load_experiment(os.path.join(REPO, "experiments", "online_dpo_tiny.py"))
  config = module.get_config("runlocal")
  run.apply_overrides(config, [("progress", "false")])
  work = tmp_path_factory.mktemp("sft")
  from rlhf_jax import parallel

  module.sft_stage(config, parallel.make_mesh(dict(config.mesh)), str(work))
  return work / "sft"


def _experiment(name, tmp_path, sft_dir, overrides=()):
  module, _ = run.load_experiment(os.path.join(REPO, "experiments", name))
  config = module.get_config("runlocal")
  run.apply_overrides(config, [("progress", "false"), *overrides])
  shutil.copytree(sft_dir, tmp_path / "sft")
  result = module.main(config, str(tmp_path))
  with open(tmp_path / "result.json") as f:
    return result, json.load(f)


def test_online_dpo_learns_and_beats_offline_dpo_on_as_many_pairs(tmp_path, sft_dir):
  """The online/offline gap at small scale (measured at runlocal: ascending 0.34 -> 0.52 online, -> 0.43 offline)."""
  once = [("eval.every", "100")]  # evaluate after the last iteration only (training does not depend on it)
  _, on = _experiment("online_dpo_tiny.py", tmp_path / "online", sft_dir, once)
  _, off = _experiment("online_dpo_tiny.py", tmp_path / "offline", sft_dir, [*once, ("online.source", "reference")])
  assert on["headline"]["before"] == off["headline"]["before"]  # the same SFT model
  assert on["headline"]["after"] >= on["headline"]["before"] + 0.1, on["headline"]
  assert on["pairs_total"] <= off["pairs_total"] * 1.1, (on["pairs_total"], off["pairs_total"])
  assert on["headline"]["after"] > off["headline"]["after"], (on["headline"], off["headline"])
  assert on["win_rate_vs_sft"] > 0.5


def test_spin_raises_the_gold_margin_over_its_own_samples(tmp_path, sft_dir):
  _, r = _experiment("spin_tiny.py", tmp_path, sft_dir)
  margins = [r["gold_margin_sft"], *r["gold_margin_per_eval"]]
  assert len(margins) == 4 and all(b > a for a, b in zip(margins, margins[1:])), margins
  assert r["headline"]["after"] > r["headline"]["before"], r["headline"]


def test_nash_md_raises_its_win_rate_against_the_reference(tmp_path, sft_dir):
  _, r = _experiment("nash_md_tiny.py", tmp_path, sft_dir, [("eval.every", "100")])
  assert r["win_rate_vs_sft"] > 0.55, r  # 0.5 at the start: the policy is the reference
  assert r["headline"]["after"] > r["headline"]["before"], r["headline"]
