"""Import shim that lets the real SGLang server start on a CPU-only machine (tests and CI only).

SGLang 0.5.23's CPU engine imports a few ops from ``sgl_kernel`` at import time, and the registry
has no CPU wheel of the kernel package. This file gives each name SGLang's CPU serving path needs:
a plain-torch version of the ops it calls (same semantics as SGLang's Triton kernel of the same
job), and a loudly failing stub for names it only imports. It is put on PYTHONPATH only by
``tools/sglang_cpu/python``; it is never part of the megatron_fipo package, and GPU nodes use the
real ``sglang-kernel`` wheel.
"""

import torch


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """Row r of the request-to-token table gets its new KV slots at [start, end); the slots of all
    requests lie back to back in out_cache_loc (``assign_req_to_token_pool`` in allocation.py)."""
    offset = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        req_to_token[row, start:end] = out_cache_loc[offset : offset + end - start]
        offset += end - start


def _not_built(name: str):
    def stub(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel CPU shim: {name} was called; it has no CPU implementation here")

    stub.__name__ = name
    return stub


# Imported by SGLang's CPU code paths (KV-cache moves, speculative decoding) but not called when
# serving a dense model without speculation, as here.
_IMPORTED_ONLY = (
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "build_tree_kernel_efficient_cpu",
    "copy_all_layer_kv_cache_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "rotate_input_ids_cpu",
    "sgl_build_tree_kernel_efficient_cpu",
    "sgl_verify_tree_greedy_cpu",
    "verify_tree_greedy_cpu",
)
globals().update({name: _not_built(name) for name in _IMPORTED_ONLY})
