"""The SGLang rollout engine: supervised servers, least-loaded routing, retries, weight updates.

Servers start from a safetensors snapshot of the first weights the bridge sends (so no HF model
has to exist beforehand), or are given as URLs (launched elsewhere, e.g. disaggregated nodes).
Requests go to the server with the fewest sequences in flight; a request that meets a dead server
is retried at once on another server, while the dead one is restarted in the background from the
newest snapshot on disk and rejoins the routing when healthy.
A restarted server may hold older weights than the others until the next update: its samples say
so in their weight version (the trainer recomputes old logprobs, so they stay usable).
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import torch

from megatron_fipo.config import RolloutConfig
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.rollout.base import Sample, SamplingParams
from megatron_fipo.rollout.sglang_http import SGLangError, ServerUnavailable
from megatron_fipo.rollout.sglang_memory import KV_CACHE, Phase
from megatron_fipo.rollout.sglang_server import SGLangServer, job_script_servers
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
        self.in_flight = [0] * len(self.servers)
        self.served = [0] * len(self.servers)  # sequences each server completed: the routing's record
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # a server left or rejoined the routing
        self.down: set[int] = set()  # servers being recovered

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
        """After a push: drop cached prefixes (their KV came from the old weights), stamp the version."""
        # A released KV cache was flushed by its release, and nothing ran since.
        each_server([s for s in self.servers if s.memory.resident(KV_CACHE)], lambda s: s.http.post("/flush_cache"))
        set_version(self.servers, version)
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
        if not self.started:
            if phase == "generate":
                self._launch()  # fresh servers hold every tag: what generation needs
            return  # otherwise nothing runs yet, and the trainer may hold the accelerator
        self._check_servers()
        self.wait_for_recoveries()
        self.phase = phase
        each_server(self.servers, lambda s: s.memory.enter(phase) or {})

    def _check_servers(self) -> None:
        """A dead server is recovered; one that restarted unseen (the job script brought it back
        between two calls) is a new process: its tags and its end of an update group are reset."""
        for index, server in enumerate(self.servers):
            try:
                reported = server.http.get("/model_info", timeout_s=30).get("weight_version")
            except (ServerUnavailable, SGLangError):
                self._report_dead(index)
                continue
            if server.weight_version is not None and reported != server.weight_version:
                log.warning("SGLang server %s restarted since version %s was stamped on it (it reports %s): it "
                            "holds every memory tag again and the job's initial weights until the next update",
                            server.url, server.weight_version, reported)
                server.new_process()
                self.transport.server_restarted(server)

    # ---- generation --------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams, seed: int) -> list[list[Sample]]:
        """n samples per prompt. SGLang samples without a caller seed: ``seed`` is not used."""
        if self.weight_version < 0 and not self.external:
            raise RuntimeError("SGLang engine: no weights loaded; call update_weights first")
        self.resume()
        flat = [p for p in prompts for _ in range(n)]
        per = self.cfg.sequences_per_request
        chunks = [flat[i : i + per] for i in range(0, len(flat), per)]
        params = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                  "max_new_tokens": sampling.max_new_tokens, "stop_token_ids": list(sampling.stop_token_ids),
                  "skip_special_tokens": False}
        workers = max(1, min(len(chunks), math.ceil(self.cfg.max_concurrency / per)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda chunk: self._generate_chunk(chunk, params), chunks))
        samples = [s for chunk in results for s in chunk]
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _generate_chunk(self, chunk: list[list[int]], params: dict) -> list[Sample]:
        errors = []
        for _ in range(self.cfg.max_retries + 1):
            index = self._pick(len(chunk))
            server = self.servers[index]
            try:
                out = server.http.post("/generate", {"input_ids": chunk, "sampling_params": params,
                                                     "return_logprob": True})
                samples = [_to_sample(p, o) for p, o in zip(chunk, out if isinstance(out, list) else [out])]
                if len(samples) != len(chunk):
                    raise ServerUnavailable(f"{server.url}: {len(samples)} outputs for {len(chunk)} inputs")
                with self.lock:
                    self.served[index] += len(samples)
                return samples
            except ServerUnavailable as err:
                errors.append(str(err))
                self._report_dead(index)
            finally:
                with self.lock:
                    self.in_flight[index] -= len(chunk)
        raise RuntimeError(f"SGLang: a request failed on {self.cfg.max_retries + 1} tries "
                           f"(rollout.sglang.max_retries={self.cfg.max_retries}): {errors}")

    def _pick(self, size: int) -> int:
        """The live server with the fewest sequences in flight; waits while every server is recovering."""
        with self.changed:
            while len(self.down) == len(self.servers):
                self.changed.wait()
            index = min((i for i in range(len(self.servers)) if i not in self.down), key=self.in_flight.__getitem__)
            self.in_flight[index] += size
            return index

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


def _to_sample(prompt: list[int], out: dict) -> Sample:
    meta = out["meta_info"]
    finish = (meta.get("finish_reason") or {}).get("type")
    if finish not in ("stop", "length"):
        # An aborted request (server shutting down, weights changing) is retried, never trained on.
        raise ServerUnavailable(f"request ended with finish_reason {meta.get('finish_reason')!r}")
    logprobs = [float(entry[0]) for entry in meta["output_token_logprobs"]]
    response = list(out["output_ids"])
    if len(logprobs) != len(response):
        raise SGLangError(f"SGLang returned {len(response)} tokens but {len(logprobs)} logprobs")
    version = meta.get("weight_version")
    return Sample(prompt_ids=list(prompt), response_ids=response, logprobs=logprobs, finish_reason=finish,
                  weight_version=int(version) if version not in (None, "default") else -1)
