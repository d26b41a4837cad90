"""Seconds of single calls, finer than a phase, for `megatron-fipo plan --calibrate` (RUN_DIR/timings.jsonl).

A phase's seconds (metrics.jsonl) cannot tell a fixed cost per call from a cost per FLOP when every
step of a run makes the same calls; within a step the calls differ in size (a generation batch's
last chunk of sequences is small, a mini-batch's last micro-batch is short, responses vary in
length), and each call's seconds against its size separate the two. This process's records are
kept between two drains (the training loop drains them once per RL step, rank 0 writes them):

- ``forward`` / ``train``: one micro-batch of the actor, forward only (old logprobs) or forward and
  backward: [tokens computed, sum of squared sequence lengths, seconds]. Recorded without a
  pipeline only (with one, a micro-batch's passes interleave with others').
- ``decode``: one static batch of the embedded engine: [sequences, prompt width, decode steps, seconds].
"""

from __future__ import annotations

import json
from pathlib import Path

FILE = "timings.jsonl"
_records: dict[str, list[list[float]]] = {}


def record(kind: str, *values: float) -> None:
    _records.setdefault(kind, []).append([float(v) for v in values])


def drain() -> dict[str, list[list[float]]]:
    """The records since the last drain (list appends and this swap are atomic under the GIL)."""
    global _records
    out, _records = _records, {}
    return out


def append(run_dir: str | Path, step: int, records: dict[str, list[list[float]]]) -> None:
    if records:
        with (Path(run_dir) / FILE).open("a") as fh:
            fh.write(json.dumps({"step": step, **records}) + "\n")


def read(run_dir: str | Path) -> dict[int, dict[str, list[list[float]]]]:
    """Records per RL step; a step logged twice (a resumed run redid it) keeps its last line."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return {}
    out: dict[int, dict[str, list[list[float]]]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[row.pop("step")] = row
    return out
