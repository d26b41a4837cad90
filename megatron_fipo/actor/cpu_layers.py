"""Stand-ins for the Transformer Engine modules that Megatron's local spec lacks, for CP and SP on CPU.

Megatron-Core's local spec refuses both: ``DotProductAttention`` asserts CP == 1 (only TE's
attention runs ring exchanges) and ``WrappedTorchNorm`` asserts no sequence parallelism (TE's norms
mark their weights so that their gradients, partial per sequence slice, are summed over TP).
``actor/model.py`` uses these only without Transformer Engine; where TE runs, TE's modules do.
"""

from __future__ import annotations

import copy

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_fipo.actor.context_parallel import group_token_index, rank_token_index, sequence_of


def _config_with(config, **changes):
    """A shallow copy of the TransformerConfig with ``changes``: what the refusing module sees."""
    view = copy.copy(config)
    for name, value in changes.items():
        setattr(view, name, value)
    return view


class SequenceParallelNorm:
    """Torch RMSNorm/LayerNorm under sequence parallelism: each TP rank normalizes its own slice of
    the sequence, so its weight gradients are partial; ``sequence_parallel`` on them makes
    Megatron's ``finalize_model_grads`` sum them over the TP group, as it does for TE's norms."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        norm = WrappedTorchNorm(_config_with(config, sequence_parallel=False), hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm


def context_parallel_mask(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """[1, 1, T_local, T] bool, True = masked: this rank's queries against the gathered keys."""
    q = rank_token_index(cu_seqlens_padded, cp_size, cp_rank)
    k = group_token_index(cu_seqlens_padded, cp_size)
    same = sequence_of(q, cu_seqlens_padded).unsqueeze(1) == sequence_of(k, cu_seqlens_padded).unsqueeze(0)
    return ~(same & (k.unsqueeze(0) <= q.unsqueeze(1))).view(1, 1, q.numel(), k.numel())


class ContextParallelCPUAttention(DotProductAttention):
    """Exact context-parallel attention: all-gather K/V over the CP group (Megatron's all-gather,
    whose backward reduce-scatters their gradients), mask by the packed positions of the zig-zag
    chunks (a query sees the keys of its own sequence at or before it, ``actor/context_parallel.py``)
    and run ``DotProductAttention``'s own math. Every rank holds all keys of the micro-batch:
    memory O(T_local x T), for tests on CPU, never for scale."""

    def __init__(self, config, *args, pg_collection=None, **kwargs):
        super().__init__(_config_with(config, context_parallel_size=1), *args, pg_collection=pg_collection, **kwargs)
        cp = getattr(pg_collection, "cp", None)
        self.cp_group = cp if cp is not None else parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None or packed_seq_params.cu_seqlens_q_padded is None:
            raise ValueError("context-parallel attention on CPU needs packed (THD) micro-batches with "
                             "cu_seqlens_q_padded")
        # THD tensors arrive as [t, heads, dim]: back to Megatron's [s, b=1, heads, dim].
        query, key, value = (x.unsqueeze(1) if x.dim() == 3 else x for x in (query, key, value))
        key = gather_from_sequence_parallel_region(key, group=self.cp_group)
        value = gather_from_sequence_parallel_region(value, group=self.cp_group)
        cu = packed_seq_params.cu_seqlens_q_padded.cpu()
        mask = context_parallel_mask(cu, self.cp_group.size(), self.cp_group.rank()).to(query.device)
        return super().forward(query, key, value, mask, attn_mask_type, attention_bias, packed_seq_params=None)
