"""The results queue of Megatron's checkpoint writer, in a Manager process that survives preemption.

Megatron's writer reports through a multiprocessing Manager process it starts on the first save.
Slurm signals every process of a job step on preemption: the Manager died of that SIGTERM and the
trainer's own preemption checkpoint then failed (BrokenPipeError). Started here first, the Manager
ignores SIGTERM and instead dies with the trainer. Torch-free: the Manager process imports this module.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
from multiprocessing.managers import SyncManager

_PR_SET_PDEATHSIG = 1


def _outlive_sigterm_not_the_trainer() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform == "linux":  # SIGKILL when the trainer dies, so no orphan is left ignoring SIGTERM
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def start_writer_queue() -> None:
    """Install the queue before Megatron creates its own; later calls keep the first."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))  # the context Megatron uses
        manager.start(initializer=_outlive_sigterm_not_the_trainer)
        filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive
