"""The tiny CPU job end to end, shortened: kill and resume, preemption, outputs.

Runs `megatron-fipo train examples/tiny_cpu.yaml` as a user would, in subprocesses.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.launch_cli import without_timings

REPO = Path(__file__).resolve().parents[2]
SHORT = ["trainer.total_steps=4", "trainer.warmup_sft_steps=20", "trainer.eval_every=2", "trainer.save_every=1",
         "trainer.prompts_per_step=8", "trainer.minibatch_prompts=4", "trainer.gen_prompts_per_batch=12",
         "data.eval_size=8", "rollout.eval_n_samples=2"]


# Rollouts that take most of a step (200 prompts generated in one embedded chunk, the generation batch,
# 8 kept), and no checkpoint but step 0's.
SLOW_ROLLOUT = ["trainer.gen_prompts_per_batch=200", "trainer.save_every=100"]


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_fipo.cli", "train", "examples/tiny_cpu.yaml", f"run_dir={run_dir}", *SHORT, *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}


def _run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(run_dir, *extra), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line] if path.is_file() else []


def _stop_in_rollout(run_dir: Path, after_step: int, sig: signal.Signals) -> tuple[str, float]:
    """Run with SLOW_ROLLOUT, signal it in step ``after_step + 1``'s rollout; (stderr, seconds to exit)."""
    proc = subprocess.Popen(_cmd(run_dir, *SLOW_ROLLOUT), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while after_step not in _logged_steps(run_dir):
        assert proc.poll() is None and time.time() < deadline, "the run ended before the step to interrupt"
        time.sleep(0.02)
    time.sleep(0.3)  # the next step's rollout has begun (it lasts about 2 s; no eval, no save in between)
    sent = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return err, time.time() - sent


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    latest = run_dir / "checkpoints" / "latest"
    while time.time() < deadline:
        if latest.is_file() and int(latest.read_text()) >= step:
            return
        assert proc.poll() is None, "the run ended before reaching the step to interrupt"
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint of step {step} within {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    proc = _run(run_dir)
    return run_dir, proc


def test_outputs_of_a_run(uninterrupted):
    run_dir, proc = uninterrupted
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("eval_accuracy_start", "eval_accuracy_end", "steps", "wall_seconds",
                "mean_response_length_start", "mean_response_length_end"):
        assert key in summary
    assert summary["steps"] == 4
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").is_file() and (run_dir / "tokenizer.model").is_file()
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for key in ("reward/mean", "rollout/accuracy", "response_length/mean", "actor/influence_weight/mean",
                "actor/delta_logp/pos_mean", "actor/ppo_kl", "actor/entropy", "actor/grad_norm", "time/rollout_s",
                "time/train_s", "time/sync_s", "throughput/train_tokens_per_s", "mismatch/train_rollout_logp_abs"):
        assert key in rows[1], key
    # The engine samples with the weights the actor just synced: logprobs agree closely.
    assert max(r["mismatch/train_rollout_logp_abs"] for r in rows[1:]) < 1e-4
    assert "eval accuracy" in proc.stdout and "curves:" in proc.stdout


def test_eval_of_the_final_checkpoint_reproduces_the_runs_own_eval(uninterrupted, tmp_path):
    run_dir, _ = uninterrupted
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_fipo.cli", "eval", str(run_dir / "config.yaml"), f"run_dir={tmp_path}",
         f"actor.load_megatron={run_dir / 'checkpoints'}", f"data.tokenizer_path={run_dir / 'tokenizer.model'}"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["step"] == 4 and result["eval_problems"] == 8
    assert result["eval_accuracy"] == summary["eval_accuracy_end"]
    assert result["mean_response_length"] == summary["mean_response_length_end"]


def test_sigkill_then_rerun_resumes_to_the_same_result(uninterrupted, tmp_path):
    ref_dir, _ = uninterrupted
    proc = subprocess.Popen(_cmd(tmp_path), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_step(tmp_path, proc, 2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _run(tmp_path)
    ref, got = _metrics(ref_dir), _metrics(tmp_path)
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]
    for a, b in zip(ref, got):
        for key in ("reward/mean", "rollout/accuracy", "actor/loss", "actor/grad_norm", "eval/accuracy"):
            assert a.get(key) == b.get(key), (a["step"], key)
    ref_summary = json.loads((ref_dir / "summary.json").read_text())
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("eval_accuracy_start", "eval_accuracy_end", "mean_response_length_end", "steps"):
        assert summary[key] == ref_summary[key], key


def test_checkpoint_before_any_update_then_resume(tmp_path):
    """Without a warm start the first checkpoint (after the step-0 eval) holds a never-stepped optimizer."""
    _run(tmp_path, "trainer.warmup_sft_steps=0", "trainer.total_steps=1")
    _run(tmp_path, "trainer.warmup_sft_steps=0", "trainer.total_steps=2")
    assert [r["step"] for r in _metrics(tmp_path)] == [0, 1, 2]
    assert json.loads((tmp_path / "summary.json").read_text())["optimizer_steps"] == 4


def test_sigterm_then_sigint_in_the_rollout_resume_to_the_uninterrupted_result(tmp_path_factory):
    """Each signal: the rollout is given up, a checkpoint of the last whole step within 30 s, one line, exit 0.

    The run is stopped twice (SIGTERM in step 2's rollout, SIGINT in step 4's) and resumed twice; it
    ends where the run never stopped ends, metric for metric. Only the step-0 checkpoint exists before
    each stop (save_every is past the run), so each stop writes its own.
    """
    ref, run = tmp_path_factory.mktemp("ref"), tmp_path_factory.mktemp("stopped")
    _run(ref, *SLOW_ROLLOUT)
    for after_step, sig in ((1, signal.SIGTERM), (3, signal.SIGINT)):
        err, seconds = _stop_in_rollout(run, after_step, sig)
        assert seconds < 30 and int((run / "checkpoints" / "latest").read_text()) == after_step
        lines = [line for line in err.splitlines() if "checkpoint written" in line]
        assert len(lines) == 1 and f"{sig.name}: checkpoint written at step {after_step};" in lines[0], err[-3000:]
        assert f"in step {after_step + 1}'s rollout" in lines[0]
        assert "Traceback" not in err and "KeyboardInterrupt" not in err
        assert _logged_steps(run) == list(range(after_step + 1)) and not (run / "summary.json").exists()
    _run(run, *SLOW_ROLLOUT)
    want, got = _metrics(ref), _metrics(run)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3, 4]
    for a, b in zip(want, got):
        assert without_timings(a) == without_timings(b), a["step"]
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (run, ref))
    assert {k: v for k, v in summary.items() if k != "wall_seconds"} == {k: v for k, v in ref_summary.items() if k != "wall_seconds"}


def test_ctrl_c_while_the_run_starts_up_is_one_line(tmp_path):
    """SIGINT before the trainer's stop handler is in place (torch and Megatron still importing)."""
    proc = subprocess.Popen(_cmd(tmp_path), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Signal once torch's shared library is mapped: the CLI is running and importing torch. A fixed
    # delay landed in CPython's own start-up on a loaded host, before any handler can exist.
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.time() + 120
    while "libtorch" not in maps.read_text():
        assert proc.poll() is None and time.time() < deadline, "the run ended before importing torch"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "megatron-fipo train: interrupted" and "Traceback" not in err
