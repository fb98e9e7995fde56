"""Jitted KV-cache generation, best-of-N decoding, composable logit processors and multi-turn rollouts."""

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
from rlhf_jax.sampling.multiturn import (
    EpisodeSource,
    Episodes,
    MultiTurnRollout,
    ScriptedEpisode,
    make_multiturn_rollout_fn,
    scripted_episode,
    sft_batch,
)

__all__ = [
    "BestOfN",
    "EpisodeSource",
    "Episodes",
    "Generation",
    "MultiTurnRollout",
    "ScriptedEpisode",
    "best_index",
    "decode_completions",
    "left_pad",
    "make_best_of_n_fn",
    "make_generate_fn",
    "make_multiturn_rollout_fn",
    "pairwise_score_fn",
    "processors",
    "reward_model_scorer",
    "scripted_episode",
    "sft_batch",
    "stop_sequences_array",
    "text_score_fn",
]
