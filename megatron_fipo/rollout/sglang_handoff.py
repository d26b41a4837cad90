"""Per-node colocated weight handoff: the first trainer rank of each node loads that node's SGLang servers.

A multi-node colocated job starts its servers from the job script on every training node
(``rollout.sglang.urls``, in node order, the same number on each node). CUDA-IPC handles do not cross
nodes, and a broadcast from trainer rank 0 would put rank 0 and server 0's first TP rank, both on GPU 0
of node 0, in one NCCL communicator, which NCCL refuses. Instead the bridge builds the full HF buckets
on the first rank of every node (each node holds whole model replicas: validation.py checks it), and
that rank hands them to its own node's servers as CUDA-IPC handles (shared-memory handles on a CPU),
every node at once; nothing is broadcast.

Trainer rank 0 still owns the servers' lifecycle (memory tags, recoveries, weight versions): it readies
every server before the handoff and stamps the version after it, with a barrier on each side.

On a GPU the buckets live on the first rank's GPU, and every TP rank of every server on the node
opens them there (peer access over NVLink): the servers must see that GPU (the job script gives
each server step all of its node's GPUs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch.distributed as dist

from megatron_fipo.config import RunConfig
from megatron_fipo.rollout.sglang_engine import SGLangEngine
from megatron_fipo.rollout.sglang_server import job_script_servers
from megatron_fipo.rollout.sglang_weights import Bucket, TensorTransport


def per_node_handoff(cfg: RunConfig) -> bool:
    """Colocated servers the job script started, loaded by tensor handles: each node loads its own."""
    r = cfg.rollout
    return (r.engine == "sglang" and r.placement == "colocated" and r.sglang.weight_transport == "tensor"
            and bool(r.sglang.urls))


class NodeHandoff:
    def __init__(self, cfg: RunConfig, engine: SGLangEngine | None, rank: int, world_size: int, local_world_size: int):
        urls = cfg.rollout.sglang.urls
        nodes = world_size // local_world_size
        per_node = len(urls) // nodes  # validate_handoff: it divides
        node = rank // local_world_size
        self.engine = engine  # on global rank 0 only
        # The bridge's sinks: every node's first rank.
        self.sink_ranks = frozenset(k * local_world_size for k in range(nodes))
        mine = range(node * per_node, (node + 1) * per_node) if rank in self.sink_ranks else range(0)
        if engine is not None:
            self.servers = [engine.servers[i] for i in mine]
        else:
            release = cfg.rollout.sglang.release_memory
            self.servers = job_script_servers(cfg.rollout.sglang, Path(cfg.run_dir), release, mine)

    def sync(self, buckets: Iterable[Bucket], version: int) -> None:
        """Every rank calls this with the bridge's buckets (empty except on the sinks)."""
        if self.engine is not None:
            self.engine.begin_update()  # servers up, weights resident, before any node loads them
        dist.barrier()
        if self.servers:
            TensorTransport.load(self.servers, buckets)
        else:
            for _ in buckets:  # the gathers run on every rank of a sink's replica
                pass
        dist.barrier()
        if self.engine is not None:
            self.engine.end_update(version)


def build_handoff(cfg: RunConfig, engine: SGLangEngine | None) -> NodeHandoff | None:
    if not per_node_handoff(cfg) or not dist.is_initialized():
        return None
    world_size = dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return NodeHandoff(cfg, engine, dist.get_rank(), world_size, local)
