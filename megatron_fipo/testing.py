"""Tiny models and runs for tests, benchmarks and the CPU job (real HF classes, random weights)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_QWEN2 = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def make_hf_checkpoint(directory: str | Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialized transformers Qwen2ForCausalLM (fp32 safetensors) to ``directory``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**{**TINY_QWEN2, **overrides})
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():  # HF zero-inits biases; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return Path(directory)


def make_tied_and_untied(root: str | Path) -> None:
    """``root/hf_untied`` and ``root/hf_tied``: the two embedding layouts every bridge test covers."""
    make_hf_checkpoint(Path(root) / "hf_untied", seed=0)
    make_hf_checkpoint(Path(root) / "hf_tied", seed=1, tie_word_embeddings=True)


def load_hf_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF safetensors directory, read with safetensors itself (not our reader)."""
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors
