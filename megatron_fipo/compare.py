"""`megatron-fipo compare`: the same config under several losses and seeds, then a side-by-side report.

Each run is ``train CONFIG actor.loss=ALGO trainer.seed=S actor.seed=S run_dir=OUT/ALGO-seedS`` in a
process of its own, one after another, so a crash costs that run only; a run whose summary.json
exists is done and skipped, so the command resumes where it stopped (a run stopped mid-way resumes
from its checkpoint, as ``train`` does). On a cluster, ``--backend slurm|nemo-run`` submits the runs
through ``megatron-fipo launch`` instead, and ``--report-only`` writes the report once they are done.

With a warm start (``trainer.warmup_sft_steps`` > 0) each seed's warm start runs once, as a run of
0 RL steps (``OUT/warm-seedS``), and every loss starts from its weights (``actor.load_megatron``, its
tokenizer, no warm start of its own): the losses then differ from their first step only, and the
warm start is paid once per seed instead of once per run. RL starts with a fresh optimizer state.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from megatron_fipo.config_base import ConfigError

WARM = "warm"  # the algo name of a seed's shared warm-start run
ALGOS = ("fipo", "dapo")
RESERVED = ("actor.loss", "trainer.seed", "actor.seed", "run_dir")  # set per run by compare


@dataclass(frozen=True)
class RunSpec:
    algo: str
    seed: int
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.algo}-seed{self.seed}"

    @property
    def done(self) -> bool:
        return (self.run_dir / "summary.json").is_file()

    def overrides(self, common: list[str]) -> list[str]:
        seeds = [f"trainer.seed={self.seed}", f"actor.seed={self.seed}", f"run_dir={self.run_dir}"]
        if self.algo == WARM:
            return [*common, "trainer.total_steps=0", *seeds]
        return [*common, f"actor.loss={self.algo}", *seeds]


def warm_start_overrides(warm: Path, trained_tokenizer: bool) -> list[str]:
    """A run that starts from a shared warm start's weights (and the tokenizer it trained)."""
    out = [f"actor.load_megatron={warm / 'checkpoints'}", "actor.load_hf=", "trainer.warmup_sft_steps=0"]
    return out + ([f"data.tokenizer_path={warm / 'tokenizer.model'}"] if trained_tokenizer else [])


def plan_runs(algos: list[str], seeds: int, first_seed: int, out: Path, shared_warm_start: bool = False) -> list[RunSpec]:
    """The runs in the order they run: per seed, its warm start (when shared), then each loss."""
    bad = [a for a in algos if a not in ALGOS]
    if bad or not algos:
        raise ConfigError(f"--algos: {','.join(bad) or 'empty'}; choose from {','.join(ALGOS)}")
    if seeds < 1:
        raise ConfigError(f"--seeds: {seeds}; give 1 or more")
    names = ([WARM] if shared_warm_start else []) + algos
    return [RunSpec(a, first_seed + i, out / f"{a}-seed{first_seed + i}") for i in range(seeds) for a in names]


def check_overrides(overrides: list[str]) -> None:
    taken = [o for o in overrides if o.split("=", 1)[0] in RESERVED]
    if taken:
        raise ConfigError(f"{' '.join(taken)}: compare sets {', '.join(RESERVED)} for each run; use --algos, "
                          "--seeds, --first-seed and --out instead")


def command(spec: RunSpec, config: str, common: list[str], backend: str) -> list[str]:
    head = [sys.executable, "-m", "megatron_fipo.cli"]
    verb = ["train"] if backend == "local" else ["launch", backend]
    return [*head, *verb, config, *spec.overrides(common)]


def _run(spec: RunSpec, cmd: list[str], backend: str) -> bool:
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    log = spec.run_dir.parent / f"{spec.name}.log"
    print(f"compare: {spec.name}: {'training' if backend == 'local' else 'submitting'}, log {log}", flush=True)
    with log.open("a") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        print(f"compare: {spec.name}: exit {rc}, see {log}", file=sys.stderr)
    return rc == 0


def run_all(specs: list[RunSpec], config: str, common: list[str], backend: str, dry_run: bool,
            trained_tokenizer: bool = False, jobs: int = 1) -> list[str]:
    """Runs (local) or submits (cluster) every run not yet done, ``jobs`` at a time, the shared warm
    starts before the losses; returns the names that failed. A seed whose warm start failed skips its
    losses."""
    failed: list[str] = []
    warm = {s.seed: s for s in specs if s.algo == WARM}
    for wave in ([s for s in specs if s.algo == WARM], [s for s in specs if s.algo != WARM]):
        todo = []
        for spec in wave:
            if spec.done:
                print(f"compare: {spec.name}: done ({spec.run_dir / 'summary.json'}), skipped")
                continue
            extra = common
            if spec.seed in warm and spec.algo != WARM:
                if warm[spec.seed].name in failed:
                    failed.append(spec.name)
                    continue
                extra = [*common, *warm_start_overrides(warm[spec.seed].run_dir, trained_tokenizer)]
            todo.append((spec, command(spec, config, extra, backend)))
        if dry_run:
            print("".join(" ".join(cmd) + "\n" for _, cmd in todo), end="")
            continue
        with ThreadPoolExecutor(max(jobs, 1)) as pool:
            ok = list(pool.map(lambda item: _run(item[0], item[1], backend), todo))
        failed += [spec.name for (spec, _), good in zip(todo, ok) if not good]
    return failed


def cmd_compare(args) -> int:
    from megatron_fipo.cli import _load
    from megatron_fipo.compare_report import write_report

    check_overrides(args.overrides)
    cfg = _load(args.config, args.overrides)  # a bad config fails here, before any run starts
    out = Path(args.out or f"{cfg.run_dir}-compare")
    # On a cluster the runs are independent jobs: each does its own warm start, if any.
    shared = cfg.trainer.warmup_sft_steps > 0 and args.backend == "local"
    trained_tokenizer = cfg.data.tokenizer == "sentencepiece" and not cfg.data.tokenizer_path
    specs = plan_runs([a for a in args.algos.split(",") if a], args.seeds, args.first_seed, out, shared)
    failed = [] if args.report_only else run_all(specs, args.config, args.overrides, args.backend, args.dry_run,
                                                 trained_tokenizer, args.jobs)
    if args.dry_run or (args.backend != "local" and not args.report_only):
        if not args.dry_run:
            print(f"compare: runs submitted; when they are done: megatron-fipo compare {args.config} --algos {args.algos} "
                  f"--seeds {args.seeds} --out {out} --report-only")
        return 0
    done = [s for s in specs if s.done and s.algo != WARM]
    if not done:
        print(f"compare: no finished run under {out}", file=sys.stderr)
        return 1
    report = write_report([(s.algo, s.seed, s.run_dir) for s in done], out)
    print(f"compare: report {report}")
    if failed:
        print(f"compare: failed runs (left out of the report): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
