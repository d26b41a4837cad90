"""Outcome reward for math answers: extract the final answer, check it with math-verify.

Model output is only ever parsed (math-verify's LaTeX/expression parser, then sympy equivalence),
never evaluated as code. Each check runs under a wall-clock limit: a pathological answer scores
as wrong and is counted, it cannot stall the run.
"""

from __future__ import annotations

import functools
import logging
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Optional

from math_verify import parse, verify

# math-verify warns on every call that its own (whole-second) timeouts are off: ours replace them.
logging.getLogger("math_verify").setLevel(logging.ERROR)

AnswerFormat = Literal["dapo", "boxed", "plain"]
Status = Literal["correct", "wrong", "no_answer", "unparsable", "timeout"]

_ANSWER_LINE = re.compile(r"Answer\s*:\s*(.+?)\s*$", re.IGNORECASE)


class _CheckTimeout(BaseException):
    """A BaseException so that math-verify's internal ``except Exception`` cannot swallow it."""


@contextmanager
def _time_limit(seconds: float):
    """SIGALRM-based limit (sub-second); without a main thread there is no limit to set."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise _CheckTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str, fmt: AnswerFormat) -> Optional[str]:
    """The final answer as the format asks for it, or None when there is none."""
    if fmt == "plain":
        answer = text.strip()
    elif fmt == "boxed":
        answer = last_boxed(text)
    else:  # DAPO: "The last line of your response should be of the form Answer: $Answer"
        lines = [line for line in text.strip().splitlines() if line.strip()]
        match = _ANSWER_LINE.search(lines[-1]) if lines else None
        answer = match.group(1) if match else last_boxed(text)
    if answer is None:
        return None
    answer = answer.strip().strip("$").strip()
    boxed = last_boxed(answer)
    return (boxed if boxed is not None else answer) or None


@dataclass
class RewardResult:
    score: float
    status: Status
    answer: Optional[str]


@dataclass
class MathReward:
    answer_format: AnswerFormat = "dapo"
    correct_score: float = 1.0
    wrong_score: float = -1.0  # DAPO scores a wrong or missing answer -1
    timeout_seconds: float = 5.0

    def __call__(self, response_text: str, ground_truth: str) -> RewardResult:
        answer = extract_answer(response_text, self.answer_format)
        if answer is None:
            return RewardResult(self.wrong_score, "no_answer", None)
        try:
            status = _check(answer, ground_truth, self.timeout_seconds)
        except _CheckTimeout:
            return RewardResult(self.wrong_score, "timeout", answer)
        return RewardResult(self.correct_score if status == "correct" else self.wrong_score, status, answer)


@functools.lru_cache(maxsize=1 << 16)
def _check(answer: str, ground_truth: str, timeout_seconds: float) -> Status:
    """math-verify's verdict on an extracted answer. Memoized: a group's samples often reach the same
    final answer (the tiny job's 8 samples of a one-digit sum nearly always do, AIME's integer answers
    often), and parse + verify is a pure function of the two strings that costs ~1 ms of sympy each;
    the check was 72% of the asynchronous producer's CPU on the tiny job. A timeout raises, and
    lru_cache keeps no exception: an answer that timed out once is checked again."""
    with _time_limit(timeout_seconds):
        gold = parse(f"${ground_truth}$", parsing_timeout=None)
        pred = parse(f"${answer}$", parsing_timeout=None)
        # math-verify falls back to the raw string when nothing parses.
        if all(isinstance(p, str) for p in pred):
            return "unparsable"
        return "correct" if verify(gold, pred, timeout_seconds=None) else "wrong"


# The first check of a form loads its part of math-verify's parser and fills sympy's caches: seconds
# on a busy host. Each reward worker pays it with warm_up before its first sample's clock starts.
_COMMON_FORMS = [("Answer: 1/2", "0.5"), ("\\boxed{\\frac{1}{2}}", "1/2"), ("Answer: \\{2, 1\\}", "\\{1,2\\}"),
                 ("Answer: 2\\sqrt{2}", "\\sqrt{8}"), ("Answer: x^{2}+1", "1+x^2"), ("Answer: [0, 1)", "[0,1)")]


def warm_up() -> None:
    check = MathReward(timeout_seconds=0)
    for response, truth in _COMMON_FORMS:
        check(response, truth)
