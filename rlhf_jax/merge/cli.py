"""``python -m rlhf_jax.merge``: merge Hugging Face directories or recipe runs into a new HF directory.

Usage:
  python -m rlhf_jax.merge --method ties --base BASE --models FT1,FT2 --out OUT --density 0.5 --lam 1.0
  python -m rlhf_jax.merge --method task_arithmetic --base BASE --models FT1,FT2 --out OUT --lam 0.5
  python -m rlhf_jax.merge --method dare --base BASE --models FT1,FT2 --out OUT --p 0.9 --seed 0
  python -m rlhf_jax.merge --method linear --models FT1,FT2,FT3 --weights 1,1,2 --out OUT
  python -m rlhf_jax.merge --method slerp --base A --models B --t 0.5 --out OUT
  python -m rlhf_jax.merge --method lines --base BASE --models FT --alpha 0.2 --beta 0.8 --out OUT

Each directory is either a Hugging Face checkpoint (``config.json`` + ``*.safetensors``) or a
recipe run's workdir (``run_config.json`` + ``checkpoints/``, read with
:func:`rlhf_jax.train.recipe.load_run`, LoRA adapters folded in).

Hugging Face directories only are merged tensor by tensor, straight from the safetensors files:
one tensor of each model is in memory at a time, and the result is streamed to
``OUT/model.safetensors`` (in the base's dtypes) with the base's other files (``config.json``,
tokenizer, generation config) copied beside it. Any architecture whose directories share tensor
names and shapes merges; LiNeS takes the layer of a tensor from its name
(:func:`rlhf_jax.merge.layer_index`) and L from ``num_hidden_layers``. With a run among the inputs
every input is loaded as a model, merged as an ``nnx.State`` and exported with
:func:`rlhf_jax.models.export_hf`.

``linear`` averages ``--models`` (``--base``, if given, is only where the config and tokenizer are
copied from; default the first model); ``slerp`` goes from ``--base`` (t = 0) to the one model;
``lines`` with several models scales their summed task vectors.

A missing or differently shaped tensor is a one-line error naming it (exit status 2); nothing is
written to ``--out`` in that case.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

from rlhf_jax.errors import UserError

METHODS = ("linear", "task_arithmetic", "ties", "dare", "slerp", "lines")
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m rlhf_jax.merge",
                              description="Merge Hugging Face directories or recipe runs into a new HF directory.")
  p.add_argument("--method", required=True, choices=METHODS)
  p.add_argument("--base", help="the model the others were fine-tuned from (slerp: the t=0 end)")
  p.add_argument("--models", required=True, help="comma-separated directories")
  p.add_argument("--out", required=True, help="the output directory (created)")
  p.add_argument("--lam", type=float, default=1.0, help="λ: scale of the merged task vector")
  p.add_argument("--density", type=float, default=None, help="ties: fraction of each task vector kept")
  p.add_argument("--p", type=float, default=None, help="dare: drop rate")
  p.add_argument("--seed", type=int, default=0, help="dare: seed of the drop masks")
  p.add_argument("--t", type=float, default=None, help="slerp: interpolation factor")
  p.add_argument("--weights", default=None, help="linear: comma-separated weights (default 1 each)")
  p.add_argument("--no-normalize", action="store_true", help="linear: weighted sum, not divided by Σw")
  p.add_argument("--alpha", type=float, default=None, help="lines: scale of the first layer")
  p.add_argument("--beta", type=float, default=None, help="lines: increase up to the last layer")
  return p


def _need(args, name: str) -> float:
  v = getattr(args, name)
  if v is None:
    raise UserError(f"merge --method {args.method} needs --{name}")
  return v


def _is_run(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "run_config.json"))


def _check_dir(path: str) -> None:
  if not os.path.isdir(path):
    raise UserError(f"merge: {path!r} is not a directory")
  if not _is_run(path) and not os.path.isfile(os.path.join(path, "config.json")):
    raise UserError(f"merge: {path!r} is neither a Hugging Face directory (config.json) nor a recipe run "
                    "(run_config.json)")


# Tensor-level merge of HF directories ----------------------------------------------------------------


class _TensorIndex:
  """Name -> (file, shape, dtype name) of one HF directory's safetensors, read lazily."""

  def __init__(self, path: str):
    from safetensors import safe_open

    from rlhf_jax.models import hf

    self.path = path
    self.where, self.shape, self.dtype = {}, {}, {}
    for file in hf.safetensors_files(path):
      with safe_open(file, framework="np") as f:
        for name in f.keys():
          sl = f.get_slice(name)
          dt = sl.get_dtype()
          if dt not in _ST_DTYPES:
            raise UserError(f"merge: tensor {name} of {path} has dtype {dt}; supported: {sorted(_ST_DTYPES)}")
          self.where[name], self.shape[name], self.dtype[name] = file, tuple(sl.get_shape()), _ST_DTYPES[dt]

  def get(self, name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(self.where[name], framework="np") as f:
      return f.get_tensor(name)


def _check_tensors(base: _TensorIndex, others: list[_TensorIndex]) -> list[str]:
  names = sorted(base.where)
  for o in others:
    missing = [n for n in names if n not in o.where]
    if missing:
      raise UserError(f"merge: tensor {missing[0]} of the base {base.path} is missing in {o.path}")
    extra = sorted(set(o.where) - set(names))
    if extra:
      raise UserError(f"merge: tensor {extra[0]} of {o.path} is not in the base {base.path}")
    for n in names:
      if o.shape[n] != base.shape[n]:
        raise UserError(f"merge: tensor {n} has shape {o.shape[n]} in {o.path} but {base.shape[n]} "
                        f"in the base {base.path}")
  return names


def _num_layers(path: str) -> int:
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  for key in ("num_hidden_layers", "n_layer", "num_layers"):
    if key in cfg:
      return int(cfg[key])
  raise UserError(f"merge --method lines: {path}/config.json has no num_hidden_layers")


def _tensor_fn(args, ref_dir: str, num_models: int, num_tensors: int):
  """``fn(j, name, base_array | None, model_arrays) -> merged array`` for the chosen method."""
  import jax
  import jax.numpy as jnp

  from rlhf_jax.merge import methods as m

  method = args.method
  one = lambda name, x: {name: jnp.asarray(x)}  # noqa: E731
  if method == "linear":
    w = [float(v) for v in args.weights.split(",")] if args.weights else None
    return lambda j, n, b, xs: m.linear([one(n, x) for x in xs], w, normalize=not args.no_normalize)[n]
  if method == "task_arithmetic":
    return lambda j, n, b, xs: m.task_arithmetic(one(n, b), [one(n, x) for x in xs], args.lam)[n]
  if method == "ties":
    density = _need(args, "density")
    return lambda j, n, b, xs: m.ties(one(n, b), [one(n, x) for x in xs], density=density, lam=args.lam)[n]
  if method == "dare":
    p = _need(args, "p")
    m._check_p(p)
    keys = m._leaf_keys(jax.random.key(args.seed), num_models, num_tensors)  # as dare() on the {name: array} dict
    return lambda j, n, b, xs: m._dare_with_keys(one(n, b), [one(n, x) for x in xs], [tuple(k[j] for k in keys)],
                                                 p=p, lam=args.lam)[n]
  if method == "slerp":
    t = _need(args, "t")
    if num_models != 1:
      raise UserError(f"merge --method slerp takes one model besides --base; got {num_models}")
    return lambda j, n, b, xs: m.slerp(one(n, b), one(n, xs[0]), t)[n]
  if method == "lines":
    alpha, beta = _need(args, "alpha"), _need(args, "beta")
    layers = _num_layers(ref_dir)

    def fn(j, n, b, xs):
      merged = m.task_arithmetic(one(n, b), [one(n, x) for x in xs], 1.0) if len(xs) > 1 else one(n, xs[0])
      return m.lines(one(n, b), merged, alpha=alpha, beta=beta, num_layers=layers)[n]
    return fn
  raise UserError(f"merge: unknown method {method!r}")


def _copy_side_files(src: str, out: str) -> None:
  for name in sorted(os.listdir(src)):
    full = os.path.join(src, name)
    if os.path.isfile(full) and not name.endswith(".safetensors") and name != "model.safetensors.index.json":
      shutil.copy2(full, os.path.join(out, name))


def merge_hf_dirs(args, base_dir: str | None, model_dirs: list[str], out: str) -> None:
  import jax
  import jax.numpy as jnp

  from rlhf_jax.models import hf

  uses_base = args.method != "linear"
  ref_dir = base_dir if (uses_base or base_dir) else model_dirs[0]
  ref = _TensorIndex(base_dir if uses_base else model_dirs[0])
  models = [_TensorIndex(d) for d in model_dirs]
  others = models if uses_base else models[1:]
  names = _check_tensors(ref, others)
  fn = _tensor_fn(args, ref_dir, len(models), len(names))
  os.makedirs(out, exist_ok=True)
  _copy_side_files(ref_dir, out)

  def thunk(j: int, name: str):
    def run():
      b = ref.get(name) if uses_base else None
      merged = fn(j, name, b, [x.get(name) for x in models])
      return np.asarray(jax.device_get(merged)).astype(np.dtype(jnp.dtype(ref.dtype[name])))
    return run

  tensors = {n: (ref.shape[n], np.dtype(jnp.dtype(ref.dtype[n])), thunk(j, n)) for j, n in enumerate(names)}
  hf.write_safetensors(os.path.join(out, "model.safetensors"), tensors)


# Model-level merge (recipe runs among the inputs) ----------------------------------------------------


def _load(path: str):
  from rlhf_jax import models as models_lib
  from rlhf_jax.train import recipe

  return recipe.load_run(path) if _is_run(path) else models_lib.load_hf(path)


def merge_models(args, base_dir: str | None, model_dirs: list[str], out: str) -> None:
  import jax
  from flax import nnx

  from rlhf_jax.merge import methods as m
  from rlhf_jax.models import export_hf

  uses_base = args.method != "linear"
  loaded = [_load(d) for d in model_dirs]
  ref_model, ref_tok = _load(base_dir) if (uses_base or base_dir) else loaded[0]
  base = nnx.state(ref_model, nnx.Param)
  states = [nnx.state(x, nnx.Param) for x, _ in loaded]
  try:
    m._check_like("merge", base, states, ref_name=f"the base {base_dir or model_dirs[0]}", names=model_dirs)
  except ValueError as e:
    raise UserError(str(e)) from None
  method = args.method
  if method == "linear":
    w = [float(v) for v in args.weights.split(",")] if args.weights else None
    merged = m.linear(states, w, normalize=not args.no_normalize)
  elif method == "task_arithmetic":
    merged = m.task_arithmetic(base, states, args.lam)
  elif method == "ties":
    merged = m.ties(base, states, density=_need(args, "density"), lam=args.lam)
  elif method == "dare":
    merged = m.dare(base, states, p=_need(args, "p"), key=jax.random.key(args.seed), lam=args.lam)
  elif method == "slerp":
    if len(states) != 1:
      raise UserError(f"merge --method slerp takes one model besides --base; got {len(states)}")
    merged = m.slerp(base, states[0], _need(args, "t"))
  else:
    combined = m.task_arithmetic(base, states, 1.0) if len(states) > 1 else states[0]
    merged = m.lines(base, combined, alpha=_need(args, "alpha"), beta=_need(args, "beta"),
                     num_layers=ref_model.config.num_layers)
  nnx.update(ref_model, merged)
  export_hf(ref_model, ref_tok, out)


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    model_dirs = [d for d in args.models.split(",") if d]
    if not model_dirs:
      raise UserError("merge: --models is empty")
    if args.method != "linear" and not args.base:
      raise UserError(f"merge --method {args.method} needs --base")
    for d in ([args.base] if args.base else []) + model_dirs:
      _check_dir(d)
    if os.path.abspath(args.out) in {os.path.abspath(d) for d in model_dirs + [args.base or ""]}:
      raise UserError(f"merge: --out {args.out} is one of the inputs")
    dirs = ([args.base] if args.base else []) + model_dirs
    if any(_is_run(d) for d in dirs):
      merge_models(args, args.base, model_dirs, args.out)
    else:
      merge_hf_dirs(args, args.base, model_dirs, args.out)
  except (UserError, ValueError, FileNotFoundError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"merged {len(model_dirs)} model(s) with {args.method} into {args.out}")
  return 0
