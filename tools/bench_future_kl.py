"""Future-KL: O(L) chunked scan vs the O(L^2) chunked matmul of the reference FIPO code, and under
context parallelism the CP-native scan vs gather-then-scan.

Prints, for B=64 and L in {4096, 20480}: time and peak memory of megatron_fipo's future_kl, of the
reference formulation (a [chunk, L] decay matrix per 128-token chunk, as in the official
compute_policy_loss_future_kl), and of torch.cumsum over the same tensor (the floor for any scan).
Then, for L=32768 over cp=4 gloo processes: time and bytes each rank sends for the CP-native
Future-KL (algo/future_kl_cp.py: scan own chunks, all-gather two chunk totals per sequence) and for
gathering the whole sequence, scanning it and keeping the own chunks.
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
from benchlib import mib, peak_bytes, time_fn

from megatron_fipo.algo import future_kl
from megatron_fipo.algo.future_kl_cp import ContextParallelShards, owned_chunks, response_chunk_bounds


def future_kl_chunked_matmul(delta: torch.Tensor, mask: torch.Tensor, decay_rate: float, chunk: int = 128):
    """The reference code's formulation: for each key chunk, a [L, chunk] decay block and a matmul."""
    batch, length = delta.shape
    x = delta * mask
    gamma = torch.tensor(2.0 ** (-1.0 / decay_rate), dtype=x.dtype, device=x.device)
    pos = torch.arange(length, device=x.device).unsqueeze(1)
    out = torch.zeros_like(x)
    for start in range(0, length, chunk):
        end = min(length, start + chunk)
        distance = torch.arange(start, end, device=x.device).unsqueeze(0) - pos  # [L, chunk]
        block = torch.pow(gamma, distance.clamp(min=0)) * (distance >= 0).to(x.dtype)
        out += x[:, start:end] @ block.T
    return out


def _cpu_seconds(fn, repeats: int) -> float:
    """Median CPU seconds of this process in fn(): its own work, not the time it waits for a core
    or for the other ranks (4 processes on 2 cores make wall times mostly waiting)."""
    samples = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        samples.append(time.process_time() - start)
    return statistics.median(samples)


def _cp_rank(rank: int, cp: int, port: int, args, results) -> None:
    """One CP rank: its chunks of B sequences of L response tokens (prompt of 1 token)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cp)
    batch, length = args.batch, args.cp_length
    delta = 0.05 * torch.randn(batch, length, generator=torch.Generator().manual_seed(0))
    resp = torch.full((batch,), length)
    chunk = torch.full((batch,), -(-(length + 1) // (2 * cp)))
    bounds = response_chunk_bounds(torch.zeros(batch), chunk, resp, cp)

    def positions(r: int) -> torch.Tensor:  # sequence positions of CP rank r's chunks (all the same size)
        return torch.cat([torch.arange(c * int(chunk[0]), (c + 1) * int(chunk[0])) for c in owned_chunks(cp, r)])

    # Response token j is scored at position j (a one-token prompt); positions past L are padding.
    slots, everyone = positions(rank), torch.cat([positions(r) for r in range(cp)])
    own = slots[slots < length]
    mask = torch.zeros(batch, length)
    mask[:, own] = 1.0
    local = delta * mask  # what the loss hands over: this rank's tokens, zero elsewhere
    shards = ContextParallelShards(bounds, cp, rank)

    def gather_then_scan() -> torch.Tensor:
        mine = torch.nn.functional.pad(local, (0, int(everyone.max()) + 1 - length))[:, slots]
        parts = torch.empty(cp * batch, slots.numel())
        dist.all_gather_into_tensor(parts, mine.contiguous())
        whole = torch.zeros(batch, int(everyone.max()) + 1)
        whole[:, everyone] = parts.view(cp, batch, -1).permute(1, 0, 2).reshape(batch, -1)
        return future_kl(whole[:, :length], torch.ones(batch, length), args.decay_rate)[:, own]

    native = lambda: shards.future_kl(local, mask, args.decay_rate)  # noqa: E731
    expect = future_kl(delta, torch.ones_like(delta), args.decay_rate)[:, own]
    scale = expect.abs().max().item()
    err = {"cp-native": (native()[:, own] - expect).abs().max().item() / scale,
           "gather+scan": (gather_then_scan() - expect).abs().max().item() / scale}
    fns = {"cp-native": native, "gather+scan": gather_then_scan}
    times = {name: time_fn(fn, repeats=args.cp_repeats) for name, fn in fns.items()}
    cpu = {name: _cpu_seconds(fn, args.cp_repeats) for name, fn in fns.items()}
    # Bytes this rank contributes to each all-gather: its two chunk totals per sequence, or its tokens.
    sent = {"cp-native": 2 * batch * 4, "gather+scan": batch * slots.numel() * 4}
    results[rank] = {"time": times, "cpu": cpu, "sent": sent, "err": err}
    dist.destroy_process_group()


def bench_context_parallel(args) -> None:
    cp = args.cp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_cp_rank, args=(cp, port, args, results), nprocs=cp)
    print(f"\nCP: L={args.cp_length}, cp={cp}, B={args.batch}, decay_rate={args.decay_rate}; {cp} gloo processes, "
          f"1 thread each, on {os.cpu_count()} cores (oversubscribed: times include waiting for the slowest rank)")
    print(f"{'method':<12} {'wall (slowest rank)':>20} {'CPU (busiest rank)':>19} {'bytes sent per rank':>20} "
          f"{'per sequence':>13} {'max rel err':>12}")
    worst = {key: {name: max(results[r][key][name] for r in range(cp)) for name in ("cp-native", "gather+scan")}
             for key in ("time", "cpu", "err")}
    sent = results[0]["sent"]
    for name in ("cp-native", "gather+scan"):
        print(f"{name:<12} {worst['time'][name] * 1e3:17.2f} ms {worst['cpu'][name] * 1e3:16.2f} ms {sent[name]:20d} "
              f"{sent[name] // args.batch:11d} B {worst['err'][name]:12.1e}")
    print(f"summary: the CP-native scan sends {sent['gather+scan'] // sent['cp-native']}x fewer bytes per rank; "
          f"gather-then-scan takes {worst['cpu']['gather+scan'] / worst['cpu']['cp-native']:.1f}x its CPU time "
          f"and {worst['time']['gather+scan'] / worst['time']['cp-native']:.1f}x its wall time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="*", default=[4096, 20480], help="none: only the CP case")
    parser.add_argument("--decay-rate", type=float, default=32.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cp", type=int, default=4, help="context-parallel ranks of the CP case (0: skip it)")
    parser.add_argument("--cp-length", type=int, default=32768)
    parser.add_argument("--cp-repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"device={args.device} threads={torch.get_num_threads()} B={args.batch} decay_rate={args.decay_rate}")
    print(f"{'L':>6} {'method':<16} {'time':>11} {'peak mem':>13} {'vs matmul':>10} {'vs cumsum':>10}")
    for length in args.lengths:
        g = torch.Generator(device=args.device).manual_seed(0)
        delta = 0.05 * torch.randn(args.batch, length, generator=g, device=args.device)
        mask = torch.ones_like(delta)
        fns = {
            "future_kl (scan)": lambda: future_kl(delta, mask, args.decay_rate),
            "chunked matmul": lambda: future_kl_chunked_matmul(delta, mask, args.decay_rate),
            "torch.cumsum": lambda: torch.cumsum(delta, dim=-1),
        }
        err = (fns["future_kl (scan)"]() - fns["chunked matmul"]()).abs().max().item()
        times = {name: time_fn(fn, repeats=1 if "matmul" in name else 10) for name, fn in fns.items()}
        peaks = {name: peak_bytes(fn) for name, fn in fns.items()}
        for name in fns:
            print(
                f"{length:>6} {name:<16} {times[name] * 1e3:8.2f} ms {mib(peaks[name])}"
                f" {times['chunked matmul'] / times[name]:9.1f}x {times[name] / times['torch.cumsum']:9.2f}x"
            )
        scan = "future_kl (scan)"
        print(
            f"{length:>6} summary: scan is {times['chunked matmul'] / times[scan]:.0f}x faster than the chunked matmul,"
            f" {times[scan] / times['torch.cumsum']:.2f}x torch.cumsum; peak memory {peaks[scan] / (args.batch * length * 4):.1f}"
            f" x B*L*4 bytes; max |scan - matmul| = {err:.2e}"
        )
    if args.cp > 1:
        bench_context_parallel(args)


if __name__ == "__main__":
    main()
