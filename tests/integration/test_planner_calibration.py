"""`megatron-fipo plan --calibrate` on this CPU: calibrated on one short tiny run, the planner
predicts the per-phase seconds of other configurations within 25% (at TP=2, all but the sync).

Short runs of examples/tiny_cpu.yaml (7 steps, one process per core, OMP_NUM_THREADS=1): the
calibration run (its metrics.jsonl and timings.jsonl; 512 tokens per micro-batch), then targets:
the job as shipped (4,096 tokens per micro-batch), one with other ``rollout.n_samples`` and
``actor.max_tokens_per_microbatch``, and one at TP=2 under torchrun (its collectives' costs are
the CPU device's, measured apart by tools/bench_cpu_collectives.py: a TP=1 run cannot show them;
its sync is printed, not asserted, see that test). Each target's workload (response lengths, generation batches, the
reward function's seconds per sample) comes from its own metrics.jsonl, as ``--from-run`` takes it:
those are properties of the task and the policy, not of the layout; its seconds come from the
calibrated factors only. Each phase is compared at its least-disturbed step (the first step,
which pays one-time costs, left out): even when no other job runs, this VM's host moves the same
micro-batch's seconds by ~30% between steps of one run, and such disturbances only add time.
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


TIMING = pytest.mark.skipif(os.environ.get("MEGATRON_FIPO_TIMING") != "1", reason=(
    "a wall-clock comparison, run on a quiet machine with MEGATRON_FIPO_TIMING=1: other jobs moved the same "
    "configuration's step times by up to 1.5x between runs (docs/planner.md), so it is kept out of make test"))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """Calibrated on one run of the tiny job with 512 tokens per micro-batch: each mini-batch's 64
    samples (~700 tokens) then split into micro-batches of two sizes, whose seconds separate the
    per-call cost from the per-FLOP cost (as shipped, one micro-batch per mini-batch, all alike)."""
    base = tmp_path_factory.mktemp("calibration") / "base"
    _train(base, "actor.max_tokens_per_microbatch=512")
    eff, report = calibrate.calibrate([str(base)], CPU, default_efficiency(CPU))
    print(report)
    return eff, f"data.tokenizer_path={base / 'tokenizer.model'}"  # the tokenizer, trained once by this run


def _errors(tmp_path, calibrated, name: str, extra: list[str], nproc: int, phases=calibrate.PHASES) -> list[str]:
    eff, tokenizer = calibrated
    run = tmp_path / name
    _train(run, tokenizer, *extra, nproc=nproc)
    rows = calibrate.run_rows(run, CPU)
    failures = []
    for phase in calibrate.PHASES:
        measured, predicted = calibrate.least_disturbed(rows, eff, phase)
        line = f"{name} {phase}: measured {measured:.4f} s, predicted {predicted:.4f} s ({100 * (predicted / measured - 1):+.0f}%)"
        print(line)
        if phase in phases and predicted != pytest.approx(measured, rel=TOLERANCE):
            failures.append(line)
    return failures


@TIMING
@pytest.mark.parametrize("name, extra", [
    ("as_shipped", []),
    ("n16_mb256", ["rollout.n_samples=16", "actor.max_tokens_per_microbatch=256"]),
])
def test_calibrated_on_one_run_predicts_the_phases_of_others(tmp_path, calibrated, name, extra):
    failures = _errors(tmp_path, calibrated, name, extra, nproc=1)
    assert not failures, "\n".join(failures)


@TIMING
def test_tensor_parallel_from_a_tp1_calibration(tmp_path, calibrated):
    """TP=2: rollout, forward and backward within 25%; the sync is printed, not asserted. A TP=1 run
    cannot show the collectives: their cost is the CPU device's, measured apart
    (tools/bench_cpu_collectives.py): an all-reduce inside a stream of layer GEMMs, as TP calls it,
    ~1 ms per call beyond the link term. (At the barriered 0.17 ms per call, forward and backward came
    out 30-49% short in three runs.) The sync's 17 shard gathers, at the gloo cost measured apart,
    came out -9% to -37% (docs/planner.md)."""
    failures = _errors(tmp_path, calibrated, "tp2", ["parallel.tensor_model_parallel_size=2"], nproc=2,
                       phases=("rollout", "old_logprob", "train"))
    assert not failures, "\n".join(failures)
