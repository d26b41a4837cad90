"""The trainer's device memory between phases (colocated placement): off for the rollout, back for training.

The unit is the storage, not the tensor. Megatron's DDP keeps every parameter (with the distributed
optimizer) and every ``main_grad`` as a view into one flat buffer per dtype, and the optimizer keeps
fp32 main params and its moments. Resizing a storage to 0 bytes frees its device memory while every
tensor object and view over it stays valid: onload re-grows the same storages, so nothing Megatron
holds (bucket views, optimizer param groups, state keys) goes stale. Megatron 0.19.2's own
``offload_grad_buffers`` frees grads the same way.

- kept: model parameters and buffers, the optimizer's params and state. Copied to a host buffer
  (pinned when the device is a GPU; allocated at the first offload, reused after), then freed;
  onload copies them back bit for bit.
- dropped: gradients (DDP grad buffers, the main params' ``.grad``). Every step zeroes them before
  its first backward, so between phases they hold nothing: freed without a copy (no host RAM, no
  PCIe traffic), back as zeros.

Touching an offloaded tensor is undefined (a segfault on CPU): the actor refuses to compute while
offloaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


@dataclass
class OffloadStats:
    seconds: float
    kept_bytes: int  # copied device -> host (offload) or host -> device (onload)
    dropped_bytes: int  # gradient bytes freed without a copy, or re-created as zeros
    device_bytes: int  # bytes the tracked storages hold on the device afterwards


@dataclass
class _Entry:
    storage: torch.UntypedStorage
    nbytes: int
    keep: bool


def inner_optimizers(optimizer) -> Iterator[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron optimizer (chained or not), whatever their class."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "optimizer", None) is not None:
            yield opt.optimizer


def _bytes_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Offloader:
    """offload() / onload() of one rank's model chunks (the modules DDP wraps) and Megatron optimizer."""

    def __init__(self, chunks: list, optimizer, device: torch.device):
        self.chunks, self.optimizer, self.device = chunks, optimizer, device
        self.offloaded = False
        self._entries: list[_Entry] = []
        self._host: dict[int, torch.Tensor] = {}  # storage identity -> its host copy

    def _collect(self) -> list[_Entry]:
        """Every device storage behind the weights, grads and optimizer, once each (views share one)."""
        found: dict[int, _Entry] = {}

        def add(tensor: Optional[torch.Tensor], keep: bool) -> None:
            if not isinstance(tensor, torch.Tensor) or tensor.device != self.device:
                return
            storage = tensor.untyped_storage()
            if storage.nbytes() == 0:
                return
            # _cdata identifies the StorageImpl itself, stable across resizes (data_ptr is not).
            entry = found.setdefault(storage._cdata, _Entry(storage, storage.nbytes(), keep))
            entry.keep = entry.keep or keep

        for chunk in self.chunks:
            for param in chunk.parameters():
                add(param, keep=True)
                add(getattr(param, "main_grad", None), keep=False)
                add(param.grad, keep=False)
            for buffer in chunk.buffers():
                add(buffer, keep=True)
        # Optimizer state appears at the first step, so the walk is redone at every offload.
        for inner in inner_optimizers(self.optimizer):
            for group in inner.param_groups:
                for param in group["params"]:
                    add(param, keep=True)
                    add(param.grad, keep=False)
            for state in inner.state.values():
                for value in state.values():
                    add(value, keep=True)
        return list(found.values())

    def _host_buffer(self, entry: _Entry) -> torch.Tensor:
        key = entry.storage._cdata
        host = self._host.get(key)
        if host is None or host.numel() != entry.nbytes:
            host = torch.empty(entry.nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            self._host[key] = host
        return host

    def device_bytes(self) -> int:
        """Bytes the weights, grads and optimizer state hold on the device now."""
        return sum(e.storage.nbytes() for e in (self._entries if self.offloaded else self._collect()))

    def offload(self) -> OffloadStats:
        if self.offloaded:
            raise RuntimeError("Offloader.offload: already offloaded; call onload() first")
        start = time.perf_counter()
        entries = self._collect()
        live = {e.storage._cdata for e in entries if e.keep}
        self._host = {k: v for k, v in self._host.items() if k in live}  # storages gone since: drop their copies
        for entry in entries:
            if entry.keep:
                self._host_buffer(entry).copy_(_bytes_view(entry.storage), non_blocking=True)
        _sync(self.device)  # the host copies are complete before their source is freed
        for entry in entries:
            entry.storage.resize_(0)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks back to the driver, for the rollout engine
        self._entries, self.offloaded = entries, True
        return self._stats(start)

    def onload(self) -> OffloadStats:
        if not self.offloaded:
            raise RuntimeError("Offloader.onload: not offloaded")
        start = time.perf_counter()
        for entry in self._entries:
            entry.storage.resize_(entry.nbytes)
            view = _bytes_view(entry.storage)
            if entry.keep:
                view.copy_(self._host[entry.storage._cdata], non_blocking=True)
            else:
                view.zero_()
        _sync(self.device)
        self.offloaded = False
        return self._stats(start)

    def _stats(self, start: float) -> OffloadStats:
        return OffloadStats(
            seconds=time.perf_counter() - start,
            kept_bytes=sum(e.nbytes for e in self._entries if e.keep),
            dropped_bytes=sum(e.nbytes for e in self._entries if not e.keep),
            device_bytes=sum(e.storage.nbytes() for e in self._entries),
        )

    @property
    def host_bytes(self) -> int:
        """Host RAM the copies hold (kept between cycles)."""
        return sum(h.numel() for h in self._host.values())
