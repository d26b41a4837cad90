"""Ship the bridge's HF-named buckets into running SGLang servers, three ways behind one interface.

- ``tensor``: ``/update_weights_from_tensor`` between ``/begin_weight_update`` and
  ``/end_weight_update``. Tensors travel as torch multiprocessing handles: CUDA IPC on a GPU
  (colocated: no copy leaves the device), shared memory on a CPU.
- ``disk``: safetensors snapshot + ``/update_weights_from_disk``; the fallback that works anywhere,
  and the snapshot a restarted server starts from.
- ``distributed``: ``/init_weights_update_group`` once, then per tensor
  ``/update_weights_from_distributed`` while the trainer broadcasts it over NCCL (disaggregated
  placement: engines on other nodes). Backend is config, so gloo runs it on a CPU.

Every update carries the weight version; SGLang stamps it on each later sample's meta_info.
"""

from __future__ import annotations

import base64
import io
import logging
import shutil
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch

from megatron_fipo.bridge.hf_io import write_hf_checkpoint
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.rollout.sglang_http import SGLangError
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


def serialize_named_tensors(named: Bucket) -> str:
    """SGLang's wire format for update_weights_from_tensor: base64 of a ForkingPickler dump.

    ForkingPickler turns each tensor into a handle (CUDA IPC or a shared-memory file) rather than
    its bytes; the server rebuilds the tensor from it. On CUDA, SGLang's own reduction patch names
    devices by UUID so the handle resolves in a process that numbers GPUs differently.
    """
    import torch.multiprocessing as mp
    from multiprocessing.reduction import ForkingPickler

    if any(t.is_cuda for _, t in named):
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions  # GPU nodes run SGLang's env

        monkey_patch_torch_reductions()
    else:
        # File descriptors cannot cross an HTTP request; named shared-memory files can.
        mp.set_sharing_strategy("file_system")
    buf = io.BytesIO()
    ForkingPickler(buf).dump(named)
    return base64.b64encode(buf.getvalue()).decode()


class WeightTransport(Protocol):
    def push(self, servers: list[SGLangServer], buckets: Iterable[Bucket], version: int) -> None:
        """Load every bucket into every server; later samples carry ``version``."""


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
        with _update_session(servers):
            for bucket in buckets:
                payload = serialize_named_tensors(bucket)
                each_server(servers, lambda s: s.http.post("/update_weights_from_tensor", {
                    # One entry per TP rank of the server: each rank rebuilds its own handle.
                    "serialized_named_tensors": [payload] * s.cfg.tp_size,
                    "flush_cache": False,
                }))
        set_version(servers, version)


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
            "model_path": str(path.resolve()), "weight_version": str(version)}))


class DistributedTransport:
    """Trainer rank 0 is rank 0 of a group whose other ranks are every TP rank of every server."""

    def __init__(self, master_address: str, master_port: int, backend: str, group_name: str = "megatron_fipo"):
        self.master_address, self.master_port, self.backend = master_address, master_port, backend
        self.group_name = group_name
        self.group = None

    def _connect(self, servers: list[SGLangServer]) -> None:
        from torch.distributed.distributed_c10d import _new_process_group_helper, _world, PrefixStore, rendezvous

        world_size = 1 + sum(s.cfg.tp_size for s in servers)
        offsets = [1 + sum(s.cfg.tp_size for s in servers[:i]) for i in range(len(servers))]
        with ThreadPoolExecutor(max_workers=len(servers) + 1) as pool:
            calls = [pool.submit(s.http.post, "/init_weights_update_group", {
                "master_address": self.master_address, "master_port": self.master_port, "rank_offset": off,
                "world_size": world_size, "group_name": self.group_name, "backend": self.backend})
                for s, off in zip(servers, offsets)]
            # A group outside the trainer's default world: its own store, rank 0 here.
            store, _, _ = next(rendezvous(f"tcp://{self.master_address}:{self.master_port}", 0, world_size,
                                          timeout=timedelta(minutes=10)))
            self.group, _ = _new_process_group_helper(world_size, 0, [], self.backend, PrefixStore(self.group_name, store),
                                                     group_name=self.group_name, timeout=timedelta(minutes=10))
            _world.pg_group_ranks[self.group] = {i: i for i in range(world_size)}
            _raise_failed("init_weights_update_group", [c.result() for c in calls])

    def push(self, servers: list[SGLangServer], buckets: Iterable[Bucket], version: int) -> None:
        import torch.distributed as dist

        if self.group is None:
            self._connect(servers)
        with _update_session(servers), ThreadPoolExecutor(max_workers=len(servers)) as pool:
            for bucket in buckets:
                calls = [pool.submit(s.http.post, "/update_weights_from_distributed", {
                    "names": [n for n, _ in bucket], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                    "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                    "flush_cache": False}) for s in servers]
                # A request refused up front would leave the broadcast waiting for receivers forever.
                wait(calls, timeout=0.5, return_when=FIRST_COMPLETED)
                _raise_failed("update_weights_from_distributed", [c.result() for c in calls if c.done()])
                for _, tensor in bucket:
                    dist.broadcast(tensor.contiguous(), src=0, group=self.group)
                _raise_failed("update_weights_from_distributed", [c.result() for c in calls])
        set_version(servers, version)


def _raise_failed(what: str, results: list[dict]) -> None:
    for result in results:
        if result.get("success") is False:
            raise SGLangError(f"{what}: {result.get('message')}")


def set_version(servers: list[SGLangServer], version: int) -> None:
    each_server(servers, lambda s: s.http.post("/update_weight_version", {"new_version": str(version),
                                                                          "abort_all_requests": False}))
