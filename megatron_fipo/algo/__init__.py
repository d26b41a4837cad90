"""Pure tensor math of FIPO and its DAPO scaffold. Imports only torch."""

from megatron_fipo.algo.advantages import dynamic_sampling_mask, group_advantages, overlong_penalty
from megatron_fipo.algo.future_kl import future_kl, future_kl_reference
from megatron_fipo.algo.policy_loss import FIPOConfig, dapo_policy_loss, fipo_policy_loss

__all__ = [
    "FIPOConfig",
    "dapo_policy_loss",
    "dynamic_sampling_mask",
    "fipo_policy_loss",
    "future_kl",
    "future_kl_reference",
    "group_advantages",
    "overlong_penalty",
]
