"""Held-out evaluation of train states: SFT, preference (pairs, lists, unpaired) and reward models.

Each ``make_*_eval(graphdef, batches, put_batch, ...)`` returns ``eval_fn(state) -> metrics``
for :func:`rlhf_jax.train.loop.train_loop`. ``batches`` are ``(host_batch, n_real)`` pairs
(:func:`rlhf_jax.train.recipe.fixed_batches`: fixed shapes, the last batch padded by repeating
a row; only the ``n_real`` first rows count). The forward is jitted once per batch shape, and
the state may be a LoRA state (adapters in ``state.params``, the base in
``state.extras["frozen_params"]``).

Metrics:

* SFT: ``nll`` (per completion token), ``perplexity``, ``token_accuracy`` (argmax equals the
  target), ``exact_match`` (every completion token right: greedy decoding reproduces it).
* pairs: ``logp_accuracy`` (the policy's own log-prob of chosen above rejected; meaningful
  before training), ``logp_margin``, and DPO's implicit reward against the reference log-probs
  measured on the initial state: ``reward_accuracy``, ``reward_margin``, ``dpo_loss``
  (``-log σ(β·Δ)``; log 2 before training).
* ranked lists: ``logp_top1_accuracy`` (the best-scored member is strictly the likeliest),
  ``reward_top1_accuracy`` (the same with the implicit reward; 0 before training, when every
  member ties), ``logp_mean``.
* unpaired (KTO): ``label_accuracy`` (the implicit reward's sign matches the label; 0 counts as
  undesirable), ``desirable_logratio``, ``undesirable_logratio``.
* reward models: ``accuracy`` (chosen above rejected, mean over heads), ``margin``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import ops
from rlhf_jax.train.state import FROZEN_PARAMS


def _merge(graphdef, params, extras):
  if isinstance(extras, dict) and FROZEN_PARAMS in extras:
    return nnx.merge(graphdef, params, extras[FROZEN_PARAMS])
  return nnx.merge(graphdef, params)


def _frozen(state):
  extras = state.extras if isinstance(state.extras, dict) else {}
  return {FROZEN_PARAMS: extras[FROZEN_PARAMS]} if FROZEN_PARAMS in extras else None


def _run(forward, state, batches, put_batch) -> dict[str, np.ndarray]:
  """Concatenated per-example outputs of ``forward(params, frozen, batch)`` over the real rows."""
  frozen = _frozen(state)
  outs: dict[str, list] = {}
  for batch, n in batches:
    host = jax.device_get(forward(state.params, frozen, put_batch(batch)))
    for k, v in host.items():
      outs.setdefault(k, []).append(np.asarray(v)[:n])
  return {k: np.concatenate(v) for k, v in outs.items()}


def _sequence_logps(model, ids, targets, mask, chunk):
  hidden, _ = model.hidden_states(ids)
  lp = ops.token_logprobs(hidden, model.unembed_matrix(), targets, chunk_size=chunk)
  return lp, (lp * mask).sum(-1), mask.sum(-1)


# ----------------------------------------------------------------------------- SFT


def make_sft_eval(graphdef, batches: Sequence, put_batch: Callable, *, logprob_chunk_size: int | None = None):
  """Teacher-forced NLL, perplexity, token accuracy and exact match of the completions."""

  @jax.jit
  def forward(params, frozen, batch):
    model = _merge(graphdef, params, frozen)
    hidden, _ = model.hidden_states(batch["input_ids_BxT"])
    lp = ops.token_logprobs(hidden, model.unembed_matrix(), batch["targets_BxT"], chunk_size=logprob_chunk_size)
    mask = batch["loss_mask_BxT"].astype(jnp.float32)
    pred = jnp.argmax(model.logits(hidden), -1)
    right = (pred == batch["targets_BxT"]).astype(jnp.float32) * mask
    return {"nll_B": -(lp * mask).sum(-1), "tokens_B": mask.sum(-1), "right_B": right.sum(-1)}

  def eval_fn(state):
    o = _run(forward, state, batches, put_batch)
    tokens = max(float(o["tokens_B"].sum()), 1.0)
    nll = float(o["nll_B"].sum()) / tokens
    return {"nll": nll, "perplexity": float(np.exp(min(nll, 50.0))),
            "token_accuracy": float(o["right_B"].sum()) / tokens,
            "exact_match": float(np.mean(o["right_B"] == o["tokens_B"]))}

  return eval_fn


# ----------------------------------------------------------------------------- preference


def make_pair_logps(graphdef, *, logprob_chunk_size: int | None = None):
  """Jitted ``forward(params, frozen, batch) -> {"chosen_B", "rejected_B", "chosen_len_B", "rejected_len_B"}``."""

  @jax.jit
  def forward(params, frozen, batch):
    model = _merge(graphdef, params, frozen)
    ids = jnp.concatenate([batch["chosen_input_ids_BxT"], batch["rejected_input_ids_BxT"]], 0)
    targets = jnp.concatenate([batch["chosen_targets_BxT"], batch["rejected_targets_BxT"]], 0)
    mask = jnp.concatenate([batch["chosen_loss_mask_BxT"], batch["rejected_loss_mask_BxT"]], 0).astype(jnp.float32)
    _, seq, length = _sequence_logps(model, ids, targets, mask, logprob_chunk_size)
    b = batch["chosen_input_ids_BxT"].shape[0]
    return {"chosen_B": seq[:b], "rejected_B": seq[b:], "chosen_len_B": length[:b], "rejected_len_B": length[b:]}

  return forward


def pair_metrics(pc, pr, rc, rr, beta: float) -> dict[str, float]:
  """Held-out pair metrics of policy log-probs ``pc, pr`` against reference ``rc, rr`` (NumPy)."""
  margin = beta * ((pc - rc) - (pr - rr))
  return {
      "logp_accuracy": float(np.mean(pc > pr)),
      "logp_margin": float(np.mean(pc - pr)),
      "reward_accuracy": float(np.mean(margin > 0)),
      "reward_margin": float(np.mean(margin)),
      "dpo_loss": float(np.mean(np.logaddexp(0.0, -margin))),
  }


def make_pair_eval(graphdef, batches: Sequence, put_batch: Callable, *, beta: float, reference_state,
                   logprob_chunk_size: int | None = None):
  """Pair metrics; the reference log-probs are those of ``reference_state`` (measured once, now)."""
  forward = make_pair_logps(graphdef, logprob_chunk_size=logprob_chunk_size)
  ref = _run(forward, reference_state, batches, put_batch)

  def eval_fn(state):
    o = _run(forward, state, batches, put_batch)
    return pair_metrics(o["chosen_B"], o["rejected_B"], ref["chosen_B"], ref["rejected_B"], beta)

  return eval_fn


def make_ranked_eval(graphdef, batches: Sequence, put_batch: Callable, *, reference_state,
                     logprob_chunk_size: int | None = None):
  """Listwise metrics over K members (``{...}_BxKxT``, ``scores_BxK``, ``list_mask_BxK``)."""

  @jax.jit
  def forward(params, frozen, batch):
    model = _merge(graphdef, params, frozen)
    ids = batch["input_ids_BxKxT"]
    b, k, t = ids.shape
    mask = batch["loss_mask_BxKxT"].reshape(b * k, t).astype(jnp.float32)
    _, seq, _ = _sequence_logps(model, ids.reshape(b * k, t), batch["targets_BxKxT"].reshape(b * k, t), mask,
                                logprob_chunk_size)
    return {"logps_BxK": seq.reshape(b, k), "scores_BxK": batch["scores_BxK"], "list_mask_BxK": batch["list_mask_BxK"]}

  ref = _run(forward, reference_state, batches, put_batch)

  def eval_fn(state):
    o = _run(forward, state, batches, put_batch)
    live = o["list_mask_BxK"] > 0
    neg = -np.inf
    best = np.argmax(np.where(live, o["scores_BxK"], neg), -1)
    def strictly_first(values):  # the best-scored member strictly above every other live one (ties: wrong)
      v = np.where(live, values, neg)
      top = np.take_along_axis(v, best[:, None], -1)[:, 0]
      others = np.where(np.arange(v.shape[1])[None, :] == best[:, None], neg, v)
      return float(np.mean(top > others.max(-1)))

    return {"logp_top1_accuracy": strictly_first(o["logps_BxK"]),
            "reward_top1_accuracy": strictly_first(o["logps_BxK"] - ref["logps_BxK"]),
            "logp_mean": float(o["logps_BxK"][live].mean())}

  return eval_fn


def make_unpaired_eval(graphdef, batches: Sequence, put_batch: Callable, *, reference_state,
                       logprob_chunk_size: int | None = None):
  """KTO-style metrics on ``unpaired`` examples (SFT keys plus ``labels_B``)."""

  @jax.jit
  def forward(params, frozen, batch):
    model = _merge(graphdef, params, frozen)
    mask = batch["loss_mask_BxT"].astype(jnp.float32)
    _, seq, _ = _sequence_logps(model, batch["input_ids_BxT"], batch["targets_BxT"], mask, logprob_chunk_size)
    return {"logps_B": seq, "labels_B": batch["labels_B"]}

  ref = _run(forward, reference_state, batches, put_batch)

  def eval_fn(state):
    o = _run(forward, state, batches, put_batch)
    ratio = o["logps_B"] - ref["logps_B"]
    good = o["labels_B"] > 0.5
    return {"label_accuracy": float(np.mean((ratio > 0) == good)),
            "desirable_logratio": float(ratio[good].mean()) if good.any() else 0.0,
            "undesirable_logratio": float(ratio[~good].mean()) if (~good).any() else 0.0}

  return eval_fn


# ----------------------------------------------------------------------------- reward models


def make_reward_eval(graphdef, batches: Sequence, put_batch: Callable):
  """Pairwise reward-model accuracy and margin (mean over the K heads) and per-head accuracies."""
  from rlhf_jax.train import reward

  @jax.jit
  def forward(params, frozen, batch):
    rc, rr = reward.pair_rewards(_merge(graphdef, params, frozen), batch)
    return {"chosen_BxK": rc, "rejected_BxK": rr}

  def eval_fn(state):
    o = _run(forward, state, batches, put_batch)
    d = o["chosen_BxK"] - o["rejected_BxK"]
    out = {"accuracy": float(np.mean(d > 0)), "margin": float(d.mean()),
           "reward_mean": float(0.5 * (o["chosen_BxK"] + o["rejected_BxK"]).mean())}
    if d.shape[1] > 1:
      out.update({f"accuracy_head{k}": float(np.mean(d[:, k] > 0)) for k in range(d.shape[1])})
      out["ensemble_accuracy"] = float(np.mean(d.mean(-1) > 0))
    return out

  return eval_fn


# ----------------------------------------------------------------------------- online RL


def make_generation_eval(rollout_fn: Callable, prompts: Sequence[Sequence[int]], score_fn: Callable, *,
                         batch_size: int, prompt_length: int, pad_id: int = 0, seed: int = 0):
  """Mean reward of completions of held-out prompts: ``eval(params) -> (metrics, texts, rewards_B)``.

  ``rollout_fn`` is :func:`rlhf_jax.train.online.make_rollout_fn` (greedy with
  ``processor=None``, else sampled; the key is fixed, so evaluations are comparable);
  ``prompts`` are token lists, decoded in fixed-shape batches of ``batch_size`` (left-padded
  to ``prompt_length``; the last batch repeats a prompt, which is not scored).
  ``score_fn(indices, prompts, tokens_BxN, lengths_B) -> (rewards_B, {name: values_B}, texts)``
  scores the real rows. Metrics: ``reward_mean``, ``reward/<name>`` per reward part and
  ``response_length``.
  """
  from rlhf_jax import sampling

  def evaluate(params):
    totals, parts_all, texts_all, lengths = [], {}, [], []
    for start in range(0, len(prompts), batch_size):
      chunk = list(range(start, min(start + batch_size, len(prompts))))
      rows = chunk + [chunk[-1]] * (batch_size - len(chunk))
      ids, mask = sampling.left_pad([list(prompts[i]) for i in rows], pad_id=pad_id, length=prompt_length)
      ro = rollout_fn(params, ids, mask, jax.random.PRNGKey(seed), np.arange(batch_size))
      n = len(chunk)
      length = ro.response_mask_BxN[:n].sum(-1)
      total, parts, texts = score_fn(chunk, [prompts[i] for i in chunk], ro.tokens_BxN[:n], length)
      totals.append(np.asarray(total, np.float32))
      lengths.append(length)
      texts_all += list(texts)
      for k, v in parts.items():
        parts_all.setdefault(k, []).append(np.asarray(v, np.float32))
    total = np.concatenate(totals)
    out = {"reward_mean": float(total.mean()), "response_length": float(np.concatenate(lengths).mean())}
    out.update({f"reward/{k}": float(np.concatenate(v).mean()) for k, v in parts_all.items()})
    return out, texts_all, total

  return evaluate


class SampleLog:
  """A few held-out completions with their rewards at each evaluation: ``<workdir>/samples.jsonl``
  (one JSON row each: step, prompt, completion, reward) and TensorBoard text (tag ``samples``)."""

  def __init__(self, workdir: str, *, num_samples: int = 4):
    import os

    self.path = os.path.join(workdir, "samples.jsonl")
    self.tb_dir = os.path.join(workdir, "tensorboard")
    self.num_samples = int(num_samples)
    self._tb = None

  def write(self, step: int, prompts: Sequence[str], completions: Sequence[str], rewards) -> None:
    import json

    if not self.num_samples or jax.process_index() != 0:
      return
    rows = [{"step": int(step), "prompt": p, "completion": c, "reward": float(r)}
            for p, c, r in list(zip(prompts, completions, rewards))[: self.num_samples]]
    with open(self.path, "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
    if self._tb is None:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(self.tb_dir)
    text = "\n\n".join(f"**prompt** {r['prompt']}  \n**completion** {r['completion']}  \n**reward** {r['reward']:.3f}"
                       for r in rows)
    self._tb.add_text("samples", text, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
