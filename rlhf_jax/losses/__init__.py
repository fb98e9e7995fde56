"""Losses: pure per-token / per-sequence functions of arrays, and a name registry for configs.

Look a loss up by name with `get` (e.g. ``get("nll")``); list them with `names`.
"""

from rlhf_jax.losses.registry import LOSSES, Entry, Registry, get, info, names, register
from rlhf_jax.losses.sft import sft_loss
from rlhf_jax.losses import dpo  # noqa: F401  (registers the DPO family)
from rlhf_jax.losses import preference  # noqa: F401  (registers reference-free, unpaired and other preference losses)
from rlhf_jax.losses import listwise, offline  # noqa: F401  (registers listwise and offline objectives)
from rlhf_jax.losses import kl, policy, value  # noqa: F401  (registers online RL objectives)
from rlhf_jax.losses import online  # noqa: F401  (registers online / Nash preference objectives)
from rlhf_jax.losses.online import (
    dno_loss, inpo_loss, nash_md_loss, online_ipo_loss, preference_win_rates, xpo_loss,
)

__all__ = [
    "LOSSES", "Entry", "Registry", "dno_loss", "get", "info", "inpo_loss", "names", "nash_md_loss",
    "online_ipo_loss", "preference_win_rates", "register", "sft_loss", "xpo_loss",
]
from rlhf_jax import rewards as _rewards  # noqa: E402,F401  (registers the reward-model losses: get("bt"), ...)
