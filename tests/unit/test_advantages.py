import math

import pytest
import torch

from megatron_fipo.algo import dynamic_sampling_mask, group_advantages, overlong_penalty


def test_group_advantages_hand_computed():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    std = math.sqrt(1.0 / 3.0)  # unbiased std of [1,0,0,1]
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert adv[1].abs().max() == 0.0  # identical rewards: eps keeps it finite and zero


def test_group_advantages_without_std():
    adv = group_advantages(torch.tensor([[3.0, 1.0]]), norm_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0]]))


def test_dynamic_sampling_mask_drops_uniform_groups():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [-0.5, -0.5]])
    assert dynamic_sampling_mask(rewards).tolist() == [False, True, False, False]


def test_overlong_penalty_at_buffer_edges():
    lengths = torch.tensor([10, 15, 16, 18, 20])
    pen = overlong_penalty(lengths, max_response_len=20, buffer_len=5, penalty_factor=1.0)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.2, -0.6, -1.0]))
    pen2 = overlong_penalty(lengths, max_response_len=20, buffer_len=5, penalty_factor=0.5)
    torch.testing.assert_close(pen2, torch.tensor([0.0, 0.0, -0.1, -0.3, -0.5]))
    assert overlong_penalty(lengths, 20, 0, 1.0).abs().sum() == 0
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(lengths, 20, 30, 1.0)
