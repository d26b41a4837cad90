"""The planner's asynchronous mode (plan/step_time.py): with trainer.max_staleness > 0 and engines on
GPUs of their own, a step is max(rollout, old_logprob + train) + sync + checkpoint; on hand-computed
phases, and through a config (torch-free)."""

from dataclasses import replace

import pytest

from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import load_config
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.plan.layouts import config_estimate, workload_from_config
from megatron_fipo.plan.step_time import CPU, CPU_EFFICIENCY, PhaseTime, StepEstimate, StepLayout, Term


def _estimate(lay: StepLayout, rollout: float) -> StepEstimate:
    phases = tuple(PhaseTime(name, (Term(name, s, ""),)) for name, s in
                   (("rollout", rollout), ("old_logprob", 2.0), ("train", 5.0), ("sync", 1.0), ("checkpoint", 0.5)))
    return StepEstimate(phases, lay, None, 1.0, 1.0, 1, 1.0, "cpu")


def test_asynchronous_step_is_the_longer_of_rollout_and_training_plus_sync_and_checkpoint():
    sync_lay = StepLayout(colocated=False)
    async_lay = replace(sync_lay, max_staleness=1)
    assert _estimate(sync_lay, 10.0).seconds == 10 + 2 + 5 + 1 + 0.5 == 18.5
    assert _estimate(async_lay, 10.0).seconds == max(10, 2 + 5) + 1 + 0.5 == 11.5  # rollout-bound
    assert _estimate(async_lay, 3.0).seconds == max(3, 2 + 5) + 1 + 0.5 == 8.5  # training-bound
    # Engines on the trainer's GPUs cannot overlap it: the sum, whatever max_staleness says.
    assert _estimate(replace(async_lay, colocated=True), 10.0).seconds == 18.5
    assert "max(rollout, old_logprob + train)" in _estimate(async_lay, 10.0).explain()


def test_the_config_s_max_staleness_reaches_the_plan(tmp_path):
    overrides = [f"run_dir={tmp_path}", "rollout.engine=sglang", "rollout.placement=disaggregated"]
    sync_cfg = load_config(RunConfig, "examples/tiny_cpu.yaml", overrides)
    async_cfg = load_config(RunConfig, "examples/tiny_cpu.yaml", overrides + ["trainer.max_staleness=1"])
    arch = ModelArch.from_hf_config(sync_cfg.actor.model_config)
    sync_est, _ = config_estimate(sync_cfg, arch, CPU, workload_from_config(sync_cfg), CPU_EFFICIENCY, 1, 1)
    async_est, _ = config_estimate(async_cfg, arch, CPU, workload_from_config(async_cfg), CPU_EFFICIENCY, 1, 1)
    assert async_est.layout.max_staleness == 1 and async_est.overlapped
    phase = {p.name: p.seconds for p in sync_est.phases}
    assert async_est.phases == sync_est.phases  # the same phases, overlapped
    expected = max(phase["rollout"], phase["old_logprob"] + phase["train"]) + phase["sync"] + phase["checkpoint"]
    assert async_est.seconds == pytest.approx(expected, rel=1e-12)
    assert async_est.seconds < sync_est.seconds
