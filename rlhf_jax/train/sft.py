"""Supervised fine-tuning: the masked token NLL, its step, and the composed run."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections

from rlhf_jax import ops
from rlhf_jax.losses.sft import sft_loss

def make_sft_loss(*, aggregation: str = "token-mean", logprob_chunk_size: int | None = None):
  """``loss_fn(model, batch, rng) -> (loss, aux)`` for right-padded SFT batches.

  The batch holds ``input_ids_BxT``, ``targets_BxT`` (inputs shifted left) and
  ``loss_mask_BxT`` (1 on completion targets, aligned with the targets); packed
  batches also ``segment_ids_BxT`` (and optionally ``positions_BxT``), which keep
  attention within each packed sequence. Log-probs
  come from the final hidden states through :func:`rlhf_jax.ops.token_logprobs`,
  chunked over tokens when ``logprob_chunk_size`` is set, so the full
  ``[B, T, V]`` fp32 log-softmax is never kept.
  """
  reduce = ops.get_aggregation(aggregation)

  def loss_fn(model, batch, rng):
    del rng
    # Packed rows (rlhf_jax.data.tokenize.pack_rows) carry segment ids and per-segment positions.
    hidden, _ = model.hidden_states(batch["input_ids_BxT"], segment_ids_BxT=batch.get("segment_ids_BxT"),
                                    positions_BxT=batch.get("positions_BxT"))
    logps = ops.token_logprobs(
        hidden, model.unembed_matrix(), batch["targets_BxT"], chunk_size=logprob_chunk_size
    )
    mask = batch["loss_mask_BxT"].astype(jnp.float32)
    loss = reduce(sft_loss(logps, mask), mask)
    ntokens = mask.sum()
    nll = -(logps * mask).sum() / jnp.maximum(ntokens, 1.0)
    return loss, {"weight": ops.aggregation_weight(aggregation, mask), "nll": nll, "loss_tokens": ntokens}

  return loss_fn


# objective -> what it reads besides the policy's target log-probs and the loss mask:
# "ref" the reference's token log-probs, "ref_logits" the reference's and the policy's full logits,
# and the per-row batch fields.
OFFLINE_OBJECTIVES: dict[str, tuple[str, ...]] = {
    "nll": (),
    "dft": (),
    "anchored_sft": ("ref_logits",),
    "c_rlft": ("source_rewards_B",),
    "a_lol": ("ref", "advantages_B"),
    "a_lol_seq": ("ref", "advantages_B"),
    "a_lol_kl": ("ref", "advantages_B"),
    "a_lol_ref_free": ("advantages_B",),
    "nft": ("ref", "correct_B", "correct_rate_B"),
}
"""The token-level objectives `make_offline_loss` trains, and the inputs each needs."""


def needs_reference(objective: str) -> bool:
  """Whether `make_offline_loss` of ``objective`` needs a reference model (log-probs or logits)."""
  return bool({"ref", "ref_logits"} & set(OFFLINE_OBJECTIVES[objective]))


def make_offline_loss(
    objective: str = "nll",
    *,
    aggregation: str = "token-mean",
    hparams: dict | None = None,
    ref_graphdef=None,
    logprob_chunk_size: int | None = None,
):
  """``loss_fn(model, batch, rng) -> (loss, aux)``: a weighted or token-level SFT objective.

  Trains any objective of `OFFLINE_OBJECTIVES` (registered in `rlhf_jax.losses`, kinds
  ``token``/``offline``) on the SFT batch layout of `make_sft_loss` (``input_ids_BxT``,
  ``targets_BxT``, ``loss_mask_BxT``), with the fields it needs taken from the batch by name:

  - ``weight_B`` (optional, any objective): a per-row weight multiplied into the mask, so the
    aggregation counts row ``b``'s tokens ``weight_B[b]`` times (weighted SFT; 0 drops a row).
  - ``source_rewards_B`` (``c_rlft``): the coarse reward of each row's data source (OpenChat).
  - ``advantages_B`` (A-LoL): each row's advantage, its reward minus a value baseline.
  - ``correct_B``, ``correct_rate_B`` (``nft``): 1 for a correct answer, and the accuracy of its
    question's answers in the data.
  - The reference, for A-LoL's importance ratio, NFT's ``π_old`` and ASFT's anchor: token
    log-probs ``ref_logps_BxT`` precomputed in the batch, or ``extras["ref_params"]`` with
    ``ref_graphdef`` (the frozen LoRA base, or a copy of the initial weights), run in the step.
    ``anchored_sft`` needs the reference's full logits, so it always runs the reference, and the
    policy's full ``[B, T, V]`` logits too (no chunking: memory grows with the vocabulary).

  ``hparams`` go to the loss (e.g. ``epsilon``, ``kl_coef``, ``beta``). The per-token losses are
  reduced with ``aggregation`` over the (weighted) mask.

  Metrics: ``nll`` (the unweighted mean completion-token NLL), ``loss_tokens``, ``weight`` (the
  accumulation weight), and ``ref_nll`` when a reference was used.

  Raises:
    ValueError: on an unknown objective, or a batch without a field the objective needs.
  """
  from flax import nnx

  from rlhf_jax import losses as losses_lib

  if objective not in OFFLINE_OBJECTIVES:
    raise ValueError(f"unknown SFT objective {objective!r}; valid: {sorted(OFFLINE_OBJECTIVES)}")
  needs = OFFLINE_OBJECTIVES[objective]
  fn = losses_lib.get(objective)
  reduce = ops.get_aggregation(aggregation)
  hp = dict(hparams or {})

  def forward(m, batch, full_logits):
    kw = dict(segment_ids_BxT=batch.get("segment_ids_BxT"), positions_BxT=batch.get("positions_BxT"))
    if full_logits:
      logits = m(batch["input_ids_BxT"], **kw)
      return ops.logprobs_from_logits(logits, batch["targets_BxT"]), logits
    hidden, _ = m.hidden_states(batch["input_ids_BxT"], **kw)
    return ops.token_logprobs(hidden, m.unembed_matrix(), batch["targets_BxT"], chunk_size=logprob_chunk_size), None

  def reference(batch, full_logits):
    if not full_logits and "ref_logps_BxT" in batch:
      return jnp.asarray(batch["ref_logps_BxT"]), None
    extras = batch.get("extras") or {}
    if "ref_params" not in extras or ref_graphdef is None:
      raise ValueError(f"SFT objective {objective!r} needs the reference: the batch has no ref_logps_BxT and no "
                       "extras['ref_params'] with ref_graphdef")
    lp, logits = forward(nnx.merge(ref_graphdef, extras["ref_params"]), batch, full_logits)
    return jax.lax.stop_gradient(lp), None if logits is None else jax.lax.stop_gradient(logits)

  def field(batch, name):
    if name not in batch:
      raise ValueError(f"SFT objective {objective!r} needs the batch field {name!r} (rows without it?)")
    return jnp.asarray(batch[name], jnp.float32)

  def loss_fn(model, batch, rng):
    del rng
    full = "ref_logits" in needs
    logps, logits = forward(model, batch, full)
    mask = batch["loss_mask_BxT"].astype(jnp.float32)
    aux = {}
    if "weight_B" in batch:
      mask = mask * jnp.asarray(batch["weight_B"], jnp.float32)[:, None]
    ref_lp = ref_logits = None
    if "ref" in needs or full:
      ref_lp, ref_logits = reference(batch, full)
      aux["ref_nll"] = ops.token_mean(-ref_lp, batch["loss_mask_BxT"])
    if objective in ("nll", "dft"):
      per_token = fn(logps, mask)
    elif objective == "anchored_sft":
      per_token = fn(logps, mask, logits, ref_logits, **hp)
    elif objective == "c_rlft":
      per_token = fn(logps, mask, field(batch, "source_rewards_B"), **hp)
    elif objective == "a_lol_ref_free":
      per_token = fn(logps, field(batch, "advantages_B"), mask, **hp)
    elif objective == "nft":
      per_token = fn(logps, ref_lp, field(batch, "correct_B"), field(batch, "correct_rate_B"), mask, **hp)
    else:  # a_lol, a_lol_seq, a_lol_kl
      per_token = fn(logps, ref_lp, field(batch, "advantages_B"), mask, **hp)
    loss = reduce(per_token, mask)
    binary = batch["loss_mask_BxT"].astype(jnp.float32)
    aux.update(weight=ops.aggregation_weight(aggregation, mask), nll=ops.token_mean(-logps, binary),
               loss_tokens=binary.sum())
    return loss, aux

  return loss_fn


def parse_source_rewards(spec: str) -> dict[str, float]:
  """``"gpt4:1.0,gpt35:0.1"`` -> ``{"gpt4": 1.0, "gpt35": 0.1}`` (C-RLFT's coarse reward of each data source)."""
  out = {}
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    name, sep, value = part.rpartition(":")
    try:
      out[name.strip()] = float(value)
    except ValueError:
      sep = ""
    if not sep or not name.strip():
      raise ValueError(f"source rewards {spec!r}: expected NAME:NUMBER pairs separated by commas, got {part!r}")
  return out


def _prompt_key(example: dict) -> str:
  import json

  msgs = example.get("messages") or list(example.get("prompt", ()))
  first = next((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), len(msgs))
  return json.dumps(msgs[:first], sort_keys=True)


def make_row_fields(objective: str, train_examples, *, source_rewards: dict[str, float] | None = None):
  """``fields(examples) -> {name: [B] float32}``: the per-row batch fields `make_offline_loss` reads.

  From each example's columns (``example["fields"]``, the JSONL row's other columns):

  - ``weight`` (any objective, optional; ``>= 0``) -> ``weight_B`` (a missing weight is 1).
  - ``c_rlft``: ``source_reward`` (a number), or ``source`` (a name) looked up in
    ``source_rewards`` -> ``source_rewards_B``.
  - A-LoL: ``advantage``, or ``reward`` minus the mean reward of ``train_examples`` (the value
    baseline of the data) -> ``advantages_B``.
  - ``nft``: ``correct`` (a bool or 0/1) -> ``correct_B``, and the accuracy of the training
    rows with the same prompt -> ``correct_rate_B``.

  Every training row is checked here, before training: a row without a column its objective
  needs is a `ValueError` naming its ``FILE:LINE`` and the column.
  """
  import numpy as np

  if objective not in OFFLINE_OBJECTIVES:
    raise ValueError(f"unknown SFT objective {objective!r}; valid: {sorted(OFFLINE_OBJECTIVES)}")
  source_rewards = dict(source_rewards or {})

  def where(ex):
    return ex.get("source") or "a row"

  def number(ex, name, *, required=True, default=None):
    value = (ex.get("fields") or {}).get(name, default)
    if value is None:
      if required:
        raise ValueError(f"{where(ex)}: field {name!r}: missing (objective {objective!r} reads it from every row)")
      return None
    if isinstance(value, bool):
      return float(value)
    if not isinstance(value, (int, float)):
      raise ValueError(f"{where(ex)}: field {name!r}: expected a number, got {type(value).__name__} {value!r}")
    return float(value)

  def source_reward(ex):
    f = ex.get("fields") or {}
    if "source_reward" in f:
      return number(ex, "source_reward")
    name = f.get("source")
    if name is None:
      raise ValueError(f"{where(ex)}: field 'source_reward' or 'source': missing (objective 'c_rlft' needs one)")
    if str(name) not in source_rewards:
      raise ValueError(f"{where(ex)}: field 'source': {name!r} has no reward in the source rewards "
                       f"{source_rewards or '(none given)'}")
    return source_rewards[str(name)]

  baseline = 0.0
  if objective.startswith("a_lol"):
    rewards = [number(ex, "reward") for ex in train_examples if "advantage" not in (ex.get("fields") or {})]
    baseline = float(np.mean(rewards)) if rewards else 0.0
  rates = {}
  if objective == "nft":
    by_prompt: dict[str, list[float]] = {}
    for ex in train_examples:
      by_prompt.setdefault(_prompt_key(ex), []).append(number(ex, "correct"))
    rates = {k: float(np.mean(v)) for k, v in by_prompt.items()}
  has_weight = any("weight" in (ex.get("fields") or {}) for ex in train_examples)

  def fields(examples) -> dict:
    out = {}
    if has_weight:
      w = [number(ex, "weight", default=1.0) for ex in examples]
      bad = [ex for ex, v in zip(examples, w) if not v >= 0]
      if bad:
        raise ValueError(f"{where(bad[0])}: field 'weight': must be >= 0")
      out["weight_B"] = w
    if objective == "c_rlft":
      out["source_rewards_B"] = [source_reward(ex) for ex in examples]
    elif objective.startswith("a_lol"):
      out["advantages_B"] = [number(ex, "advantage") if "advantage" in (ex.get("fields") or {})
                             else number(ex, "reward") - baseline for ex in examples]
    elif objective == "nft":
      out["correct_B"] = [number(ex, "correct") for ex in examples]
      out["correct_rate_B"] = [rates.get(_prompt_key(ex), number(ex, "correct")) for ex in examples]
    return {k: np.asarray(v, np.float32) for k, v in out.items()}

  fields(list(train_examples))  # every training row checked now, before any training
  fields.baseline = baseline
  return fields


def make_eval_fn(model_graphdef, batches: list[dict], put_batch):
  """Teacher-forced eval: NLL, token accuracy and exact match of completions.

  Exact match under teacher forcing (the argmax equals the target at every
  completion position) is exactly "greedy decoding reproduces the answer".
  """
  from flax import nnx

  @jax.jit
  def evaluate(params, batch):
    model = nnx.merge(model_graphdef, params)
    logits = model(batch["input_ids_BxT"])
    logps = ops.logprobs_from_logits(logits, batch["targets_BxT"])
    mask = batch["loss_mask_BxT"].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["targets_BxT"]).astype(jnp.float32)
    seq_ok = jnp.all((correct > 0) | (mask == 0), axis=-1)
    return {
        "nll_sum": -(logps * mask).sum(),
        "correct_sum": (correct * mask).sum(),
        "tokens": mask.sum(),
        "exact": seq_ok.sum().astype(jnp.float32),
        "seqs": jnp.asarray(mask.shape[0], jnp.float32),
    }

  device_batches = [put_batch(b) for b in batches]

  def eval_fn(state):
    totals: dict[str, float] = {}
    for b in device_batches:
      for k, v in jax.device_get(evaluate(state.params, b)).items():
        totals[k] = totals.get(k, 0.0) + float(v)
    return {
        "loss": totals["nll_sum"] / max(totals["tokens"], 1.0),
        "token_accuracy": totals["correct_sum"] / max(totals["tokens"], 1.0),
        "exact_match": totals["exact"] / max(totals["seqs"], 1.0),
    }

  return eval_fn


def train(config: ml_collections.ConfigDict, workdir: str):
  """SFT on a generated task: model, mesh, optimizer, data, step and loop composed from ``config``.

  Writes ``<workdir>/result.json`` (`writers.write_result`) with the headline: held-out exact
  match (greedy decoding reproduces the answer) of the initial model and of the trained one, by
  the same eval function on the same held-out batches. The initial figure is measured before the
  loop from the freshly initialised state, so a run resumed (even at its last step) still reports
  it. Returns the loop's ``LoopResult``; a preempted run writes no result.
  """
  from rlhf_jax import data as data_lib
  from rlhf_jax import models, parallel
  from rlhf_jax.checkpoint import Checkpointer
  from rlhf_jax.train import loop, optim, state as state_lib, step as step_lib, writers

  mesh = parallel.make_mesh(dict(config.mesh))
  model_cfg = models.config_from_section(config.model)
  if model_cfg.vocab_size < data_lib.VOCAB_SIZE:
    raise ValueError(
        f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the task vocabulary "
        f"({data_lib.VOCAB_SIZE})"
    )
  model = models.create_sharded_model(model_cfg, mesh, seed=config.seed)
  tx, schedule = optim.make_optimizer(config.optimizer, total_steps=config.num_steps)
  graphdef, state, shardings = state_lib.create_train_state(model, tx, seed=config.seed, mesh=mesh)
  del model
  loss_fn = make_sft_loss(aggregation=config.loss.aggregation, logprob_chunk_size=config.loss.logprob_chunk_size or None)
  train_step = step_lib.make_train_step(
      loss_fn, tx, graphdef, num_microbatches=config.num_microbatches, mesh=mesh,
      state_shardings=shardings, learning_rate_fn=schedule,
  )
  data_kw = dict(task=config.data.task, seq_len=config.data.seq_len, min_len=config.data.min_len, max_len=config.data.max_len)
  batches = data_lib.synthetic_sft_iterator(batch_size=config.batch_size, seed=config.data.seed, **data_kw)
  put = lambda b: parallel.host_local_to_global(b, mesh)
  eval_iter = data_lib.synthetic_sft_iterator(batch_size=config.eval.batch_size, seed=config.data.seed + 10_000, **data_kw)
  eval_batches = [next(eval_iter) for _ in range(config.eval.num_batches)]
  eval_fn = make_eval_fn(graphdef, eval_batches, put)
  # Before training (the train step donates the state, and a resumed loop replaces it).
  before = eval_fn(state)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.keep)
  try:
    res = loop.train_loop(
        step_fn=train_step, state=state, batches=batches, num_steps=config.num_steps,
        workdir=workdir, put_batch=put, checkpointer=checkpointer, state_shardings=shardings,
        checkpoint_every=config.checkpoint.every, eval_fn=eval_fn, eval_every=config.eval.every,
        log_every=config.log_every, max_nonfinite_streak=config.max_nonfinite_streak,
        progress=config.progress,
        plot_keys=("loss", "eval/loss", "eval/exact_match", "grad_norm", "learning_rate"),
    )
  finally:
    checkpointer.close()
  if res.preempted:
    return res
  # The loop evaluated the final state; a run resumed at its last step did not.
  after = {k[len("eval/"):]: v for k, v in res.eval_metrics.items()} if res.eval_metrics else eval_fn(res.state)
  result = {
      "headline": writers.make_headline("exact_match", before["exact_match"], after["exact_match"]),
      "heldout_before": before,
      "heldout_after": after,
      "num_steps": int(res.end_step),
      "final_metrics": res.last_metrics,
  }
  writers.write_result(workdir, result, not_printed=("final_metrics",), train_metrics=res.last_metrics,
                       eval_metrics=after)
  return res
