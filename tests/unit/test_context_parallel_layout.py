"""The zig-zag CP layout of packed micro-batches: slots, each rank's tokens, positions, labels and
which rank scores each response token."""

from pathlib import Path

import pytest
import torch

from megatron_fipo.actor.batching import build_microbatch
from megatron_fipo.actor.context_parallel import padded_lengths, rank_token_index
from megatron_fipo.algo.future_kl_cp import owned_chunks
from megatron_fipo.sequences import SequenceBatch


def test_slots_by_hand():
    assert padded_lengths([9, 5], cp_size=2) == [12, 8]
    # SP with TP=3: each rank's share (total / cp) must divide by 3, so the last slot grows to 16.
    assert padded_lengths([5, 5], cp_size=2, rank_multiple=3) == [8, 16]
    assert padded_lengths([7], cp_size=4) == [8]


def test_rank_tokens_by_hand():
    # Slots of 8 and 4 tokens, cp=2: chunks of 2 and 1. Rank 0 holds chunks 0 and 3 of each.
    cu = torch.tensor([0, 8, 12], dtype=torch.int32)
    assert rank_token_index(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert rank_token_index(cu, 2, 1).tolist() == [2, 3, 4, 5, 9, 10]


@pytest.mark.parametrize("cp,pad", [(2, 1), (4, 1), (2, 2)])
def test_each_response_token_is_scored_by_one_rank(cp, pad):
    g = torch.Generator().manual_seed(cp + 10 * pad)
    lens = [(5, 6), (3, 9), (7, 2), (1, 1), (4, 11)]  # totals 11, 12, 9, 2, 15
    prompts = [torch.randint(1, 99, (p,), generator=g).tolist() for p, _ in lens]
    responses = [torch.randint(1, 99, (r,), generator=g).tolist() for _, r in lens]
    batch = SequenceBatch(prompts, responses)
    idx = list(range(len(lens)))
    mbs = [build_microbatch(batch, idx, pack=True, pad_multiple=pad, cp_size=cp, cp_rank=r) for r in range(cp)]
    whole = build_microbatch(batch, idx, pack=True, dense_mask=False)
    owners = torch.stack([mb.response_mask for mb in mbs]).sum(0)
    assert torch.equal(owners, whole.response_mask)  # each response token on exactly one rank
    for r, mb in enumerate(mbs):
        assert mb.tokens.shape[1] % pad == 0 and mb.tokens.shape[1] * cp == int(mb.cu_seqlens[-1])
        assert torch.equal(mb.cu_seqlens, mbs[0].cu_seqlens)
        for i, (p, n) in enumerate(lens):
            for j in range(n):
                if mb.response_mask[i, j]:
                    at = int(mb.score_index[i, j])
                    assert mb.labels[0, at] == responses[i][j]  # predicts response token j
                    assert mb.position_ids[0, at] == p - 1 + j  # from its position in the sequence
                    chunk = int(mb.position_ids[0, at]) // ((mb.cu_seqlens[i + 1] - mb.cu_seqlens[i]) // (2 * cp))
                    assert chunk in owned_chunks(cp, r)
            # The Future-KL chunk bounds mark exactly the tokens this rank scores.
            held = torch.zeros(n)
            for c in owned_chunks(cp, r):
                held[mb.chunk_bounds[i, c]: mb.chunk_bounds[i, c + 1]] = 1
            assert torch.equal(held, mb.response_mask[i, :n])


def test_context_parallelism_refuses_padded_microbatches():
    from megatron_fipo.config import RunConfig
    from megatron_fipo.config_base import ConfigError, load_config
    from megatron_fipo.validation import validate_run

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(RunConfig, repo / "examples" / "tiny_cpu.yaml",
                      ["parallel.context_parallel_size=2", 'actor.packing="off"'])
    with pytest.raises(ConfigError, match="actor.packing=off: parallel.context_parallel_size=2 splits packed"):
        validate_run(cfg, world_size=2)
    cfg.actor.packing = "auto"
    validate_run(cfg, world_size=2)


def test_cpu_attention_mask_by_hand():
    from megatron_fipo.actor.cpu_layers import context_parallel_mask

    # Slots of 4 and 4 tokens, cp=2: rank 0 holds positions 0, 3 | 4, 7; the gathered keys are rank
    # 0's then rank 1's: 0, 3, 4, 7, 1, 2, 5, 6. A query sees its own sequence up to itself.
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    allowed = ~context_parallel_mask(cu, 2, 0)[0, 0]
    keys = [0, 3, 4, 7, 1, 2, 5, 6]
    seen = {q: [k for k, ok in zip(keys, row) if ok] for q, row in zip([0, 3, 4, 7], allowed.tolist())}
    assert seen == {0: [0], 3: [0, 3, 1, 2], 4: [4], 7: [4, 7, 5, 6]}
