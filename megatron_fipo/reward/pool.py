"""Score responses in worker processes, each sample under a deadline that holds in the workers.

Why processes: math-verify's limit is SIGALRM, which works only in a main thread, and sympy holds
the GIL; each worker's main thread has both to itself. Its own SIGALRM limit ends almost every slow
check (status ``timeout``, as the serial path gives it). A worker that still has not answered
``reward.timeout_seconds + GRACE_S`` after it took a sample (a C call that never returns to Python,
a custom reward stuck) is killed and replaced, and the sample scores as a timeout: no sample holds a
worker, or its group, longer than that.

Workers decode the token ids themselves: shipping the ids costs the parent (whose GIL the streaming
rollout shares) ~12x less than decoding there and shipping the text (tools/bench_reward_pool.py
measures both). Workers come from a forkserver (never fork: the trainer has threads and accelerator
state) that preloads this module, so a replacement is a fork with sympy already imported. As with
any spawn or forkserver child (Megatron's checkpoint writer already needs it), each worker imports
the main module: a script that starts a pool keeps its work under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import pickle
import signal
import socket
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Optional

from megatron_fipo.config import RewardConfig
from megatron_fipo.config_base import ConfigError
from megatron_fipo.data.problems import Problem
from megatron_fipo.reward.math_reward import RewardResult, warm_up
from megatron_fipo.reward.outcome import outcome_reward

log = logging.getLogger(__name__)

# Past its own SIGALRM limit, how long a worker may take to answer before it is killed: the decode,
# the answer's extraction and the reply fit in it many times over.
GRACE_S = 0.5


@dataclass
class Scored:
    result: RewardResult
    queued_s: float  # from submit until a worker started it
    held_s: float  # from a worker starting it to its result: at most timeout_seconds + GRACE_S (+ scheduling)


@dataclass
class _Task:
    ids: list[int]
    problem: Problem
    future: Future
    submitted: float  # time.monotonic()
    started: float = 0.0  # when a worker took it


def _picklable(err: BaseException) -> BaseException:
    try:
        pickle.dumps(err)
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


def _worker_main(conn, sys_path: list[str], cfg: RewardConfig, tokenizer_bytes: bytes) -> None:
    """A worker: 'ready' once it can score, then (ids, problem) in, ('ok', result) or ('error', exc) out."""
    # Ctrl-C and SIGTERM are the trainer's to handle (stop.py); the parent ends its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.path[:] = sys_path  # the parent's: its reward.custom_reward module and tokenizer classes import here too
    try:
        tokenizer = pickle.loads(tokenizer_bytes)
        reward = outcome_reward(cfg)
        if not cfg.custom_reward:
            warm_up()
    except BaseException as err:
        conn.send(("failed", _picklable(err)))
        return
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        ids, problem = task
        try:
            reply = ("ok", reward(tokenizer.decode(ids), problem))
        except Exception as err:  # a custom reward's error reaches the caller, as on the serial path
            reply = ("error", _picklable(err))
        conn.send(reply)


class _Worker:
    def __init__(self, ctx, args: tuple):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, *args), daemon=True, name="reward-worker")
        self.process.start()
        child.close()
        self.ready = False
        # One sample at a time: a send to a busy worker could block the dispatcher (a long response
        # fills the pipe) until that worker is done, deadlines and all.
        self.task: Optional[_Task] = None

    def stop(self, kill: bool) -> None:
        if kill:
            self.process.kill()
        elif self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.process.join(timeout=None if kill else 2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def tokenizer_blob(tokenizer) -> bytes:
    """The tokenizer as the workers receive it; a ConfigError naming reward.num_workers when it cannot travel."""
    try:
        return pickle.dumps(tokenizer)
    except Exception as err:
        raise ConfigError(f"reward.num_workers: the tokenizer ({type(tokenizer).__name__}) cannot be sent to the "
                          f"reward workers ({err}); set reward.num_workers=0 to score in this process") from None


class RewardPool:
    """``num_workers`` processes scoring (token ids, problem) as ``cfg`` says; ``submit`` returns a Future[Scored]."""

    def __init__(self, cfg: RewardConfig, tokenizer: bytes, num_workers: int):
        """``tokenizer``: from tokenizer_blob."""
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])  # no effect once this process's forkserver runs: workers then import it
        self._args = (list(sys.path), cfg, tokenizer)
        self._ctx, self._num_workers = ctx, num_workers
        self._limit = cfg.timeout_seconds + GRACE_S if cfg.timeout_seconds > 0 else None
        self._timeout = RewardResult(cfg.wrong_score, "timeout", None)
        self._lock = threading.Lock()
        self._pending: deque[_Task] = deque()
        self._closed = False
        self._failure: Optional[BaseException] = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self.replaced = 0  # workers killed past their deadline or dead, and replaced
        # Workers start in the pool's thread: the first start launches the forkserver (seconds), off the caller's path.
        self._thread = threading.Thread(target=self._run, daemon=True, name="reward-pool")
        self._thread.start()
        atexit.register(self.close)

    def submit(self, ids: list[int], problem: Problem) -> "Future[Scored]":
        future: Future = Future()
        with self._lock:
            if self._failure is not None:
                raise self._failure
            if self._closed:
                raise RuntimeError("the reward pool is closed")
            self._pending.append(_Task(list(ids), problem, future, time.monotonic()))
        self._wake()
        return future

    def close(self) -> None:
        """Stop the workers; samples not scored yet get a RuntimeError. Idempotent; also run at exit."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        self._wake()
        self._thread.join()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:  # wake-ups already queued: the thread will look
            pass

    def _run(self) -> None:
        workers: list[_Worker] = []
        try:
            workers = [_Worker(self._ctx, self._args) for _ in range(self._num_workers)]
            while True:
                with self._lock:
                    if self._closed:
                        break
                self._dispatch(workers)
                busy = [w.task.started + self._limit for w in workers if w.task is not None and self._limit]
                timeout = max(min(busy) - time.monotonic(), 0.0) if busy else None
                ready = wait([self._wake_r, *(w.conn for w in workers), *(w.process.sentinel for w in workers)], timeout)
                if self._wake_r in ready:
                    self._wake_r.recv(4096)
                for i, w in enumerate(workers):
                    if w.conn in ready or w.conn.poll():
                        try:
                            self._receive(w, w.conn.recv())
                            continue
                        except EOFError:
                            pass
                    if w.process.sentinel in ready or not w.process.is_alive():
                        workers[i] = self._replace(w, why=f"exited with code {w.process.exitcode}")
                    elif w.task is not None and self._limit and time.monotonic() >= w.task.started + self._limit:
                        workers[i] = self._replace(w, why=f"took over {self._limit:.1f} s")
        except BaseException as err:  # a worker that cannot start, or a bug: no caller may wait forever
            log.exception("reward pool: stopped")
            with self._lock:
                self._failure = err
        finally:
            self._shutdown(workers)

    def _dispatch(self, workers: list[_Worker]) -> None:
        for w in workers:
            if not w.ready or w.task is not None:
                continue
            task = self._next_task()
            if task is None:
                return
            task.started = time.monotonic()
            w.task = task
            try:
                w.conn.send((task.ids, task.problem))
            except OSError:  # the worker just died: the loop replaces it and scores the task as a timeout
                pass

    def _next_task(self) -> Optional[_Task]:
        with self._lock:
            while self._pending:
                task = self._pending.popleft()
                if task.future.set_running_or_notify_cancel():  # else cancelled while queued
                    return task
        return None

    def _receive(self, w: _Worker, message: tuple) -> None:
        kind, value = message
        if kind == "ready":
            w.ready = True
        elif kind == "failed":
            raise ConfigError(f"reward.num_workers: a reward worker could not start: {value!r}") from value
        else:
            task, w.task = w.task, None
            if kind == "ok":
                self._resolve(task, value)
            else:
                task.future.set_exception(value)

    def _resolve(self, task: _Task, result: RewardResult) -> None:
        now = time.monotonic()
        task.future.set_result(Scored(result, task.started - task.submitted, now - task.started))

    def _replace(self, w: _Worker, why: str) -> _Worker:
        """A new worker for one killed past its deadline or dead; its sample scores as a timeout."""
        if not w.ready:
            raise RuntimeError(f"reward pool: a worker {why} before it was ready (its error is printed above)")
        w.process.kill()
        if w.task is not None:  # answered before the join: that waits on the forkserver, which a busy host may not run for a while
            log.warning("reward pool: a worker %s on a sample; scored as a timeout, worker replaced", why)
            self._resolve(w.task, self._timeout)
        w.stop(kill=True)
        self.replaced += 1
        return _Worker(self._ctx, self._args)

    def _shutdown(self, workers: list[_Worker]) -> None:
        with self._lock:
            self._closed = True
            failure = self._failure
            orphans = [w.task for w in workers if w.task is not None] + list(self._pending)
            self._pending.clear()
        for w in workers:
            w.stop(kill=w.task is not None)
        for task in orphans:
            if not task.future.done():
                task.future.set_exception(failure or RuntimeError("the reward pool closed before this sample was scored"))
        self._wake_r.close()
        self._wake_w.close()
