"""The memory ledger (megatron_fipo/plan/memory.py): its terms against hand-computed values for the
32B and 7B recipes, their fit, the refusal of the 32B recipe as shipped before, and Megatron's
buffer padding on hand-made parameter lists. Every figure is computed, none measured on a GPU."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import ConfigError, load_config
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.plan.hardware import GPUS
from megatron_fipo.plan.memory import (
    MIN_HEADROOM,
    Param,
    build_ledger,
    check_fits,
    ddp_buffers,
    layout_from_config,
    logits_chunk_bytes,
    max_mem_fraction_static,
    megatron_params,
    optimizer_shard,
)
from megatron_fipo.validation import validate_launch, validate_memory

REPO = Path(__file__).resolve().parents[2]
GiB, MiB = 1 << 30, 1 << 20
H100 = 81559 * MiB  # nvidia-smi memory.total of an H100 80GB HBM3
# The 32B recipe as shipped before the ledger: trainer state resident during rollouts, SGLang at 0.8.
OLD_32B = ["actor.offload=false", "rollout.sglang.mem_fraction_static=0.8", "actor.logprob_chunk_size=2048"]


def ledger_of(recipe: str, *overrides: str):
    cfg = load_config(RunConfig, REPO / "examples" / recipe, overrides)
    arch = ModelArch.from_hf_config(REPO / cfg.actor.model_config)
    return build_ledger(layout_from_config(cfg, arch, cfg.launch.training_world_size))


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the recipes name their model config relative to the repo


def test_32b_trainer_terms():
    ledger = ledger_of("qwen2.5-32b-fipo-h100.yaml")
    lay, state = ledger.layout, ledger.state
    assert (lay.tp, lay.pp, lay.cp, lay.dp, lay.sequence_parallel) == (8, 1, 1, 16, True)
    # Qwen2.5-32B: h 5120, f 27648, 40 heads, 8 KV heads of 128, 64 layers, vocab 152064, untied.
    # Full model: 64 x (7168 x 5120 + 7168 + 5120^2 + 3 x 5120 x 27648 + 2 x 5120) + 2 x 152064 x 5120 + 5120.
    full = 64 * (7168 * 5120 + 7168 + 5120**2 + 3 * 5120 * 27648 + 2 * 5120) + 2 * 152064 * 5120 + 5120
    assert full == 32_763_876_352
    # Per TP=8 rank: QKV (40 + 16) x 128 / 8 = 896 rows and its bias, proj 5120 x 640, fc1 6912 x 5120,
    # fc2 5120 x 3456, norms replicated; embedding and output layer 152064 / 8 rows each.
    layer = 896 * 5120 + 896 + 5120 * 640 + 6912 * 5120 + 5120 * 3456 + 2 * 5120
    local = 64 * layer + 2 * 19008 * 5120 + 5120
    assert local == 4_096_062_464  # ~ 32.76e9 / 8 (norms are not split)
    assert local % 128 == 0  # every size a multiple of 64, the end of lcm(16, 128): no padding
    assert state.weights == state.param_bytes_unpadded == local * 2 == 8_192_124_928  # bf16
    assert state.grads == local * 4 == 16_384_249_856  # fp32 main_grad buffer
    shard = local // 16  # distributed optimizer over DP=16
    assert state.main_params == shard * 4 == 1_024_015_616
    assert state.moments == shard * 8 == 2_048_031_232
    assert ledger.host_bytes_per_node == 8 * (local * 2 + shard * 12)  # offload keeps weights + optimizer
    assert ledger.checkpoint_bytes_per_gpu == local * 2 + shard * 12 == 11_264_171_776


def test_32b_activation_terms():
    acts = ledger_of("qwen2.5-32b-fipo-h100.yaml").acts
    tokens, h, t = 22528, 5120, 8
    # Full recompute keeps each layer's input, 2 bytes x h / TP per token with SP, plus the final
    # norm's input and output.
    assert acts.stored == tokens * (64 * 2 * h // t + 2 * 2 * h // t) == 1_903_165_440
    # One layer at a time: 4 h / TP outside the TP regions (SP), q + attention output 2 x 40 x 128,
    # k + v 2 x 8 x 128, fc1 out 2 f and SwiGLU out f inside (/ TP, 2 bytes each), flash attention's
    # fp32 statistics 4 x 40 / TP; plus the all-gathered [s, h] input of a TP region.
    per_token = 2 * 4 * h // t + 2 * (2 * 40 * 128 + 2 * 8 * 128 + 3 * 27648) // t + 4 * 40 // t + 2 * h
    assert acts.workspace == tokens * per_token == tokens * 39_188
    # logprob_chunk_size 256 TP-local rows, gathered over TP=8: 2048 rows x 19008 vocab x
    # (2 bf16 logits + 4 z + 4 exp + 4 exp*z).
    assert acts.logits_chunk == 256 * 8 * 19008 * 14 == 544_997_376


def test_32b_sglang_terms():
    sg = ledger_of("qwen2.5-32b-fipo-h100.yaml").sglang
    # SGLang TP=4 rank: QKV (40/4 + 2 x 8/4) x 128 = 1792 rows and bias, o_proj 5120 x 1280,
    # gate_up 2 x 6912 x 5120, down 5120 x 6912, norms; embedding + LM head 152064 / 4 rows each.
    layer = 1792 * 5120 + 1792 + 5120 * 1280 + 2 * 6912 * 5120 + 5120 * 6912 + 2 * 5120
    assert sg.weights == (64 * layer + 2 * 38016 * 5120 + 5120) * 2 == 16_382_928_896
    # KV cache: 0.67 of the memory free before weights (GPU - SGLang's CUDA context 1 GiB - NCCL 1 GiB)
    # minus the weights; 2 KV heads x 128 x 64 layers x K,V x 2 bytes = 65536 B per token.
    assert sg.kv_cache == int(0.67 * (H100 - 2 * GiB)) - 16_382_928_896
    assert sg.kv_tokens == sg.kv_cache // (2 * 128 * 64 * 2 * 2) == 602_374
    # SGLang 0.5.23's own reserve: 512 + 1.5 x 8192 (chunked prefill) + 4/8 x 1024 + 2 x 512 (graph bs) MiB.
    assert sg.reserve == (512 + 12288 + 512 + 1024) * MiB


def test_7b_terms():
    ledger = ledger_of("qwen2.5-7b-fipo-h100.yaml")
    state, acts, sg = ledger.state, ledger.acts, ledger.sglang
    assert (ledger.layout.tp, ledger.layout.dp) == (2, 16)
    # Qwen2.5-7B: h 3584, f 18944, 28 heads, 4 KV heads of 128, 28 layers, vocab 152064, untied; TP=2.
    layer = 2304 * 3584 + 2304 + 3584 * 1792 + 18944 * 3584 + 3584 * 9472 + 2 * 3584
    local = 28 * layer + 2 * 76032 * 3584 + 3584
    assert local == 3_807_910_400 and local % 128 == 0
    assert (state.weights, state.grads) == (local * 2, local * 4)
    assert (state.main_params, state.moments) == (local // 16 * 4, local // 16 * 8)
    tokens, h = 24576, 3584
    assert acts.stored == tokens * (28 * 2 * h // 2 + 2 * 2 * h // 2)
    assert acts.workspace == tokens * (2 * 4 * h // 2 + 2 * (2 * 28 * 128 + 2 * 4 * 128 + 3 * 18944) // 2
                                       + 4 * 28 // 2 + 2 * h)
    assert acts.logits_chunk == 512 * 2 * 76032 * 14
    # SGLang TP=1: the whole model, 4 KV heads: 4 x 128 x 28 x 2 x 2 = 57344 B per token.
    sg_layer = 4608 * 3584 + 4608 + 3584 * 3584 + 2 * 18944 * 3584 + 3584 * 18944 + 2 * 3584
    assert sg.weights == (28 * sg_layer + 2 * 152064 * 3584 + 3584) * 2 == 15_231_233_024
    assert sg.kv_cache == int(0.68 * (H100 - 2 * GiB)) - sg.weights
    assert sg.kv_tokens == sg.kv_cache // 57344
    assert sg.reserve == (512 + 12288 + 128 + 512) * MiB


@pytest.mark.parametrize("recipe,kv_tokens", [
    ("qwen2.5-32b-fipo-h100.yaml", 16 * (2048 + 20480)),  # a whole prompt group's longest responses, at least
    ("qwen2.5-7b-fipo-h100.yaml", 16 * (2048 + 20480)),
    # 8 KV heads x 36 layers: 144 KiB a token; half of a 32-sample group at full length, at least.
    ("qwen3-8b-fipo-h100.yaml", 16 * (2048 + 10240)),
])
def test_recipe_fits_each_phase_with_headroom(recipe, kv_tokens):
    ledger = ledger_of(recipe)
    assert [p.name for p in ledger.phases] == ["rollout", "old-logprob", "training", "weight-sync"]
    for phase in ledger.phases:
        assert phase.headroom >= MIN_HEADROOM == 0.10, (phase.name, phase.headroom)
    check_fits(ledger)
    lay = ledger.layout
    # The recipe's SGLang fraction is the ledger's: the largest that keeps the rollout's headroom.
    assert lay.sglang.mem_fraction_static == max_mem_fraction_static(lay)
    over = build_ledger(replace(lay, sglang=replace(lay.sglang, mem_fraction_static=lay.sglang.mem_fraction_static + 0.01)))
    assert over.phase("rollout").headroom < MIN_HEADROOM
    assert ledger.sglang.kv_tokens >= kv_tokens


def test_rollout_with_offload_holds_only_the_trainer_residual():
    on, off = ledger_of("qwen2.5-32b-fipo-h100.yaml"), ledger_of("qwen2.5-32b-fipo-h100.yaml", "actor.offload=false")
    freed = off.phase("rollout").used - on.phase("rollout").used
    assert freed == on.state.total - on.layout.overheads.trainer_kept_offloaded
    assert off.host_bytes_per_node == 0
    assert on.phase("training").used == off.phase("training").used  # onloaded for training


def test_disaggregated_serves_on_gpus_of_its_own():
    ledger = ledger_of("qwen2.5-32b-fipo-h100.yaml", "rollout.placement=disaggregated", "launch.nodes=20",
                       "launch.sglang_nodes=4", "rollout.sglang.num_servers=8")
    names = [p.name for p in ledger.phases]
    assert names == ["rollout", "rollout on SGLang GPUs", "old-logprob", "training", "weight-sync"]
    for name in ("rollout", "old-logprob", "training", "weight-sync"):
        assert not any(t.name.startswith("SGLang") for t in ledger.phase(name).terms), name
    serving = ledger.serving_phase
    assert serving.name == "rollout on SGLang GPUs" and serving.used == (
        2 * GiB + int(0.67 * (H100 - 2 * GiB)) + 14336 * MiB)  # contexts, weights + KV cache, reserve
    # Alone on its GPU SGLang may take more: (0.9 x GPU - contexts - reserve) / pre-load memory.
    frac = max_mem_fraction_static(ledger.layout)
    assert frac == int(100 * (0.9 * H100 - 2 * GiB - 14336 * MiB) / (H100 - 2 * GiB)) / 100 == 0.71


def test_32b_as_shipped_before_is_refused_naming_the_largest_term():
    ledger = ledger_of("qwen2.5-32b-fipo-h100.yaml", *OLD_32B)
    rollout = ledger.phase("rollout")
    assert rollout.used > H100  # not even without headroom
    assert rollout.largest.name == "SGLang KV cache"
    assert rollout.largest.bytes == int(0.8 * (H100 - 2 * GiB)) - 16_382_928_896
    with pytest.raises(ConfigError) as err:
        check_fits(ledger)
    message = str(err.value)
    assert "rollout phase" in message and "largest term: SGLang KV cache 46.9 GiB" in message
    assert "enable actor.offload and set rollout.sglang.mem_fraction_static to 0.67" in message


def test_launch_and_train_refuse_only_on_gpus(tmp_path):
    cfg = load_config(RunConfig, REPO / "examples" / "qwen2.5-32b-fipo-h100.yaml",
                      [*OLD_32B, "rollout.sglang.python=/opt/sglang/bin/python", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="largest term: SGLang KV cache"):
        validate_launch(cfg)
    arch = ModelArch.from_hf_config(cfg.actor.model_config)
    validate_memory(cfg, arch, 128, enforce=False)  # a CPU run: informational
    with pytest.raises(ConfigError, match="largest term: SGLang KV cache"):
        validate_memory(cfg, arch, 128, enforce=True)


def test_train_enforces_where_a_gpu_is_visible(monkeypatch):
    import megatron_fipo.validation as validation

    monkeypatch.setattr(validation.os.path, "exists", lambda path: path == "/dev/nvidiactl")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert validation.gpus_visible()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not validation.gpus_visible()
    monkeypatch.setattr(validation.os.path, "exists", lambda path: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert not validation.gpus_visible()


def test_plan_memory_command():
    def plan(*args):
        return subprocess.run([sys.executable, "-m", "megatron_fipo.cli", "plan", "--memory", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=60)

    ok = plan("examples/qwen2.5-32b-fipo-h100.yaml")
    assert ok.returncode == 0, ok.stderr
    for line in ("rollout", "old-logprob", "training", "weight-sync", "SGLang KV cache", "headroom", "fits"):
        assert line in ok.stdout
    bad = plan("examples/qwen2.5-32b-fipo-h100.yaml", *OLD_32B)
    assert bad.returncode == 1 and "largest term: SGLang KV cache" in bad.stdout
    h200 = plan("examples/qwen2.5-32b-fipo-h100.yaml", *OLD_32B, "--gpu", "h200-141gb")
    assert "h200-141gb 140.40 GiB" in h200.stdout
    unknown = plan("examples/qwen2.5-32b-fipo-h100.yaml", "--gpu", "a100")
    assert unknown.returncode == 2 and "--gpu: unknown GPU 'a100'" in unknown.stderr


def test_buffer_padding_and_optimizer_shards():
    # Megatron lays parameters out in reverse order, each from a 64-element boundary, and pads the
    # bucket's end to lcm(DP, 128): c at [0, 100), b at [128, 158), a at [192, 202) -> end 256.
    params = [Param("a", 10, 2), Param("b", 30, 2), Param("c", 100, 2), Param("norm", 5, 4)]
    bf16, fp32 = ddp_buffers(params, shards=2, distributed_optimizer=True)
    assert bf16.ranges == ((0, 100, 2), (128, 158, 2), (192, 202, 2)) and bf16.numel == 256
    assert (fp32.numel, fp32.numel_unpadded) == (128, 5)
    # Two shards of 128 each: rank 0 [0, 128) holds c's 100 elements, rank 1 [128, 256) b's 30 and a's
    # 10; of the fp32 buffer's [0, 64) and [64, 128), rank 0 holds the norm's 5 (its own master copy).
    def shard(buffers, rank, distributed=True):
        s = optimizer_shard(buffers, 2, rank, distributed)
        return s.elements, s.lowp_elements

    assert shard([bf16, fp32], 0) == (100 + 5, 100)
    assert shard([bf16, fp32], 1) == (30 + 10, 40)
    # Without the distributed optimizer: back to back, no padding, every rank holds everything.
    (plain, _) = ddp_buffers(params, shards=2, distributed_optimizer=False)
    assert plain.numel == 140 and shard([plain], 0, distributed=False) == (140, 140)


def test_tied_embedding_gets_its_own_bucket_on_a_pipeline_stage():
    emb = Param("embedding", 100, 2, shared_embedding=True)
    (buf,) = ddp_buffers([emb, Param("w", 70, 2)], shards=1, distributed_optimizer=True)
    # w [0, 70) closes its bucket at 128 before the shared embedding starts a new one.
    assert buf.buckets == ((0, 128), (128, 256)) and buf.ranges == ((0, 70, 2), (128, 228, 2))


def test_hardware_table_is_the_driver_totals():
    assert {name: g.memory_bytes // MiB for name, g in GPUS.items()} == {
        "h100-80gb": 81559, "h200-141gb": 143771, "b200": 183359, "gb200": 189471}


def test_vocabulary_tp_does_not_divide_is_sized_padded_as_the_actor_builds_it():
    # Vocab 1003 at TP=2: the actor pads to 1004 (model_arch.padded_vocab_size), 502 rows a rank.
    ledger = ledger_of("qwen2.5-7b-fipo-h100.yaml")
    arch = replace(ledger.layout.arch, vocab_size=1003)
    lay = replace(ledger.layout, arch=arch)
    params = {p.name: p.numel for p in megatron_params(lay, 0)}
    assert params["embedding.word_embeddings.weight"] == params["output_layer.weight"] == 502 * 3584
    assert logits_chunk_bytes(lay) == 512 * 2 * 502 * 14
