"""The dense decoder architecture shared by actor, bridge and rollout engine, read from HF config.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_fipo.config_base import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

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
        if cfg.get("head_dim", hidden // heads) * heads != hidden:
            raise ConfigError(f"{where}: head_dim * num_attention_heads must equal hidden_size")
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
            # Qwen2 always carries q/k/v biases; Llama only with attention_bias.
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        )

    def to_hf_config(self) -> dict:
        arch = "Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"
        out = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.ffn_hidden_size,
            # transformers 5 reads rope_parameters; 4 (and servers pinned to it) the top-level key.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if self.model_type == "llama":
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


def _refuse_unimplemented(cfg: dict, where: str) -> None:
    """A model feature that the actor, bridge and engines do not implement fails here, by field.

    Silently ignoring one would train a different model than the checkpoint's (and export it under
    the original config).
    """
    rope_type = _rope_parameters(cfg).get("rope_type", _rope_parameters(cfg).get("type", "default"))
    problems = []
    if rope_type != "default":
        problems.append(f"rope scaling (rope_type {rope_type!r} in rope_parameters / rope_scaling): only plain "
                        "RoPE is implemented")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append(f"partial_rotary_factor={cfg['partial_rotary_factor']}: only full rotary embeddings are implemented")
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
