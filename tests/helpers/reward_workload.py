"""The reward pool's workload (tests/unit/test_reward_pool.py, tools/bench_reward_pool.py): 1,000
(response, ground truth) pairs, pathological answers among them, and a tokenizer that spells them."""

import random

import sympy

from megatron_fipo.data.tokenizer import SentencePieceTokenizer

x = sympy.Symbol("x")
# Answer forms that check in milliseconds: on a busy host still far inside any timeout, so that the
# pool and the serial path agree on every one (a set, ~0.2 s to check, is in SET alone).
EASY = [
    ("so the value is half.\nAnswer: 1/2", "\\frac{1}{2}"),
    ("Answer: 0.5", "\\frac{1}{2}"),
    ("we get \\boxed{\\frac12}", "1/2"),
    ("Answer: 2\\sqrt{2}", "\\sqrt{8}"),
    ("Answer: 3/4", "\\frac{1}{2}"),
    ("I don't know", "5"),
    ("Answer: ???", "5"),
]
SET = ("Answer: \\{2, 1\\}", "\\{1,2\\}")
# Each costs its timeout (the first two: seconds past it undisturbed) or is refused at once
# (numbers past Python's 4,300 digits). The identity's degree: on an idle core of this machine
# math-verify takes 1.6 s at degree 100 (under the tests' 2 s limit), 4.3 s at 300, so 400.
PATHOLOGICAL = [
    (f"Answer: {sympy.latex(sympy.expand((x + 1) ** 400))}", "(x+1)^{400}"),  # a huge polynomial identity
    ("Answer: 3^{10^{7}}", "1"),
    ("Answer: " + "7" * 10_000, "7" * 10_000),  # a 10k-digit number
    ("Answer: " + "31" * 5_000, "3"),
]


def workload(n: int = 1000) -> list[tuple[str, str]]:
    """n pairs: the pathological ones spread through, the rest easy forms and integer answers (half right)."""
    rng = random.Random(0)
    work = []
    for i in range(n - len(PATHOLOGICAL)):
        if i % 4 == 0:
            work.append(EASY[(i // 4) % len(EASY)])
        else:
            a = rng.randint(0, 999)
            work.append((f"step {i}\nAnswer: {a if rng.random() < 0.5 else a + 1}", str(a)))
    for k, item in enumerate(PATHOLOGICAL):
        work.insert(k * n // len(PATHOLOGICAL) + 7, item)
    return work


def workload_tokenizer() -> SentencePieceTokenizer:
    """Trained on the workload's text, as a run's tokenizer is on its data."""
    corpus = [r for r, _ in EASY + [SET] + PATHOLOGICAL[:2]] + ["Answer: 0123456789 step \\frac{}{} ^ + ?"]
    return SentencePieceTokenizer.train(corpus, vocab_size=60)
