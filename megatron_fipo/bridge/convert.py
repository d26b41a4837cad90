"""Checkpoint conversion: HF safetensors directory <-> Megatron dist checkpoint, at any TP/PP.

Run with TP x PP ranks (torchrun; a single process for TP = PP = 1). Each rank builds only its own
model shard. HF -> Megatron: every rank reads only its chunks of the HF tensors it needs, one
parameter at a time, and the ranks write one dist checkpoint together: the model part of the
trainer's checkpoints, loadable at any TP/PP (``actor.load_megatron``). The source's config.json and
tokenizer files go along in ``hf_config/``. Megatron -> HF: the ranks load the dist checkpoint, and
the weight bridge gathers full tensors to rank 0, which writes size-bounded safetensors shards, with the
config.json and tokenizer files of ``--hf-config``, of the checkpoint's ``hf_config/``, or, for a
training run's checkpoints, of the run (its actor.model_config and its tokenizer).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from megatron_fipo.actor.checkpoint import load_model_weights, model_checkpoint_dir, save_model_weights
from megatron_fipo.actor.model import build_model_chunks, transformer_engine_available
from megatron_fipo.actor.parallel import init_process_groups, world_from_env
from megatron_fipo.bridge.hf_io import HFCheckpointReader, hf_side_files, write_hf_checkpoint
from megatron_fipo.bridge.mapping import (
    ParamMapping,
    check_hf_tensors,
    hf_shapes,
    megatron_params,
    megatron_shape,
    shard_shape,
)
from megatron_fipo.bridge.weights import ModelShards, copy_hf_weights, iter_hf_buckets
from megatron_fipo.config import ActorConfig, ParallelConfig, RunConfig
from megatron_fipo.config_base import ConfigError, load_config
from megatron_fipo.data.setup import TRAINED_TOKENIZER
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.progress import progress_bar
from megatron_fipo.validation import validate_parallel

log = logging.getLogger("megatron_fipo")

HF_CONFIG_DIR = "hf_config"  # inside a converted Megatron checkpoint: the HF files other than weights


@dataclass
class ConvertConfig:
    source: str
    target: str = ""  # not needed with dry_run
    to: Literal["megatron", "hf"] = "megatron"
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Dtype of the converted weights; auto: the source's (that of its embedding).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Megatron -> HF: an HF directory with config.json (and tokenizer files); default SOURCE/hf_config.
    hf_config: str = ""
    # Megatron -> HF: safetensors shard size; rank 0 holds at most one shard (plus one tensor).
    shard_mb: float = 2048
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.tensor_model_parallel_size < 1 or self.pipeline_model_parallel_size < 1:
            raise ConfigError("convert: --tp and --pp must be >= 1")
        if self.shard_mb <= 0:
            raise ConfigError("convert: --shard-mb must be > 0")
        if not self.dry_run:
            if not self.target:
                raise ConfigError("convert: give a TARGET directory (or --dry-run)")
            target = Path(self.target)
            if target.exists() and (not target.is_dir() or any(target.iterdir())):
                raise ConfigError(f"convert: target {target} exists and is not empty; remove it or choose another")

    @property
    def training_run(self) -> Optional[RunConfig]:
        """--to hf of RUN_DIR/checkpoints (or a step in it): the run's config, with its paths."""
        source = Path(self.source).resolve()
        for run in (source.parent, source.parent.parent):
            if (run / "config.yaml").is_file() and (run / "checkpoints") in (source, source.parent):
                return load_config(RunConfig, run / "config.yaml", [f"run_dir={run}"])
        return None

    @property
    def hf_dir(self) -> Path:
        """The HF directory that describes the model: the source, the Megatron checkpoint's companion,
        or the model config of the training run whose checkpoints these are."""
        if self.to == "megatron":
            return Path(self.source)
        if self.hf_config:
            return Path(self.hf_config)
        run = None if (Path(self.source) / HF_CONFIG_DIR).is_dir() else self.training_run
        if run is None:
            return Path(self.source) / HF_CONFIG_DIR
        model_config = Path(run.actor.model_config)
        return model_config.parent if model_config.is_file() else model_config

    def export_side_files(self) -> dict[str, bytes]:
        """Files besides the weights for --to hf: the model's config.json and tokenizer files, taken
        from a training run's tokenizer when the model directory has none."""
        files = hf_side_files(self.hf_dir)
        run = None if self.hf_config or any(name.startswith("tokenizer") for name in files) else self.training_run
        if run is None:
            return files
        data = run.data
        if data.tokenizer == "hf":
            tokenizer = {k: v for k, v in hf_side_files(data.tokenizer_path).items() if k != "config.json"}
        else:
            path = Path(data.tokenizer_path) if data.tokenizer_path else Path(run.run_dir) / TRAINED_TOKENIZER
            tokenizer = {"tokenizer.model": path.read_bytes()} if path.is_file() else {}
        return {**files, **tokenizer}


_SPLIT = {
    "replicated": "replicated",
    "column": "dim 0",
    "row": "dim 1",
    "qkv": "dim 0 by query group",
    "gate_up": "dim 0, gate and up each",
}


def _braced(names: tuple[str, ...]) -> str:
    """model.layers.0.self_attn.{q,k,v}_proj.weight for the q, k and v names."""
    if len(names) == 1:
        return names[0]
    head = os.path.commonprefix(names)
    tail = os.path.commonprefix([n[len(head):][::-1] for n in names])[::-1]
    return head + "{" + ",".join(n[len(head): len(n) - len(tail)] for n in names) + "}" + tail


def _stage(mapping: ParamMapping, arch: ModelArch, pp: int) -> int:
    name = mapping.megatron_name
    if name.startswith("embedding."):
        return 0
    if name.startswith("decoder.layers."):
        return int(name.split(".")[2]) // (arch.num_layers // pp)
    return pp - 1


def describe_mapping(arch: ModelArch, tp: int, pp: int, te_spec: bool) -> str:
    """One line per Megatron parameter: PP stage, full and TP-shard shape, how TP splits it, HF tensor(s)."""
    shapes = hf_shapes(arch)
    rows = [("Megatron parameter", "PP stage", "shape", f"TP={tp} shard", "split", "HF tensor(s)", "HF shape(s)")]
    for m in megatron_params(arch, te_spec):
        full = megatron_shape(m, shapes)
        if m.kind == "column":  # the embedding / output layer, rows padded where TP does not divide the vocabulary
            full = (arch.padded_vocab_size(tp), *full[1:])
        rows.append((m.megatron_name, str(_stage(m, arch, pp)), str(list(full)),
                     str(list(shard_shape(full, m.kind, tp))), _SPLIT[m.kind], _braced(m.hf_names),
                     " ".join(str(list(shapes[n])) for n in m.hf_names)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    spec = "Transformer Engine spec" if te_spec else "local spec"
    lines.insert(0, f"{arch.model_type}, {arch.num_layers} layers, TP={tp}, PP={pp}, {spec}; {len(rows) - 1} "
                    f"Megatron parameters <-> {len(shapes)} HF tensors; QKV fused by query group "
                    f"({arch.num_attention_heads // arch.num_kv_heads} q heads + 1 k + 1 v per group)")
    if arch.tie_word_embeddings:
        lines.append("tied embeddings: output_layer.weight is embedding.word_embeddings.weight "
                     f"(a copy on PP stage {pp - 1} when PP > 1); no lm_head.weight")
    return "\n".join(lines)


def convert(cfg: ConvertConfig) -> None:
    """Run one conversion (or print its mapping with ``dry_run``); every rank calls it."""
    rank, world, _ = world_from_env()
    if not (cfg.hf_dir / "config.json").is_file():
        raise ConfigError(f"convert: no config.json in {cfg.hf_dir}; for a checkpoint without {HF_CONFIG_DIR}/ "
                          "pass --hf-config with the HF model directory it was made from")
    arch = ModelArch.from_hf_config(cfg.hf_dir)
    te_spec = transformer_engine_available()
    if cfg.to == "megatron":
        # Names and shapes from the safetensors headers: a mismatch fails before any weight is read.
        reader = HFCheckpointReader(cfg.source)
        check_hf_tensors(reader.shapes(), arch, te_spec)
        source_dtype = reader.dtype("model.embed_tokens.weight")
    else:
        from megatron.core.dist_checkpointing import load_tensors_metadata

        metadata = load_tensors_metadata(str(model_checkpoint_dir(cfg.source)))
        source_dtype = metadata["embedding.word_embeddings.weight"].dtype
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if source_dtype == torch.bfloat16 else "fp32")
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    validate_parallel(par, arch, tp * pp)
    if cfg.dry_run:
        if rank == 0:
            print(describe_mapping(arch, tp, pp, te_spec))
        return
    if world != tp * pp:
        raise ConfigError(f"convert: --tp {tp} x --pp {pp} needs {tp * pp} ranks, but WORLD_SIZE is {world}; "
                          f"run under torchrun --nproc-per-node {tp * pp}")
    model = _build(cfg, arch, par, precision)
    if cfg.to == "megatron":
        _hf_to_megatron(cfg, model, reader, rank == 0)
    else:
        _megatron_to_hf(cfg, model, rank == 0)


def _build(cfg: ConvertConfig, arch: ModelArch, par: ParallelConfig, precision: str) -> ModelShards:
    init_process_groups(par, seed=0)
    actor = ActorConfig(model_config=str(cfg.hf_dir), precision=precision)
    return ModelShards(build_model_chunks(arch, actor, par, initialize=False), arch)


def _hf_to_megatron(cfg: ConvertConfig, model, reader: HFCheckpointReader, is_rank0: bool) -> None:
    n_local = sum(1 for chunk in model.chunks for _ in chunk.parameters())
    bar = progress_bar(is_rank0)
    with bar:
        task = bar.add_task("HF -> Megatron (rank 0's shard)", total=n_local)
        copy_hf_weights(model, reader, on_param=lambda: bar.update(task, advance=1))
    files = {f"{HF_CONFIG_DIR}/{name}": data for name, data in hf_side_files(cfg.hf_dir).items()}
    save_model_weights(model.chunks, cfg.target, files)
    if is_rank0:
        log.info("wrote Megatron checkpoint %s (TP=%d, PP=%d; loads at any TP/PP)", cfg.target,
                 cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size)


def _megatron_to_hf(cfg: ConvertConfig, model, is_rank0: bool) -> None:
    directory = load_model_weights(model.chunks, cfg.source)
    buckets = iter_hf_buckets(model, int(cfg.shard_mb * 2**20))
    if not is_rank0:
        for _ in buckets:  # the gathers need every rank
            pass
        return
    dtype = model.chunks[0].embedding.word_embeddings.weight.dtype  # rank 0 is the first stage
    bar = progress_bar(True)
    with bar:
        task = bar.add_task("Megatron -> HF", total=len(hf_shapes(model.arch)))

        def counted():
            for bucket in buckets:
                bar.update(task, advance=len(bucket))
                # One dtype throughout: Megatron keeps some norms in fp32 whatever the model dtype.
                yield [(name, t.to(dtype)) for name, t in bucket]

        write_hf_checkpoint(cfg.target, counted(), model.arch, extra_files=cfg.export_side_files())
    log.info("wrote HF checkpoint %s from %s", cfg.target, directory)

