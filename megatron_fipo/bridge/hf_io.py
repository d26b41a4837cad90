"""Hugging Face checkpoints on disk: safetensors shards + config.json, written atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_fipo.model_arch import ModelArch


class HFCheckpointReader:
    """Reads one tensor at a time from a directory of safetensors files (indexed or single)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {self.dir}")
            self.weight_map = {}
            for f in files:
                with safe_open(f, framework="pt") as fh:
                    self.weight_map.update({k: f.name for k in fh.keys()})
        self._handles: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: no tensor named {name!r} in the checkpoint")
        fname = self.weight_map[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(self.dir / fname, framework="pt")
        return self._handles[fname]

    def read(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def read_shard(self, name: str, dim: Optional[int], rank: int, parts: int) -> torch.Tensor:
        """Chunk ``rank`` of ``parts`` along ``dim`` (the whole tensor for None), reading only that chunk."""
        if dim is None or parts == 1:
            return self.read(name)
        tensor = self._handle(name).get_slice(name)
        size = tensor.get_shape()[dim]
        if size % parts:
            raise ValueError(f"{self.dir}: {name} has size {size} along dim {dim}, not divisible into {parts} shards")
        step = size // parts
        return tensor[(slice(None),) * dim + (slice(rank * step, (rank + 1) * step),)]

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's dtype, from the safetensors header."""
        code = self._handle(name).get_slice(name).get_dtype()
        return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(code, torch.float32)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the safetensors headers: no weights are read."""
        return {name: tuple(self._handle(name).get_slice(name).get_shape()) for name in self.weight_map}

    def arch(self) -> ModelArch:
        return ModelArch.from_hf_config(self.dir / "config.json")


def write_hf_checkpoint(
    directory: str | Path,
    buckets: Iterable[list[tuple[str, torch.Tensor]]],
    arch: ModelArch,
    extra_files: dict[str, str | bytes] | None = None,
) -> Path:
    """Write buckets as numbered safetensors shards + index + config.json; atomic via rename.

    ``extra_files`` are written last, so an original config.json among them replaces the generated one.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        weight_map, total = {}, 0
        for i, bucket in enumerate(buckets):
            fname = f"model-{i + 1:05d}.safetensors"
            tensors = {name: t.detach().cpu().contiguous() for name, t in bucket}
            save_file(tensors, tmp / fname, metadata={"format": "pt"})
            weight_map.update({name: fname for name in tensors})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(arch.to_hf_config(), indent=2))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        _normal_modes(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _normal_modes(directory: Path) -> None:
    """Modes as a plain mkdir and open() would give: mkdtemp makes the directory 0700 and safetensors
    writes its files 0600, which leaves an exported model unreadable to everyone else."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def hf_side_files(directory: str | Path) -> dict[str, bytes]:
    """Every top-level file of an HF checkpoint but its weights: config.json, tokenizer, generation config."""
    weights = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith(weights)}
