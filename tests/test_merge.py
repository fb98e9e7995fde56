"""rlhf_jax.merge: golden values against NumPy, sharded equals unsharded, shardings kept, the CLI."""

import doctest
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import merge, models
from rlhf_jax.merge import averaging, cli, methods
from rlhf_jax.models import hf
from rlhf_jax.models import init as models_init
from rlhf_jax.parallel import make_mesh, state_shardings

RNG = np.random.default_rng(0)


def _tree(seed, shapes=((3, 4), (5,), (2, 3, 2))):
  r = np.random.default_rng(seed)
  return {f"p{i}": r.normal(size=s).astype(np.float32) for i, s in enumerate(shapes)}


def _params(cfg, seed, scale=0.05):
  """A random ``nnx.State`` of the model's parameters (NumPy leaves: no init compiled or run)."""
  r = np.random.default_rng(seed)
  abstract = nnx.state(models_init.abstract_model(cfg), nnx.Param)
  return jax.tree.map(lambda a: (scale * r.normal(size=a.shape)).astype(np.float32), abstract)


def _model(cfg, params):
  graphdef, _ = nnx.split(models_init.abstract_model(cfg))
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


def _close(a, b, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=atol)


# NumPy references (independent of the JAX code) ----------------------------------------------------


def np_trim(d, density):
  k = int(density * d.size)
  keep = np.zeros(d.size, bool)
  keep[np.argsort(-np.abs(d).ravel(), kind="stable")[:k]] = True  # ties: lowest flat index first
  return np.where(keep.reshape(d.shape), d, 0.0)


def np_ties(base, ms, density, lam):
  out = {}
  for n, b in base.items():
    t = np.stack([np_trim(m[n] - b, density) for m in ms])
    sign = np.where(t.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(t) == sign
    out[n] = b + lam * (t * agree).sum(0) / np.maximum(agree.sum(0), 1)
  return out


def np_slerp(a, b, t):
  ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
  dot = float(np.sum(ua * ub))
  if abs(dot) > 0.9995:
    return (1 - t) * a + t * b
  om = np.arccos(dot)
  return np.sin((1 - t) * om) / np.sin(om) * a + np.sin(t * om) / np.sin(om) * b


# Golden values ----------------------------------------------------------------------------------------


def test_linear_golden():
  ms = [_tree(s) for s in (1, 2, 3)]
  w = [0.5, 1.0, 2.5]
  want = {n: sum(wi * m[n] for wi, m in zip(w, ms)) / sum(w) for n in ms[0]}
  _close(merge.linear(ms, w), want)
  _close(merge.linear(ms, w, normalize=False), {n: sum(wi * m[n] for wi, m in zip(w, ms)) for n in ms[0]})
  _close(merge.linear(ms), {n: np.mean([m[n] for m in ms], 0) for n in ms[0]})


def test_task_arithmetic_golden():
  base, ms = _tree(0), [_tree(1), _tree(2)]
  _close(merge.task_arithmetic(base, ms, 0.3), {n: base[n] + 0.3 * sum(m[n] - base[n] for m in ms) for n in base})
  _close(merge.task_arithmetic(base, ms, [1.0, -2.0]),
         {n: base[n] + (ms[0][n] - base[n]) - 2.0 * (ms[1][n] - base[n]) for n in base})
  # λ = 1/M is the uniform soup.
  _close(merge.task_arithmetic(base, ms, 0.5), merge.linear(ms))


@pytest.mark.parametrize("density,lam", [(0.3, 1.0), (0.7, 0.6), (1.0, 1.0)])
def test_ties_golden(density, lam):
  base, ms = _tree(0), [_tree(s) for s in (1, 2, 3)]
  _close(merge.ties(base, ms, density=density, lam=lam), np_ties(base, ms, density, lam))


def test_ties_magnitude_ties_and_sign_election_are_deterministic():
  base = {"w": np.zeros(6, np.float32)}
  # Model 0: four entries tied at |1|; k = int(0.5 * 6) = 3 keeps the first three of them (row-major).
  m0 = {"w": np.array([1.0, -1.0, 1.0, -1.0, 0.5, 0.0], np.float32)}
  # Model 1 keeps |4|, |2|, and the first |1| (index 1); at index 1 the trimmed sum is -1 + 1 = 0 -> +1 wins.
  m1 = {"w": np.array([0.0, 1.0, 0.0, 1.0, -4.0, 2.0], np.float32)}
  np.testing.assert_array_equal(np.asarray(merge.trim_top_k(jnp.asarray(m0["w"]), density=0.5)),
                                [1.0, -1.0, 1.0, 0.0, 0.0, 0.0])
  out = np.asarray(merge.ties(base, [m0, m1], density=0.5)["w"])
  np.testing.assert_array_equal(out, [1.0, 1.0, 1.0, 0.0, -4.0, 2.0])
  np.testing.assert_array_equal(out, np_ties(base, [m0, m1], 0.5, 1.0)["w"])
  # 2-D tie breaking is row-major, the same under jit.
  x = jnp.array([[2.0, 1.0], [1.0, 1.0]])
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: merge.trim_top_k(x, density=0.5))(x)),
                                [[2.0, 1.0], [0.0, 0.0]])


def test_dare_with_its_fixed_masks_and_identities():
  base, ms = _tree(0, ((64, 32), (50,))), [_tree(s, ((64, 32), (50,))) for s in (1, 2)]
  key, p, lam = jax.random.key(7), 0.6, 0.8
  masks = merge.dare_masks(base, 2, p=p, key=key)
  np_masks = [{n: np.asarray(mk[n]) for n in base} for mk in masks]
  want = {n: base[n] + lam * sum(mk[n] * (m[n] - base[n]) / (1 - p) for mk, m in zip(np_masks, ms)) for n in base}
  got = merge.dare(base, ms, p=p, key=key, lam=lam)
  _close(got, want)
  _close(merge.dare(base, ms, p=p, key=key, lam=lam), got, atol=0)  # deterministic
  keep = np_masks[0]["p0"]
  assert abs(1 - keep.mean() - p) < 0.05  # the drop rate
  assert (np_masks[0]["p0"] != np_masks[1]["p0"]).mean() > 0.3  # a mask per model
  assert (np_masks[0]["p0"].ravel()[:50] != np_masks[0]["p1"]).mean() > 0.3  # and per leaf
  # drop_and_rescale: the same mask for the same key; the mean is kept.
  d = jnp.asarray(ms[0]["p0"] - base["p0"])
  np.testing.assert_allclose(np.asarray(merge.drop_and_rescale(d, p=p, key=jax.random.key(3))),
                             np.where(np.asarray(jax.random.bernoulli(jax.random.key(3), 1 - p, d.shape)),
                                      np.asarray(d) / (1 - p), 0.0), rtol=1e-6)
  with pytest.raises(ValueError, match="drop rate p must be in"):
    merge.dare(base, ms, p=1.0, key=key)


def test_slerp_at_0_half_1_and_colinear_fallback():
  a, b = _tree(1), _tree(2)
  _close(merge.slerp(a, b, 0.0), a)
  _close(merge.slerp(a, b, 1.0), b)
  _close(merge.slerp(a, b, 0.5), {n: np_slerp(a[n], b[n], 0.5) for n in a})
  _close(merge.slerp(a, b, 0.25), {n: np_slerp(a[n], b[n], 0.25) for n in a})
  # Equal-norm endpoints: the midpoint keeps the norm (not the shrunken linear midpoint).
  u = {"w": np.array([1.0, 0.0], np.float32)}
  v = {"w": np.array([0.0, 1.0], np.float32)}
  np.testing.assert_allclose(np.linalg.norm(np.asarray(merge.slerp(u, v, 0.5)["w"])), 1.0, rtol=1e-6)
  # Colinear (b = 3a): linear interpolation.
  c = {n: 3 * x for n, x in a.items()}
  _close(merge.slerp(a, c, 0.3), {n: 0.7 * a[n] + 0.3 * c[n] for n in a})


def test_layer_index_names():
  assert merge.layer_index("layers.3.attn.wq") == 3
  assert merge.layer_index("model.layers.12.mlp.up_proj.weight") == 12
  assert merge.layer_index("params.layers_2.kernel") == 2
  assert merge.layer_index("embed") == 0 and merge.layer_index("model.embed_tokens.weight") == 0
  assert merge.layer_index("final_norm.scale") == -1 and merge.layer_index("lm_head.weight") == -1


def test_lines_per_layer_on_the_model_state():
  cfg = models.get_config("tiny", num_layers=4)
  base, ft = _params(cfg, 0), _params(cfg, 1)
  alpha, beta = 0.2, 0.6
  out = merge.lines(base, ft, alpha=alpha, beta=beta, num_layers=4)
  flat_b, flat_f, flat_o = (dict(nnx.to_flat_state(s)) for s in (base, ft, out))
  seen = set()
  for path, var in flat_b.items():
    name = ".".join(map(str, path))
    layer = path[1] if path[0] == "layers" else (0 if path[0] == "embed" else 3)
    seen.add(layer)
    b, f = np.asarray(var.get_value()), np.asarray(flat_f[path].get_value())
    assert merge.layer_index(name) % 4 == layer
    scale = alpha + beta * layer / 3
    np.testing.assert_allclose(np.asarray(flat_o[path].get_value()), b + scale * (f - b), rtol=1e-5, atol=1e-6,
                               err_msg=name)
  assert seen == {0, 1, 2, 3}
  # α = 1, β = 0 is the fine-tuned model; a custom layer_of is honoured.
  _close(merge.lines(base, ft, alpha=1.0, beta=0.0, num_layers=4), ft)
  _close(merge.lines(base, ft, alpha=0.0, beta=1.0, num_layers=4, layer_of=lambda n: 0), base)
  with pytest.raises(ValueError, match="layer 7, outside"):
    merge.lines(base, ft, alpha=0.0, beta=1.0, num_layers=4, layer_of=lambda n: 7)


def test_mismatched_pytrees_name_the_parameter():
  base, m = _tree(0), _tree(1)
  bad = dict(m, p1=np.zeros(6, np.float32))
  with pytest.raises(ValueError, match=r"ties: parameter p1 has shape \(6,\) in model 0 but \(5,\) in the base"):
    merge.ties(base, [bad], density=0.5)
  with pytest.raises(ValueError, match="parameter p2 is in the base but not in model 1"):
    merge.task_arithmetic(base, [m, {k: v for k, v in m.items() if k != "p2"}])
  with pytest.raises(ValueError, match="keeps no entry of parameter p1"):
    merge.ties(base, [m], density=0.1)


def test_averagers_golden_under_jit_and_eval_shape():
  params = [_tree(s) for s in range(5)]
  avg = merge.ema(0.9)
  step = jax.jit(avg.update)
  state = avg.init(params[0])
  want = {n: x.copy() for n, x in params[0].items()}
  for p in params[1:]:
    state = step(p, state)
    want = {n: 0.9 * want[n] + 0.1 * p[n] for n in want}
  _close(state.average, want)
  assert int(state.count) == 4
  rm = merge.running_mean()
  s = rm.init(params[0])
  for p in params[1:]:
    s = jax.jit(rm.update)(p, s)
  _close(s.average, {n: np.mean([p[n] for p in params], 0) for n in params[0]})
  abstract = jax.eval_shape(avg.init, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params[0]))
  assert abstract.average["p0"].dtype == jnp.bfloat16
  assert merge.ema(0.5, dtype=jnp.float32).init({"w": jnp.ones(2, jnp.bfloat16)}).average["w"].dtype == jnp.float32
  with pytest.raises(ValueError, match="decay must be in"):
    merge.ema(1.5)


@pytest.mark.parametrize("module", [methods, averaging], ids=lambda m: m.__name__)
def test_docstring_examples(module):
  result = doctest.testmod(module, extraglobs={"jnp": jnp, "np": np}, verbose=False)
  assert result.attempted > 0 and result.failed == 0


# Sharded equals unsharded; shardings kept -------------------------------------------------------------


def test_sharded_merge_equals_unsharded_and_keeps_shardings():
  assert jax.device_count() == 8
  mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  cfg = models.get_config("tiny")
  # A slice of the model's parameters (to keep compiles few): vocab x embed, heads, a replicated norm.
  keep = ("embed", "layers.0.attn.wq", "layers.1.mlp_norm.scale")
  shardings = dict(nnx.to_flat_state(state_shardings(nnx.state(models_init.abstract_model(cfg), nnx.Param), mesh)))
  host, sharded = [], []
  for seed in (0, 1, 2):
    flat = {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(_params(cfg, seed))}
    host.append({n: flat[n] for n in keep})
    sh = {".".join(map(str, k)): v for k, v in shardings.items()}
    sharded.append({n: jax.device_put(flat[n], sh[n].get_value() if hasattr(sh[n], "get_value") else sh[n])
                    for n in keep})
  assert sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded[0])) == 2
  key = jax.random.key(0)
  cases = {
      "linear": lambda b, ms: merge.linear(ms, [1.0, 2.0]),
      "task_arithmetic": lambda b, ms: merge.task_arithmetic(b, ms, 0.7),
      "ties": lambda b, ms: merge.ties(b, ms, density=0.4, lam=0.9),
      "dare": lambda b, ms: merge.dare(b, ms, p=0.5, key=key),
      "slerp": lambda b, ms: merge.slerp(b, ms[0], 0.4),
      "lines": lambda b, ms: merge.lines(b, ms[0], alpha=0.3, beta=0.5, num_layers=cfg.num_layers),
      "lines_in_jit": lambda b, ms: jax.jit(
          lambda b, m: merge.lines(b, m, alpha=0.3, beta=0.5, num_layers=2))(b, ms[0]),
      "ema": lambda b, ms: jax.jit(merge.ema(0.8).update)(ms[0], merge.ema(0.8).init(b)).average,
  }
  for name, fn in cases.items():
    got = fn(sharded[0], sharded[1:])
    want = fn(host[0], host[1:])
    ref = sharded[1] if name == "linear" else sharded[0]
    for g, w, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(ref)):
      if name in ("ema", "lines_in_jit"):  # jitted by the caller: an equivalent sharding (P() may read P(None,))
        assert g.sharding.is_equivalent_to(r.sharding, g.ndim), name
      else:
        assert g.sharding == r.sharding, name
      np.testing.assert_allclose(np.asarray(jax.device_get(g)), np.asarray(w), rtol=1e-5, atol=1e-6, err_msg=name)


# The command ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("merge_cli")
  cfg = models.get_config("tiny")
  base = _params(cfg, 0)
  dirs = {"base": str(root / "base")}
  hf.export_hf(_model(cfg, base), None, dirs["base"])
  for i, seed in enumerate((1, 2)):
    ft = jax.tree.map(lambda a, b: a + b, base, _params(cfg, seed, scale=0.01))
    dirs[f"ft{i}"] = str(root / f"ft{i}")
    hf.export_hf(_model(cfg, ft), None, dirs[f"ft{i}"])
  bad = cfg.replace(intermediate_size=96)
  dirs["bad"] = str(root / "bad")
  hf.export_hf(_model(bad, _params(bad, 0)), None, dirs["bad"])
  return root, dirs


def _read(d):
  return {n: np.asarray(x) for n, x in hf.iter_safetensors(os.path.join(d, "model.safetensors"))}


def test_cli_round_trip_ties_and_lines(hf_dirs):
  root, d = hf_dirs
  out = str(root / "ties_out")
  assert cli.main(["--method", "ties", "--base", d["base"], "--models", f"{d['ft0']},{d['ft1']}", "--out", out,
                   "--density", "0.5", "--lam", "0.8"]) == 0
  base, ms = _read(d["base"]), [_read(d["ft0"]), _read(d["ft1"])]
  _close(_read(out), np_ties(base, ms, 0.5, 0.8))
  # The output is a loadable HF directory (config copied from the base).
  merged, _ = models.load_hf(out)
  assert merged.config.num_layers == 2
  out = str(root / "lines_out")
  assert cli.main(["--method", "lines", "--base", d["base"], "--models", d["ft0"], "--out", out,
                   "--alpha", "0.0", "--beta", "1.0"]) == 0
  got = _read(out)
  _close({k: got[k] for k in got if ".layers.0." in k}, {k: base[k] for k in base if ".layers.0." in k})
  _close({k: got[k] for k in got if ".layers.1." in k}, {k: ms[0][k] for k in base if ".layers.1." in k})


def test_cli_mismatch_is_one_line_naming_the_tensor(hf_dirs, capsys):
  root, d = hf_dirs
  out = str(root / "never")
  assert cli.main(["--method", "task_arithmetic", "--base", d["base"], "--models", f"{d['ft0']},{d['bad']}",
                   "--out", out]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err
  assert err.startswith("error: merge: tensor model.layers.0.mlp.down_proj.weight has shape (64, 96) in ")
  assert not os.path.exists(out)
  assert cli.main(["--method", "ties", "--base", d["base"], "--models", d["ft0"], "--out", out]) == 2
  assert "needs --density" in capsys.readouterr().err
