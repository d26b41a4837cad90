"""Hugging Face checkpoints on disk: safetensors shards + config.json, written atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

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

    def read(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: no tensor named {name!r} in the checkpoint")
        fname = self.weight_map[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(self.dir / fname, framework="pt")
        return self._handles[fname].get_tensor(name)

    def arch(self) -> ModelArch:
        return ModelArch.from_hf_config(self.dir / "config.json")


def write_hf_checkpoint(
    directory: str | Path,
    buckets: Iterable[list[tuple[str, torch.Tensor]]],
    arch: ModelArch,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write buckets as numbered safetensors shards + index + config.json; atomic via rename."""
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
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
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
