"""Rewards: reward/preference-model losses, heads, ensembles, multi-objective scalarisations.

Pure functions on arrays (no model code). Importing this package registers the reward-model
losses (``kind="reward"``) in `rlhf_jax.losses` (``get("bt")``, ``get("hl_gauss")``, ...).
"""

from rlhf_jax.rewards import ensembles, heads, losses, multi_objective  # noqa: F401  (registers reward losses)
from rlhf_jax.rewards.ensembles import (  # noqa: F401
    brme_reward, ensemble_apply, ensemble_mean, ensemble_min, ensemble_std, ensemble_uncertainty_weighted,
    stack_params,
)
from rlhf_jax.rewards.heads import (  # noqa: F401
    PRM_AGGREGATIONS, bin_centers, categorical_loss, categorical_to_scalar, gather_last, hl_gauss, hl_gauss_targets,
    last_token_index, prm_aggregate, prm_bce, prm_step_scores, two_hot, two_hot_targets,
)
from rlhf_jax.rewards.losses import (  # noqa: F401
    bt, bt_logexp, pointwise_bce, preference_model_loss, rm_plackett_luce, rm_regression, symmetrize_preference,
)
from rlhf_jax.rewards.multi_objective import (  # noqa: F401
    armorm_combine, direction_from_angle, dpa_direction_reward, fixed_weights, maxmin,
)
from rlhf_jax.rewards import shaping, verifiers  # noqa: F401
from rlhf_jax.rewards.shaping import (  # noqa: F401
    HAPOLengthReward, HAPOState, RunningRewardNorm, RunningRewardNormState, apply_judge_mask, clip_rewards,
    combine_fine_grained, combine_transformed, cosine_length_reward, dapo_overlong_penalty, hapo_length_reward,
    kimi_length_penalty, kl_penalized_token_rewards, log_sigmoid_centered, merge_reward_stats, par_reward,
    place_segment_rewards, prm_clip, prm_delta, repetition_penalty, running_reward_norm, whiten,
)
from rlhf_jax.rewards import tool_rewards  # noqa: F401
from rlhf_jax.rewards.tool_rewards import (  # noqa: F401
    multiset_jaccard, parse_toolrl_calls, toolrl_components, toolrl_correctness, toolrl_format, toolrl_reward,
)
from rlhf_jax.rewards.verifiers import (  # noqa: F401
    BatchedRewardFn, answers_equal, batched_reward_fn, decode_then_score, exact_match_reward, extract_answer,
    format_reward, math_reward, normalize_number,
)
