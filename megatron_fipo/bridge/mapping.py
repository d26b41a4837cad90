"""Parameter mapping between Megatron-Core GPTModel and Hugging Face Qwen2 / Qwen3 / Llama checkpoints.

Pure tensor logic, no process groups: how one Megatron parameter corresponds to one or more HF
tensors, how this TP rank's slices of the HF tensors form its shard, how the shards of all TP
ranks are joined back, and whether an HF checkpoint fits the model at all.

Megatron fuses q/k/v into ``linear_qkv`` interleaved by query group: for each KV group, its
``heads / groups`` query heads, then its key head, then its value head. ``linear_fc1`` holds
[gate; up], and under TP every rank holds [gate shard; up shard]. Every width inside the fused
QKV is a multiple of ``head_dim``, which need not be hidden / heads (Qwen3). Qwen3's per-head q/k
RMSNorm weights are ``q_layernorm`` / ``k_layernorm``, replicated across TP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from megatron_fipo.model_arch import ModelArch

Kind = Literal["replicated", "column", "row", "qkv", "gate_up"]

# Megatron suffix within decoder.layers.{i}. -> (HF suffixes within model.layers.{i}., kind).
# Both the local spec and the Transformer Engine spec (which fuses the norms into the linears).
_LAYER = {
    "input_layernorm.weight": (("input_layernorm.weight",), "replicated"),
    "self_attention.linear_qkv.layer_norm_weight": (("input_layernorm.weight",), "replicated"),
    "self_attention.linear_qkv.weight": (("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
    "self_attention.linear_qkv.bias": (("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv"),
    "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight",), "replicated"),
    "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight",), "replicated"),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), "row"),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), "replicated"),
    "mlp.linear_fc1.layer_norm_weight": (("post_attention_layernorm.weight",), "replicated"),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), "row"),
}
_TOP = {
    "embedding.word_embeddings.weight": (("model.embed_tokens.weight",), "column"),
    "decoder.final_layernorm.weight": (("model.norm.weight",), "replicated"),
    "output_layer.weight": (("lm_head.weight",), "column"),
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ParamMapping:
    megatron_name: str  # as in this rank's GPTModel (local layer index)
    hf_names: tuple[str, ...]  # global layer index
    kind: Kind


def map_param(megatron_name: str, layer_offset: int, arch: ModelArch) -> ParamMapping:
    """The HF tensors behind one Megatron parameter; layer_offset is this stage's first global layer."""
    match = _LAYER_RE.match(megatron_name)
    if match:
        local, suffix = int(match.group(1)), match.group(2)
        if suffix not in _LAYER:
            raise KeyError(f"no HF mapping for Megatron parameter {megatron_name!r}")
        hf_suffixes, kind = _LAYER[suffix]
        prefix = f"model.layers.{local + layer_offset}."
        return ParamMapping(megatron_name, tuple(prefix + s for s in hf_suffixes), kind)
    if megatron_name not in _TOP:
        raise KeyError(f"no HF mapping for Megatron parameter {megatron_name!r}")
    hf_names, kind = _TOP[megatron_name]
    if megatron_name == "output_layer.weight" and arch.tie_word_embeddings:
        hf_names = ("model.embed_tokens.weight",)  # a copy of the embedding on the last stage
    return ParamMapping(megatron_name, hf_names, kind)


def hf_names(arch: ModelArch) -> list[str]:
    """Every tensor name of the HF checkpoint, in checkpoint order."""
    names = ["model.embed_tokens.weight"]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                  p + "self_attn.v_proj.weight"]
        if arch.qkv_bias:
            names += [p + "self_attn.q_proj.bias", p + "self_attn.k_proj.bias", p + "self_attn.v_proj.bias"]
        if arch.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        names += [p + "self_attn.o_proj.weight", p + "post_attention_layernorm.weight", p + "mlp.gate_proj.weight",
                  p + "mlp.up_proj.weight", p + "mlp.down_proj.weight"]
    names.append("model.norm.weight")
    if not arch.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def hf_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    h, d, ffn = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    q, kv = arch.num_attention_heads * d, arch.num_kv_heads * d
    by_suffix = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
        "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (ffn, h), "mlp.up_proj.weight": (ffn, h),
        "mlp.down_proj.weight": (h, ffn),
    }
    out = {}
    for name in hf_names(arch):
        if name.startswith("model.layers."):
            out[name] = by_suffix[name.split(".", 3)[3]]
        elif name == "model.norm.weight":
            out[name] = (h,)
        else:
            out[name] = (arch.vocab_size, h)
    return out


def _qkv_groups(arch: ModelArch) -> tuple[int, int]:
    return arch.num_kv_heads, arch.num_attention_heads // arch.num_kv_heads


def split_dim(kind: Kind) -> Optional[int]:
    """The dim TP splits, the same on the Megatron parameter and on each of its HF tensors."""
    return {"replicated": None, "row": 1}.get(kind, 0)


def to_megatron_shard(mapping: ParamMapping, hf: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """This TP rank's chunk of each HF tensor (along ``split_dim``) -> its Megatron parameter value.

    Chunking the HF tensors first is exact for every kind, so a rank never needs the full tensor:
    rank r's fused QKV rows are the q, k and v rows of its own query groups, and its fc1 rows are
    its gate chunk followed by its up chunk.
    """
    if mapping.kind == "gate_up":
        return torch.cat(hf, dim=0)
    if mapping.kind == "qkv":
        _, q_per = _qkv_groups(arch)
        q, k, v = hf
        trailing = q.shape[1:]
        return torch.cat([
            q.reshape(-1, q_per * arch.head_dim, *trailing),
            k.reshape(-1, arch.head_dim, *trailing),
            v.reshape(-1, arch.head_dim, *trailing),
        ], dim=1).reshape(-1, *trailing)
    return hf[0]


def padded_vocab_shard(full: torch.Tensor, arch: ModelArch, tp_rank: int, tp_size: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s rows of a full HF embedding / lm_head, zero rows appended to the padded vocabulary."""
    padded = arch.padded_vocab_size(tp_size)
    full = torch.cat([full, full.new_zeros(padded - full.shape[0], *full.shape[1:])])
    return full.chunk(tp_size)[tp_rank]


def from_megatron_shards(mapping: ParamMapping, shards: list[torch.Tensor], arch: ModelArch) -> list[torch.Tensor]:
    """The Megatron parameter's shards of all TP ranks (in rank order) -> full HF tensor(s)."""
    kind = mapping.kind
    if kind == "replicated":
        return [shards[0]]
    if kind == "column":  # the embedding or output layer: drop the rows that pad the vocabulary for TP
        return [torch.cat(shards, dim=0)[: arch.vocab_size]]
    if kind == "row":
        return [torch.cat(shards, dim=1)]
    if kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([g for g, _ in halves], dim=0), torch.cat([u for _, u in halves], dim=0)]
    groups, q_per = _qkv_groups(arch)
    trailing = shards[0].shape[1:]
    fused = torch.cat([s.reshape(-1, (q_per + 2) * arch.head_dim, *trailing) for s in shards], dim=0)
    q, k, v = fused.split([q_per * arch.head_dim, arch.head_dim, arch.head_dim], dim=1)
    return [q.reshape(groups * q_per * arch.head_dim, *trailing), k.reshape(groups * arch.head_dim, *trailing),
            v.reshape(groups * arch.head_dim, *trailing)]


# The local spec keeps the layer norms as modules; the Transformer Engine spec fuses them into the linears.
_SPEC_ONLY = {
    False: ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"),
    True: ("input_layernorm.weight", "pre_mlp_layernorm.weight"),
}


def megatron_params(arch: ModelArch, te_spec: bool) -> list[ParamMapping]:
    """Every parameter of the whole (unsplit) GPTModel, global layer index, with its HF tensors.

    A tied output layer is left out: it is the embedding (a copy on the last stage under PP).
    """
    absent = set(_SPEC_ONLY[te_spec])
    if not arch.qkv_bias:
        absent.add("self_attention.linear_qkv.bias")
    if not arch.qk_norm:
        absent |= {"self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"}
    suffixes = [s for s in _LAYER if s not in absent]
    names = ["embedding.word_embeddings.weight"]
    names += [f"decoder.layers.{i}.{s}" for i in range(arch.num_layers) for s in suffixes]
    names.append("decoder.final_layernorm.weight")
    if not arch.tie_word_embeddings:
        names.append("output_layer.weight")
    return [map_param(n, 0, arch) for n in names]


def megatron_shape(mapping: ParamMapping, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Full shape of a Megatron parameter, given the HF shapes: fused tensors stack along dim 0."""
    parts = [shapes[n] for n in mapping.hf_names]
    return (sum(p[0] for p in parts), *parts[0][1:])


def shard_shape(shape: tuple[int, ...], kind: Kind, tp_size: int) -> tuple[int, ...]:
    dim = split_dim(kind)
    if dim is None:
        return shape
    return tuple(n // tp_size if i == dim else n for i, n in enumerate(shape))


class CheckpointMismatch(ValueError):
    """An HF checkpoint's tensors do not fit the model its config.json describes."""


def check_hf_tensors(found: dict[str, tuple[int, ...]], arch: ModelArch, te_spec: bool) -> None:
    """Raise CheckpointMismatch listing every missing, unexpected or misshapen HF tensor.

    Each problem names both sides: the HF tensor and the Megatron parameter built from it.
    """
    expected = hf_shapes(arch)
    owner = {n: m for m in megatron_params(arch, te_spec) for n in m.hf_names}
    problems = []
    for name, shape in expected.items():
        param = owner[name]
        wanted = f"Megatron {param.megatron_name} {list(megatron_shape(param, expected))}"
        if name not in found:
            problems.append(f"missing HF tensor {name} {list(shape)}, needed by {wanted}")
        elif tuple(found[name]) != shape:
            problems.append(f"shape mismatch: HF {name} is {list(found[name])}, {wanted} needs it {list(shape)}")
    for name in sorted(found.keys() - expected.keys()):
        if name == "lm_head.weight" and arch.tie_word_embeddings:
            continue  # some writers keep the tied copy; the weight is the embedding
        problems.append(f"unexpected HF tensor {name} {list(found[name])}: no Megatron parameter maps to it")
    if problems:
        raise CheckpointMismatch(f"{len(problems)} tensor(s) do not fit the model of config.json:\n  "
                                 + "\n  ".join(problems))
