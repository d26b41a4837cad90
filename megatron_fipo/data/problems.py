"""Prompt-answer problems, and the deterministic, resumable stream the trainer draws them from."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    messages: tuple[dict, ...]  # chat messages; the tokenizer renders them into the prompt
    answer: str  # ground truth, checked by math-verify
    source: str = ""
    # Warm-start targets (a task that teaches several forms of the answer); empty: the answer itself
    references: tuple[str, ...] = ()


class ProblemStream:
    """Epoch-wise shuffled stream; ``position`` (problems drawn so far) is all resume needs."""

    def __init__(self, problems: list[Problem], seed: int, position: int = 0):
        if not problems:
            raise ValueError("ProblemStream: the dataset is empty")
        self.problems, self.seed, self.position = problems, seed, position
        self._epoch, self._order = -1, []

    def _order_for(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._order = list(range(len(self.problems)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            self._epoch = epoch
        return self._order

    def take(self, count: int) -> list[Problem]:
        out = []
        for _ in range(count):
            epoch, idx = divmod(self.position, len(self.problems))
            out.append(self.problems[self._order_for(epoch)[idx]])
            self.position += 1
        return out
