"""The rollout engine contract shared by the embedded engine and SGLang."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal, Optional, Protocol

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
    # abort: cut short by a stream's cancel (partial rollouts continue it; never trained on as is)
    finish_reason: Literal["stop", "length", "abort"]
    weight_version: int  # of the first token (a continued sample's later tokens: version_segments)
    extra: dict = field(default_factory=dict)
    # Partial rollouts: (index of the first response token, weight version) of each segment after the
    # first, whose version is weight_version. Empty: one version throughout.
    version_segments: list[tuple[int, int]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason != "abort"

    def continued(self, more: "Sample") -> "Sample":
        """This partial sample followed by ``more``, generated from prompt + this response: tokens and
        behaviour logprobs concatenated, the new segment's weight version recorded."""
        segments = list(self.version_segments)
        if more.response_ids and more.weight_version != self.weight_version:
            segments.append((len(self.response_ids), more.weight_version))
        return Sample(list(self.prompt_ids), self.response_ids + more.response_ids, self.logprobs + more.logprobs,
                      more.finish_reason, self.weight_version, dict(self.extra), segments)


@dataclass
class GroupRequest:
    """One prompt group for a stream: n fresh samples of a prompt, or the unfinished samples of a group
    an earlier stream cut short (partial rollouts), continued from their prefixes."""

    key: object  # the caller's handle, given back with the group
    prompt_ids: list[int]
    n: int
    partial: Optional[list[Sample]] = None  # the group so far: finished samples are kept, aborted ones continued


@dataclass
class GroupResult:
    key: object
    samples: list[Sample]  # n, in request order; after a cancel some may be partial (finish_reason abort)
    sequences: int  # sequences generated for it (a continuation: its unfinished samples)
    new_tokens: int  # tokens generated for it (a continuation counts only its new tokens)
    latency_s: float  # from dispatch to completion
    done_at: float  # time.monotonic() at completion
    engine: int = 0  # which server generated it

    @property
    def complete(self) -> bool:
        return all(s.finished for s in self.samples)


@dataclass
class StreamStats:
    """What a stream measured, for the step's metrics."""

    wall_s: float = 0.0  # from the first dispatch until no work remained (or the cancel)
    busy_s: list[float] = field(default_factory=list)  # per engine: time with a request in flight
    slot_s: list[float] = field(default_factory=list)  # per engine: integral of occupied slots / capacity
    aborted_sequences: int = 0  # sequences a cancel cut short
    retried_requests: int = 0  # requests sent again after a dead server


class GroupStream(Protocol):
    """Groups come back as they complete; requests are drawn from the iterator lazily, as capacity frees."""

    stats: StreamStats
    # True when generation runs in the caller's thread as it asks for the next group (the embedded
    # engine): the caller settles its scores before asking, so how much it draws is deterministic.
    blocking: bool

    def __iter__(self) -> Iterator[GroupResult]:
        ...

    def cancel(self, keep_partial: bool = True) -> list[GroupResult]:
        """Abort every request in flight (no retry) and return what each group had: partial samples
        (finish_reason "abort") and any that completed meanwhile. No request is drawn after it.
        ``keep_partial`` False: the caller drops them, so the engine need not wait for them."""


class RolloutEngine(Protocol):
    weight_version: int

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams, seed: int) -> list[list[Sample]]:
        """n samples for each prompt, grouped per prompt, in prompt order."""

    def stream(self, requests: Iterator[GroupRequest], sampling: SamplingParams, seed: int) -> GroupStream:
        """Generate groups as capacity frees, drawing requests lazily; each group on one engine."""

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int) -> None:
        """Load HF-named full tensors (bucket by bucket) and tag later samples with ``version``."""

    # Optional: ``abort()`` makes a ``generate`` or stream in flight raise GenerationAborted soon; it is
    # called from a signal handler, so it only sets a flag. Engines without it finish the call.

    def pause(self) -> None:
        """Release accelerator memory while the trainer runs (colocated placement)."""

    def resume(self) -> None:
        """Take the memory back before generating again."""

    def shutdown(self) -> None:
        """Stop servers or free the model."""
