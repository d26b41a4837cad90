"""Turn sampled groups into rewards: decode, check the answer (or ask reward.custom_reward), add DAPO's overlong penalty."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from megatron_fipo.algo import overlong_penalty
from megatron_fipo.config import RewardConfig
from megatron_fipo.data.problems import Problem
from megatron_fipo.data.tokenizer import Tokenizer
from megatron_fipo.hooks import load_hook, problem_record
from megatron_fipo.reward.math_reward import MathReward, RewardResult
from megatron_fipo.rollout.base import Sample


@dataclass
class GroupScores:
    rewards: torch.Tensor  # [groups, n] outcome + overlong penalty
    correct: torch.Tensor  # [groups, n] bool
    status_counts: Counter


class CustomReward:
    """reward.custom_reward (see megatron_fipo/hooks.py): a score, or (score, correct); a bare score > 0 is correct."""

    def __init__(self, spec: str):
        self.spec, self.hook = spec, load_hook(spec, "reward.custom_reward")

    def __call__(self, response: str, problem: Problem) -> RewardResult:
        out = self.hook(response, problem.answer, problem_record(problem))
        try:
            score, correct = (float(out[0]), bool(out[1])) if isinstance(out, tuple) else (float(out), float(out) > 0)
        except (TypeError, ValueError, IndexError):
            raise TypeError(f"reward.custom_reward {self.spec} returned {out!r}; return a score or (score, correct)") from None
        return RewardResult(score, "correct" if correct else "wrong", None)


class Scorer:
    def __init__(self, cfg: RewardConfig, tokenizer: Tokenizer, max_response_length: int):
        self.cfg, self.tokenizer, self.max_len = cfg, tokenizer, max_response_length
        self.custom = CustomReward(cfg.custom_reward) if cfg.custom_reward else None
        self.math = MathReward(cfg.answer_format, cfg.correct_score, cfg.wrong_score, cfg.timeout_seconds)

    def reward(self, response: str, problem: Problem) -> RewardResult:
        return self.custom(response, problem) if self.custom else self.math(response, problem.answer)

    def score(self, groups: list[list[Sample]], problems: list[Problem]) -> GroupScores:
        outcome, correct, counts = [], [], Counter()
        for group, problem in zip(groups, problems):
            row_r, row_c = [], []
            for s in group:
                result = self.reward(self.tokenizer.decode(s.response_ids), problem)
                counts[result.status] += 1
                row_r.append(result.score)
                row_c.append(result.status == "correct")
            outcome.append(row_r)
            correct.append(row_c)
        lengths = torch.tensor([[len(s.response_ids) for s in g] for g in groups], dtype=torch.float32)
        buffer = min(self.cfg.overlong_buffer_length, self.max_len)
        penalty = overlong_penalty(lengths, self.max_len, buffer, self.cfg.overlong_penalty_factor)
        return GroupScores(torch.tensor(outcome) + penalty, torch.tensor(correct), counts)
