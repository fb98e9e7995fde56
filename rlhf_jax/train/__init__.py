"""Algorithms: step factories, recipe building blocks, host loops.

``load_run(workdir)`` loads a finished recipe run's model and tokenizer (see
:func:`rlhf_jax.train.recipe.load_run`).
"""


def load_run(workdir: str, **kwargs):
  """``(model, tokenizer)`` from a recipe run's last checkpoint; see :func:`rlhf_jax.train.recipe.load_run`."""
  from rlhf_jax.train import recipe

  return recipe.load_run(workdir, **kwargs)
