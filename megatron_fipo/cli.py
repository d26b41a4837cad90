"""megatron-fipo: train, eval, convert, launch."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

from megatron_fipo.config_base import ConfigError


def _load(path: str, overrides: list[str]):
    from megatron_fipo.config import RunConfig
    from megatron_fipo.config_base import load_config

    return load_config(RunConfig, path, overrides)


def cmd_train(args) -> int:
    from megatron_fipo.validation import gpus_visible, validate_memory, validate_run, world_size_from_env

    cfg = _load(args.config, args.overrides)
    arch = validate_run(cfg)  # config errors surface in milliseconds, before torch and Megatron load
    validate_memory(cfg, arch, world_size_from_env(), enforce=gpus_visible())  # refuses only on GPUs
    from megatron_fipo.loop import train

    summary = train(cfg)
    if summary:
        gain = 100 * (summary["eval_accuracy_end"] - summary["eval_accuracy_start"])
        print(json.dumps(summary, indent=2))
        print(f"eval accuracy {100 * summary['eval_accuracy_start']:.1f}% -> {100 * summary['eval_accuracy_end']:.1f}% "
              f"({gain:+.1f} points) in {summary['steps']} FIPO steps, {summary['wall_seconds']:.0f} s")
        print(f"curves: {summary['plot']}")
    return 0


def cmd_eval(args) -> int:
    from megatron_fipo.validation import validate_run

    cfg = _load(args.config, args.overrides)
    if not (cfg.actor.load_megatron or cfg.actor.load_hf):
        raise ConfigError("eval needs weights: actor.load_megatron=RUN_DIR/checkpoints (a run's newest step) "
                          "or actor.load_hf=HF_DIR")
    validate_run(cfg)
    from megatron_fipo.loop import evaluate

    summary = evaluate(cfg)
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


def cmd_plan(args) -> int:
    """The memory ledger of a config as ``launch.*`` places it: a table per phase; exit 1 if it does not fit."""
    from megatron_fipo.plan.hardware import gpu
    from megatron_fipo.plan.memory import build_ledger, check_fits, layout_from_config
    from megatron_fipo.validation import validate_run

    if not args.memory:
        raise ConfigError("plan: give --memory (the memory ledger); it is the one plan so far")
    cfg = _load(args.config, args.overrides)
    world = cfg.launch.training_world_size
    arch = validate_run(cfg, world_size=world, has_te=True)
    ledger = build_ledger(layout_from_config(cfg, arch, world, gpu(args.gpu, "--gpu") if args.gpu else None))
    print(ledger.table())
    try:
        check_fits(ledger)
    except ConfigError as err:
        print(f"\ndoes not fit: {err}")
        return 1
    print("\nfits: every phase leaves its headroom")
    return 0


def _quiet_libraries() -> None:
    """Our own progress at INFO; libraries' per-step deprecation chatter off the console."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron_fipo").setLevel(logging.INFO)
    logging.getLogger("megatron.core").setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(torch|megatron|transformers)(\.|$)")


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = argparse.ArgumentParser(prog="megatron-fipo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run FIPO (resumes if run_dir has a checkpoint)")
    train.add_argument("config", help="YAML config, e.g. examples/tiny_cpu.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run_dir=runs/x trainer.total_steps=5")
    train.set_defaults(func=cmd_train)
    evaluate = sub.add_parser("eval", help="avg@k on the eval set for actor.load_megatron / actor.load_hf weights")
    evaluate.add_argument("config", help="the run's YAML config (its RUN_DIR/config.yaml works)")
    evaluate.add_argument("overrides", nargs="*",
                          help="e.g. run_dir=runs/x-eval actor.load_megatron=runs/x/checkpoints rollout.eval_n_samples=32")
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
                         help="--to hf: HF dir with config.json and tokenizer (default SOURCE/hf_config)")
    convert.add_argument("--shard-mb", type=float, default=2048, help="--to hf: safetensors shard size")
    convert.add_argument("--dry-run", action="store_true",
                         help="print the parameter mapping and check names and shapes; load no weights")
    convert.set_defaults(func=cmd_convert)
    plan = sub.add_parser("plan", help="--memory: per-GPU bytes of each phase for a config's layout, and whether it fits")
    plan.add_argument("config", help="YAML config; launch.* gives the world size and GPU type")
    plan.add_argument("overrides", nargs="*", help="key=value overrides, e.g. actor.offload=true")
    plan.add_argument("--memory", action="store_true", help="print the memory ledger")
    plan.add_argument("--gpu", default="", help="GPU type instead of launch.gpu_type: h100-80gb, h200-141gb, b200, gb200")
    plan.set_defaults(func=cmd_plan)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"megatron-fipo: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
