"""The memory ledger's trainer terms against the bytes of the actor's own tensors (torchrun x2, gloo, CPU).

Two launches, TP=1 (so DP=2: two optimizer shards) and TP=2 (DP=1), each building the tiny model
(examples/tiny_qwen2, tied embeddings) in bf16 and fp32 and a ~101M-parameter untied Qwen2 whose
sizes are not multiples of 64 (hidden 720, QKV rows 1200), so Megatron's alignment gaps and bucket
padding show. On every rank, exactly:

- the parameters, name by name (numel and element size), and their total bytes;
- the DDP param buffer and fp32 grad buffer, padding included: with the distributed optimizer
  Megatron starts each parameter on a 64-element boundary and pads the bucket's end to a multiple
  of lcm(DP, 128) elements;
- the distributed optimizer's fp32 main params (bf16 parameters only: fp32 ones are their own) and
  Adam's exp_avg + exp_avg_sq, over the rank's shard of each bucket (padding holds no state).
  torch Adam's per-tensor ``step`` counters (4 bytes each, host-side scalars) are not counted.

The CPU builds Megatron's local layer spec, whose torch.nn.RMSNorm keeps fp32 norm weights in a
buffer of their own: the ledger is asked for ``spec="local"``.
"""

import json
from pathlib import Path

import pytest
from helpers.launch import torchrun

from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import from_dict
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.plan.memory import layout_from_config, megatron_params, trainer_state

pytestmark = pytest.mark.multiprocess
WORKER = Path(__file__).with_name("ledger_worker.py")
TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny_qwen2" / "config.json"
QWEN2_101M = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 32000, "hidden_size": 720,
    "intermediate_size": 1920, "num_hidden_layers": 10, "num_attention_heads": 12, "num_key_value_heads": 4,
    "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}
CASES = {"tiny_bf16": ("tiny", "bf16"), "tiny_fp32": ("tiny", "fp32"), "qwen2_101m_bf16": ("101m", "bf16")}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("ledger")
    (root / "101m").mkdir()
    (root / "101m" / "config.json").write_text(json.dumps(QWEN2_101M))
    configs = {"tiny": str(TINY), "101m": str(root / "101m" / "config.json")}
    out = {}
    for tp in (1, 2):
        d = root / f"tp{tp}"
        d.mkdir()
        torchrun(2, WORKER, str(d), str(tp), *(f"{name}:{configs[m]}:{prec}" for name, (m, prec) in CASES.items()))
        for name in CASES:
            out[tp, name] = [json.loads((d / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]
    return configs, out


def test_101m_model_is_about_100m_parameters():
    lay = layout_from_config(from_dict(RunConfig, {}), ModelArch.from_hf_config(QWEN2_101M), 1, spec="local")
    # Embedding and output layer 2 x 32000 x 720; per layer QKV (12 + 2 x 4) x 60 = 1200 rows x 720 and
    # its bias, proj 720 x 720, fc1 2 x 1920 x 720, fc2 720 x 1920, two norms; the final norm.
    layer = 1200 * 720 + 1200 + 720 * 720 + 2 * 1920 * 720 + 720 * 1920 + 2 * 720
    assert sum(p.numel for p in megatron_params(lay, 0)) == 2 * 32000 * 720 + 10 * layer + 720 == 101_403_120


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_ledger_equals_measured_tensor_bytes(measured, tp, case):
    configs, out = measured
    model, precision = CASES[case]
    cfg = from_dict(RunConfig, {"actor": {"model_config": configs[model], "precision": precision},
                                "parallel": {"tensor_model_parallel_size": tp}})
    lay = layout_from_config(cfg, ModelArch.from_hf_config(configs[model]), world_size=2, spec="local")
    assert lay.dp == 2 // tp
    for rank in out[tp, case]:
        state = trainer_state(lay, pp_rank=0, dp_rank=rank["dp_rank"])
        assert [tuple(p) for p in rank["params"]] == [(p.name, p.numel, p.elem_bytes) for p in megatron_params(lay, 0)]
        assert state.param_bytes_unpadded == rank["param_bytes"]
        assert state.weights == rank["param_buffer_bytes"]
        assert state.grads == rank["grad_buffer_bytes"]
        assert state.main_params == rank["main_param_bytes"]
        assert state.moments == rank["moment_bytes"]
        assert state.moments > 0 and (state.main_params > 0) == (precision == "bf16")


def test_padding_shows_where_sizes_are_not_multiples_of_64(measured):
    _, out = measured
    rank0 = out[1, "qwen2_101m_bf16"][0]
    # 64-element alignment gaps and the bucket's end padding: the buffer is larger than the parameters.
    assert rank0["param_buffer_bytes"] - rank0["param_bytes"] == 4352
    # Two DP ranks split each padded bucket evenly; the last shard holds the padding, so less state.
    assert [r["moment_bytes"] for r in out[1, "qwen2_101m_bf16"]] == [405_612_672, 405_612_288]
