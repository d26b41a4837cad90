"""Split a SequenceBatch into token-bounded micro-batches, padded or packed.

Every layout yields ``score_index``: for response token j of sample i, the flat position (in the
micro-batch's [b, s] token grid) whose next-token prediction scores it. Unpacking logprobs is then
one gather, identical for padded and packed micro-batches, and a sequence's tokens never mix with
its packed neighbours'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_fipo.sequences import SequenceBatch


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] next token, 0 where there is none
    attention_mask: Optional[torch.Tensor]  # [1, 1, s, s] bool, True = masked (packed, local attention)
    cu_seqlens: Optional[torch.Tensor]  # [n + 1] int32 sequence starts (packed)
    score_index: torch.Tensor  # [n, Lr] flat index into the [b, s] grid
    response_mask: torch.Tensor  # [n, Lr] float
    sample_index: torch.Tensor  # [n] rows of the full batch

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()


def partition(batch: SequenceBatch, max_tokens: int, pack: bool) -> list[list[int]]:
    """Greedy, order-preserving groups of sample indices whose micro-batch fits ``max_tokens``.

    A sample longer than the budget gets a micro-batch of its own.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    longest = total = 0
    for i in range(len(batch)):
        length = batch.total_length(i)
        new_total, new_longest = total + length, max(longest, length)
        cost = new_total if pack else new_longest * (len(current) + 1)
        if current and cost > max_tokens:
            groups.append(current)
            current, total, longest = [], 0, 0
            new_total, new_longest = length, length
        current.append(i)
        total, longest = new_total, new_longest
    if current:
        groups.append(current)
    return groups


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_microbatch(
    batch: SequenceBatch, indices: list[int], pack: bool, pad_multiple: int = 1, dense_mask: bool = True
) -> MicroBatch:
    """Tokens, labels and score index of the samples ``indices``.

    Packed micro-batches carry ``cu_seqlens`` for Transformer Engine's THD attention and, with
    ``dense_mask``, the equivalent block-diagonal causal mask for Megatron's local attention (CPU).
    """
    seqs = [batch.prompts[i] + batch.responses[i] for i in indices]
    prompt_lens = [len(batch.prompts[i]) for i in indices]
    resp_lens = [len(batch.responses[i]) for i in indices]
    max_resp = max(resp_lens, default=0)
    n = len(seqs)
    if pack:
        total = _round_up(sum(len(s) for s in seqs), pad_multiple)
        starts = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
        tokens = torch.zeros(1, total, dtype=torch.long)
        labels = torch.zeros(1, total, dtype=torch.long)
        seq_id = torch.full((total,), -1, dtype=torch.long)  # -1: padding, attends only to itself
        for k, s in enumerate(seqs):
            a = int(starts[k])
            tokens[0, a : a + len(s)] = torch.tensor(s)
            labels[0, a : a + len(s) - 1] = torch.tensor(s[1:])
            seq_id[a : a + len(s)] = k
        attention_mask = None
        if dense_mask:
            same = seq_id.unsqueeze(0) == seq_id.unsqueeze(1)
            same |= torch.eye(total, dtype=torch.bool) & (seq_id < 0).unsqueeze(0)
            causal = torch.ones(total, total, dtype=torch.bool).tril()
            attention_mask = ~(same & causal).view(1, 1, total, total)
        base = starts[:-1]
        cu_seqlens = torch.cat([starts, torch.tensor([total])]) if total > int(starts[-1]) else starts
        cu_seqlens = cu_seqlens.to(torch.int32)
    else:
        width = _round_up(max(len(s) for s in seqs), pad_multiple)
        tokens = torch.zeros(n, width, dtype=torch.long)
        labels = torch.zeros(n, width, dtype=torch.long)
        for k, s in enumerate(seqs):
            tokens[k, : len(s)] = torch.tensor(s)
            labels[k, : len(s) - 1] = torch.tensor(s[1:])
        attention_mask, cu_seqlens = None, None
        base = torch.arange(n) * width
    j = torch.arange(max_resp).unsqueeze(0)
    response_mask = (j < torch.tensor(resp_lens).unsqueeze(1)).float()
    score_index = (base.unsqueeze(1) + torch.tensor(prompt_lens).unsqueeze(1) + j - 1)
    score_index = torch.where(response_mask.bool(), score_index, torch.zeros_like(score_index))
    return MicroBatch(tokens, labels, attention_mask, cu_seqlens, score_index, response_mask,
                      torch.tensor(indices, dtype=torch.long))


def gather_response(values: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """[b, s] per-position values -> [n, Lr] per response token (0 on padding)."""
    return values.reshape(-1)[mb.score_index.to(values.device)] * mb.response_mask.to(values.device)
