"""Supervised fine-tuning: masked token negative log-likelihood."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.registry import register
from rlhf_jax.ops import _checks

__all__ = ["sft_loss"]


@register(
    "nll", kind="token", formula="−log π(y_t | x, y_<t) on completion tokens",
    reference="standard supervised fine-tuning (maximum likelihood)",
)
def sft_loss(logps_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood of the target tokens, zero where masked.

  ``loss[b, t] = -logps[b, t]`` where ``mask[b, t] != 0``, else 0: the cross-entropy of
  supervised fine-tuning. Float mask weights are not applied here; the aggregation given the same
  mask weighs each token once (``token_mean`` gives ``Σ w·nll / Σ w``).
  Nothing is reduced: pass the result to an aggregation, usually
  ``rlhf_jax.ops.token_mean(losses_BxT, mask_BxT)`` (the mean NLL per completion token).

  Alignment: ``logps_BxT[b, t]`` is log p(token ``t + 1`` | tokens ``<= t``) of sequence
  ``b`` (e.g. from ``rlhf_jax.ops.logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])``
  or the ``targets_BxT`` of a data batch), and ``mask_BxT`` is aligned with it: 1 where the
  *target* token is trained on (completion tokens and the final EOS), 0 on prompt and
  padding targets. Masked positions give exactly 0 even if ``logps`` is ``-inf``/NaN there.

  Registered as ``"nll"`` (``"sft"`` is kept for TRL's DPO ``loss_type="sft"``).

  Args:
    logps_BxT: log-probabilities of the target tokens, shape ``[B, T]``.
    mask_BxT: bool or float weights aligned with ``logps_BxT``, shape ``[B, T]``.

  Returns:
    ``losses_BxT``: per-token losses, shape ``[B, T]``, in the (floating) dtype of
    ``logps_BxT``.

  Raises:
    ValueError: if the shapes differ or ``logps_BxT`` is not floating.

  Examples:
    >>> sft_loss(jnp.log(jnp.array([[0.5, 0.25]])), jnp.array([[0, 1]]))
    Array([[0.       , 1.3862944]], dtype=float32)
  """
  _checks.check_min_rank(logps_BxT, 1, "logps_BxT")
  _checks.check_floating(logps_BxT, "logps_BxT")
  _checks.check_same_shape(logps_BxT, mask_BxT, "logps_BxT", "mask_BxT")
  mask_BxT = jnp.asarray(mask_BxT)
  return jnp.where(mask_BxT != 0, -logps_BxT, jnp.zeros_like(logps_BxT))
