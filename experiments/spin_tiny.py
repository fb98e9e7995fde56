"""SPIN (Chen et al. 2024, Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models).

Each iteration the previous iterate π_t answers fresh prompts of the SFT task;
the gold (ascending) answer is the chosen side against each of its samples, and a
DPO step uses π_t as the reference (``online_preference.ALGORITHMS["spin"]``:
``pairing="gold"``, ``reference="iteration"``). The task, SFT stage and
evaluation are ``online_dpo_tiny``'s (this file sets its config).

Command:
  python -m rlhf_jax.run experiments/spin_tiny.py --workdir runs/spin_tiny

Hardware: 2 CPU cores, about 2 minutes. Expected (measured): see
``result.json``: the headline is the held-out ascending rate (SFT -> SPIN), and
``gold_margin_sft`` / ``gold_margin_per_eval`` the mean of
``log π(gold) − log π(SFT sample)`` on held-out prompts under the SFT model and
after each evaluated iteration, which SPIN raises.
"""

import os

from rlhf_jax import run

_base, _ = run.load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), "online_dpo_tiny.py"))

CONFIG_HELP = _base.CONFIG_HELP
main = _base.main


def get_config(arg=None):
  c = _base.get_config(arg)
  c.algorithm = "spin"
  c.online.num_iterations = 4 if arg != "runlocal" else 3
  c.online.prompts_per_iteration = 128 if arg != "runlocal" else 64
  c.online.epochs = 2.0
  c.online.losses, c.online.loss_weights = ("sigmoid",), (1.0,)
  c.online.beta = 0.5
  c.eval.every = 1
  return c
