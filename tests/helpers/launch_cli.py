"""The tiny CPU job through `megatron-fipo launch`, cut to 2 RL steps (about a minute on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHORT = ["trainer.total_steps=2", "trainer.warmup_sft_steps=10", "trainer.eval_every=2", "trainer.save_every=1",
         "trainer.prompts_per_step=8", "trainer.minibatch_prompts=4", "trainer.gen_prompts_per_batch=12",
         "data.eval_size=8", "rollout.eval_n_samples=2"]


def cli(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``megatron-fipo ARGS`` from the repo root; fails with its output unless it exits 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "megatron_fipo.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timings(row: dict) -> dict:
    """A metrics.jsonl row without what is measured in seconds (it differs between any two runs)."""
    return {k: v for k, v in row.items() if not k.startswith(("time/", "throughput/", "perf/"))}
