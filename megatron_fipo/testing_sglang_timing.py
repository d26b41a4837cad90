"""The SGLang double's timing model: sequence slots, a decode step whose time grows with the running
sequences, a waiting queue, long-tailed response lengths and abort (megatron_fipo/testing_sglang.py).

A test double at the process boundary, for tests and benchmarks only: 32 real SGLang servers cannot
start on this machine, so tools/bench_rollout_scale.py runs 32 of these in one process. What it
imitates of SGLang 0.5.23's scheduler (measured on the real CPU server, docs/benchmarks.md):

- ``max_running_requests`` sequences decode together; more wait in a first-come queue and join at a
  step boundary when a slot frees (schedule_policy fcfs).
- One decode step of the whole batch takes ``step_s + step_per_seq_s * running`` simulated seconds
  (fitted to the real server's step time against running sequences); prefill is not modelled
  (prompts are short against the responses). ``time_scale`` maps simulated to wall seconds.
- A sequence's response length is a lognormal draw (median ``length_median`` tokens, log-sd
  ``length_sigma``) seeded by the server's seed, the input ids and the sample's index among the
  identical inputs of its request, so runs are reproducible; it is capped at max_new_tokens
  (finish_reason length) and ``ignore_eos`` makes it max_new_tokens. A continued partial response
  is new input ids: its length is a fresh draw.
- An abort ends waiting and running sequences at once with the tokens made so far.

Cheap enough for 32 servers on 2 cores: no per-token work. Each server's scheduler thread sleeps
until its next sequence finishes (or a request arrives or an abort wakes it), then advances the
steps the wall clock allows in one go.
"""

from __future__ import annotations

import heapq
import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DecodeTiming:
    max_running_requests: int = 64  # sequence slots; /get_server_info reports them as SGLang does
    step_s: float = 0.025  # a in t_step = a + b * running (simulated seconds)
    step_per_seq_s: float = 0.0001  # b in t_step = a + b * running
    time_scale: float = 1.0  # wall seconds per simulated second; < 1 runs faster than the model
    length_median: float = 512.0  # median response length in tokens (lognormal)
    length_sigma: float = 0.8  # log-sd of the response length; larger = longer tail
    seed: int = 0  # response lengths are a function of seed, input ids and sample index

    def __post_init__(self) -> None:
        if self.max_running_requests < 1:
            raise ValueError(f"DecodeTiming.max_running_requests must be >= 1, got {self.max_running_requests}")
        if self.step_s <= 0 or self.step_per_seq_s < 0 or self.time_scale <= 0:
            raise ValueError("DecodeTiming: step_s and time_scale must be > 0 and step_per_seq_s >= 0, got "
                             f"{self.step_s}, {self.time_scale}, {self.step_per_seq_s}")

    def step_time(self, running: int) -> float:
        """Simulated seconds of one decode step with ``running`` sequences."""
        return self.step_s + self.step_per_seq_s * running

    def length(self, input_ids: list[int], index: int, max_new_tokens: int, ignore_eos: bool) -> int:
        if ignore_eos:
            return max_new_tokens
        draw = random.Random(f"{self.seed}:{index}:{input_ids}").lognormvariate(math.log(self.length_median),
                                                                                  self.length_sigma)
        return max(1, min(max_new_tokens, round(draw)))


@dataclass(eq=False)
class Sequence:
    """One sequence of a request: ``length`` tokens to make; ``made`` when it ended."""
    rid: str
    input_ids: list[int]
    index: int  # among the identical inputs of its request
    length: int
    start: int = -1  # the scheduler's step at admission; -1 while waiting
    made: int | None = None
    aborted: bool = False
    decode_s: float = 0.0  # wall seconds from admission to end
    started_wall: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


class DecodeScheduler:
    """One server's continuous batching in simulated time kept in step with the wall clock."""

    def __init__(self, timing: DecodeTiming, name: str):
        self.timing = timing
        self.cond = threading.Condition()
        self.waiting: deque[Sequence] = deque()
        self.running: list[tuple[int, int, Sequence]] = []  # heap of (end step, tie, sequence)
        self.step = 0
        self.last = time.monotonic()  # wall time of the last step boundary
        self.closed = False
        # Counters for benchmarks; read with stats().
        self.busy_s = 0.0  # wall seconds with at least one sequence running
        self.decode_s = 0.0  # simulated seconds of the decode steps run
        self.tokens = 0  # tokens made, aborted sequences' included
        self.aborted = 0  # sequences ended by an abort
        self.finished = 0  # sequences that ran to their length
        self.decode_times: list[float] = []  # wall seconds from admission to end of each that ran to its length
        self.busy_since: float | None = None
        self._tie = 0
        threading.Thread(target=self._run, name=f"sglang-double-decode-{name}", daemon=True).start()

    def submit(self, seqs: list[Sequence]) -> None:
        with self.cond:
            self.waiting.extend(seqs)
            self.cond.notify_all()

    def abort(self, match=lambda seq: True) -> None:
        """End the sequences ``match`` picks, waiting or running, with the tokens made so far."""
        with self.cond:
            self._advance(time.monotonic())
            now = time.monotonic()
            for seq in [s for s in self.waiting if match(s)]:
                self.waiting.remove(seq)
                self._end(seq, 0, now, aborted=True)
            keep = []
            for item in self.running:
                if match(item[2]):
                    self._end(item[2], self.step - item[2].start, now, aborted=True)
                else:
                    keep.append(item)
            heapq.heapify(keep)
            self.running = keep
            self._busy_edge(now)
            self.cond.notify_all()

    def abort_rid(self, rid: str) -> None:
        """tokenizer_manager.py:2246: a rid no live request has is dropped; scheduler.py:5689 then
        aborts every request whose id starts with it."""
        with self.cond:
            live = any(s.rid == rid for s in self.waiting) or any(item[2].rid == rid for item in self.running)
        if live:
            self.abort(lambda seq: seq.rid.startswith(rid))

    def close(self) -> None:
        self.abort()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def stats(self) -> dict:
        with self.cond:
            self._advance(time.monotonic())  # the steps run since the last event
            busy = self.busy_s + (time.monotonic() - self.busy_since if self.busy_since is not None else 0.0)
            return {"busy_s": busy, "tokens": self.tokens + sum(self.step - s.start for _, _, s in self.running),
                    "aborted": self.aborted, "finished": self.finished, "running": len(self.running),
                    "steps": self.step, "decode_s": self.decode_s,
                    "waiting": len(self.waiting)}

    # ---- the scheduler thread ----------------------------------------------------------------
    def _run(self) -> None:
        with self.cond:
            while not self.closed:
                self._advance(time.monotonic())
                if not self.running:
                    self.cond.wait()
                    continue
                dt = self.timing.step_time(len(self.running)) * self.timing.time_scale
                to_next_end = self.running[0][0] - self.step
                self.cond.wait(timeout=max(0.0, self.last + to_next_end * dt - time.monotonic()))

    def _advance(self, now: float) -> None:
        """Run the whole decode steps that fit between the last step boundary and ``now``; waiting
        sequences join at the boundary where a slot freed."""
        if not self.running:
            self.last = now  # idle time is no decode time: a fresh batch starts now
        while True:
            self._admit()
            if not self.running:
                return
            dt = self.timing.step_time(len(self.running)) * self.timing.time_scale
            steps = min(self.running[0][0] - self.step, int((now - self.last) / dt))
            if steps <= 0:
                return
            self.step += steps
            self.last += steps * dt
            self.decode_s += steps * self.timing.step_time(len(self.running))
            while self.running and self.running[0][0] <= self.step:
                _, _, seq = heapq.heappop(self.running)
                self._end(seq, seq.length, self.last, aborted=False)
            self._busy_edge(self.last)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.timing.max_running_requests:
            seq = self.waiting.popleft()
            seq.start, seq.started_wall = self.step, self.last
            self._tie += 1
            heapq.heappush(self.running, (self.step + seq.length, self._tie, seq))
        self._busy_edge(self.last)

    def _end(self, seq: Sequence, made: int, now: float, aborted: bool) -> None:
        seq.made, seq.aborted = made, aborted
        seq.decode_s = now - seq.started_wall if seq.start >= 0 else 0.0
        self.tokens += made
        if aborted:
            self.aborted += 1
        else:
            self.finished += 1
            self.decode_times.append(seq.decode_s)
        seq.done.set()

    def _busy_edge(self, now: float) -> None:
        if self.running and self.busy_since is None:
            self.busy_since = now
        elif not self.running and self.busy_since is not None:
            self.busy_s += now - self.busy_since
            self.busy_since = None
