"""Run a worker script under torchrun (gloo on CPU) and fail loudly with its output."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, script: str | Path, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        # Show each rank's own traceback: torchrun's summary at the end names none.
        lines = (proc.stdout + proc.stderr).splitlines()
        errors = [i for i, line in enumerate(lines) if "Traceback" in line or "Error" in line]
        context = "\n".join(lines[max(0, errors[0] - 2): errors[0] + 60]) if errors else "\n".join(lines[-80:])
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{context}")
    return proc.stdout
