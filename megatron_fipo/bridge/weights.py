"""Move weights between a running Megatron model and HF-named full tensors.

``load_hf_weights`` reads this rank's chunk of each HF tensor and builds its shard (streaming, one
parameter at a time). ``iter_hf_buckets`` gathers TP shards and collects PP stages into full HF
tensors, delivered to global rank 0 in size-bounded buckets: no rank ever holds more than one
bucket plus one parameter.

Both take the actor, or ``ModelShards`` (model chunks without an optimizer, as checkpoint
conversion builds them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol

import torch
import torch.distributed as dist

from megatron_fipo.bridge.mapping import (
    ParamMapping,
    from_megatron_shards,
    hf_shapes,
    map_param,
    padded_vocab_shard,
    split_dim,
    to_megatron_shard,
)
from megatron_fipo.model_arch import ModelArch

SINK_RANK = 0  # global rank 0 is TP 0, PP 0, DP 0 in Megatron's rank order


def layer_offset(chunk) -> int:
    layers = getattr(chunk.decoder, "layers", [])
    return layers[0].layer_number - 1 if len(layers) else 0


def _local_mappings(actor) -> list[tuple[ParamMapping, torch.nn.Parameter]]:
    out = []
    for chunk in actor.chunks:
        offset = layer_offset(chunk)
        for name, param in chunk.named_parameters():
            mapping = map_param(name, offset, actor.arch)
            if name == "output_layer.weight" and actor.arch.tie_word_embeddings:
                continue  # the last stage's copy of the tied embedding
            out.append((mapping, param))
    return out


class HFShardSource(Protocol):
    def read_shard(self, name: str, dim: Optional[int], rank: int, parts: int) -> torch.Tensor:
        """Chunk ``rank`` of ``parts`` of HF tensor ``name`` along ``dim`` (all of it for None)."""
        ...


@dataclass
class ModelShards:
    """This rank's model chunks and architecture, without an optimizer."""

    chunks: list
    arch: ModelArch

    @property
    def ps(self):
        from megatron.core import parallel_state

        return parallel_state


@torch.no_grad()
def copy_hf_weights(model, source: HFShardSource, on_param: Callable[[], None] = lambda: None) -> None:
    """Set every local parameter from HF tensors, reading only this TP rank's chunk of each.

    A shape mismatch raises ValueError naming both sides. ``on_param`` runs after each parameter.
    """
    ps = model.ps
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for chunk in model.chunks:
        offset = layer_offset(chunk)
        for name, param in chunk.named_parameters():
            mapping = map_param(name, offset, model.arch)
            dim = split_dim(mapping.kind)
            if mapping.kind == "column" and model.arch.padded_vocab_size(tp_size) != model.arch.vocab_size:
                # TP does not divide the vocabulary: read it whole (one tensor) and pad before splitting.
                value = padded_vocab_shard(source.read_shard(mapping.hf_names[0], None, 0, 1), model.arch, tp_rank,
                                           tp_size)
            else:
                value = to_megatron_shard(mapping, [source.read_shard(n, dim, tp_rank, tp_size)
                                                    for n in mapping.hf_names], model.arch)
            if value.shape != param.shape:
                raise ValueError(
                    f"shape mismatch: HF {', '.join(mapping.hf_names)} gives {tuple(value.shape)} for TP rank "
                    f"{tp_rank}/{tp_size}, Megatron {name} is {tuple(param.shape)}"
                )
            param.copy_(value)
            on_param()


def load_hf_weights(actor, source: HFShardSource) -> None:
    """``copy_hf_weights`` into the actor, then into the optimizer's own (fp32 / sharded) copy."""
    copy_hf_weights(actor, source)
    actor.optimizer.reload_model_params()


@dataclass
class _Entry:
    stage: int
    index: int
    hf_names: tuple[str, ...]


@torch.no_grad()
def iter_hf_buckets(actor, bucket_bytes: int,
                    sink_ranks: frozenset[int] = frozenset({SINK_RANK})) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (hf_name, full tensor) on each of ``sink_ranks``, each at most ~bucket_bytes.

    A sink is the first rank (TP 0, PP 0) of its model replica; global rank 0 by default, every
    node's first rank for the per-node handoff (rollout/sglang_handoff.py). Every rank must iterate
    it to the end (it runs the gathers); ranks other than the sinks get nothing. Replicas without a
    sink, and context-parallel ranks other than 0, return at once: their weights are identical.
    """
    ps = actor.ps
    rank = dist.get_rank() if dist.is_initialized() else 0
    sink = min(dist.get_process_group_ranks(ps.get_model_parallel_group())) if dist.is_initialized() else 0
    if sink not in sink_ranks or ps.get_context_parallel_rank() != 0:
        return
    arch: ModelArch = actor.arch
    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    tp_size, pp_size = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp_size > 1 else [dist.get_rank() if dist.is_initialized() else 0]
    is_sink = rank == sink

    local = _local_mappings(actor)
    entries = [_Entry(pp_rank, i, m.hf_names) for i, (m, _) in enumerate(local)]
    if pp_size > 1:
        gathered: list = [None] * pp_size
        dist.all_gather_object(gathered, entries, group=pp_group)
        entries = [e for stage in gathered for e in stage]

    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for entry in entries:
        tensors = None
        if entry.stage == pp_rank:
            mapping, param = local[entry.index]
            shard = param.detach()
            if tp_size > 1 and mapping.kind != "replicated":
                shards = [torch.empty_like(shard) for _ in range(tp_size)]
                dist.all_gather(shards, shard.contiguous(), group=tp_group)
            else:
                shards = [shard]
            if tp_rank == 0:
                tensors = [t.contiguous() for t in from_megatron_shards(mapping, shards, arch)]
        if entry.stage != 0 and tp_rank == 0:
            # Stage entry.stage's TP-0 rank sends to the sink on stage 0 (same TP rank 0).
            src = pp_ranks[entry.stage]
            if entry.stage == pp_rank:
                for t in tensors:
                    dist.send(t, dst=pp_ranks[0])
            elif is_sink:
                shapes = [hf_shapes(arch)[n] for n in entry.hf_names]
                tensors = [torch.empty(s, dtype=local[0][1].dtype, device=local[0][1].device) for s in shapes]
                for t in tensors:
                    dist.recv(t, src=src)
        if is_sink:
            for name, t in zip(entry.hf_names, tensors):
                bucket.append((name, t))
                size += t.numel() * t.element_size()
            if size >= bucket_bytes:
                yield bucket
                bucket, size = [], 0
    if is_sink and bucket:
        yield bucket
