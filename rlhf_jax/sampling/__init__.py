"""Jitted KV-cache generation, best-of-N decoding and composable logit processors."""

from rlhf_jax.sampling import processors
from rlhf_jax.sampling.best_of_n import (
    BestOfN,
    best_index,
    decode_completions,
    make_best_of_n_fn,
    pairwise_score_fn,
    reward_model_scorer,
    text_score_fn,
)
from rlhf_jax.sampling.generate import Generation, left_pad, make_generate_fn, stop_sequences_array

__all__ = [
    "BestOfN",
    "Generation",
    "best_index",
    "decode_completions",
    "left_pad",
    "make_best_of_n_fn",
    "make_generate_fn",
    "pairwise_score_fn",
    "processors",
    "reward_model_scorer",
    "stop_sequences_array",
    "text_score_fn",
]
