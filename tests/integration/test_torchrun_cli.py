"""The README's multi-process command as a user types it: `torchrun --nproc-per-node 2 -m megatron_fipo.cli train ...`.

Every rank must exit 0 (or torchrun, and a Slurm job around it, fails) and only rank 0 reports. A
signal that reaches one rank stops both at the same point.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.launch import free_port
from helpers.launch_cli import REPO, SHORT, metric_steps, without_timings

TORCHRUN = Path(sys.executable).parent / "torchrun"
# Rollouts that take most of a step (200 prompts generated, 8 kept); no checkpoint but step 0's.
RUN = [*SHORT, "trainer.gen_prompts_per_batch=200", "trainer.save_every=100"]


def readme_torchrun_command() -> list[str]:
    """The README's train command under torchrun, word for word."""
    line = next(line for line in (REPO / "README.md").read_text().splitlines()
                if line.startswith("torchrun --nproc-per-node 2 -m megatron_fipo.cli train"))
    return shlex.split(line.split("#")[0])


def torchrun_env() -> dict[str, str]:
    # PET_MASTER_PORT is torchrun's --master-port: a free port, and the README's words unchanged.
    return {**os.environ, "PET_MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _command(run_dir: Path) -> list[str]:
    cmd = readme_torchrun_command()
    assert cmd[0] == "torchrun" and "parallel.tensor_model_parallel_size=2" in cmd
    return [str(TORCHRUN), *cmd[1:], f"run_dir={run_dir}", *RUN]


def _metrics(run_dir: Path) -> list[dict]:
    return [without_timings(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _worker_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process with global rank ``rank`` (from /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == torchrun_pid and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no worker of rank {rank} under torchrun {torchrun_pid}")


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("readme")
    proc = subprocess.run(_command(run_dir), cwd=REPO, env=torchrun_env(), capture_output=True, text=True, timeout=600)
    return run_dir, proc


def test_readme_torchrun_command_exits_zero_with_one_summary(readme_run):
    tmp_path, proc = readme_run
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert proc.stdout.count('"optimizer_steps"') == 1, proc.stdout  # the JSON summary, printed once
    assert proc.stdout.count("eval accuracy") == 1 and proc.stdout.count("curves: ") == 1, proc.stdout
    assert "Traceback" not in out
    assert metric_steps(tmp_path) == [0, 1, 2]


def test_a_signal_to_one_rank_stops_both_at_the_same_point(readme_run, tmp_path):
    """SIGTERM to rank 1 alone, while rank 0 generates step 2's rollout: rank 1 brings it up at the
    first agreement it reaches (after step 2's first PPO mini-batch), both finish the step's updates,
    write one checkpoint of step 2 and exit 0. The resumed run ends as the run that never stopped."""
    ref_dir, ref_proc = readme_run
    assert ref_proc.returncode == 0, ref_proc.stderr[-3000:]
    proc = subprocess.Popen(_command(tmp_path), cwd=REPO, env=torchrun_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (tmp_path / "metrics.jsonl").is_file() or 1 not in metric_steps(tmp_path):
        assert proc.poll() is None and time.time() < deadline, "the run ended before step 1"
        time.sleep(0.02)
    time.sleep(0.3)  # rank 0 is in step 2's rollout (about 2 s), rank 1 waits for it
    os.kill(_worker_pid(proc.pid, rank=1), signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]  # torchrun exits 0 only when both ranks did
    lines = [line for line in err.splitlines() if "checkpoint written" in line]
    assert len(lines) == 1 and "SIGTERM: checkpoint written at step 2;" in lines[0], err[-3000:]
    assert "after step 2's updates" in lines[0]
    assert int((tmp_path / "checkpoints" / "latest").read_text()) == 2 and "Traceback" not in err
    resumed = subprocess.run(_command(tmp_path), cwd=REPO, env=torchrun_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert _metrics(tmp_path) == _metrics(ref_dir)


def test_eval_under_torchrun_exits_zero_with_one_summary(readme_run, tmp_path):
    """`eval` of the TP=2 run at TP=2 (its config.yaml): one summary, and it is the run's own final eval."""
    run_dir, _ = readme_run
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "-m", "megatron_fipo.cli", "eval", str(run_dir), f"run_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=torchrun_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count('"eval_accuracy"') == 1 and proc.stdout.count("eval accuracy ") == 1, proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert json.loads((tmp_path / "eval.json").read_text())["eval_accuracy"] == summary["eval_accuracy_end"]
