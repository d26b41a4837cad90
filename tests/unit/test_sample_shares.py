"""Packing each DP rank's share of the step's samples into tensors, and back (rollout/shares.py), in one process.

Sending them between ranks over gloo is tested under torchrun in tests/multiprocess/test_shares_dp2.py.
"""

import json
from datetime import timedelta

import pytest
import torch

from megatron_fipo.rollout.base import Sample
from megatron_fipo.rollout.shares import ShareChannel, _unpack, pack_shares


def _groups(lengths: list[list[tuple[int, int]]]) -> list[list[Sample]]:
    """Groups of samples with (prompt, response) lengths; token ids and logprobs tell the samples apart."""
    groups, k = [], 0
    for group in lengths:
        samples = []
        for p, r in group:
            samples.append(Sample(list(range(1000 * k, 1000 * k + p)), list(range(1000 * k + 500, 1000 * k + 500 + r)),
                                  [-0.125 * (k + 1) - j / 1024 for j in range(r)], "stop", weight_version=3))
            k += 1
        groups.append(samples)
    return groups


GROUPS = _groups([[(3, 9), (3, 1), (3, 2), (3, 4)], [(5, 7), (5, 6), (5, 1), (5, 2)]])
ADV = torch.tensor([0.5, -0.5, 1.5, -1.5, 0.25, -0.25, 0.75, -0.75])
STATS = {"reward/mean": 0.25, "rollout/accuracy": 0.5}


def _which(share) -> list[list[int]]:
    """The samples (their index in GROUPS flattened) of each mini-batch of a share."""
    return [[share.seqs.prompts[row][0] // 1000 for row in rows] for rows in share.minibatches]


def test_each_share_carries_its_samples_exactly_split_by_tokens():
    messages = pack_shares(GROUPS, ADV, STATS, minibatch_size=4, dp=2)
    shares = [_unpack(m, m.nbytes) for m in messages]
    # Mini-batch 0 costs 12, 4, 5, 7 tokens: 12|7, then 5 joins 7 (12|12), then 4 joins a 12: 16|12.
    # Mini-batch 1 costs 12, 11, 6, 7: 12|11 and 7|6 join as 12+6 | 11+7 = 18|18.
    assert [_which(s) for s in shares] == [[[0, 1], [4, 6]], [[2, 3], [5, 7]]]
    samples = [s for g in GROUPS for s in g]
    for share in shares:
        assert share.stats == STATS
        for rows, which in zip(share.minibatches, _which(share)):
            for row, k in zip(rows, which):
                s, r = samples[k], len(samples[k].response_ids)
                assert share.seqs.prompts[row] == s.prompt_ids and share.seqs.responses[row] == s.response_ids
                assert share.rollout_logp[row, :r].tolist() == s.logprobs  # dyadic values: exact in fp32
                assert (share.rollout_logp[row, r:] == 0).all()
                assert share.advantages[row].item() == ADV[k].item()


def test_bytes_are_four_per_prompt_token_and_eight_per_response_token():
    messages = pack_shares(GROUPS, ADV, STATS, minibatch_size=4, dp=2)
    text = len(json.dumps(STATS))
    # Rank 0 holds samples 0, 1, 4, 6: prompts 3+3+5+5 tokens, responses 9+1+7+1.
    # Header 5 x int64; per sample 2 lengths (int32) and an advantage (fp32); 2 mini-batch sizes.
    assert messages[0].nbytes == 40 + 4 * 16 + 8 * 18 + 4 * 3 * 4 + 4 * 2 + text
    assert sum(m.nbytes for m in messages) == 2 * (40 + 4 * 2 + text) + 4 * 32 + 8 * 32 + 4 * 3 * 8


def test_one_process_channel_returns_the_share_and_none_for_no_batch():
    channel = ShareChannel(None, 0, timedelta(minutes=1))
    share = channel.hand_out(pack_shares(GROUPS, ADV, STATS, minibatch_size=4, dp=1))
    assert _which(share) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # one rank: every sample, in order
    assert share.received_bytes == 0
    assert channel.hand_out(None) is None
    with pytest.raises(ValueError, match="2 shares for 1 DP ranks"):
        channel.hand_out(pack_shares(GROUPS, ADV, STATS, minibatch_size=4, dp=2))


def test_missing_rollout_logprobs_are_refused():
    bad = _groups([[(2, 3), (2, 2)]])
    bad[0][1].logprobs = bad[0][1].logprobs[:1]
    with pytest.raises(ValueError, match="sample 1: 1 rollout logprobs for 2 response tokens"):
        pack_shares(bad, ADV[:2], STATS, minibatch_size=2, dp=1)
