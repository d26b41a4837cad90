"""The sbatch script's start-up release step (launch/sbatch.py ``release_block``), run by bash as the
job script runs it, against servers on loopback (SGLang doubles: a real server cannot release on a CPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from megatron_fipo.config import SGLangConfig
from megatron_fipo.launch.sbatch import release_block


def run_release_block(urls: list[str], **sglang) -> subprocess.CompletedProcess:
    """The script's lines after ``urls`` is set, under the script's ``set -euo pipefail``."""
    if shutil.which("curl") is None:  # the job script's HTTP client; Slurm nodes have it
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI must run the job script's release step: apt-get install curl")
        pytest.skip("curl is not installed")
    lines = release_block(SGLangConfig(**sglang), Path("/logs"))
    script = "\n".join(["set -euo pipefail", f"urls=({' '.join(urls)})", *lines])
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)


def release_as_job_script(urls: list[str], **sglang) -> None:
    out = run_release_block(urls, **sglang)
    assert out.returncode == 0, out.stdout + out.stderr
