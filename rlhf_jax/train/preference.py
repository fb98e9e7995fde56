"""Offline preference optimisation: one step factory for the pairwise DPO family.

* One forward: chosen and rejected rows are concatenated into a ``[2B, T]``
  batch, so the policy runs once per step.
* Reference log-probs come either precomputed in the batch
  (``ref_chosen_logps_B`` / ``ref_rejected_logps_B``, see
  :func:`precompute_reference_logps`, cached on disk and reused across runs) or
  from reference parameters in ``state.extras["ref_params"]``, computed in the
  step under ``stop_gradient``.
* Several losses combine with weights (``[("sigmoid", 1.0, {}), ("sft", 1.0, {})]``
  is RPO; TRL's MPO is ``sigmoid`` 0.8 + ``bco_pair`` 0.2 + ``sft`` 1.0).
* TR-DPO reference sync (soft or hard) is an ``extras_update`` for the step.

Batch keys: ``{chosen,rejected}_{input_ids,targets,loss_mask}_BxT`` (right
padded, masks aligned with targets) and optionally the reference log-probs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import losses as losses_lib
from rlhf_jax import ops
from rlhf_jax.losses import dpo as dpo_losses

LossSpec = tuple  # (name or fn, weight, hparams dict)
SIDES = ("chosen", "rejected")


class SideLogps(NamedTuple):
  """Log-probs of one side (chosen or rejected) of a pair batch."""

  seq_B: jax.Array  # masked sum over completion tokens
  token_BxT: jax.Array
  lengths_B: jax.Array
  mask_BxT: jax.Array
  log_sum_p2_BxT: jax.Array | None  # log Σ_v p_v² per token (WPO), when asked for


def concatenated_logps(
    model, batch, *, logprob_chunk_size: int | None = None, sides: Sequence[str] = SIDES,
    with_log_sum_p2: bool = False,
) -> dict[str, SideLogps]:
  """Per-token log-probs of each side from one forward over the concatenated rows.

  ``with_log_sum_p2`` also returns ``log Σ_v p_v²`` per token for WPO weights,
  from the full logits under ``stop_gradient`` (forward only, no backward).
  """
  ids = jnp.concatenate([batch[f"{s}_input_ids_BxT"] for s in sides], axis=0)
  targets = jnp.concatenate([batch[f"{s}_targets_BxT"] for s in sides], axis=0)
  hidden, _ = model.hidden_states(ids)
  token_logps = ops.token_logprobs(hidden, model.unembed_matrix(), targets, chunk_size=logprob_chunk_size)
  lsp2 = None
  if with_log_sum_p2:
    lsp2 = dpo_losses.log_sum_p2_from_logits(model.logits(jax.lax.stop_gradient(hidden)))
  out = {}
  b = batch[f"{sides[0]}_input_ids_BxT"].shape[0]
  for i, s in enumerate(sides):
    lp = token_logps[i * b:(i + 1) * b]
    mask = batch[f"{s}_loss_mask_BxT"].astype(jnp.float32)
    out[s] = SideLogps((lp * mask).sum(-1), lp, mask.sum(-1), mask,
                       None if lsp2 is None else lsp2[i * b:(i + 1) * b])
  return out


def _sequence_logps(sides: dict[str, SideLogps], ld_alpha: float | None):
  """(chosen_B, rejected_B) sequence log-probs, length-desensitised (LD-DPO) when ``ld_alpha`` is set."""
  c, r = sides["chosen"], sides["rejected"]
  if ld_alpha is None:
    return c.seq_B, r.seq_B
  return dpo_losses.ld_sequence_logps(c.token_BxT, c.mask_BxT, r.token_BxT, r.mask_BxT, alpha=ld_alpha)


def _accepted_kwargs(fn: Callable) -> set[str] | None:
  params = inspect.signature(fn).parameters.values()
  if any(p.kind == p.VAR_KEYWORD for p in params):
    return None  # accepts anything
  return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


# Per-pair batch fields (from the data's per-pair columns, `rlhf_jax.data.formats.PAIR_FIELDS`) handed to
# the losses by name, besides ``beta_B`` (replaces ``beta``), ``weight_B`` and the ``gold`` rows.
_PAIR_BATCH_FIELDS = ("margin_rewards_chosen_BxK", "margin_rewards_rejected_BxK")
_COLUMN_OF = {"policy_gold_logps": "gold", "margin_rewards_chosen_BxK": "margin_rewards_chosen",
              "margin_rewards_rejected_BxK": "margin_rewards_rejected"}


def _check_needed(name: str, fn: Callable, available: Mapping) -> None:
  """A loss keyword without a default that neither the batch nor the hyper-parameters give: one clear error."""
  for p in inspect.signature(fn).parameters.values():
    if p.kind == p.KEYWORD_ONLY and p.default is p.empty and p.name not in available:
      if p.name in _COLUMN_OF:
        raise ValueError(f"loss {name!r} needs the per-pair column {_COLUMN_OF[p.name]!r} in every row of the data")
      raise ValueError(f"loss {name!r} needs the hyper-parameter {p.name!r} (loss_kwargs.{p.name})")


def needed_columns(specs: Sequence[LossSpec]) -> dict[str, str]:
  """``{loss name: data column}`` for each per-pair column a pairwise loss cannot do without
  (e.g. ``{"tpo": "gold"}``): a recipe checks them against its data before training."""
  out = {}
  for name, fn, _, hparams, _ in _resolve(specs):
    for p in inspect.signature(fn).parameters.values():
      if p.kind == p.KEYWORD_ONLY and p.default is p.empty and p.name in _COLUMN_OF and p.name not in hparams:
        out.setdefault(name, _COLUMN_OF[p.name])
  return out


def _resolve(specs: Sequence[LossSpec]):
  resolved = []
  for spec in specs:
    if len(spec) == 2:
      spec = (*spec, {})
    name_or_fn, weight, hparams = spec
    fn = losses_lib.get(name_or_fn) if isinstance(name_or_fn, str) else name_or_fn
    name = name_or_fn if isinstance(name_or_fn, str) else getattr(fn, "__name__", "loss")
    resolved.append((name, fn, float(weight), dict(hparams), _accepted_kwargs(fn)))
  return resolved


def make_preference_loss(
    losses: Sequence[LossSpec] = (("sigmoid", 1.0, {}),),
    *,
    beta: float = 0.1,
    logprob_chunk_size: int | None = None,
    ref_graphdef: nnx.GraphDef | None = None,
    reference_free: bool = False,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
):
  """``loss_fn(model, batch, rng) -> (loss, aux)`` for pairwise preference losses.

  Args:
    losses: ``(name or function, weight, hyper-parameters)`` triples; names are
      looked up in :mod:`rlhf_jax.losses`. Each pairwise loss is called as
      ``fn(pc, pr, rc, rr, beta=..., chosen_lengths=..., rejected_lengths=..., **hparams)``
      with only the keywords it accepts.
    beta: the KL temperature shared by the losses (a loss's own ``beta`` in
      its hyper-parameters wins).
    logprob_chunk_size: token chunk for log-probs (see ``ops.token_logprobs``).
    ref_graphdef: the reference model's graph definition, when the batch
      carries ``extras["ref_params"]`` instead of precomputed reference log-probs.
    reference_free: for SimPO, CPO, ORPO and other reference-free losses: the
      losses get ``None`` for the reference log-probs and the implicit rewards
      are ``beta * policy log-probs``.
    ld_alpha: LD-DPO (TRL ``ld_alpha``): the longer completion's tail beyond the
      pair's shared length counts with weight ``α`` in the sequence log-probs,
      policy and in-step reference alike (precompute the reference with the same
      ``ld_alpha``).
    use_weighting: WPO (TRL ``use_weighting``): each pair's losses are weighted
      by ``w_c·w_r`` from the current policy (no gradient); costs one full-logits
      forward without backward.

  Metrics (TRL's names): ``rewards/chosen``, ``rewards/rejected``,
  ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
  ``logps/rejected``, and ``loss/<name>`` per loss. The loss is the weighted
  sum of per-pair means; its accumulation weight is the number of pairs.
  """
  resolved = _resolve(losses)

  def loss_fn(model, batch, rng):
    del rng
    sides = (*SIDES, "gold") if "gold_input_ids_BxT" in batch else SIDES
    pol = concatenated_logps(model, batch, logprob_chunk_size=logprob_chunk_size, sides=sides,
                             with_log_sum_p2=use_weighting)
    pc, pr = _sequence_logps(pol, ld_alpha)
    lc, lr = pol["chosen"].lengths_B, pol["rejected"].lengths_B
    if reference_free:
      rc = rr = None
    elif "ref_chosen_logps_B" in batch:
      rc, rr = batch["ref_chosen_logps_B"], batch["ref_rejected_logps_B"]
    elif "extras" in batch and "ref_params" in batch["extras"]:
      if ref_graphdef is None:
        raise ValueError("make_preference_loss needs ref_graphdef to use extras['ref_params']")
      ref = nnx.merge(ref_graphdef, batch["extras"]["ref_params"])
      rc, rr = _sequence_logps(concatenated_logps(ref, batch, logprob_chunk_size=logprob_chunk_size), ld_alpha)
    else:
      raise ValueError(
          "the batch has neither ref_chosen_logps_B/ref_rejected_logps_B nor extras['ref_params']: "
          "precompute reference log-probs or give the state reference parameters"
      )
    if not reference_free:
      rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
    pair_beta = beta if "beta_B" not in batch else jnp.asarray(batch["beta_B"], jnp.float32)
    available = dict(beta=pair_beta, chosen_lengths=lc, rejected_lengths=lr)
    if "gold" in pol:
      available.update(policy_gold_logps=pol["gold"].seq_B, gold_lengths=pol["gold"].lengths_B)
    for key in _PAIR_BATCH_FIELDS:
      if key in batch:
        available[key] = jnp.asarray(batch[key], jnp.float32)
    total = jnp.zeros((), jnp.float32)
    aux = {}
    pair_weights = 1.0
    if use_weighting:
      c, r = pol["chosen"], pol["rejected"]
      pair_weights = dpo_losses.wpo_weights(c.token_BxT, c.log_sum_p2_BxT, c.mask_BxT,
                                            r.token_BxT, r.log_sum_p2_BxT, r.mask_BxT)
      aux["wpo_weight"] = jnp.mean(pair_weights)
    # Data weights (a `weight` column): weight k counts a pair k times, Σ w·l / Σ w.
    data_w = jnp.asarray(batch["weight_B"], jnp.float32) if "weight_B" in batch else jnp.ones_like(pc)
    norm = jnp.maximum(jnp.sum(data_w), 1e-12)
    for name, fn, weight, hparams, accepted in resolved:
      kw = {**available, **hparams}
      _check_needed(name, fn, kw)
      if accepted is not None:
        kw = {k: v for k, v in kw.items() if k in accepted}
      value = jnp.sum(fn(pc, pr, rc, rr, **kw) * pair_weights * data_w) / norm
      aux[f"loss/{name}"] = value
      total = total + weight * value
    zero = jnp.zeros_like(pc)
    aux.update(dpo_losses.dpo_metrics(pc, pr, zero if reference_free else rc, zero if reference_free else rr,
                                      beta=pair_beta))
    aux["weight"] = jnp.sum(data_w)
    return total, aux

  return loss_fn


def list_logps(model, batch, *, logprob_chunk_size: int | None = None):
  """Sequence log-probs ``[B, K]`` and lengths of K list members, from one ``[B·K, T]`` forward."""
  ids = batch["input_ids_BxKxT"]
  b, k, t = ids.shape
  hidden, _ = model.hidden_states(ids.reshape(b * k, t))
  lp = ops.token_logprobs(hidden, model.unembed_matrix(), batch["targets_BxKxT"].reshape(b * k, t),
                          chunk_size=logprob_chunk_size)
  mask = batch["loss_mask_BxKxT"].reshape(b * k, t).astype(jnp.float32)
  return (lp * mask).sum(-1).reshape(b, k), mask.sum(-1).reshape(b, k)


def make_listwise_loss(
    loss: str | Callable = "lipo_lambda",
    *,
    beta: float = 0.1,
    hparams: dict | None = None,
    logprob_chunk_size: int | None = None,
    ref_graphdef: nnx.GraphDef | None = None,
    reference_free: bool = False,
):
  """``loss_fn(model, batch, rng) -> (loss, aux)`` for listwise losses over K responses.

  Batch keys: ``{input_ids,targets,loss_mask}_BxKxT``, ``scores_BxK`` (higher is
  better), ``list_mask_BxK`` (1 on real members of lists shorter than K), and the
  reference as ``ref_logps_BxK`` or ``extras["ref_params"]`` (none when
  ``reference_free``, e.g. for ``pro`` and ``rrhf``). The loss is called as
  ``fn(policy_logps_BxK, ref_logps_BxK, scores_BxK, mask_BxK, beta=..., lengths_BxK=..., **hparams)``
  with the keywords it accepts. Metrics: ``loss``, ``top1_accuracy`` (the
  member with the highest implicit reward is the best-scored one), ``logps/mean``.
  """
  fn = losses_lib.get(loss) if isinstance(loss, str) else loss
  accepted = _accepted_kwargs(fn)
  hparams = dict(hparams or {})

  def loss_fn(model, batch, rng):
    del rng
    pol, lengths = list_logps(model, batch, logprob_chunk_size=logprob_chunk_size)
    mask = batch["list_mask_BxK"].astype(jnp.float32)
    if reference_free:
      ref = None
    elif "ref_logps_BxK" in batch:
      ref = jax.lax.stop_gradient(batch["ref_logps_BxK"])
    elif "extras" in batch and "ref_params" in batch["extras"] and ref_graphdef is not None:
      ref = jax.lax.stop_gradient(
          list_logps(nnx.merge(ref_graphdef, batch["extras"]["ref_params"]), batch, logprob_chunk_size=logprob_chunk_size)[0])
    else:
      raise ValueError("listwise batch has no ref_logps_BxK nor extras['ref_params'] (set reference_free for pro/rrhf)")
    kw = {"beta": beta, "lengths_BxK": lengths, **hparams}
    if accepted is not None:
      kw = {k: v for k, v in kw.items() if k in accepted}
    per_list = fn(pol, ref, batch["scores_BxK"], mask, **kw)
    implicit = pol if ref is None else pol - ref
    neg = jnp.finfo(jnp.float32).min
    top_model = jnp.argmax(jnp.where(mask > 0, implicit, neg), axis=-1)
    top_score = jnp.argmax(jnp.where(mask > 0, batch["scores_BxK"].astype(jnp.float32), neg), axis=-1)
    return jnp.mean(per_list), {
        "top1_accuracy": (top_model == top_score).astype(jnp.float32).mean(),
        "logps/mean": (pol * mask).sum() / jnp.maximum(mask.sum(), 1.0),
        "weight": jnp.asarray(pol.shape[0], jnp.float32),
    }

  return loss_fn


def tr_dpo_sync(*, mode: str = "soft", alpha: float = 0.6, every: int = 512):
  """TR-DPO reference update as a step ``extras_update``.

  Every ``every`` steps: ``soft``: θ_ref ← α·θ + (1 − α)·θ_ref; ``hard``: θ_ref ← θ.
  Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment"
  (arXiv:2404.09656); TRL's ``ref_model_mixup_alpha`` / ``ref_model_sync_steps``.
  """
  if mode not in ("soft", "hard"):
    raise ValueError(f"tr_dpo_sync mode={mode!r}; valid choices: ('soft', 'hard')")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"tr_dpo_sync alpha={alpha} must be in [0, 1]")
  a = 1.0 if mode == "hard" else alpha

  def update(extras, params, step):
    ref = extras["ref_params"]
    sync = (step % every) == 0
    mixed = jax.tree.map(lambda p, r: jnp.where(sync, (a * p.astype(jnp.float32) + (1 - a) * r.astype(jnp.float32)).astype(r.dtype), r), params, ref)
    return {**extras, "ref_params": mixed}

  return update


def precompute_reference_logps(
    graphdef: nnx.GraphDef,
    params,
    dataset,
    *,
    collate: Callable[[list], dict],
    batch_size: int,
    put_batch: Callable[[dict], dict] = lambda b: b,
    cache_dir: str | None = None,
    fingerprint: str = "",
    logprob_chunk_size: int | None = None,
    ld_alpha: float | None = None,
) -> dict[str, np.ndarray]:
  """Reference sequence log-probs of every pair of ``dataset``, computed once.

  Returns ``{"ref_chosen_logps": [N], "ref_rejected_logps": [N]}`` indexed by
  example index. With ``cache_dir`` the arrays are saved as
  ``ref_logps_<hash>.npz`` (hash of ``fingerprint``, the model config and the
  dataset size) and read back by later runs; give a ``fingerprint`` that names
  the reference weights and the data (e.g. a checkpoint path and a dataset id).
  """
  model = nnx.merge(graphdef, params)
  key = json.dumps([fingerprint, repr(model.config), len(dataset), ld_alpha])
  path = None
  if cache_dir:
    path = os.path.join(cache_dir, f"ref_logps_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz")
    if os.path.exists(path):
      with np.load(path) as f:
        return {k: f[k] for k in f.files}

  @jax.jit
  def forward(params, batch):
    out = concatenated_logps(nnx.merge(graphdef, params), batch, logprob_chunk_size=logprob_chunk_size)
    return _sequence_logps(out, ld_alpha)

  n = len(dataset)
  rc = np.zeros(n, np.float32)
  rr = np.zeros(n, np.float32)
  for start in range(0, n, batch_size):
    idx = list(range(start, min(start + batch_size, n)))
    idx_padded = idx + [idx[-1]] * (batch_size - len(idx))  # fixed shape: one compilation
    batch = collate([dataset[i] for i in idx_padded])
    c, r = jax.device_get(forward(params, put_batch({k: v for k, v in batch.items() if k != "index_B"})))
    rc[idx] = np.asarray(c)[: len(idx)]
    rr[idx] = np.asarray(r)[: len(idx)]
  table = {"ref_chosen_logps": rc, "ref_rejected_logps": rr}
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **table)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache
  return table


def attach_reference(batch: dict[str, np.ndarray], table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Adds ``ref_{chosen,rejected}_logps_B`` to a host batch by its ``index_B``."""
  idx = batch["index_B"]
  out = {k: v for k, v in batch.items() if k != "index_B"}
  out["ref_chosen_logps_B"] = table["ref_chosen_logps"][idx]
  out["ref_rejected_logps_B"] = table["ref_rejected_logps"][idx]
  return out


UNPAIRED_KL_PREFIX = "kl_"


def add_mismatched_rows(batch: dict[str, np.ndarray], examples: Sequence[dict], tokenize_fn: Callable) -> dict:
  """KTO's mismatched pairs: row ``b`` of ``kl_*_BxT`` is prompt ``b`` with the completion of example ``b+1``.

  ``tokenize_fn(examples) -> SFT keys`` (e.g. ``functools.partial(tokenize_unpaired, tokenizer=...)``);
  TRL shifts completions by one within the batch the same way.
  """
  n = len(examples)
  shifted = [dict(ex, completion=examples[(b + 1) % n]["completion"]) for b, ex in enumerate(examples)]
  kl = tokenize_fn(shifted)
  out = dict(batch)
  out.update({UNPAIRED_KL_PREFIX + k: v for k, v in kl.items() if k.endswith("_BxT")})
  return out


def make_unpaired_loss(
    loss: str | Callable = "kto",
    *,
    beta: float = 0.1,
    hparams: dict | None = None,
    logprob_chunk_size: int | None = None,
    ref_graphdef: nnx.GraphDef | None = None,
):
  """``loss_fn(model, batch, rng) -> (loss, aux)`` for unpaired (desirable / undesirable) losses.

  ``kto`` (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
  arXiv:2402.01306), ``bco`` (Jung et al. 2024, "Binary Classifier Optimization for Large
  Language Model Alignment", arXiv:2404.04656) and ``apo_zero_unpaired`` (D'Oosterlinck et al.
  2024, arXiv:2408.06266), called as ``fn(policy_logps_B, ref_logps_B, labels_B, beta=..., **hparams)``.

  Batch: the SFT keys (``input_ids``, ``targets``, ``loss_mask`` ``_BxT``: prompt + completion)
  and ``labels_B`` (1 desirable); for ``kto`` also the mismatched rows ``kl_*_BxT``
  (:func:`add_mismatched_rows`), from which the reference point
  ``z₀ = max(0, mean(log π − log π_ref))`` is estimated without gradient
  (:func:`rlhf_jax.losses.preference.kto_kl_reference`). The reference is
  ``extras["ref_params"]`` with ``ref_graphdef`` (or the frozen LoRA base through
  ``lora_loss(..., base_as_reference=True)``). ``bco``'s shift δ is the running mean of the
  implicit rewards ``β·(log π − log π_ref)`` of all examples seen so far, kept in
  ``extras["bco_delta"]`` (:func:`bco_delta_init`, updated by :func:`bco_delta_update` as the
  step's ``extras_from_metrics``); the current batch is scored against the mean of the batches before it.

  Metrics: ``rewards/desirable``, ``rewards/undesirable`` (mean implicit reward of each
  label), ``kl`` (z₀), ``logps/desirable``, ``logps/undesirable``.
  """
  from rlhf_jax.losses import preference as pref_losses

  fn = losses_lib.get(loss) if isinstance(loss, str) else loss
  name = loss if isinstance(loss, str) else getattr(fn, "__name__", "loss")
  accepted = _accepted_kwargs(fn)
  hp = dict(hparams or {})
  needs_kl = accepted is None or "kl_ref" in accepted
  needs_delta = accepted is not None and "delta" in accepted

  def logps(m, batch, prefix):
    ids = batch[prefix + "input_ids_BxT"]
    hidden, _ = m.hidden_states(ids)
    lp = ops.token_logprobs(hidden, m.unembed_matrix(), batch[prefix + "targets_BxT"], chunk_size=logprob_chunk_size)
    return (lp * batch[prefix + "loss_mask_BxT"].astype(jnp.float32)).sum(-1)

  def both(m, batch):
    if not needs_kl:
      return logps(m, batch, ""), None
    cat = {k: jnp.concatenate([batch[k], batch[UNPAIRED_KL_PREFIX + k]], 0)
           for k in ("input_ids_BxT", "targets_BxT", "loss_mask_BxT")}
    lp = logps(m, cat, "")
    b = batch["input_ids_BxT"].shape[0]
    return lp[:b], lp[b:]

  def loss_fn(model, batch, rng):
    del rng
    extras = batch.get("extras") or {}
    if "ref_params" not in extras or ref_graphdef is None:
      raise ValueError("make_unpaired_loss needs extras['ref_params'] and ref_graphdef (or a LoRA base as reference)")
    if needs_kl and UNPAIRED_KL_PREFIX + "input_ids_BxT" not in batch:
      raise ValueError(f"{name} needs the mismatched rows kl_*_BxT in the batch (add_mismatched_rows)")
    pol, pol_kl = both(model, batch)
    ref, ref_kl = jax.tree.map(jax.lax.stop_gradient, both(nnx.merge(ref_graphdef, extras["ref_params"]), batch))
    labels = batch["labels_B"].astype(jnp.float32)
    kw = {"beta": beta, **hp}
    aux = {}
    if needs_kl:
      kw["kl_ref"] = pref_losses.kto_kl_reference(pol_kl, ref_kl)
      aux["kl"] = kw["kl_ref"]
    if needs_delta:
      kw["delta"] = jax.lax.stop_gradient(extras["bco_delta"]["mean"]) if "bco_delta" in extras else 0.0
      aux["bco_delta"] = jnp.asarray(kw["delta"], jnp.float32)
    if accepted is not None:
      kw = {k: v for k, v in kw.items() if k in accepted}
    value = jnp.mean(fn(pol, ref, labels, **kw))
    reward = beta * (pol - ref)
    good, bad = labels, 1.0 - labels
    mean_of = lambda x, w: (x * w).sum() / jnp.maximum(w.sum(), 1.0)
    aux.update({
        f"loss/{name}": value,
        "rewards/desirable": mean_of(reward, good), "rewards/undesirable": mean_of(reward, bad),
        "rewards/batch_mean": jnp.mean(reward),
        "logps/desirable": mean_of(pol, good), "logps/undesirable": mean_of(pol, bad),
        "weight": jnp.asarray(pol.shape[0], jnp.float32),
    })
    return value, aux

  return loss_fn


def bco_delta_init() -> dict:
  """BCO's running reward mean (``extras["bco_delta"]``): ``{"mean": 0, "count": 0}``."""
  return {"mean": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.float32)}


def bco_delta_update(extras, metrics):
  """``extras_from_metrics`` for BCO: folds the batch's mean implicit reward into the running mean."""
  d = extras["bco_delta"]
  count = d["count"] + 1.0
  mean = d["mean"] + (metrics["rewards/batch_mean"] - d["mean"]) / count
  return {**extras, "bco_delta": {"mean": mean, "count": count}}
