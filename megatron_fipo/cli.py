"""megatron-fipo: train, eval, convert, launch, config."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path

from megatron_fipo import __version__
from megatron_fipo.config_base import ConfigError


def _load(path: str, overrides: list[str]):
    """A YAML config, or a run directory (its config.yaml), with key=value overrides."""
    from megatron_fipo.config import RunConfig
    from megatron_fipo.config_base import load_config

    if Path(path).is_dir() and (Path(path) / "config.yaml").is_file():
        path = str(Path(path) / "config.yaml")
    return load_config(RunConfig, path, overrides)


def _prepare(cfg):
    """Config, local inputs and data sets, all checked before torch loads (with a sentencepiece
    tokenizer) and before anything is written: a bad input leaves no run directory behind."""
    from megatron_fipo.data.setup import setup_data
    from megatron_fipo.validation import gpus_visible, validate_inputs, validate_memory, validate_run, world_size_from_env

    validate_inputs(cfg)
    arch = validate_run(cfg)
    validate_memory(cfg, arch, world_size_from_env(), enforce=gpus_visible())  # refuses only on GPUs
    return setup_data(cfg, arch)


def cmd_train(args) -> int:
    cfg = _load(args.config, args.overrides)
    data = _prepare(cfg)
    from megatron_fipo.loop import train

    _raise_swallowed_interrupt()
    summary = train(cfg, data)
    if summary:
        gain = 100 * (summary["eval_accuracy_end"] - summary["eval_accuracy_start"])
        print(json.dumps(summary, indent=2))
        print(f"eval accuracy {100 * summary['eval_accuracy_start']:.1f}% -> {100 * summary['eval_accuracy_end']:.1f}% "
              f"({gain:+.1f} points) in {summary['steps']} FIPO steps, {summary['wall_seconds']:.0f} s")
        print(f"curves: {summary['plot']}")
    return 0


def _eval_defaults(config: str, overrides: list[str]) -> list[str]:
    """What ``eval`` of a training run means unless the overrides say otherwise: its newest checkpoint,
    its own tokenizer, and output in RUN_DIR/eval, never in the training run's own files."""
    given = {text.split("=", 1)[0] for text in overrides}
    cfg = _load(config, [text for text in overrides if not text.startswith("run_dir=")])  # the trained run's
    source = Path(config) if Path(config).is_dir() else Path(config).parent
    run = source if (source / "checkpoints").is_dir() else Path(cfg.run_dir)  # RUN_DIR/config.yaml, or a config's run
    defaults = [] if "run_dir" in given else [f"run_dir={run / 'eval'}"]
    # checkpoints/latest names the newest complete step (actor/checkpoint.py; read here without torch).
    if not given & {"actor.load_megatron", "actor.load_hf"} and (run / "checkpoints" / "latest").is_file():
        defaults += [f"actor.load_megatron={run / 'checkpoints'}", "actor.load_hf="]
    elif not (cfg.actor.load_megatron or cfg.actor.load_hf):
        raise ConfigError(f"eval needs weights: {run} has no checkpoint; give actor.load_megatron=RUN_DIR/checkpoints "
                          "(a run's newest step) or actor.load_hf=HF_DIR")
    trained = run / "tokenizer.model"
    if cfg.data.tokenizer == "sentencepiece" and not cfg.data.tokenizer_path and trained.is_file():
        defaults.append(f"data.tokenizer_path={trained}")
    return defaults + overrides


def cmd_eval(args) -> int:
    cfg = _load(args.config, _eval_defaults(args.config, args.overrides))
    data = _prepare(cfg)
    from megatron_fipo.loop import evaluate

    _raise_swallowed_interrupt()

    summary = evaluate(cfg, data)
    if summary:
        print(json.dumps(summary, indent=2))
        print(f"eval accuracy {100 * summary['eval_accuracy']:.1f}% (avg@{summary['samples_per_problem']} over "
              f"{summary['eval_problems']} problems); written to {cfg.run_dir}/eval.json")
    return 0


def cmd_launch(args) -> int:
    from pathlib import Path

    from megatron_fipo.config_base import save_config
    from megatron_fipo.launch import launch_dir
    from megatron_fipo.validation import validate_launch

    cfg = _load(args.config, args.overrides)
    validate_launch(cfg)  # a layout that does not fit the job fails here, not after hours in the queue
    repo = str(Path.cwd().resolve())  # the job runs where it was launched: the config's relative paths hold
    config_path = launch_dir(cfg) / "config.yaml"
    if not args.dry_run:
        config_path.parent.mkdir(parents=True, exist_ok=True)
        save_config(cfg, config_path)  # what runs is what was launched, whatever the YAML becomes later
    if args.backend == "slurm":
        from megatron_fipo.launch.sbatch import render_sbatch, submit

        script = render_sbatch(cfg, str(config_path), repo)
        if args.dry_run:
            print(script, end="")
            return 0
        try:
            job = submit(cfg, script)
        except RuntimeError as err:
            print(f"megatron-fipo launch: {err}", file=sys.stderr)
            return 1
        print(f"submitted job {job}: {config_path.parent / 'job.sbatch'}")
        return 0
    from megatron_fipo.launch.nemo_run import run_experiment

    run_experiment(cfg, str(config_path), repo, args.executor, args.dry_run)
    return 0


def cmd_convert(args) -> int:
    if not Path(args.source).exists():  # before torch and Megatron load: a typo costs no start-up time
        print(f"megatron-fipo convert: {args.source}: no such file or directory; give the HF directory "
              "(--to megatron) or the Megatron checkpoint / run's checkpoints directory (--to hf)", file=sys.stderr)
        return 2
    from megatron_fipo.bridge.convert import ConvertConfig, convert
    from megatron_fipo.bridge.mapping import CheckpointMismatch

    cfg = ConvertConfig(source=args.source, target=args.target or "", to=args.to, tensor_model_parallel_size=args.tp,
                        pipeline_model_parallel_size=args.pp, precision=args.precision, hf_config=args.hf_config,
                        shard_mb=args.shard_mb, dry_run=args.dry_run)
    try:
        convert(cfg)
    except (CheckpointMismatch, FileNotFoundError) as err:
        print(f"megatron-fipo convert: {args.source}: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_config(args) -> int:
    """The resolved config with every default (YAML), or the reference page of every key (Markdown)."""
    from megatron_fipo.config import RunConfig

    if args.reference:
        from megatron_fipo.config_reference import reference_markdown

        print(reference_markdown(RunConfig), end="")
        return 0
    if not args.config:
        raise ConfigError("config: give a CONFIG (e.g. examples/tiny_cpu.yaml), or --reference for every key")
    import yaml

    from megatron_fipo.config_base import to_dict

    print(yaml.safe_dump(to_dict(_load(args.config, args.overrides)), sort_keys=False), end="")
    return 0


def cmd_plan(args) -> int:
    """The memory ledger of a config as ``launch.*`` places it: a table per phase; exit 1 if it does not fit."""
    from megatron_fipo.plan.hardware import gpu
    from megatron_fipo.plan.memory import build_ledger, check_fits, layout_from_config
    from megatron_fipo.validation import validate_run

    cfg = _load(args.config, args.overrides)
    if not args.memory:  # the layout planner: step time by phase, ranked layouts (plan/layouts.py)
        from megatron_fipo.plan.layouts import plan_command

        return plan_command(cfg, args.config, args)
    world = cfg.launch.training_world_size
    arch = validate_run(cfg, world_size=world)
    ledger = build_ledger(layout_from_config(cfg, arch, world, gpu(args.gpu, "--gpu") if args.gpu else None))
    print(ledger.table())
    try:
        check_fits(ledger)
    except ConfigError as err:
        print(f"\ndoes not fit: {err}")
        return 1
    print("\nfits: every phase leaves its headroom")
    return 0


_interrupted = False


def _note_interrupts() -> None:
    """Ctrl-C before train's own stop handler raises KeyboardInterrupt, as Python's does, and is noted:
    Megatron-Core wraps its optional imports in bare ``except:``, which swallows a KeyboardInterrupt
    raised inside them, and the run would go on to the end (seen once in CI)."""
    def handle(signum, frame):
        global _interrupted
        _interrupted = True
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        signal.signal(signal.SIGINT, handle)


def _raise_swallowed_interrupt() -> None:
    """After the heavy imports: a Ctrl-C that one of them swallowed ends the command now."""
    if _interrupted:
        raise KeyboardInterrupt


def _quiet_libraries() -> None:
    """Our own progress at INFO; libraries' per-step deprecation chatter off the console."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron_fipo").setLevel(logging.INFO)
    logging.getLogger("megatron.core").setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(torch|megatron|transformers)(\.|$)")


def _cmd_compare(args) -> int:
    from megatron_fipo.compare import cmd_compare

    return cmd_compare(args)


def main(argv: list[str] | None = None) -> int:
    _note_interrupts()
    _quiet_libraries()
    parser = argparse.ArgumentParser(prog="megatron-fipo", description=__doc__)
    parser.add_argument("--version", action="version", version=f"megatron-fipo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run FIPO (resumes if run_dir has a checkpoint)")
    train.add_argument("config", help="YAML config, e.g. examples/tiny_cpu.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run_dir=runs/x trainer.total_steps=5")
    train.set_defaults(func=cmd_train)
    evaluate = sub.add_parser("eval", help="avg@k on the eval set: a run's newest checkpoint, or actor.load_megatron / "
                              "actor.load_hf weights; writes RUN_DIR/eval/eval.json unless run_dir= says otherwise")
    evaluate.add_argument("config", help="a run directory (or its config.yaml), or a YAML config")
    evaluate.add_argument("overrides", nargs="*",
                          help="e.g. run_dir=runs/x-eval actor.load_hf=HF_DIR rollout.eval_n_samples=32")
    evaluate.set_defaults(func=cmd_eval)
    launch = sub.add_parser("launch", help="run on a cluster: an sbatch script, or a NeMo-Run experiment")
    launch.add_argument("backend", choices=["slurm", "nemo-run"])
    launch.add_argument("config", help="YAML config; launch.* places the job (nodes, GPUs, partition, ...)")
    launch.add_argument("overrides", nargs="*", help="key=value overrides, e.g. launch.partition=batch launch.nodes=16")
    launch.add_argument("--executor", choices=["local", "slurm"], default="slurm", help="nemo-run: where it runs")
    launch.add_argument("--dry-run", action="store_true", help="print the job (script or experiment) without running it")
    launch.set_defaults(func=cmd_launch)
    convert = sub.add_parser("convert", help="HF safetensors <-> Megatron dist checkpoint; torchrun with TP x PP ranks")
    convert.add_argument("source", help="HF directory (--to megatron); Megatron checkpoint or checkpoints dir (--to hf)")
    convert.add_argument("target", nargs="?", help="output directory (must not exist or be empty)")
    convert.add_argument("--to", choices=["megatron", "hf"], required=True)
    convert.add_argument("--tp", type=int, default=1, help="tensor-parallel size to convert with")
    convert.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to convert with")
    convert.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                         help="dtype of the converted weights (auto: the source's)")
    convert.add_argument("--hf-config", default="",
                         help="--to hf: HF dir with config.json and tokenizer (default SOURCE/hf_config; for "
                              "RUN_DIR/checkpoints, the run's actor.model_config and tokenizer)")
    convert.add_argument("--shard-mb", type=float, default=2048, help="--to hf: safetensors shard size")
    convert.add_argument("--dry-run", action="store_true",
                         help="print the parameter mapping and check names and shapes; load no weights")
    convert.set_defaults(func=cmd_convert)
    config = sub.add_parser("config", help="print the resolved config with every default (or --reference: every key)")
    config.add_argument("config", nargs="?", help="YAML config or run directory")
    config.add_argument("overrides", nargs="*", help="key=value overrides")
    config.add_argument("--reference", action="store_true",
                        help="print the reference of every key (type, default, meaning) as Markdown")
    config.set_defaults(func=cmd_config)
    plan = sub.add_parser("plan", help="layouts ranked by estimated step time (model estimates); --memory: per-GPU bytes "
                          "of each phase for a config's layout, and whether it fits")
    plan.add_argument("config", help="YAML config; launch.* gives the world size and GPU type")
    plan.add_argument("overrides", nargs="*", help="key=value overrides, e.g. actor.offload=true")
    plan.add_argument("--memory", action="store_true", help="print the memory ledger")
    plan.add_argument("--gpu", default="", help="GPU type instead of launch.gpu_type: h100-80gb, h200-141gb, b200, gb200 "
                      "(or cpu, whose rates come from --calibrate)")
    plan.add_argument("--nodes", type=int, default=0, help="nodes to plan for (default launch.nodes)")
    plan.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default launch.gpus_per_node)")
    plan.add_argument("--top", type=int, default=10, help="rows of the ranked table")
    plan.add_argument("--explain", action="store_true", help="every term of the step time with its inputs")
    plan.add_argument("--calibrate", nargs="+", metavar="RUN_DIR", default=[],
                      help="fit the efficiency factors to these runs' metrics.jsonl, save and use them")
    plan.add_argument("--calibration-out", default="", help="where --calibrate saves (default RUN_DIR/plan_calibration.json)")
    plan.add_argument("--efficiency", default="", help="a saved calibration (plan_calibration.json) to plan with")
    plan.add_argument("--from-run", default="", metavar="RUN_DIR",
                      help="take response lengths, prompt length and generation batches from this run's metrics")
    plan.add_argument("--prompt-len", type=float, default=None, help="assumed mean prompt tokens")
    plan.add_argument("--response-mean", type=float, default=None, help="assumed mean response tokens")
    plan.add_argument("--keep-fraction", type=float, default=None, help="assumed fraction of groups dynamic sampling keeps")
    plan.set_defaults(func=cmd_plan)
    compare = sub.add_parser("compare", help="the same config under fipo and dapo over several seeds, one run after "
                             "another (finished runs skipped), then a side-by-side report (PNG + markdown)")
    compare.add_argument("config", help="YAML config, e.g. examples/tiny_cpu_chain.yaml")
    compare.add_argument("overrides", nargs="*", help="key=value overrides for every run (not actor.loss, seeds or run_dir)")
    compare.add_argument("--algos", default="fipo,dapo", help="comma-separated losses (actor.loss)")
    compare.add_argument("--seeds", type=int, default=3, help="seeds per loss")
    compare.add_argument("--first-seed", type=int, default=1, help="seeds are first-seed, first-seed + 1, ...")
    compare.add_argument("--out", default="", help="directory of the runs and the report (default RUN_DIR-compare)")
    compare.add_argument("--backend", choices=["local", "slurm", "nemo-run"], default="local",
                         help="local: train here; slurm / nemo-run: submit each run with `megatron-fipo launch`")
    compare.add_argument("--jobs", type=int, default=1, help="local runs at a time (each uses all its threads)")
    compare.add_argument("--dry-run", action="store_true", help="print the runs' commands, run nothing")
    compare.add_argument("--report-only", action="store_true", help="write the report from the finished runs")
    compare.set_defaults(func=_cmd_compare)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"megatron-fipo: config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before train's own stop handler is in place, or in another command
        print(f"megatron-fipo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
