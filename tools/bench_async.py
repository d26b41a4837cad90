"""Asynchronous rollouts against the synchronous loop, side by side in one invocation: the same job
with trainer.max_staleness=0 and =1, a real SGLang server pinned to one core and the trainer to
another (taskset), one run after the other.

With ``--rounds 2`` the pair runs twice in the order 0, 1, 1, 0, so that a drift of the host's
speed over the runs (this VM's moves a run's step times by up to ~30%) weighs on both modes alike;
the ratio is then that of the modes' mean steps per hour.

Prints, for each: RL steps per hour (wall clock between the first and the last RL step's line in
metrics.jsonl, evals and checkpoints included), the mean phase times, the eval accuracy before and
after RL, the staleness; then the ratio of steps per hour. Needs .venv-sglang
(tools/sglang_cpu/setup.sh) and two cores.

Default job: examples/tiny_cpu_sglang.yaml (its server runs 64 sequences at once) with
disaggregated placement (a server of its own) and micro-batches of 96 tokens
(actor.max_tokens_per_microbatch), which leave the updates' math as it is (gradient accumulation
over exact token sums) and make training take a little less than the CPU server's rollout (0.76 s
against 0.98 s on the idle machine); pass more overrides after --.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = ["rollout.placement=disaggregated", "actor.max_tokens_per_microbatch=96"]


def _server_python(directory: Path, core: int) -> Path:
    """The SGLang CPU Python, pinned to ``core`` (the server the trainer launches runs on it)."""
    path = directory / "sglang_python"
    path.write_text(f'#!/usr/bin/env bash\nexec taskset -c {core} "{REPO}/tools/sglang_cpu/python" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def run(run_dir: Path, staleness: int, overrides: list[str], server_python: Path, trainer_core: int) -> dict:
    """One run of the job with ``max_staleness=staleness``; its figures (the log beside run_dir)."""
    cmd = ["taskset", "-c", str(trainer_core), sys.executable, "-m", "megatron_fipo.cli", "train",
           "examples/tiny_cpu_sglang.yaml", f"run_dir={run_dir}", f"rollout.sglang.python={server_python}",
           f"trainer.max_staleness={staleness}", *JOB, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    metrics, seen, stamps = run_dir / "metrics.jsonl", 0, {}
    with open(run_dir.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:  # the wall-clock time each step's line appears
            if metrics.is_file():
                lines = metrics.read_text().splitlines()
                for line in lines[seen:]:
                    stamps[json.loads(line)["step"]] = time.time()
                seen = len(lines)
            time.sleep(0.1)
    if proc.returncode != 0:
        raise SystemExit(f"the run with max_staleness={staleness} failed: see {run_dir.with_suffix('.log')}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    for row in rows[seen:]:
        stamps.setdefault(row["step"], time.time())
    steps = [r for r in rows if r["step"] > 0]
    first, last = steps[0]["step"], steps[-1]["step"]
    mean = lambda key: sum(r.get(key, 0.0) for r in steps) / len(steps)  # noqa: E731
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "steps_per_hour": (last - first) * 3600 / (stamps[last] - stamps[first]),
        "rollout_s": mean("time/rollout_s"), "train_s": mean("time/train_s"), "sync_s": mean("time/sync_s"),
        "wait_s": mean("time/rollout_wait_s"), "hold_s": mean("time/rollout_hold_s"),
        "staleness": mean("rollout/staleness_mean"),
        "acc_start": summary["eval_accuracy_start"], "acc_end": summary["eval_accuracy_end"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--trainer-core", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, choices=(1, 2),
                        help="2: run the pair twice, in the order 0, 1, 1, 0 (cancels a linear drift of the host)")
    parser.add_argument("--keep", help="directory for the runs (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the job, after --")
    args = parser.parse_args()
    order = [0, 1] if args.rounds == 1 else [0, 1, 1, 0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        python = _server_python(root, args.server_core)
        results = [(k, run(root / f"run{i}_max_staleness_{k}", k, args.overrides, python, args.trainer_core))
                   for i, k in enumerate(order)]
    print(f"job: examples/tiny_cpu_sglang.yaml {' '.join(JOB + args.overrides)}")
    print(f"SGLang server on core {args.server_core}, trainer on core {args.trainer_core}; load average at the end "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'run':>3} {'max_staleness':>13} {'steps/h':>8} {'rollout_s':>9} {'train_s':>8} {'sync_s':>7} {'wait_s':>7} "
          f"{'hold_s':>7} {'staleness':>9} {'eval acc start -> end':>22}")
    for i, (k, r) in enumerate(results):
        print(f"{i + 1:>3} {k:>13} {r['steps_per_hour']:8.1f} {r['rollout_s']:9.2f} {r['train_s']:8.2f} {r['sync_s']:7.2f} "
              f"{r['wait_s']:7.2f} {r['hold_s']:7.2f} {r['staleness']:9.2f} "
              f"{100 * r['acc_start']:9.1f}% -> {100 * r['acc_end']:5.1f}% ({100 * (r['acc_end'] - r['acc_start']):+.1f})")
    mean = {k: sum(r["steps_per_hour"] for staleness, r in results if staleness == k) / order.count(k) for k in (0, 1)}
    print(f"steps per hour, max_staleness 1 / 0: {mean[1] / mean[0]:.2f}x"
          + (" (means over the two runs of each)" if args.rounds == 2 else ""))


if __name__ == "__main__":
    main()
