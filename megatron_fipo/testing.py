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
# Qwen3 dense: QK-norm, no QKV bias, and 4 heads x 32 = 128 query width on a 64-wide hidden state.
TINY_QWEN3 = {**TINY_QWEN2, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 32,
              "attention_bias": False}
# Llama 3.x with Llama 3 RoPE scaling; original_max_position_embeddings is small so that all three
# frequency bands (kept, blended, divided by factor) occur at head_dim 16 within a few hundred positions.
TINY_LLAMA3 = {**{k: v for k, v in TINY_QWEN2.items() if k != "rope_theta"}, "model_type": "llama",
               "architectures": ["LlamaForCausalLM"], "attention_bias": False, "mlp_bias": False,
               "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}}
TINY = {"qwen2": TINY_QWEN2, "qwen3": TINY_QWEN3, "llama": TINY_LLAMA3}


def make_hf_checkpoint(directory: str | Path, seed: int = 0, family: str = "qwen2", **overrides) -> Path:
    """Save a randomly initialized transformers model of ``family`` (a key of TINY: its tiny config,
    updated by ``overrides``) as fp32 safetensors to ``directory``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = {k: v for k, v in TINY[family].items() if k != "model_type"}
    cfg = AutoConfig.for_model(TINY[family]["model_type"], **{**base, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():  # HF zero-inits biases; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return Path(directory)


def make_tied_and_untied(root: str | Path, family: str = "qwen2", **overrides) -> None:
    """``root/hf_untied`` and ``root/hf_tied``: the two embedding layouts every bridge test covers."""
    make_hf_checkpoint(Path(root) / "hf_untied", seed=0, family=family, **overrides)
    make_hf_checkpoint(Path(root) / "hf_tied", seed=1, family=family, **{**overrides, "tie_word_embeddings": True})


def hf_response_logprobs(model, prompt: list[int], response: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log pi(response_t | prefix) under a transformers model, fp32 [len(response)]: the reference."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


def load_hf_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF safetensors directory, read with safetensors itself (not our reader)."""
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors
