"""The tiny job through `megatron-fipo launch slurm` on a real one-node Slurm 22.05 on loopback.

scripts/local_slurm.sh brings the cluster up by hand (.ci/run installs Debian's slurm-wlm and munge).
Without accounting there is no sacct: a job's state comes from `scontrol show job` (kept an hour).
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers.launch_cli import REPO, SHORT, cli, metric_steps

STATE = Path(os.environ.get("LOCAL_SLURM_DIR", "/tmp/megatron-fipo-slurm"))
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED")


def _unavailable() -> str:
    """Why a local Slurm cannot run here; empty if it can."""
    missing = [b for b in ("sbatch", "slurmctld", "slurmd", "munged")
               if not (shutil.which(b) or Path("/usr/sbin", b).exists())]
    if missing:
        return f"Slurm not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge (.ci/run does)"
    return "a local Slurm needs root (its daemons drop to the slurm and munge users)" if os.geteuid() else ""


@pytest.fixture(scope="module")
def slurm_env():
    """The environment that reaches the local cluster (SLURM_CONF)."""
    if reason := _unavailable():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the Slurm launcher tests: {reason}")
        pytest.skip(reason)
    env = {**os.environ, "LOCAL_SLURM_DIR": str(STATE), "SLURM_CONF": str(STATE / "slurm.conf")}
    subprocess.run([REPO / "scripts" / "local_slurm.sh", "start"], check=True, timeout=120, env=env)
    yield env
    subprocess.run([REPO / "scripts" / "local_slurm.sh", "stop"], timeout=60, env=env)


def _job(job: str, env: dict) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env)
    return dict(tok.split("=", 1) for tok in out.stdout.split() if "=" in tok)


def _wait_done(job: str, env: dict, timeout: float = 480) -> dict[str, str]:
    deadline = time.time() + timeout
    while (info := _job(job, env)).get("JobState", "PENDING") in ACTIVE:
        assert time.time() < deadline, f"job {job} still {info.get('JobState')} after {timeout:.0f} s"
        time.sleep(1)
    return info


def _submit(run_dir: Path, env: dict, *overrides: str) -> str:
    proc = cli("launch", "slurm", "examples/tiny_cpu.yaml", f"run_dir={run_dir}", *SHORT, *overrides, env=env)
    return proc.stdout.split()[2].rstrip(":")  # "submitted job N: SCRIPT"


def test_tiny_job_through_sbatch(slurm_env, tmp_path):
    """Two trainer ranks (TP=2): the job ends COMPLETED only if every rank exits 0; rank 0 alone reports."""
    job = _submit(tmp_path, slurm_env, "launch.nproc_per_node=2", "parallel.tensor_model_parallel_size=2")
    info = _wait_done(job, slurm_env)
    log = (tmp_path / "launch" / f"slurm-{job}.out").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
    assert metric_steps(tmp_path) == [0, 1, 2]
    assert log.count("in 2 FIPO steps") == 1 and log.count('"optimizer_steps"') == 1, log[-3000:]
    # What ran is the resolved config written beside the script, overrides included.
    script = (tmp_path / "launch" / "job.sbatch").read_text()
    assert f"train {tmp_path}/launch/config.yaml" in script and "--nproc-per-node 2" in script
    assert "total_steps: 2" in (tmp_path / "launch" / "config.yaml").read_text()


def test_sigterm_checkpoints_requeues_and_resumes(slurm_env, tmp_path):
    """Slurm's notice before the time limit (here sent by hand): the batch shell passes SIGTERM to the
    trainer, which stops at its next safe point and checkpoints; the job requeues itself and the rerun
    finishes. Rollouts of about 2 s (200 prompts) and 5 steps: the signal, passed on through squeue and
    scancel, lands well before the run's last safe point."""
    job = _submit(tmp_path, slurm_env, "trainer.total_steps=5", "trainer.gen_prompts_per_batch=200", "launch.requeue=true")
    latest, deadline = tmp_path / "checkpoints" / "latest", time.time() + 300
    while not (latest.is_file() and int(latest.read_text()) >= 1):  # step 0 is the pre-training eval
        assert time.time() < deadline and _job(job, slurm_env).get("JobState", "PENDING") in ACTIVE, "no step 1"
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=TERM", job], check=True, env=slurm_env)
    info = _wait_done(job, slurm_env)  # requeued after cred_expire (10 s in scripts/local_slurm.sh)
    log = (tmp_path / "launch" / f"slurm-{job}.out").read_text()  # --open-mode=append: both runs
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    assert "SIGTERM: passed on to the trainer" in log
    stopped_at = int(log.split("SIGTERM: checkpoint written at step ")[1].split(";")[0])
    assert 1 <= stopped_at < 5
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 5
    assert metric_steps(tmp_path) == [0, 1, 2, 3, 4, 5]


def test_tiny_job_through_nemo_run_slurm_executor(slurm_env, tmp_path):
    """NeMo-Run writes its own sbatch script and submits it through a LocalTunnel (as on a login node)."""
    cli("launch", "nemo-run", "--executor", "slurm", "examples/tiny_cpu.yaml", f"run_dir={tmp_path}", *SHORT,
        env=slurm_env)
    deadline = time.time() + 60
    while not (logs := list((tmp_path / "launch" / "nemo-run").glob("experiments/*/*/train/sbatch_*.out"))):
        assert time.time() < deadline, "NeMo-Run's job never started"
        time.sleep(1)
    job = logs[0].stem.rsplit("_", 1)[1]  # sbatch_megatron-fipo-train_<job>.out
    info = _wait_done(job, slurm_env)
    assert (info["JobName"], info["JobState"], info["ExitCode"]) == ("megatron-fipo-train", "COMPLETED", "0:0")
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
    assert metric_steps(tmp_path) == [0, 1, 2]
