"""Pick the rollout engine the config asks for; GPU-only engines are imported lazily."""

from __future__ import annotations

from megatron_fipo.config import RunConfig
from megatron_fipo.model_arch import ModelArch


def build_engine(cfg: RunConfig, arch: ModelArch):
    if cfg.rollout.engine == "embedded":
        from megatron_fipo.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine(arch, max_batch=cfg.rollout.max_batch, prompts_per_chunk=cfg.trainer.gen_prompts_per_batch)
    from megatron_fipo.rollout.sglang_engine import SGLangEngine

    return SGLangEngine(cfg.rollout, arch, cfg.run_dir)


def build_handoff(cfg: RunConfig, engine):
    """The per-node weight handoff where the config places servers on every node, else None."""
    if cfg.rollout.engine != "sglang":
        return None
    from megatron_fipo.rollout.sglang_handoff import build_handoff as build

    return build(cfg, engine)
