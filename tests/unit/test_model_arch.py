"""ModelArch reads config.json as transformers 4 and 5 write it, and refuses what the code does not implement."""

import json
import math

import pytest
import torch

from megatron_fipo.config_base import ConfigError
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.testing import TINY_LLAMA3, TINY_QWEN2, TINY_QWEN3, make_hf_checkpoint


def test_transformers_5_rope_parameters_are_read(tmp_path):
    saved = json.loads((make_hf_checkpoint(tmp_path / "hf", rope_theta=1e6) / "config.json").read_text())
    assert "rope_parameters" in saved  # what transformers 5 writes
    assert ModelArch.from_hf_config(saved).rope_theta == 1e6


def test_transformers_4_top_level_rope_theta_is_read():
    cfg = {**TINY_QWEN2, "rope_theta": 1e6, "rope_scaling": None, "use_sliding_window": False, "sliding_window": 4096}
    assert ModelArch.from_hf_config(cfg).rope_theta == 1e6


def test_exported_config_round_trips_in_both_spellings():
    arch = ModelArch.from_hf_config({**TINY_QWEN2, "rope_theta": 5e5})
    out = arch.to_hf_config()
    assert out["rope_theta"] == out["rope_parameters"]["rope_theta"] == 5e5
    assert ModelArch.from_hf_config(out) == arch


@pytest.mark.parametrize("extra,named", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "rope_type 'llama3' needs ['low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings']"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unimplemented_features_are_refused_by_field(extra, named):
    with pytest.raises(ConfigError, match="config: .*" + named.replace("(", r"\(").replace("[", r"\[")):
        ModelArch.from_hf_config({**TINY_QWEN2, **extra})


def test_qwen3_and_llama3_are_read_and_round_trip():
    qwen3 = ModelArch.from_hf_config(TINY_QWEN3)
    assert (qwen3.head_dim, qwen3.qk_norm, qwen3.qkv_bias, qwen3.rope_scaling) == (32, True, False, None)
    assert qwen3.num_attention_heads * qwen3.head_dim == 2 * qwen3.hidden_size
    llama = ModelArch.from_hf_config(TINY_LLAMA3)
    assert (llama.head_dim, llama.qk_norm, llama.qkv_bias, llama.rope_theta) == (16, False, False, 1e4)
    assert llama.rope_scaling.original_max_position_embeddings == 64 and llama.rope_scaling.factor == 8.0
    for arch in (qwen3, llama):
        out = arch.to_hf_config()
        assert ModelArch.from_hf_config(out) == arch
        # transformers 4's spelling alone (rope_scaling, top-level rope_theta) reads the same.
        v4 = {k: v for k, v in out.items() if k != "rope_parameters"}
        assert ModelArch.from_hf_config(v4) == arch


def test_exported_config_names_no_end_of_sequence_token():
    """A snapshot config read by transformers (as SGLang reads it) has no EOS of its own: LlamaConfig's
    default (2) would make the server stop at token 2; the trainer's stop ids are the only stops."""
    from transformers import AutoConfig

    for tiny in (TINY_QWEN2, TINY_QWEN3, TINY_LLAMA3):
        out = ModelArch.from_hf_config(tiny).to_hf_config()
        cfg = AutoConfig.for_model(out.pop("model_type"), **out)
        assert cfg.eos_token_id is None and cfg.bos_token_id is None, tiny["model_type"]


def test_llama3_rope_scaling_matches_the_formula_by_band():
    """Hand-computed: head_dim 16, theta 1e4 -> wavelengths 2 pi 1e4^(i/8); original 64, low 1, high 4:
    wavelength < 16 kept, > 64 divided by factor 8, between them blended with s = (64/wavelength - 1) / 3."""
    arch = ModelArch.from_hf_config(TINY_LLAMA3)
    plain = 1.0 / (1e4 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    got = arch.rope_inv_freq(torch.float64)
    wavelen = 2 * math.pi / plain
    for i in range(8):
        s = (64 / wavelen[i] - 1) / 3
        blended = (1 - s) * plain[i] / 8 + s * plain[i]
        want = plain[i] if wavelen[i] < 16 else plain[i] / 8 if wavelen[i] > 64 else blended
        assert got[i].item() == pytest.approx(want.item(), rel=1e-12), i
    assert [bool(w < 16) for w in wavelen].count(True) == 1 and [bool(w > 64) for w in wavelen].count(True) == 5


def test_megatron_cores_builtin_llama3_scaling_differs_from_a_config_with_other_bands():
    """Why the actor sets RoPE frequencies itself: RotaryEmbedding(rope_scaling=True) takes only the
    factor; low/high_freq_factor and original_max_position_embeddings are fixed at 1 / 4 / 8192."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    plain = ModelArch.from_hf_config({**TINY_LLAMA3, "rope_parameters": {"rope_theta": 1e4}}).rope_inv_freq()
    megatron = RotaryEmbedding._apply_scaling(None, plain, factor=8.0)
    assert not torch.equal(megatron, ModelArch.from_hf_config(TINY_LLAMA3).rope_inv_freq())
    llama31 = {**TINY_LLAMA3["rope_parameters"], "original_max_position_embeddings": 8192}
    assert torch.equal(megatron, ModelArch.from_hf_config({**TINY_LLAMA3, "rope_parameters": llama31}).rope_inv_freq())


@pytest.mark.parametrize("vocab,tp,padded", [
    (1003, 1, 1003),  # TP divides it: no padding
    (1003, 2, 1004),  # odd: Megatron-Bridge's divisor is 1, so a multiple of 1 x 2
    (1002, 4, 1008),  # divisor 2 (1002 = 2 x 501): a multiple of 8
    (50257, 8, 50264),
    (151936, 8, 151936),
    (1000, 16, 1024),  # divisor 8: a multiple of 128
])
def test_padded_vocab_size_follows_megatron_bridge(vocab, tp, padded):
    assert ModelArch.from_hf_config({**TINY_QWEN2, "vocab_size": vocab}).padded_vocab_size(tp) == padded
