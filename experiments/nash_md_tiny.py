"""Nash-MD (Munos et al. 2023, Nash Learning from Human Feedback), as TRL's NashMDTrainer.

Each iteration the policy answers fresh prompts once, and an opponent answers
from the geometric mixture ``π_θ^{1−α}·π_ref^α`` (decoded token by token from both
models' logits in one jitted program); a pairwise preference judge gives
``P(y ≻ y')``, and the policy takes a REINFORCE step on ``P − ½`` with a KL penalty
to the SFT reference (``online_preference.ALGORITHMS["nash_md"]``,
``losses.online.nash_md_loss``). The judge is the task's gold rule as a
Bradley-Terry preference. Task, SFT stage and evaluation are ``online_dpo_tiny``'s.

Command:
  python -m rlhf_jax.run experiments/nash_md_tiny.py --workdir runs/nash_md_tiny

Hardware: 2 CPU cores, about 2 minutes. Expected (measured): see ``result.json``:
the headline is the held-out ascending rate (SFT -> Nash-MD); ``win_rate_vs_sft``
the policy's win rate against the SFT model under the judge (0.5 at the start).
"""

import os

from rlhf_jax import run

_base, _ = run.load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), "online_dpo_tiny.py"))

CONFIG_HELP = _base.CONFIG_HELP
main = _base.main


def get_config(arg=None):
  c = _base.get_config(arg)
  c.algorithm = "nash_md"
  c.online.beta = 0.05
  c.online.mix_alpha = 0.5
  return c
