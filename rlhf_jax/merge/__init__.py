"""Weight-space alignment: merges of models sharing one architecture, and online weight averaging.

Pure pytree functions (sharded arrays in, sharded arrays out, never gathered to one host):
`linear` (soups), `task_arithmetic`, `ties`, `dare`, `slerp`, `lines` (LiNeS layer scaling) and
`scale_task_vector`; `ema` / `running_mean` are optax-style ``(init, update)`` averagers for a
train step. ``python -m rlhf_jax.merge`` merges Hugging Face directories or recipe runs
(:mod:`rlhf_jax.merge.cli`). See ``docs/merge.md``.
"""

from rlhf_jax.merge.averaging import Averager, AveragerState, ema, running_mean
from rlhf_jax.merge.methods import (
    dare,
    dare_masks,
    drop_and_rescale,
    layer_index,
    lines,
    linear,
    path_name,
    scale_task_vector,
    slerp,
    task_arithmetic,
    ties,
    trim_top_k,
)

__all__ = [
    "Averager", "AveragerState", "dare", "dare_masks", "drop_and_rescale", "ema", "layer_index", "lines",
    "linear", "path_name", "running_mean", "scale_task_vector", "slerp", "task_arithmetic", "ties",
    "trim_top_k",
]
