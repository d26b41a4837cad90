"""Fit the planner's efficiency factors to a cluster's own runs (``megatron-fipo plan --calibrate``).

A run's ``metrics.jsonl`` gives, per RL step, the seconds of each phase (``time/rollout_s``,
``time/old_logprob_s``, ``time/train_s`` which includes the old-logprob pass, ``time/sync_s``) and
the workload that produced them (samples and tokens generated and trained, response lengths,
generation batches); its ``config.yaml`` gives the layout. For each step the planner predicts the
phases from that step's own workload; the fit moves the factors of :class:`Efficiency` (in log
space, a weak pull towards their starting values keeps factors the runs cannot see where they were)
to minimize the squared log error of every phase of every step. The first step of a run is left out:
it pays one-time costs (allocator warm-up, first-call kernel selection) later steps do not. Other
jobs on the machine only ever add time, so the fit weighs steps slower than predicted less, and the
report compares each phase at its least-disturbed step.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from megatron_fipo.config_base import ConfigError
from megatron_fipo.plan.step_time import Efficiency, ResponseLengths, Workload

PHASES = ("rollout", "old_logprob", "train", "sync")
# The factors a fit moves; the rest (file-system bandwidth, NIC and NVLink efficiency, which no
# single-node run exercises) stay as given. The collective latencies move only with a TP > 1 run.
FITTED = ("decode_bandwidth", "decode_mfu", "prefill_mfu", "layer_latency_s", "forward_mfu", "train_mfu",
          "score_s_per_sample", "optimizer_step_s", "sync_bandwidth", "sync_latency_s", "collective_latency_s",
          "gather_latency_s")
PRIOR_WEIGHT = 1e-4  # per factor: only pins the directions no run constrains


@dataclass(frozen=True)
class StepRecord:
    """One RL step of a run: what it did and how long each phase took (seconds)."""

    step: int
    workload: Workload
    seconds: dict[str, float]
    world_size: int  # training ranks


def read_steps(run_dir: str | Path, cfg, skip_first: bool = True) -> list[StepRecord]:
    """The RL steps of ``RUN_DIR/metrics.jsonl`` that carry the planner's keys, as workloads."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"--calibrate: {run_dir} has no metrics.jsonl; give a run directory of `megatron-fipo train`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    need = ("time/rollout_s", "time/old_logprob_s", "time/train_s", "time/sync_s", "train/tokens", "train/samples",
            "rollout/samples_generated", "response_length/mean", "response_length/max", "rollout/gen_batches")
    steps = [r for r in rows if all(k in r for k in need)]
    if skip_first:
        steps = [r for r in steps if r["step"] > min(s["step"] for s in steps)] if len(steps) > 1 else steps
    if not steps:
        raise ConfigError(f"--calibrate: {path} has no RL step with the planner's metrics ({', '.join(need)}); "
                          "runs from before these were logged cannot be calibrated on")
    tr, r = cfg.trainer, cfg.rollout
    out = []
    for m in steps:
        samples = m["train/samples"]
        mean = m["response_length/mean"]
        workload = Workload(
            prompts_per_step=round(samples / r.n_samples), n_samples=r.n_samples,
            prompt_len=max(1.0, m["train/tokens"] / samples - mean),
            lengths=ResponseLengths(mean, max(1, round(m["response_length/max"]))),
            gen_prompts_per_batch=tr.gen_prompts_per_batch, gen_batches=m["rollout/gen_batches"],
            minibatch_prompts=tr.minibatch_prompts, ppo_epochs=tr.ppo_epochs,
            score_s_per_sample=m["time/reward_s"] / m["rollout/samples_generated"] if "time/reward_s" in m else None)
        seconds = {"rollout": m["time/rollout_s"], "old_logprob": m["time/old_logprob_s"],
                   "train": m["time/train_s"] - m["time/old_logprob_s"], "sync": m["time/sync_s"]}
        # Runs from before train/world_size was logged: the config's, at least one DP rank.
        world = int(m.get("train/world_size", max(cfg.launch.training_world_size, cfg.parallel.model_parallel_size)))
        out.append(StepRecord(m["step"], workload, seconds, world))
    return out


def least_disturbed(rows: list[tuple[dict[str, float], "callable"]], eff: Efficiency, phase: str) -> tuple[float, float]:
    """(measured, predicted) seconds of ``phase`` at the step that ran closest to its prediction
    from below: the one least slowed by whatever else shared the machine. Other jobs only ever add
    time, so, as ``timeit`` takes the fastest repeat, the comparison takes this step."""
    pairs = [(seconds[phase], predict(eff)[phase]) for seconds, predict in rows]
    pairs = [(m, p) for m, p in pairs if m > 0 and p > 0]
    return min(pairs, key=lambda mp: mp[0] / mp[1]) if pairs else (0.0, 0.0)


# A step slower than predicted weighs this much (squared) against one faster: on a shared machine
# other jobs only ever add time, so a slow step is more likely disturbed than mispredicted.
SLOW_WEIGHT = 0.2


def fit(runs: list[list[tuple[dict[str, float], "callable"]]], start: Efficiency, sweeps: int = 3) -> Efficiency:
    """Coordinate descent in log space over :data:`FITTED`.

    ``runs`` holds, per run, each step's measured seconds per phase with a function that, given an
    :class:`Efficiency`, predicts them. The loss sums, over every phase of every step, the squared
    log error (weighted by :data:`SLOW_WEIGHT` where the step ran slower than predicted), plus the
    pull towards ``start``."""
    names = list(FITTED)
    theta0 = {n: math.log(getattr(start, n)) for n in names}
    rows = [row for run in runs for row in run]

    def loss(theta: dict[str, float]) -> float:
        eff = replace(start, **{n: math.exp(v) for n, v in theta.items()})
        total = sum(PRIOR_WEIGHT * (theta[n] - theta0[n]) ** 2 for n in names)
        for measured, predict in rows:
            predicted = predict(eff)
            for phase in PHASES:
                if measured.get(phase, 0) > 0 and predicted.get(phase, 0) > 0:
                    r = math.log(measured[phase] / predicted[phase])
                    total += (SLOW_WEIGHT * r if r > 0 else r) ** 2
        return total

    theta = dict(theta0)
    for _ in range(sweeps):
        for n in names:
            theta[n] = _golden(lambda v: loss({**theta, n: v}), theta[n] - 5, theta[n] + 5)
    return replace(start, **{n: math.exp(v) for n, v in theta.items()})


def _golden(f, lo: float, hi: float, iters: int = 24) -> float:
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(iters):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return (lo + hi) / 2


def save(eff: Efficiency, path: str | Path, device: str, runs: list[str]) -> None:
    Path(path).write_text(json.dumps({"device": device, "runs": runs, "efficiency": asdict(eff)}, indent=2) + "\n")


def load(path: str | Path) -> tuple[str, Efficiency]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--efficiency: no calibration file at {path}; make one with --calibrate RUN_DIR")
    data = json.loads(p.read_text())
    known = {f.name for f in fields(Efficiency)}
    unknown = set(data.get("efficiency", {})) - known
    if unknown:
        raise ConfigError(f"--efficiency: {path} has unknown factors {sorted(unknown)}; recalibrate with this version")
    return data["device"], Efficiency(**data["efficiency"])


def predictor(shape, dev, lay, wl):
    """A function of the efficiency factors: the predicted seconds per phase of one step."""
    from megatron_fipo.plan.step_time import estimate

    return lambda eff: {p.name: p.seconds for p in estimate(shape, dev, lay, wl, eff).phases}


def run_rows(run: str | Path, dev) -> list[tuple[dict[str, float], "callable"]]:
    """Each RL step of a run: its measured seconds per phase, and its predictor (the run's own
    config.yaml layout at the world size it ran with, the step's own workload)."""
    from megatron_fipo.config import RunConfig
    from megatron_fipo.config_base import load_config
    from megatron_fipo.model_arch import ModelArch
    from megatron_fipo.plan.layouts import config_estimate
    from megatron_fipo.plan.step_time import ModelShape

    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--calibrate: {run} has no config.yaml; give a run directory of `megatron-fipo train`")
    cfg = load_config(RunConfig, str(path), [])
    arch = ModelArch.from_hf_config(cfg.actor.model_config)
    shape = ModelShape.from_arch(arch)
    per_node = cfg.launch.nproc_per_node if cfg.launch.gpus_per_node == 0 else cfg.launch.gpus_per_node
    rows = []
    for rec in read_steps(run, cfg):
        lay = config_estimate(cfg, arch, dev, rec.workload, Efficiency(), per_node, rec.world_size)[0].layout
        rows.append((rec.seconds, predictor(shape, dev, lay, rec.workload)))
    return rows


def calibrate(run_dirs: list[str], dev, start: Efficiency) -> tuple[Efficiency, str]:
    """Fit to every RL step of these runs; returns the factors and a report of measured against
    predicted seconds per phase."""
    per_run = [(run, run_rows(run, dev)) for run in run_dirs]
    eff = fit([rows for _, rows in per_run], start)
    return eff, fit_report(per_run, eff)


def fit_report(per_run, eff: Efficiency) -> str:
    lines = [f"{'run':<40} {'phase':<12} {'measured s':>11} {'predicted s':>12} {'error':>7}   (least-disturbed step)"]
    for run, rows in per_run:
        for phase in PHASES:
            m, p = least_disturbed(rows, eff, phase)
            err = f"{100 * (p / m - 1):+.0f}%" if m > 0 else "-"
            lines.append(f"{str(run)[-40:]:<40} {phase:<12} {m:>11.4f} {p:>12.4f} {err:>7}")
    return "\n".join(lines)
