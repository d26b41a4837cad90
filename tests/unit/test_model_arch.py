"""ModelArch reads config.json as transformers 4 and 5 write it, and refuses what the code does not implement."""

import json

import pytest

from megatron_fipo.config_base import ConfigError
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.testing import TINY_QWEN2, make_hf_checkpoint


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
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type 'llama3'"),
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
