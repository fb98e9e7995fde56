"""A process reward model (PRM) trained from scratch on solutions whose step correctness is known.

Task: a question is a list of digits ("3 7 5 2"); a solution keeps the running sum modulo 10,
one step a line ("3+7=0", "0+5=5", "5+2=7"). Half the training solutions carry one injected
error (`ERROR_KINDS`; by default a step that subtracts where the question asks for a sum,
"0-2=8"); the steps after it carry on from the wrong value, so their arithmetic is locally right
but the solution is already lost, and they are labelled wrong too, as Math-Shepherd's automatic
labels do (Wang et al. 2024, https://arxiv.org/abs/2312.08935; Lightman et al. 2023, "Let's
Verify Step by Step", https://arxiv.org/abs/2305.20050, label every step by hand). Rows are
``stepwise`` examples rendered by the byte-level tokenizer's ChatML template
(`rlhf_jax.data.tokenize_steps`: a step's score is read at its last token); the model is the tiny
transformer with a scalar head, trained from scratch with the per-step BCE of
`rlhf_jax.train.prm.make_prm_loss`.

Command:
  python -m rlhf_jax.run experiments/prm_tiny.py --workdir runs/prm_tiny
  python -m rlhf_jax.run experiments/prm_tiny.py:runlocal --workdir runs/prm_tiny_local

Hardware: 2 CPU cores (shared with other jobs, load 5-8 while measured). The headline of
``<workdir>/result.json`` is the held-out step accuracy (512 held-out solutions, 256 with
``:runlocal``, every step counted) of the initial and the trained model, next to
``heldout_majority_baseline`` (always answering the commoner label: 0.68-0.69) and
``heldout_by_error`` (accuracy on the solutions of each error kind). ``best_of_n`` holds, for 256
held-out questions (128) with 8 candidate solutions each (each wrong with probability 3/4), the
fraction of questions whose candidate picked by the PRM (``min`` over the steps' probabilities;
``by_aggregation`` for min/last/product/mean) is right, against a random pick and an oracle (any
candidate right). Measured (seed 0):

=========================================================  =====  ===============  =================================
run                                                        wall   step accuracy    best-of-8 right: PRM / random /
                                                                  before → after   oracle (untrained PRM)
=========================================================  =====  ===============  =================================
default (400 steps)                                        89 s   0.330 → 1.000    0.930 / 0.257 / 0.930 (0.129)
``:runlocal`` (150 steps)                                  57 s   0.324 → 1.000    0.891 / 0.247 / 0.891 (0.125)
``--config.num_steps=1000``                                189 s  0.311 → 0.865    0.344 / 0.257 / 0.930 (0.121)
``--config.data.error_kinds="('operator','carry')"``
=========================================================  =====  ===============  =================================

The default errors are found from one token (the operator), so the tiny model learns them within
about 40 steps; what it learns is the PRM's own job: locating the step ends, judging each step,
and marking every step after an error wrong. ``carry`` and ``arithmetic`` errors are relational
(two digits compared or added modulo 10) and this 2-layer, width-64 model does not learn them in
1000 steps from scratch: in the mixed run the solutions with a carry error score 0.37 (their
steps before the error only), those with an operator error 1.0. tests/test_prm.py runs
``:runlocal`` (on 8 fake CPU devices) and asserts a step accuracy of at least 0.85, 0.1 above
the majority baseline, and a best-of-8 pick 0.3 above random. A run stopped by SIGTERM exits
143 after a checkpoint and the next run resumes from it (measured: stopped at step 70, resumed,
same headline); a rerun of a finished workdir reports the same figures.
"""

import os

import ml_collections
import numpy as np

from rlhf_jax import data, models, parallel
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.errors import ConfigError
from rlhf_jax.rewards import heads
from rlhf_jax.train import loop, optim, prm, state as state_lib, step as step_lib, writers


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.progress = True
  c.num_steps = 400
  c.batch_size = 32
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  # The byte-level tokenizer has 259 ids (bytes + ChatML specials).
  c.model = ml_collections.ConfigDict(dict(name="tiny", vocab_size=259, scalar_head_outputs=1, dtype="float32"))
  c.optimizer = ml_collections.ConfigDict(dict(learning_rate=3e-3, warmup_steps=50, schedule="cosine",
                                               end_value_ratio=0.05, weight_decay=0.0, max_grad_norm=1.0))
  c.data = ml_collections.ConfigDict(dict(
      num_train=1 << 16,  # generated on the fly; distinct from the held-out questions
      min_terms=3, max_terms=7,  # digits per question: 2 to 6 steps
      modulus=10,
      error_prob=0.5,  # a training solution has one injected error with this probability
      error_kinds=("operator",),  # drawn uniformly; see ERROR_KINDS
      seq_len=72,
      step_separator="\n",
      seed=0,
  ))
  c.eval = ml_collections.ConfigDict(dict(
      num_solutions=512,
      bon_questions=256, bon_candidates=8,
      bon_error_prob=0.75,  # each candidate is wrong with this probability
      aggregation="min",  # how best-of-N ranks candidates (rlhf_jax.rewards.PRM_AGGREGATIONS)
      every=0,  # > 0: held-out metrics every this many steps (eval/... in metrics.jsonl)
  ))
  c.checkpoint_every = 100
  if arg == "runlocal":
    c.num_steps = 150
    c.eval.num_solutions, c.eval.bon_questions = 256, 128
  elif arg not in (None, ""):
    raise ConfigError(f"unknown experiment argument {arg!r}; valid: 'runlocal'")
  return c


# ----------------------------------------------------------------------------- the task


ERROR_KINDS = ("operator", "carry", "arithmetic")
"""How a step goes wrong: ``operator``, it subtracts its term where the question asks for a sum
(``"7-3=4"``; only at a term ``t`` with ``2t ≢ 0``, so that the value changes); ``carry``, it starts
from another value than the previous step's result (its own sum right); ``arithmetic``, its sum is
wrong. The last two are relational (two digits must be compared or added), which the tiny model
of this experiment does not learn in a few hundred steps; the first is found by reading one
token, and what is learnt is the PRM's own job: locating the step ends, judging each step, and
marking every later step wrong."""


def solution(terms, *, error_at: int = -1, kind: str = "operator", offset: int = 1, modulus: int = 10) -> dict:
  """The ``stepwise`` running-sum solution of ``terms``, with one error of ``kind`` at step ``error_at``.

  Step ``j`` (1-based, one per term after the first) is ``"{sum}+{term}={result}"``. At step
  ``error_at`` (-1: none) the step subtracts (``kind="operator"``), or the value it starts from
  (``"carry"``) or its result (``"arithmetic"``) is off by ``offset``; the later steps carry on
  from the wrong value, locally right. A step is labelled correct (1.0) exactly when no step up to
  it is wrong (Math-Shepherd's labels: the right answer can no longer be reached).
  """
  if kind not in ERROR_KINDS:
    raise ValueError(f"kind={kind!r}; valid: {ERROR_KINDS}")
  total, steps, labels = int(terms[0]), [], []
  for j in range(1, len(terms)):
    here = j == error_at
    if here and kind == "carry":
      total = (total + offset) % modulus
    op, sign = ("-", -1) if here and kind == "operator" else ("+", 1)
    result = (total + sign * int(terms[j]) + (offset if here and kind == "arithmetic" else 0)) % modulus
    steps.append(f"{total}{op}{int(terms[j])}={result}")
    labels.append(0.0 if 0 < error_at <= j else 1.0)
    total = result
  return {"kind": "stepwise", "prompt": [{"role": "user", "content": " ".join(str(int(t)) for t in terms)}],
          "steps": steps, "labels": labels, "error": kind if error_at > 0 else "none"}


def random_terms(rng: np.random.Generator, *, min_terms: int, max_terms: int, modulus: int) -> list[int]:
  k = int(rng.integers(min_terms, max_terms + 1))
  return [int(x) for x in rng.integers(0, modulus, size=k)]


def random_solution(rng: np.random.Generator, terms, *, error_prob: float, error_kinds, modulus: int) -> dict:
  """`solution` of ``terms`` with, with probability ``error_prob``, one error: its kind uniform over
  ``error_kinds``, its step uniform over the steps where it changes the value, a nonzero offset."""
  if rng.random() < error_prob:
    kind = str(error_kinds[int(rng.integers(len(error_kinds)))])
    steps = [j for j in range(1, len(terms)) if kind != "operator" or (2 * terms[j]) % modulus]
    if steps:  # (an operator error needs a term t with 2t != 0 mod m)
      return solution(terms, error_at=int(steps[int(rng.integers(len(steps)))]), kind=kind,
                      offset=int(rng.integers(1, modulus)), modulus=modulus)
  return solution(terms, modulus=modulus)


class RunningSumSolutions:
  """An indexable dataset of `random_solution` examples, example ``i`` drawn from ``[seed, i]``."""

  def __init__(self, n: int, *, seed: int, error_prob: float, error_kinds, min_terms: int, max_terms: int,
               modulus: int):
    self.n, self.seed = int(n), int(seed)
    self.kw = dict(min_terms=min_terms, max_terms=max_terms, modulus=modulus, error_prob=error_prob,
                   error_kinds=tuple(error_kinds))

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    rng = np.random.default_rng([self.seed, int(i)])
    kw = self.kw
    terms = random_terms(rng, min_terms=kw["min_terms"], max_terms=kw["max_terms"], modulus=kw["modulus"])
    return random_solution(rng, terms, error_prob=kw["error_prob"], error_kinds=kw["error_kinds"],
                           modulus=kw["modulus"])


def _check(config, tok):
  d, e = config.data, config.eval
  if not 2 <= d.min_terms <= d.max_terms:
    raise ConfigError(f"config.data.min_terms={d.min_terms}, max_terms={d.max_terms}: need 2 <= min <= max")
  if not 2 <= d.modulus <= 10:
    raise ConfigError(f"config.data.modulus={d.modulus}: need 2..10 (single digits)")
  if not d.error_kinds or any(k not in ERROR_KINDS for k in d.error_kinds):
    raise ConfigError(f"config.data.error_kinds={tuple(d.error_kinds)!r}: a non-empty tuple of {ERROR_KINDS}")
  if not 0.0 <= d.error_prob <= 1.0 or not 0.0 <= e.bon_error_prob <= 1.0:
    raise ConfigError(f"config.data.error_prob={d.error_prob}, config.eval.bon_error_prob={e.bon_error_prob}: "
                      "probabilities in [0, 1]")
  if e.aggregation not in heads.PRM_AGGREGATIONS:
    raise ConfigError(f"config.eval.aggregation={e.aggregation!r}; valid: {heads.PRM_AGGREGATIONS}")
  if config.model.vocab_size < tok.vocab_size:
    raise ConfigError(f"config.model.vocab_size={config.model.vocab_size} < the tokenizer's {tok.vocab_size}")


def main(config, workdir):
  """Trains the PRM (resuming from ``<workdir>/checkpoints``), then evaluates it and writes result.json.

  A run stopped by SIGTERM/SIGINT returns its preempted result after a checkpoint, before the
  final evaluation (``python -m rlhf_jax.run`` exits 143/130); the next run resumes.
  """
  with loop._StopFlag():  # a signal during the set-up or the "before" evaluation stops the loop at once
    return _run(config, workdir)


def _run(config, workdir):
  tok = models.Tokenizer.byte_level()
  _check(config, tok)
  d, e = config.data, config.eval
  mesh = parallel.make_mesh(dict(config.mesh))
  cfg = models.config_from_section(config.model)
  gen = dict(min_terms=d.min_terms, max_terms=d.max_terms, modulus=d.modulus, error_kinds=tuple(d.error_kinds))
  tok_kw = dict(max_len=d.seq_len, pad_id=tok.pad_id, step_separator=d.step_separator)
  collate = data.make_collate("stepwise", tok, **tok_kw)
  put = lambda b: parallel.host_local_to_global(b, mesh)

  tx, sched = optim.make_optimizer(dict(config.optimizer), total_steps=config.num_steps)
  graphdef, state, shardings = state_lib.create_train_state(
      models.create_sharded_model(cfg, mesh, seed=config.seed), tx, mesh=mesh, seed=config.seed)
  train_step = step_lib.make_train_step(prm.make_prm_loss(), tx, graphdef, mesh=mesh, state_shardings=shardings,
                                        learning_rate_fn=sched)
  train = RunningSumSolutions(d.num_train, seed=d.seed, error_prob=d.error_prob, **gen)
  batches = data.BatchIterator.from_dataset(train, batch_size=config.batch_size, seed=config.seed, collate=collate)

  # Held-out solutions (other seeds than the training stream) and best-of-N candidates.
  held = RunningSumSolutions(e.num_solutions, seed=d.seed + 7777, error_prob=d.error_prob, **gen)
  held_rows = [held[i] for i in range(len(held))]
  held_batch = data.tokenize_steps(held_rows, tok, **tok_kw)
  bon_batch, bon_correct = _bon_candidates(d.seed + 9999, e.bon_questions, e.bon_candidates, e.bon_error_prob,
                                           tok, tok_kw, **gen)
  others = tuple(h for h in heads.PRM_AGGREGATIONS if h != e.aggregation)
  score = prm.make_step_scorer(graphdef)
  evaluate = prm.make_prm_eval(graphdef, held_batch, bon=bon_batch, bon_correct_B=bon_correct,
                               num_candidates=e.bon_candidates, how=e.aggregation, hows=others, scorer=score)
  # The initial model's figures, before the loop (the step donates the state; a resumed loop replaces it).
  before = evaluate(state.params)

  ck = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1)
  try:
    result = loop.train_loop(step_fn=train_step, state=state, batches=batches, num_steps=config.num_steps,
                             workdir=workdir, put_batch=put, checkpointer=ck, state_shardings=shardings,
                             checkpoint_every=config.checkpoint_every, progress=config.progress,
                             eval_fn=(lambda st: evaluate(st.params)) if e.every else None, eval_every=e.every,
                             data_stats=collate.stats, run_config=config,
                             plot_keys=("loss", "step_accuracy", "eval/step_accuracy", "grad_norm"))
  finally:
    ck.close()
  if result.preempted:
    return result

  after = evaluate(result.state.params)
  n = e.bon_candidates
  label_mean = after["step_label_mean"]
  out = {
      "headline": writers.make_headline("step_accuracy", before["step_accuracy"], after["step_accuracy"]),
      "heldout": {k: v for k, v in after.items() if not k.startswith("bon_")},
      "heldout_majority_baseline": max(label_mean, 1.0 - label_mean),  # always answering the commoner label
      "heldout_by_error": _by_error(score, result.state.params, held_rows, held_batch),
      "heldout_before": {k: v for k, v in before.items() if not k.startswith("bon_")},
      "best_of_n": {
          "aggregation": e.aggregation,
          "num_candidates": n,
          "selected": after[f"bon_selected_{n}"],
          "selected_before": before[f"bon_selected_{n}"],
          "random": after[f"bon_random_{n}"],
          "oracle": after[f"bon_oracle_{n}"],
          "by_aggregation": {h: after[f"bon_{h}_{n}"] for h in heads.PRM_AGGREGATIONS},
          "curve": {k.rsplit("_", 1)[1]: v for k, v in after.items() if k.startswith("bon_selected_")},
      },
  }
  final_eval = {"step_accuracy": after["step_accuracy"], "step_loss": after["step_loss"],
                "step_accuracy_wrong": after["step_accuracy_wrong"],
                f"best_of_{n}_{e.aggregation}": after[f"bon_selected_{n}"],
                f"best_of_{n}_random": after[f"bon_random_{n}"]}
  writers.write_result(workdir, out, train_metrics=result.last_metrics, eval_metrics=final_eval)
  result.eval_metrics = {**after, "step_accuracy_before": before["step_accuracy"]}
  return result


def _by_error(score, params, rows, batch) -> dict:
  """Held-out step accuracy of the solutions of each error kind (``none``: no error)."""
  logits = score(params, batch["input_ids_BxT"], batch["attention_mask_BxT"])
  out = {}
  for kind in sorted({r["error"] for r in rows}):
    sel = np.asarray([r["error"] == kind for r in rows])
    m = prm.step_metrics(logits[sel], batch["step_labels_BxT"][sel], batch["step_mask_BxT"][sel])
    out[kind] = {"step_accuracy": m["step_accuracy"], "num_solutions": int(sel.sum())}
  return out


def _bon_candidates(seed, questions, candidates, error_prob, tok, tok_kw, *, error_kinds, min_terms, max_terms,
                    modulus):
  """``candidates`` solutions of each of ``questions`` questions (same digits, independent errors), tokenised."""
  rows = []
  for q in range(questions):
    terms = random_terms(np.random.default_rng([seed, q]), min_terms=min_terms, max_terms=max_terms,
                         modulus=modulus)
    rows += [random_solution(np.random.default_rng([seed, q, c]), terms, error_prob=error_prob,
                             error_kinds=error_kinds, modulus=modulus) for c in range(candidates)]
  correct = np.asarray([ex["labels"][-1] for ex in rows], np.float32)  # the last step right: the answer right
  return data.tokenize_steps(rows, tok, **tok_kw), correct
