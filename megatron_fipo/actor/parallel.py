"""Process groups: validate the parallel layout against the model, then initialize Megatron's groups."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_fipo.config import ParallelConfig
from megatron_fipo.config_base import ConfigError
from megatron_fipo.model_arch import ModelArch


def validate_parallel(par: ParallelConfig, arch: ModelArch, world_size: int, has_te: bool) -> int:
    """Raise ConfigError naming the field for any size that does not divide; return the DP size."""
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    if world_size % par.model_parallel_size:
        raise ConfigError(
            f"parallel: tensor ({tp}) x pipeline ({pp}) x context ({cp}) = {par.model_parallel_size} "
            f"must divide the world size {world_size}; change one of the three or the number of ranks"
        )
    checks = [
        (arch.num_attention_heads % tp, f"parallel.tensor_model_parallel_size={tp} must divide num_attention_heads={arch.num_attention_heads}"),
        (arch.num_kv_heads % tp, f"parallel.tensor_model_parallel_size={tp} must divide num_key_value_heads={arch.num_kv_heads} (KV groups)"),
        (arch.vocab_size % tp, f"parallel.tensor_model_parallel_size={tp} must divide vocab_size={arch.vocab_size}; pad the vocabulary"),
        (arch.ffn_hidden_size % tp, f"parallel.tensor_model_parallel_size={tp} must divide intermediate_size={arch.ffn_hidden_size}"),
    ]
    stages = pp * (par.virtual_pipeline_model_parallel_size or 1)
    checks.append((arch.num_layers % stages,
                   f"parallel.pipeline_model_parallel_size={pp} x virtual_pipeline_model_parallel_size="
                   f"{par.virtual_pipeline_model_parallel_size} = {stages} stages must divide num_layers={arch.num_layers}"))
    for bad, message in checks:
        if bad:
            raise ConfigError(message)
    if cp > 1 and not has_te:
        raise ConfigError(
            f"parallel.context_parallel_size={cp} needs Transformer Engine attention (CUDA); "
            "Megatron's local attention has no context parallelism: set it to 1 on CPU"
        )
    return world_size // par.model_parallel_size


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun / Slurm variables, single process otherwise."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return rank, world, local


def init_process_groups(par: ParallelConfig, seed: int, timeout_minutes: int = 30) -> None:
    """torch.distributed (NCCL on GPU, gloo on CPU) plus Megatron's TP/PP/CP/DP groups and RNG."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_fipo.actor.cpu_shim import apply_cpu_shim

    apply_cpu_shim()
    rank, world, local = world_from_env()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo",
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=par.tensor_model_parallel_size,
            pipeline_model_parallel_size=par.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
            context_parallel_size=par.context_parallel_size,
        )
    model_parallel_cuda_manual_seed(seed)


def destroy_process_groups() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
