"""Split each PPO mini-batch over the data-parallel ranks with equal work: Karmarkar–Karp on tokens.

A mini-batch's advantages are computed per prompt group before it is split, and the loss is one
token mean over the whole mini-batch (Megatron divides by the kept-token count summed over the
ranks), so any sample may go to any rank and the split changes neither the loss nor the gradient.
It changes how long the slowest rank computes: DP ranks meet only at the gradient all-reduce that
ends each mini-batch, so each rank's total of the mini-batch, not its micro-batch order, sets the pace.

Pure Python; no torch.
"""

from __future__ import annotations

import heapq
from typing import Sequence


def karmarkar_karp(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Indices of ``costs`` in ``parts`` subsets with near-equal sums (largest differencing method).

    Each item starts as a partial partition of ``parts`` subsets (itself and empty ones); the two
    partitions with the largest spread (largest minus smallest sum) are merged by joining the
    largest subset of one with the smallest of the other, until one partition is left. With at
    least ``parts`` items of positive cost no subset ends empty. Each subset lists its indices in
    ascending order; ties are broken by index, so the result is deterministic.
    """
    if parts < 1:
        raise ValueError(f"karmarkar_karp: parts must be >= 1, got {parts}")
    heap: list[tuple[float, int, list[float], list[list[int]]]] = []
    for i, cost in enumerate(costs):
        sums = [float(cost)] + [0.0] * (parts - 1)
        heapq.heappush(heap, (-float(cost), i, sums, [[i]] + [[] for _ in range(parts - 1)]))
    if not heap:
        return [[] for _ in range(parts)]
    while len(heap) > 1:
        _, key, sums_a, sets_a = heapq.heappop(heap)
        _, _, sums_b, sets_b = heapq.heappop(heap)
        order_a = sorted(range(parts), key=lambda j: -sums_a[j])  # largest first
        order_b = sorted(range(parts), key=lambda j: sums_b[j])  # smallest first
        sums = [sums_a[a] + sums_b[b] for a, b in zip(order_a, order_b)]
        sets = [sets_a[a] + sets_b[b] for a, b in zip(order_a, order_b)]
        heapq.heappush(heap, (-(max(sums) - min(sums)), key, sums, sets))
    return [sorted(s) for s in heap[0][3]]


def minibatch_shares(costs: Sequence[float], minibatch_size: int, dp: int) -> list[list[list[int]]]:
    """``shares[d][m]``: the sample indices DP rank d trains on in PPO mini-batch m.

    Mini-batch m is samples ``m * minibatch_size`` up to the next (whole prompt groups, in order; the
    last may be short); each is split by Karmarkar–Karp on ``costs``. Every rank needs at least one
    sample of every mini-batch (its optimizer step is a collective), so a mini-batch with fewer
    samples than ranks is refused. Only a short last one can be: a step that kept fewer than
    ``prompts_per_step`` groups, with fewer samples per prompt than DP ranks.
    """
    shares: list[list[list[int]]] = [[] for _ in range(dp)]
    for start in range(0, len(costs), minibatch_size):
        stop = min(start + minibatch_size, len(costs))
        if stop - start < dp:
            raise ValueError(f"a PPO mini-batch of {stop - start} samples cannot feed {dp} data-parallel ranks: "
                             f"set rollout.n_samples >= {dp} so that one prompt group feeds them all")
        for d, subset in enumerate(karmarkar_karp(costs[start:stop], dp)):
            shares[d].append([start + i for i in subset])
    return shares


def imbalance(loads: Sequence[float]) -> float:
    """max / mean - 1: the fraction of its time the busiest rank spends beyond an even split."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean - 1.0 if mean > 0 else 0.0
