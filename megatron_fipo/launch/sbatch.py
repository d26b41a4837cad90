"""The sbatch script of a run: torchrun on every training node, SGLang servers where placed.

One node: the trainer launches its SGLang servers itself (loopback). Several nodes: the script
starts the servers on every node (colocated) or on the last ``launch.sglang_nodes`` nodes
(disaggregated), bound to each node's hostname inside the cluster, with ``rollout.sglang.python``
(SGLang's own environment, requirements-sglang-gpu.txt), and lists their URLs node by node. Colocated,
the first trainer rank of every node loads its own node's servers through CUDA-IPC handles
(rollout/sglang_handoff.py); disaggregated, trainer rank 0 broadcasts to them
(``weight_transport=distributed``, its group's master on the head node). A server that exits is
started again by the script; the trainer waits for it and re-forms its update group.

Start-up order, colocated: servers, then (each healthy) every memory tag released, then torchrun,
so that the trainer and SGLang's static pool never hold a GPU together (``release_block``).

Preemption and the time limit: Slurm sends SIGTERM to the batch shell only (``--signal=B:``), which
passes it to the trainer's step alone (torchrun and its workers), so the servers keep serving while
the trainer finishes its step and checkpoints. torchrun exits 1 after a SIGTERM whatever the trainer's status, so a
preempted job ends FAILED unless ``launch.requeue`` requeues it to go on from the checkpoint.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
from pathlib import Path

from megatron_fipo.config import RunConfig, SGLangConfig
from megatron_fipo.launch import job_env, job_starts_servers, launch_dir, log_dir
from megatron_fipo.rollout.sglang_memory import ALL_TAGS
from megatron_fipo.rollout.sglang_server import RELEASED_VERSION, server_command, server_env


def _directives(cfg: RunConfig, logs: Path) -> list[str]:
    launch = cfg.launch
    lines = [f"--job-name={launch.job_name}", f"--nodes={launch.nodes}", "--ntasks-per-node=1",
             f"--time={launch.time}", f"--output={logs}/slurm-%j.out",
             "--open-mode=append",  # a requeued job keeps one log
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


def _sglang_block(cfg: RunConfig, repo: str, logs: Path) -> list[str]:
    """Start the servers in the background; ``$urls_yaml`` lists them for the trainer."""
    launch, sg = cfg.launch, cfg.rollout.sglang
    serve_first = launch.nodes - launch.sglang_nodes if launch.sglang_nodes else 0
    per_node = sg.num_servers // (launch.sglang_nodes or launch.nodes)  # validate_launch: it divides
    cmd = server_command(sg, cfg.actor.load_hf, "$node", "$port", _releases(cfg), base_gpu_id=f"$((j * {sg.tp_size}))")
    # $node, $port and the GPU offset are loop variables of the batch shell; the rest is quoted.
    quoted = " ".join(a if a.startswith("$") else shlex.quote(a) for a in cmd)
    env = "".join(f"{key}={shlex.quote(value)} " for key, value in server_env(_releases(cfg)).items())  # srun passes it on
    return [
        f"serve_nodes=(\"${{nodes[@]:{serve_first}}}\")",
        "urls=()",
        'for node in "${serve_nodes[@]}"; do',
        f"  for j in $(seq 0 {per_node - 1}); do",
        f"    port=$(({sg.base_port} + j))",
        # A server that exits is started again (from the HF weights); the trainer routes around it
        # meanwhile and waits for it before the next update. The loop ends with the job.
        "    while true; do",
        # --overlap: servers of one node share its allocation, and colocated ones the trainer's too.
        f"      {env}{_srun(cfg, repo)} --overlap --nodes=1 --ntasks=1 -w \"$node\" {quoted} \\",
        f"        >> {logs}/sglang-$node-$j.log 2>&1 || true",
        f'      echo "SGLang server $node:$port exited; starting it again" >> {logs}/sglang-$node-$j.log',
        "      sleep 10",
        "    done &",
        '    urls+=("http://$node:$port")',
        "  done",
        "done",
        'urls_yaml="[$(IFS=,; echo "${urls[*]}")]"',
    ]


def _releases(cfg: RunConfig) -> bool:
    """Colocated servers give their memory to the trainer between phases (sglang_memory.py)."""
    return cfg.rollout.placement == "colocated" and cfg.rollout.sglang.release_memory


def release_block(sg: SGLangConfig, logs: Path) -> list[str]:
    """Wait until each server in ``$urls`` is healthy, release all its memory tags by name, stamp
    ``RELEASED_VERSION`` on it; all servers at once. The script goes on to torchrun only when every
    server is done, and ends with an error naming ``rollout.sglang.startup_timeout_s`` otherwise.

    Without it the trainer would start beside servers holding every tag: for the 32B recipe the
    ledger counts 28.75 GiB of trainer state and context next to 68.03 GiB of SGLang, 96.8 of an
    H100's 79.6 GiB (docs/memory-ledger.md, "Start-up"). The trainer's handles start released
    (sglang_server.job_script_servers).

    The restart loop does not release: a server it brings back holds every tag and reports version
    ``default``; the trainer takes it for a new process at its next call and releases what its phase
    does not need (sglang_engine.py). Released here as well, a server that came back during a
    rollout would be routed requests with its memory gone, and the script's calls would race the
    trainer's own.
    """
    curl = "curl -sf" + (f" -H {shlex.quote('Authorization: Bearer ' + sg.api_key)}" if sg.api_key else "")
    post = f"{curl} -m 600 -H 'Content-Type: application/json' -d"
    release = shlex.quote(json.dumps({"tags": list(ALL_TAGS)}))
    stamp = shlex.quote(json.dumps({"new_version": RELEASED_VERSION, "abort_all_requests": False}))
    return [
        "release_server() {",
        f"  local url=$1 deadline=$((SECONDS + {math.ceil(sg.startup_timeout_s)}))",
        # Down or still loading: waited for. One that dies meanwhile comes back holding every tag.
        f'  until {curl} -m 60 "$url/health" >/dev/null 2>&1 &&',
        f'        {post} {release} "$url/release_memory_occupation" >/dev/null 2>&1; do',
        "    if [ $SECONDS -ge $deadline ]; then",
        f'      echo "SGLang server $url not healthy within rollout.sglang.startup_timeout_s={sg.startup_timeout_s} s;'
        f' see its sglang-*.log in {logs}" >&2',
        "      return 1",
        "    fi",
        "    sleep 2",
        "  done",
        f'  {post} {stamp} "$url/update_weight_version" >/dev/null ||',
        '    { echo "SGLang server $url released its memory but its version could not be stamped" >&2; return 1; }',
        "}",
        "releases=()",
        'for url in "${urls[@]}"; do release_server "$url" & releases+=($!); done',
        'for pid in "${releases[@]}"; do wait "$pid"; done  # set -e: one that failed ends the job',
        'echo "SGLang servers: every memory tag released; starting the trainer"',
    ]


def render_sbatch(cfg: RunConfig, config_path: str, repo: str) -> str:
    """The job script; ``config_path`` is the resolved config the trainer reads, ``repo`` its working directory."""
    launch = cfg.launch
    logs = log_dir(cfg)
    train_nodes = launch.nodes - launch.sglang_nodes
    servers = job_starts_servers(cfg)
    lines = ["#!/bin/bash", *_directives(cfg, logs), "set -euo pipefail", f"cd {shlex.quote(repo)}"]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in job_env(launch).items()]
    lines += ['nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))', "head=${nodes[0]}",
              f"train_nodes=$(IFS=,; echo \"${{nodes[*]:0:{train_nodes}}}\")"]
    overrides = ""
    if servers:
        lines += _sglang_block(cfg, repo, logs)
        if _releases(cfg):
            lines += release_block(cfg.rollout.sglang, logs)
        overrides = ' \\"rollout.sglang.urls=$urls_yaml\\"'
        if cfg.rollout.placement == "disaggregated":
            # The broadcast group's rank 0 is the trainer's rank 0, on the head node (--node-rank below).
            overrides += " rollout.sglang.weight_transport=distributed rollout.sglang.host=$head"
    # Static rendezvous on the head node with --node-rank from Slurm, not c10d's first-come ranks:
    # global rank 0 must be on $head (a broadcast group's master), and node k's ranks on nodes[k],
    # whose servers they load (the URLs are listed in that order).
    torchrun = (f"{shlex.quote(launch.python)} -m torch.distributed.run --nnodes {train_nodes} "
                f"--nproc-per-node {launch.nproc_per_node} --node-rank \\$SLURM_NODEID "
                f"--master-addr $head --master-port {launch.rdzv_port} "
                f"-m megatron_fipo.cli train {shlex.quote(config_path)}{overrides}")
    overlap = " --overlap" if servers and not launch.sglang_nodes else ""  # colocated servers hold these GPUs
    lines += [
        f"{_srun(cfg, repo)}{overlap} --job-name=trainer --nodes={train_nodes} -w \"$train_nodes\" "
        f"bash -c \"{torchrun}\" &",
        "trainer=$!",
        *(["preempted=0"] if launch.requeue else []),
        # SIGTERM to srun itself would SIGKILL the step: signal the trainer's step through Slurm instead.
        "stop_trainer() {",
        *(["  preempted=1"] if launch.requeue else []),
        '  echo "SIGTERM: passed on to the trainer"',
        "  scancel --signal=TERM \"$(squeue -h -s -j \"$SLURM_JOB_ID\" -o '%i %j' | awk '$2 == \"trainer\" {print $1}')\" || true",
        "}",
        "trap stop_trainer TERM",
        "wait $trainer || true  # returns early when the trap runs",
        "status=0",
        "wait $trainer || status=$?",
    ]
    if launch.requeue:
        lines.append('if [ $preempted = 1 ]; then scontrol requeue "$SLURM_JOB_ID"; fi  # resumes from the checkpoint')
    lines.append("exit $status")
    return "\n".join(lines) + "\n"


def submit(cfg: RunConfig, script: str) -> str:
    """Write the script beside the resolved config and ``sbatch`` it; return the job id."""
    path = launch_dir(cfg) / "job.sbatch"
    path.write_text(script)
    log_dir(cfg).mkdir(parents=True, exist_ok=True)  # Slurm opens --output before the script runs
    out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch {path} failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]
