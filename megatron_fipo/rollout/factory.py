"""Pick the rollout engine the config asks for; GPU-only engines are imported lazily."""

from __future__ import annotations

from megatron_fipo.config import RunConfig
from megatron_fipo.model_arch import ModelArch


def build_engine(cfg: RunConfig, arch: ModelArch):
    if cfg.rollout.engine == "embedded":
        from megatron_fipo.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine(arch, max_batch=cfg.rollout.max_batch)
    raise NotImplementedError(
        "rollout.engine=sglang: the SGLang engine (server supervision and CUDA-IPC / NCCL / disk weight "
        "updates) is not built yet; use rollout.engine=embedded"
    )
