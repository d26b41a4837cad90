"""RoPE base read as transformers 4 and 5 write it: actor logprobs equal transformers' (theta 1e6).

Before, a transformers-5 config (``rope_parameters``) was read as theta 1e4: logprobs off by up to
2.4 nats from transformers' on the same checkpoint, while trainer and engine agreed with each other.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers.launch import torchrun

from megatron_fipo.testing import make_hf_checkpoint

pytestmark = pytest.mark.multiprocess


def _as_transformers_4(directory):
    """Rewrite config.json the way transformers 4 wrote it: top-level rope_theta, rope_scaling null."""
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    theta = cfg.pop("rope_parameters")["rope_theta"]
    cfg.pop("layer_types", None)
    cfg.update(rope_theta=theta, rope_scaling=None, transformers_version="4.57.1")
    path.write_text(json.dumps(cfg, indent=2))
    return directory


def test_actor_logprobs_equal_transformers_for_both_config_spellings(tmp_path):
    v5 = make_hf_checkpoint(tmp_path / "v5", seed=0, rope_theta=1e6)
    v4 = _as_transformers_4(make_hf_checkpoint(tmp_path / "v4", seed=1, rope_theta=1e6))
    torchrun(1, Path(__file__).with_name("rope_worker.py"), str(tmp_path / "out.pt"), str(v5), str(v4))
    results = torch.load(tmp_path / "out.pt", weights_only=True)
    for hf in (v5, v4):
        got = results[str(hf)]
        assert got["rope_theta"] == got["hf_rope_theta"] == 1e6
        assert got["max_rel_diff"] <= 1e-5, hf


def test_actor_logprobs_equal_transformers_for_qwen3_and_llama3(tmp_path):
    """Qwen3 (QK-norm, no QKV bias, 4 heads x 32 on a 64-wide hidden state; untied) and tied Llama 3.x
    with Llama 3 RoPE scaling whose band limits differ from Megatron-Core's hard-coded 1 / 4 / 8192
    (positions up to 300 span all three bands)."""
    qwen3 = make_hf_checkpoint(tmp_path / "qwen3", seed=2, family="qwen3")
    llama = make_hf_checkpoint(tmp_path / "llama", seed=3, family="llama", tie_word_embeddings=True)
    torchrun(1, Path(__file__).with_name("rope_worker.py"), str(tmp_path / "out.pt"), str(qwen3), str(llama))
    results = torch.load(tmp_path / "out.pt", weights_only=True)
    for hf in (qwen3, llama):
        assert results[str(hf)]["max_rel_diff"] <= 1e-5, hf
