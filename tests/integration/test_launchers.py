"""The tiny job through the launchers: sbatch on a real one-node Slurm on loopback, and NeMo-Run.

scripts/local_slurm.sh brings up Debian's Slurm 22.05 by hand (.ci/run installs the packages).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHORT = ["launch.nodes=1", "launch.gpus_per_node=0", "launch.nproc_per_node=1", "trainer.total_steps=2",
         "trainer.warmup_sft_steps=10", "trainer.eval_every=2", "trainer.save_every=1", "trainer.prompts_per_step=8",
         "trainer.minibatch_prompts=4", "trainer.gen_prompts_per_batch=12", "data.eval_size=8", "rollout.eval_n_samples=2"]


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "megatron_fipo.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sbatch") is None:
        if os.environ.get("CI"):
            raise RuntimeError("sbatch missing: .ci/run installs slurm-wlm and munge first")
        pytest.skip("Slurm not installed: apt-get install slurm-wlm munge (.ci/run does)")
    subprocess.run([REPO / "scripts" / "local_slurm.sh", "start"], check=True, timeout=120)
    yield
    subprocess.run([REPO / "scripts" / "local_slurm.sh", "stop"], timeout=60)


def _job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return next((tok.split("=", 1)[1] for tok in out.split() if tok.startswith(field + "=")), "")


def test_tiny_job_through_sbatch(slurm, tmp_path):
    proc = _cli("launch", "slurm", "examples/tiny_cpu.yaml", f"run_dir={tmp_path}", *SHORT)
    job = proc.stdout.split()[2].rstrip(":")  # "submitted job N: SCRIPT"
    deadline = time.time() + 480
    while _job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", ""):
        assert time.time() < deadline, f"job {job} still {_job_field(job, 'JobState')!r} after 8 minutes"
        time.sleep(2)
    log = next((tmp_path / "launch").glob("slurm-*.out")).read_text()
    assert _job_field(job, "JobState") == "COMPLETED" and _job_field(job, "ExitCode") == "0:0", log[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
    assert "in 2 FIPO steps" in log
    # What ran is the resolved config written beside the script.
    assert f"train {tmp_path}/launch/config.yaml" in (tmp_path / "launch" / "job.sbatch").read_text()


def test_tiny_job_through_nemo_run_local_executor(tmp_path):
    _cli("launch", "nemo-run", "--executor", "local", "examples/tiny_cpu.yaml", f"run_dir={tmp_path}", *SHORT)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_nemo_run_slurm_executor_dry_run(tmp_path):
    proc = _cli("launch", "nemo-run", "--dry-run", "--executor", "slurm", "examples/qwen2.5-7b-fipo-h100.yaml",
                f"run_dir={tmp_path}", "launch.account=rl", "launch.partition=batch")
    text = proc.stdout + proc.stderr
    for directive in ("#SBATCH --account=rl", "#SBATCH --partition=batch", "#SBATCH --gpus-per-node=8",
                      "#SBATCH --signal=B:TERM@120"):
        assert directive in text, directive
    assert "torchrun" in text and "megatron_fipo.cli train" in text
