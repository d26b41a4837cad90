"""Prompt groups in flight on SGLang servers: each server kept at its capacity, groups back as they complete.

A group's n samples go to one server in one request, a batch of n copies of the prompt (its prefix
cache serves the copies), so a group never waits on two servers. SGLang's ``n`` in the sampling
params does the same, slower: on the real CPU server (tiny Qwen2, 16 samples x 64 tokens, measured
twice in turn on a busy 2-core host) the batch took 26.9 s and 31.1 s, ``n=16`` 48.8 s and 52.7 s. The next request is drawn only when a server has room for a group; ties go in turn
(SGLangEngine._pick). A request that meets a dead server is sent again elsewhere; a cancel aborts
what is in flight (``/abort_request`` with ``abort_all`` to every server at once: a server runs only
this stream's requests during a rollout) and nothing aborted is retried. With partial rollouts the
cancel waits for the partial samples and hands them back. Without, it returns at once: a thread
sends the aborts and drops the answers as they come, and the engine's next phase (a stream, a weight
update, the trainer's memory release) waits until every aborted request has answered: an
``abort_all`` never reaches the next stream's requests, and a server is idle when its memory is
released (SGLang asserts it). A request still in transit when the abort came (it reached its server
after it) is aborted again by its own ids.

sglang-router is not used: it is not in .venv-sglang (nor a dependency of the trainer), and what it
adds over this client is cache-aware placement of requests that share a prefix, which one request
per group gives by construction; its own queueing would hide each server's free slots, which the
streaming abort and the per-engine metrics need, and an abort would have to reach every worker
behind it anyway.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional

from megatron_fipo.rollout.base import GenerationAborted, GroupRequest, GroupResult, Sample, SamplingParams, StreamStats
from megatron_fipo.rollout.sglang_http import SGLangError, ServerUnavailable

if TYPE_CHECKING:
    from megatron_fipo.rollout.sglang_engine import SGLangEngine

POLL_S = 0.05  # how often the stream looks at the stop flag while it waits for a group
REABORT_S = 0.5  # a request still in transit when the abort came: abort again after this


@dataclass
class _Flight:
    request: GroupRequest
    server: int
    size: int  # sequences sent
    sent: float  # time.monotonic()
    tries: int = 1
    todo: list[int] = field(default_factory=list)  # which samples of a partial group are continued
    rids: list[str] = field(default_factory=list)  # SGLang's request id of each sequence


class SGLangStream:
    blocking = False  # generation runs on the servers while the caller scores

    def __init__(self, engine: "SGLangEngine", requests: Iterator[GroupRequest], sampling: SamplingParams):
        self.engine, self.requests, self.sampling = engine, iter(requests), sampling
        self.params = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                       "max_new_tokens": sampling.max_new_tokens, "stop_token_ids": list(sampling.stop_token_ids),
                       "skip_special_tokens": False}
        count = len(engine.servers)
        self.stats = StreamStats(busy_s=[0.0] * count, slot_s=[0.0] * count)
        self.done: queue.Queue = queue.Queue()  # (ticket, outputs or exception, completion time)
        self.flights: dict[int, _Flight] = {}
        self.waiting: list[tuple[GroupRequest, int]] = []  # (request, tries so far): drawn, not placed yet
        self.tickets = 0
        self.exhausted = self.cancelled = self.closed = False  # closed: the stats are final
        self.started = self.mark = 0.0
        self.uid = uuid.uuid4().hex[:12]  # prefix of this stream's request ids
        self.cut: list[GroupResult] = []
        self.abort_s = 0.0  # a cancel without partials: from the cancel until every server took the abort

    # ---- the caller's side -------------------------------------------------------------------
    def __iter__(self) -> Iterator[GroupResult]:
        self.started = self.mark = time.monotonic()
        while True:
            if self.engine._aborted:
                self._abort_all()
                raise GenerationAborted("SGLang engine: generation aborted")
            self._fill()
            if not self.flights and not self.waiting and self.exhausted:
                self._tick()
                return
            result = self._poll()
            if result is not None:
                self._fill()  # the freed slots work while the caller scores this group
                yield result

    def cancel(self, keep_partial: bool = True) -> list[GroupResult]:
        """Abort what is in flight. ``keep_partial``: wait for the partial groups and return them (and
        any group that landed meanwhile); otherwise return [] as soon as every server took the abort."""
        if keep_partial:
            self._abort_all()
            return self.cut
        self.cancelled = True
        self.waiting.clear()
        self.stats.aborted_sequences += sum(f.size for f in self.flights.values())  # their answers are not read
        self._tick()
        self.closed = True
        if self.flights:
            self.engine.quiet.clear()
            threading.Thread(target=self._reap, name=f"sglang-reap-{self.uid}", daemon=True).start()
        return []

    # ---- placing requests --------------------------------------------------------------------
    def _fill(self) -> None:
        """Send requests while a server has room for the next group."""
        while not self.cancelled:
            if not self.waiting:
                if not self.engine._has_room():
                    return  # draw nothing a server cannot take yet
                request = next(self.requests, None)
                if request is None:
                    self.exhausted = True
                    return
                self.waiting.append((request, 0))
            request, tries = self.waiting[0]
            todo = [i for i, s in enumerate(request.partial) if not s.finished] if request.partial else []
            if request.partial is not None and not todo:  # a carried group that had completed
                self.waiting.pop(0)
                self._send_nothing(request)
                continue
            size = len(todo) if request.partial is not None else request.n
            index = self.engine._pick(size)
            if index is None:
                return
            self.waiting.pop(0)
            self._tick()
            self.tickets += 1
            flight = _Flight(request, index, size, time.monotonic(), tries + 1, todo,
                             [f"{self.uid}-{self.tickets}-{i}" for i in range(size)])
            self.flights[self.tickets] = flight
            threading.Thread(target=self._post, args=(self.tickets, flight), daemon=True,
                             name=f"sglang-request-{self.tickets}").start()

    def _send_nothing(self, request: GroupRequest) -> None:
        self.tickets += 1
        self.flights[self.tickets] = _Flight(request, -1, 0, time.monotonic())
        self.done.put((self.tickets, [], time.monotonic()))

    def _payload(self, flight: _Flight) -> dict:
        request = flight.request
        if request.partial is None:
            return {"input_ids": [request.prompt_ids] * request.n, "sampling_params": self.params,
                    "return_logprob": True, "rid": flight.rids}
        # Continuations: each unfinished sample from prompt + its response so far, for the tokens it has left.
        partial = [request.partial[i] for i in flight.todo]
        params = [{**self.params, "max_new_tokens": self.sampling.max_new_tokens - len(s.response_ids)} for s in partial]
        return {"input_ids": [request.prompt_ids + s.response_ids for s in partial],
                "sampling_params": params if any(p != params[0] for p in params) else params[0],
                "return_logprob": True, "rid": flight.rids}

    def _post(self, ticket: int, flight: _Flight) -> None:
        """One request, in its own thread; its slots are freed here, whether or not the stream still
        waits for the answer (after a cancel without partials it does not)."""
        try:
            if self.cancelled:  # placed just before a cancel: never sent, so nothing to abort
                outcome: object = ServerUnavailable("cancelled before it was sent")
            else:
                out = self.engine.servers[flight.server].http.post("/generate", self._payload(flight))
                outcome = out if isinstance(out, list) else [out]
        except (ServerUnavailable, SGLangError) as err:
            outcome = err
        with self.engine.lock:
            self._tick_locked()
            self.engine.in_flight[flight.server] -= flight.size
        self.done.put((ticket, outcome, time.monotonic()))

    # ---- answers -----------------------------------------------------------------------------
    def _poll(self) -> Optional[GroupResult]:
        """The next request's group once it is whole, waiting at most POLL_S (None: nothing yet)."""
        try:
            ticket, outcome, at = self.done.get(timeout=POLL_S)
        except queue.Empty:
            return None
        return self._land(ticket, outcome, at)

    def _land(self, ticket: int, outcome, at: float) -> Optional[GroupResult]:
        """A request's answer: the group's result, None when it is sent again, or the error."""
        flight = self.flights.pop(ticket)
        self._tick()
        try:
            if isinstance(outcome, Exception):
                raise outcome
            if len(outcome) != flight.size:
                raise ServerUnavailable(f"{len(outcome)} outputs for {flight.size} sequences")
            samples = [_to_sample(flight.request, o, self.cancelled) for o in outcome]
        except ServerUnavailable as err:
            if self.cancelled:
                return None  # the group is lost with the server; nothing aborted is retried
            return self._retry(flight, err)
        if flight.server >= 0:
            with self.engine.lock:
                self.engine.served[flight.server] += len(samples)
        self.stats.aborted_sequences += sum(not s.finished for s in samples)
        new_tokens = sum(len(s.response_ids) for s in samples)
        if flight.request.partial is not None:
            group = list(flight.request.partial)
            for i, sample in zip(flight.todo, samples):
                group[i] = group[i].continued(sample)
            samples = group
        return GroupResult(flight.request.key, samples, flight.size, new_tokens, at - flight.sent, at,
                           max(flight.server, 0))

    def _retry(self, flight: _Flight, err: Exception) -> None:
        self.engine._report_dead(flight.server)
        if flight.tries > self.engine.cfg.max_retries:
            raise RuntimeError(f"SGLang: a request failed on {flight.tries} tries "
                               f"(rollout.sglang.max_retries={self.engine.cfg.max_retries}): {err}")
        self.stats.retried_requests += 1
        self.waiting.insert(0, (flight.request, flight.tries))
        return None

    def _abort_all(self) -> None:
        """Abort every request in flight and wait for their answers (partial groups, kept in ``cut``)."""
        self.cancelled = True
        self.cut = []
        self.waiting.clear()
        last = 0.0
        while self.flights:
            if time.monotonic() - last > REABORT_S:  # again: a request may have been in transit
                self._abort_servers()
                last = time.monotonic()
            result = self._poll()
            if result is not None:
                self.cut.append(result)
        self._tick()
        self.closed = True

    def _abort_servers(self) -> None:
        """``abort_all`` to every server with a request of this stream in flight, all at once."""
        servers = sorted({f.server for f in self.flights.values() if f.server >= 0})
        if servers:
            with ThreadPoolExecutor(max_workers=len(servers)) as pool:
                list(pool.map(lambda i: self._post_abort(i, {"abort_all": True}), servers))

    def _post_abort(self, index: int, payload: dict) -> None:
        try:
            self.engine.servers[index].http.post("/abort_request", payload, timeout_s=10)
        except (ServerUnavailable, SGLangError):
            pass  # a dead server's requests fail on their own

    def _reap(self) -> None:
        """After a cancel without partials: abort, then drop the answers as they come. A request
        still out REABORT_S after the abort may have reached its server after it: aborted again by
        its ids (never ``abort_all``: the next stream's requests may be running there by then)."""
        try:
            self._abort_servers()
            self.abort_s = time.monotonic() - self.mark  # the cancel's tick set the mark
            last = time.monotonic()
            while self.flights:
                try:
                    ticket, _, _ = self.done.get(timeout=POLL_S)
                    self.flights.pop(ticket, None)
                except queue.Empty:
                    pass
                if self.flights and time.monotonic() - last > REABORT_S:
                    for flight in list(self.flights.values()):
                        for rid in flight.rids:
                            self._post_abort(flight.server, {"rid": rid})
                    last = time.monotonic()
        finally:
            # Every request answered: its server is done with it (a memory release needs it idle).
            self.engine.quiet.set()

    def _tick(self) -> None:
        with self.engine.lock:
            self._tick_locked()

    def _tick_locked(self) -> None:
        """Busy time and slot occupancy per server since the last change of what is in flight
        (called with the engine's lock held: request threads free slots)."""
        if self.closed:
            return
        now = time.monotonic()
        span, self.mark = now - self.mark, now
        self.stats.wall_s = now - self.started
        for index, count in enumerate(self.engine.in_flight):
            if count:
                self.stats.busy_s[index] += span
                self.stats.slot_s[index] += span * min(count / max(self.engine.capacity[index], 1), 1.0)


def _to_sample(request: GroupRequest, out: dict, cancelled: bool) -> Sample:
    meta = out["meta_info"]
    finish = (meta.get("finish_reason") or {}).get("type")
    if finish not in ("stop", "length") and not (finish == "abort" and cancelled):
        # Aborted by something else than the stream's cancel (a server shutting down, weights
        # changing): sent again, never trained on.
        raise ServerUnavailable(f"request ended with finish_reason {meta.get('finish_reason')!r}")
    logprobs = [float(entry[0]) for entry in meta["output_token_logprobs"]]
    response = list(out["output_ids"])
    if len(logprobs) != len(response):
        raise SGLangError(f"SGLang returned {len(response)} tokens but {len(logprobs)} logprobs")
    version = meta.get("weight_version")
    return Sample(prompt_ids=list(request.prompt_ids), response_ids=response, logprobs=logprobs, finish_reason=finish,
                  weight_version=int(version) if version not in (None, "default") else -1)
