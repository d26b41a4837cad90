"""Ship the bridge's HF-named buckets into running SGLang servers, three ways behind one interface.

- ``tensor``: ``/update_weights_from_tensor`` between ``/begin_weight_update`` and
  ``/end_weight_update``. Tensors travel as torch multiprocessing handles: CUDA IPC on a GPU
  (colocated: no copy leaves the device), shared memory on a CPU.
- ``disk``: safetensors snapshot + ``/update_weights_from_disk``; the fallback that works anywhere,
  and the snapshot a restarted server starts from.
- ``distributed``: ``/init_weights_update_group`` once, then per tensor
  ``/update_weights_from_distributed`` while the trainer broadcasts it over NCCL (disaggregated
  placement: engines on other nodes). Backend is config, so gloo runs it on a CPU.

Every update carries the weight version; SGLang stamps it on each later sample's meta_info. The
last load call of an update flushes the server's prefix cache (its KV came from the old weights):
inside the update, SGLang flushes without emptying the device allocator, which its ``/flush_cache``
endpoint also does (``torch.cuda.empty_cache``; on a CPU server a full ``gc.collect`` of the
scheduler, measured at 0.55-0.72 s per sync on the tiny job).
"""

from __future__ import annotations

import base64
import io
import logging
import shutil
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import torch
import torch.multiprocessing as mp  # registers torch's tensor reducers with ForkingPickler

from megatron_fipo.bridge.hf_io import write_hf_checkpoint
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.rollout.sglang_http import SGLangError
from megatron_fipo.rollout.sglang_memory import KV_CACHE
from megatron_fipo.rollout.sglang_server import SGLangServer

log = logging.getLogger("megatron_fipo")
Bucket = list[tuple[str, torch.Tensor]]


def each_server(servers: list[SGLangServer], call: Callable[[SGLangServer], dict]) -> None:
    """Run ``call`` on every server concurrently; raise if any reports failure."""
    with ThreadPoolExecutor(max_workers=max(len(servers), 1)) as pool:
        results = list(pool.map(call, servers))
    for server, result in zip(servers, results):
        if result.get("success") is False:
            raise SGLangError(f"SGLang server {server.index} ({server.url}): {result.get('message')}")


# Position of the storage's device in torch's CUDA reduction (reductions.rebuild_cuda_tensor's arguments).
_CUDA_DEVICE_ARG = 6


class _HandlePickler(ForkingPickler):
    """ForkingPickler whose CUDA handles name their GPU by UUID instead of by index.

    A server process numbers GPUs by its own CUDA_VISIBLE_DEVICES; SGLang's scheduler patches torch's
    rebuild (``monkey_patch_torch_reductions``, called in ``update_weights_from_tensor``) to map a
    UUID string in that argument back to its own index, and passes an int through unchanged. This
    writes the UUID on the sending side without SGLang installed in the trainer's environment.
    """

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            from torch.multiprocessing import reductions

            rebuild, args = reductions.reduce_tensor(obj)
            args = list(args)
            args[_CUDA_DEVICE_ARG] = str(torch.cuda.get_device_properties(args[_CUDA_DEVICE_ARG]).uuid)
            return rebuild, tuple(args)
        return NotImplemented


def serialize_named_tensors(named: Bucket) -> str:
    """SGLang's wire format for update_weights_from_tensor: base64 of a ForkingPickler dump.

    ForkingPickler turns each tensor into a handle (CUDA IPC or a shared-memory file) rather than
    its bytes; the server rebuilds the tensor from it, so the tensors must stay alive until the
    server has answered.
    """
    if not any(t.is_cuda for _, t in named):
        # File descriptors cannot cross an HTTP request; named shared-memory files can.
        mp.set_sharing_strategy("file_system")
    buf = io.BytesIO()
    _HandlePickler(buf).dump(named)
    return base64.b64encode(buf.getvalue()).decode()


class WeightTransport(Protocol):
    def push(self, servers: list[SGLangServer], buckets: Iterable[Bucket], version: int) -> None:
        """Load every bucket into every server; later samples carry ``version``."""

    def server_restarted(self, server: SGLangServer) -> None:
        """``server`` is a new process: forget whatever it held of this transport."""


def _with_last(buckets: Iterable[Bucket]) -> Iterator[tuple[Bucket, bool]]:
    """Each bucket, and whether it is the last (the buckets are produced as they are read). Two are
    alive while one is loaded, as many as while the next one was built before; a caller that drops
    its bucket before asking for the next (``del``) keeps it at that."""
    it = iter(buckets)
    current = next(it, None)
    while current is not None:
        following = next(it, None)
        yield current, following is None
        current = following


def _flushes(server: SGLangServer, last: bool) -> bool:
    """The last load flushes a resident KV cache; a released one was flushed by its release."""
    return last and server.memory.resident(KV_CACHE)


@contextmanager
def _update_session(servers: list[SGLangServer]):
    """SGLang accepts in-place weight loads only inside begin/end_weight_update."""
    each_server(servers, lambda s: s.http.post("/begin_weight_update"))
    try:
        yield
    finally:
        each_server(servers, lambda s: s.http.post("/end_weight_update"))


class TensorTransport:
    def push(self, servers: list[SGLangServer], buckets: Iterable[Bucket], version: int) -> None:
        self.load(servers, buckets)
        set_version(servers, version)

    @staticmethod
    def load(servers: list[SGLangServer], buckets: Iterable[Bucket]) -> None:
        """The tensors of every bucket into every server, without stamping a version."""
        with _update_session(servers):
            for bucket, last in _with_last(buckets):
                each_server(servers, lambda s: s.http.post("/update_weights_from_tensor", {
                    # One dump per TP rank of the server: each rank opens only its own (SGLang's
                    # deserialize_own_rank), since a CUDA-IPC handle counts its consumers.
                    "serialized_named_tensors": [serialize_named_tensors(bucket) for _ in range(s.cfg.tp_size)],
                    "flush_cache": _flushes(s, last),
                }))
                del bucket  # before the next is built (_with_last)

    def server_restarted(self, server: SGLangServer) -> None:
        pass  # nothing persists between pushes


class DiskTransport:
    """Writes ``root/v{version}`` (atomically) and points the servers at it; keeps the newest two."""

    def __init__(self, root: Path, arch: ModelArch):
        self.root, self.arch = root, arch
        self.latest: tuple[Path, int] | None = None  # newest snapshot and its version: where a restart starts

    def write(self, buckets: Iterable[Bucket], version: int) -> Path:
        path = write_hf_checkpoint(self.root / f"v{version}", buckets, self.arch)
        self.latest = (path, version)
        for old in sorted(self.root.glob("v*"), key=lambda p: int(p.name[1:]))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def push(self, servers: list[SGLangServer], buckets: Iterable[Bucket], version: int) -> None:
        path = self.write(buckets, version)
        each_server(servers, lambda s: s.http.post("/update_weights_from_disk", {
            "model_path": str(path.resolve()), "weight_version": str(version), "flush_cache": _flushes(s, True)}))
        _stamped(servers, version)

    def server_restarted(self, server: SGLangServer) -> None:
        pass  # each push names its snapshot


class DistributedTransport:
    """Trainer rank 0 is rank 0 of a group whose other ranks are every TP rank of every server.

    A server that restarts has lost its end of the group, and the others would wait for it in every
    broadcast: the next push forms a new group (a new name, on the next port) with all of them,
    after the survivors and this side have left the old one.
    """

    def __init__(self, master_address: str, master_port: int, backend: str, group_name: str = "megatron_fipo"):
        self.master_address, self.master_port, self.backend = master_address, master_port, backend
        self.base_name = group_name
        self.generation = 0  # groups formed so far
        self.group = None
        self.group_name = ""
        self.stale = False  # a member restarted since the group formed

    def server_restarted(self, server: SGLangServer) -> None:
        self.stale = self.group is not None

    def _connect(self, servers: list[SGLangServer]) -> None:
        from torch.distributed.distributed_c10d import _new_process_group_helper, _world, PrefixStore, rendezvous

        if self.group is not None:
            self._leave(servers)
        # A fresh port per group (the old store may still hold its port), and a name from it: torch
        # refuses a group name it has seen in this process.
        port = self.master_port + self.generation
        self.group_name = f"{self.base_name}-{port}"
        self.generation += 1
        world_size = 1 + sum(s.cfg.tp_size for s in servers)
        offsets = [1 + sum(s.cfg.tp_size for s in servers[:i]) for i in range(len(servers))]
        with ThreadPoolExecutor(max_workers=len(servers) + 1) as pool:
            calls = [pool.submit(s.http.post, "/init_weights_update_group", {
                "master_address": self.master_address, "master_port": port, "rank_offset": off,
                "world_size": world_size, "group_name": self.group_name, "backend": self.backend})
                for s, off in zip(servers, offsets)]
            # A group outside the trainer's default world: its own store, rank 0 here.
            store, _, _ = next(rendezvous(f"tcp://{self.master_address}:{port}", 0, world_size,
                                          timeout=timedelta(minutes=10)))
            self.group, _ = _new_process_group_helper(world_size, 0, [], self.backend, PrefixStore(self.group_name, store),
                                                     group_name=self.group_name, timeout=timedelta(minutes=10))
            _world.pg_group_ranks[self.group] = {i: i for i in range(world_size)}
            _raise_failed("init_weights_update_group", [c.result() for c in calls])
        self.stale = False

    def _leave(self, servers: list[SGLangServer]) -> None:
        """Survivors destroy their end (a restarted server has none: its refusal is expected), then this side."""
        import torch.distributed as dist

        log.warning("re-forming the weight-update group %s: a server restarted since it formed", self.group_name)
        def destroy(server: SGLangServer) -> dict:
            try:
                return server.http.post("/destroy_weights_update_group", {"group_name": self.group_name})
            except SGLangError as err:  # "does not exist": the restarted one
                log.info("%s: %s", server.url, err)
                return {}

        each_server(servers, destroy)
        dist.destroy_process_group(self.group)
        self.group = None

    def push(self, servers: list[SGLangServer], buckets: Iterable[Bucket], version: int) -> None:
        import torch.distributed as dist

        if self.group is None or self.stale:
            self._connect(servers)
        with _update_session(servers), ThreadPoolExecutor(max_workers=len(servers)) as pool:
            for bucket, last in _with_last(buckets):
                calls = [pool.submit(s.http.post, "/update_weights_from_distributed", {
                    "names": [n for n, _ in bucket], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                    "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                    "flush_cache": _flushes(s, last)}) for s in servers]
                # A request refused up front would leave the broadcast waiting for receivers forever.
                wait(calls, timeout=0.5, return_when=FIRST_COMPLETED)
                _raise_failed("update_weights_from_distributed", [c.result() for c in calls if c.done()])
                for _, tensor in bucket:
                    dist.broadcast(tensor.contiguous(), src=0, group=self.group)
                _raise_failed("update_weights_from_distributed", [c.result() for c in calls])
                del bucket  # before the next is built (_with_last)
        set_version(servers, version)


def _raise_failed(what: str, results: list[dict]) -> None:
    for result in results:
        if result.get("success") is False:
            raise SGLangError(f"{what}: {result.get('message')}")


def set_version(servers: list[SGLangServer], version: int) -> None:
    each_server(servers, lambda s: s.http.post("/update_weight_version", {"new_version": str(version),
                                                                          "abort_all_requests": False}))
    _stamped(servers, version)


def _stamped(servers: list[SGLangServer], version: int) -> None:
    """What each server now reports: a server reporting another version has restarted since."""
    for server in servers:
        server.weight_version = str(version)
