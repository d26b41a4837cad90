"""Process groups: validate the parallel layout against the model, then initialize Megatron's groups."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_fipo.config import ParallelConfig


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun / Slurm variables, single process otherwise."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return rank, world, local


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_groups(par: ParallelConfig, seed: int) -> None:
    """torch.distributed (NCCL on GPU, gloo on CPU) plus Megatron's TP/PP/CP/DP groups and RNG."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_fipo.actor.cpu_shim import apply_cpu_shim

    apply_cpu_shim()
    rank, world, local = world_from_env()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            # Launchers set it for multi-rank runs; a lone process takes any free port, so several
            # single-process runs can share a machine.
            if world > 1:
                raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is unset: launch with torchrun or srun")
            os.environ["MASTER_PORT"] = str(_free_port())
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo",
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=par.distributed_timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=par.tensor_model_parallel_size,
            pipeline_model_parallel_size=par.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
            context_parallel_size=par.context_parallel_size,
        )
    else:
        # A process keeps one layout (re-initializing gloo/NCCL under torchrun hangs): say so, loudly.
        have = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size())
        if have != (par.tensor_model_parallel_size, par.pipeline_model_parallel_size):
            raise RuntimeError(f"this process already runs TP={have[0]}, PP={have[1]}; it cannot switch to "
                               f"TP={par.tensor_model_parallel_size}, PP={par.pipeline_model_parallel_size}")
    model_parallel_cuda_manual_seed(seed)


def destroy_process_groups() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
