"""torchrun worker: our HF <-> Megatron conversion against Megatron-Bridge's, at TP=2 (fp32, CPU).

Usage: torchrun --nproc-per-node 2 megatron_bridge_worker.py ROOT FAMILY [FAMILY ...]
ROOT/FAMILY holds hf_untied/ and hf_tied/ (FAMILY: qwen2, qwen3, llama). Both converters fill the
same GPTModel (our local-spec build) from the same HF checkpoint; rank 0 writes ROOT/results.pt,
keyed "FAMILY/TAG", with every difference found.
"""

import importlib.util
import sys
import types
from pathlib import Path

TAGS = ("untied", "tied")


def import_megatron_bridge():
    """Import Megatron-Bridge's Qwen2, Qwen3 and Llama conversions without the rest of the package;
    returns AutoBridge.

    megatron-bridge 0.6.2 is installed --no-deps (its declared dependencies include CUDA-only
    builds), and two of its imports fail on this CPU setup for reasons unrelated to Qwen2:
    - ``megatron/bridge/__init__.py``, ``models/__init__.py`` and ``models/qwen/__init__.py`` import
      every model family, and some (Bailing) import ``transformers.modeling_attn_mask_utils``, which
      the transformers we pin (5.24; the bridge pins <= 5.12.1) no longer has. Bare package modules
      stand in for those ``__init__`` files (and ``models/llama/__init__.py``), so only the three
      bridges and the conversion core are imported (importing a bridge registers it, as the
      package would).
    - ``megatron/bridge/peft/lora_layers.py`` imports transformer_engine (CUDA only) at import time.
      Its LoRA classes serve only to wrap or recognise adapters, and a plain model has none: empty
      classes stand in for them.
    Under TP > 1 its replicated-weight mapping moves tensors to ``torch.cuda.current_device()``;
    that module gets the CPU view of torch that megatron_fipo.actor.cpu_shim gives Megatron-Core's
    CUDA-bound modules. The stand-ins live in this worker process only.
    """
    base = next(Path(p) / "bridge" for p in importlib.util.find_spec("megatron").submodule_search_locations
                if (Path(p) / "bridge").is_dir())
    for name, path in (("megatron.bridge", base), ("megatron.bridge.models", base / "models"),
                       ("megatron.bridge.models.qwen", base / "models" / "qwen"),
                       ("megatron.bridge.models.llama", base / "models" / "llama")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    lora_layers = types.ModuleType("megatron.bridge.peft.lora_layers")
    for cls in ("LinearAdapter", "LoRALinear", "LoRATopKRouter", "TEFusedLoRALinear"):
        setattr(lora_layers, cls, type(cls, (), {}))
    sys.modules[lora_layers.__name__] = lora_layers

    import megatron.bridge.models.llama.llama_bridge  # noqa: F401  (registers LlamaBridge)
    import megatron.bridge.models.qwen.qwen2_bridge  # noqa: F401  (registers Qwen2Bridge)
    import megatron.bridge.models.qwen.qwen3_bridge  # noqa: F401  (registers Qwen3Bridge)
    from megatron.bridge.models.conversion import param_mapping
    from megatron.bridge.models.conversion.auto_bridge import AutoBridge

    from megatron_fipo.actor.cpu_shim import _make_cpu_torch

    param_mapping.torch = _make_cpu_torch()
    return AutoBridge


def main() -> None:
    import torch
    import torch.distributed as dist

    from megatron_fipo.actor.model import build_model_chunks
    from megatron_fipo.actor.parallel import init_process_groups
    from megatron_fipo.bridge.hf_io import HFCheckpointReader
    from megatron_fipo.bridge.weights import ModelShards, copy_hf_weights, iter_hf_buckets
    from megatron_fipo.config import ActorConfig, ParallelConfig
    from megatron_fipo.model_arch import ModelArch

    AutoBridge = import_megatron_bridge()
    root, families = sys.argv[1], sys.argv[2:]
    par = ParallelConfig(tensor_model_parallel_size=2)
    init_process_groups(par, seed=0)
    results = {}
    for key in (f"{family}/{tag}" for family in families for tag in TAGS):
        hf = f"{root}/{key.replace('/', '/hf_')}"
        arch = ModelArch.from_hf_config(hf)
        actor = ActorConfig(model_config=hf, precision="fp32")
        ours = ModelShards(build_model_chunks(arch, actor, par, initialize=False), arch)
        copy_hf_weights(ours, HFCheckpointReader(hf))
        theirs = ModelShards(build_model_chunks(arch, actor, par, initialize=False), arch)
        bridge = AutoBridge.from_hf_pretrained(hf)
        bridge.load_hf_weights(theirs.chunks)

        # Megatron side: this rank's TP shard of every parameter.
        mine, other = dict(ours.chunks[0].named_parameters()), dict(theirs.chunks[0].named_parameters())
        shards = {"params": len(mine), "differ": [n for n in mine if not torch.equal(mine[n], other[n])]}
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, shards)

        # HF side: both exporters gather full tensors from the same model.
        exported_ours = {n: t for bucket in iter_hf_buckets(ours, 1 << 30) for n, t in bucket}  # rank 0 only
        exported_theirs = dict(bridge.export_hf_weights(ours.chunks, cpu=True, show_progress=False))
        results[key] = {
            "megatron": per_rank,
            "hf_ours": sorted(exported_ours),
            "hf_theirs": sorted(exported_theirs),
            "hf_differ": [n for n, t in exported_ours.items()
                          if n in exported_theirs and not torch.equal(t, exported_theirs[n])],
        }
    if dist.get_rank() == 0:
        torch.save(results, f"{root}/results.pt")


if __name__ == "__main__":
    main()
