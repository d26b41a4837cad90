"""Future-KL: O(L) chunked scan vs the O(L^2) chunked matmul of the reference FIPO code.

Prints, for B=64 and L in {4096, 20480}: time and peak memory of megatron_fipo's future_kl, of the
reference formulation (a [chunk, L] decay matrix per 128-token chunk, as in the official
compute_policy_loss_future_kl), and of torch.cumsum over the same tensor (the floor for any scan).
"""

from __future__ import annotations

import argparse

import torch
from benchlib import mib, peak_bytes, time_fn

from megatron_fipo.algo import future_kl


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 20480])
    parser.add_argument("--decay-rate", type=float, default=32.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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


if __name__ == "__main__":
    main()
