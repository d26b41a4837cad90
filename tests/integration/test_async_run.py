"""Asynchronous rollouts end to end on the tiny CPU job (embedded engine, trainer.max_staleness=1):
every sample after the first step is one update old, and SIGKILL then rerun resumes from the last
checkpoint (which holds the producer's buffered batch) to the uninterrupted run's result, so no
sample counted as trained is lost or trained twice.

Runs `megatron-fipo train examples/tiny_cpu.yaml` as a user would, in subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ASYNC = ["trainer.max_staleness=1", "trainer.total_steps=3", "trainer.warmup_sft_steps=10", "trainer.eval_every=3",
         "trainer.save_every=1", "trainer.prompts_per_step=8", "trainer.minibatch_prompts=4",
         "trainer.gen_prompts_per_batch=12", "data.eval_size=8", "rollout.eval_n_samples=2"]


def _cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "megatron_fipo.cli", "train", "examples/tiny_cpu.yaml", f"run_dir={run_dir}", *ASYNC]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("async")
    proc = subprocess.run(_cmd(run_dir), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return run_dir


def test_samples_are_one_update_old_after_the_first_step(uninterrupted):
    rows = _metrics(uninterrupted)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [(r["rollout/staleness_mean"], r["rollout/staleness_max"]) for r in rows[1:]] == [(0, 0), (1, 1), (1, 1)]
    assert all(r["async/dropped_stale_samples"] == 0 for r in rows[1:])
    # The engine's logprobs are the older weights': the gap to the trainer's is no longer ~1e-6.
    assert rows[1]["mismatch/train_rollout_logp_abs"] < 1e-4 < rows[2]["mismatch/train_rollout_logp_abs"]


def test_sigkill_then_rerun_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path):
    proc = subprocess.Popen(_cmd(tmp_path), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, deadline = tmp_path / "checkpoints" / "latest", time.time() + 600
    try:
        while not (latest.is_file() and int(latest.read_text()) >= 1):  # step 1 trained, batch 2 buffered
            assert proc.poll() is None and time.time() < deadline, "the run ended before the step to interrupt"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rerun = subprocess.run(_cmd(tmp_path), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-5000:]
    ref, got = _metrics(uninterrupted), _metrics(tmp_path)
    keys = ("reward/mean", "rollout/accuracy", "rollout/staleness_mean", "actor/loss", "actor/grad_norm",
            "mismatch/train_rollout_logp_abs", "eval/accuracy", "train/tokens")
    assert [[r.get(k) for k in keys] for r in got] == [[r.get(k) for k in keys] for r in ref]
    assert json.loads((tmp_path / "summary.json").read_text())["eval_accuracy_end"] == \
        json.loads((uninterrupted / "summary.json").read_text())["eval_accuracy_end"]
