"""tools/gpu_check.py on a machine without CUDA: it imports, measures nothing and says why."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs its checks (minutes)")
def test_gpu_check_says_it_needs_cuda():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "needs CUDA" in proc.stderr and proc.stdout == ""
