"""Checkpoint conversion HF <-> Megatron at TP=1, TP=2 (torchrun x2) and PP=2 (torchrun x2), fp32 on CPU.

Three launches (convert_worker.py) write every checkpoint of a tiny Qwen2; the tests compare what
they wrote. The Megatron checkpoints are written at one layout and read at another, so the round
trips also prove that a converted checkpoint does not depend on the layout it was written with.
Two more launches convert a tiny Qwen3 (QK-norm, no QKV bias, query width 2 x hidden), a tiny
Llama 3.x (Llama 3 RoPE scaling) and a Qwen3 with a vocabulary of 1003 (padded to 1004 rows at
TP=2, stripped again on export) at TP=2 and PP=2.
"""

from pathlib import Path

import pytest
import torch
from helpers.launch import torchrun

from megatron_fipo.testing import load_hf_tensors, make_tied_and_untied

pytestmark = pytest.mark.multiprocess
WORKER = Path(__file__).with_name("convert_worker.py")
TAGS = ("untied", "tied")
# Root name -> make_hf_checkpoint arguments.
FAMILIES = {"qwen3": {"family": "qwen3"}, "llama": {"family": "llama"},
            "vocab1003": {"family": "qwen3", "vocab_size": 1003}}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    make_tied_and_untied(root)
    (root / "hf_untied" / "tokenizer_config.json").write_text('{"model_max_length": 512}\n')
    torchrun(1, WORKER, "tp1", str(root))
    torchrun(2, WORKER, "tp2", str(root))
    torchrun(2, WORKER, "pp2", str(root))
    return root


@pytest.fixture(scope="module")
def families_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_families")
    for name, arguments in FAMILIES.items():
        make_tied_and_untied(root / name, **arguments)
    torchrun(2, WORKER, "tp2-convert", *(str(root / f) for f in FAMILIES))
    torchrun(2, WORKER, "pp2-convert", *(str(root / f) for f in FAMILIES))
    return root


def _assert_round_trip(source, out, tag):
    original = load_hf_tensors(source)
    if tag == "tied":
        original.pop("lm_head.weight", None)  # transformers may write the tied copy; the weight is one
    exported = load_hf_tensors(out)
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == torch.float32, name
        assert torch.equal(exported[name], tensor), name
    # The output is a loadable HF directory: the original config came along.
    assert (out / "config.json").read_text() == (source / "config.json").read_text()
    assert (out / "generation_config.json").is_file()


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("route", ["from_tp1_at_tp2", "from_tp2_at_pp2", "from_pp2_at_pp2"])
def test_round_trip_is_bit_exact(root, route, tag):
    out = root / f"hf_{route}_{tag}"
    _assert_round_trip(root / f"hf_{tag}", out, tag)
    assert (out / "tokenizer_config.json").is_file() == (tag == "untied")  # tokenizer files too


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("route", ["from_tp2_at_tp2", "from_tp2_at_pp2", "from_pp2_at_pp2"])
def test_other_families_round_trip_bit_exact(families_root, family, route, tag):
    root = families_root / family
    _assert_round_trip(root / f"hf_{tag}", root / f"hf_{route}_{tag}", tag)


def test_multiple_shards_and_transformers_loads_the_output(root):
    from transformers import Qwen2ForCausalLM

    out = root / "hf_from_tp1_at_tp2_untied"
    assert len(list(out.glob("model-*.safetensors"))) > 1  # --shard-mb 0.1 on a 0.8 MB model
    model = Qwen2ForCausalLM.from_pretrained(out)
    reference = Qwen2ForCausalLM.from_pretrained(root / "hf_untied")
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("tag", TAGS)
def test_a_runs_checkpoint_converts_to_hf(root, tag):
    trained, original = load_hf_tensors(root / f"hf_trained_{tag}"), load_hf_tensors(root / f"hf_{tag}")
    exported = load_hf_tensors(root / f"hf_from_run_at_pp2_{tag}")
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[n], t) for n, t in trained.items())
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(exported[name], original[name])  # the weights trained
    config = root / f"hf_from_run_at_pp2_{tag}" / "config.json"
    assert config.read_bytes() == (root / f"hf_{tag}" / "config.json").read_bytes()  # from --hf-config


@pytest.mark.parametrize("tag", TAGS)
def test_megatron_checkpoint_written_at_tp1_loads_at_tp2(root, tag):
    res = torch.load(root / f"logprobs_{tag}.pt", weights_only=True)
    assert res["hf"].abs().sum() > 0
    # Same weights, same layout, same kernels: equal to the last bit.
    assert torch.equal(res["megatron_tp1"], res["hf"])
    assert not torch.equal(res["trained"], res["hf"])
    assert torch.equal(res["trainer_checkpoint"], res["trained"])
