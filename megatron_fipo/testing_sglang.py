"""A test double of one SGLang 0.5.23 server at its HTTP boundary: the calls the trainer makes,
refused exactly where SGLang refuses them.

It is a test double, for tests and benchmarks only: it stands in at the process boundary where a
real server cannot run here (memory release needs CUDA and torch_memory_saver; dozens of servers do
not fit on two cores). Its generation is a stand-in: greedy tokens are a function of the prompt and
a fingerprint of the loaded weights, so the output follows every weight update; nothing else about
the model is imitated. The real CPU server checks the same call sequences where it can run them
(tests/integration/test_sglang_engine.py).

With a ``DecodeTiming`` (testing_sglang_timing.py) it also takes the time a server takes: sequence
slots, a waiting queue, a decode step timed by the running sequences, long-tailed response lengths,
and aborts that return the tokens made so far; tools/bench_rollout_scale.py runs 32 such servers in
one process. Without one it answers as soon as ``generate_delay_s`` has passed.

Each rule cites the line of the installed SGLang 0.5.23 (``sglang/srt/...`` in .venv-sglang) it
mirrors. A call SGLang refuses ends one of three ways, as there:

- refused: HTTP 400 with SGLang's message; the server goes on.
- crash: the scheduler raised (an assert, a KeyError). ``run_scheduler_process`` logs "Scheduler hit
  an exception" and SIGQUITs the server (managers/scheduler.py:6370-6373): the double stops
  answering and keeps the exception in ``crash``.
- GPU fault: SGLang checks nothing, but on a GPU the call reads or writes memory that
  torch_memory_saver unmapped at release (weights written or read while ``weights`` is released, a
  request run while any tag is released); the CUDA error kills the scheduler the same way. The
  double crashes too, and says which.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import threading
import time
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import torch

from megatron_fipo.testing_sglang_timing import DecodeScheduler, DecodeTiming, Sequence

ALL_TAGS = ("weights", "kv_cache", "cuda_graph")  # constants.py: GPU_MEMORY_ALL_TYPES
SRC = "sglang/srt/"
VERSION = "0.5.23"
# An untimed double has no slots and reports this many (SGLang sizes the pool from GPU memory when
# --max-running-requests is not given); a timed double reports its DecodeTiming's slots.
DEFAULT_MAX_RUNNING_REQUESTS = 4096


class _Refused(Exception):
    """HTTP 400 with SGLang's own message."""


class SGLangDouble:
    """One fake server on loopback. ``kill()`` ends it as a crash would; ``restart()`` brings a fresh
    process back on the same port (as a job script's restart loop does), holding ``weights`` again."""

    def __init__(self, weights: dict[str, torch.Tensor] | None = None, tp_size: int = 1, vocab_size: int = 1000,
                 generate_delay_s: float = 0.0, api_key: str = "", timing: DecodeTiming | None = None):
        if timing is not None and generate_delay_s:
            raise ValueError("SGLangDouble: give generate_delay_s or timing, not both")
        self.timing = timing
        self.decoder: DecodeScheduler | None = None
        self._logprob_json = [f"[-0.5,{t},null]" for t in range(vocab_size)] if timing is not None else []
        self.initial = dict(weights or {})
        self.tp_size, self.vocab_size = tp_size, vocab_size
        self.generate_delay_s = generate_delay_s
        self.api_key = api_key
        self.port = 0
        self.calls: list[str] = []  # every path served, in order, across restarts
        self.memory_calls: list[tuple[str, list[str]]] = []  # (release/resume, tags named)
        self.flushes: list[str] = []  # each prefix-cache flush: "update" (inside a load call) or "flush_cache+empty_cache"
        self.restarts = 0
        # Called with each path after its answer went out: a test's hook to kill or restart the double.
        self.after_call: Callable[[str], None] = lambda path: None
        self._httpd: ThreadingHTTPServer | None = None
        self._start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- process lifecycle -------------------------------------------------------------------
    def _start(self) -> None:
        self.cond = threading.Condition()
        self.offload_tags: set[str] = set()  # weight_updater.py:96
        self.stashed_static_state = False  # weight_updater.py:373, exists only after releasing weights
        self.session: dict | None = None  # weight_updater.py:311, begin/end_weight_update
        self.paused: str | None = None  # tokenizer_manager.py:2267 (abort / retract / in_place)
        self.running = 0  # requests in the scheduler
        self.aborted = 0  # abort generation: requests in flight now end with finish_reason abort
        self.weights = dict(self.initial)
        self.weight_version = "default"
        self.groups: dict[str, object] = {}
        self.crash: str | None = None
        # A new process has a new scheduler: nothing queued or running survives a restart.
        self.decoder = DecodeScheduler(self.timing, str(self.restarts)) if self.timing is not None else None
        handler = type("Handler", (_Handler,), {"double": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, name=f"sglang-double-{self.port}", daemon=True).start()

    def kill(self) -> None:
        """The process is gone: connections are refused from now on."""
        httpd, self._httpd = self._httpd, None  # a crash and close() may both get here
        if self.decoder is not None:
            self.decoder.close()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        self._start()

    def close(self) -> None:
        self.kill()

    def _crash(self, what: str) -> None:
        """The scheduler died (scheduler.py:6372): answer nothing more."""
        self.crash = what
        threading.Thread(target=self.kill, daemon=True).start()

    # ---- generation stand-in -----------------------------------------------------------------
    def fingerprint(self) -> int:
        return weights_fingerprint(self.weights, self.vocab_size)

    def _idle(self) -> bool:
        # scheduler.py:5520 / weight_updater.py:339: is_fully_idle(ignore_waiting=paused); a
        # retract pause moves running requests back to the waiting queue.
        return self.running == 0 or self.paused == "retract"

    def generate(self, payload: dict):
        ids = payload["input_ids"]
        single = bool(ids) and isinstance(ids[0], int)
        params = payload.get("sampling_params", {})
        n = int(params.get("n", 1))
        # io_struct.py:550: n > 1 makes a single prompt a batch; :592 its n samples follow their
        # prompt (prompt-major order, measured on the CPU server).
        rids = _rids(payload.get("rid"), single, 1 if single else len(ids), n)
        prompts = [p for p in ([ids] if single else ids) for _ in range(n)]
        single = single and n == 1
        with self.cond:
            self.cond.wait_for(lambda: self.paused is None)  # tokenizer_manager.py:939
            if self.offload_tags:
                raise _GPUFault(f"generate with {sorted(self.offload_tags)} released reads unmapped memory")
            self.running += 1
            aborted_before = self.aborted
        try:
            if self.decoder is not None:
                return self._generate_timed(prompts, rids, params, n, single)
            deadline = time.monotonic() + self.generate_delay_s
            with self.cond:
                while True:
                    if self.aborted != aborted_before:
                        return _outputs(prompts, [], self.weight_version, "abort", single)
                    left = deadline - time.monotonic()
                    if left <= 0 and self.paused is None:
                        break
                    self.cond.wait(timeout=max(left, 0.01) if self.paused is None else 0.05)
                seed = self.fingerprint()
                n = int(params.get("max_new_tokens", 16))
                tokens = [[(seed + sum(p) + 31 * i) % self.vocab_size for i in range(n)] for p in prompts]
                return _outputs(prompts, tokens, self.weight_version, "length", single)
        finally:
            with self.cond:
                self.running -= 1
                self.cond.notify_all()

    def _generate_timed(self, prompts: list[list[int]], rids: list[str], params: dict, n: int, single: bool):
        """Queue one sequence per output on the decode scheduler; answer when all have ended."""
        max_new = int(params.get("max_new_tokens", 128))  # sampling_params.py: SGLang's default
        ignore_eos = bool(params.get("ignore_eos", False))
        seen: dict[tuple[int, ...], int] = {}
        seqs = []
        for position, (prompt, rid) in enumerate(zip(prompts, rids)):
            # The sample's index among the identical inputs of this request: its n index, or the
            # count of identical prompts before it in a batch.
            index = position % n if n > 1 else seen.setdefault(tuple(prompt), 0)
            if n == 1:
                seen[tuple(prompt)] += 1
            seqs.append(Sequence(rid, prompt, index, self.timing.length(prompt, index, max_new, ignore_eos)))
        self.decoder.submit(seqs)
        for seq in seqs:
            seq.done.wait()
        # Written as JSON text here: 32 doubles share this process with the client under test, and
        # json.dumps of per-token logprob lists would cost more than the decode it stands for.
        seed = self.fingerprint()
        outs = []
        for seq in seqs:
            tokens = [(seed + sum(seq.input_ids) + 31 * i + 7 * seq.index) % self.vocab_size for i in range(seq.made)]
            finish = ({"type": "abort", "message": "Aborted", "status_code": None, "err_type": None} if seq.aborted
                      else {"type": "length", "length": seq.made})  # schedule_batch.py: FINISH_ABORT, FINISH_LENGTH
            meta = json.dumps({"id": seq.rid, "finish_reason": finish, "prompt_tokens": len(seq.input_ids),
                               "completion_tokens": seq.made, "weight_version": self.weight_version})
            logprobs = ",".join([self._logprob_json[t] for t in tokens])
            outs.append(f'{{"output_ids":[{",".join(map(str, tokens))}],"meta_info":{meta[:-1]},'
                        f'"output_token_logprobs":[{logprobs}]}}}}')
        return outs[0] if single else f"[{','.join(outs)}]"

    def server_info(self) -> dict:
        """http_server.py:863: the resolved server args, the scheduler's info, per-DP internal states."""
        slots = self.timing.max_running_requests if self.timing is not None else DEFAULT_MAX_RUNNING_REQUESTS
        return {"max_running_requests": slots, "tp_size": self.tp_size, "weight_version": self.weight_version,
                "internal_states": [{"max_running_requests": slots, "effective_max_running_requests_per_dp": slots}],
                "version": VERSION}

    # ---- control endpoints -------------------------------------------------------------------
    def release_memory_occupation(self, payload: dict) -> None:
        if not self._idle():
            raise _Crash(f"AssertionError: release_memory_occupation should be called only when server is idle. "
                         f"({SRC}managers/scheduler_components/weight_updater.py:339)")
        tags = payload.get("tags") or ALL_TAGS
        if "weights" in tags and "weights" in self.offload_tags:
            # weight_updater.py:370 exports the model's buffers, which the first release unmapped.
            raise _GPUFault("releasing weights twice reads the released buffers to stash them")
        self.offload_tags.update(tags)  # weight_updater.py:349
        if "weights" in tags:
            self.stashed_static_state = True

    def resume_memory_occupation(self, payload: dict) -> None:
        for tag in payload.get("tags") or ALL_TAGS:
            if tag not in self.offload_tags:  # weight_updater.py:390: set.remove
                raise _Crash(f"KeyError: {tag!r} ({SRC}managers/scheduler_components/weight_updater.py:390)")
            self.offload_tags.remove(tag)
            if tag == "weights":
                self.stashed_static_state = False  # weight_updater.py:402: del stashed state

    def begin_weight_update(self, payload: dict) -> dict:
        if self.session is not None:  # weight_updater.py:311
            raise _Refused("a weight-update session is already open; call end_weight_update() first")
        self.session = {"loaded": False}
        return {"success": True, "message": "Success"}

    def end_weight_update(self, payload: dict) -> dict:
        if self.session is None:  # weight_updater.py:325
            raise _Refused("no weight-update session is open; call begin_weight_update() first")
        self.session = None
        return {"success": True, "message": "Success"}

    def _load(self, named: list[tuple[str, torch.Tensor]], what: str) -> None:
        if "weights" in self.offload_tags:
            raise _GPUFault(f"{what} writes weights that are released")
        for name, tensor in named:
            self.weights[name] = tensor.detach().clone()

    def update_weights_from_tensor(self, payload: dict) -> dict:
        if self.session is None:  # weight_updater.py:234
            raise _Refused("update_weights_from_tensor must run between begin_weight_update() and "
                           "end_weight_update()")
        # tokenizer_control_mixin.py:583: without a pause, the writer lock waits for running requests.
        self.cond.wait_for(lambda: self.running == 0 or self.paused is not None)
        payloads = payload["serialized_named_tensors"]
        try:
            # tp_worker.py:200: TP rank r opens entry r only.
            named = [pickle.loads(base64.b64decode(payloads[r])) for r in range(self.tp_size)][0]
        except IndexError as err:
            raise _Crash(f"IndexError: {err} ({SRC}managers/tp_worker.py:200)") from None
        self._load(named, "update_weights_from_tensor")
        self.session["loaded"] = True
        return self._flush_after_update(payload, {"success": True, "message": "Success"})

    def update_weights_from_disk(self, payload: dict) -> dict:
        from safetensors.torch import load_file

        named = [item for f in sorted(Path(payload["model_path"]).glob("*.safetensors")) for item in load_file(f).items()]
        self._load(named, "update_weights_from_disk")
        if payload.get("weight_version") is not None:
            self.weight_version = payload["weight_version"]
        return self._flush_after_update(payload, {"success": True, "message": "Succeeded to update model weights."})

    def init_weights_update_group(self, payload: dict) -> dict:
        import torch.distributed as dist

        if payload.get("backend", "nccl") != "gloo":
            raise _Refused("the double joins gloo groups only (NCCL needs a GPU)")
        if self.tp_size != 1:
            raise _Refused("the double receives broadcasts as one TP rank only")
        # model_runner_components/weight_updater.py:124: rank = rank_offset + tp_rank
        store = dist.TCPStore(payload["master_address"], payload["master_port"], payload["world_size"], False,
                              timeout=timedelta(seconds=60))
        name = payload["group_name"]
        # The keys SGLang's init_custom_process_group (utils/common.py:2905) and torch's
        # _new_process_group_helper (group name, then device) put the group's under.
        keys = dist.PrefixStore("cpu/", dist.PrefixStore(f"{name}/", dist.PrefixStore(name, store)))
        self.groups[name] = dist.ProcessGroupGloo(keys, payload["rank_offset"], payload["world_size"],
                                                  timedelta(seconds=60))
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    def destroy_weights_update_group(self, payload: dict) -> dict:
        if payload["group_name"] not in self.groups:  # model_runner_components/weight_updater.py:153
            raise _Refused("The group to be destroyed does not exist.")
        del self.groups[payload["group_name"]]
        return {"success": True, "message": "Succeeded to destroy custom process group."}

    def update_weights_from_distributed(self, payload: dict) -> dict:
        import torch.distributed as dist

        if self.session is None:  # weight_updater.py:192
            raise _Refused("update_weights_from_distributed must run between begin_weight_update() and "
                           "end_weight_update()")
        group = self.groups[payload["group_name"]]
        named = []
        for name, dtype, shape in zip(payload["names"], payload["dtypes"], payload["shapes"]):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype))
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            group.broadcast([tensor], opts).wait()
            named.append((name, tensor))
        self._load(named, "update_weights_from_distributed")
        self.session["loaded"] = True
        return self._flush_after_update(payload, {"success": True, "message": "Succeeded to update parameter online."})

    def _flush_after_update(self, payload: dict, result: dict) -> dict:
        # weight_updater.py:120: flush_cache defaults to True (io_struct.py:1990), without emptying
        # the allocator (torch_empty_cache False); refused, it fails the update call.
        if not payload.get("flush_cache", True):
            return result
        if not self._idle():
            return {"success": False, "message": "Weights were updated, but the cache was not flushed because "
                    "requests are still running or queued. Retract or finish them, then call /flush_cache."}
        self.flushes.append("update")
        return result

    def flush_cache(self, payload: dict) -> str:
        if not self._idle():  # scheduler.py:5520, answered 400 by http_server.py:1037
            raise _Refused("Cache not flushed because there are pending requests.")
        self.flushes.append("flush_cache+empty_cache")  # scheduler.py:5533: empty_cache=True
        return "Cache flushed."

    def update_weight_version(self, payload: dict) -> dict:
        if payload.get("abort_all_requests"):
            self._abort_all()
        self.weight_version = payload["new_version"]
        return {"success": True, "message": f"Weight version updated to {payload['new_version']}"}

    def pause_generation(self, payload: dict) -> dict:
        mode = payload.get("mode", "abort")  # io_struct.py:1945
        self.paused = mode
        if mode == "abort":  # tokenizer_manager.py:2271: aborts everything in flight
            self._abort_all()
        return {"message": "Generation paused successfully.", "status": "ok"}

    def continue_generation(self, payload: dict) -> dict:
        self.paused = None
        return {"message": "Generation continued successfully.", "status": "ok"}

    def abort_request(self, payload: dict) -> str:
        if payload.get("abort_all"):
            self._abort_all()
        elif payload.get("rid") and self.decoder is not None:
            self.decoder.abort_rid(payload["rid"])
        return ""  # http_server.py:1723: an empty 200

    def _abort_all(self) -> None:
        self.aborted += 1
        if self.decoder is not None:
            self.decoder.abort()

    def dispatch(self, path: str, payload: dict):
        if path == "/generate":
            return self.generate(payload)  # takes the lock itself: it waits while others run
        control = path.lstrip("/")
        if control not in _CONTROL:
            raise _Refused(f"the double does not serve {path}")
        with self.cond:
            try:
                return getattr(self, control)(payload)
            finally:
                self.cond.notify_all()


_CONTROL = {"release_memory_occupation", "resume_memory_occupation", "begin_weight_update", "end_weight_update",
            "update_weights_from_tensor", "update_weights_from_disk", "init_weights_update_group",
            "destroy_weights_update_group", "update_weights_from_distributed", "flush_cache", "update_weight_version",
            "pause_generation", "continue_generation", "abort_request"}


def _rids(rid, single: bool, batch: int, n: int) -> list[str]:
    """The scheduler's request ids, one per output (io_struct.py:759 _normalize_rid)."""
    if n > 1:  # tokenizer_manager.py:2171: each sample gets a fresh id, so the caller's rid aborts nothing
        return [uuid.uuid4().hex for _ in range(batch * n)]
    if rid is None:
        return [uuid.uuid4().hex for _ in range(batch)]
    if isinstance(rid, str):
        return [rid] if single else [f"{rid}_{i}" for i in range(batch)]
    if len(rid) != batch:
        raise _Refused("The specified rids length mismatch with the batch_size for batch processing.")
    return list(rid)


def weights_fingerprint(weights: dict[str, torch.Tensor], vocab_size: int) -> int:
    """The token the double's greedy output starts from: any change of weights moves it."""
    total = sum(float(t.double().abs().sum()) * (i + 1) for i, (_, t) in enumerate(sorted(weights.items())))
    return int(total * 1000) % vocab_size


class _Crash(Exception):
    pass


class _GPUFault(_Crash):
    def __init__(self, what: str):
        super().__init__(f"GPU fault: {what} (SGLang does not check this; on a GPU the memory is unmapped)")


def _outputs(prompts, tokens, version: str, finish: str, single: bool):
    outs = [{"output_ids": t, "meta_info": {"finish_reason": {"type": finish}, "weight_version": version,
                                            "output_token_logprobs": [[-0.5, tok, None] for tok in t]}}
            for t in (tokens or [[] for _ in prompts])]
    return outs[0] if single else outs


class _Handler(BaseHTTPRequestHandler):
    double: SGLangDouble

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(200, {})
        elif self.path == "/model_info":  # http_server.py:812: reports the stamped weight version
            self._reply(200, {"weight_version": self.double.weight_version})
        elif self.path in ("/get_server_info", "/server_info"):
            self._reply(200, self.double.server_info())
        else:
            self._handle({})
            return
        self.double.after_call(self.path)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._handle(json.loads(self.rfile.read(length) or b"{}") if length else {})

    def _handle(self, payload: dict) -> None:
        double = self.double
        if double.api_key and self.headers.get("Authorization") != f"Bearer {double.api_key}":
            self._reply(401, {"error": "Unauthorized"})
            return
        double.calls.append(self.path)
        if self.path in ("/release_memory_occupation", "/resume_memory_occupation"):
            double.memory_calls.append((self.path.strip("/"), payload.get("tags")))
        try:
            result = double.dispatch(self.path.split("?")[0], payload)
        except _Refused as err:
            self._reply(400, {"success": False, "message": str(err)})
            return
        except _Crash as err:
            double._crash(str(err))
            self.close_connection = True  # the process is gone: the caller sees a dropped connection
            return
        self._reply(200, result)
        double.after_call(self.path)

    def _reply(self, code: int, body) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
