"""A real CPU SGLang server serves tiny Qwen3 and Llama 3.x models exported by the bridge; its greedy
tokens equal transformers' and its logprobs match transformers' to 1e-5, both from the snapshot it
starts from and after a weight update through update_weights_from_tensor (q_norm / k_norm included).

Qwen3: QK-norm, no QKV bias, query width 4 x 32 = 2 x hidden. Llama 3.x: Llama 3 RoPE scaling with
bands other than Llama 3.1's. The server is set up as in test_sglang_engine.py (one server here).
"""

import pytest
import torch

from megatron_fipo.bridge.hf_io import HFCheckpointReader
from megatron_fipo.bridge.mapping import hf_names
from megatron_fipo.config import RolloutConfig, SGLangConfig
from megatron_fipo.rollout.base import SamplingParams
from megatron_fipo.rollout.sglang_engine import SGLangEngine
from megatron_fipo.testing import hf_response_logprobs, make_hf_checkpoint
from tests.helpers.launch import free_port
from tests.integration.test_sglang_engine import API_KEY, CPU_ARGS, PROMPTS, SGLANG_PYTHON

TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # fp32 on both sides; logprobs of a few nats


@pytest.fixture(scope="module", params=["qwen3", "llama"], ids=["qwen3", "llama3"])
def served(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp(f"sglang_{request.param}")
    hf_dir = make_hf_checkpoint(root / "hf", seed=5, family=request.param)
    update_dir = make_hf_checkpoint(root / "hf_update", seed=6, family=request.param)
    reader = HFCheckpointReader(hf_dir)
    arch = reader.arch()
    cfg = RolloutConfig(engine="sglang", sglang=SGLangConfig(
        python=str(SGLANG_PYTHON), base_port=free_port(), mem_fraction_static=0.05, extra_args=CPU_ARGS,
        api_key=API_KEY, release_memory=False, weight_transport="tensor", startup_timeout_s=600, num_servers=1))
    engine = SGLangEngine(cfg, arch, root / "run")
    # The server starts from the bridge's snapshot: its config.json is ModelArch.to_hf_config()'s.
    engine.update_weights([[(n, reader.read(n)) for n in hf_names(arch)]], version=0)
    try:
        engine.resume()  # the first generation phase launches the server from the snapshot
    except BaseException:
        engine.shutdown()  # a server that did start must not outlive the test
        raise
    models = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in (hf_dir, update_dir)]
    yield engine, models, HFCheckpointReader(update_dir), arch
    engine.shutdown()


def _assert_greedy_equals(engine, hf):
    groups = engine.generate(PROMPTS, n=1, sampling=SamplingParams(temperature=0.0, max_new_tokens=12), seed=0)
    for prompt, (sample,) in zip(PROMPTS, groups):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        assert sample.response_ids == out[0, len(prompt):].tolist()
        want = hf_response_logprobs(hf, prompt, sample.response_ids, 1.0)
        torch.testing.assert_close(torch.tensor(sample.logprobs), want, **TOLERANCE)


def test_greedy_tokens_and_logprobs_equal_transformers(served):
    engine, (hf, _), _, _ = served
    _assert_greedy_equals(engine, hf)


def test_sampled_logprobs_equal_transformers(served):
    engine, (hf, _), _, _ = served
    groups = engine.generate(PROMPTS, n=2, sampling=SamplingParams(temperature=0.7, max_new_tokens=10), seed=0)
    for prompt, group in zip(PROMPTS, groups):
        for sample in group:
            torch.testing.assert_close(torch.tensor(sample.logprobs),
                                       hf_response_logprobs(hf, prompt, sample.response_ids, 0.7), **TOLERANCE)


def test_weight_update_from_tensors_is_served(served):
    engine, (_, updated), reader, arch = served
    engine.update_weights([[(n, reader.read(n)) for n in hf_names(arch)]], version=1)
    _assert_greedy_equals(engine, updated)
