"""DAPO-Math-17k (parquet or jsonl, the HF dataset's columns) and AIME24/25 (jsonl) loaders.

Every row is validated; a malformed row is reported with its file and line (row) and skipped or
fatal as configured, never silently mis-scored.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator, Literal

from megatron_fipo.config_base import ConfigError
from megatron_fipo.data.problems import Problem

log = logging.getLogger(__name__)

# The DAPO recipe's instruction around each problem (its DAPO-Math-17k prompts carry it already).
DAPO_INSTRUCTION = (
    "Solve the following math problem step by step. The last line of your response should be of the "
    "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
# The instruction around a bare problem (AIME's), for each reward.answer_format: the eval prompt asks
# for the answer in the form the reward extracts, as the training prompts do.
INSTRUCTIONS = {
    "dapo": DAPO_INSTRUCTION,
    "boxed": "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "plain": "{problem}",
}


class DatasetError(ConfigError):
    """A data file that cannot be used: the message names the file (and line) and the fix."""


@dataclass
class LoadReport:
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)


def _rows(path: Path) -> Iterator[tuple[int, object]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
        return
    with path.open() as fh:
        for i, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as err:
                    yield i, err


def _dapo_row(row) -> Problem:
    prompt = row["prompt"]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) and "content" in m for m in prompt):
        raise DatasetError("'prompt' must be a non-empty list of chat messages with 'content'")
    truth = row["reward_model"]["ground_truth"]
    if not isinstance(truth, (str, int, float)) or str(truth).strip() == "":
        raise DatasetError("'reward_model.ground_truth' is missing or empty")
    messages = tuple({"role": m.get("role", "user"), "content": m["content"]} for m in prompt)
    return Problem(messages, str(truth).strip(), row.get("data_source", "dapo_math"))


def _aime_row(row, instruction: str) -> Problem:
    problem = row.get("problem", row.get("question"))
    answer = row.get("answer", row.get("solution"))
    if not isinstance(problem, str) or not problem.strip():
        raise DatasetError("'problem' (or 'question') is missing or empty")
    if answer is None or str(answer).strip() == "":
        raise DatasetError("'answer' is missing or empty")
    content = instruction.format(problem=problem.strip())
    return Problem(({"role": "user", "content": content},), str(answer).strip(), "aime")


def load_problems(
    path: str | Path, kind: Literal["dapo_math", "aime"], on_bad_row: Literal["skip", "fail"] = "skip",
    instruction: str = DAPO_INSTRUCTION,
) -> tuple[list[Problem], LoadReport]:
    """``instruction`` wraps each AIME problem (``{problem}`` marks where); DAPO rows carry their own."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file (data paths are local: no hub downloads at run time)")
    parse_row = _dapo_row if kind == "dapo_math" else partial(_aime_row, instruction=instruction)
    problems, report = [], LoadReport()
    for line, row in _rows(path):
        try:
            if isinstance(row, Exception):
                raise DatasetError(f"not valid JSON ({row})")
            if not isinstance(row, dict):
                raise DatasetError("row is not a JSON object")
            problems.append(parse_row(row))
        except (DatasetError, KeyError, TypeError) as err:
            reason = f"missing key {err}" if isinstance(err, KeyError) else str(err)
            message = f"{path}:{line}: malformed {kind} row: {reason}"
            if on_bad_row == "fail":
                raise DatasetError(message + " (set data.on_bad_row=skip to skip such rows)") from None
            log.warning(message)
            report.skipped.append(message)
    report.loaded = len(problems)
    return problems, report
