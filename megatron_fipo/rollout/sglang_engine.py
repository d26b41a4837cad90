"""The SGLang rollout engine: supervised servers, routing by free slots, retries, weight updates.

Servers start from a safetensors snapshot of the first weights the bridge sends (so no HF model
has to exist beforehand), or are given as URLs (launched elsewhere, e.g. disaggregated nodes).
Each prompt group goes, in one request, to the server with the most free sequence slots (its
capacity: rollout.sglang.max_running_requests or what it reports), ties in turn; requests are sent
only while a server has room (sglang_stream.py). A request that meets a dead server is retried at
once on another server, while the dead one is restarted in the background from the newest
snapshot on disk and rejoins the routing when healthy.
A restarted server may hold older weights than the others until the next update: its samples say
so in their weight version (the trainer recomputes old logprobs, so they stay usable).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from megatron_fipo.config import RolloutConfig
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.rollout.base import GroupRequest, Sample, SamplingParams
from megatron_fipo.rollout.sglang_http import SGLangError, ServerUnavailable
from megatron_fipo.rollout.sglang_memory import Phase
from megatron_fipo.rollout.sglang_server import SGLangServer, job_script_servers
from megatron_fipo.rollout.sglang_stream import SGLangStream
from megatron_fipo.rollout.sglang_weights import (DiskTransport, DistributedTransport, TensorTransport, each_server,
                                                  set_version)

log = logging.getLogger("megatron_fipo")


class SGLangEngine:
    def __init__(self, cfg: RolloutConfig, arch: ModelArch, run_dir: str | Path):
        self.cfg = cfg.sglang
        run_dir = Path(run_dir)
        self.external = bool(self.cfg.urls)
        # Colocated servers, launched here or by the job script, give their memory to the trainer between phases.
        release = cfg.placement == "colocated" and self.cfg.release_memory
        if self.external:
            self.servers = job_script_servers(self.cfg, run_dir, release, range(len(self.cfg.urls)))
        else:
            self.servers = [SGLangServer(self.cfg, i, run_dir / "sglang" / f"server-{i}.log", release)
                            for i in range(self.cfg.num_servers)]
        self.snapshots = DiskTransport(run_dir / "rollout_weights", arch)
        if self.cfg.weight_transport == "tensor":
            self.transport = TensorTransport()
        elif self.cfg.weight_transport == "disk":
            self.transport = self.snapshots
        else:
            self.transport = DistributedTransport(self.cfg.host, self.cfg.weights_update_port, self.cfg.distributed_backend)
        self.weight_version = -1  # none yet
        self.launched = False  # servers launched here start at the first generation phase
        # Which memory tags the servers keep resident (sglang_memory.py); fresh servers hold all.
        self.phase: Phase = "generate"
        self.in_flight = [0] * len(self.servers)  # sequences sent and not answered, per server
        self.capacity = [0] * len(self.servers)  # sequences each runs at once (0: not read yet)
        self.turn = 0  # where the next tie-break starts: the server after the last one picked
        self.served = [0] * len(self.servers)  # sequences each server completed: the routing's record
        self._aborted = False
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # a server left or rejoined the routing
        self.down: set[int] = set()  # servers being recovered
        # Clear while a cancelled stream's aborted requests have not all answered (sglang_stream.py): the next phase waits.
        self.quiet = threading.Event()
        self.quiet.set()

    # ---- weights -----------------------------------------------------------------------------
    def wait_for_recoveries(self) -> None:
        """Block until no server is being restarted (an update must reach every server)."""
        with self.changed:
            while self.down:
                self.changed.wait()

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int) -> None:
        if not self.started:
            # Launched servers start at the first generation phase, from the newest snapshot: by then
            # the trainer has offloaded, so the two never hold the accelerator together.
            self.snapshots.write(buckets, version)
        else:
            self.begin_update()
            self.transport.push(self.servers, buckets, version)
            self.end_update(version)
        self.weight_version = version

    @property
    def started(self) -> bool:
        return self.external or self.launched

    def _launch(self) -> None:
        path, version = self.snapshots.latest
        for server in self.servers:
            server.start(str(path.resolve()))
        for server in self.servers:
            server.wait_healthy()
        set_version(self.servers, version)
        self.launched = True

    def begin_update(self) -> None:
        """Before a push: every server up (a dead one is recovered first) and its weights resident."""
        if self.weight_version < 0 and self.external:  # started by the job script; they may still be loading
            for server in self.servers:
                server.wait_healthy()
        self._enter("update")

    def end_update(self, version: int) -> None:
        """After a push (whose last load flushed the cached prefixes): stamp the version where the
        transport has not."""
        set_version([s for s in self.servers if s.weight_version != str(version)], version)
        self.weight_version = version

    def pause(self) -> None:
        """The trainer's phase: colocated servers give back every tag."""
        self._enter("train")

    def resume(self) -> None:
        """Generation (rollouts, eval): every tag resident."""
        self._enter("generate")

    def shutdown(self) -> None:
        for server in self.servers:
            server.stop()

    def _enter(self, phase: Phase) -> None:
        """Every server up and tracked, then holding what ``phase`` needs (sglang_memory.py)."""
        self.quiet.wait()
        if not self.started:
            if phase == "generate":
                self._launch()  # fresh servers hold every tag: what generation needs
            return  # otherwise nothing runs yet, and the trainer may hold the accelerator
        self._check_servers()
        self.wait_for_recoveries()
        self.phase = phase

        def enter(server: SGLangServer) -> dict:
            try:
                server.memory.enter(phase)
            except ServerUnavailable:  # died since the check: recovered like any dead server, into this phase
                self._report_dead(self.servers.index(server))
            return {}

        each_server(self.servers, enter)
        self.wait_for_recoveries()

    def _check_servers(self) -> None:
        """A dead server is recovered; one that restarted unseen (the job script brought it back
        between two calls) is a new process: its tags and its end of an update group are reset."""
        def version(server: SGLangServer):
            try:
                return server.http.get("/model_info", timeout_s=30).get("weight_version")
            except (ServerUnavailable, SGLangError) as err:
                return err

        with ThreadPoolExecutor(max_workers=len(self.servers)) as pool:  # a step's start waits for the slowest only
            reported_all = list(pool.map(version, self.servers))
        for index, (server, reported) in enumerate(zip(self.servers, reported_all)):
            if isinstance(reported, Exception):
                self._report_dead(index)
                continue
            if server.weight_version is not None and reported != server.weight_version:
                log.warning("SGLang server %s restarted since version %s was stamped on it (it reports %s): it "
                            "holds every memory tag again and the job's initial weights until the next update",
                            server.url, server.weight_version, reported)
                server.new_process()
                self.transport.server_restarted(server)

    # ---- generation --------------------------------------------------------------------------
    def abort(self) -> None:
        """Make the ``generate`` or stream in flight abort its requests and raise GenerationAborted
        (called from a signal handler: only sets a flag, which the stream reads every 50 ms)."""
        self._aborted = True

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams, seed: int) -> list[list[Sample]]:
        """n samples per prompt, each prompt's on one server. SGLang samples without a caller seed:
        ``seed`` is not used."""
        results = {r.key: r.samples for r in self.stream(iter(GroupRequest(i, p, n) for i, p in enumerate(prompts)),
                                                         sampling, seed)}
        return [results[i] for i in range(len(prompts))]

    def stream(self, requests: Iterator[GroupRequest], sampling: SamplingParams, seed: int) -> "SGLangStream":
        if self.weight_version < 0 and not self.external:
            raise RuntimeError("SGLang engine: no weights loaded; call update_weights first")
        self.resume()
        self._aborted = False  # an abort is for the call in flight; one that came between calls is spent
        unread = [i for i in range(len(self.servers)) if not self.capacity[i] and i not in self.down]
        if unread:
            with ThreadPoolExecutor(max_workers=len(unread)) as pool:
                for index, value in zip(unread, pool.map(lambda i: self._read_capacity(self.servers[i]), unread)):
                    self.capacity[index] = value
        return SGLangStream(self, requests, sampling)

    def _read_capacity(self, server: SGLangServer) -> int:
        """Sequences the server runs at once: rollout.sglang.max_running_requests, else what it reports,
        else an even share of rollout.sglang.max_concurrency when that is set."""
        if self.cfg.max_running_requests:
            return self.cfg.max_running_requests
        info: dict = {}
        for path in ("/server_info", "/get_server_info"):  # the older name before SGLang 0.5.23
            try:
                info = server.http.get(path, timeout_s=30)
                break
            except SGLangError:
                continue
        # SGLang 0.5.23 on a CPU reports max_running_requests None (not set) and the effective value per DP rank.
        state = (info.get("internal_states") or [{}])[0]
        value = (info.get("max_running_requests") or state.get("max_running_requests")
                 or state.get("effective_max_running_requests_per_dp"))
        if value:
            return int(value)
        if not self.cfg.max_concurrency:
            raise RuntimeError(f"SGLang server {server.url} does not report max_running_requests: set "
                               "rollout.sglang.max_running_requests to the sequences it runs at once")
        share = max(1, self.cfg.max_concurrency // len(self.servers))
        log.warning("SGLang server %s does not report max_running_requests: %d sequences at once (set "
                    "rollout.sglang.max_running_requests to what it runs)", server.url, share)
        return share

    def _has_room(self) -> bool:
        """Whether some live server has a free slot (and the client's cap, if set, allows more)."""
        with self.lock:
            cap = self.cfg.max_concurrency
            return (not cap or sum(self.in_flight) < cap) and any(
                self.capacity[i] > self.in_flight[i] for i in range(len(self.servers)) if i not in self.down)

    def _pick(self, size: int) -> Optional[int]:
        """The live server with the most free slots that can take ``size`` sequences now (an idle one
        always can); ties go in turn from the server after the last one picked. None: all full."""
        with self.lock:
            total = sum(self.in_flight)
            if self.cfg.max_concurrency and total and total + size > self.cfg.max_concurrency:
                return None
            count = len(self.servers)
            best, best_free = None, None
            for step in range(count):
                index = (self.turn + step) % count
                free = self.capacity[index] - self.in_flight[index]
                if index in self.down or not self.capacity[index] or (free < size and self.in_flight[index]):
                    continue
                if best_free is None or free > best_free:
                    best, best_free = index, free
            if best is not None:
                self.in_flight[best] += size
                self.turn = (best + 1) % count
            return best

    def _report_dead(self, index: int) -> None:
        """Take the server out of routing and recover it in the background (once, however many saw it fail)."""
        with self.lock:
            if index in self.down:
                return
            self.down.add(index)
        threading.Thread(target=self._recover, args=(index,), name=f"sglang-recover-{index}", daemon=True).start()

    def _recover(self, index: int) -> None:
        server = self.servers[index]
        try:
            if server.alive() and server.http.healthy():
                return  # a transient error
            if self.external:  # the job script restarts it (sbatch.py); it comes back with the HF weights
                log.warning("SGLang server %s (started by the job script) is unreachable; routing around it and "
                            "waiting up to rollout.sglang.startup_timeout_s=%s s for it to come back",
                            server.url, self.cfg.startup_timeout_s)
                server.wait_healthy()
                server.new_process()
                log.warning("SGLang server %s is back, with the job's initial weights until the next update",
                            server.url)
            else:
                path, version = self.snapshots.latest
                server.restart(str(path.resolve()))
                set_version([server], version)
                if version != self.weight_version:
                    log.warning("SGLang server %d restarted with weight version %d (current %d) until the next "
                                "update", index, version, self.weight_version)
            self.transport.server_restarted(server)
            server.memory.enter(self.phase)  # a new process holds every tag; the phase may want fewer
        except Exception:  # noqa: BLE001 - back in routing either way; its requests then fail and say why
            log.exception("SGLang server %d (%s) could not be recovered", index, server.url)
        finally:
            with self.changed:
                self.down.discard(index)
                self.changed.notify_all()


