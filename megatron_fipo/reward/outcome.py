"""The outcome reward a config asks for: math-verify on the extracted answer, or reward.custom_reward.

Torch-free: the reward pool's workers build it from the RewardConfig alone.
"""

from __future__ import annotations

from typing import Callable

from megatron_fipo.config import RewardConfig
from megatron_fipo.data.problems import Problem
from megatron_fipo.hooks import load_hook, problem_record
from megatron_fipo.reward.math_reward import MathReward, RewardResult

OutcomeReward = Callable[[str, Problem], RewardResult]


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


def outcome_reward(cfg: RewardConfig) -> OutcomeReward:
    """reward.custom_reward when set (the hook is imported now: a bad spec fails here), else math-verify."""
    if cfg.custom_reward:
        return CustomReward(cfg.custom_reward)
    math = MathReward(cfg.answer_format, cfg.correct_score, cfg.wrong_score, cfg.timeout_seconds)
    return lambda response, problem: math(response, problem.answer)
