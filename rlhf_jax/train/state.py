"""The train state: one pytree that jit, sharding and Orbax all understand."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax.parallel import mesh as mesh_lib


class TrainState(NamedTuple):
  """Everything a step reads and writes.

  Attributes:
    step: number of optimizer steps taken (skipped updates included).
    params: ``nnx.State`` of the trained module.
    opt_state: the optax state.
    rng: a raw ``uint32[2]`` key, split once per step.
    nonfinite_streak: consecutive steps whose update was skipped: as non-finite,
      or by a guard of :func:`rlhf_jax.train.step.make_train_step`
      (``max_param_norm``, ``loss_spike_factor``). The loops stop a run after
      ``max_nonfinite_streak`` of them, and a checkpoint saved while it is above
      0 is not *healthy* (`rlhf_jax.checkpoint`).
    nonfinite_total: all skipped steps (every reason).
    extras: algorithm state beside the policy (a dict of pytrees, e.g. the
      reference parameters of TR-DPO or a KL controller), or ``None``. The step
      hands it to the loss as ``batch["extras"]`` and updates it with the step's
      ``extras_update``; it is checkpointed with the rest.
    loss_ema: ``float32`` running mean of the losses of accepted updates (the
      plain mean of the first ``1 / (1 - loss_ema_decay)``, an exponential moving
      average after), the reference of the step's ``loss_spike_factor`` guard.
      ``None`` in a state built by hand: the step then keeps no loss average.
    loss_count: ``int32`` number of accepted updates averaged into ``loss_ema``
      (the guard's warm-up counts these), or ``None`` with ``loss_ema``.

  A checkpoint written before ``loss_ema`` / ``loss_count`` existed restores with
  both reset to 0 (`restore_compatible`).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_streak: jax.Array
  nonfinite_total: jax.Array
  extras: Any = None
  loss_ema: Any = None
  loss_count: Any = None


FROZEN_PARAMS = "frozen_params"

# Fields added after the first checkpoints were written: absent from older saved states.
LATER_FIELDS = ("loss_ema", "loss_count")

# The train state as checkpoints written before LATER_FIELDS saved it (a restore target for them).
_EarlierTrainState = NamedTuple("_EarlierTrainState", [(f, Any) for f in TrainState._fields if f not in LATER_FIELDS])


def _initial_scalars(seed: int) -> dict[str, jax.Array]:
  return dict(
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.PRNGKey(seed),
      nonfinite_streak=jnp.zeros((), jnp.int32),
      nonfinite_total=jnp.zeros((), jnp.int32),
      loss_ema=jnp.zeros((), jnp.float32),
      loss_count=jnp.zeros((), jnp.int32),
  )


def create_train_state(
    model: nnx.Module, optimizer: optax.GradientTransformation, *, seed: int = 0, mesh=None, extras: Any = None,
    trainable: Any = None,
) -> tuple[nnx.GraphDef, TrainState, Any]:
  """Splits ``model`` and builds its train state, sharded when ``mesh`` is given.

  The optimizer state is initialised by a jitted ``optimizer.init`` whose
  ``out_shardings`` mirror the parameters' (``optax.tree_map_params``), so it is
  born sharded like them.

  ``trainable``: an NNX filter (e.g. ``rlhf_jax.models.lora.LoRA``) selecting the
  variables to train; ``state.params`` and the optimizer then hold only those,
  and the rest of the model is kept frozen in ``state.extras["frozen_params"]``,
  which :func:`rlhf_jax.train.step.make_train_step` merges back in (no
  gradients, no optimizer state). ``None`` trains every variable.

  Returns:
    ``(graphdef, state, shardings)``; ``shardings`` is a ``TrainState`` of
    ``NamedSharding`` (``None`` without a mesh).
  """
  if trainable is None:
    graphdef, params = nnx.split(model)
  else:
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    extras = {**(extras or {}), FROZEN_PARAMS: frozen}
  scalars = _initial_scalars(seed)
  if mesh is None:
    state = TrainState(params=params, opt_state=optimizer.init(params), extras=extras, **scalars)
    # Committed to the default device, as the step's outputs are: otherwise the
    # first call (uncommitted inputs) and every later one compile separately.
    device = jax.devices()[0]
    state = jax.tree.map(lambda x: x if getattr(x, "committed", True) else jax.device_put(x, device), state)
    return graphdef, state, None
  shardings = train_state_shardings(params, optimizer, mesh)
  # Extras keep their mesh shardings (e.g. reference params sharded like the policy);
  # anything not on the mesh (small host-made statistics) is replicated.
  repl = NamedSharding(mesh, P())
  on_mesh = lambda x: isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
  extras = jax.tree.map(lambda x: x if on_mesh(x) else jax.device_put(x, repl), extras)
  shardings = shardings._replace(extras=jax.tree.map(lambda x: x.sharding, extras))
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  repl = NamedSharding(mesh, P())
  scalars = {k: jax.device_put(v, repl) for k, v in scalars.items()}
  return graphdef, TrainState(params=params, opt_state=opt_state, extras=extras, **scalars), shardings


def train_state_shardings(params, optimizer: optax.GradientTransformation, mesh, rules=None) -> TrainState:
  """Shardings of a ``TrainState`` for ``params`` (concrete or abstract) on ``mesh``."""
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  param_sh = mesh_lib.state_shardings(abstract_params, mesh, rules)
  repl = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  opt_sh = optax.tree_map_params(
      optimizer, lambda _, s: s, abstract_opt, param_sh,
      transform_non_params=lambda _: repl,
      is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  return TrainState(
      step=repl, params=param_sh, opt_state=opt_sh, rng=repl,
      nonfinite_streak=repl, nonfinite_total=repl, loss_ema=repl, loss_count=repl,
  )


def saved_fields(step_dir: str) -> set[str] | None:
  """The top-level keys of the train state saved in a checkpoint step folder (``<step>/state``);
  ``None`` when its metadata cannot be read (a damaged step: the restore reports that)."""
  import orbax.checkpoint as ocp

  path = os.path.join(step_dir, "state")
  try:
    with ocp.StandardCheckpointer() as ck:
      meta = ck.metadata(path)
  except Exception:  # noqa: BLE001 - unreadable metadata is the restore's damage to report
    return None
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  return set(tree) if isinstance(tree, dict) else None


def restore_compatible(checkpointer, abstract_state: TrainState, step: int, *, like: TrainState):
  """``checkpointer.restore(abstract_state, step, like=like)`` that also reads an older checkpoint.

  A state saved before the fields of :data:`LATER_FIELDS` existed is restored
  without them, and they are filled in at their initial value (0) with the
  shardings of ``abstract_state``: the loss-spike guard's warm-up starts again.
  The newest step's saved keys decide the target; when that restore finds no
  intact step (e.g. the newest, of the current format, is damaged and the older
  ones are of the older format), it is tried once more with the other target.
  """
  from rlhf_jax.checkpoint.manager import CheckpointDamagedError

  later = [f for f in LATER_FIELDS if getattr(abstract_state, f, None) is not None]
  if not later or not isinstance(abstract_state, TrainState):
    return checkpointer.restore(abstract_state, step, like=like)
  legacy = _EarlierTrainState(**{f: getattr(abstract_state, f) for f in _EarlierTrainState._fields})

  def fill(restored):
    state, data = restored
    if isinstance(state, TrainState):
      return state, data
    values = {}
    for f in later:
      target = getattr(abstract_state, f)
      value = jnp.zeros(target.shape, target.dtype)
      values[f] = jax.device_put(value, target.sharding) if target.sharding is not None else value
    return TrainState(**state._asdict(), **values), data

  fields = saved_fields(checkpointer.step_dir(step))
  old_format = fields is not None and not all(f in fields for f in later)
  first, second = (legacy, abstract_state) if old_format else (abstract_state, legacy)
  try:
    return fill(checkpointer.restore(first, step, like=like))
  except CheckpointDamagedError as e:
    try:
      return fill(checkpointer.restore(second, step, like=like))
    except CheckpointDamagedError:
      raise e from None
