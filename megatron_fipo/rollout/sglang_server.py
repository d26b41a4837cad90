"""Launch and supervise one ``sglang.launch_server`` process: start, wait for health, restart, stop."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

from megatron_fipo.config import SGLangConfig
from megatron_fipo.rollout.sglang_http import SGLangHTTP
from megatron_fipo.rollout.sglang_memory import ServerMemory

log = logging.getLogger("megatron_fipo")

# The weight version a job script stamps on a colocated server once it has released all its memory
# tags (launch/sbatch.py). It reads as -1, the version samples of the job's initial weights carry
# ("default" reads as -1 too), and a restarted process reports "default" instead: that is how the
# trainer tells a released server from a new one.
RELEASED_VERSION = "-1"


def server_command(cfg: SGLangConfig, model_path: str, host: str, port: int | str, release_memory: bool,
                   base_gpu_id: int | str | None = None) -> list[str]:
    """The sglang.launch_server command line, for the trainer's own servers and for job scripts."""
    cmd = [cfg.python or sys.executable, "-m", "sglang.launch_server", "--model-path", model_path,
           "--host", host, "--port", str(port), "--tp-size", str(cfg.tp_size),
           "--mem-fraction-static", str(cfg.mem_fraction_static),
           # The trainer sends token ids and reads token ids: no tokenizer on the server.
           "--skip-tokenizer-init"]
    if base_gpu_id is not None:
        cmd += ["--base-gpu-id", str(base_gpu_id)]
    if cfg.api_key:
        cmd += ["--api-key", cfg.api_key]
    if release_memory:
        # Colocated with training: weights and KV cache can be released while the trainer runs.
        cmd += ["--enable-memory-saver"]
    return cmd + list(cfg.extra_args)


def server_env(release_memory: bool) -> dict[str, str]:
    """Environment variables for a server. One whose memory is released answers /health without a
    generation: SGLang 0.5.23's /health runs a one-token request by default (http_server.py:721-785,
    SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION), which on a GPU reads the memory a release unmapped.
    It still answers 503 until the server's warmup is done."""
    return {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "false"} if release_memory else {}


class SGLangServer:
    """One server process; its stdout/stderr go to ``log_path`` (appended across restarts)."""

    def __init__(self, cfg: SGLangConfig, index: int, log_path: Path, release_memory: bool):
        self.cfg = cfg
        self.release_memory = release_memory
        self.index = index
        self.port = cfg.base_port + index
        self.url = f"http://{cfg.host}:{self.port}"
        self.http = SGLangHTTP(self.url, cfg.api_key, cfg.request_timeout_s)
        self.memory = ServerMemory(lambda path, payload: self.http.post(path, payload), release_memory)
        # The version last stamped on this process (set_version, or the job script's RELEASED_VERSION);
        # None until then. A server that reports another one is a new process: a restart nobody saw.
        self.weight_version: str | None = None
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def command(self, model_path: str) -> list[str]:
        # Server i of this node takes GPUs [i * tp, (i + 1) * tp); without it every server lands on
        # GPU 0. SGLang's CPU engine reads the same id as a NUMA node, so it is left out there.
        args = self.cfg.extra_args
        on_cpu = "--device" in args and args[args.index("--device") + 1 :][:1] == ["cpu"]
        return server_command(self.cfg, model_path, self.cfg.host, self.port, self.release_memory,
                              base_gpu_id=None if on_cpu else self.index * self.cfg.tp_size)

    def start(self, model_path: str) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command(model_path)
        log.info("starting SGLang server %d: %s", self.index, " ".join(cmd))
        self.new_process()
        with open(self.log_path, "ab") as out:
            # Its own process group, so stop() also ends the scheduler and detokenizer children.
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **server_env(self.release_memory)})

    def new_process(self) -> None:
        """A (re)started server: every memory tag resident, no version stamped."""
        self.memory.restarted()
        self.weight_version = None

    def wait_healthy(self) -> None:
        deadline = time.time() + self.cfg.startup_timeout_s
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"SGLang server {self.index} exited with code {self.proc.returncode} while starting; "
                                   f"see {self.log_path}:\n{self.log_tail()}")
            if self.http.healthy():
                return
            time.sleep(1.0)
        where = (f"see {self.log_path}:\n{self.log_tail()}" if self.proc is not None else
                 "it was started by the job script: see its sglang-*.log in launch.log_dir")
        raise TimeoutError(f"SGLang server {self.index} ({self.url}) not healthy within "
                           f"rollout.sglang.startup_timeout_s={self.cfg.startup_timeout_s} s; {where}")

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None  # an external server is assumed alive

    def restart(self, model_path: str) -> None:
        code = self.proc.poll() if self.proc is not None else None
        self.restarts += 1
        log.warning("SGLang server %d (%s) is down (exit code %s); restarting it (restart %d) from %s",
                    self.index, self.url, code, self.restarts, model_path)
        self.stop()
        self.start(model_path)
        self.wait_healthy()

    def stop(self) -> None:
        """End the whole process group: a crashed launcher can leave its scheduler holding the port."""
        if self.proc is None:
            return
        _signal_group(self.proc.pid, signal.SIGTERM)
        deadline = time.time() + 30
        while time.time() < deadline:
            self.proc.poll()  # reap the launcher so a zombie does not count as alive
            if not _signal_group(self.proc.pid, 0):
                break
            time.sleep(0.2)
        _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the group; False when no process of it is left."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def job_script_servers(cfg: SGLangConfig, run_dir: Path, release_memory: bool, indices: Iterable[int]) -> list[SGLangServer]:
    """Handles on servers another process started (``rollout.sglang.urls``): never started or stopped here.

    Colocated (``release_memory``), the job script releases every memory tag of each server and then
    stamps ``RELEASED_VERSION`` on it, before torchrun starts (launch/sbatch.py): the trainer then
    starts with the GPUs to itself. So these handles start with every tag released and that version
    stamped. A server that reports another version at the engine's first look (``_check_servers``),
    such as one the job script's loop restarted meanwhile (a new process reports ``default``) or one
    started by hand, is taken for a new process holding every tag, as after any restart.
    """
    servers = []
    for i in indices:
        server = SGLangServer(cfg, i, run_dir / "sglang" / f"server-{i}.log", release_memory)
        server.url = server.http.url = cfg.urls[i].rstrip("/")
        if release_memory:
            server.memory.all_released()
            server.weight_version = RELEASED_VERSION
        servers.append(server)
    return servers
