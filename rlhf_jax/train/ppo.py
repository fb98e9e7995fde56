"""PPO with a critic, composed from the online-RL pieces.

The policy and the critic are one NNX module, :class:`ActorCritic` (disjoint
parameters, one train state, one optimizer), so the shared step factory and
:func:`rlhf_jax.train.online.run_online` drive PPO unchanged. :func:`make_ppo_batch_fn`
is the PPO-specific part of an iteration, with the PPO-max tricks (Zheng et al.
2023, "Secrets of RLHF in Large Language Models Part I: PPO", arXiv:2307.04964):
reward normalisation and clipping with running statistics (kept in
``state.extras`` and checkpointed), KL-in-reward, GAE, advantage whitening;
value clipping lives in the loss. The critic is typically initialised from the
reward model; a categorical critic (`CategoricalValue`, HL-Gauss) is selected by
``categorical=`` in both :func:`make_ppo_loss` and :func:`make_ppo_batch_fn`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import advantages as adv_lib
from rlhf_jax import ops
from rlhf_jax.losses import value as value_losses
from rlhf_jax.rewards import heads
from rlhf_jax.rewards import shaping
from rlhf_jax.train import online


class ActorCritic(nnx.Module):
  """A policy and a critic (a model with a scalar head) trained together."""

  def __init__(self, policy: nnx.Module, critic: nnx.Module):
    if not critic.config.scalar_head_outputs:
      raise ValueError("the critic needs a scalar head: ModelConfig.scalar_head_outputs >= 1")
    self.policy = policy
    self.critic = critic


class CategoricalValue(NamedTuple):
  """A categorical critic: its head has ``num_bins`` logits over ``[v_min, v_max]``; the value is
  their expectation over the bin centres and the loss is HL-Gauss (Farebrother et al. 2024, "Stop
  Regressing": cross-entropy against a Gaussian histogram of the return, σ = ``sigma_ratio``·bin
  width). Returns outside the support are clipped to it by the histogram."""

  num_bins: int = 51
  v_min: float = -10.0
  v_max: float = 10.0
  sigma_ratio: float = 0.75


def _value_head_outputs(critic, batch, num_response_tokens: int) -> jax.Array:
  hidden, _ = critic.hidden_states(batch["input_ids_BxT"], attention_mask_BxT=batch["attention_mask_BxT"])
  return critic.scalar(hidden[:, -num_response_tokens:])


def response_values(critic, batch, num_response_tokens: int, categorical: CategoricalValue | None = None) -> jax.Array:
  """``V(s_t)`` ``[B, N]`` for each response token, from the state that precedes it (the expectation
  of a `CategoricalValue` head when given)."""
  out = _value_head_outputs(critic, batch, num_response_tokens)
  if categorical is None:
    return out[..., 0]
  return heads.categorical_to_scalar(out, v_min=categorical.v_min, v_max=categorical.v_max,
                                     num_bins=categorical.num_bins)


def make_ppo_loss(*, num_response_tokens: int, vf_coef: float = 0.5, value_clip: float | None = 0.2,
                  categorical: CategoricalValue | None = None, **policy_kw):
  """``loss_fn(actor_critic, batch, rng)``: the policy loss plus ``vf_coef`` × the value loss.

  ``policy_kw`` go to :func:`rlhf_jax.train.online.make_policy_loss`; the batch also
  carries ``old_values_BxN`` and ``returns_BxN``. The value loss uses the same
  aggregation as the policy loss: PPO's clipped squared error (``value_clip``), or with
  ``categorical`` the HL-Gauss cross-entropy of a categorical head (no clipping; the critic's
  head must have ``categorical.num_bins`` outputs).
  """
  policy_loss = online.make_policy_loss(num_response_tokens=num_response_tokens, **policy_kw)
  agg = ops.get_aggregation(policy_kw.get("aggregation", "token-mean"))

  def loss_fn(model, batch, rng):
    pl, aux = policy_loss(model.policy, batch, rng)
    mask = batch["response_mask_BxN"]
    if categorical is None:
      values = response_values(model.critic, batch, num_response_tokens)
      vl = agg(value_losses.clipped_value_loss(values, batch["old_values_BxN"], batch["returns_BxN"], mask,
                                               clip_range=value_clip), mask)
    else:
      logits = _value_head_outputs(model.critic, batch, num_response_tokens)
      values = heads.categorical_to_scalar(logits, v_min=categorical.v_min, v_max=categorical.v_max,
                                           num_bins=categorical.num_bins)
      vl = agg(value_losses.hl_gauss_value_loss(logits, batch["returns_BxN"], mask, v_min=categorical.v_min,
                                                v_max=categorical.v_max, sigma_ratio=categorical.sigma_ratio), mask)
    aux = dict(aux)
    aux.update(value_loss=vl, value_mean=ops.token_mean(values, mask),
               value_explained_variance=_explained_variance(values, batch["returns_BxN"], mask))
    return pl + vf_coef * vl, aux

  return loss_fn


def _explained_variance(values, returns, mask):
  var_r = ops.masked_var(returns, mask)
  return 1.0 - ops.masked_var(returns - values, mask) / jnp.maximum(var_r, 1e-8)


def make_ppo_batch_fn(
    graphdef, *, num_response_tokens: int, put_batch, kl_coef: float = 0.05, gamma: float = 1.0,
    lam: float = 0.95, reward_clip: float | None = 5.0, normalize_rewards: bool = True,
    whiten_advantages: bool = True, kl_controller=None, categorical: CategoricalValue | None = None,
):
  """``batch_fn(state, batch, rewards_B, rollout) -> (state, batch)`` for :func:`run_online`.

  The rewards are sequence rewards ``[B]``, or dense token rewards ``[B, N]`` aligned with the
  response tokens (Fine-Grained RLHF's segment rewards placed at segment ends with
  ``rewards.shaping.place_segment_rewards``, PRM step scores after ``prm_clip``/``prm_delta``), which
  GAE then credits token by token.

  1. Rewards are normalised with running statistics (``state.extras["reward_norm"]``)
     and clipped to ``±reward_clip`` (PPO-max). Dense rewards update the statistics with their
     sequence totals and are divided by the running std only (a per-token mean shift would
     move credit), then clipped per token.
  2. Token rewards: ``−kl_coef·(log π_old − log π_ref)`` on every response token and
     the sequence reward on the last, or the dense rewards on their tokens (KL-in-reward; needs
     ``ref_logps_BxN``).
  3. Values from the critic (the expectation of a ``categorical`` head), GAE (γ, λ) → advantages
     and returns; advantages whitened.
  With ``kl_controller`` (``rlhf_jax.losses.kl.adaptive_kl_controller(...)``) the KL
  coefficient is ``state.extras["kl_ctl"].coef`` instead of ``kl_coef``, updated
  after each rollout with the batch's mean sequence KL (Ziegler et al. 2019).
  Adds ``old_values_BxN``, ``returns_BxN``, ``advantages_BxN`` to the batch.
  """
  norm = shaping.running_reward_norm(clip=reward_clip)

  @jax.jit
  def values_fn(params, batch):
    model = nnx.merge(graphdef, params)
    return response_values(model.critic, batch, num_response_tokens, categorical)

  def batch_fn(state, batch, rewards_B, rollout):
    rewards = jnp.asarray(rewards_B, jnp.float32)
    extras = dict(state.extras or {})
    mask = jnp.asarray(batch["response_mask_BxN"])
    dense = rewards.ndim == 2
    if dense:  # token rewards [B, N] (segment ends, process rewards): scaled, never shifted per token
      rewards = jnp.where(mask != 0, rewards, 0.0)
      if normalize_rewards:
        _, extras["reward_norm"] = norm.update(rewards.sum(-1), extras["reward_norm"])
        rewards = rewards / jnp.sqrt(extras["reward_norm"].var + 1e-8)
      if reward_clip is not None:
        rewards = jnp.clip(rewards, -reward_clip, reward_clip)
    elif normalize_rewards:
      rewards, extras["reward_norm"] = norm.update(rewards, extras["reward_norm"])
    elif reward_clip is not None:
      rewards = jnp.clip(rewards, -reward_clip, reward_clip)
    coef = kl_coef
    if kl_controller is not None:
      coef = extras["kl_ctl"].coef
      seq_kl = ((jnp.asarray(batch["old_logps_BxN"]) - jnp.asarray(batch["ref_logps_BxN"])) * mask).sum(-1).mean()
      extras["kl_ctl"] = kl_controller.update(extras["kl_ctl"], seq_kl, n_steps=mask.shape[0])
    final = jnp.zeros(rewards.shape[:1], jnp.float32) if dense else rewards
    token_rewards = shaping.kl_penalized_token_rewards(
        final, jnp.asarray(batch["old_logps_BxN"]), jnp.asarray(batch["ref_logps_BxN"]), mask, beta=coef)
    if dense:
      token_rewards = token_rewards + rewards
    values = np.asarray(jax.device_get(values_fn(state.params, put_batch(batch)))) * np.asarray(mask)
    advantages, returns = adv_lib.gae(token_rewards, jnp.asarray(values), mask, gamma=gamma, lam=lam)
    if whiten_advantages:
      advantages = adv_lib.whiten(advantages, mask)
    batch = dict(batch, old_values_BxN=values.astype(np.float32), returns_BxN=np.asarray(returns, np.float32),
                 advantages_BxN=np.asarray(advantages * mask, np.float32))
    return state._replace(extras=extras), batch

  return batch_fn


def init_extras(normalize_rewards: bool = True, kl_controller=None) -> dict:
  """The PPO algorithm state kept in ``TrainState.extras`` (checkpointed with the rest)."""
  extras = {"reward_norm": shaping.running_reward_norm().init()} if normalize_rewards else {}
  if kl_controller is not None:
    extras["kl_ctl"] = kl_controller.init()
  return extras
