"""Asynchronous rollouts (``trainer.max_staleness`` = k > 0): rank 0's producer thread collects the
next steps' batches with the weights the engines hold while the trainer trains.

The schedule (docs/async-rollouts.md): the batch trained at RL step i may start only once the
engines hold weights version >= i - k, so no sample is more than k updates old when it is trained,
and at most k + 1 batches are ever buffered. Weight syncs, evals and checkpoints run with the
producer held between batches (``hold``): an update never lands inside a batch, every sample's
weight version is the one it was drawn with, and a checkpoint sees whole batches only. Samples
more than k versions old (a server recovered on an older snapshot, a partial rollout carried from
older weights) are dropped at ``take`` and counted.

The producer issues no collective: only the main thread talks to the other ranks (the stop
agreement and the hand-out over gloo), so a second thread never shares a process group with it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from megatron_fipo.rollout.base import GenerationAborted, Sample
from megatron_fipo.rollout.collect import StepBatch


@dataclass
class Buffered:
    """One step's batch, complete, waiting for the trainer."""

    step: int  # the RL step (0-based, = RunState.step when it is trained) it was collected for
    batch: Optional[StepBatch]  # None: no group kept (the trainer stops, as in the synchronous loop)
    seconds: float  # the producer's wall time collecting it


def stale_groups(batch: StepBatch, step: int, max_staleness: int) -> list[int]:
    """Indices of the groups with a sample drawn more than ``max_staleness`` versions before ``step``."""
    return [g for g, group in enumerate(batch.groups) if any(step - s.weight_version > max_staleness for s in group)]


def drop_groups(batch: StepBatch, drop: list[int]) -> Optional[StepBatch]:
    """The batch without the groups ``drop`` names (whole groups: advantages are per group); None if
    none is left. The rollout statistics stay those of the batch as collected."""
    if not drop:
        return batch
    keep = [g for g in range(len(batch.groups)) if g not in set(drop)]
    if not keep:
        return None
    return StepBatch([batch.groups[g] for g in keep], batch.rewards[keep], dict(batch.stats))


class AsyncRollout:
    """The producer thread and its bounded buffer of step batches (rank 0 only).

    ``collect(step)`` is the synchronous loop's own rollout for that step (``Collector.collect``):
    it draws from ``stream`` and raises GenerationAborted when ``abort`` cut it short, in which case
    the stream goes back to where the batch began, as the synchronous loop does.
    """

    def __init__(self, collect: Callable[[int], Optional[StepBatch]], stream, max_staleness: int,
                 abort: Optional[Callable[[], None]] = None, total_steps: Optional[int] = None):
        if max_staleness < 1:
            raise ValueError("AsyncRollout: max_staleness must be >= 1 (0 is the synchronous loop)")
        self._collect, self._stream, self.k, self._abort = collect, stream, max_staleness, abort
        self._total = total_steps  # no batch is collected for a step the run will not train
        self._cond = threading.Condition()
        self._buffer: dict[int, Buffered] = {}
        self._next = 0  # the next step to collect
        self._version: Optional[int] = None  # the engines' weights; None until the first allow
        self._held = True
        self._busy = False  # a batch is being collected
        self._aborted_step: Optional[int] = None  # the batch an abort cut short, until allowed again
        self._error: Optional[BaseException] = None
        self._closed = False
        self._thread: Optional[threading.Thread] = None

    # ---- main thread -----------------------------------------------------------------------
    def start(self, next_step: int, buffered: list[Buffered] = ()) -> None:
        """Start the producer (held): ``buffered`` batches restored from a checkpoint, then
        ``next_step`` onwards (the stream already stands where the last buffered batch ended)."""
        self._buffer = {b.step: b for b in buffered}
        self._next = max([next_step] + [b.step + 1 for b in buffered])
        self._thread = threading.Thread(target=self._run, name="async-rollout", daemon=True)
        self._thread.start()

    def allow(self, version: int) -> None:
        """The engines hold weights ``version``: batches up to step ``version + k`` may be collected."""
        with self._cond:
            self._version, self._held, self._aborted_step = version, False, None
            self._cond.notify_all()

    def hold(self, abort: bool = False) -> float:
        """Keep the producer between batches (for a weight sync, an eval, a checkpoint), once it has
        collected every batch the weights it holds allow: so batch i is always drawn with weights
        version max(0, i - k), whatever the timing. With ``abort`` the batch in flight is cut short
        instead (collected again later, from the same stream position). Returns the seconds waited."""
        started = time.monotonic()
        with self._cond:
            if abort:
                self._held = True
                if self._busy and self._abort is not None:
                    self._abort()
            while self._busy or (self._may_start() and not self._closed and self._error is None):
                self._cond.wait()
            self._held = True
            self._raise_error()
        return time.monotonic() - started

    def take(self, step: int) -> tuple[Optional[StepBatch], dict[str, float]]:
        """The batch for RL step ``step`` (waiting for it), less the groups more than k versions old,
        and the asynchronous mode's figures. It stays buffered (and in checkpoints) until ``done``:
        a stop agreed after the take leaves it to the resumed run. Raises GenerationAborted when an
        abort cut it short."""
        started = time.monotonic()
        with self._cond:
            while step not in self._buffer:
                self._raise_error()
                if self._aborted_step == step:
                    raise GenerationAborted(f"asynchronous rollout: step {step + 1}'s batch was aborted")
                if self._held and not self._busy and self._next <= step:
                    raise RuntimeError(f"asynchronous rollout: step {step + 1}'s batch is awaited while the "
                                       "producer is held (allow() first)")
                self._cond.wait()
            item = self._buffer[step]
        waited = time.monotonic() - started
        batch, dropped = item.batch, 0
        if batch is not None:
            stale = stale_groups(batch, step, self.k)
            dropped = sum(len(batch.groups[g]) for g in stale)
            batch = drop_groups(batch, stale)
        return batch, {"time/rollout_wait_s": waited, "time/rollout_collect_s": item.seconds,
                       "async/dropped_stale_samples": float(dropped)}

    def done(self, step: int) -> None:
        """Step ``step`` is trained: its batch leaves the buffer."""
        with self._cond:
            self._buffer.pop(step, None)

    def buffered(self) -> list[Buffered]:
        """The complete batches not yet taken (call it held: a checkpoint saves them)."""
        with self._cond:
            if self._busy:
                raise RuntimeError("asynchronous rollout: the buffer is read while a batch is being collected (hold() first)")
            return [self._buffer[s] for s in sorted(self._buffer)]

    def close(self) -> None:
        """Stop the producer: the batch in flight is aborted (or, without abort, finished) and dropped."""
        with self._cond:
            self._closed = True
            if self._busy and self._abort is not None:
                self._abort()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise RuntimeError("asynchronous rollout: the producer failed") from self._error

    # ---- producer thread ---------------------------------------------------------------------
    def _may_start(self) -> bool:
        return (not self._held and self._version is not None and self._next - self._version <= self.k
                and (self._total is None or self._next < self._total))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._may_start():
                    self._cond.wait()
                if self._closed:
                    return
                step, self._busy = self._next, True
                position = self._stream.position
            started = time.monotonic()
            try:
                batch = self._collect(step)
            except GenerationAborted:
                with self._cond:
                    self._stream.position = position  # redone from here when allowed again
                    self._held, self._busy, self._aborted_step = True, False, step
                    self._cond.notify_all()
                continue
            except BaseException as err:  # noqa: BLE001 - handed to the main thread, which raises it
                with self._cond:
                    self._error, self._busy = err, False
                    self._cond.notify_all()
                return
            with self._cond:
                self._buffer[step] = Buffered(step, batch, time.monotonic() - started)
                self._next, self._busy = step + 1, False
                self._cond.notify_all()


# ---- checkpoints: the buffer as plain values and tensors (torch.load(weights_only=True)) ----------

def _sample_state(s: Sample) -> dict[str, Any]:
    return {"prompt_ids": torch.tensor(s.prompt_ids, dtype=torch.int64),
            "response_ids": torch.tensor(s.response_ids, dtype=torch.int64),
            "logprobs": torch.tensor(s.logprobs, dtype=torch.float64),  # exact for any Python float
            "finish_reason": s.finish_reason, "weight_version": s.weight_version,
            "version_segments": [list(seg) for seg in s.version_segments], "extra": dict(s.extra)}


def _sample_from(d: dict[str, Any]) -> Sample:
    return Sample(d["prompt_ids"].tolist(), d["response_ids"].tolist(), d["logprobs"].tolist(), d["finish_reason"],
                  d["weight_version"], dict(d["extra"]), [tuple(seg) for seg in d["version_segments"]])


def buffer_state(items: list[Buffered]) -> list[dict[str, Any]]:
    """The buffered batches for a checkpoint's run state."""
    out = []
    for item in items:
        b = item.batch
        out.append({"step": item.step, "seconds": item.seconds,
                    "batch": None if b is None else {"groups": [[_sample_state(s) for s in g] for g in b.groups],
                                                     "rewards": b.rewards.clone(), "stats": dict(b.stats)}})
    return out


def buffer_from_state(state: list[dict[str, Any]]) -> list[Buffered]:
    out = []
    for item in state:
        b = item["batch"]
        batch = None if b is None else StepBatch([[_sample_from(s) for s in g] for g in b["groups"]], b["rewards"],
                                                 dict(b["stats"]))
        out.append(Buffered(item["step"], batch, item["seconds"]))
    return out
