"""The embedded engine against transformers' own model on the same HF checkpoint: Qwen2 (QKV bias),
Qwen3 (QK-norm, query width 2 x hidden) and Llama 3.x (Llama 3 RoPE scaling)."""

import pytest
import torch

from megatron_fipo.bridge.hf_io import HFCheckpointReader
from megatron_fipo.bridge.mapping import hf_names
from megatron_fipo.rollout.base import SamplingParams
from megatron_fipo.rollout.embedded import EmbeddedEngine, _filter_top_k_top_p
from megatron_fipo.testing import hf_response_logprobs, make_hf_checkpoint


@pytest.fixture(scope="module", params=[("qwen2", False), ("qwen2", True), ("qwen3", False), ("llama", True)],
                ids=["qwen2-untied", "qwen2-tied", "qwen3-untied", "llama3-tied"])
def setup(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    family, tie = request.param
    d = make_hf_checkpoint(tmp_path_factory.mktemp("hf"), seed=3, family=family, tie_word_embeddings=tie)
    reader = HFCheckpointReader(d)
    arch = reader.arch()
    engine = EmbeddedEngine(arch, max_batch=5)
    engine.update_weights([[(n, reader.read(n)) for n in hf_names(arch)]], version=7)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return engine, hf


PROMPTS = [[5, 17, 33, 2], [9, 9], [100, 4, 77, 31, 12, 8, 3]]


def test_sampled_logprobs_match_transformers(setup):
    engine, hf = setup
    groups = engine.generate(PROMPTS, n=3, sampling=SamplingParams(temperature=0.8, max_new_tokens=12), seed=0)
    assert [len(g) for g in groups] == [3, 3, 3]
    for prompt, group in zip(PROMPTS, groups):
        for s in group:
            assert s.prompt_ids == prompt and s.weight_version == 7 and s.finish_reason == "length"
            ref = hf_response_logprobs(hf, prompt, s.response_ids, 0.8)
            torch.testing.assert_close(torch.tensor(s.logprobs), ref, rtol=1e-5, atol=1e-5)


def test_greedy_matches_transformers_generate(setup):
    engine, hf = setup
    groups = engine.generate(PROMPTS, n=1, sampling=SamplingParams(temperature=0.0, max_new_tokens=10), seed=0)
    for prompt, (s,) in zip(PROMPTS, groups):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert s.response_ids == out[0, len(prompt):].tolist()


def test_stop_tokens_and_seeded_determinism(setup):
    engine, _ = setup
    sp = SamplingParams(temperature=1.0, max_new_tokens=30, stop_token_ids=tuple(range(0, 256, 4)))
    a = engine.generate(PROMPTS, n=4, sampling=sp, seed=11)
    b = engine.generate(PROMPTS, n=4, sampling=sp, seed=11)
    assert [[s.response_ids for s in g] for g in a] == [[s.response_ids for s in g] for g in b]
    stopped = [s for g in a for s in g if s.finish_reason == "stop"]
    assert stopped, "with a quarter of the vocabulary as stop tokens some sample must stop"
    for s in stopped:
        assert s.response_ids[-1] % 4 == 0 and all(t % 4 for t in s.response_ids[:-1])


def test_top_k_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_filter_top_k_top_p(logits, top_k=-1, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(_filter_top_k_top_p(logits, top_k=3, top_p=1.0))
    assert kept.tolist() == [[True, True, True, False]]


def test_bad_weights_are_rejected(setup):
    engine, _ = setup
    with pytest.raises(KeyError, match="unexpected weight"):
        engine.update_weights([[("model.layers.99.mlp.up_proj.weight", torch.zeros(1))]], version=8)
    with pytest.raises(ValueError, match="has shape"):
        engine.update_weights([[("model.norm.weight", torch.zeros(3))]], version=8)


def test_each_static_batch_is_timed_with_its_size(setup):
    """timings.jsonl's decode records: one per batch of max_batch sequences, with the batch's rows,
    its prompt width (the longest prompt) and the decode steps it ran."""
    from megatron_fipo import timings

    engine, _ = setup
    timings.drain()
    engine.generate(PROMPTS, n=3, sampling=SamplingParams(temperature=0.0, max_new_tokens=6), seed=0)
    decode = timings.drain()["decode"]
    # 9 sequences, max_batch 5: prompt 0's three copies and two of prompt 1's (widths 4, 2), then
    # prompt 1's last copy and prompt 2's three (widths 2, 7); greedy without stop tokens runs all 6 steps.
    assert [r[:3] for r in decode] == [[5, 4, 6], [4, 7, 6]]
    assert all(r[3] > 0 for r in decode)
