"""CP-native Future-KL on one process: the cp ranks' parts are run one after another and their
exchanged chunk totals combined by hand, then compared with the float64 recurrence."""

import pytest
import torch

from megatron_fipo.algo.future_kl_cp import (
    add_carries,
    chunk_order,
    owned_chunks,
    response_chunk_bounds,
    scan_own_chunks,
)
from megatron_fipo.algo.future_kl_scan import future_kl_reference


def simulate(delta, mask, bounds, cp, decay):
    """Every rank's scan, the all-gather of the totals, every rank's finish; returns the union of
    the ranks' outputs, how many ranks wrote each token, and the values each rank sent."""
    parts = [scan_own_chunks(delta, mask, bounds, cp, r, decay) for r in range(cp)]
    gathered = torch.stack([totals for _, totals in parts])  # [cp, B, 2], as all_gather_into_tensor
    totals = chunk_order(gathered, cp)
    outs = [add_carries(y, totals, bounds, cp, r, decay, delta.shape[1]) for r, (y, _) in enumerate(parts)]
    owners = torch.zeros(delta.shape, dtype=torch.long)
    for r in range(cp):
        for c in owned_chunks(cp, r):
            for b in range(delta.shape[0]):
                owners[b, bounds[b, c]: bounds[b, c + 1]] += 1
    return sum(outs), owners, [totals.numel() for _, totals in parts]


def test_chunk_bounds_by_hand():
    # Prompt 3, response 6, cp=2: the 9 tokens get a 12-token slot, 4 chunks of 3. Response token j
    # is scored at position 2 + j, so chunk 0 (positions 0-2) scores j=0, chunk 1 j=1..3, chunk 2
    # j=4..5 and chunk 3 (padding) none.
    bounds = response_chunk_bounds(torch.tensor([2]), torch.tensor([3]), torch.tensor([6]), cp_size=2)
    assert bounds.tolist() == [[0, 1, 4, 6, 6]]
    assert owned_chunks(2, 0) == (0, 3) and owned_chunks(2, 1) == (1, 2)


def test_two_chunks_by_hand():
    # decay 1 (gamma 1/2), x = [1, 2, 4, 8] over chunks [0, 2) and [2, 4) of a cp=1 sequence:
    # Future-KL = [1 + 1 + 1 + 1, 2 + 2 + 2, 4 + 4, 8] = [4, 6, 8, 8].
    x = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    bounds = torch.tensor([[0, 2, 4]])
    out, owners, _ = simulate(x, torch.ones_like(x), bounds, cp=1, decay=1.0)
    assert out.tolist() == [[4.0, 6.0, 8.0, 8.0]]
    assert owners.tolist() == [[1, 1, 1, 1]]


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("decay", [1.0, 4.0, 32.0])
def test_cp_ranks_together_equal_the_reference(cp, decay):
    g = torch.Generator().manual_seed(cp * 100 + int(decay))
    batch, width = 6, 57
    resp = torch.randint(1, width + 1, (batch,), generator=g)
    resp[0] = width
    prompt = torch.randint(1, 12, (batch,), generator=g)
    # Slots as the actor pads them: a multiple of 2·cp, never a multiple of the raw length.
    chunk = -(-(prompt + resp) // (2 * cp))
    bounds = response_chunk_bounds(prompt - 1, chunk, resp, cp)
    delta = torch.randn(batch, width, generator=g)
    mask = (torch.arange(width).unsqueeze(0) < resp.unsqueeze(1)) & (torch.rand(batch, width, generator=g) > 0.2)
    out, owners, sent = simulate(delta, mask, bounds, cp, decay)
    valid = torch.arange(width).unsqueeze(0) < resp.unsqueeze(1)
    assert torch.equal(owners, valid.long())  # every response token on exactly one rank
    ref = future_kl_reference(delta, mask.float(), decay)
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.double(), ref * valid, rtol=0, atol=1e-6 * scale)
    assert sent == [2 * batch] * cp  # two chunk totals per sequence per rank


def test_long_sequence_cp4_matches_reference():
    # L = 32768 split 8 ways: the carries cross 4096-token chunks.
    g = torch.Generator().manual_seed(7)
    width, cp, decay = 32768, 4, 32.0
    resp = torch.tensor([width, width - 1001])
    prompt = torch.tensor([5, 300])
    chunk = -(-(prompt + resp) // (2 * cp))
    bounds = response_chunk_bounds(prompt - 1, chunk, resp, cp)
    delta = 0.05 * torch.randn(2, width, generator=g)
    mask = torch.arange(width).unsqueeze(0) < resp.unsqueeze(1)
    out, _, _ = simulate(delta, mask, bounds, cp, decay)
    ref = future_kl_reference(delta, mask.float(), decay)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
