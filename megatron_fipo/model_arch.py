"""The dense decoder architecture shared by actor, bridge and rollout engine, read from HF config.json.

Families: Qwen2 (QKV bias), Qwen3 dense (QK-norm, no QKV bias, head_dim independent of the hidden
size) and Llama 3.x (optionally Llama 3 RoPE scaling, attention_bias).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from megatron_fipo.config_base import ConfigError

HF_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
SUPPORTED_MODEL_TYPES = tuple(HF_ARCHITECTURES)
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class Llama3RopeScaling:
    """``rope_type: llama3``: long wavelengths divided by ``factor``, short ones kept, a smooth blend between."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def apply(self, inv_freq):
        """Scaled inverse frequencies, as transformers' ``_compute_llama3_parameters`` computes them.

        Megatron-Core's own RotaryEmbedding(rope_scaling=True) fixes low/high_freq_factor and
        original_max_position_embeddings at Llama 3.1's 1, 4 and 8192; this takes them from the config.
        """
        import torch

        low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    rope_theta: float
    rms_norm_eps: float
    qkv_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    head_dim: int  # per attention head; Qwen3's heads x head_dim differs from hidden_size
    qk_norm: bool = False  # RMSNorm of each q and k head before RoPE (Qwen3)
    rope_scaling: Optional[Llama3RopeScaling] = None

    def padded_vocab_size(self, tp: int) -> int:
        """Rows of the Megatron embedding and output layer at tensor parallelism ``tp``.

        The vocabulary itself where TP divides it. Otherwise padded as Megatron-Bridge pads a
        vocabulary (should_pad_vocab): up to a multiple of make_vocab_size_divisible_by x TP, that
        divisor being the largest power of two <= 128 dividing vocab_size (its AutoBridge rule).
        The padding rows are zero, no token, outside every softmax, and stripped on export.
        """
        if self.vocab_size % tp == 0:
            return self.vocab_size
        divisor = 128
        while self.vocab_size % divisor:
            divisor //= 2
        multiple = divisor * tp
        return -(-self.vocab_size // multiple) * multiple

    def rope_inv_freq(self, dtype=None):
        """RoPE inverse frequencies [head_dim / 2], computed as transformers does (fp32 unless ``dtype``)."""
        import torch

        d = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).to(dtype or torch.float32) / d))
        return self.rope_scaling.apply(inv_freq) if self.rope_scaling else inv_freq

    @classmethod
    def from_hf_config(cls, source: str | Path | dict) -> "ModelArch":
        if isinstance(source, dict):
            cfg, where = source, "config"
        else:
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            if not path.is_file():
                raise ConfigError(f"actor.model_config: no Hugging Face config.json at {path}")
            cfg, where = json.loads(path.read_text()), str(path)
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{where}: model_type {model_type!r} is not a supported dense family ({', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in cfg]
        if missing:
            raise ConfigError(f"{where}: missing keys {missing}")
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        _refuse_unimplemented(cfg, where)
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            num_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads", heads),
            ffn_hidden_size=cfg["intermediate_size"],
            rope_theta=_rope_theta(cfg),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            # Qwen2 always carries q/k/v biases; Qwen3 and Llama only with attention_bias.
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            # transformers: head_dim if the config has one (null counts as none), else hidden / heads.
            head_dim=cfg.get("head_dim") or hidden // heads,
            qk_norm=model_type == "qwen3",
            rope_scaling=_llama3_scaling(cfg, where),
        )

    def to_hf_config(self) -> dict:
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope = {"rope_theta": self.rope_theta, "rope_type": "llama3", **asdict(self.rope_scaling)}
        out = {
            "architectures": [HF_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.ffn_hidden_size,
            # transformers 5 reads rope_parameters; 4 (and servers pinned to it) the top-level key.
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            # Engines stop on the stop ids the trainer sends (its tokenizer's). Without these keys
            # transformers' LlamaConfig defaults eos_token_id to 2 and an SGLang server serving this
            # config stops at token 2 (measured; in Llama 3's vocabulary that is '#').
            "bos_token_id": None,
            "eos_token_id": None,
        }
        if self.rope_scaling:
            out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if self.model_type != "qwen2":
            out["attention_bias"] = self.qkv_bias
        return out

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULT_ROPE_THETA = 10000.0  # transformers' default for Qwen2 and Llama when a config names none


def _rope_parameters(cfg: dict) -> dict:
    """RoPE settings as transformers 5 writes them (``rope_parameters``) or 4 does (top-level
    ``rope_theta`` plus ``rope_scaling``)."""
    params = dict(cfg.get("rope_parameters") or {})
    if cfg.get("rope_scaling"):
        params = {**cfg["rope_scaling"], **params}
    return params


def _rope_theta(cfg: dict) -> float:
    return float(_rope_parameters(cfg).get("rope_theta", cfg.get("rope_theta", DEFAULT_ROPE_THETA)))


def _rope_type(cfg: dict) -> str:
    params = _rope_parameters(cfg)
    return params.get("rope_type", params.get("type", "default"))


def _llama3_scaling(cfg: dict, where: str) -> Optional[Llama3RopeScaling]:
    if _rope_type(cfg) != "llama3":
        return None
    params = _rope_parameters(cfg)
    missing = [k for k in LLAMA3_ROPE_KEYS if params.get(k) is None]
    if missing:
        raise ConfigError(f"{where}: rope_type 'llama3' needs {missing} in rope_parameters / rope_scaling")
    if params["high_freq_factor"] <= params["low_freq_factor"]:
        raise ConfigError(f"{where}: rope_type 'llama3' needs high_freq_factor > low_freq_factor, got "
                          f"{params['high_freq_factor']} <= {params['low_freq_factor']}")
    return Llama3RopeScaling(float(params["factor"]), float(params["low_freq_factor"]),
                             float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))


def _refuse_unimplemented(cfg: dict, where: str) -> None:
    """A model feature that the actor, bridge and engines do not implement fails here, by field.

    Silently ignoring one would train a different model than the checkpoint's (and export it under
    the original config).
    """
    rope_type = _rope_type(cfg)
    problems = []
    if rope_type not in ("default", "llama3"):
        problems.append(f"rope scaling (rope_type {rope_type!r} in rope_parameters / rope_scaling): only plain "
                        "RoPE and Llama 3's ('llama3') are implemented")
    partial = _rope_parameters(cfg).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if float(partial) != 1.0:
        problems.append(f"partial_rotary_factor={partial}: only full rotary embeddings are implemented")
    if cfg.get("use_sliding_window"):
        problems.append("use_sliding_window=true: sliding-window attention is not implemented")
    windowed = sorted({t for t in cfg.get("layer_types") or () if t != "full_attention"})
    if windowed:
        problems.append(f"layer_types {windowed}: only full attention is implemented")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r}: only SiLU-gated MLPs are implemented")
    if cfg.get("mlp_bias"):
        problems.append("mlp_bias=true: MLP biases are not implemented")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems) + ". Use a model without it, or extend "
                          "megatron_fipo/model_arch.py and the actor, bridge and engines together")
