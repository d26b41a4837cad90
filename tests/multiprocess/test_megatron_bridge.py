"""Our HF <-> Megatron mapping equals Megatron-Bridge's (the reference library), tensor for tensor.

One torchrun x2 at TP=2 over a tiny Qwen2 with QKV bias, a tiny Qwen3 (QK-norm, no QKV bias, query
width 2 x hidden) and a tiny Llama 3.x, each with untied and tied embeddings: both fill the same
GPTModel from the same HF checkpoint, and both export it back to HF names.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers.launch import torchrun

from megatron_fipo.testing import make_tied_and_untied

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(
        importlib.util.find_spec("megatron.bridge") is None or importlib.util.find_spec("omegaconf") is None,
        reason="megatron-bridge 0.6.2 (and omegaconf) not installed: scripts/setup_env.sh requirements-test.txt "
               "requirements-test-nodeps.txt installs them",
    ),
]
WORKER = Path(__file__).with_name("megatron_bridge_worker.py")
TAGS = ("untied", "tied")
FAMILIES = ("qwen2", "qwen3", "llama")
# Megatron parameters per TP rank and HF tensors of the untied 4-layer models (tied: one fewer each),
# plus embedding, final norm and output layer. Per layer, Megatron: 6 (+1 QKV bias, +2 QK-norm);
# HF: 9 (+3 q/k/v biases, +2 q/k norms).
PARAMS = {"qwen2": 4 * 7 + 3, "qwen3": 4 * 8 + 3, "llama": 4 * 6 + 3}
HF_TENSORS = {"qwen2": 4 * 12 + 3, "qwen3": 4 * 11 + 3, "llama": 4 * 9 + 3}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_bridge")
    for family in FAMILIES:
        make_tied_and_untied(root / family, family)
    torchrun(2, WORKER, str(root), *FAMILIES)
    return torch.load(root / "results.pt", weights_only=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tag", TAGS)
def test_megatron_state_from_hf_equals_megatron_bridge(results, family, tag):
    per_rank = results[f"{family}/{tag}"]["megatron"]
    assert [r["params"] for r in per_rank] == [PARAMS[family] - (tag == "tied")] * 2
    assert [r["differ"] for r in per_rank] == [[], []]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tag", TAGS)
def test_hf_export_equals_megatron_bridge(results, family, tag):
    res = results[f"{family}/{tag}"]
    assert len(res["hf_ours"]) == HF_TENSORS[family] - (tag == "tied")
    assert res["hf_ours"] == res["hf_theirs"]
    assert res["hf_differ"] == []
