"""Render the sbatch script of a run: torchrun on every training node, SGLang servers where placed.

One node: the trainer launches its SGLang servers itself (loopback). Several nodes: the script
starts the servers on every node (colocated) or on the last ``launch.sglang_nodes`` nodes
(disaggregated), bound to each node's hostname inside the cluster, and the trainer reaches them by
URL and updates them by broadcast from its rank 0 (``weight_transport=distributed``): CUDA IPC
handles do not cross nodes.
"""

from __future__ import annotations

import dataclasses
import shlex

from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import ConfigError
from megatron_fipo.rollout.sglang_server import server_command


def _directives(cfg: RunConfig, log_dir: str) -> list[str]:
    launch = cfg.launch
    lines = [f"--job-name={launch.job_name}", f"--nodes={launch.nodes}", "--ntasks-per-node=1",
             f"--time={launch.time}", f"--output={log_dir}/slurm-%j.out",
             # B: the batch shell gets the notice and forwards it to the trainer (see the trap below).
             f"--signal=B:TERM@{launch.preempt_notice_s}"]
    if launch.gpus_per_node:
        lines.append(f"--gpus-per-node={launch.gpus_per_node}")
    if launch.partition:
        lines.append(f"--partition={launch.partition}")
    if launch.account:
        lines.append(f"--account={launch.account}")
    if launch.requeue:
        lines.append("--requeue")
    return [f"#SBATCH {d}" for d in lines + list(launch.sbatch_directives)]


def _srun(cfg: RunConfig, repo: str) -> str:
    launch = cfg.launch
    flags = ["srun", "--ntasks-per-node=1"]
    if launch.gpus_per_node:
        flags.append(f"--gpus-per-node={launch.gpus_per_node}")
    if launch.container_image:
        flags += [f"--container-image={launch.container_image}", f"--container-workdir={repo}"]
        if launch.container_mounts:
            flags.append(f"--container-mounts={','.join(launch.container_mounts)}")
    return " ".join(shlex.quote(f) for f in flags)


def _sglang_block(cfg: RunConfig, repo: str, log_dir: str) -> list[str]:
    launch, sg = cfg.launch, cfg.rollout.sglang
    if not cfg.actor.load_hf:
        raise ConfigError("actor.load_hf: servers on other nodes start from a Hugging Face checkpoint; set it")
    per_node = max(launch.gpus_per_node // sg.tp_size, 1)
    first = launch.nodes - launch.sglang_nodes if launch.sglang_nodes else 0
    server = dataclasses.replace(sg, python=sg.python or launch.python)
    release = cfg.rollout.placement == "colocated" and sg.release_memory
    cmd = server_command(server, cfg.actor.load_hf, "$node", "$port", release, base_gpu_id="$((j * {}))".format(sg.tp_size))
    # $node, $port and the GPU offset are loop variables of the batch shell; the rest is quoted.
    quoted = " ".join(a if a.startswith("$") else shlex.quote(a) for a in cmd)
    return [
        f"serve_nodes=(\"${{nodes[@]:{first}}}\")",
        "urls=()",
        'for node in "${serve_nodes[@]}"; do',
        f"  for j in $(seq 0 {per_node - 1}); do",
        f"    port=$(({sg.base_port} + j))",
        f"    {_srun(cfg, repo)} --overlap --nodes=1 --ntasks=1 -w \"$node\" {quoted} \\",
        f"      > {log_dir}/sglang-$node-$j.log 2>&1 &",
        '    urls+=("http://$node:$port")',
        "  done",
        "done",
        'urls_yaml="[$(IFS=,; echo "${urls[*]}")]"',
    ]


def render_sbatch(cfg: RunConfig, config_path: str, repo: str) -> str:
    """The job script; ``config_path`` is the resolved config the trainer reads."""
    launch = cfg.launch
    log_dir = f"{cfg.run_dir}/launch"
    train_nodes = launch.nodes - launch.sglang_nodes
    remote_servers = cfg.rollout.engine == "sglang" and launch.nodes > 1
    lines = ["#!/bin/bash", *_directives(cfg, log_dir), "set -euo pipefail", f"cd {shlex.quote(repo)}",
             f"mkdir -p {shlex.quote(log_dir)}"]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in launch.env.items()]
    lines += ['nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))', "head=${nodes[0]}",
              f"train_nodes=$(IFS=,; echo \"${{nodes[*]:0:{train_nodes}}}\")"]
    overrides = ""
    if remote_servers:
        lines += _sglang_block(cfg, repo, log_dir)
        # The broadcast group's rank 0 is the trainer's rank 0, on the head node (--node-rank below).
        overrides = (' \\"rollout.sglang.urls=$urls_yaml\\" rollout.sglang.weight_transport=distributed'
                     ' rollout.sglang.host=$head')
    torchrun = (f"{shlex.quote(launch.python)} -m torch.distributed.run --nnodes {train_nodes} "
                f"--nproc-per-node {launch.nproc_per_node} --node-rank \\$SLURM_NODEID "
                f"--master-addr $head --master-port {launch.rdzv_port} "
                f"-m megatron_fipo.cli train {shlex.quote(config_path)}{overrides}")
    lines += [
        # --overlap: colocated servers already hold the training nodes' GPUs (they release memory, not devices).
        f"{_srun(cfg, repo)}{' --overlap' if remote_servers else ''} --nodes={train_nodes} -w \"$train_nodes\" "
        f"bash -c \"{torchrun}\" &",
        "trainer=$!",
        # Preemption or the time limit: pass SIGTERM on; the trainer checkpoints and exits 0.
        "trap 'kill -TERM $trainer' TERM",
        "wait $trainer || wait $trainer",
    ]
    return "\n".join(lines) + "\n"
