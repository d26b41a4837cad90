"""Split a SequenceBatch into token-bounded micro-batches, padded or packed.

Every layout yields ``score_index``: for response token j of sample i, the flat position (in the
micro-batch's [b, s] token grid) whose next-token prediction scores it. Unpacking logprobs is then
one gather, identical for padded and packed micro-batches, and a sequence's tokens never mix with
its packed neighbours'. Under context parallelism a rank's grid holds its chunks of each sequence
(``actor/context_parallel.py``) and its ``response_mask`` marks the response tokens it scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_fipo.actor.context_parallel import padded_lengths, rank_token_index, sequence_of
from megatron_fipo.algo.future_kl_cp import response_chunk_bounds
from megatron_fipo.sequences import SequenceBatch


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] next token, 0 where there is none
    attention_mask: Optional[torch.Tensor]  # [1, 1, s, s] bool, True = masked (packed, local attention)
    cu_seqlens: Optional[torch.Tensor]  # [n + 1] int32 sequence starts (packed; padded slots under CP)
    score_index: torch.Tensor  # [n, Lr] flat index into the [b, s] grid
    response_mask: torch.Tensor  # [n, Lr] float
    sample_index: torch.Tensor  # [n] rows of the full batch
    position_ids: torch.Tensor  # [b, s] position in the packed row (CP: in the whole sequence)
    # CP only: [n, 2·cp + 1] response-token bounds of each sample's chunks (algo/future_kl_cp.py).
    chunk_bounds: Optional[torch.Tensor] = None

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
    batch: SequenceBatch,
    indices: list[int],
    pack: bool,
    pad_multiple: int = 1,
    dense_mask: bool = True,
    cp_size: int = 1,
    cp_rank: int = 0,
) -> MicroBatch:
    """Tokens, labels and score index of the samples ``indices``.

    Packed micro-batches carry ``cu_seqlens`` for Transformer Engine's THD attention and, with
    ``dense_mask``, the equivalent block-diagonal causal mask for Megatron's local attention (CPU).
    ``pad_multiple`` pads the token count (per CP rank) to a multiple, for sequence parallelism.
    With ``cp_size`` > 1 (packed only) each sequence gets a slot of a multiple of 2·cp tokens and
    the micro-batch is CP rank ``cp_rank``'s share of them.
    """
    seqs = [batch.prompts[i] + batch.responses[i] for i in indices]
    prompt_lens = torch.tensor([len(batch.prompts[i]) for i in indices])
    resp_lens = torch.tensor([len(batch.responses[i]) for i in indices])
    max_resp = int(resp_lens.max()) if len(indices) else 0
    n = len(seqs)
    chunk_bounds = None
    if pack:
        lengths = [len(s) for s in seqs]
        slots = padded_lengths(lengths, cp_size, pad_multiple) if cp_size > 1 else lengths
        starts = torch.tensor([0] + slots).cumsum(0)
        total = int(starts[-1]) if cp_size > 1 else _round_up(int(starts[-1]), pad_multiple)
        tokens = torch.zeros(1, total, dtype=torch.long)
        labels = torch.zeros(1, total, dtype=torch.long)
        seq_id = torch.full((total,), -1, dtype=torch.long)  # -1: padding, attends only to itself
        for k, s in enumerate(seqs):
            a = int(starts[k])
            tokens[0, a : a + len(s)] = torch.tensor(s)
            labels[0, a : a + len(s) - 1] = torch.tensor(s[1:])
            seq_id[a : a + len(s)] = k
        attention_mask = None
        if dense_mask and cp_size == 1:
            same = seq_id.unsqueeze(0) == seq_id.unsqueeze(1)
            same |= torch.eye(total, dtype=torch.bool) & (seq_id < 0).unsqueeze(0)
            causal = torch.ones(total, total, dtype=torch.bool).tril()
            attention_mask = ~(same & causal).view(1, 1, total, total)
        base = starts[:-1]
        cu_seqlens = torch.cat([starts, torch.tensor([total])]) if total > int(starts[-1]) else starts
        cu_seqlens = cu_seqlens.to(torch.int32)
        position_ids = torch.arange(total).unsqueeze(0)
    else:
        if cp_size > 1:
            raise ValueError("build_microbatch: context parallelism splits packed sequences; pass pack=True")
        width = _round_up(max(len(s) for s in seqs), pad_multiple)
        tokens = torch.zeros(n, width, dtype=torch.long)
        labels = torch.zeros(n, width, dtype=torch.long)
        for k, s in enumerate(seqs):
            tokens[k, : len(s)] = torch.tensor(s)
            labels[k, : len(s) - 1] = torch.tensor(s[1:])
        attention_mask, cu_seqlens = None, None
        base = torch.arange(n) * width
        position_ids = torch.arange(width).unsqueeze(0).expand(n, width)
    j = torch.arange(max_resp).unsqueeze(0)
    response_mask = (j < resp_lens.unsqueeze(1)).float()
    score_index = base.unsqueeze(1) + prompt_lens.unsqueeze(1) + j - 1
    if cp_size > 1:
        # Keep this rank's tokens; a response token is this rank's if the position scoring it is.
        held = rank_token_index(cu_seqlens, cp_size, cp_rank)
        local = torch.full((tokens.shape[1],), -1, dtype=torch.long)
        local[held] = torch.arange(held.numel())
        tokens, labels = tokens[:, held], labels[:, held]
        position_ids = (held - starts[sequence_of(held, cu_seqlens)]).unsqueeze(0)
        score_index = local[score_index.clamp(max=local.numel() - 1)]
        response_mask = response_mask * (score_index >= 0)
        chunk = torch.tensor(slots) // (2 * cp_size)
        chunk_bounds = response_chunk_bounds(prompt_lens - 1, chunk, resp_lens, cp_size)
    score_index = torch.where(response_mask.bool(), score_index, torch.zeros_like(score_index))
    return MicroBatch(tokens, labels, attention_mask, cu_seqlens, score_index, response_mask,
                      torch.tensor(indices, dtype=torch.long), position_ids, chunk_bounds)


def gather_response(values: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """[b, s] per-position values -> [n, Lr] per response token (0 on padding)."""
    return values.reshape(-1)[mb.score_index.to(values.device)] * mb.response_mask.to(values.device)
