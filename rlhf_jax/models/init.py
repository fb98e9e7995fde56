"""Model construction: plain, or born sharded on a mesh (no full copy on one device).

:func:`with_scalar_head` adds a freshly initialised scalar head (value or reward)
to an existing model, e.g. one loaded from a Hugging Face or GGUF checkpoint, for
reward models and critics.
"""

from __future__ import annotations

import jax
from flax import nnx

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.parallel import mesh as mesh_lib


def create_model(config: ModelConfig, *, seed: int = 0) -> Transformer:
  """A model on the default device."""
  return Transformer(config, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig) -> Transformer:
  """The model with ``jax.ShapeDtypeStruct`` leaves (no memory, no FLOPs)."""
  return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def create_sharded_model(config: ModelConfig, mesh, *, seed: int = 0, rules=None) -> Transformer:
  """A model whose parameters are created directly in their mesh shardings.

  ``jax.eval_shape`` gives the shapes, the logical-axis rules give the shardings,
  and one jitted init with ``out_shardings`` materialises each shard on its own
  device.
  """
  graphdef, abstract_state = nnx.split(abstract_model(config))
  shardings = mesh_lib.state_shardings(abstract_state, mesh, rules)

  init = jax.jit(lambda: nnx.state(Transformer(config, rngs=nnx.Rngs(seed))), out_shardings=shardings)
  return nnx.merge(graphdef, init())


def with_scalar_head(model: Transformer, num_outputs: int, *, seed: int = 0, mesh=None,
                     rules=None, replace: bool = False) -> Transformer:
  """A copy of ``model`` with a new scalar head of ``num_outputs`` outputs.

  The config gets ``scalar_head_outputs=num_outputs``; every existing parameter
  is shared with ``model`` (the same arrays, so the same shardings; ``model`` is
  unchanged), and LoRA adapters, if any, are kept. The head (``scalar_head
  [D, num_outputs]``, ``scalar_bias [num_outputs]``) is exactly what
  ``create_model(config, seed=seed)`` would draw: one jitted init of the whole
  model whose unused outputs XLA removes, so only the head is computed.

  Call it before :func:`rlhf_jax.models.lora.apply_lora`: LoRA never puts
  adapters on the head, and ``lora.create_lora_train_state`` trains the head
  together with the adapters.

  Args:
    model: a :class:`Transformer` without a scalar head.
    num_outputs: the head's width (1 for a reward model or critic).
    seed: the init seed of the head (as ``create_model``'s).
    mesh: place the head on this mesh (by the logical-axis rules); default the
      mesh of the model's parameters if they are sharded, else the default device.
    rules: logical-axis rules for the head's sharding (default: the current rules).
    replace: a model that has a scalar head gets a fresh one of ``num_outputs`` outputs in its
      place (e.g. a reward model's backbone under a categorical value head); else that is an error.

  Raises:
    ValueError: ``num_outputs < 1``, or the model already has a scalar head (without ``replace``).
  """
  old = model.config
  if num_outputs < 1:
    raise ValueError(f"with_scalar_head: num_outputs must be >= 1, got {num_outputs}")
  if old.scalar_head_outputs and not replace:
    raise ValueError(f"with_scalar_head: the model already has a scalar head ({old.scalar_head_outputs} outputs)")
  config = old.replace(scalar_head_outputs=int(num_outputs))
  if mesh is None:
    sharding = getattr(model.embed.get_value(), "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      mesh = sharding.mesh

  def head():
    m = Transformer(config, rngs=nnx.Rngs(seed))
    return nnx.state(m, nnx.Any(nnx.PathContains("scalar_head"), nnx.PathContains("scalar_bias")))

  abstract_head = jax.eval_shape(head)
  out_sh = mesh_lib.state_shardings(abstract_head, mesh, rules) if mesh is not None else None
  head_state = jax.jit(head, out_shardings=out_sh)()

  new = nnx.clone(model)
  for _, node in nnx.iter_graph(new):  # the config is kept by the model and by its attention layers
    if isinstance(node, nnx.Module) and vars(node).get("config") is not None and node.config == old:
      node.config = config
  new.scalar_head = head_state["scalar_head"]
  new.scalar_bias = head_state["scalar_bias"]
  return new
