"""The one typed schema of a run: every section a dataclass, loaded from YAML with overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_fipo.algo import FIPOConfig
from megatron_fipo.config_base import ConfigError


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Interleaved 1F1B: model chunks per pipeline rank (None = plain 1F1B).
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 2 or self.pipeline_model_parallel_size < 2):
            raise ConfigError(
                "parallel.virtual_pipeline_model_parallel_size needs >= 2 chunks and "
                "pipeline_model_parallel_size >= 2; set it to null otherwise"
            )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("parallel.sequence_parallel needs tensor_model_parallel_size > 1; set it to false")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 10
    # Optimizer steps over which to decay; 0 = constant after warmup (the FIPO/DAPO recipes).
    lr_decay_steps: int = 0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.lr_decay_style != "constant" and self.lr_decay_steps <= 0:
            raise ConfigError(f"optim.lr_decay_steps must be > 0 with lr_decay_style={self.lr_decay_style!r}")


@dataclass
class ActorConfig:
    # Path to a Hugging Face config.json (or its directory) of a Qwen2 / Qwen2.5 / Llama dense model.
    model_config: str = ""
    # Initial weights: a Hugging Face safetensors directory, or empty for random init (tests, tiny job).
    load_hf: str = ""
    precision: Literal["fp32", "bf16"] = "bf16"
    # FP8 Transformer Engine layers on Hopper; null = off. Needs CUDA and transformer-engine.
    fp8: Optional[Literal["delayed", "current"]] = None
    recompute: Literal["none", "full", "selective"] = "none"
    loss: Literal["fipo", "dapo"] = "fipo"
    # Micro-batches are packed up to this many tokens (prompt + response) per micro-batch.
    max_tokens_per_microbatch: int = 8192
    pack_sequences: bool = True
    # Sequence chunk for vocab-parallel logprobs: bounds the live [chunk, vocab/TP] fp32 logits.
    logprob_chunk_size: int = 1024
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.max_tokens_per_microbatch < 1:
            raise ConfigError("actor.max_tokens_per_microbatch must be >= 1")
        if self.logprob_chunk_size < 1:
            raise ConfigError("actor.logprob_chunk_size must be >= 1")


@dataclass
class TrainerSections:
    """The sections the actor reads; the full run config extends it."""

    actor: ActorConfig = field(default_factory=ActorConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    algo: FIPOConfig = field(default_factory=FIPOConfig)
