"""Launchers: an sbatch script (``sbatch.py``) and a NeMo-Run experiment (``nemo_run.py``) from one RunConfig.

This module stays free of torch and nemo_run: config validation imports it before either loads.
"""

from __future__ import annotations

from pathlib import Path

from megatron_fipo.config import LaunchConfig, RunConfig


def launch_dir(cfg: RunConfig) -> Path:
    """Where a launch writes the resolved config and the job script."""
    return Path(cfg.run_dir).resolve() / "launch"


def log_dir(cfg: RunConfig) -> Path:
    return Path(cfg.launch.log_dir).resolve() if cfg.launch.log_dir else launch_dir(cfg)


def job_env(launch: LaunchConfig) -> dict[str, str]:
    # torchrun passes SIGTERM on to the trainer, then waits this long (30 s by default) before SIGKILL:
    # the preemption notice is the trainer's time to finish its step and checkpoint.
    return {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(launch.preempt_notice_s), **launch.env}


def job_starts_servers(cfg: RunConfig) -> bool:
    """A multi-node job script starts the SGLang servers; one node's trainer starts its own, and
    ``rollout.sglang.urls`` names servers that run elsewhere."""
    return cfg.rollout.engine == "sglang" and cfg.launch.nodes > 1 and not cfg.rollout.sglang.urls
