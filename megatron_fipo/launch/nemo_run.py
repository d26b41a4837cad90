"""The same run as a NeMo-Run experiment: Slurm (through a local or SSH tunnel) or local executor."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import ConfigError
from megatron_fipo.launch import job_env, launch_dir


def _slurm_executor(cfg: RunConfig, repo: str, venv_bin: str | None, job_dir: str):
    import nemo_run as run

    launch = cfg.launch
    # A local tunnel's job dir is where the experiment keeps its files (BASE_DIR/experiments), so that
    # sbatch finds the script it wrote; an SSH tunnel copies them to the cluster's remote_job_dir.
    tunnel = (run.SSHTunnel(host=launch.ssh_host, user=launch.ssh_user, job_dir=launch.remote_job_dir or job_dir)
              if launch.tunnel == "ssh" else run.LocalTunnel(job_dir=str(Path(job_dir) / "experiments")))
    # NeMo-Run runs the task in its packaged code dir; the config's relative paths need the launch dir.
    workdir = [f"--container-workdir={repo}"] if launch.container_image else ["--chdir", repo]
    return run.SlurmExecutor(
        account=launch.account or None, partition=launch.partition or None, job_name_prefix=f"{launch.job_name}-",
        time=launch.time, nodes=launch.nodes, ntasks_per_node=1, gpus_per_node=launch.gpus_per_node or None,
        launcher="torchrun", torchrun_nproc_per_node=launch.nproc_per_node, env_vars=job_env(launch),
        container_image=launch.container_image or None, container_mounts=list(launch.container_mounts),
        # No B: here: NeMo-Run's batch shell does not pass signals on, so Slurm signals the step itself.
        signal=f"TERM@{launch.preempt_notice_s}", additional_parameters=_sbatch_extras(cfg),
        srun_args=workdir, setup_lines=f"export PATH={venv_bin}:$PATH" if venv_bin else None,
        packager=run.Packager(), tunnel=tunnel)


def _sbatch_extras(cfg: RunConfig) -> dict[str, object]:
    """launch.sbatch_directives as NeMo-Run's parameters (it always submits with --requeue)."""
    extras: dict[str, object] = {}
    for directive in cfg.launch.sbatch_directives:
        key, _, value = directive.lstrip("-").partition("=")
        extras[key] = value or True  # rendered as #SBATCH --key=value, or --key
    return extras


def run_experiment(cfg: RunConfig, config_path: str, repo: str, executor: Literal["local", "slurm"],
                   dry_run: bool) -> None:
    """One task, ``megatron_fipo.cli train CONFIG`` under torchrun: run (local: to the end; Slurm: submitted)
    or only printed (``dry_run``)."""
    import nemo_run as run

    launch = cfg.launch
    if cfg.rollout.engine == "sglang" and launch.nodes > 1:
        raise ConfigError("launch.nodes > 1 with rollout.engine=sglang: SGLang servers on every node are placed by "
                          "`megatron-fipo launch slurm`; NeMo-Run runs single-node SGLang or the embedded engine")
    python = Path(repo) / launch.python if "/" in launch.python else None
    # NeMo-Run's torchrun launcher runs `torchrun` from PATH: the one beside launch.python.
    venv_bin = str(python.parent) if python else None
    task = run.Script(path="megatron_fipo.cli", args=["train", config_path], m=True,
                      entrypoint=str(python or launch.python))
    with tempfile.TemporaryDirectory() as scratch:
        # Not ".../nemo_run": NeMo-Run rewrites every "/nemo_run" in a script without a container.
        job_dir = scratch if dry_run else str(launch_dir(cfg) / "nemo-run")  # a dry run leaves nothing behind
        if executor == "local":
            env = job_env(launch)
            if venv_bin:
                env["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
            chosen = run.LocalExecutor(ntasks_per_node=launch.nproc_per_node, env_vars=env, launcher="torchrun")
        else:
            chosen = _slurm_executor(cfg, repo, venv_bin, job_dir)
        with run.Experiment(launch.job_name, executor=chosen, base_dir=job_dir) as experiment:
            experiment.add(task, name="train")
            if dry_run:
                experiment.dryrun()
            else:
                experiment.run(sequential=True, detach=executor == "slurm")
