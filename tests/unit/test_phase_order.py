"""Phase order of the loop in colocated placement: the trainer and the engines never hold the device together.

The tiny job runs through the real CLI with its real actor, embedded engine and checkpoint writer;
phase_order_worker.py records their calls (a recorder that forwards every call, not a double) and
the bytes the actor's storages hold at each. Run with actor.offload on and off in one process.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers.launch import torchrun

WORKER = Path(__file__).with_name("phase_order_worker.py")
SHORT = ["trainer.total_steps=2", "trainer.warmup_sft_steps=5", "trainer.eval_every=2", "trainer.save_every=2",
         "trainer.prompts_per_step=8", "trainer.minibatch_prompts=4", "trainer.gen_prompts_per_batch=12",
         "data.eval_size=8", "rollout.eval_n_samples=2"]
TRAINER_CALLS = {"actor.compute_logprobs", "actor.train_step", "actor.sft_step", "checkpoint.save"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("phases")
    torchrun(1, WORKER, str(out), *SHORT)
    return {name: (json.loads((out / name / "calls.json").read_text()), out / name) for name in ("on", "off")}


def _replay(calls: list[dict]) -> None:
    """Check each call against who holds the device at that moment; raise at the first violation."""
    resident, engine_holds = True, False
    for i, entry in enumerate(calls):
        call, where = entry["call"], f"call {i} ({entry['call']})"
        # Measured as the call began: offloaded means the storages hold no bytes at all.
        assert (entry["actor_device_bytes"] == 0) == (not resident), f"{where}: {entry['actor_device_bytes']} bytes"
        if call == "actor.offload":
            assert resident and not engine_holds, where
            resident = False
        elif call == "actor.onload":
            assert not resident and not engine_holds, f"{where}: the engines have not released the device"
            resident = True
        elif call == "engine.resume":
            assert not resident, f"{where}: the trainer still holds the device"
            engine_holds = True
        elif call == "engine.pause":
            engine_holds = False
        elif call in ("engine.generate", "engine.stream"):  # eval; a rollout's streaming
            assert engine_holds and not resident, where
        else:  # trainer work, and weight updates (the bridge reads the trainer's weights)
            assert resident and not engine_holds, where


def test_trainer_and_engine_never_hold_the_device_together(runs):
    calls, _ = runs["on"]
    _replay(calls)
    assert [c["call"] for c in calls if c["call"] in ("engine.generate", "engine.stream")] == [
        "engine.generate", "engine.stream", "engine.stream", "engine.generate"]  # eval before, 2 rollouts, final eval
    assert max(c["actor_device_bytes"] for c in calls) > 0


def test_one_rl_step_in_order(runs):
    names = [c["call"] for c in runs["on"][0]]
    first_train = names.index("actor.compute_logprobs")
    step = names[first_train - 5: names.index("engine.update_weights", first_train) + 1]
    assert step == ["actor.offload", "engine.resume", "engine.stream", "engine.pause", "actor.onload",
                    "actor.compute_logprobs", "actor.train_step", "actor.train_step", "engine.update_weights"]


def test_timings_record_every_call_with_its_size(runs):
    """timings.jsonl (what `plan --calibrate` fits per-call costs from): at each RL step, the decode
    batches hold every generated sample, and the micro-batches of the old-logprob pass and of the
    updates hold every trained sample once (padded micro-batches: rows = tokens^2 / sum of squares)."""
    from megatron_fipo import timings
    from megatron_fipo.metrics import read_metrics

    _, run = runs["off"]
    calls = timings.read(run)
    steps = [m for m in read_metrics(run / "metrics.jsonl") if "time/train_s" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        rec = calls[m["step"]]
        eval_rows = 8 * 2 if "eval/accuracy" in m else 0  # data.eval_size x rollout.eval_n_samples
        assert sum(rows for rows, _, _, _ in rec["decode"]) == m["rollout/samples_generated"] + eval_rows
        assert all(rows <= 256 and steps_ >= 1 for rows, _, steps_, _ in rec["decode"])  # rollout.max_batch
        for kind, phase_s in (("forward", m["time/old_logprob_s"]), ("train", m["time/train_s"] - m["time/old_logprob_s"])):
            assert sum(round(tokens**2 / sum_sq) for tokens, sum_sq, _ in rec[kind]) == m["train/samples"], kind
            seconds = [s for _, _, s in rec[kind]]
            assert min(seconds) > 0 and sum(seconds) <= phase_s, kind
        assert len(rec["train"]) >= 2  # one or more micro-batches per mini-batch (8 prompts / 4)


def test_the_replay_catches_an_overlap(runs):
    calls = [dict(c) for c in runs["on"][0]]
    i = next(i for i, c in enumerate(calls) if c["call"] == "actor.offload")
    # The engine resumes before the trainer offloads (the bytes stay as measured at each position).
    calls[i]["call"], calls[i + 1]["call"] = calls[i + 1]["call"], calls[i]["call"]
    with pytest.raises(AssertionError, match="trainer still holds"):
        _replay(calls)


def test_without_offload_the_trainer_stays_resident(runs):
    calls, _ = runs["off"]
    names = [c["call"] for c in calls]
    assert "actor.offload" not in names and "actor.onload" not in names
    assert all(c["actor_device_bytes"] > 0 for c in calls)
    # The engines still release around every generation phase (eval included) before the trainer works.
    generations = names.count("engine.generate") + names.count("engine.stream")  # evals and rollouts
    assert names.count("engine.resume") == names.count("engine.pause") == generations


def test_offload_between_every_phase_ends_bit_equal(runs):
    (_, on), (_, off) = runs["on"], runs["off"]
    params_on, params_off = torch.load(on / "params.pt"), torch.load(off / "params.pt")
    assert len(params_on) == len(params_off) > 0
    assert all(torch.equal(a, b) for a, b in zip(params_on, params_off))
    metrics_on = [json.loads(line) for line in (on / "metrics.jsonl").read_text().splitlines()]
    metrics_off = [json.loads(line) for line in (off / "metrics.jsonl").read_text().splitlines()]
    timing = ("time/", "throughput/", "perf/")  # wall-clock figures
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith(timing)}  # noqa: E731
    assert [strip(m) for m in metrics_on] == [strip(m) for m in metrics_off]
    assert all("time/offload_s" in m and "time/onload_s" in m for m in metrics_on if "actor/loss" in m)


def test_offload_without_shared_gpus_is_refused():
    from megatron_fipo.config import RunConfig
    from megatron_fipo.config_base import ConfigError, load_config
    from megatron_fipo.validation import validate_run

    cfg = load_config(RunConfig, "examples/tiny_cpu.yaml", ["actor.offload=true", "rollout.placement=disaggregated"])
    with pytest.raises(ConfigError, match="actor.offload=false"):
        validate_run(cfg, world_size=1)
    validate_run(load_config(RunConfig, "examples/tiny_cpu.yaml", ["actor.offload=true"]), world_size=1)
