"""Outcome-reward shaping of the DAPO scaffold: group advantages, dynamic sampling, overlong penalty."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6, norm_by_std: bool = True) -> torch.Tensor:
    """Per-prompt-group normalized outcome advantages.

    rewards: [num_groups, group_size], one scalar per sampled response. Returns the same shape:
    (r - mean_group) / (std_group + eps), or r - mean_group without std normalization (Dr. GRPO).
    std is the unbiased sample std, as in verl's GRPO; a group of one gets advantage 0.
    """
    if rewards.dim() != 2:
        raise ValueError(f"group_advantages: rewards must be [num_groups, group_size], got {tuple(rewards.shape)}")
    r = rewards.float()
    centered = r - r.mean(dim=1, keepdim=True)
    if not norm_by_std or r.shape[1] < 2:
        return centered
    return centered / (r.std(dim=1, keepdim=True) + eps)


def dynamic_sampling_mask(rewards: torch.Tensor) -> torch.Tensor:
    """[num_groups] bool: True for groups worth training on (rewards not all equal).

    A group whose samples all scored the same has zero advantage everywhere, so it adds no gradient;
    DAPO drops such groups and samples more prompts to refill the batch.
    """
    if rewards.dim() != 2:
        raise ValueError(f"dynamic_sampling_mask: rewards must be [num_groups, group_size], got {tuple(rewards.shape)}")
    return (rewards != rewards[:, :1]).any(dim=1)


def overlong_penalty(
    response_lengths: torch.Tensor, max_response_len: int, buffer_len: int, penalty_factor: float
) -> torch.Tensor:
    """DAPO soft overlong punishment, added to the outcome reward.

    0 up to max_response_len - buffer_len tokens, then falling linearly to -penalty_factor at
    max_response_len: min(-(len - (max - buffer)) / buffer * factor, 0).
    """
    if buffer_len <= 0:
        return torch.zeros_like(response_lengths, dtype=torch.float32)
    if buffer_len > max_response_len:
        raise ValueError(
            f"overlong_penalty: buffer_len ({buffer_len}) must not exceed max_response_len ({max_response_len})"
        )
    expected = max_response_len - buffer_len
    exceed = response_lengths.float() - expected
    return torch.clamp(-exceed / buffer_len * penalty_factor, max=0.0)
