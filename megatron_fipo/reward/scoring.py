"""Turn sampled groups into rewards: decode, check the answer, add DAPO's overlong penalty."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from megatron_fipo.algo import overlong_penalty
from megatron_fipo.config import RewardConfig
from megatron_fipo.data.tokenizer import Tokenizer
from megatron_fipo.reward.math_reward import MathReward
from megatron_fipo.rollout.base import Sample


@dataclass
class GroupScores:
    rewards: torch.Tensor  # [groups, n] outcome + overlong penalty
    correct: torch.Tensor  # [groups, n] bool
    status_counts: Counter


class Scorer:
    def __init__(self, cfg: RewardConfig, tokenizer: Tokenizer, max_response_length: int):
        self.cfg, self.tokenizer, self.max_len = cfg, tokenizer, max_response_length
        self.reward = MathReward(cfg.answer_format, cfg.correct_score, cfg.wrong_score, cfg.timeout_seconds)

    def score(self, groups: list[list[Sample]], answers: list[str]) -> GroupScores:
        outcome, correct, counts = [], [], Counter()
        for group, answer in zip(groups, answers):
            row_r, row_c = [], []
            for s in group:
                result = self.reward(self.tokenizer.decode(s.response_ids), answer)
                counts[result.status] += 1
                row_r.append(result.score)
                row_c.append(result.status == "correct")
            outcome.append(row_r)
            correct.append(row_c)
        lengths = torch.tensor([[len(s.response_ids) for s in g] for g in groups], dtype=torch.float32)
        buffer = min(self.cfg.overlong_buffer_length, self.max_len)
        penalty = overlong_penalty(lengths, self.max_len, buffer, self.cfg.overlong_penalty_factor)
        return GroupScores(torch.tensor(outcome) + penalty, torch.tensor(correct), counts)
