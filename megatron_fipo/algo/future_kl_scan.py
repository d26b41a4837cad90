"""Future-KL: the discounted suffix sum of per-token log-ratio shifts.

    FutureKL_t = sum_{k >= t} gamma^(k - t) * mask_k * delta_logp_k,   gamma = 2^(-1 / decay_rate)

The reference FIPO code builds a [chunk, L] decay matrix and multiplies, O(L^2) work per row. A
suffix sum is a scan, so this computes it in O(L): within a chunk, scale by gamma^(-j), take a
reverse cumulative sum, scale back; chunks are then stitched by the recurrence on their first tokens
(decay gamma^chunk). The chunk length keeps every scale factor inside 2^(+-MAX_LOG2_SCALE), so
nothing over- or underflows in fp32 whatever the sequence length or decay rate.
"""

from __future__ import annotations

import math

import torch

# gamma^(+-j) for j < chunk stays within 2^(+-64): far from fp32's 2^(+-126) limits.
MAX_LOG2_SCALE = 64.0


def _chunk_len(decay_rate: float, length: int) -> int:
    return max(1, min(length, int(MAX_LOG2_SCALE * decay_rate)))


def _discounted_suffix_sum(x: torch.Tensor, decay_rate: float) -> torch.Tensor:
    """Suffix sums of x [B, L] with decay 2^(-1/decay_rate); x is consumed (scaled in place)."""
    batch, length = x.shape
    chunk = _chunk_len(decay_rate, length)
    n_chunks = math.ceil(length / chunk)
    padded = n_chunks * chunk
    if padded != length:
        x = torch.nn.functional.pad(x, (0, padded - length))
    j = torch.arange(chunk, dtype=torch.float64, device=x.device)
    down = torch.exp2(-j / decay_rate).to(x.dtype)  # gamma^j
    up = torch.exp2(j / decay_rate).to(x.dtype)  # gamma^-j

    # Within a chunk, sum_{k>=t} gamma^(k-t) x_k = gamma^-t * sum_{k>=t} gamma^k x_k.
    scaled = x.view(batch, n_chunks, chunk).mul_(down)
    if n_chunks > 1:
        # The value H_{c+1} at the next chunk's first token reaches every token of chunk c through
        # its last scaled term, as gamma^chunk * H_{c+1}, and H_c = sum_{h>=0} gamma^(chunk h)
        # total_{c+h}. Chunks span 2^64 of decay, so hops beyond the second fall below fp32's
        # smallest subnormal (2^-149): summing hops until then is exact at fp32 precision.
        totals = scaled.sum(-1)
        hop = 2.0 ** (-chunk / decay_rate)
        starts = totals.clone()
        h = 1
        while h < n_chunks and hop**h > 2.0**-150:
            starts[:, :-h] += totals[:, h:] * hop**h
            h += 1
        scaled[:, :-1, -1] += starts[:, 1:] * hop
    return scaled.flip(-1).cumsum_(-1).flip(-1).mul_(up).view(batch, padded)[:, :length]


def future_kl(delta_logp: torch.Tensor, mask: torch.Tensor, decay_rate: float) -> torch.Tensor:
    """Future-KL [B, L] in fp32; positions with mask 0 contribute nothing to any sum."""
    if delta_logp.dim() != 2 or delta_logp.shape != mask.shape:
        raise ValueError(
            f"future_kl: delta_logp {tuple(delta_logp.shape)} and mask {tuple(mask.shape)} must both be [B, L]"
        )
    if not decay_rate > 0:
        raise ValueError(f"future_kl: decay_rate must be > 0, got {decay_rate}")
    # A float mask multiplies ~5x faster than a bool one selects on CPU.
    x = delta_logp.float() * mask.to(torch.float32)
    if x.shape[1] == 0:
        return x
    return _discounted_suffix_sum(x, float(decay_rate))


def future_kl_reference(delta_logp: torch.Tensor, mask: torch.Tensor, decay_rate: float) -> torch.Tensor:
    """Plain float64 recurrence y_t = x_t + gamma * y_{t+1}, for tests."""
    gamma = 2.0 ** (-1.0 / decay_rate)
    x = delta_logp.double() * mask.double()
    out = torch.zeros_like(x)
    running = torch.zeros(x.shape[0], dtype=torch.float64)
    for t in range(x.shape[1] - 1, -1, -1):
        running = x[:, t] + gamma * running
        out[:, t] = running
    return out
