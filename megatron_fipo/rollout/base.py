"""The rollout engine contract shared by the embedded engine and SGLang."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Protocol

import torch


class GenerationAborted(Exception):
    """``generate`` gave up because ``abort()`` was called (the run is stopping); nothing it made is kept."""


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    # log pi(token) under softmax(logits / temperature), before top-p/top-k, fp32.
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    weight_version: int
    extra: dict = field(default_factory=dict)


class RolloutEngine(Protocol):
    weight_version: int

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams, seed: int) -> list[list[Sample]]:
        """n samples for each prompt, grouped per prompt, in prompt order."""

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int) -> None:
        """Load HF-named full tensors (bucket by bucket) and tag later samples with ``version``."""

    # Optional: ``abort()`` makes a ``generate`` in flight raise GenerationAborted soon; it is called
    # from a signal handler, so it only sets a flag. Engines without it finish the call.

    def pause(self) -> None:
        """Release accelerator memory while the trainer runs (colocated placement)."""

    def resume(self) -> None:
        """Take the memory back before generating again."""

    def shutdown(self) -> None:
        """Stop servers or free the model."""
