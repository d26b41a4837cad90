"""The synthetic task of the tiny CPU job: two-operand addition, answer as a bare number."""

from __future__ import annotations

import random

from megatron_fipo.data.problems import Problem


def arithmetic_problems(max_operand: int) -> list[Problem]:
    """Every ``a+b=`` with 0 <= a, b < max_operand."""
    return [
        Problem(({"role": "user", "content": f"{a}+{b}="},), str(a + b), "arithmetic")
        for a in range(max_operand)
        for b in range(max_operand)
    ]


def split_eval(problems: list[Problem], eval_size: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, eval): a fixed random eval subset, the rest for training."""
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:eval_size])
    return [p for i, p in enumerate(problems) if i not in eval_idx], [problems[i] for i in sorted(eval_idx)]


def tokenizer_corpus(problems: list[Problem]) -> list[str]:
    return [p.messages[0]["content"] + p.answer for p in problems]
