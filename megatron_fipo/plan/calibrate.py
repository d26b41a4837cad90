"""Fit the planner's efficiency factors to a cluster's own runs (``megatron-fipo plan --calibrate``).

A run's ``metrics.jsonl`` gives, per RL step, the seconds of each phase (``time/rollout_s``,
``time/old_logprob_s``, ``time/train_s`` which includes the old-logprob pass, ``time/sync_s``) and
the workload that produced them (samples and tokens generated and trained, response lengths,
generation batches); its ``config.yaml`` gives the layout; its ``timings.jsonl`` (megatron_fipo/timings.py)
the seconds of single calls: each micro-batch of the actor and each decode batch of the embedded
engine, with its size. A phase alone cannot tell a fixed cost per call from a cost per FLOP when
every step makes the same calls; the calls' sizes differ within a step, which separates the two.
For each step and each call the planner predicts the seconds from that step's workload or that
call's size; the fit moves the factors of :class:`Efficiency` (in log space, a weak pull towards
their starting values keeps factors the runs cannot see where they were) to minimize the squared
log error of all of them. The first RL step of a run is left out: it pays one-time costs (allocator
warm-up, first-call kernel selection) later steps do not. Other jobs on the machine only ever add
time, so the fit weighs calls and steps slower than predicted less and counts large errors
linearly (Huber), and the report compares each phase at its least-disturbed step.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from megatron_fipo import timings
from megatron_fipo.config_base import ConfigError
from megatron_fipo.plan.step_time import Efficiency, ResponseLengths, Workload

PHASES = ("rollout", "old_logprob", "train", "sync")
# The factors a fit moves; the rest (file-system bandwidth, NIC and NVLink efficiency, which no
# single-node run exercises) stay as given. The collective latencies move only with a TP > 1 run.
# Calls timed in timings.jsonl, by kind: the phase their seconds are part of.
CALLS = {"forward": "microbatch_forward", "train": "microbatch_train", "decode": "decode_batch"}
FITTED = ("decode_bandwidth", "decode_mfu", "prefill_mfu", "layer_latency_s", "decode_step_latency_s",
          "microbatch_latency_s", "backward_latency_factor", "forward_mfu", "train_mfu", "score_s_per_sample",
          "optimizer_step_s", "sync_bandwidth", "sync_latency_s", "collective_latency_s", "gather_latency_s")
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
    pairs = [(seconds[phase], predict(eff).get(phase, 0.0)) for seconds, predict in rows if phase in seconds]
    pairs = [(m, p) for m, p in pairs if m > 0 and p > 0]
    return min(pairs, key=lambda mp: mp[0] / mp[1]) if pairs else (0.0, 0.0)


# Log errors beyond this count linearly, not squared (Huber): a step or call another job slowed (by
# up to 10x on a shared machine) moves the fit as little as a median would be moved.
HUBER = 0.1
# A step or call slower than predicted weighs this much against one faster: other jobs (on this
# VM, the host's too: the same micro-batch's seconds drift by 30% between steps of one quiet run)
# only ever add time, so a slow one is more likely disturbed than mispredicted.
SLOW_WEIGHT = 0.2


def fit(runs: list[list[tuple[dict[str, float], "callable"]]], start: Efficiency, iterations: int = 200) -> Efficiency:
    """Least squares in log space over :data:`FITTED` (Levenberg-Marquardt: the factors are
    strongly correlated, e.g. a decode step's fixed cost against its per-sequence cost, where
    coordinate descent crawls).

    ``runs`` holds, per run, each step's measured seconds per phase with a function that, given an
    :class:`Efficiency`, predicts them (a timed call is a row of its own). The residuals are every
    phase's log error (its square Huber's loss beyond :data:`HUBER`, times :data:`SLOW_WEIGHT` where
    it ran slower than predicted), and the pull
    ``sqrt(PRIOR_WEIGHT) x`` (log factor - its start)."""
    names = list(FITTED)
    theta0 = [math.log(getattr(start, n)) for n in names]
    rows = [row for run in runs for row in run]
    prior = math.sqrt(PRIOR_WEIGHT)

    def residuals(theta: list[float]) -> list[float]:
        eff = replace(start, **{n: math.exp(v) for n, v in zip(names, theta)})
        out = [prior * (t - t0) for t, t0 in zip(theta, theta0)]
        for measured, predict in rows:
            predicted = predict(eff)
            for phase in sorted(measured):
                m, p = measured[phase], predicted.get(phase, 0.0)
                r = math.log(m / p) if m > 0 and p > 0 else 0.0
                r = r if abs(r) <= HUBER else math.copysign(math.sqrt(HUBER * (2 * abs(r) - HUBER)), r)
                out.append(SLOW_WEIGHT * r if r > 0 else r)
        return out

    theta, damping, h = list(theta0), 1e-3, 1e-5
    res = residuals(theta)
    cost = sum(r * r for r in res)
    for _ in range(iterations):
        columns = []
        for j in range(len(theta)):
            moved = residuals([t + (h if i == j else 0.0) for i, t in enumerate(theta)])
            columns.append([(a - b) / h for a, b in zip(moved, res)])
        jtj = [[sum(a * b for a, b in zip(ci, cj)) for cj in columns] for ci in columns]
        jtr = [sum(a * b for a, b in zip(c, res)) for c in columns]
        while damping < 1e12:
            system = [[v + (damping * max(row[i], 1e-12) if i == k else 0.0) for k, v in enumerate(row)]
                      for i, row in enumerate(jtj)]
            step = _solve(system, [-g for g in jtr])
            trial = [t + d for t, d in zip(theta, step)]
            trial_res = residuals(trial)
            trial_cost = sum(r * r for r in trial_res)
            if trial_cost < cost:
                break
            damping *= 4
        else:
            break  # no step lowers the cost: converged
        converged = cost - trial_cost < 1e-12 * max(cost, 1e-300)
        theta, res, cost, damping = trial, trial_res, trial_cost, max(damping / 3, 1e-9)
        if converged:
            break
    return replace(start, **{n: math.exp(v) for n, v in zip(names, theta)})


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """x with a x = b (Gaussian elimination with partial pivoting; a is small and positive definite)."""
    n = len(b)
    m = [row[:] + [v] for row, v in zip(a, b)]
    for c in range(n):
        pivot = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[pivot] = m[pivot], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for k in range(c, n + 1):
                m[r][k] -= f * m[c][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x


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
    calls = timings.read(run)
    for rec in read_steps(run, cfg):
        lay = config_estimate(cfg, arch, dev, rec.workload, Efficiency(), per_node, rec.world_size)[0].layout
        rows.append((rec.seconds, predictor(shape, dev, lay, rec.workload)))
        for kind, records in calls.get(rec.step, {}).items():
            if kind in CALLS:
                rows += [({CALLS[kind]: r[-1]}, call_predictor(shape, dev, lay, kind, r[:-1])) for r in records]
    return rows


def call_predictor(shape, dev, lay, kind: str, size: list[float]):
    """A function of the efficiency factors: the predicted seconds of one timed call of ``kind``."""
    from megatron_fipo.plan.step_time import decode_batch_seconds, microbatch_seconds

    if kind == "decode":
        rows, width, steps = size
        return lambda eff: {CALLS[kind]: decode_batch_seconds(shape, dev, lay, eff, int(rows), width, int(steps))}
    tokens, sum_sq = size
    return lambda eff: {CALLS[kind]: microbatch_seconds(shape, dev, lay, eff, kind == "train", tokens, sum_sq)}


def calibrate(run_dirs: list[str], dev, start: Efficiency) -> tuple[Efficiency, str]:
    """Fit to every RL step of these runs; returns the factors and a report of measured against
    predicted seconds per phase."""
    per_run = [(run, run_rows(run, dev)) for run in run_dirs]
    eff = fit([rows for _, rows in per_run], start)
    return eff, fit_report(per_run, eff)


def fit_report(per_run, eff: Efficiency) -> str:
    lines = [f"{'run':<40} {'phase / call':<18} {'measured s':>11} {'predicted s':>12} {'error':>7}   (least-disturbed step)"]
    for run, rows in per_run:
        for phase in (*PHASES, *CALLS.values()):
            m, p = least_disturbed(rows, eff, phase)
            if m > 0:
                lines.append(f"{str(run)[-40:]:<40} {phase:<18} {m:>11.4f} {p:>12.4f} {100 * (p / m - 1):>+6.0f}%")
    return "\n".join(lines)
