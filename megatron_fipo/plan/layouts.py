"""Layouts of a run on a cluster: enumerate, drop what the memory ledger refuses, rank by step time.

A candidate sets the trainer's TP/PP/CP/DP, sequence parallelism, recompute, micro-batch tokens and
logprob chunk; SGLang's TP (hence the number of engines) and static memory fraction; actor.offload;
and the placement: colocated on every GPU, or disaggregated with whole nodes given to SGLang. Each
candidate is checked with the ledger (``megatron_fipo.plan.memory``) and timed with
``megatron_fipo.plan.step_time``; the table ranks what fits. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from statistics import median
from typing import Optional

from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import ConfigError
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.plan import memory
from megatron_fipo.plan.calibrate import StepRecord
from megatron_fipo.plan.hardware import GPU
from megatron_fipo.plan.step_time import (CPU, Efficiency, ModelShape, ResponseLengths, StepEstimate, StepLayout,
                                          Workload, estimate)

# Assumed when no run says otherwise (--prompt-len, --response-mean, --keep-fraction override them).
ASSUMED_PROMPT_FRACTION = 0.25  # mean prompt = this x data.max_prompt_length
ASSUMED_RESPONSE_FRACTION = 0.5  # mean response = this x rollout.max_response_length
ASSUMED_KEEP_FRACTION = 0.5  # groups dynamic sampling keeps (DAPO-style math at a mid-training accuracy)


@dataclass(frozen=True)
class Assumptions:
    prompt_len: Optional[float] = None
    response_mean: Optional[float] = None
    keep_fraction: Optional[float] = None


def workload_from_config(cfg: RunConfig, assume: Assumptions = Assumptions(),
                         measured: Optional[list[StepRecord]] = None) -> Workload:
    """A step's workload: the config's batch shape with a response-length distribution and a
    dynamic-sampling keep rate, from a run's measured steps (medians) or from assumptions."""
    tr, r = cfg.trainer, cfg.rollout
    if measured:
        prompt = median([s.workload.prompt_len for s in measured])
        mean = median([s.workload.lengths.mean for s in measured])
        longest = max(s.workload.lengths.max for s in measured)
        batches = median([s.workload.gen_batches for s in measured])
        scores = [s.workload.score_s_per_sample for s in measured if s.workload.score_s_per_sample is not None]
    else:
        scores = []
        prompt = assume.prompt_len or ASSUMED_PROMPT_FRACTION * cfg.data.max_prompt_length
        mean = assume.response_mean or ASSUMED_RESPONSE_FRACTION * r.max_response_length
        longest = r.max_response_length
        keep = assume.keep_fraction if assume.keep_fraction is not None else (
            ASSUMED_KEEP_FRACTION if tr.dynamic_sampling else 1.0)
        batches = Workload.expected_gen_batches(tr.prompts_per_step, tr.gen_prompts_per_batch, keep, tr.max_gen_batches)
    return Workload(tr.prompts_per_step, r.n_samples, prompt, ResponseLengths(min(mean, longest), longest),
                    tr.gen_prompts_per_batch, batches, tr.minibatch_prompts, tr.ppo_epochs, tr.save_every,
                    median(scores) if measured and scores else None)


def concurrency(cfg: RunConfig, kv_tokens: Optional[int], wl: Workload, engines: int) -> int:
    """Sequences in flight per engine: the least of the client's cap (rollout.sglang.max_concurrency
    over the engines, when set), the server's slots (rollout.sglang.max_running_requests, when set) and
    what the KV cache holds at the mean in-flight context. Under continuous batching a sequence in
    flight has generated E[L²]/(2E[L]) tokens on average (long ones stay longer). With none known (a
    CPU plan): a generation batch's sequences spread over the engines."""
    if cfg.rollout.engine == "embedded":
        return cfg.rollout.max_batch
    s = cfg.rollout.sglang
    caps = [c for c in (s.max_concurrency and max(1, s.max_concurrency // engines), s.max_running_requests) if c > 0]
    if kv_tokens is not None:
        lengths = wl.lengths.sample(1000)
        context = wl.prompt_len + sum(x * x for x in lengths) / (2 * sum(lengths))
        caps.append(int(kv_tokens // context))
    if not caps:
        caps.append(-(-wl.gen_prompts_per_batch * wl.n_samples // engines))
    return max(1, min(caps))


def step_layout(cfg: RunConfig, dev: GPU, train_gpus: int, gpus_per_node: int, kv_tokens: Optional[int],
                wl: Workload, colocated: bool = True, engines: Optional[int] = None) -> StepLayout:
    par, actor, r = cfg.parallel, cfg.actor, cfg.rollout
    sglang = r.engine == "sglang"
    engine_tp = r.sglang.tp_size if sglang else 1
    engines = engines or (r.sglang.num_servers if sglang else 1)
    packing = par.context_parallel_size > 1 or actor.packing == "on" or (actor.packing == "auto" and dev is not CPU)
    return StepLayout(
        tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size, cp=par.context_parallel_size,
        dp=train_gpus // par.model_parallel_size, sequence_parallel=par.sequence_parallel, recompute=actor.recompute,
        tokens_per_microbatch=actor.max_tokens_per_microbatch, packing=packing,
        params_bytes=2 if actor.precision == "bf16" else 4, fp8=actor.fp8 is not None,
        engine_tp=engine_tp, engines=engines, concurrency=concurrency(cfg, kv_tokens, wl, engines),
        continuous_batching=sglang, prefix_sharing=sglang, colocated=colocated,
        transport=r.sglang.weight_transport if sglang else "inprocess", gpus_per_node=gpus_per_node,
        max_staleness=cfg.trainer.max_staleness)


# ---- candidates ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    overrides: tuple[str, ...]  # key=value, as `megatron-fipo train` takes them
    cfg: RunConfig
    estimate: StepEstimate
    headroom: float  # smallest headroom of any phase on a GPU (fraction)
    rollout_nodes: int  # disaggregated: nodes given to SGLang; 0 colocated


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in (1, 2, 4, 8, 16) if d <= limit and n % d == 0]


def _with(cfg: RunConfig, **changes) -> RunConfig:
    """A copy of the config with dotted keys changed (sections are dataclasses)."""
    if changes.get("rollout__placement") == "colocated" or changes.get("actor__offload"):
        # Engines sharing the trainer's GPUs cannot generate while it trains: such a layout is synchronous.
        changes = {"trainer__max_staleness": 0, **changes}
    sections: dict[str, dict] = {}
    for key, value in changes.items():
        section, name = key.split("__", 1)
        sections.setdefault(section, {})[name] = value
    out = cfg
    for section, values in sections.items():
        if section == "sglang":
            out = replace(out, rollout=replace(out.rollout, sglang=replace(out.rollout.sglang, **values)))
        else:
            out = replace(out, **{section: replace(getattr(out, section), **values)})
    return out


def _headroom(cfg: RunConfig, arch: ModelArch, dev: GPU, train_gpus: int) -> tuple[Optional[float], Optional[int]]:
    """(smallest phase headroom, SGLang KV tokens per engine) of a layout, or (None, None) when the
    ledger refuses it."""
    lay = memory.layout_from_config(cfg, arch, train_gpus, dev)
    ledger = memory.build_ledger(lay)
    try:
        memory.check_fits(ledger)
    except ConfigError:
        return None, None
    kv = ledger.sglang.kv_tokens if ledger.sglang is not None else None
    return min(p.headroom for p in ledger.phases), kv


TRAINER_SHORTLIST = 6  # trainer layouts (fastest training phases) combined with every engine layout


def enumerate_layouts(cfg: RunConfig, arch: ModelArch, dev: GPU, nodes: int, gpus_per_node: int, wl: Workload,
                      eff: Efficiency, disaggregated: bool = True) -> list[Candidate]:
    """Every layout of the search space that fits, ranked by estimated step time (fastest first).

    Two stages keep the ledger calls few: trainer layouts (TP, PP, CP, recompute, micro-batch
    tokens) that fit on their own, ranked by their old-logprob + train seconds; the fastest
    ``TRAINER_SHORTLIST`` then meet every engine layout (SGLang TP, offload, placement), checked
    together. ``selective`` recompute is left out: with flash attention it saves only the softmax
    statistics and costs no time here, so it never ranks apart from ``none``."""
    if cfg.rollout.engine != "sglang":
        raise ConfigError("plan: layouts are enumerated for rollout.engine=sglang on GPUs; for the embedded "
                          "engine, `megatron-fipo plan CONFIG` times the config's own layout")
    shape = ModelShape.from_arch(arch)
    longest = cfg.data.max_prompt_length + cfg.rollout.max_response_length
    mb_tokens = sorted({max(cfg.actor.max_tokens_per_microbatch, longest), 2 * max(8192, longest)})
    placements = [(nodes * gpus_per_node, 0)]
    if disaggregated and nodes > 1:
        placements += [((nodes - k) * gpus_per_node, k) for k in sorted({max(1, nodes // 4), nodes // 2, (3 * nodes) // 4})
                       if 0 < k < nodes]
    out = []
    for train_gpus, rollout_nodes in placements:
        trainers = []
        for tp in _divisors(arch.num_attention_heads, gpus_per_node):
            for pp in _divisors(arch.num_layers, 8):
                for cp in (1, 2):
                    if train_gpus % (tp * pp * cp):
                        continue
                    for recompute in ("none", "full"):
                        for mb in mb_tokens:
                            trial = _with(cfg, parallel__tensor_model_parallel_size=tp,
                                          parallel__pipeline_model_parallel_size=pp, parallel__context_parallel_size=cp,
                                          parallel__sequence_parallel=tp > 1, actor__recompute=recompute,
                                          actor__max_tokens_per_microbatch=mb, actor__offload=False,
                                          rollout__placement="disaggregated")  # offload: chosen with the engines
                            if _headroom(trial, arch, dev, train_gpus)[0] is None:  # the trainer alone
                                continue
                            placed = trial if rollout_nodes else _with(trial, rollout__placement="colocated")
                            if not _launchable(placed, train_gpus, gpus_per_node):
                                continue
                            lay = step_layout(trial, dev, train_gpus, gpus_per_node, None, wl)
                            est = _estimate_cached(shape, dev, lay, wl, eff)
                            trainers.append((est.phase("old_logprob").seconds + est.phase("train").seconds, trial))
        trainers.sort(key=lambda t: t[0])
        for _, trial in trainers[:TRAINER_SHORTLIST]:
            for engine_tp in _divisors(arch.num_attention_heads, gpus_per_node):
                engines = (rollout_nodes * gpus_per_node if rollout_nodes else train_gpus) // engine_tp
                for offload in ((False, True) if not rollout_nodes else (False,)):
                    cand = _candidate(trial, arch, dev, shape, wl, eff, gpus_per_node, train_gpus, rollout_nodes,
                                      engine_tp, engines, offload)
                    if cand is not None:
                        out.append(cand)
    return sorted(out, key=lambda c: c.estimate.seconds)


def _launchable(cfg: RunConfig, train_gpus: int, gpus_per_node: int) -> bool:
    """What `launch` would accept of the layout (validation.validate_run at this world size): e.g. the
    colocated per-node weight handoff needs whole model replicas per node (PP 1)."""
    from megatron_fipo.validation import validate_run

    try:
        validate_run(cfg, world_size=train_gpus, nproc_per_node=gpus_per_node)
    except ConfigError:
        return False
    return True


def _candidate(cfg, arch, dev, shape, wl, eff, gpus_per_node, train_gpus, rollout_nodes, engine_tp, engines,
               offload) -> Optional[Candidate]:
    trial = _with(cfg, actor__offload=offload, rollout__placement="disaggregated" if rollout_nodes else "colocated",
                  sglang__tp_size=engine_tp, sglang__num_servers=engines,
                  # The client's cap should not be what limits the engines: the KV cache is.
                  sglang__max_concurrency=0,
                  sglang__weight_transport="distributed" if rollout_nodes else cfg.rollout.sglang.weight_transport)
    # The largest static pool with the ledger's headroom: beside the trainer's residual when
    # colocated, on the engine's own GPUs when disaggregated.
    fraction = memory.max_mem_fraction_static(memory.layout_from_config(trial, arch, train_gpus, dev))
    if fraction <= 0:
        return None
    trial = _with(trial, sglang__mem_fraction_static=fraction)
    headroom, kv = _headroom(trial, arch, dev, train_gpus)
    if headroom is None or not _launchable(trial, train_gpus, gpus_per_node):
        return None
    lay = step_layout(trial, dev, train_gpus, gpus_per_node, kv, wl, colocated=not rollout_nodes, engines=engines)
    est = _estimate_cached(shape, dev, lay, wl, eff)
    return Candidate(overrides_of(trial, rollout_nodes), trial, est, headroom, rollout_nodes)


@lru_cache(maxsize=None)
def _estimate_cached(shape, dev, lay, wl, eff) -> StepEstimate:
    return estimate(shape, dev, lay, wl, eff)


def overrides_of(cfg: RunConfig, rollout_nodes: int) -> tuple[str, ...]:
    p, a, s = cfg.parallel, cfg.actor, cfg.rollout.sglang
    out = [f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size}",
           f"parallel.pipeline_model_parallel_size={p.pipeline_model_parallel_size}",
           f"parallel.context_parallel_size={p.context_parallel_size}",
           f"parallel.sequence_parallel={str(p.sequence_parallel).lower()}",
           f"actor.recompute={a.recompute}", f"actor.max_tokens_per_microbatch={a.max_tokens_per_microbatch}",
           f"actor.offload={str(a.offload).lower()}", f"rollout.placement={cfg.rollout.placement}",
           f"rollout.sglang.tp_size={s.tp_size}", f"rollout.sglang.num_servers={s.num_servers}",
           f"rollout.sglang.mem_fraction_static={s.mem_fraction_static}",
           f"rollout.sglang.max_concurrency={s.max_concurrency}",
           f"rollout.sglang.weight_transport={s.weight_transport}"]
    if rollout_nodes:
        out.append(f"launch.sglang_nodes={rollout_nodes}")
    return tuple(out)


def describe(c: Candidate) -> str:
    lay = c.estimate.layout
    where = f"disagg {c.rollout_nodes}n" if c.rollout_nodes else "coloc"
    return (f"TP{lay.tp} PP{lay.pp} CP{lay.cp} DP{lay.dp}{' SP' if lay.sequence_parallel else ''} "
            f"rc={c.cfg.actor.recompute} mb={lay.tokens_per_microbatch} {'off' if c.cfg.actor.offload else ''} | "
            f"SGL TP{lay.engine_tp}x{lay.engines} f={c.cfg.rollout.sglang.mem_fraction_static} "
            f"c={lay.concurrency} | {where}")


def table(rows: list[tuple[str, StepEstimate, Optional[float]]]) -> str:
    """Ranked rows: label, step time by phase, samples/h, tokens/s per GPU, MFU, memory headroom."""
    head = (f"{'#':>3} {'layout':<78} {'rollout':>8} {'logprob':>8} {'train':>8} {'sync':>6} {'ckpt':>6} "
            f"{'step s':>8} {'samples/h':>10} {'tok/s/GPU':>10} {'MFU':>6} {'headroom':>8}")
    lines = [head]
    for i, (label, e, headroom) in enumerate(rows, 1):
        ph = {p.name: p.seconds for p in e.phases}
        room = f"{100 * headroom:.0f}%" if headroom is not None else "-"
        mfu = "-" if e.device == CPU.name else f"{100 * e.mfu:.1f}%"  # a CPU's peak is a placeholder
        lines.append(f"{i:>3} {label:<78} {ph['rollout']:>8.1f} {ph['old_logprob']:>8.1f} {ph['train']:>8.1f} "
                     f"{ph['sync']:>6.1f} {ph['checkpoint']:>6.1f} {e.seconds:>8.1f} {e.samples_per_hour:>10.0f} "
                     f"{e.tokens_per_s_per_gpu:>10.0f} {mfu:>6} {room:>8}")
    return "\n".join(lines)


# ---- the command --------------------------------------------------------------------------------

def config_estimate(cfg: RunConfig, arch: ModelArch, dev: GPU, wl: Workload, eff: Efficiency,
                    gpus_per_node: int, world_size: Optional[int] = None) -> tuple[StepEstimate, Optional[float]]:
    """The config's own layout at ``world_size`` training ranks (default: as ``launch.*`` places
    it): its step time, and its smallest memory headroom (None on a CPU, or when the ledger refuses
    it: then the KV capacity is not known)."""
    train_gpus = world_size or max(cfg.launch.training_world_size, cfg.parallel.model_parallel_size)
    headroom = kv = None
    if dev is not CPU and cfg.rollout.engine == "sglang":
        headroom, kv = _headroom(cfg, arch, dev, train_gpus)
    lay = step_layout(cfg, dev, train_gpus, gpus_per_node, kv, wl, colocated=cfg.rollout.placement == "colocated")
    return estimate(ModelShape.from_arch(arch), dev, lay, wl, eff), headroom


def plan_command(cfg: RunConfig, config_path: str, args) -> int:
    from megatron_fipo.plan import calibrate
    from megatron_fipo.plan.step_time import default_efficiency, device

    arch = ModelArch.from_hf_config(cfg.actor.model_config)
    cpu_run = cfg.launch.gpus_per_node == 0
    dev = device(args.gpu or ("cpu" if cpu_run else cfg.launch.gpu_type), "--gpu" if args.gpu else "launch.gpu_type")
    eff = default_efficiency(dev)
    source = f"default efficiencies for {dev.name}"
    if args.calibrate:
        eff, report = calibrate.calibrate(args.calibrate, dev, eff)
        out = args.calibration_out or str(Path(args.calibrate[0]) / "plan_calibration.json")
        calibrate.save(eff, out, dev.name, args.calibrate)
        print(report)
        print(f"calibration saved to {out}\n")
        source = f"calibrated on {', '.join(args.calibrate)}"
    elif args.efficiency:
        name, eff = calibrate.load(args.efficiency)
        if name != dev.name:
            raise ConfigError(f"--efficiency: {args.efficiency} was calibrated on {name}, this plan is for {dev.name}; "
                              f"pass --gpu {name} or calibrate on runs of this device")
        source = f"calibration {args.efficiency}"
    measured = calibrate.read_steps(args.from_run, cfg) if args.from_run else None
    wl = workload_from_config(cfg, Assumptions(args.prompt_len, args.response_mean, args.keep_fraction), measured)
    nodes = args.nodes or cfg.launch.nodes
    per_node = args.gpus_per_node or (cfg.launch.nproc_per_node if cpu_run else cfg.launch.gpus_per_node)
    print(f"model estimates, not measurements ({source}); workload: {wl.prompts_per_step} x {wl.n_samples} samples, "
          f"prompt {wl.prompt_len:.0f} tokens, responses mean {wl.lengths.mean:.0f} / max {wl.lengths.max}, "
          f"{wl.gen_batches:g} generation batches per step ({'measured in ' + args.from_run if measured else 'assumed'})")
    own, own_room = config_estimate(cfg, arch, dev, wl, eff, per_node)
    if dev is CPU or cfg.rollout.engine != "sglang":
        print(table([("this config", own, own_room)]))
        if args.explain:
            print(own.explain())
        return 0
    ranked = enumerate_layouts(cfg, arch, dev, nodes, per_node, wl, eff)
    if not ranked:
        print(f"no layout of the search space fits {nodes} x {per_node} {dev.name}")
        return 1
    rows = [(describe(c), c.estimate, c.headroom) for c in ranked[: args.top]]
    rows.append((f"this config{'' if own_room is not None else ' (does not fit memory)'}", own, own_room))
    print(f"{len(ranked)} layouts fit {nodes} x {per_node} {dev.name}; the fastest {min(args.top, len(ranked))} "
          "and the config's own:")
    print(table(rows))
    best = ranked[0]
    print("\nbest layout, as overrides:\n  " + "\n  ".join(best.overrides))
    launch = [f"launch.nodes={nodes}", f"launch.gpus_per_node={per_node}", f"launch.nproc_per_node={per_node}"]
    print(f"\nlaunch:\n  megatron-fipo launch slurm {config_path} {' '.join(best.overrides + tuple(launch))}")
    if args.explain:
        print("\nbest layout:\n" + best.estimate.explain())
        print("\nthis config:\n" + own.explain())
    return 0
