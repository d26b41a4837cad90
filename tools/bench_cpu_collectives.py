"""The CPU planner device's transport figures, measured: gloo all-reduce between two processes on this
machine (what tensor parallelism over gloo pays per collective, and the weight sync per gathered shard), for `megatron-fipo plan --gpu cpu`.

A GPU's figures come from its data sheet (plan/hardware.py); a CPU has none, so the `cpu` device's
collective latency and bandwidth are measured here, on an otherwise idle machine, one process per
core (OMP_NUM_THREADS=1, as the runs use). Prints the median seconds of an all-reduce and all-gather per
size, each call after a barrier (both ranks arrive together); then what an all-reduce costs inside a
stream of compute, as tensor parallelism calls it (a layer's GEMM, then its output's all-reduce, with
no barrier: each call also waits for the other rank's jitter), measured as the loop's time with the
calls less its time without. plan/step_time.py's CPU entry cites the figures it took from this.

    .venv/bin/python tools/bench_cpu_collectives.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = [4, 4096, 65536, 360448, 1441792, 4194304]  # bytes; 360,448 = a tiny-job micro-batch's activations
# A tiny-job micro-batch between the calls: 506 tokens x hidden 128 (examples/tiny_qwen2), whose
# activations (259,072 B) a TP all-reduce moves.
STREAM_TOKENS, STREAM_HIDDEN = 506, 128
STREAM_SIZES = [4, 65536, STREAM_TOKENS * STREAM_HIDDEN * 4]


def _in_stream(size: int, rounds: int = 10, calls: int = 200) -> float:
    """Seconds an all-reduce of ``size`` bytes adds to a stream of layer GEMMs, per call (median of rounds)."""
    x, w = torch.randn(STREAM_TOKENS, STREAM_HIDDEN), torch.randn(STREAM_HIDDEN, STREAM_HIDDEN)
    buf = torch.ones(max(size // 4, 1))

    def loop(comm: bool) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            torch.tanh(x @ w)
            if comm:
                dist.all_reduce(buf)
        return time.perf_counter() - start

    for _ in range(2):
        loop(True), loop(False)
    added = []
    for _ in range(rounds):
        dist.barrier()
        with_calls = loop(True)
        dist.barrier()
        added.append((with_calls - loop(False)) / calls)
    return statistics.median(added)


def _worker(rank: int, port: int, repeats: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    for name in ("all_reduce", "all_gather"):
        for size in SIZES:
            x = torch.ones(size // 4)
            gathered = torch.empty(2 * x.numel())
            call = (lambda: dist.all_reduce(x)) if name == "all_reduce" else (
                lambda: dist.all_gather_into_tensor(gathered, x))
            for _ in range(10):
                call()
            times = []
            for _ in range(repeats):
                dist.barrier()
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            results[(name, size)] = statistics.median(times)
    for size in STREAM_SIZES:
        results[("in_stream", size)] = _in_stream(size)
    if rank == 0:
        out.update(results)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), args.repeats, out), nprocs=2)
        results = dict(out)
    print(f"gloo, 2 processes, median of {args.repeats} (load average {os.getloadavg()[0]:.2f}); bytes per rank")
    for name in ("all_reduce", "all_gather"):
        for size in SIZES:
            print(f"  {name:<10} {size:>9} B  {results[(name, size)] * 1e6:9.1f} us")
    print(f"all_reduce in a stream of [{STREAM_TOKENS} x {STREAM_HIDDEN}] GEMMs (no barrier), added per call:")
    for size in STREAM_SIZES:
        print(f"  all_reduce {size:>9} B  {results[('in_stream', size)] * 1e6:9.1f} us")


if __name__ == "__main__":
    main()
