"""The train state: one pytree that jit, sharding and Orbax all understand."""

from __future__ import annotations

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
    step: number of optimizer steps taken (skipped non-finite updates included).
    params: ``nnx.State`` of the trained module.
    opt_state: the optax state.
    rng: a raw ``uint32[2]`` key, split once per step.
    nonfinite_streak: consecutive steps whose update was skipped as non-finite.
    nonfinite_total: all skipped steps.
    extras: algorithm state beside the policy (a dict of pytrees, e.g. the
      reference parameters of TR-DPO or a KL controller), or ``None``. The step
      hands it to the loss as ``batch["extras"]`` and updates it with the step's
      ``extras_update``; it is checkpointed with the rest.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_streak: jax.Array
  nonfinite_total: jax.Array
  extras: Any = None


FROZEN_PARAMS = "frozen_params"


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
  scalars = dict(
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.PRNGKey(seed),
      nonfinite_streak=jnp.zeros((), jnp.int32),
      nonfinite_total=jnp.zeros((), jnp.int32),
  )
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
      nonfinite_streak=repl, nonfinite_total=repl,
  )
