"""`megatron-fipo plan --calibrate` on this CPU: calibrated on one short tiny run, the planner
predicts the per-phase seconds of other configurations within 25%.

Three short runs of examples/tiny_cpu.yaml (7 steps, one process per core, OMP_NUM_THREADS=1): the
calibration run as shipped, one with other ``rollout.n_samples`` and ``actor.max_tokens_per_microbatch``,
and one at TP=2 under torchrun. Each target's workload (response lengths, generation batches, the
reward function's seconds per sample) comes from its own metrics.jsonl, as ``--from-run`` takes it:
those are properties of the task and the policy, not of the layout; its seconds come from the
calibrated factors only. Other jobs share this machine and only ever add time, so each phase is
compared at the step least disturbed (as ``timeit`` takes the fastest repeat).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_fipo.plan import calibrate
from megatron_fipo.plan.step_time import CPU, default_efficiency

REPO = Path(__file__).resolve().parents[2]
SHORT = ["trainer.total_steps=7", "trainer.warmup_sft_steps=0", "trainer.eval_before_train=false",
         "trainer.eval_every=100", "trainer.save_every=100", "trainer.tensorboard=false", "data.eval_size=8",
         "rollout.eval_n_samples=2"]
TOLERANCE = 0.25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(run_dir: Path, *extra: str, nproc: int = 1) -> None:
    launcher = [sys.executable, "-m", "megatron_fipo.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), "-m", "megatron_fipo.cli"]
    cmd = [*launcher, "train", "examples/tiny_cpu.yaml", f"run_dir={run_dir}", *SHORT, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]


@pytest.mark.skipif(os.environ.get("MEGATRON_FIPO_TIMING") != "1", reason=(
    "a wall-clock comparison, run on a quiet machine with MEGATRON_FIPO_TIMING=1: other jobs moved the same "
    "configuration's fastest step by up to 1.5x between runs (docs/planner.md), so it is kept out of make test"))
def test_calibrated_on_one_run_predicts_the_phases_of_others(tmp_path):
    base = tmp_path / "base"
    _train(base)
    eff, report = calibrate.calibrate([str(base)], CPU, default_efficiency(CPU))
    print(report)
    tokenizer = f"data.tokenizer_path={base / 'tokenizer.model'}"  # trained once, by the first run
    targets = {"n16_mb256": ([tokenizer, "rollout.n_samples=16", "actor.max_tokens_per_microbatch=256"], 1),
               "tp2": ([tokenizer, "parallel.tensor_model_parallel_size=2"], 2)}
    failures = []
    for name, (extra, nproc) in targets.items():
        run = tmp_path / name
        _train(run, *extra, nproc=nproc)
        rows = calibrate.run_rows(run, CPU)
        for phase in calibrate.PHASES:
            measured, predicted = calibrate.least_disturbed(rows, eff, phase)
            print(f"{name:<10} {phase:<12} measured {measured:.4f} s predicted {predicted:.4f} s "
                  f"({100 * (predicted / measured - 1):+.0f}%)")
            if predicted != pytest.approx(measured, rel=TOLERANCE):
                failures.append(f"{name} {phase}: measured {measured:.4f} s, predicted {predicted:.4f} s")
    assert not failures, "\n".join(failures)
