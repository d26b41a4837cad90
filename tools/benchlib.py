"""Timing and peak-memory measurement shared by the tools/bench_*.py scripts."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def time_fn(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of fn() (CUDA-synchronized when on GPU)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by torch during fn(), above what was live before it.

    On CUDA this is the caching allocator's peak; on CPU it replays the profiler's allocation
    events in time order (the CPU allocator keeps no peak counter of its own).
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:9.1f} MiB"
