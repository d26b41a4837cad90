"""Reward scoring: a pool of worker processes (reward.num_workers) against the serial path, on the
same 1,000 samples as tests/unit/test_reward_pool.py (pathological answers among them).

Prints, measured in this run: total time serial and pooled and their ratio, each sample's hold in a
worker (from its start there to its result: bounded by timeout + grace) and its wait in the queue, and
the parent's cost per token of decoding in the parent vs shipping ids to workers that decode.

    .venv/bin/python tools/bench_reward_pool.py [--workers 2] [--timeout 2.0] [--samples 1000]
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the workload the test uses

from helpers.reward_workload import workload, workload_tokenizer  # noqa: E402

from megatron_fipo.config import RewardConfig  # noqa: E402
from megatron_fipo.data.problems import Problem  # noqa: E402
from megatron_fipo.reward.math_reward import warm_up  # noqa: E402
from megatron_fipo.reward.scoring import Scorer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--samples", type=int, default=1000)
    args = ap.parse_args()
    tok = workload_tokenizer()
    work = [(tok.encode(r), Problem((), t)) for r, t in workload(args.samples)]
    print(f"{len(work)} samples, reward.timeout_seconds={args.timeout}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")

    warm_up()  # as each pool worker is before its first sample
    serial = Scorer(RewardConfig(timeout_seconds=args.timeout), tok, 1 << 20)
    t0 = time.monotonic()
    want, want_s = [], []
    for ids, p in work:
        t = time.monotonic()
        want.append(serial.reward(tok.decode(ids), p))
        want_s.append(time.monotonic() - t)
    serial_s = time.monotonic() - t0

    pooled = Scorer(RewardConfig(timeout_seconds=args.timeout, num_workers=args.workers), tok, 1 << 20)
    pooled.pool.submit(*work[0]).result()  # started and warm, as in a run's second step
    t0 = time.monotonic()
    futures = [pooled.pool.submit(ids, p) for ids, p in work]
    submit_s = time.monotonic() - t0
    done_at = {}
    for i, f in enumerate(futures):
        f.add_done_callback(lambda _f, i=i: done_at.__setitem__(i, time.monotonic()))
    got = [f.result() for f in futures]
    pool_s = time.monotonic() - t0
    replaced = pooled.pool.replaced
    pooled.close()

    same = sum((g.result.score, g.result.status) == (w.score, w.status) for g, w in zip(got, want))
    held = sorted(g.held_s for g in got)
    queued = sorted(g.queued_s for g in got)
    statuses = {s: sum(w.status == s for w in want) for s in sorted({w.status for w in want})}
    print(f"statuses (serial): {statuses}")
    print(f"serial {serial_s:.2f} s; pool of {args.workers} {pool_s:.2f} s (submitting all: {submit_s * 1e3:.1f} ms); "
          f"pool/serial time ratio {pool_s / serial_s:.3f}")
    print(f"scores equal to serial: {same}/{len(work)}; workers replaced: {replaced}")
    print(f"hold in a worker (started to result): max {held[-1]:.3f} s = timeout + {held[-1] - args.timeout:.3f} s, "
          f"p50 {held[len(held) // 2] * 1e3:.1f} ms; queue wait (all 1000 submitted at once): max {queued[-1]:.2f} s")
    slowest = max(range(len(work)), key=lambda i: want_s[i])
    print(f"serial: slowest sample {want_s[slowest]:.3f} s ({want[slowest].status}); "
          f"pool, submit to result of that sample: {done_at[slowest] - t0:.3f} s")

    # Where to decode: the parent's cost per token of each choice, on long responses.
    long = [tok.encode(r) * 40 for r, _ in workload(200)]
    tokens = sum(map(len, long))

    def per_token(fn) -> float:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best / tokens * 1e9

    decode = per_token(lambda: [pickle.dumps(tok.decode(ids)) for ids in long])
    ids = per_token(lambda: [pickle.dumps(ids) for ids in long])
    print(f"parent per token: decode + send text {decode:.1f} ns, send ids {ids:.1f} ns: "
          f"decoding in the parent costs it {decode / ids:.1f}x (sentencepiece)")


if __name__ == "__main__":
    main()
