"""The README's multi-process command as a user types it: `torchrun --nproc-per-node 2 -m megatron_fipo.cli train ...`.

Every rank must exit 0 (or torchrun, and a Slurm job around it, fails) and only rank 0 reports.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from helpers.launch import free_port
from helpers.launch_cli import REPO, SHORT, metric_steps

TORCHRUN = Path(sys.executable).parent / "torchrun"


def readme_torchrun_command() -> list[str]:
    """The README's train command under torchrun, word for word."""
    line = next(line for line in (REPO / "README.md").read_text().splitlines()
                if line.startswith("torchrun --nproc-per-node 2 -m megatron_fipo.cli train"))
    return shlex.split(line.split("#")[0])


def torchrun_env() -> dict[str, str]:
    # PET_MASTER_PORT is torchrun's --master-port: a free port, and the README's words unchanged.
    return {**os.environ, "PET_MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_readme_torchrun_command_exits_zero_with_one_summary(tmp_path):
    cmd = readme_torchrun_command()
    assert cmd[0] == "torchrun" and "parallel.tensor_model_parallel_size=2" in cmd
    proc = subprocess.run([str(TORCHRUN), *cmd[1:], f"run_dir={tmp_path}", *SHORT], cwd=REPO, env=torchrun_env(),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert proc.stdout.count('"optimizer_steps"') == 1, proc.stdout  # the JSON summary, printed once
    assert proc.stdout.count("eval accuracy") == 1 and proc.stdout.count("curves: ") == 1, proc.stdout
    assert "Traceback" not in out
    assert metric_steps(tmp_path) == [0, 1, 2]
