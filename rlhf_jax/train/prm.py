"""Process reward models (PRMs): a scalar head scores every reasoning step of a solution.

An outcome reward model (`rlhf_jax.train.reward`) reads one score at a sequence's last token;
a process reward model reads one at the end of every step. The model is any policy backbone
with a scalar head (``ModelConfig.scalar_head_outputs >= 1``); the head's output at every token
is a logit of "the solution is still correct after this token", and the batch's
``step_mask_BxT`` picks the tokens that end a step (`rlhf_jax.data.tokenize_steps` builds it
from ``stepwise`` rows). Training is a per-step binary cross-entropy against step labels
(`rlhf_jax.rewards.prm_bce`, mean over the steps of the batch with `rlhf_jax.ops.token_mean`):
hard human labels as PRM800K (Lightman et al. 2023, `Let's Verify Step by Step
<https://arxiv.org/abs/2305.20050>`_), or automatic ones as Math-Shepherd (Wang et al. 2024,
`Math-Shepherd <https://arxiv.org/abs/2312.08935>`_: a step is good when completions from it
can still reach the right answer, so every step after the first error is wrong too; soft
labels in ``[0, 1]`` are the estimated step values).

A PRM is used to rank solutions: the steps' probabilities ``σ(logit)`` are aggregated per
solution (`rlhf_jax.rewards.prm_aggregate`: ``min``, the weakest step, by default as both
papers; ``product``, ``last``, ``mean``) and the best of N candidates is kept. `best_of_n`
measures that selection against the candidates' true correctness and against a random pick.

- `step_logits`: the head's logit at every token, ``[B, T]``.
- `make_prm_loss`: ``loss_fn(model, batch, rng) -> (loss, aux)`` for `rlhf_jax.train.step`.
- `step_metrics`: held-out step accuracy, loss and calibration from logits (NumPy).
- `best_of_n`: best-of-N selection by aggregated step scores vs random and oracle picks.
- `make_prm_eval`: both of the above for a model's parameters, with one compilation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import ops
from rlhf_jax.rewards import heads
from rlhf_jax.rewards import metrics as rm_metrics

__all__ = [
    "PRM_BATCH_KEYS",
    "best_of_n",
    "make_prm_eval",
    "make_prm_loss",
    "make_step_scorer",
    "step_accuracy",
    "step_logits",
    "step_metrics",
]

PRM_BATCH_KEYS = ("input_ids_BxT", "attention_mask_BxT", "step_mask_BxT", "step_labels_BxT")
"""The keys of a PRM batch (`rlhf_jax.data.tokenize_steps`)."""


def _check_head(model, head: int) -> None:
  n = model.config.scalar_head_outputs
  if not n:
    raise ValueError("a process reward model needs a scalar head: set ModelConfig.scalar_head_outputs >= 1 "
                     "(config.model.scalar_head_outputs)")
  if not 0 <= head < n:
    raise ValueError(f"head={head} but the model has {n} scalar head output(s)")


def step_logits(model, input_ids_BxT: jax.Array, attention_mask_BxT: jax.Array, *, head: int = 0) -> jax.Array:
  """The scalar head's logit at every token, ``[B, T]`` fp32 (read the steps with ``step_mask_BxT``).

  Position ``t`` has seen tokens ``≤ t`` (causal attention), so at a step's last token the logit
  judges the prompt and every step up to that one.

  Args:
    model: an NNX transformer with a scalar head (`rlhf_jax.models.Transformer.scalar`).
    input_ids_BxT: token ids (right-padded rows of `rlhf_jax.data.tokenize_steps`).
    attention_mask_BxT: 1 on real tokens.
    head: which scalar output to read (static).

  Returns:
    ``logits_BxT``, float32.
  """
  _check_head(model, head)
  hidden, _ = model.hidden_states(input_ids_BxT, attention_mask_BxT=attention_mask_BxT)
  return model.scalar(hidden)[..., head]


def step_accuracy(step_logits_BxT: jax.Array, step_labels_BxT: jax.Array, step_mask_BxT: jax.Array) -> jax.Array:
  """The fraction of steps whose predicted sign is right: ``(logit > 0) == (label > 0.5)``.

  A mean over the marked steps of the whole batch (float mask values weight the steps, as in
  `rlhf_jax.ops.token_mean`); 0 when no step is marked.
  """
  right = ((step_logits_BxT > 0) == (step_labels_BxT > 0.5)).astype(jnp.float32)
  return ops.token_mean(right, step_mask_BxT)


def make_prm_loss(*, head: int = 0) -> Callable:
  """``loss_fn(model, batch, rng) -> (loss, aux)`` of a process reward model.

  ``loss = token_mean(prm_bce(logits, step_labels, step_mask), step_mask)``: the binary
  cross-entropy of every step's logit against its label (1 correct, 0 wrong, soft labels
  allowed), averaged over all steps of the batch, so each step weighs the same (Lightman et al.
  2023 train on every labelled step; Wang et al. 2024, Math-Shepherd, the same with their
  automatic labels). The ``weight`` metric is the number of steps, so micro-batches average
  exactly (`rlhf_jax.train.step`).

  Batch: ``input_ids_BxT``, ``attention_mask_BxT``, ``step_mask_BxT``, ``step_labels_BxT``
  (`rlhf_jax.data.tokenize_steps`). Metrics (besides the step's ``loss``): ``step_accuracy``
  (`step_accuracy`), ``step_label_mean`` (the fraction of correct steps: the accuracy of
  always answering "correct" is ``max(m, 1 − m)``), ``prob_mean`` (mean ``σ(logit)`` over steps)
  and ``weight``.

  Args:
    head: the scalar output that scores steps (static).
  """

  def loss_fn(model, batch, rng):
    del rng
    logits = step_logits(model, batch["input_ids_BxT"], batch["attention_mask_BxT"], head=head)
    mask = batch["step_mask_BxT"].astype(jnp.float32)
    labels = batch["step_labels_BxT"].astype(jnp.float32)
    loss = ops.token_mean(heads.prm_bce(logits, labels, mask), mask)
    return loss, {
        "step_accuracy": step_accuracy(logits, labels, mask),
        "step_label_mean": ops.token_mean(labels, mask),
        "prob_mean": ops.token_mean(jax.nn.sigmoid(logits), mask),
        "weight": mask.sum(),
    }

  return loss_fn


def make_step_scorer(graphdef: nnx.GraphDef, *, head: int = 0, batch_size: int = 256) -> Callable:
  """``score(params, input_ids_BxT, attention_mask_BxT) -> logits_BxT`` (NumPy), jitted once.

  Rows go through in chunks of ``batch_size`` (the last one padded), so any number of rows
  costs one compilation per row length.
  """
  fn = jax.jit(lambda p, ids, mask: step_logits(nnx.merge(graphdef, p), ids, mask, head=head))

  def score(params, input_ids_BxT, attention_mask_BxT) -> np.ndarray:
    ids, mask = np.asarray(input_ids_BxT), np.asarray(attention_mask_BxT)
    n = ids.shape[0]
    out = []
    for start in range(0, n, batch_size):
      chunk_ids, chunk_mask = ids[start:start + batch_size], mask[start:start + batch_size]
      k = chunk_ids.shape[0]
      if k < batch_size:
        pad = ((0, batch_size - k), (0, 0))
        chunk_ids, chunk_mask = np.pad(chunk_ids, pad), np.pad(chunk_mask, pad)
      out.append(np.asarray(fn(params, chunk_ids, chunk_mask))[:k])
    return np.concatenate(out, 0) if out else np.zeros(ids.shape, np.float32)

  return score


def step_metrics(step_logits_BxT, step_labels_BxT, step_mask_BxT) -> dict[str, float]:
  """Held-out step metrics from logits: accuracy, BCE, per-class accuracy and calibration.

  Steps are where ``step_mask_BxT`` is nonzero (every marked step counts once). Returns
  ``step_accuracy``, ``step_loss`` (mean BCE), ``step_accuracy_correct`` / ``step_accuracy_wrong``
  (accuracy on the steps labelled correct / wrong, ``label > 0.5`` / not), ``step_calibration_error``
  (expected calibration error of ``σ(logit)`` against the labels, `rlhf_jax.rewards.metrics`),
  ``step_label_mean`` and ``num_steps``.
  """
  logits = np.asarray(step_logits_BxT, np.float64)
  labels = np.asarray(step_labels_BxT, np.float64)
  keep = np.asarray(step_mask_BxT) != 0
  if logits.shape != labels.shape or logits.shape != keep.shape:
    raise ValueError(f"shapes differ: logits {logits.shape}, labels {labels.shape}, mask {keep.shape}")
  l, y = logits[keep], labels[keep]
  if not l.size:
    raise ValueError("no step is marked in step_mask_BxT")
  right = (l > 0) == (y > 0.5)
  pos = y > 0.5
  bce = np.logaddexp(0.0, -l) * y + np.logaddexp(0.0, l) * (1.0 - y)
  return {
      "step_accuracy": float(right.mean()),
      "step_loss": float(bce.mean()),
      "step_accuracy_correct": float(right[pos].mean()) if pos.any() else float("nan"),
      "step_accuracy_wrong": float(right[~pos].mean()) if (~pos).any() else float("nan"),
      "step_calibration_error": rm_metrics.calibration_error(1.0 / (1.0 + np.exp(-l)), (y > 0.5).astype(float)),
      "step_label_mean": float(y.mean()),
      "num_steps": float(l.size),
  }


def best_of_n(step_logits_BxT, step_mask_BxT, correct_B, *, num_candidates: int, how: str = "min",
              ns: Sequence[int] | None = None) -> dict[str, dict[int, float]]:
  """Best-of-N by a PRM: the correctness of the candidate with the highest aggregated step score.

  Rows come in groups of ``N = num_candidates`` consecutive rows, the candidate solutions of one
  question. Each row's step probabilities ``σ(logit)`` at its step tokens are packed
  (`rlhf_jax.rewards.prm_step_scores`) and aggregated (`rlhf_jax.rewards.prm_aggregate` with
  ``how``; ``min`` as Lightman et al. 2023 and Math-Shepherd); among the first ``n`` candidates of
  each question the best-scored one is picked (ties: the first).

  Returns:
    ``{"selected": {n: ...}, "random": {n: ...}, "oracle": {n: ...}}``: the fraction of
    questions whose picked candidate is correct, its expectation for a uniformly random pick
    (the mean correctness of the first ``n`` candidates) and for a perfect verifier (any of them
    correct), for each ``n`` in ``ns`` (default 1, 2, 4, ... up to ``N``, and ``N``).

  Raises:
    ValueError: on shapes that do not split into groups of ``N``, or an unknown ``how``.
  """
  logits = np.asarray(step_logits_BxT, np.float32)
  mask = np.asarray(step_mask_BxT)
  correct = np.asarray(correct_B, np.float64)
  b = logits.shape[0]
  if logits.ndim != 2 or mask.shape != logits.shape or correct.shape != (b,):
    raise ValueError(f"need logits [B, T], mask [B, T], correct [B]; got {logits.shape}, {mask.shape}, "
                     f"{correct.shape}")
  if num_candidates < 1 or b % num_candidates:
    raise ValueError(f"{b} rows do not split into questions of num_candidates={num_candidates}")
  if how not in heads.PRM_AGGREGATIONS:
    raise ValueError(f"`how` must be one of {heads.PRM_AGGREGATIONS}; got {how!r}")
  if ns is None:
    ns = sorted({*(2 ** k for k in range(num_candidates.bit_length()) if 2 ** k <= num_candidates),
                 num_candidates})
  max_steps = max(int((mask != 0).sum(-1).max()), 1)
  scores, valid = heads.prm_step_scores(jax.nn.sigmoid(jnp.asarray(logits)), jnp.asarray(mask),
                                        max_steps=max_steps)
  agg = np.asarray(heads.prm_aggregate(scores, valid, how=how), np.float64)
  q = b // num_candidates
  agg_QxN, gold_QxN = agg.reshape(q, num_candidates), correct.reshape(q, num_candidates)
  ns = [int(n) for n in ns]
  return {
      "selected": rm_metrics.best_of_n_curve(agg_QxN, gold_QxN, ns=ns),
      "random": {n: float(gold_QxN[:, :n].mean()) for n in ns},
      "oracle": {n: float(gold_QxN[:, :n].max(1).mean()) for n in ns},
  }


def make_prm_eval(graphdef: nnx.GraphDef, heldout: Mapping[str, Any], *, bon: Mapping[str, Any] | None = None,
                  bon_correct_B=None, num_candidates: int = 1, how: str = "min",
                  hows: Sequence[str] = (), ns: Sequence[int] | None = None, head: int = 0,
                  batch_size: int = 256, scorer: Callable | None = None) -> Callable[[Any], dict[str, Any]]:
  """``evaluate(params) -> metrics``: held-out step metrics and best-of-N selection of a PRM.

  Args:
    graphdef: the model's graph definition (``nnx.split``).
    heldout: a PRM batch of held-out solutions (`PRM_BATCH_KEYS`, NumPy).
    bon: optionally a PRM batch of candidate solutions, ``N = num_candidates`` consecutive rows
      per question, with ``bon_correct_B`` (1 when a candidate's final answer is right).
    num_candidates: ``N``.
    how: the aggregation whose selection is reported as ``bon_selected_n`` (`best_of_n`).
    hows: further aggregations reported as ``bon_<how>_n``.
    ns: the ``n`` of the best-of-n figures (see `best_of_n`).
    head: the scalar output that scores steps.
    batch_size: rows per forward pass (one compilation per row length).
    scorer: a `make_step_scorer` function to share (default: a new one with ``head``, ``batch_size``).

  Returns:
    ``evaluate(params)``: a flat dict of floats, `step_metrics` of the held-out rows and, with
    ``bon``, ``bon_selected_n``, ``bon_random_n``, ``bon_oracle_n`` and ``bon_<how>_n`` for
    ``hows``.
  """
  score = scorer or make_step_scorer(graphdef, head=head, batch_size=batch_size)
  if bon is not None and bon_correct_B is None:
    raise ValueError("`bon` needs `bon_correct_B`")

  def evaluate(params) -> dict[str, Any]:
    logits = score(params, heldout["input_ids_BxT"], heldout["attention_mask_BxT"])
    out: dict[str, Any] = step_metrics(logits, heldout["step_labels_BxT"], heldout["step_mask_BxT"])
    if bon is None:
      return out
    bon_logits = score(params, bon["input_ids_BxT"], bon["attention_mask_BxT"])
    for name in dict.fromkeys((how, *hows)):
      r = best_of_n(bon_logits, bon["step_mask_BxT"], bon_correct_B, num_candidates=num_candidates, how=name,
                    ns=ns)
      for n, v in r["selected"].items():
        out[f"bon_{name}_{n}"] = v
        if name == how:
          out[f"bon_selected_{n}"] = v
      for kind in ("random", "oracle"):
        out.update({f"bon_{kind}_{n}": v for n, v in r[kind].items()})
    return out

  return evaluate
