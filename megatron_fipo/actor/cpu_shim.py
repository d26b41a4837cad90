"""Run Megatron-Core on CPU over gloo: the small, explicit set of patches Megatron needs there.

Megatron-Core hard-codes CUDA in a handful of modules (0.19.2). Rather than a global
TorchFunctionMode (+45% step time on a small model), each of those modules gets its own view of
``torch`` in which ``torch.cuda.*`` and ``device="cuda"`` mean the CPU; every other module, torch
included, is untouched. Applied only when CUDA is absent, and idempotent.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import types

import torch

# Module -> why it needs the CPU view of torch.
_MODULES = {
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "get_emb moves inv_freq to torch.cuda.current_device()",
    "megatron.core.utils": "GlobalMemoryBuffer.get_tensor allocates on torch.cuda.current_device()",
    "megatron.core.transformer.utils": "get_default_causal_mask builds its mask with device='cuda'",
    "megatron.core.tensor_parallel.layers": "linear layers allocate gather/grad buffers on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.mappings": "sequence-parallel (and CP K/V) all-gathers and reduce-scatters allocate on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.random": "the model-parallel RNG tracker seeds and swaps torch.cuda RNG states",
    "megatron.core.pipeline_parallel.p2p_communication": "p2p shapes and buffers on current_device(); torch.cuda.synchronize()",
    "megatron.core.pipeline_parallel.schedules": "total_num_tokens = torch.zeros(..., device='cuda')",
    "megatron.core.distributed.param_and_grad_buffer": "buffers on current_device(); start_grad_sync uses torch.cuda.current_stream()",
    "megatron.core.distributed.distributed_data_parallel": "a torch.cuda.Stream for overlapped communication",
    "megatron.core.optimizer.clip_grads": "grad-norm tensors with device='cuda'",
    "megatron.core.optimizer.optimizer": "found_inf / loss-scale tensors with device='cuda'",
    "megatron.core.optimizer.distrib_optimizer": "gather buffers on torch.cuda.current_device()",
    "megatron.core.optimizer.optimizer_config": "torch.cuda.is_available() checks pick apex/TE paths",
    "megatron.core.dist_checkpointing.strategies.torch": "torch.cuda.current_device() when (de)serializing shards",
    "megatron.core.dist_checkpointing.exchange_utils": "shard exchange buffers on torch.cuda.current_device()",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "preload_tensors calls torch.cuda.synchronize()",
    "megatron.core.dist_checkpointing.strategies.async_utils": "sync save calls torch.cuda.synchronize()",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "save finalize reduces a flag on current_device()",
}

# Functions that call CUDA through tensor methods: tensor.type() == 'torch.cuda.<dtype>Tensor' checks
# (CPU tensors answer 'torch.<dtype>Tensor') and tensor.cuda() moves. These run with CPU-friendly
# Tensor.type / Tensor.cuda for the duration of the call only.
_TENSOR_METHOD_CALLS = {
    # Tied embeddings across pipeline stages: weight.data.cuda() before the first all-reduce.
    "megatron.core.models.common.language_module.language_module": ("LanguageModule.setup_embeddings_and_output_layer",),
    "megatron.core.optimizer.distrib_optimizer": ("DistributedOptimizer._build_model_and_main_param_groups",),
    # optimizer.py calls clip_grad_by_total_norm_fp32 through its own imported name.
    "megatron.core.optimizer.optimizer": ("Float16OptimizerWithFloat16Params.__init__", "clip_grad_by_total_norm_fp32"),
}


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    dev = torch.device(device)
    return torch.device("cpu") if dev.type == "cuda" else dev


class _NullStream:
    """Stands in for torch.cuda.Stream: CPU ops run in program order, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event


def _make_cpu_cuda() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        is_available=lambda: False,
        current_device=lambda: torch.device("cpu"),
        device_count=lambda: 0,
        synchronize=lambda *a, **k: None,
        empty_cache=lambda: None,
        current_stream=lambda *a, **k: _NullStream(),
        Stream=_NullStream,
        stream=lambda s=None: contextlib.nullcontext(),
        get_rng_state=lambda *a, **k: torch.get_rng_state(),
        set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
        manual_seed=lambda seed: torch.manual_seed(seed),
        memory_allocated=lambda *a, **k: 0,
        max_memory_allocated=lambda *a, **k: 0,
        amp=torch.cuda.amp,
        random=types.SimpleNamespace(get_rng_state=lambda *a, **k: torch.get_rng_state()),
        nvtx=torch.cuda.nvtx,
        CUDAGraph=torch.cuda.CUDAGraph,
        graphs=torch.cuda.graphs,
    )


def _device_kwarg(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


def _make_cpu_torch() -> types.ModuleType:
    view = types.ModuleType("torch_cpu_view", "torch as seen by Megatron modules patched for CPU")
    view.__getattr__ = lambda name: getattr(torch, name)  # type: ignore[attr-defined]
    view.cuda = _make_cpu_cuda()
    for name in ("zeros", "ones", "empty", "tensor", "full", "arange", "zeros_like", "empty_like", "randn"):
        setattr(view, name, _device_kwarg(getattr(torch, name)))
    view.device = lambda *a, **k: _cpu_device(torch.device(*a, **k))
    return view


@contextlib.contextmanager
def _cpu_tensor_methods():
    original_type, original_cuda = torch.Tensor.type, torch.Tensor.cuda

    def cpu_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and self.device.type == "cpu":
            return original_type(self).replace("torch.", "torch.cuda.", 1)
        return original_type(self, dtype, non_blocking, **kwargs)

    def cpu_cuda(self, *args, **kwargs):
        return self

    torch.Tensor.type, torch.Tensor.cuda = cpu_type, cpu_cuda
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = original_type, original_cuda


def _wrap_tensor_method_calls(owner, attr: str) -> None:
    raw = inspect.getattr_static(owner, attr)
    fn = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
    if getattr(fn, "_cpu_shim", False):
        return

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cpu_tensor_methods():
            return fn(*args, **kwargs)

    wrapper._cpu_shim = True  # type: ignore[attr-defined]
    setattr(owner, attr, type(raw)(wrapper) if isinstance(raw, (staticmethod, classmethod)) else wrapper)


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


_applied = False


def apply_cpu_shim() -> bool:
    """Patch Megatron for CPU if CUDA is absent. Returns True when the shim is (now) active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    cpu_torch = _make_cpu_torch()
    for name in _MODULES:
        module = importlib.import_module(name)
        module.torch = cpu_torch
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = _cpu_get_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state
    for name, qualnames in _TENSOR_METHOD_CALLS.items():
        module = importlib.import_module(name)
        for qualname in qualnames:
            *path, attr = qualname.split(".")
            owner = functools.reduce(getattr, path, module)
            _wrap_tensor_method_calls(owner, attr)
    _applied = True
    return True
