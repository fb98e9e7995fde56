"""The step factory shared by every algorithm.

``make_train_step(loss_fn, optimizer, graphdef, ...)`` returns a pure
``step(state, batch, rng=None) -> (state, metrics)``, jitted once with explicit
shardings and a donated state.

The loss contract: ``loss_fn(model, batch, rng) -> (loss, aux)`` where ``model``
is the merged NNX module, ``loss`` is a scalar **mean over the loss's own
normaliser**, and ``aux`` is a dict of scalar metrics that may contain
``"weight"``: that normaliser (e.g. the number of loss tokens). With ``k``
micro-batches the step minimises ``Σ loss_i·w_i / Σ w_i``, which equals the
loss of the whole batch for token-mean losses: 4 micro-batches of 2 sequences
give the same update as one batch of 8. Metrics are averaged with the same
weights; ``weight`` itself is summed.

Guards: an update is dropped (parameters and optimizer state kept, the step
counted) when its loss or a gradient is non-finite, and, when enabled, when it
would take the global parameter norm above ``max_param_norm`` or its loss is a
spike (above ``loss_spike_factor`` × the running mean of accepted losses, kept in
``TrainState.loss_ema``). Every dropped update counts in ``nonfinite_streak``, so
the loops' ``max_nonfinite_streak`` stops a run whose updates keep being dropped.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax.parallel import mesh as mesh_lib
from rlhf_jax.train.state import FROZEN_PARAMS, TrainState

LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]


def _split_microbatches(batch, num_microbatches: int):
  """``[B, ...] -> [M, B/M, ...]`` taking rows ``m, m+M, ...`` so each micro-batch spans all data shards."""

  def split(x):
    b = x.shape[0]
    if b % num_microbatches:
      raise ValueError(
          f"batch dimension {b} of an array of shape {x.shape} is not divisible by "
          f"num_microbatches={num_microbatches}"
      )
    y = x.reshape((b // num_microbatches, num_microbatches) + x.shape[1:])
    y = jnp.swapaxes(y, 0, 1)
    return mesh_lib.with_logical_constraint(y, (None, "batch") + (None,) * (x.ndim - 1))

  return jax.tree.map(split, batch)


def _global_norm(tree) -> jax.Array:
  """The global L2 norm, accumulated in fp32 (bf16 parameters included): ``optax.tree.norm``, the
  non-deprecated name of ``optax.global_norm``."""
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def _tree_all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    graphdef: nnx.GraphDef,
    *,
    num_microbatches: int = 1,
    mesh=None,
    state_shardings: TrainState | None = None,
    learning_rate_fn: optax.Schedule | None = None,
    extras_update: Callable[[Any, Any, jax.Array], Any] | None = None,
    extras_from_metrics: Callable[[Any, dict], Any] | None = None,
    donate: bool = True,
    jit: bool = True,
    max_param_norm: float = 0.0,
    loss_spike_factor: float = 0.0,
    loss_spike_warmup: int = 10,
    loss_ema_decay: float = 0.95,
):
  """Builds ``step(state, batch, rng=None) -> (state, metrics)``.

  Args:
    loss_fn: ``loss_fn(model, batch, rng) -> (loss, aux)``, see the module doc.
    optimizer: the optax transformation (clipping and schedule inside).
    graphdef: from ``nnx.split(model)``; the step rebuilds the module with
      ``nnx.merge(graphdef, params)``, or ``nnx.merge(graphdef, params,
      extras["frozen_params"])`` for a state made with
      ``create_train_state(..., trainable=...)`` (only ``params`` get gradients).
    num_microbatches: gradient accumulation factor; the batch's leading
      dimension must divide by it. Accumulation is a ``lax.scan`` in fp32.
    mesh: the device mesh; the step is traced under it so logical sharding
      constraints apply.
    state_shardings: a ``TrainState`` of shardings (from ``create_train_state``).
    learning_rate_fn: reported as the ``learning_rate`` metric when given.
    extras_update: ``(extras, new_params, new_step) -> extras`` run after the
      update (e.g. a TR-DPO reference sync); ``state.extras`` reaches the loss as
      ``batch["extras"]``.
    extras_from_metrics: ``(extras, metrics) -> extras`` run after the update with the
      step's (micro-batch averaged) loss metrics, e.g. BCO's running reward mean; skipped
      (extras kept) when the update is skipped (non-finite, or dropped by a guard).
    donate: donate the input state's buffers.
    jit: ``False`` returns the plain function (for composition in a bigger jit).
    max_param_norm: drop an update that would take the global L2 norm of the
      trained parameters (``optax.tree.norm``) above this; 0 disables the guard.
      A runaway learning rate is caught at its first update instead of training
      on to a loss of thousands.
    loss_spike_factor: drop an update whose loss ``l`` is a spike:
      ``l - m > (loss_spike_factor - 1) · |m|`` with ``m = state.loss_ema`` (for a
      positive mean: ``l > loss_spike_factor · m``), once ``loss_spike_warmup``
      updates have been accepted; 0 disables the guard. Meant for losses bounded
      below by 0 (cross-entropy, DPO, reward-model losses); leave it off for
      policy-gradient losses near 0 or of either sign. The mean only follows
      accepted updates, so a lasting jump of the loss is dropped step after step
      until ``max_nonfinite_streak`` stops the run with a message.
    loss_spike_warmup: accepted updates before the loss-spike guard acts (at least 1:
      the first loss has no mean to be compared with).
    loss_ema_decay: ``state.loss_ema`` is the plain mean of the first
      ``1 / (1 - loss_ema_decay)`` accepted losses, then an exponential moving
      average with this decay.

  Metrics: ``loss``, ``grad_norm`` (before clipping), ``weight``,
  ``param_norm`` (global norm of the parameters after the step),
  ``update_skipped`` (1 when the update was dropped, for any reason),
  ``loss_finite``, ``grads_finite``, ``skipped_param_norm`` and
  ``skipped_loss_spike`` (1 when that guard dropped the update; 0 while it is
  off), ``nonfinite_streak`` (consecutive dropped updates, every reason),
  ``loss_ema`` (the running mean after the step, when the state keeps one),
  ``proposed_param_norm`` (the norm the update would have given, with
  ``max_param_norm``), every entry of the loss's ``aux``, and ``learning_rate``.
  With both guards off the parameters, optimizer state and losses are those of
  a step without guards, bit for bit.
  """
  if not max_param_norm >= 0:
    raise ValueError(f"max_param_norm={max_param_norm} must be >= 0 (0 disables the guard)")
  if not loss_spike_factor >= 0 or 0 < loss_spike_factor <= 1:
    raise ValueError(f"loss_spike_factor={loss_spike_factor} must be > 1, or 0 to disable the guard")
  if loss_spike_warmup < 0:
    raise ValueError(f"loss_spike_warmup={loss_spike_warmup} must be >= 0")
  if not 0 <= loss_ema_decay < 1:
    raise ValueError(f"loss_ema_decay={loss_ema_decay} must be in [0, 1)")
  min_rate = 1.0 - float(loss_ema_decay)

  def merge(p, batch):
    extras = batch.get("extras")
    if isinstance(extras, dict) and FROZEN_PARAMS in extras:  # create_train_state(trainable=...)
      return nnx.merge(graphdef, p, jax.lax.stop_gradient(extras[FROZEN_PARAMS]))
    return nnx.merge(graphdef, p)

  def grad_fn(params, batch, rng):
    def weighted(p):
      loss, aux = loss_fn(merge(p, batch), batch, rng)
      weight = jnp.asarray(aux.get("weight", 1.0), jnp.float32)
      aux = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items() if k != "weight"}
      return loss.astype(jnp.float32) * weight, (weight, aux)

    (wloss, (weight, aux)), grads = jax.value_and_grad(weighted, has_aux=True)(params)
    return wloss, weight, aux, grads

  def step(state: TrainState, batch, rng=None):
    rng_next, step_rng = jax.random.split(state.rng)
    if rng is not None:
      step_rng = rng
    params = state.params
    if state.extras is not None:
      batch = {**batch, "extras": state.extras}
    if num_microbatches == 1:
      wloss, weight, waux, grads = grad_fn(params, batch, step_rng)
      waux = jax.tree.map(lambda v: v * weight, waux)
    else:
      batch = dict(batch)
      shared = batch.pop("extras", None)  # the same for every micro-batch: closed over, not split
      with_shared = (lambda mb: mb) if shared is None else (lambda mb: {**mb, "extras": shared})
      micro = _split_microbatches(batch, num_microbatches)
      rngs = jax.random.split(step_rng, num_microbatches)
      first = with_shared(jax.tree.map(lambda x: x[0], micro))
      abstract = jax.eval_shape(grad_fn, params, first, rngs[0])
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), abstract)

      def body(carry, xs):
        mb, r = xs
        wl, w, aux, g = grad_fn(params, with_shared(mb), r)
        aux = jax.tree.map(lambda v: v * w, aux)
        g = jax.tree.map(lambda x: x.astype(jnp.float32), g)
        return jax.tree.map(jnp.add, carry, (wl, w, aux, g)), None

      (wloss, weight, waux, grads), _ = jax.lax.scan(body, zeros, (micro, rngs))
    denom = jnp.maximum(weight, 1e-8)
    loss = wloss / denom
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    aux = jax.tree.map(lambda v: v / denom, waux)

    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    loss_finite = jnp.isfinite(loss)
    grads_finite = _tree_all_finite(grads)
    ok = loss_finite & grads_finite

    updates, new_opt_state = optimizer.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    guard_metrics = {}
    skipped_norm = skipped_spike = jnp.array(False)
    if max_param_norm:
      proposed_norm = _global_norm(new_params)
      skipped_norm = ok & ~(proposed_norm <= max_param_norm)  # an overflow to inf is a skip too
      guard_metrics["proposed_param_norm"] = proposed_norm
    tracked = state.loss_ema is not None and state.loss_count is not None
    if loss_spike_factor:
      if not tracked:
        raise ValueError("loss_spike_factor needs a state that keeps loss_ema and loss_count "
                         "(rlhf_jax.train.state.create_train_state makes one)")
      mean = state.loss_ema
      spike = loss - mean > (loss_spike_factor - 1.0) * jnp.abs(mean)
      skipped_spike = ok & ~skipped_norm & (state.loss_count >= max(int(loss_spike_warmup), 1)) & spike
    ok = ok & ~skipped_norm & ~skipped_spike
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    kept_params = keep(new_params, params)
    loss_ema, loss_count = state.loss_ema, state.loss_count
    if tracked:
      rate = jnp.maximum(1.0 / (state.loss_count + 1).astype(jnp.float32), min_rate)
      loss_ema = jnp.where(ok, state.loss_ema + rate * (loss - state.loss_ema), state.loss_ema)
      loss_count = state.loss_count + ok.astype(jnp.int32)
      guard_metrics["loss_ema"] = loss_ema
    extras = state.extras
    if extras_update is not None:
      extras = extras_update(extras, kept_params, state.step + 1)
    if extras_from_metrics is not None:
      extras = keep(extras_from_metrics(extras, aux), extras)
    new_state = TrainState(
        step=state.step + 1,
        params=kept_params,
        opt_state=keep(new_opt_state, state.opt_state),
        rng=rng_next,
        nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1),
        nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32),
        extras=extras,
        loss_ema=loss_ema,
        loss_count=loss_count,
    )
    metrics = dict(aux)
    metrics.update(
        loss=loss, grad_norm=grad_norm, weight=weight,
        param_norm=_global_norm(kept_params),
        update_skipped=(~ok).astype(jnp.float32),
        loss_finite=loss_finite.astype(jnp.float32),
        grads_finite=grads_finite.astype(jnp.float32),
        skipped_param_norm=skipped_norm.astype(jnp.float32),
        skipped_loss_spike=skipped_spike.astype(jnp.float32),
        nonfinite_streak=new_state.nonfinite_streak,
        **guard_metrics,
    )
    if learning_rate_fn is not None:
      metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
    return new_state, metrics

  if not jit:
    return step

  kwargs: dict[str, Any] = {}
  if state_shardings is not None:
    repl = NamedSharding(mesh, P()) if mesh is not None else None
    kwargs["in_shardings"] = (state_shardings, None, None)
    kwargs["out_shardings"] = (state_shardings, repl)
  jitted = jax.jit(step, donate_argnums=(0,) if donate else (), **kwargs)

  if mesh is None:
    return jitted

  def step_on_mesh(state, batch, rng=None):
    with jax.set_mesh(mesh):
      return jitted(state, batch, rng)

  step_on_mesh.jitted = jitted
  return step_on_mesh
