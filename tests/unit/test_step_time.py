"""The step-time model (plan/step_time.py), the layout planner (plan/layouts.py) and the calibration
fit (plan/calibrate.py): formulas on hand-computed inputs, the NeMo-RL anchor, and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import ConfigError, load_config
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.plan import calibrate
from megatron_fipo.plan.hardware import GPUS
from megatron_fipo.plan.layouts import Assumptions, config_estimate, enumerate_layouts, workload_from_config
from megatron_fipo.plan.step_time import (CPU, CPU_EFFICIENCY, Efficiency, ModelShape, ResponseLengths, StepLayout,
                                          Workload, _segment, decode_engine, estimate, partition, pass_phase)

H100 = GPUS["h100-80gb"]
# Qwen3-32B (config.json): q width 64 x 128 = 8192 differs from hidden 5120, which ModelArch refuses;
# the planner needs only the counts.
QWEN3_32B = ModelShape(hidden=5120, layers=64, q_heads=64, kv_heads=8, head_dim=128, ffn=25600, vocab=151936)

# NeMo-RL v0.5, docs/about/performance-summary.md (NVIDIA-NeMo/RL at 108bffd, "Nemo RL v0.5", H100 BF16):
# GRPO Qwen3-32B on-policy, T-max sequence 4,096, G-average 3,251, 32 GPUs, G-GBS 2,048, T-GBS 512,
# generation [TP 4, PP 1], training [TP 4, CP 1, EP 1, PP 4], 571 tokens/s/GPU, step 376 s. Recipe
# grpo-qwen3-32b-4n8g.yaml over grpo_math_1B.yaml: 64 prompts x 32 generations, sequence parallel,
# sequence packing at 4,096 tokens per micro-batch, no activation checkpointing, colocated vLLM,
# reference-policy KL 0.01 (a second logprob pass). Mean prompt: 571 x 32 x 376 / 2,048 - 3,251 = 103.
NEMO_TOKENS_PER_GPU_S, NEMO_STEP_S = 571, 376
NEMO_WORKLOAD = Workload(prompts_per_step=64, n_samples=32, prompt_len=103, lengths=ResponseLengths(3251, 4096 - 103),
                         gen_prompts_per_batch=64, gen_batches=1, minibatch_prompts=16, logprob_passes=2)
NEMO_LAYOUT = StepLayout(tp=4, pp=4, dp=2, sequence_parallel=True, tokens_per_microbatch=4096, engine_tp=4, engines=8,
                         concurrency=256)  # vLLM's max_num_seqs; the KV cache at 0.6 memory holds more


def test_qwen3_32b_counts():
    layer = 5120 * (8192 + 2 * 1024) + 8192 * 5120 + 3 * 5120 * 25600
    assert QWEN3_32B.layer_params == layer == 487_587_840
    assert QWEN3_32B.params == 64 * layer + 2 * 151936 * 5120 == 32_761_446_400  # Qwen3-32B: 32.8B
    assert QWEN3_32B.matmul_params == 64 * layer + 151936 * 5120
    assert QWEN3_32B.kv_bytes_per_token() == 2 * 64 * 8 * 128 * 2


def test_forward_flops_formula():
    shape = ModelShape(hidden=8, layers=2, q_heads=2, kv_heads=1, head_dim=4, ffn=16, vocab=10)
    n = shape.matmul_params
    # two sequences of 3 and 5 tokens: causal pairs (9 + 25) / 2
    assert shape.forward_flops(8, 9 + 25) == 2 * n * 8 + 4 * 2 * 8 * 17


def test_nemo_rl_anchor_from_data_sheet_constants():
    """The published step of NeMo-RL v0.5 GRPO Qwen3-32B on 32 H100, predicted from H100 data-sheet
    constants and the default efficiencies, not calibrated on it: within 35%."""
    est = estimate(QWEN3_32B, H100, NEMO_LAYOUT, NEMO_WORKLOAD, Efficiency())
    assert est.train_tokens == pytest.approx(NEMO_TOKENS_PER_GPU_S * 32 * NEMO_STEP_S, rel=0.02)
    assert est.seconds == pytest.approx(NEMO_STEP_S, rel=0.35)
    assert est.tokens_per_s_per_gpu == pytest.approx(NEMO_TOKENS_PER_GPU_S, rel=0.35)
    # the terms that dominate: decode and the two forward+backward phases
    phases = {p.name: p.seconds for p in est.phases}
    assert phases["train"] > phases["old_logprob"] > 0.5 * phases["rollout"] > phases["sync"]


def _brute_decode(lengths, prompt, slots, continuous, m_kv, c_seq):
    """Step-by-step simulation: each step costs max(K x m_kv, a x c_seq) for the sequences in flight."""
    pending, active, t, total, steps = list(lengths), [], 0, 0.0, 0
    if not continuous:
        for start in range(0, len(lengths), slots):
            batch = lengths[start:start + slots]
            for step in range(max(batch)):
                k = len(batch) * (prompt + step)
                total += max(k * m_kv, len(batch) * c_seq)
                steps += 1
        return steps, total
    while pending or active:
        while pending and len(active) < slots:
            active.append([pending.pop(0), 0])
        k = sum(prompt + done for _, done in active)
        total += max(k * m_kv, len(active) * c_seq)
        steps += 1
        for seq in active:
            seq[1] += 1
        active = [s for s in active if s[1] < s[0]]
    return steps, total


@pytest.mark.parametrize("slots,continuous", [(4, True), (2, True), (1, True), (2, False), (3, False)])
def test_decode_engine_equals_step_simulation(slots, continuous):
    lengths = (3, 5, 2, 4, 7, 1)
    dec = decode_engine(lengths, 2.0, slots, continuous, (0.0, 1.0), (3.0, 0.0))
    steps, seconds = _brute_decode(list(lengths), 2, slots, continuous, 1.0, 3.0)
    assert dec.steps == steps
    assert dec.seconds_mem + dec.seconds_compute == pytest.approx(seconds, rel=1e-9)


def test_segment_splits_at_the_crossover():
    for m0, m1, c0, c1, d in [(0, 2, 10, 0, 12), (10, 0, 0, 2, 12), (5, 1, 1, 1, 7), (1, 3, 20, 1, 30)]:
        mem, comp = _segment(d, m0, m1, c0, c1)
        brute = sum(max(m0 + m1 * t, c0 + c1 * t) for t in range(d))
        assert mem + comp == pytest.approx(brute, rel=0.02)  # the crossover lands between steps


def test_partition_is_the_actors():
    from megatron_fipo.actor.batching import partition as actor_partition
    from megatron_fipo.sequences import SequenceBatch

    lengths = [5, 9, 3, 12, 4, 4, 8, 2, 7]
    batch = SequenceBatch([[1] * (n - 1) for n in lengths], [[2] for _ in lengths])
    for pack in (True, False):
        ours = partition(lengths, 16, pack)
        theirs = [[lengths[i] for i in group] for group in actor_partition(batch, 16, pack)]
        assert ours == theirs


def test_pipeline_bubble_is_pp_minus_one_over_m():
    wl = replace(NEMO_WORKLOAD, logprob_passes=1)
    phase = pass_phase("train", QWEN3_32B, H100, NEMO_LAYOUT, wl, Efficiency(), backward=True)
    terms = {t.name: t.seconds for t in phase.terms}
    from megatron_fipo.plan.step_time import microbatches

    m = microbatches(wl, NEMO_LAYOUT).per_minibatch
    assert terms["pipeline bubble"] == pytest.approx(terms["GEMMs + attention"] * 3 / m, rel=1e-9)


def test_expected_generation_batches():
    assert Workload.expected_gen_batches(512, 2048, 0.1, 10) == 3  # ceil(512 / 204.8)
    assert Workload.expected_gen_batches(512, 2048, 0.01, 10) == 10  # capped
    assert Workload.expected_gen_batches(512, 2048, 0.0, 10) == 10
    assert Workload.expected_gen_batches(512, 512, 1.0, 10) == 1


def test_response_lengths_mean_and_tail():
    lengths = ResponseLengths(3251, 3993).sample(20000)
    assert sum(lengths) / len(lengths) == pytest.approx(3251, rel=0.01)
    assert max(lengths) == pytest.approx(3993, rel=0.01)
    with pytest.raises(ConfigError, match="mean"):
        ResponseLengths(10, 5)


def _recipe() -> tuple[RunConfig, ModelArch]:
    cfg = load_config(RunConfig, "examples/qwen2.5-32b-fipo-h100.yaml", [])
    return cfg, ModelArch.from_hf_config(cfg.actor.model_config)


def test_a_client_concurrency_cap_starves_the_recipes_engines():
    """rollout.sglang.max_concurrency 256 (its old default) spread over 32 engines leaves 8 sequences
    in flight each, far below what their KV caches hold; the default 0 leaves the KV cache to decide."""
    cfg, arch = _recipe()
    wl = workload_from_config(cfg)
    capped = replace(cfg, rollout=replace(cfg.rollout, sglang=replace(cfg.rollout.sglang, max_concurrency=256)))
    est, headroom = config_estimate(capped, arch, H100, wl, Efficiency(), 8)
    assert est.layout.concurrency == 256 // 32
    assert cfg.rollout.sglang.max_concurrency == 0
    faster, _ = config_estimate(cfg, arch, H100, wl, Efficiency(), 8)
    assert faster.layout.concurrency > 8 * 8
    assert faster.phase("rollout").seconds < est.phase("rollout").seconds / 3
    assert headroom is not None and headroom >= 0.10


def test_enumerated_layouts_fit_and_rank():
    cfg, arch = _recipe()
    wl = workload_from_config(cfg, Assumptions(response_mean=4096))
    ranked = enumerate_layouts(cfg, arch, H100, 4, 8, wl, Efficiency(), disaggregated=False)
    assert ranked and all(c.headroom >= 0.10 for c in ranked)
    times = [c.estimate.seconds for c in ranked]
    assert times == sorted(times)
    best = ranked[0]
    assert best.cfg.parallel.model_parallel_size * best.estimate.layout.dp == 32
    assert f"rollout.sglang.tp_size={best.cfg.rollout.sglang.tp_size}" in best.overrides


def _synthetic_run(eff: Efficiency, workloads: list[Workload], layout: StepLayout):
    shape = ModelShape(hidden=128, layers=3, q_heads=4, kv_heads=2, head_dim=32, ffn=384, vocab=64, tied_embeddings=True)
    rows = []
    for wl in workloads:
        predict = calibrate.predictor(shape, CPU, layout, wl)
        rows.append((predict(eff), predict))
    return rows


def test_calibration_recovers_the_phases_it_was_fitted_to():
    """Steps timed by the model at known factors: the fit from the CPU placeholders reproduces every
    phase of every step (the factors themselves need not be unique)."""
    true = replace(CPU_EFFICIENCY, train_mfu=0.11, forward_mfu=0.07, decode_mfu=0.05, score_s_per_sample=1e-3,
                   sync_latency_s=4e-3, optimizer_step_s=0.05)
    lay = StepLayout(packing=False, tokens_per_microbatch=4096, concurrency=256, continuous_batching=False,
                     prefix_sharing=False, transport="inprocess")
    wls = [Workload(32, 8, 10, ResponseLengths(mean, 6), 48, batches, 8) for mean, batches in ((5.5, 2), (4.0, 1))]
    rows = _synthetic_run(true, wls, lay)
    fitted = calibrate.fit([rows], CPU_EFFICIENCY)
    for measured, predict in rows:
        for phase, seconds in predict(fitted).items():
            if phase in calibrate.PHASES:
                assert seconds == pytest.approx(measured[phase], rel=0.03), phase


def test_calibration_file(tmp_path):
    eff = replace(Efficiency(), train_mfu=0.123)
    calibrate.save(eff, tmp_path / "c.json", "h100-80gb", ["runs/a"])
    assert calibrate.load(tmp_path / "c.json") == ("h100-80gb", eff)
    data = json.loads((tmp_path / "c.json").read_text())
    data["efficiency"]["warp_speed"] = 9
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="warp_speed"):
        calibrate.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="metrics.jsonl"):
        calibrate.read_steps(tmp_path, RunConfig())


def test_cli_plan_of_the_tiny_config(capsys):
    from megatron_fipo.cli import main

    assert main(["plan", "examples/tiny_cpu.yaml", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "model estimates, not measurements" in out
    for phase in ("rollout", "old_logprob", "train", "sync", "checkpoint"):
        assert f"  {phase}" in out
    assert main(["plan", "examples/tiny_cpu.yaml", "--gpu", "tpu-v9"]) == 2
    assert "unknown device" in capsys.readouterr().err


def test_cli_calibrate_saves_and_plans_with_the_factors(tmp_path, capsys):
    """A run directory whose metrics were timed by the model at known factors (a stand-in for a
    training run, which the integration test makes for real): --calibrate saves factors that
    reproduce its phases, and --efficiency / --from-run plan with them."""
    from megatron_fipo.cli import main
    from megatron_fipo.config_base import save_config
    from megatron_fipo.plan.layouts import step_layout

    cfg = load_config(RunConfig, "examples/tiny_cpu.yaml", [f"run_dir={tmp_path}"])
    save_config(cfg, tmp_path / "config.yaml")
    shape = ModelShape.from_arch(ModelArch.from_hf_config(cfg.actor.model_config))
    true = replace(CPU_EFFICIENCY, train_mfu=0.2, forward_mfu=0.1)
    rows = []
    for step, (mean, batches) in enumerate([(5.6, 2), (5.5, 2), (4.4, 1), (4.0, 1)], 1):
        wl = Workload(32, 8, 5.0, ResponseLengths(mean, 6), 48, batches, 8, score_s_per_sample=1e-3)
        t = {p.name: p.seconds for p in estimate(shape, CPU, step_layout(cfg, CPU, 1, 1, None, wl), wl, true).phases}
        rows.append({"step": step, "time/rollout_s": t["rollout"], "time/old_logprob_s": t["old_logprob"],
                     "time/train_s": t["old_logprob"] + t["train"], "time/sync_s": t["sync"],
                     "time/reward_s": 1e-3 * 384 * batches, "train/tokens": 256 * (5 + mean), "train/samples": 256,
                     "train/world_size": 1, "rollout/samples_generated": 384 * batches,
                     "response_length/mean": mean, "response_length/max": 6, "rollout/gen_batches": batches})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cal.json"
    assert main(["plan", "examples/tiny_cpu.yaml", "--calibrate", str(tmp_path), "--calibration-out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "calibration saved" in report and "model estimates" in report
    device, fitted = calibrate.load(out)
    assert device == "cpu"
    for measured, predict in calibrate.run_rows(tmp_path, CPU):
        for phase, seconds in predict(fitted).items():
            if phase in calibrate.PHASES:
                assert seconds == pytest.approx(measured[phase], rel=0.03), phase
    assert main(["plan", "examples/tiny_cpu.yaml", "--efficiency", str(out), "--from-run", str(tmp_path)]) == 0
    assert "measured in" in capsys.readouterr().out
    assert main(["plan", "examples/tiny_cpu.yaml", "--efficiency", str(out), "--gpu", "h100-80gb"]) == 2
    assert "calibrated on cpu" in capsys.readouterr().err


def test_timed_calls_separate_per_call_cost_from_flop_rate(tmp_path):
    """A run whose steps all make the same calls cannot tell a fixed cost per call from a cost per
    FLOP; timings.jsonl's calls of different sizes can. A run timed by the model at known factors,
    with micro-batches of 16 and 64 rows and decode batches of 128 and 256 sequences: the fit
    predicts calls of sizes it never saw (256-row micro-batches, 768-sequence decode batches) to 3%."""
    from megatron_fipo import timings
    from megatron_fipo.config_base import save_config
    from megatron_fipo.plan.layouts import step_layout
    from megatron_fipo.plan.step_time import decode_batch_seconds, microbatch_seconds

    cfg = load_config(RunConfig, "examples/tiny_cpu.yaml", [f"run_dir={tmp_path}"])
    save_config(cfg, tmp_path / "config.yaml")
    shape = ModelShape.from_arch(ModelArch.from_hf_config(cfg.actor.model_config))
    true = replace(CPU_EFFICIENCY, microbatch_latency_s=0.02, backward_latency_factor=1.5, train_mfu=0.08,
                   forward_mfu=0.1, decode_mfu=0.05, decode_step_latency_s=4e-3, score_s_per_sample=1e-4)
    rows = []
    for step, mean in enumerate([5.6, 5.5, 4.4, 4.0], 1):
        wl = Workload(32, 8, 5.0, ResponseLengths(mean, 6), 48, 1, 8, score_s_per_sample=1e-4)
        lay = step_layout(cfg, CPU, 1, 1, None, wl)
        t = {p.name: p.seconds for p in estimate(shape, CPU, lay, wl, true).phases}
        rows.append({"step": step, "time/rollout_s": t["rollout"], "time/old_logprob_s": t["old_logprob"],
                     "time/train_s": t["old_logprob"] + t["train"], "time/sync_s": t["sync"],
                     "time/reward_s": 1e-4 * 384, "train/tokens": 256 * (5 + mean), "train/samples": 256,
                     "train/world_size": 1, "rollout/samples_generated": 384,
                     "response_length/mean": mean, "response_length/max": 6, "rollout/gen_batches": 1})
        calls = {kind: [[r * 11, r * 121, microbatch_seconds(shape, CPU, lay, true, kind == "train", r * 11, r * 121)]
                        for r in (64, 16)] for kind in ("forward", "train")}
        calls["decode"] = [[r, 5, 6, decode_batch_seconds(shape, CPU, lay, true, r, 5, 6)] for r in (256, 128)]
        timings.append(tmp_path, step, calls)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fitted, _ = calibrate.calibrate([str(tmp_path)], CPU, CPU_EFFICIENCY)
    for backward in (False, True):
        assert microbatch_seconds(shape, CPU, lay, fitted, backward, 256 * 11, 256 * 121) == pytest.approx(
            microbatch_seconds(shape, CPU, lay, true, backward, 256 * 11, 256 * 121), rel=0.03)
    assert decode_batch_seconds(shape, CPU, lay, fitted, 768, 5, 6) == pytest.approx(
        decode_batch_seconds(shape, CPU, lay, true, 768, 5, 6), rel=0.03)
