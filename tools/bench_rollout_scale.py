"""Rollout at 32-engine scale: the streaming design against the batch design, same workload (issue 13).

32 SGLang-protocol endpoints in this process: SGLang doubles with the timing model of
megatron_fipo/testing_sglang_timing.py (a test double at the process boundary: 32 real servers
cannot start here; tools/bench_sglang_double_fit.py compares the model with one real CPU server).
All figures this prints are SIMULATED: wall seconds of the doubles, scaled by --time-scale.

Workload: the 32B recipe's dynamic sampling scaled down. Each step wants --keep prompt groups with
differing rewards, from at most --max-batches x --batch prompts drawn, n samples each; response lengths
are the doubles' seeded lognormal, capped at --cap (the 20k cap scaled); a prompt's group is
informative (rewards differ) with probability --informative, a seeded draw per prompt. Step s draws
prompts from offset s x max-batches x batch in the same sequence for both designs.

- batch design: the SGLangEngine.generate of commit 5505b05 (before issue 13), reproduced here
  because the engine it lives in is being replaced: the prompts' n copies in requests of
  sequences_per_request=32, ceil(max_concurrency 256 / 32) = 8 worker threads, each request to the
  server with the fewest sequences in flight (ties to the lowest index); a generation batch of
  --batch prompts at a time until --keep informative groups are kept or --max-batches batches ran.
- streaming design: SGLangEngine.stream (rollout/sglang_stream.py): groups placed while a server has
  room, scored as they land; once --keep informative groups are kept the rest is cancelled
  (/abort_request to every server at once, in the background: partial rollouts off, the paper's
  recipe, so the cancel waits neither for the aborts nor for the aborted requests' answers: in a run
  they end during the trainer's phase, so the bench lets them end between two steps and prints how
  long the aborts took). rollout.sglang defaults: no client cap
  (max_concurrency 0), each server held to the slots it reports.

Metrics: engine busy fraction while work remains (time with a sequence running, over engines x the
rollout's wall time), makespan / longest sequence of each generation batch (the stream: of each
step), rollout seconds per step and the ratio old/new, tokens generated per kept token, aborted
sequences; for the stream, where a step's wall time goes: the engine's setup at the start of the
stream (servers checked and put in the generation phase), the draw from the first dispatch to the
last kept group, the cancel, and the busy fraction from the first dispatch on (without the setup).

The client (HTTP, JSON, threads) runs in wall time while the doubles run in simulated time x
--time-scale: at the default 0.1 every client second weighs 10 simulated seconds, so the stream's
figures are pessimistic; --time-scale 1 weighs them as a real run would (10x longer).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from megatron_fipo.config import RolloutConfig, SGLangConfig
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.rollout.base import SamplingParams
from megatron_fipo.rollout.sglang_engine import SGLangEngine
from megatron_fipo.rollout.sglang_http import SGLangHTTP
from megatron_fipo.testing_sglang import SGLangDouble
from megatron_fipo.testing_sglang_timing import DecodeTiming

BASELINE_SEQUENCES_PER_REQUEST = 32  # SGLangConfig defaults at 5505b05
BASELINE_MAX_CONCURRENCY = 256


@dataclass
class Workload:
    keep: int
    batch: int
    max_batches: int
    n: int
    informative: float
    seed: int

    def prompt(self, index: int) -> list[int]:
        return [1 + index % 997, 1 + index // 997, 3, 5, 7, 11, 13, 17]

    def is_informative(self, index: int) -> bool:
        """The bench's reward: a seeded draw per prompt decides whether its group's rewards differ."""
        return random.Random(f"reward:{self.seed}:{index}").random() < self.informative

    def draw(self, step: int) -> range:
        start = step * self.max_batches * self.batch
        return range(start, start + self.max_batches * self.batch)


@dataclass
class Phase:
    """Counters of the doubles over one generation batch (batch design) or one step (stream)."""
    wall_s: float = 0.0
    busy_s: float = 0.0
    tokens: int = 0
    aborted: int = 0
    longest_s: float = 0.0


class Fleet:
    """The 32 doubles and a way to read what they did between two marks."""

    def __init__(self, count: int, timing: DecodeTiming):
        self.doubles = [SGLangDouble(vocab_size=1000, timing=timing) for _ in range(count)]

    @property
    def urls(self) -> list[str]:
        return [d.url for d in self.doubles]

    def mark(self) -> tuple[float, list[dict], list[int]]:
        return time.monotonic(), [d.decoder.stats() for d in self.doubles], [len(d.decoder.decode_times)
                                                                            for d in self.doubles]

    def since(self, mark) -> Phase:
        start, before, ends = mark
        wall = time.monotonic() - start
        after = [d.decoder.stats() for d in self.doubles]
        longest = max((t for d, e in zip(self.doubles, ends) for t in d.decoder.decode_times[e:]), default=0.0)
        return Phase(wall, sum(a["busy_s"] - b["busy_s"] for a, b in zip(after, before)),
                     sum(a["tokens"] - b["tokens"] for a, b in zip(after, before)),
                     sum(a["aborted"] - b["aborted"] for a, b in zip(after, before)), longest)

    def close(self) -> None:
        for d in self.doubles:
            d.close()


@dataclass
class StepResult:
    wall_s: float
    kept_tokens: int
    phases: list[Phase] = field(default_factory=list)
    drawn: int = 0
    cancel_s: float = 0.0  # stream: from the last kept group until cancel() returned
    setup_s: float = 0.0  # stream: engine.stream() (servers checked, generation phase) before the first dispatch
    stream: object = None  # stream: its abort_s (the cancel's aborts, sent in the background) once done
    retried: int = 0  # stream: requests sent again after a server failed them (a dead server, or a refused connection)


def batch_generate(https: list[SGLangHTTP], prompts: list[list[int]], n: int, params: dict) -> list[list[int]]:
    """SGLangEngine.generate at 5505b05 (its routing, without retries): response lengths per prompt."""
    flat = [p for p in prompts for _ in range(n)]
    per = BASELINE_SEQUENCES_PER_REQUEST
    chunks = [flat[i : i + per] for i in range(0, len(flat), per)]
    in_flight = [0] * len(https)
    lock = threading.Lock()

    def one(chunk: list[list[int]]) -> list[int]:
        with lock:
            index = min(range(len(https)), key=in_flight.__getitem__)
            in_flight[index] += len(chunk)
        try:
            out = https[index].post("/generate", {"input_ids": chunk, "sampling_params": params, "return_logprob": True})
        finally:
            with lock:
                in_flight[index] -= len(chunk)
        return [len(o["output_ids"]) for o in out]

    workers = max(1, min(len(chunks), math.ceil(BASELINE_MAX_CONCURRENCY / per)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        lengths = [x for chunk in pool.map(one, chunks) for x in chunk]
    return [lengths[i * n : (i + 1) * n] for i in range(len(prompts))]


def batch_step(fleet: Fleet, work: Workload, step: int, params: dict) -> StepResult:
    https = [SGLangHTTP(url) for url in fleet.urls]
    drawn = list(work.draw(step))
    result = StepResult(0.0, 0)
    kept = 0
    start = time.monotonic()
    for b in range(work.max_batches):
        indices = drawn[b * work.batch : (b + 1) * work.batch]
        mark = fleet.mark()
        lengths = batch_generate(https, [work.prompt(i) for i in indices], work.n, params)
        result.phases.append(fleet.since(mark))
        result.drawn += len(indices)
        for index, group in zip(indices, lengths):
            if kept < work.keep and work.is_informative(index):
                kept += 1
                result.kept_tokens += sum(group)
        if kept >= work.keep:
            break
    result.wall_s = time.monotonic() - start
    return result


def stream_step(engine, fleet: Fleet, work: Workload, step: int, sampling: SamplingParams) -> StepResult:
    from megatron_fipo.rollout.base import GroupRequest

    result = StepResult(0.0, 0)

    def requests():
        for index in work.draw(step):
            result.drawn += 1
            yield GroupRequest(index, work.prompt(index), work.n)

    kept = 0
    mark = fleet.mark()
    stream = engine.stream(requests(), sampling, seed=step)
    result.setup_s = time.monotonic() - mark[0]
    for group in stream:
        if work.is_informative(group.key):
            kept += 1
            result.kept_tokens += sum(len(s.response_ids) for s in group.samples)
        if kept >= work.keep:
            cut = time.monotonic()
            stream.cancel(keep_partial=False)
            result.cancel_s = time.monotonic() - cut
            result.stream = stream
            break
    result.retried = stream.stats.retried_requests
    phase = fleet.since(mark)
    # In a run the trainer's phase lies between two rollouts and the cancel's aborts end during it: wait
    # for them and for the aborted requests' answers. The tokens the aborted sequences made until
    # their abort arrived count in this step's tokens generated, and they in its aborted sequences.
    engine.quiet.wait()
    tail = fleet.since(mark)
    phase.tokens, phase.aborted = tail.tokens, tail.aborted
    result.phases.append(phase)
    result.wall_s = phase.wall_s
    return result


def report(name: str, steps: list[StepResult], engines: int) -> float:
    phases = [p for s in steps for p in s.phases]
    busy = sum(p.busy_s for p in phases) / sum(engines * p.wall_s for p in phases)
    spans = [p.wall_s / p.longest_s for p in phases if p.longest_s]
    generated, kept = sum(p.tokens for p in phases), sum(s.kept_tokens for s in steps)
    per_step = statistics.mean(s.wall_s for s in steps)
    print(f"{name}: rollout {per_step:7.2f} s/step (steps: {', '.join(f'{s.wall_s:.2f}' for s in steps)}), "
          f"{len(phases)} generation batches, prompts drawn {sum(s.drawn for s in steps)}")
    print(f"  engines busy while work remains: {100 * busy:5.1f}%   (goal >= 90%)")
    print(f"  makespan / longest sequence per batch: {', '.join(f'{x:.2f}' for x in spans)}   (goal <= 1.3)")
    print(f"  tokens generated per kept token: {generated / kept:.2f} ({generated} / {kept}); "
          f"aborted sequences: {sum(p.aborted for p in phases)}")
    if any(s.cancel_s for s in steps):
        print(f"  requests sent again (a server failed them): {', '.join(str(s.retried) for s in steps)}")
        print(f"  of each step: setup {', '.join(f'{s.setup_s:.2f}' for s in steps)} s, cancel "
              f"{', '.join(f'{s.cancel_s:.3f}' for s in steps)} s; then in the background, until every server "
              f"took the abort: {', '.join(f'{s.stream.abort_s:.2f}' for s in steps if s.stream)} s (between "
              "steps: the trainer's phase in a run)")
        busy_draw = [p.busy_s / (engines * (p.wall_s - s.setup_s)) for s in steps for p in s.phases]
        spans_draw = [(p.wall_s - s.setup_s) / p.longest_s for s in steps for p in s.phases if p.longest_s]
        print(f"  from the first dispatch on: engines busy {', '.join(f'{100 * b:.1f}%' for b in busy_draw)}, "
              f"makespan / longest sequence {', '.join(f'{x:.2f}' for x in spans_draw)}")
    return per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=int, default=32)
    parser.add_argument("--slots", type=int, default=64, help="max_running_requests per engine")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--keep", type=int, default=64, help="informative groups per step (prompts_per_step)")
    parser.add_argument("--batch", type=int, default=256, help="prompts per generation batch")
    parser.add_argument("--max-batches", type=int, default=4)
    parser.add_argument("--informative", type=float, default=0.5, help="fraction of groups whose rewards differ")
    parser.add_argument("--cap", type=int, default=1024, help="max_new_tokens (the recipe's 20480, scaled)")
    parser.add_argument("--median", type=float, default=0.15, help="median response length / cap")
    parser.add_argument("--sigma", type=float, default=0.9, help="log-sd of the response length")
    parser.add_argument("--step-ms", type=float, default=25.0, help="a of t_step = a + b x running (ms)")
    parser.add_argument("--step-ms-per-seq", type=float, default=0.1, help="b of t_step = a + b x running (ms)")
    parser.add_argument("--time-scale", type=float, default=0.1, help="wall seconds per simulated second")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["batch", "stream"], help="run one design only")
    args = parser.parse_args()
    timing = DecodeTiming(max_running_requests=args.slots, step_s=args.step_ms / 1000,
                          step_per_seq_s=args.step_ms_per_seq / 1000, time_scale=args.time_scale,
                          length_median=args.median * args.cap, length_sigma=args.sigma, seed=args.seed)
    work = Workload(args.keep, args.batch, args.max_batches, args.n, args.informative, args.seed)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.cap)
    params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": args.cap, "stop_token_ids": [],
              "skip_special_tokens": False}
    print(f"SIMULATED: {args.engines} SGLang doubles x {args.slots} slots, t_step = {args.step_ms} ms + "
          f"{args.step_ms_per_seq} ms x running, time scale {args.time_scale}; n={args.n}, keep {args.keep} groups "
          f"of <= {args.max_batches} x {args.batch} drawn, {100 * args.informative:.0f}% informative, lengths "
          f"lognormal(median {args.median * args.cap:.0f}, sigma {args.sigma}) capped at {args.cap}. Seconds below "
          f"are wall seconds of the doubles; x 1/time-scale for simulated seconds.")
    results = {}
    fleet = Fleet(args.engines, timing)
    try:
        if args.only in (None, "batch"):
            results["batch"] = report("batch design (5505b05 generate)",
                                      [batch_step(fleet, work, s, params) for s in range(args.steps)], args.engines)
        if args.only in (None, "stream"):
            if not hasattr(SGLangEngine, "stream"):
                print("streaming design: HOOK - SGLangEngine.stream is not in this checkout yet")
            else:
                with tempfile.TemporaryDirectory() as run_dir:
                    cfg = RolloutConfig(engine="sglang", placement="disaggregated", sglang=SGLangConfig(
                        urls=fleet.urls, release_memory=False, startup_timeout_s=60))
                    engine = SGLangEngine(cfg, ModelArch.from_hf_config("examples/tiny_qwen2/config.json"), run_dir)
                    steps = [stream_step(engine, fleet, work, s, sampling) for s in range(args.steps)]
                    results["stream"] = report("streaming design (SGLangEngine.stream)", steps, args.engines)
    finally:
        fleet.close()
    if len(results) == 2:
        print(f"rollout time per step, batch / streaming = {results['batch'] / results['stream']:.2f}x  (goal >= 2)")


if __name__ == "__main__":
    main()
