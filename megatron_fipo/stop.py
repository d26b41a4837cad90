"""Stopping a run on SIGTERM (preemption, the time limit) or SIGINT (Ctrl-C), at the same point on every rank.

A signal only sets a flag. The ranks read it together at the loop's safe points (between steps,
between generation batches of the rollout, between PPO mini-batches) through one small all-reduce
on a gloo group: CPU tensors, so it needs nothing from the GPUs while SGLang holds them, and it never
rides on the communicator training uses. Whichever ranks the signal reached, all of them see the
stop at the same point, so no rank writes a checkpoint while another starts the next phase.
"""

from __future__ import annotations

import signal
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    def __init__(self) -> None:
        self.received = 0  # the signal number this rank got, 0 for none
        self.agreed = 0  # the signal every rank agreed to stop on (the largest number any rank got), 0 for none
        # Called from the handler, e.g. to abort in-flight generation; must only set flags.
        self.on_signal: Optional[Callable[[], None]] = None
        self._group = None

    def connect(self, timeout_minutes: int) -> None:
        """Make the agreement's gloo group (a collective: every rank, at the same point)."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Ranks wait here while rank 0 generates a whole batch: as long as any other collective.
            self._group = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))

    def install(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum
        if self.on_signal is not None:
            self.on_signal()

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """(stop, *flags): each true if it is true on any rank. A collective every rank calls."""
        values = torch.tensor([self.received, *flags], dtype=torch.int64)
        if self._group is not None:
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self._group)
        self.agreed = self.agreed or int(values[0])
        return (bool(self.agreed), *(bool(v) for v in values[1:].tolist()))

    @property
    def group(self):
        """The gloo group of every rank (None in one process); other CPU-side collectives reuse it."""
        return self._group

    @property
    def name(self) -> str:
        return signal.Signals(self.agreed).name if self.agreed else ""
