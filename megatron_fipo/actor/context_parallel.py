"""Context parallelism: Megatron's load-balanced split of packed sequences over the CP group.

Every sequence of a packed micro-batch is padded to a multiple of 2·cp and cut into 2·cp equal
chunks; CP rank r holds chunks r and 2·cp-1-r of each sequence, sequence after sequence, so that
causal attention costs every rank the same. This is the THD layout that Transformer Engine's
context-parallel attention and Megatron's THD RoPE (``_apply_rotary_pos_emb_thd`` with
``cu_seqlens_q_padded``) expect; the CPU attention (``actor/cpu_cp_attention.py``) reads the same
``cu_seqlens_padded`` through ``rank_token_index``, so both paths share this code.
"""

from __future__ import annotations

import math

import torch

from megatron_fipo.algo.future_kl_cp import owned_chunks


def padded_lengths(lengths: list[int], cp_size: int, rank_multiple: int = 1) -> list[int]:
    """Each sequence's slot: its length rounded up to a multiple of 2·cp. The last slot grows (by
    2·cp steps) until each rank's share of the micro-batch is a multiple of ``rank_multiple``
    (the TP size under sequence parallelism, which splits each rank's tokens over TP)."""
    step = 2 * cp_size
    slots = [-(-n // step) * step for n in lengths]
    unit = math.lcm(step, cp_size * rank_multiple)
    if slots:
        slots[-1] += -(-sum(slots) // unit) * unit - sum(slots)
    return slots


def rank_token_index(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions in the packed row (offsets ``cu_seqlens_padded``) that ``cp_rank`` holds, in its order."""
    cu = cu_seqlens_padded.long()
    chunk = (cu[1:] - cu[:-1]) // (2 * cp_size)
    first, second = owned_chunks(cp_size, cp_rank)
    starts = torch.stack([cu[:-1] + first * chunk, cu[:-1] + second * chunk], dim=1).flatten()
    lens = chunk.repeat_interleave(2)
    run_start = torch.cumsum(lens, 0) - lens
    within = torch.arange(int(lens.sum()), device=cu.device) - run_start.repeat_interleave(lens)
    return starts.repeat_interleave(lens) + within


def group_token_index(cu_seqlens_padded: torch.Tensor, cp_size: int) -> torch.Tensor:
    """Packed-row positions of the CP group's tokens as all-gathered (rank 0's, then rank 1's, ...)."""
    return torch.cat([rank_token_index(cu_seqlens_padded, cp_size, r) for r in range(cp_size)])


def sequence_of(positions: torch.Tensor, cu_seqlens_padded: torch.Tensor) -> torch.Tensor:
    """Index of the sequence that each packed-row position belongs to."""
    return torch.searchsorted(cu_seqlens_padded.long(), positions, right=True) - 1
