"""The same run as a NeMo-Run experiment: Slurm (through a local or SSH tunnel) or local executor."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import ConfigError


def run_experiment(cfg: RunConfig, config_path: str, repo: str, executor: Literal["local", "slurm"], dry_run: bool) -> None:
    """One task, ``python -m megatron_fipo.cli train CONFIG``: run (local: to the end; Slurm: submitted) or
    only printed (``dry_run``)."""
    import nemo_run as run

    launch = cfg.launch
    if cfg.rollout.engine == "sglang" and launch.nodes > 1:
        raise ConfigError("launch.nodes > 1 with rollout.engine=sglang: SGLang servers on every node are placed by "
                          "`megatron-fipo launch slurm`; NeMo-Run runs single-node SGLang or the embedded engine")
    python = str(Path(repo) / launch.python)
    task = run.Script(path="megatron_fipo.cli", args=["train", config_path], m=True, entrypoint=python)
    job_dir = str(Path(cfg.run_dir).resolve() / "launch" / "nemo_run")
    if executor == "local":
        chosen = run.LocalExecutor(ntasks_per_node=launch.nproc_per_node, env_vars=dict(launch.env),
                                   launcher="torchrun" if launch.nproc_per_node > 1 else None)
    else:
        tunnel = (run.SSHTunnel(host=launch.ssh_host, user=launch.ssh_user, job_dir=launch.remote_job_dir or job_dir)
                  if launch.tunnel == "ssh" else run.LocalTunnel(job_dir=job_dir))
        chosen = run.SlurmExecutor(
            account=launch.account, partition=launch.partition or None, time=launch.time, nodes=launch.nodes,
            ntasks_per_node=1, gpus_per_node=launch.gpus_per_node or None, launcher="torchrun",
            torchrun_nproc_per_node=launch.nproc_per_node, env_vars=dict(launch.env),
            container_image=launch.container_image or None, container_mounts=list(launch.container_mounts),
            signal=f"B:TERM@{launch.preempt_notice_s}", packager=run.Packager(), tunnel=tunnel)
    with run.Experiment(launch.job_name, executor=chosen, base_dir=job_dir) as experiment:
        experiment.add(task, name="train")
        if dry_run:
            experiment.dryrun()
        else:
            experiment.run(sequential=True, detach=executor == "slurm")
