import math

import pytest
import torch

from megatron_fipo.algo import future_kl, future_kl_reference


def test_hand_computed_two_tokens():
    # decay_rate 1 -> gamma 1/2: FKL_0 = ln2 + 1/2 ln(1/2) = 1/2 ln2, FKL_1 = ln(1/2).
    delta = torch.tensor([[math.log(2.0), math.log(0.5)]])
    out = future_kl(delta, torch.ones(1, 2), decay_rate=1.0)
    torch.testing.assert_close(out, torch.tensor([[0.5 * math.log(2.0), -math.log(2.0)]]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.exp(out), torch.tensor([[math.sqrt(2.0), 0.5]]), rtol=1e-6, atol=1e-7)


def test_masked_positions_contribute_nothing():
    delta = torch.tensor([[0.3, 100.0, -0.2, 7.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    gamma = 2.0 ** (-1 / 4.0)
    expected = torch.tensor([[0.3 + gamma**2 * -0.2, gamma * -0.2, -0.2, 0.0]])
    torch.testing.assert_close(future_kl(delta, mask, 4.0), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("decay_rate", [0.25, 1.0, 2.5, 32.0, 1e6])
@pytest.mark.parametrize("length", [1, 63, 64, 65, 3000])
def test_matches_reference_across_chunk_boundaries(decay_rate, length):
    g = torch.Generator().manual_seed(length)
    delta = torch.randn(3, length, generator=g)
    mask = (torch.rand(3, length, generator=g) > 0.2).float()
    mask[:, length // 3 : length // 2] = 0  # a masked run spanning chunk edges
    ref = future_kl_reference(delta, mask, decay_rate)
    out = future_kl(delta, mask, decay_rate)
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max() <= 1e-5 * max(ref.abs().max().item(), 1e-30)


def test_long_sequences_agree_with_float64_reference():
    # The acceptance size: B=64, L=32768, at the recipe's decay rate.
    g = torch.Generator().manual_seed(0)
    delta = 0.05 * torch.randn(64, 32768, generator=g)
    mask = torch.ones(64, 32768)
    mask[:, 30000:] = 0
    ref = future_kl_reference(delta, mask, 32.0)
    out = future_kl(delta, mask, 32.0).double()
    assert (out - ref).abs().max() / ref.abs().max() <= 1e-5
    assert torch.isfinite(out).all()


def test_strong_decay_does_not_underflow_at_32k():
    # gamma = 1/2 per token: 2^-32768 would underflow without per-chunk rescaling.
    delta = torch.zeros(2, 32768)
    delta[:, -1] = 1.0
    out = future_kl(delta, torch.ones_like(delta), 1.0)
    assert out[0, -1] == 1.0 and out[0, -2] == 0.5 and out[0, -3] == 0.25
    assert torch.isfinite(out).all() and (out >= 0).all()


def test_bad_shapes_and_decay_are_rejected():
    with pytest.raises(ValueError, match="must both be"):
        future_kl(torch.zeros(2, 3), torch.ones(2, 4), 1.0)
    with pytest.raises(ValueError, match="decay_rate"):
        future_kl(torch.zeros(2, 3), torch.ones(2, 3), 0.0)
