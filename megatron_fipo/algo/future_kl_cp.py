"""Future-KL across context-parallel ranks: each rank scans its own chunks, the ranks swap one carry per chunk.

Under context parallelism a sequence is cut into 2·cp chunks and CP rank r holds chunks r and
2·cp-1-r (Megatron's load-balanced layout). In response-token space, chunk s of a sample covers
tokens [bounds[s], bounds[s+1]) (possibly empty: a chunk of prompt or of padding). Future-KL is a
discounted suffix sum, so for a token j of chunk s

    FutureKL_j = Y_j + gamma^(bounds[s+1] - j) * H_{s+1},    H_s = T_s + gamma^(len_s) * H_{s+1},  H_2cp = 0,

where Y is the suffix sum within chunk s alone and T_s = Y at the chunk's first token. Each rank
scans its two chunks with the O(L) scan of ``future_kl_scan``, the ranks all-gather their T_s (two
values per sequence per rank: 2·cp per sequence in all, whatever its length) and each rank adds the
carries of the later chunks to its own tokens. The carries are combined in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_fipo.algo.future_kl_scan import future_kl


def owned_chunks(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two chunks (of 2·cp) that CP rank ``cp_rank`` holds of every sequence."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def response_chunk_bounds(first_scored: torch.Tensor, chunk: torch.Tensor, length: torch.Tensor, cp_size: int) -> torch.Tensor:
    """[B, 2·cp + 1] response-token boundaries of the 2·cp chunks of each sample.

    first_scored [B]: position (within its sequence) of the token whose prediction scores response
    token 0, i.e. the prompt length - 1; chunk [B]: tokens per chunk; length [B]: response length.
    """
    s = torch.arange(2 * cp_size + 1, dtype=torch.long)
    bounds = s.unsqueeze(0) * chunk.long().unsqueeze(1) - first_scored.long().unsqueeze(1)
    return torch.minimum(bounds.clamp(min=0), length.long().unsqueeze(1))


def _own_chunk_index(bounds: torch.Tensor, cp_size: int, cp_rank: int, width: int):
    """Response-token index [B, 2, W] of this rank's two chunks of each row, ``width`` (a spare
    column) past a chunk's end, and the chunks' lengths [B, 2]."""
    first, second = owned_chunks(cp_size, cp_rank)
    starts = bounds[:, [first, second]]
    lens = bounds[:, [first + 1, second + 1]] - starts
    w = torch.arange(max(int(lens.max()) if lens.numel() else 0, 1), device=bounds.device)
    index = torch.where(w < lens.unsqueeze(-1), starts.unsqueeze(-1) + w, width)
    return index, lens


def scan_own_chunks(
    delta_logp: torch.Tensor, mask: torch.Tensor, bounds: torch.Tensor, cp_size: int, cp_rank: int, decay_rate: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part: (within-chunk Future-KL [B, 2, W] of its two chunks, their totals T [B, 2]).

    delta_logp, mask [B, L]: only the tokens of this rank's chunks are read.
    """
    batch, width = delta_logp.shape
    index, _ = _own_chunk_index(bounds.to(delta_logp.device), cp_size, cp_rank, width)
    flat = index.view(batch, -1)
    inside = flat < width  # past a chunk's end (the spare column) nothing counts
    at = flat.clamp(max=max(width - 1, 0))
    x = delta_logp.gather(1, at)
    m = mask.gather(1, at).to(torch.float32) * inside
    y = future_kl(x.view(2 * batch, -1), m.view(2 * batch, -1), decay_rate).view(batch, 2, -1)
    return y, y[:, :, 0].contiguous()


def add_carries(
    y: torch.Tensor,
    chunk_totals: torch.Tensor,
    bounds: torch.Tensor,
    cp_size: int,
    cp_rank: int,
    decay_rate: float,
    width: int,
) -> torch.Tensor:
    """Future-KL [B, width] on this rank's tokens (0 elsewhere) from its scan ``y`` and every
    chunk's total ``chunk_totals`` [B, 2·cp] (chunk order)."""
    batch = chunk_totals.shape[0]
    n_chunks = 2 * cp_size
    bounds = bounds.to(y.device)
    lens = (bounds[:, 1:] - bounds[:, :-1]).double()
    # H[:, s] = Future-KL at the first token of chunk s (whole sequence); H[:, 2cp] = 0.
    H = torch.zeros(batch, n_chunks + 1, dtype=torch.float64, device=y.device)
    totals = chunk_totals.double()
    for s in range(n_chunks - 1, -1, -1):
        H[:, s] = totals[:, s] + torch.exp2(-lens[:, s] / decay_rate) * H[:, s + 1]
    first, second = owned_chunks(cp_size, cp_rank)
    index, own_lens = _own_chunk_index(bounds, cp_size, cp_rank, width)
    later = H[:, [first + 1, second + 1]].float()
    # Token w of a chunk of n tokens is n - w tokens before the next chunk's first token.
    distance = own_lens.unsqueeze(-1) - torch.arange(index.shape[-1], device=y.device)
    full = y + torch.exp2(-distance.float() / decay_rate) * later.unsqueeze(-1)
    out = torch.zeros(batch, width + 1, dtype=torch.float32, device=y.device)
    out.scatter_(1, index.view(batch, -1), full.view(batch, -1))
    return out[:, :width]


def chunk_order(gathered: torch.Tensor, cp_size: int) -> torch.Tensor:
    """[cp, B, 2] totals as all-gathered (rank-major, own chunks per rank) -> [B, 2·cp] chunk order."""
    order = torch.empty(2 * cp_size, dtype=torch.long)
    for rank in range(cp_size):
        first, second = owned_chunks(cp_size, rank)
        order[first], order[second] = 2 * rank, 2 * rank + 1
    flat = gathered.permute(1, 0, 2).reshape(gathered.shape[1], 2 * cp_size)
    return flat[:, order.to(flat.device)]


@dataclass
class ContextParallelShards:
    """``SequenceShards`` (algo/policy_loss.py) for a rank of a context-parallel group.

    ``bounds`` [B, 2·cp + 1] from ``response_chunk_bounds``; the [B, L] tensors handed to the
    methods carry this rank's tokens (its mask is 0 elsewhere). Every rank of the group must call
    each method the same number of times, in the same order: they are collectives.
    """

    bounds: torch.Tensor
    cp_size: int
    cp_rank: int
    group: Optional[dist.ProcessGroup] = None

    def future_kl(self, delta_logp: torch.Tensor, mask: torch.Tensor, decay_rate: float) -> torch.Tensor:
        y, own_totals = scan_own_chunks(delta_logp, mask, self.bounds, self.cp_size, self.cp_rank, decay_rate)
        gathered = torch.empty(self.cp_size * own_totals.numel(), dtype=own_totals.dtype, device=own_totals.device)
        dist.all_gather_into_tensor(gathered, own_totals.view(-1), group=self.group)
        totals = chunk_order(gathered.view(self.cp_size, *own_totals.shape), self.cp_size)
        return add_carries(y, totals, self.bounds, self.cp_size, self.cp_rank, decay_rate, delta_logp.shape[1])

    def sequence_sum(self, per_sequence: torch.Tensor) -> torch.Tensor:
        total = per_sequence.clone()
        dist.all_reduce(total, group=self.group)
        return total
