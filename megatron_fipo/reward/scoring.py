"""Turn sampled groups into rewards: decode, check the answer (or ask reward.custom_reward), add DAPO's overlong penalty.

With ``reward.num_workers`` > 0 the checks run in a process pool (reward/pool.py), and ``submit``
scores a group as soon as it arrives, overlapped with generation; ``score`` gives the same numbers.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_fipo.algo import overlong_penalty
from megatron_fipo.config import RewardConfig
from megatron_fipo.data.problems import Problem
from megatron_fipo.data.tokenizer import Tokenizer
from megatron_fipo.reward.math_reward import RewardResult
from megatron_fipo.reward.outcome import outcome_reward
from megatron_fipo.reward.pool import RewardPool, tokenizer_blob
from megatron_fipo.rollout.base import Sample


@dataclass
class GroupScores:
    rewards: torch.Tensor  # [groups, n] outcome + overlong penalty
    correct: torch.Tensor  # [groups, n] bool
    status_counts: Counter


class Scorer:
    def __init__(self, cfg: RewardConfig, tokenizer: Tokenizer, max_response_length: int):
        self.cfg, self.tokenizer, self.max_len = cfg, tokenizer, max_response_length
        self._reward = outcome_reward(cfg)  # imports reward.custom_reward here: a bad spec fails before any worker starts
        self._pool: Optional[RewardPool] = None
        self._pool_lock = threading.Lock()
        self._tokenizer_blob = tokenizer_blob(tokenizer) if cfg.num_workers > 0 else b""  # a tokenizer that cannot travel fails here

    @property
    def pool(self) -> Optional[RewardPool]:
        """The worker pool (reward.num_workers > 0), started on first use: ranks that never score start none."""
        with self._pool_lock:
            if self._pool is None and self.cfg.num_workers > 0:
                self._pool = RewardPool(self.cfg, self._tokenizer_blob, self.cfg.num_workers)
            return self._pool

    def reward(self, response: str, problem: Problem) -> RewardResult:
        return self._reward(response, problem)

    def submit(self, group: list[Sample], problem: Problem) -> "Future[GroupScores]":
        """One group's scores (rewards [1, n]). Without a pool it is scored now, in the caller's thread
        (math-verify's limit then holds only in the main thread)."""
        future: Future = Future()
        if self.pool is None:
            try:
                future.set_result(self.score([group], [problem]))
            except Exception as err:
                future.set_exception(err)
            return future
        parts = [self.pool.submit(s.response_ids, problem) for s in group]
        left, lock = [len(parts)], threading.Lock()

        def on_part(_done: Future) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            try:
                future.set_result(self._assemble([group], [[p.result().result for p in parts]]))
            except Exception as err:  # a custom reward's error, or a closed pool
                future.set_exception(err)

        for part in parts:
            part.add_done_callback(on_part)
        return future

    def score(self, groups: list[list[Sample]], problems: list[Problem]) -> GroupScores:
        if self.pool is None:
            results = [[self.reward(self.tokenizer.decode(s.response_ids), p) for s in g] for g, p in zip(groups, problems)]
        else:
            parts = [[self.pool.submit(s.response_ids, p) for s in g] for g, p in zip(groups, problems)]
            results = [[f.result().result for f in row] for row in parts]
        return self._assemble(groups, results)

    def close(self) -> None:
        """Stop the reward workers (also done at exit when never called)."""
        if self._pool is not None:
            self._pool.close()

    def _assemble(self, groups: list[list[Sample]], results: list[list[RewardResult]]) -> GroupScores:
        counts = Counter(r.status for row in results for r in row)
        outcome = torch.tensor([[r.score for r in row] for row in results])
        correct = torch.tensor([[r.status == "correct" for r in row] for row in results])
        lengths = torch.tensor([[len(s.response_ids) for s in g] for g in groups], dtype=torch.float32)
        buffer = min(self.cfg.overlong_buffer_length, self.max_len)
        penalty = overlong_penalty(lengths, self.max_len, buffer, self.cfg.overlong_penalty_factor)
        return GroupScores(outcome + penalty, correct, counts)
