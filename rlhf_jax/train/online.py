"""Online RL: sample → score → advantages → minibatch epochs of policy updates.

The pieces are pure functions composed by an experiment (see
``experiments/grpo_tiny.py``), not a trainer class:

* :func:`make_rollout_fn` turns prompts into a :class:`Rollout` (jitted KV-cache
  sampling, with the sampler's per-token log-probs);
* a host ``reward_fn`` scores decoded completions (verifier, reward model, or both);
* an estimator from :mod:`rlhf_jax.advantages` turns rewards into advantages;
* :func:`make_policy_loss` is the step's loss: a per-token policy objective from
  :mod:`rlhf_jax.losses` (``vanilla`` PPO clip, ``gspo``, ``cispo``, ...), a named
  aggregation, an optional KL-to-reference term and entropy bonus;
* :func:`minibatches` yields the epochs × minibatches the step runs on.

Sequences are ``[prompt (left-padded) | completion (right-padded)]``. The trainer
rows are ``input_ids = seq[:, :-1]`` and ``targets = seq[:, 1:]``; the completion's
log-probs are the last ``N`` target positions, aligned with the sampler's.
"""

from __future__ import annotations

import inspect

import logging
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import losses as losses_lib
from rlhf_jax import ops
from rlhf_jax.sampling import make_generate_fn
from rlhf_jax.train.loop import NonFiniteError, _any_process, _StopFlag

log = logging.getLogger("rlhf_jax")


class Rollout(NamedTuple):
  """One batch of samples (numpy, host side).

  Attributes:
    input_ids_BxT / attention_mask_BxT / targets_BxT: trainer rows, ``T = P + N - 1``.
    response_mask_BxN: 1 on generated tokens up to and including EOS.
    tokens_BxN: the generated tokens.
    sampler_logps_BxN: the sampler's log-probs of those tokens.
    group_ids_B: which prompt each sample answers.
  """

  input_ids_BxT: np.ndarray
  attention_mask_BxT: np.ndarray
  targets_BxT: np.ndarray
  response_mask_BxN: np.ndarray
  tokens_BxN: np.ndarray
  sampler_logps_BxN: np.ndarray
  group_ids_B: np.ndarray


def make_rollout_fn(graphdef, *, max_new_tokens: int, processor, eos_id: int | None, pad_id: int = 0):
  """``rollout(params, prompt_ids_BxP, prompt_mask_BxP, rng, group_ids_B) -> Rollout``."""
  generate = make_generate_fn(graphdef, max_new_tokens=max_new_tokens, processor=processor,
                              eos_id=eos_id, pad_id=pad_id)

  def rollout(params, prompt_ids_BxP, prompt_mask_BxP, rng, group_ids_B) -> Rollout:
    gen = jax.device_get(generate(params, prompt_ids_BxP, prompt_mask_BxP, rng))
    seq = np.concatenate([np.asarray(prompt_ids_BxP), gen.tokens_BxN], 1)
    mask = np.concatenate([np.asarray(prompt_mask_BxP), gen.mask_BxN], 1).astype(np.int32)
    return Rollout(
        input_ids_BxT=seq[:, :-1].astype(np.int32), attention_mask_BxT=mask[:, :-1],
        targets_BxT=seq[:, 1:].astype(np.int32), response_mask_BxN=gen.mask_BxN.astype(np.float32),
        tokens_BxN=gen.tokens_BxN, sampler_logps_BxN=gen.logps_BxN.astype(np.float32),
        group_ids_B=np.asarray(group_ids_B, np.int32),
    )

  return rollout


def response_logps(model, batch, num_response_tokens: int, *, logprob_chunk_size=None, with_entropy=False):
  """Per-token log-probs (and entropies) of the response tokens ``[B, N]``."""
  hidden, _ = model.hidden_states(batch["input_ids_BxT"], attention_mask_BxT=batch["attention_mask_BxT"])
  hidden = hidden[:, -num_response_tokens:]
  targets = batch["targets_BxT"][:, -num_response_tokens:]
  return ops.token_logprobs(hidden, model.unembed_matrix(), targets, chunk_size=logprob_chunk_size,
                            return_entropy=with_entropy)


def make_logps_fn(graphdef, num_response_tokens: int, *, logprob_chunk_size=None):
  """Jitted ``logps(params, batch) -> [B, N]`` for old-policy or reference log-probs."""

  @jax.jit
  def logps(params, batch):
    return response_logps(nnx.merge(graphdef, params), batch, num_response_tokens,
                          logprob_chunk_size=logprob_chunk_size)

  return logps


_TOKEN_CLIP_LOSSES = ("vanilla", "clip_cov")  # PPO's clip of the token ratio
_RATIO_KEYS = ("approx_kl", "ppo_kl", "ratio_mean", "ratio_min", "ratio_max")
_CLIP_KEYS = ("clip_fraction", "clip_fraction_lower", "clip_fraction_low", "clip_fraction_high")


def _clip_metric_args(name, fn, hp) -> tuple[dict, tuple[str, ...]]:
  """Arguments of `losses.policy.ppo_clip_fraction` for a policy loss, and the keys to log.

  The clip fractions are reported for the losses that clip as PPO does (``vanilla``,
  ``clip_cov``: the token ratio; ``gspo``: the sequence ratio), with the loss's own clip range
  (its hyper-parameters, else its defaults); the other losses (CISPO's clipped weights, SAPO's
  gate, GMPO's log-space clip, REINFORCE, ...) log the ratio statistics and KL estimates only.
  """
  if name not in (*_TOKEN_CLIP_LOSSES, "gspo"):
    return {}, _RATIO_KEYS
  defaults = {k: v.default for k, v in inspect.signature(fn).parameters.items()
              if v.default is not inspect.Parameter.empty}
  args = {k: hp.get(k, defaults.get(k)) for k in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_c")
          if k in defaults}
  if name == "gspo":
    args["level"] = "sequence"
  args.setdefault("clip_ratio_c", None)
  return args, _RATIO_KEYS + _CLIP_KEYS


def make_policy_loss(
    *,
    num_response_tokens: int,
    policy_loss: str | Callable = "vanilla",
    aggregation: str = "token-mean",
    policy_hparams: dict | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    logprob_chunk_size: int | None = None,
    rollout_correction: dict | None = None,
):
  """``loss_fn(model, batch, rng) -> (loss, aux)`` for online policy updates.

  The batch holds the trainer rows, ``response_mask_BxN``, ``old_logps_BxN``,
  ``advantages_BxN`` and, with ``kl_coef > 0``, ``ref_logps_BxN``. The loss is
  ``agg(policy_loss) + kl_coef·agg(kl) − entropy_coef·agg(entropy)`` with the
  named aggregation (verl's ``loss_agg_mode``). Metrics: ``pg_loss``, ``kl``,
  ``entropy``, and from `losses.policy.ppo_clip_fraction` the ratio statistics and KL estimates
  to the old policy (``approx_kl``, ``ppo_kl``, ``ratio_mean``/``min``/``max``) and, for the
  losses that clip as PPO does, the clip fractions with the loss's own clip range.

  ``rollout_correction`` (e.g. ``dict(level="token", cap=2.0, mode="truncate")``)
  corrects the mismatch between the sampler and the trainer (different kernels,
  precisions or layouts): with old log-probs recomputed by the trainer, each
  token's loss is weighted by the truncated (TIS) or masked importance weight
  ``π_trainer / π_sampler`` (:func:`rlhf_jax.losses.policy.truncated_importance_weights`);
  the batch then carries ``sampler_logps_BxN`` too.
  """
  pl = losses_lib.get(policy_loss) if isinstance(policy_loss, str) else policy_loss
  kl_fn = losses_lib.kl.kl_penalty
  agg = ops.get_aggregation(aggregation)
  hp = dict(policy_hparams or {})
  clip_args, metric_keys = _clip_metric_args(policy_loss, pl, hp)

  def loss_fn(model, batch, rng):
    del rng
    logps, entropy = response_logps(model, batch, num_response_tokens, logprob_chunk_size=logprob_chunk_size,
                                    with_entropy=True)
    mask = batch["response_mask_BxN"]
    pg = pl(logps, batch["old_logps_BxN"], batch["advantages_BxN"], mask, **hp)
    aux = {}
    if rollout_correction:
      w = losses_lib.policy.truncated_importance_weights(batch["old_logps_BxN"], batch["sampler_logps_BxN"], mask,
                                                          **rollout_correction)
      pg = pg * w
      aux["rollout_is_weight"] = ops.token_mean(w, mask)
    loss = agg(pg, mask)
    aux.update(pg_loss=loss, entropy=ops.token_mean(entropy, mask))
    if kl_coef:
      kl = kl_fn(logps, batch["ref_logps_BxN"], kind=kl_estimator)
      kl_value = agg(kl, mask)
      loss = loss + kl_coef * kl_value
      aux["kl"] = kl_value
    if entropy_coef:
      loss = loss - entropy_coef * agg(entropy, mask)
    ratio_metrics = losses_lib.policy.ppo_clip_fraction(
        logps, batch["old_logps_BxN"], batch["advantages_BxN"], mask, **clip_args)
    aux.update({k: ratio_metrics[k] for k in metric_keys})
    aux["weight"] = ops.aggregation_weight(aggregation, mask)
    return loss, aux

  return loss_fn


def minibatches(batch: dict[str, np.ndarray], *, num_minibatches: int, epochs: int, seed: int) -> Iterator[dict]:
  """``epochs`` passes over ``batch`` in ``num_minibatches`` shuffled slices (host side)."""
  b = len(next(iter(batch.values())))
  if b % num_minibatches:
    raise ValueError(f"rollout batch {b} is not divisible by num_minibatches={num_minibatches}")
  size = b // num_minibatches
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    perm = rng.permutation(b)
    for i in range(num_minibatches):
      idx = perm[i * size:(i + 1) * size]
      yield {k: v[idx] for k, v in batch.items()}


def sequence_rewards(rewards) -> np.ndarray:
  """``[B]`` sequence rewards: the rewards themselves, or the totals of dense ``[B, N]`` token rewards
  (what the outcome advantage estimators, group statistics and sample weights see)."""
  rewards = np.asarray(rewards, np.float32)
  return rewards.sum(-1) if rewards.ndim == 2 else rewards


def group_stats(rewards_B: np.ndarray, group_ids_B: np.ndarray) -> dict[str, float]:
  """Reward mean/std and the fraction of groups whose rewards all agree (zero advantage)."""
  groups = np.unique(group_ids_B)
  same = np.mean([np.ptp(rewards_B[group_ids_B == g]) == 0 for g in groups])
  return {"reward_mean": float(rewards_B.mean()), "reward_std": float(rewards_B.std()),
          "zero_variance_groups": float(same)}


def run_online(
    *,
    state,
    state_shardings,
    graphdef,
    step_fn: Callable,
    rollout_fn: Callable,
    prompt_fn: Callable[[int], tuple[list, np.ndarray]],
    reward_fn: Callable[[list, np.ndarray, np.ndarray], np.ndarray],
    advantage_fn: Callable[..., np.ndarray] | None,
    num_iterations: int,
    workdir: str,
    put_batch: Callable[[dict], dict],
    seed: int = 0,
    epochs: int = 1,
    num_minibatches: int = 1,
    old_logps: str = "sampler",
    ref_params=None,
    logprob_chunk_size: int | None = None,
    checkpointer=None,
    checkpoint_every: int = 0,
    eval_fn: Callable | None = None,
    eval_every: int = 0,
    dynamic_sampling_max_tries: int = 0,
    prompt_length: int | None = None,
    pad_id: int = 0,
    progress: bool = True,
    policy_params_fn: Callable = lambda params: params,
    state_params_fn: Callable | None = None,
    policy_graphdef=None,
    batch_fn: Callable | None = None,
    sample_weight_fn: Callable | None = None,
    sample_shardings=None,
    run_config=None,
    max_nonfinite_streak: int = 10,
    plot_keys: tuple[str, ...] = ("reward_mean", "eval/accuracy", "kl", "entropy", "clip_fraction", "response_length"),
):
  """The online loop shared by GRPO-style algorithms (PPO adds a critic around it).

  One iteration: ``prompt_fn(i) -> (prompts, group_ids_B)`` (one entry per sample:
  each prompt repeated G times), ``rollout_fn`` samples, ``reward_fn(prompts,
  tokens_BxN, lengths_B) -> rewards_B`` scores on the host (or dense ``[B, N]`` token
  rewards: ``batch_fn`` of PPO credits them per token, the outcome estimators and the group
  statistics see their totals, `sequence_rewards`), ``advantage_fn(rewards_B,
  mask_BxN, group_ids_B) -> advantages_BxN``, then ``epochs`` × ``num_minibatches``
  calls of ``step_fn``. ``old_logps="sampler"`` trains against the sampler's
  log-probs; ``"recompute"`` recomputes them with the trainer's forward.
  ``dynamic_sampling_max_tries > 0`` (DAPO) redraws prompts (``prompt_fn(i, try)``)
  until every kept group has non-identical rewards or the tries run out.
  Actor-critic training (PPO) passes ``policy_params_fn`` (the policy's part of
  ``state.params``, used for sampling and log-probs, with ``policy_graphdef``)
  and ``batch_fn(state, batch, rewards_B, rollout) -> (state, batch)``, which
  replaces ``advantage_fn``: it adds values, returns and advantages (GAE) and
  may update algorithm state in ``state.extras`` (e.g. running reward statistics).
  ``state_params_fn(state) -> params`` replaces ``policy_params_fn`` when the policy's
  parameters are not all in ``state.params``: a LoRA state's adapters merged with the frozen
  base in ``state.extras`` (the step donates the state, so the base must be read from the
  current one). ``ref_params`` (for ``ref_logps_BxN``) is a parameter state or a function
  ``ref_params(state) -> params`` of the same kind.
  ``sample_shardings`` (e.g. ``parallel.state_shardings(params, mesh, SAMPLE_RULES)``)
  moves the policy weights into the sampling layout before each rollout, a
  device-to-device reshard (HybridFlow's separate generation layout).
  ``sample_weight_fn(rewards_B, group_ids_B) -> weights_B`` (e.g. PF-PPO's
  :func:`pf_ppo_weights`) scales each sample's response mask; 0 drops it.
  Prompts are left-padded to ``prompt_length`` (fixed shapes: one compilation;
  needed to merge draws under dynamic sampling), or to the longest prompt.
  Resumes from the newest checkpoint (the iteration index is the data position),
  printing ``resumed from iteration N of M (<checkpoint dir>)`` or ``already
  complete at iteration N (<checkpoint dir>): nothing to train``. ``run_config``
  (the run's config, a dict or ``ConfigDict``) is saved as ``<workdir>/run_config.json``
  and checked on a resume as in :func:`rlhf_jax.train.loop.train_loop`.
  After ``max_nonfinite_streak`` consecutive skipped (non-finite) updates the run stops
  with :class:`rlhf_jax.train.loop.NonFiniteError`.
  SIGTERM / SIGINT end the loop after the current iteration with a checkpoint (a signal
  already received by an enclosing ``loop._StopFlag``, between an experiment's stages,
  ends it before its first iteration); the result (an :class:`OnlineResult`, which
  unpacks as ``state, last_metrics``) then has
  ``preempted=True`` and the ``signum``.
  Metrics per iteration: rewards, zero-variance group fraction, response
  length, sampling and training tokens/s, and the step's metrics (averaged).
  """
  import os
  import time

  from rlhf_jax.train.loop import progress_bar, resume_message, resume_run
  from rlhf_jax.train.writers import MetricWriter, plot_curves

  state, data_state, resume = resume_run(workdir=workdir, checkpointer=checkpointer, state=state,
                                         state_shardings=state_shardings, run_config=run_config)
  start = int((data_state or {}).get("iteration", 0))
  main = jax.process_index() == 0
  if resume is not None and main:
    print(resume_message(start, num_iterations, checkpointer.directory, unit="iteration"), flush=True)
  writer = MetricWriter(workdir, enabled=main, resume_step=start)  # drops rows beyond `start`: one run per file
  num_n = None
  logps_fn = ref_fn = None
  params_of_state = state_params_fn or (lambda s: policy_params_fn(s.params))
  policy_graphdef = graphdef if policy_graphdef is None else policy_graphdef
  bar = progress_bar(progress, total=num_iterations, initial=start, desc="online")
  last = {}
  done = start
  with _StopFlag() as stop:  # SIGTERM / SIGINT: finish the iteration, save, return (handlers restored on any exit)
    for it in range(start, num_iterations):
      # Checked before each iteration: a signal that arrived before the loop (between the
      # stages of an experiment, see `loop._StopFlag`) stops it before its first iteration.
      if _any_process(stop.signum is not None):
        break
      t0 = time.perf_counter()
      keep_rollouts = []
      for attempt in range(max(dynamic_sampling_max_tries, 1)):
        prompts, group_ids = prompt_fn(it) if attempt == 0 else prompt_fn(it, attempt)
        from rlhf_jax.sampling import left_pad

        ids, pmask = left_pad(prompts, pad_id=pad_id, length=prompt_length)
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), it * 1000 + attempt)
        sample_params = params_of_state(state)
        if sample_shardings is not None:
          sample_params = jax.device_put(sample_params, sample_shardings)
        ro = rollout_fn(sample_params, ids, pmask, rng, group_ids)
        rewards = np.asarray(reward_fn(prompts, ro.tokens_BxN, ro.response_mask_BxN.sum(-1)), np.float32)
        if dynamic_sampling_max_tries <= 0:
          keep_rollouts = [(ro, rewards)]
          break
        keep_rollouts.append((ro, rewards))
        stats = group_stats(sequence_rewards(rewards), ro.group_ids_B)
        if stats["zero_variance_groups"] == 0.0:
          break
      if dynamic_sampling_max_tries > 0:
        ro, rewards = _select_informative_groups(keep_rollouts)
      else:
        ro, rewards = keep_rollouts[0]
      t_sample = time.perf_counter() - t0
      num_n = ro.tokens_BxN.shape[1]
      batch = {
          "input_ids_BxT": ro.input_ids_BxT, "attention_mask_BxT": ro.attention_mask_BxT,
          "targets_BxT": ro.targets_BxT, "response_mask_BxN": ro.response_mask_BxN,
      }
      if old_logps == "sampler":
        batch["old_logps_BxN"] = ro.sampler_logps_BxN
      elif old_logps == "recompute":
        logps_fn = logps_fn or make_logps_fn(policy_graphdef, num_n, logprob_chunk_size=logprob_chunk_size)
        batch["old_logps_BxN"] = np.asarray(jax.device_get(logps_fn(params_of_state(state), put_batch(batch))))
        batch["sampler_logps_BxN"] = ro.sampler_logps_BxN  # for rollout-mismatch correction
      else:
        raise ValueError(f"old_logps={old_logps!r}; valid choices: ('sampler', 'recompute')")
      if ref_params is not None:
        ref_fn = ref_fn or make_logps_fn(policy_graphdef, num_n, logprob_chunk_size=logprob_chunk_size)
        ref = ref_params(state) if callable(ref_params) else ref_params
        batch["ref_logps_BxN"] = np.asarray(jax.device_get(ref_fn(ref, put_batch(batch))))
      if batch_fn is not None:
        state, batch = batch_fn(state, batch, rewards, ro)
      else:
        batch["advantages_BxN"] = np.asarray(advantage_fn(sequence_rewards(rewards), ro.response_mask_BxN,
                                                          ro.group_ids_B), np.float32)
      if sample_weight_fn is not None:
        weights = np.asarray(sample_weight_fn(sequence_rewards(rewards), ro.group_ids_B), np.float32)
        batch["response_mask_BxN"] = batch["response_mask_BxN"] * weights[:, None]
      t1 = time.perf_counter()
      step_metrics = []
      for mb in minibatches(batch, num_minibatches=num_minibatches, epochs=epochs, seed=seed + it):
        state, m = step_fn(state, put_batch(mb))
        step_metrics.append(m)
      step_metrics = jax.device_get(step_metrics)
      t_train = time.perf_counter() - t1
      tokens = float(ro.response_mask_BxN.sum())
      metrics = {k: float(np.mean([np.asarray(m[k]) for m in step_metrics])) for k in step_metrics[0]}
      metrics.update(group_stats(sequence_rewards(rewards), ro.group_ids_B))
      metrics.update(response_length=float(ro.response_mask_BxN.sum(-1).mean()),
                     sample_tokens_per_sec=tokens / max(t_sample, 1e-9),
                     samples_per_sec=len(rewards) / max(t_sample, 1e-9),
                     train_tokens_per_sec=epochs * float(ro.attention_mask_BxT.sum()) / max(t_train, 1e-9))
      streak = int(max(int(np.asarray(m.get("nonfinite_streak", 0))) for m in step_metrics))
      if streak >= max_nonfinite_streak:
        bad = [k for k, v in metrics.items() if not np.isfinite(v)]
        raise NonFiniteError(
            f"iteration {it + 1}: {streak} consecutive updates skipped as non-finite "
            f"(limit max_nonfinite_streak={max_nonfinite_streak}); non-finite metrics at this iteration: "
            f"{bad or ['(gradients)']}")
      skipped = int(sum(float(np.asarray(m.get("update_skipped", 0.0))) for m in step_metrics))
      if skipped and main:
        log.warning("iteration %d: %d of %d updates skipped as non-finite", it + 1, skipped, len(step_metrics))
      last = writer.write(it + 1, metrics)
      if eval_fn is not None and eval_every and (it + 1) % eval_every == 0:
        last.update(writer.write(it + 1, eval_fn(state), prefix="eval/"))
      if checkpointer is not None and checkpoint_every and (it + 1) % checkpoint_every == 0:
        checkpointer.save(it + 1, state, {"iteration": it + 1})
      done = it + 1
      if bar is not None:
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}")
  preempted = done < num_iterations
  if checkpointer is not None and done > start:
    if checkpointer.latest_step() != done:
      checkpointer.save(done, state, {"iteration": done}, force=True)
    checkpointer.wait()
  if preempted and main:
    log.warning("stopped by signal at iteration %d%s", done,
                "; checkpoint saved" if checkpointer is not None and done > start else "")
  if bar is not None:
    bar.close()
  writer.close()
  if main:
    plot_curves(writer.path, os.path.join(workdir, "curves.png"),
                keys=plot_keys)
  return OnlineResult(state, last, preempted=preempted, signum=stop.signum if preempted else None,
                      start=start, end=done)


class OnlineResult(tuple):
  """``(state, last_metrics)`` as before (it unpacks to two), with ``preempted``, ``signum``
  (the signal that stopped the loop), ``start`` and ``end`` (iterations) as attributes."""

  def __new__(cls, state, last, *, preempted: bool, signum, start: int, end: int):
    self = super().__new__(cls, (state, last))
    self.preempted, self.signum, self.start, self.end = preempted, signum, start, end
    return self

  @property
  def state(self):
    return self[0]

  @property
  def last_metrics(self):
    return self[1]


def _select_informative_groups(rollouts: list[tuple[Rollout, np.ndarray]]) -> tuple[Rollout, np.ndarray]:
  """DAPO dynamic sampling: fill the batch with groups whose rewards differ, first come first kept.

  Groups are taken from successive draws; when too few informative groups exist,
  the remaining slots keep zero-variance groups from the first draw (their
  advantages are zero, so they do not bias the update).
  """
  first_ro, first_r = rollouts[0]
  target = len(np.unique(first_ro.group_ids_B))
  chosen: list[tuple[Rollout, np.ndarray, np.ndarray]] = []
  for ro, r in rollouts:
    for g in np.unique(ro.group_ids_B):
      idx = np.flatnonzero(ro.group_ids_B == g)
      if np.ptp(sequence_rewards(r)[idx]) > 0 and len(chosen) < target:
        chosen.append((ro, r, idx))
  for g in np.unique(first_ro.group_ids_B):
    if len(chosen) >= target:
      break
    idx = np.flatnonzero(first_ro.group_ids_B == g)
    if np.ptp(sequence_rewards(first_r)[idx]) == 0:
      chosen.append((first_ro, first_r, idx))
  fields = {f: np.concatenate([getattr(ro, f)[idx] for ro, _, idx in chosen]) for f in Rollout._fields}
  new_ids = np.concatenate([np.full(len(idx), k, np.int32) for k, (_, _, idx) in enumerate(chosen)])
  fields["group_ids_B"] = new_ids
  return Rollout(**fields), np.concatenate([r[idx] for _, r, idx in chosen])


PF_PPO_METHODS = ("max_min", "max_random", "best", "pow")


def pf_ppo_weights(rewards_B: np.ndarray, group_ids_B: np.ndarray, *, method: str = "max_min", seed: int = 0,
                   weight_pow: float = 2.0) -> np.ndarray:
  """Policy filtration (PF-PPO): which samples of each prompt's group to train on.

  Zhang, Shen et al. 2024, "Policy Filtration for RLHF to Mitigate Noise in Reward
  Models" (arXiv:2409.06957): rewards are most reliable at the extremes, so keep
  per group the best and the worst sample (``max_min``, the paper's BW), the best
  and a random other (``max_random``, BR), only the best (``best``, BoN), or
  resample the group with probabilities ∝ |r|^``weight_pow`` (``pow``, with
  replacement; weights are the draw counts). Returns per-sample weights ``[B]``
  (0 drops a sample) to multiply into the response mask, so shapes never change.
  """
  if method not in PF_PPO_METHODS:
    raise ValueError(f"pf_ppo method={method!r}; valid choices: {PF_PPO_METHODS}")
  rewards_B = np.asarray(rewards_B, np.float64)
  rng = np.random.default_rng(seed)
  w = np.zeros(len(rewards_B), np.float32)
  for g in np.unique(group_ids_B):
    idx = np.flatnonzero(group_ids_B == g)
    r = rewards_B[idx]
    best, worst = idx[np.argmax(r)], idx[np.argmin(r)]
    if method == "best" or len(idx) == 1:
      w[best] = 1.0
    elif method == "max_min":
      w[best] = 1.0
      w[worst if worst != best else idx[idx != best][0]] = 1.0
    elif method == "max_random":
      w[best] = 1.0
      w[rng.choice(idx[idx != best])] = 1.0
    else:
      p = np.abs(r) ** weight_pow
      p = p / p.sum() if p.sum() > 0 else np.full(len(idx), 1.0 / len(idx))
      np.add.at(w, rng.choice(idx, size=len(idx), p=p), 1.0)
  return w


def make_remax_batch_fn(greedy_rollout_fn: Callable, reward_fn: Callable, *,
                        policy_params_fn: Callable = lambda params: params, state_params_fn: Callable | None = None):
  """ReMax (Li et al. 2023, arXiv:2310.10505) as a ``batch_fn`` for :func:`run_online`.

  Decodes each prompt greedily with the current policy, scores the greedy answers
  with the same ``reward_fn``, and sets ``advantages = r − r_greedy`` on the
  response tokens (``rlhf_jax.advantages.remax``). ``greedy_rollout_fn`` is a
  :func:`make_rollout_fn` built with ``processor=None``. ``state_params_fn(state)`` replaces
  ``policy_params_fn(state.params)`` as in :func:`run_online` (e.g. LoRA adapters with their base).
  """
  from rlhf_jax import advantages as adv_lib

  remax = adv_lib.get("remax")

  def batch_fn(state, batch, rewards_B, rollout):
    n = rollout.tokens_BxN.shape[1]
    p = rollout.input_ids_BxT.shape[1] - n + 1
    ids, mask = rollout.input_ids_BxT[:, :p], rollout.attention_mask_BxT[:, :p]
    params = state_params_fn(state) if state_params_fn is not None else policy_params_fn(state.params)
    greedy = greedy_rollout_fn(params, ids, mask, jax.random.PRNGKey(0), rollout.group_ids_B)
    prompts = [row[m > 0] for row, m in zip(ids, mask)]
    baseline = np.asarray(reward_fn(prompts, greedy.tokens_BxN, greedy.response_mask_BxN.sum(-1)), np.float32)
    adv = remax(jnp.asarray(rewards_B, jnp.float32), jnp.asarray(batch["response_mask_BxN"]), None,
                baseline_rewards_B=jnp.asarray(baseline))
    return state, dict(batch, advantages_BxN=np.asarray(adv, np.float32))

  return batch_fn
