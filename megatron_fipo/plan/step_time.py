"""Seconds per phase of one RL step, for a model shape, a layout and a device. Torch-free.

Every phase is a sum of :class:`Term` s, each a formula over counts (tokens, FLOPs, bytes, kernel
launches) divided by a device rate times an efficiency factor of :class:`Efficiency`; ``--explain``
prints each term with its inputs. These are model estimates, not measurements: the default
efficiencies are round figures from public reports (named where they are set), and
``megatron-fipo plan --calibrate RUN_DIR`` replaces them with the ones a cluster's own runs show.

Phases (as the training loop times them, ``time/*`` in metrics.jsonl):

- ``rollout``: per generation batch, prefill (FLOPs) and decode. A decode step reads the engine
  rank's weights and the KV cache of the sequences in flight at HBM bandwidth, or is bound by its
  FLOPs, whichever is slower, plus a fixed per-layer launch latency; how many sequences are in flight
  comes from the engine's KV capacity (the memory ledger) and the batching discipline. Responses
  follow a length distribution (a run's measured mean and max, or assumed ones), so the long tail
  sets how long the last sequences run nearly alone. Dynamic sampling draws ``gen_batches``
  generation batches per step; reward scoring costs per sample.
- ``old_logprob``: one forward over the kept samples (2·N·tokens plus attention).
- ``train``: forward and backward (6·N·tokens plus attention, 8·N with full recompute) over peak x
  efficiency, the pipeline bubble (pp-1)/(m+pp-1), TP collectives per layer and micro-batch over
  NVLink, the DP gradient reduce-scatter and parameter all-gather per optimizer step, the optimizer.
- ``sync``: the weights over the transport (CUDA IPC on a node, NCCL broadcast over the NIC, disk).
- ``checkpoint``: model and optimizer bytes over the file system's bandwidth, amortized over
  ``save_every`` steps.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal, Optional

from megatron_fipo.config_base import ConfigError
from megatron_fipo.plan.hardware import GB, GPU, GPUS

# A device entry for this project's CPU runs. Memory, bandwidth and FLOP/s are placeholders of the
# right order for a small x86 machine, NOT data-sheet figures: a CPU's rates depend on cores, threads
# and load, so CPU estimates are meaningful only after `megatron-fipo plan --calibrate RUN_DIR` has
# fitted the efficiency factors (which multiply these rates) to runs on the machine itself. The link
# between ranks is gloo over loopback, which a TP=1 calibration run cannot show, so it is measured
# instead (tools/bench_cpu_collectives.py, 2 processes on the idle 2-core machine, medians of 1,000):
# an all-reduce of 360 KB per rank (the tiny job's activations per micro-batch) took 0.72-0.91 ms,
# 0.17 ms of it per call (4 bytes: 0.16-0.19 ms), so 0.65 GB/s; larger messages go faster (4 MB:
# ~1.1 GB/s), which this linear model leaves out. NVLink's figure is both directions, as data sheets quote.
CPU_LINK = 0.65 * GB
CPU = GPU("cpu", 16 * 2**30, 20 * GB, 100e9, 100e9, 2 * CPU_LINK, CPU_LINK, 16 * 2**30)
DEVICES: dict[str, GPU] = {**GPUS, "cpu": CPU}


def device(name: str, key: str = "--gpu") -> GPU:
    if name not in DEVICES:
        raise ConfigError(f"{key}: unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    return DEVICES[name]


# ---- the model, as counts -----------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What the step time needs of a dense decoder: sizes only (q width may differ from hidden, as in
    Qwen3, where head_dim x heads != hidden)."""

    hidden: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied_embeddings: bool = False

    @classmethod
    def from_arch(cls, arch) -> "ModelShape":
        return cls(arch.hidden_size, arch.num_layers, arch.num_attention_heads, arch.num_kv_heads, arch.head_dim,
                   arch.ffn_hidden_size, arch.vocab_size, arch.tie_word_embeddings)

    @property
    def q_width(self) -> int:
        return self.q_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Matmul weights of one layer: QKV, output projection, SwiGLU (gate, up, down)."""
        return self.hidden * (self.q_width + 2 * self.kv_heads * self.head_dim) + self.q_width * self.hidden \
            + 3 * self.hidden * self.ffn

    @property
    def matmul_params(self) -> int:
        """Weights a token multiplies through: every layer and the LM head (the embedding is a lookup)."""
        return self.layers * self.layer_params + self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def forward_flops(self, tokens: float, sum_sq_len: float, causal: bool = True) -> float:
        """2·N per token, plus attention: QK^T and AV, 2 FLOPs per multiply-add each, over the
        sequence pairs (half of them under a causal mask): 4·s²·q_width per layer, halved."""
        pairs = sum_sq_len / 2 if causal else sum_sq_len
        return 2 * self.matmul_params * tokens + 4 * self.layers * self.q_width * pairs

    def kv_bytes_per_token(self, elem_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * elem_bytes


def train_flops(shape: ModelShape, seq_lens: list[int]) -> float:
    """Model FLOPs of one forward and backward over these sequences (3x the forward): the numerator
    of MFU. Recomputation is work the hardware does, not model FLOPs, and is left out here."""
    return 3 * shape.forward_flops(sum(seq_lens), sum(s * s for s in seq_lens))


# ---- efficiencies -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Efficiency:
    """Fractions of the device's data-sheet rates a phase achieves, and fixed latencies. Defaults are
    round figures for H100-class GPUs; calibration replaces them with a cluster's own."""

    # Megatron-Core reports 40-47% MFU for dense GPT training at scale on H100 (Megatron-LM README,
    # "weak scaling" table); RL batches of variable-length packed sequences and short optimizer
    # phases land lower.
    train_mfu: float = 0.40
    # Forward-only passes have no backward GEMMs to overlap communication with; similar per GEMM.
    forward_mfu: float = 0.40
    # Prefill in SGLang/vLLM runs large GEMMs over chunked prompts.
    prefill_mfu: float = 0.50
    # Decode GEMMs at batch sizes of a few hundred reach a fraction of peak only.
    decode_mfu: float = 0.35
    # Decode kernels (weights and paged KV reads) stream HBM at 60-80% of its peak bandwidth.
    decode_bandwidth: float = 0.70
    # Per layer and forward call: kernel launches and synchronization not hidden by CUDA graphs
    # (decode) or by the GEMMs (training); ~10 kernels of ~2-3 us.
    layer_latency_s: float = 25e-6
    # Backward launches about twice the forward's kernels per layer.
    backward_latency_factor: float = 2.0
    # Per micro-batch and pass: Megatron's schedule, batch assembly, the loss / logprob epilogue in
    # Python (a few ms on a GPU node).
    microbatch_latency_s: float = 2e-3
    # Per decode step: the engine's scheduler, sampling and detokenization (SGLang ~1 ms per batch).
    decode_step_latency_s: float = 1e-3
    # Per collective call: NCCL's small-message latency on NVLink is ~10 us.
    collective_latency_s: float = 1e-5
    # Per all-gather of the weight sync's back-to-back gathers (the ranks are already in step).
    gather_latency_s: float = 1e-5
    # NCCL all-reduce / all-gather over NVLink reaches ~70% of the one-direction bandwidth.
    nvlink: float = 0.70
    # NCCL over 400 Gb/s InfiniBand reaches ~80% of line rate at large messages.
    nic: float = 0.80
    # Weight updates: gathers, bucket copies and engine-side loads on top of the raw transfer.
    sync_bandwidth: float = 0.30
    # Per weight update: pausing the engines, flushing the radix cache, resuming.
    sync_latency_s: float = 1.0
    # Reward scoring per sample (math-verify parsing, process pool); CPU-bound, per rollout sample.
    score_s_per_sample: float = 2e-4
    # Per optimizer step: gradient norm, clipping, scheduler, zeroing.
    optimizer_step_s: float = 0.05
    # Shared file system write bandwidth per node for checkpoints (bytes/s): a Lustre/GPFS client
    # typically writes a few GB/s.
    fs_bandwidth_per_node: float = 5e9


# Starting factors for the `cpu` device, placeholders of the order a Python-driven run with one
# core per process shows (op dispatch of tens of microseconds, gloo over loopback): a calibration
# replaces the ones its runs exercise (timings.jsonl's calls of different sizes separate per-call
# latency from per-FLOP cost). Latencies: a layer's forward is ~10 dispatched ops of ~20 us; a
# micro-batch adds ~1 ms of Python (batch assembly, schedule, loss). A TP=1 run cannot show the
# collectives: their per-call latency is measured with CPU_LINK above, by
# tools/bench_cpu_collectives.py. A TP all-reduce sits in a stream of compute, and there it adds
# 1.31-1.62 ms per call at a tiny-job micro-batch's activations (259 KB; 3 runs, median 1.45 ms),
# where the same call after a barrier takes 0.1-0.2 ms at 4 B: each rank also waits out the other's
# jitter. Less this size's link term (2 x 130 KB over CPU_LINK, 0.4 ms): 1.05 ms; 1 ms taken. (With
# the barriered 0.17 ms, a TP=2 run's forward and backward came out 36-48% short.) An all-gather of
# 16-360 KB per rank, the tiny model's weight shards in the sync, 0.25-0.8 ms: 0.4 ms taken. The
# link's efficiency is 1 (measured as achieved, not as a peak).
CPU_EFFICIENCY = Efficiency(train_mfu=0.3, forward_mfu=0.3, prefill_mfu=0.3, decode_mfu=0.3, decode_bandwidth=0.5,
                            layer_latency_s=2e-4, microbatch_latency_s=1e-3, decode_step_latency_s=1e-3,
                            collective_latency_s=1e-3, gather_latency_s=4e-4, nvlink=1.0, nic=1.0,
                            sync_latency_s=1e-3, optimizer_step_s=0.02)


def default_efficiency(dev: GPU) -> Efficiency:
    return CPU_EFFICIENCY if dev is CPU else Efficiency()


# ---- what a step does ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ResponseLengths:
    """A response-length distribution: L = max x u^k over quantiles u in (0, 1), with k set so the
    mean is ``mean``; a long tail reaching ``max`` (k = max/mean - 1). A run's measured mean and max
    (metrics.jsonl) or assumed ones."""

    mean: float
    max: int

    def __post_init__(self) -> None:
        if not 0 < self.mean <= self.max:
            raise ConfigError(f"response lengths: need 0 < mean ({self.mean}) <= max ({self.max})")

    @lru_cache(maxsize=256)
    def sample(self, n: int) -> tuple[int, ...]:
        """n lengths at evenly spaced quantiles, in a fixed shuffled order (the order requests finish
        does not follow their arrival)."""
        k = self.max / self.mean - 1
        lengths = [max(1, round(self.max * ((i + 0.5) / n) ** k)) for i in range(n)]
        step = next(s for s in (7919, 104729, 1) if math.gcd(s, n) == 1)
        return tuple(lengths[(i * step) % n] for i in range(n))


@dataclass(frozen=True)
class Workload:
    prompts_per_step: int  # groups trained on per step
    n_samples: int
    prompt_len: float  # mean prompt tokens
    lengths: ResponseLengths
    gen_prompts_per_batch: int
    gen_batches: float  # generation batches per step (dynamic sampling's over-generation)
    minibatch_prompts: int
    ppo_epochs: int = 1
    save_every: int = 0  # 0: no checkpoints
    # Reward scoring seconds per sample, when a run measured it (time/reward_s): a property of the
    # task and of what the policy writes (math-verify's parse time varies 100x with the text), not
    # of the layout; None: Efficiency.score_s_per_sample.
    score_s_per_sample: Optional[float] = None
    logprob_passes: int = 1  # forward passes before the update: 2 with a reference model (GRPO's KL)

    @staticmethod
    def expected_gen_batches(prompts_per_step: int, gen_prompts_per_batch: int, keep_fraction: float,
                             max_gen_batches: int) -> float:
        """Batches until dynamic sampling has kept ``prompts_per_step`` groups, each batch keeping
        ``keep_fraction`` of its groups (1.0 without dynamic sampling)."""
        if keep_fraction <= 0:
            return float(max_gen_batches)
        return float(min(max_gen_batches, math.ceil(prompts_per_step / (gen_prompts_per_batch * keep_fraction))))


@dataclass(frozen=True)
class StepLayout:
    """Where a step runs: trainer parallelism and micro-batching, the rollout engines, placement."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    recompute: Literal["none", "selective", "full"] = "none"
    tokens_per_microbatch: int = 8192
    packing: bool = True  # False: micro-batches padded to their longest sequence (CPU local attention)
    params_bytes: int = 2
    fp8: bool = False
    engine_tp: int = 1
    engines: int = 1
    concurrency: int = 256  # sequences in flight per engine
    continuous_batching: bool = True  # SGLang; False: the embedded engine's static batches
    prefix_sharing: bool = True  # a group's prompt is prefilled once (SGLang's radix cache)
    colocated: bool = True
    transport: Literal["tensor", "distributed", "disk", "inprocess"] = "tensor"
    gpus_per_node: int = 8
    # trainer.max_staleness: > 0 with engines on GPUs of their own, the rollout of the next step
    # overlaps the trainer's passes (docs/async-rollouts.md)
    max_staleness: int = 0

    @property
    def train_gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def rollout_gpus(self) -> int:
        return self.engine_tp * self.engines

    @property
    def gpus(self) -> int:
        return self.train_gpus if self.colocated else self.train_gpus + self.rollout_gpus


@dataclass(frozen=True)
class Term:
    name: str
    seconds: float
    inputs: str  # the formula's inputs, for --explain


@dataclass(frozen=True)
class PhaseTime:
    name: str
    terms: tuple[Term, ...]

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.terms)


@dataclass(frozen=True)
class StepEstimate:
    phases: tuple[PhaseTime, ...]
    layout: StepLayout
    workload: Workload
    train_tokens: float
    model_flops: float  # training model FLOPs per step (MFU numerator)
    gpus: int
    peak_flops: float
    device: str

    def phase(self, name: str) -> PhaseTime:
        return next(p for p in self.phases if p.name == name)

    @property
    def overlapped(self) -> bool:
        """Asynchronous rollouts on engines of their own: the next step's rollout runs during this
        step's old-logprob and train passes; the weight sync and the checkpoint wait for both."""
        return self.layout.max_staleness > 0 and not self.layout.colocated

    @property
    def seconds(self) -> float:
        if not self.overlapped:
            return sum(p.seconds for p in self.phases)
        overlapped = ("rollout", "old_logprob", "train")
        trainer = self.phase("old_logprob").seconds + self.phase("train").seconds
        return max(self.phase("rollout").seconds, trainer) + sum(p.seconds for p in self.phases if p.name not in overlapped)

    @property
    def samples_per_hour(self) -> float:
        return self.workload.prompts_per_step * self.workload.n_samples * 3600 / self.seconds

    @property
    def tokens_per_s_per_gpu(self) -> float:
        """Training tokens (prompt + response) per second of step time per GPU: NeMo-RL's figure."""
        return self.train_tokens / self.seconds / self.gpus

    @property
    def mfu(self) -> float:
        """Model FLOPs of the updates over the train phase's seconds x training GPUs x peak."""
        train = self.phase("train").seconds
        return self.model_flops / (train * self.layout.train_gpus * self.peak_flops) if train > 0 else 0.0

    def explain(self) -> str:
        lines = [f"step {self.seconds:.2f} s (model estimate)"]
        if self.overlapped:
            lines.append(f"  asynchronous (max_staleness {self.layout.max_staleness}): max(rollout, old_logprob + train)"
                         " + sync + checkpoint")
        for ph in self.phases:
            lines.append(f"  {ph.name:<12} {ph.seconds:10.3f} s")
            for t in ph.terms:
                lines.append(f"    {t.name:<34} {t.seconds:10.4f} s  {t.inputs}")
        return "\n".join(lines)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


# ---- rollout ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeTotals:
    steps: float  # decode steps (the engine's makespan)
    seconds_mem: float  # of which bound by reading weights + KV
    seconds_compute: float  # of which bound by FLOPs
    token_steps: float  # sum of sequences in flight over steps (tokens generated)


def _sum_linear(d: float, f0: float, slope: float) -> float:
    """Sum over t = 0..d-1 of f0 + slope*t."""
    return d * f0 + slope * d * (d - 1) / 2


def _segment(d: float, m0: float, m1: float, c0: float, c1: float) -> tuple[float, float]:
    """Sum over d steps of max(mem, compute), both linear in the step: (memory-bound part, compute-bound part)."""
    if d <= 0:
        return 0.0, 0.0
    if m1 == c1 or not 0 < (c0 - m0) / (m1 - c1) < d:
        return (_sum_linear(d, m0, m1), 0.0) if m0 + m1 * d / 2 >= c0 + c1 * d / 2 else (0.0, _sum_linear(d, c0, c1))
    cross = (c0 - m0) / (m1 - c1)
    first_mem = m0 >= c0
    a = _sum_linear(cross, m0, m1) if first_mem else _sum_linear(cross, c0, c1)
    rest = d - cross
    b = _sum_linear(rest, c0 + c1 * cross, c1) if first_mem else _sum_linear(rest, m0 + m1 * cross, m1)
    return (a, b) if first_mem else (b, a)


@lru_cache(maxsize=4096)
def decode_engine(lengths: tuple[int, ...], prompt_len: float, slots: int, continuous: bool,
                  step_mem: tuple[float, float], step_compute: tuple[float, float]) -> DecodeTotals:
    """One engine decoding ``lengths`` with ``slots`` sequences in flight at most.

    A step costs max(mem, compute) with mem = a·m_seq + K·m_kv and compute = a·c_seq + K·c_kv for a
    sequences in flight holding K context tokens (prompt + generated so far). Continuous batching:
    a finished sequence's slot takes the next one at once. Static (the embedded engine): batches of
    ``slots`` run until their longest sequence ends, every row computed each step.
    ``step_mem`` / ``step_compute`` are (per sequence, per context token) seconds; the weights'
    fixed read is added by the caller per step."""
    m_seq, m_kv = step_mem
    c_seq, c_kv = step_compute
    mem = comp = steps = token_steps = 0.0

    def run(d: float, a: int, k0: float) -> None:
        nonlocal mem, comp, steps, token_steps
        x, y = _segment(d, a * m_seq + k0 * m_kv, a * m_kv, a * c_seq + k0 * c_kv, a * c_kv)
        mem, comp, steps, token_steps = mem + x, comp + y, steps + d, token_steps + a * d

    if not continuous:
        for start in range(0, len(lengths), slots):
            batch = lengths[start:start + slots]
            run(max(batch), len(batch), len(batch) * prompt_len)
        return DecodeTotals(steps, mem, comp, token_steps)
    pending = iter(lengths[slots:])
    active = [(length, 0) for length in lengths[:slots]]  # (finish step, start step)
    heapq.heapify(active)
    t = start_sum = 0
    while active:
        finish = active[0][0]
        a = len(active)
        run(finish - t, a, a * (prompt_len + t) - start_sum)  # context = prompt + steps since start
        t = finish
        while active and active[0][0] == t:
            start_sum -= heapq.heappop(active)[1]
        for length in pending:
            heapq.heappush(active, (t + length, t))
            start_sum += t
            if len(active) == slots:
                break
    return DecodeTotals(steps, mem, comp, token_steps)


def rollout_phase(shape: ModelShape, dev: GPU, lay: StepLayout, wl: Workload, eff: Efficiency) -> PhaseTime:
    """Generation batches x (prefill + the slowest engine's decode) + reward scoring."""
    seqs = wl.gen_prompts_per_batch * wl.n_samples
    per_engine = math.ceil(seqs / lay.engines)
    tp = lay.engine_tp
    bw = dev.hbm_bandwidth * eff.decode_bandwidth * tp  # the engine's ranks read their shards in parallel
    flops = dev.bf16_dense_flops * tp
    weight_bytes = shape.params * 2  # bf16 serving weights
    kv_token = shape.kv_bytes_per_token()
    m_seq, m_kv = 0.0, kv_token / bw
    c_seq, c_kv = 2 * shape.matmul_params / (flops * eff.decode_mfu), 4 * shape.layers * shape.q_width / (flops * eff.decode_mfu)
    lengths = wl.lengths.sample(per_engine)
    dec = decode_engine(lengths, wl.prompt_len, lay.concurrency, lay.continuous_batching, (m_seq, m_kv), (c_seq, c_kv))
    weights_s = dec.steps * weight_bytes / bw
    # An engine with TP > 1 all-reduces twice per layer and step (attention and MLP outputs).
    tp_calls = 2 * shape.layers if tp > 1 else 0
    latency_s = dec.steps * (shape.layers * eff.layer_latency_s + eff.decode_step_latency_s + tp_calls * eff.collective_latency_s)
    prompts = wl.gen_prompts_per_batch if lay.prefix_sharing else seqs
    prefill_flops = shape.forward_flops(prompts * wl.prompt_len, prompts * wl.prompt_len ** 2)
    prefill_s = prefill_flops / (flops * lay.engines * eff.prefill_mfu)
    b = wl.gen_batches
    score = eff.score_s_per_sample if wl.score_s_per_sample is None else wl.score_s_per_sample
    bound = f"{per_engine} seqs/engine, {lay.concurrency} in flight, {dec.steps:.0f} decode steps"
    return PhaseTime("rollout", (
        Term("decode: weight reads", b * weights_s,
             f"{b:g} batches x {dec.steps:.0f} steps x {weight_bytes / 1e9:.3g} GB / ({tp} x {dev.hbm_bandwidth / 1e12:.3g} TB/s x {eff.decode_bandwidth})"),
        Term("decode: KV reads (memory-bound steps)", b * dec.seconds_mem,
             f"{bound}, {kv_token / 1e3:.3g} kB/token KV"),
        Term("decode: FLOP-bound steps", b * dec.seconds_compute,
             f"2 x {shape.matmul_params / 1e9:.3g}G params x seqs in flight / ({tp} x {dev.bf16_dense_flops / 1e12:.3g} TFLOP/s x {eff.decode_mfu})"),
        Term("decode: launch + scheduler latency", b * latency_s,
             f"{dec.steps:.0f} steps x ({shape.layers} layers x {eff.layer_latency_s:.3g} s + {eff.decode_step_latency_s:.3g} s"
             f" + {tp_calls} TP all-reduces x {eff.collective_latency_s:.3g} s)"),
        Term("prefill", b * prefill_s, f"{prompts} prompts x {wl.prompt_len:.0f} tokens, {_fmt(prefill_flops)} FLOPs x {b:g} batches"),
        Term("reward scoring", b * seqs * score, f"{b:g} x {seqs} samples x {score:.3g} s"),
    ))


def decode_batch_seconds(shape: ModelShape, dev: GPU, lay: StepLayout, eff: Efficiency, rows: int, prompt_len: float,
                         steps: int) -> float:
    """One static batch of ``rows`` sequences prefilled from ``prompt_len`` tokens and decoded for
    ``steps`` steps on one engine (what the embedded engine records in timings.jsonl): the rollout
    phase's own terms for that batch, without scoring."""
    wl = Workload(prompts_per_step=rows, n_samples=1, prompt_len=prompt_len, lengths=ResponseLengths(steps, steps),
                  gen_prompts_per_batch=rows, gen_batches=1, minibatch_prompts=rows, score_s_per_sample=0.0)
    one = replace(lay, engines=1, concurrency=rows, continuous_batching=False, prefix_sharing=False)
    return rollout_phase(shape, dev, one, wl, eff).seconds


# ---- training -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Microbatches:
    count: float  # micro-batches per DP rank over one pass of the step's samples
    tokens: float  # tokens computed per DP rank (padding included), one pass
    sum_sq: float  # sum of squared sequence lengths per DP rank (attention)
    per_minibatch: float  # micro-batches per DP rank per optimizer step (the pipeline's m)


@lru_cache(maxsize=4096)
def microbatches(wl: Workload, lay: StepLayout) -> Microbatches:
    """How the step's kept samples split: mini-batches of ``minibatch_prompts`` groups, each DP
    rank's share of them packed (or padded) into micro-batches of ``tokens_per_microbatch``."""
    lengths = [round(wl.prompt_len) + x for x in wl.lengths.sample(wl.prompts_per_step * wl.n_samples)]
    per_mb = wl.minibatch_prompts * wl.n_samples
    minibatches = max(1, wl.prompts_per_step // wl.minibatch_prompts)
    count = tokens = sum_sq = 0.0
    for start in range(0, len(lengths), per_mb):
        share = lengths[start:start + per_mb][:: lay.dp]  # rank 0's strided share
        for group in partition(share, lay.tokens_per_microbatch, lay.packing):
            count += 1
            tokens += sum(group) if lay.packing else max(group) * len(group)
            sum_sq += sum(s * s for s in group) if lay.packing else max(group) ** 2 * len(group)
    return Microbatches(count, tokens, sum_sq, count / minibatches)


def partition(lengths: list[int], max_tokens: int, pack: bool) -> list[list[int]]:
    """The actor's greedy, order-preserving micro-batches (actor/batching.py ``partition``): packed
    sequences up to ``max_tokens``, or padded rows while longest x rows fits; a longer sequence
    alone."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = longest = 0
    for length in lengths:
        total, longest = total + length, max(longest, length)
        if current and (total if pack else longest * (len(current) + 1)) > max_tokens:
            groups.append(current)
            current, total, longest = [], length, length
        current.append(length)
    if current:
        groups.append(current)
    return groups


def _ring(bytes_: float, ranks: int, bandwidth: float) -> float:
    """A ring all-gather or reduce-scatter: each rank moves (ranks-1)/ranks of the buffer."""
    return 0.0 if ranks <= 1 else bytes_ * (ranks - 1) / ranks / bandwidth


def _link(lay: StepLayout, dev: GPU, eff: Efficiency, span: int) -> tuple[float, str]:
    """Bandwidth of a group of ``span`` consecutive ranks: NVLink inside a node, the NIC across."""
    if span <= lay.gpus_per_node:
        return dev.nvlink_bandwidth / 2 * eff.nvlink, "NVLink"  # data sheets quote both directions
    return dev.nic_bandwidth * eff.nic, "NIC"


def _microbatch_terms(shape: ModelShape, dev: GPU, lay: StepLayout, eff: Efficiency, backward: bool, passes: int,
                      mb: Microbatches) -> list[Term]:
    """Compute, bubble, launch latency and TP collectives of ``passes`` passes over these micro-batches."""
    model_parallel = lay.tp * lay.pp * lay.cp
    peak = dev.fp8_dense_flops if lay.fp8 else dev.bf16_dense_flops
    mfu = eff.train_mfu if backward else eff.forward_mfu
    fwd = shape.forward_flops(mb.tokens, mb.sum_sq)
    factor = 3.0 if backward else 1.0
    if backward and lay.recompute == "full":
        factor = 4.0  # the forward again in backward
    compute = passes * factor * fwd / model_parallel / (peak * mfu)
    bubble = (lay.pp - 1) / (mb.per_minibatch + lay.pp - 1)
    launches = 1 + (eff.backward_latency_factor if backward else 0) + (1 if backward and lay.recompute == "full" else 0)
    per_mb = shape.layers / lay.pp * eff.layer_latency_s + eff.microbatch_latency_s
    latency = passes * mb.count * launches * per_mb
    terms = [
        Term("GEMMs + attention", compute,
             f"{factor:g} x {_fmt(fwd)} FLOPs/DP rank x {passes} / ({model_parallel} GPUs x {peak / 1e12:.4g} TFLOP/s x {mfu})"),
        Term("pipeline bubble", compute * bubble / (1 - bubble),
             f"(pp-1)/(m+pp-1) = {lay.pp - 1}/({mb.per_minibatch:.1f}+{lay.pp - 1})"),
        Term("launch latency", latency,
             f"{passes} x {mb.count:.0f} micro-batches x {launches:g} x ({shape.layers}/{lay.pp} layers x "
             f"{eff.layer_latency_s:.3g} s + {eff.microbatch_latency_s:.3g} s)"),
    ]
    if lay.tp > 1:
        # Per layer two TP collectives in the forward (attention and MLP outputs: all-reduce, or
        # reduce-scatter + all-gather with SP, the same bytes), as many in backward, and again for
        # a recomputed forward; an all-reduce moves twice a ring pass.
        bw, link = _link(lay, dev, eff, lay.tp)
        calls = 2 * (1 + (1 if backward else 0) + (1 if backward and lay.recompute == "full" else 0))
        volume = mb.tokens / lay.cp * shape.hidden * lay.params_bytes
        tp_s = passes * shape.layers / lay.pp * calls * 2 * _ring(volume, lay.tp, bw)
        terms.append(Term("TP collectives", tp_s, f"{calls} per layer x {_fmt(volume)} B over {link}, tp={lay.tp}"))
        # Each call also pays the collective's latency; so do the vocab-parallel logprob's reductions
        # (max, sum of exp, the target's logit: 3 per micro-batch, as many in backward).
        calls_total = passes * mb.count * (shape.layers / lay.pp * calls + 3 * (2 if backward else 1))
        terms.append(Term("TP collective latency", calls_total * eff.collective_latency_s,
                          f"{calls_total:.0f} calls x {eff.collective_latency_s:.3g} s"))
    return terms


def microbatch_seconds(shape: ModelShape, dev: GPU, lay: StepLayout, eff: Efficiency, backward: bool, tokens: float,
                       sum_sq: float) -> float:
    """One micro-batch of ``tokens`` (sum of squared sequence lengths ``sum_sq``) through the
    forward, or forward and backward: what the actor records in timings.jsonl."""
    one = Microbatches(1, tokens, sum_sq, 1)
    return sum(t.seconds for t in _microbatch_terms(shape, dev, lay, eff, backward, 1, one))


def pass_phase(name: str, shape: ModelShape, dev: GPU, lay: StepLayout, wl: Workload, eff: Efficiency,
               backward: bool) -> PhaseTime:
    """The old-logprob pass (forward) or the PPO updates (forward + backward + optimizer)."""
    mb = microbatches(wl, lay)
    passes = wl.ppo_epochs if backward else wl.logprob_passes
    terms = _microbatch_terms(shape, dev, lay, eff, backward, passes, mb)
    if backward:
        steps = passes * max(1, wl.prompts_per_step // wl.minibatch_prompts)
        local_params = shape.params / (lay.tp * lay.pp)
        shards = lay.dp * lay.cp
        if shards > 1:
            bw, link = _link(lay, dev, eff, lay.train_gpus)
            # Distributed optimizer: reduce-scatter fp32 grads, all-gather bf16 params.
            dp_s = steps * (_ring(local_params * 4, shards, bw) + _ring(local_params * lay.params_bytes, shards, bw))
            terms.append(Term("DP grad reduce-scatter + param all-gather", dp_s,
                              f"{steps} optimizer steps x {local_params / 1e9:.3g}G params over {link}, {shards} shards"))
        # Adam reads and writes grads, master params and two moments (4 x fp32, read + write).
        opt_bytes = local_params / shards * 4 * 4 * 2
        terms.append(Term("optimizer", steps * (opt_bytes / (dev.hbm_bandwidth * eff.decode_bandwidth) + eff.optimizer_step_s),
                          f"{steps} steps x ({_fmt(opt_bytes)} B of Adam state at HBM speed + {eff.optimizer_step_s:.3g} s)"))
    return PhaseTime(name, tuple(terms))


def sync_phase(shape: ModelShape, dev: GPU, lay: StepLayout, eff: Efficiency) -> PhaseTime:
    """The new weights into every engine: gathered into HF buckets, then over the transport."""
    weight_bytes = shape.params * lay.params_bytes
    if lay.transport == "distributed":
        bw, how = dev.nic_bandwidth * eff.nic, "NCCL broadcast over the NIC"
    elif lay.transport == "disk":
        bw, how = eff.fs_bandwidth_per_node / 2, "safetensors written and read back"
    elif lay.transport == "inprocess":
        bw, how = dev.hbm_bandwidth, "copied in process"
    else:
        bw, how = dev.nvlink_bandwidth / 2, "CUDA IPC on the node"
    terms = [Term("weight transfer", weight_bytes / (bw * eff.sync_bandwidth),
                  f"{weight_bytes / 1e9:.3g} GB {how} at {bw / 1e9:.3g} GB/s x {eff.sync_bandwidth}"),
             Term("engine pause/flush/resume", eff.sync_latency_s, f"{eff.sync_latency_s:.3g} s")]
    if lay.tp > 1:  # one all-gather per TP-sharded tensor: QKV weight and bias, proj, fc1, fc2, the embeddings
        tensors = shape.layers * 5 + (1 if shape.tied_embeddings else 2)
        terms.append(Term("TP shard gathers", tensors * eff.gather_latency_s,
                          f"{tensors} tensors x {eff.gather_latency_s:.3g} s"))
    return PhaseTime("sync", tuple(terms))


def checkpoint_phase(shape: ModelShape, lay: StepLayout, wl: Workload, eff: Efficiency) -> PhaseTime:
    """Weights (params dtype) and Adam state (fp32 master + 2 moments) of the whole model, written
    by all training nodes in parallel, once every ``save_every`` steps."""
    if wl.save_every <= 0:
        return PhaseTime("checkpoint", ())
    total = shape.params * (lay.params_bytes + 12)
    nodes = max(1, math.ceil(lay.train_gpus / lay.gpus_per_node))
    seconds = total / (nodes * eff.fs_bandwidth_per_node)
    return PhaseTime("checkpoint", (Term("checkpoint / save_every", seconds / wl.save_every,
                                         f"{total / 1e9:.3g} GB / ({nodes} nodes x {eff.fs_bandwidth_per_node / 1e9:.3g} GB/s) / {wl.save_every}"),))


def estimate(shape: ModelShape, dev: GPU, lay: StepLayout, wl: Workload, eff: Efficiency = Efficiency()) -> StepEstimate:
    phases = (rollout_phase(shape, dev, lay, wl, eff),
              pass_phase("old_logprob", shape, dev, lay, wl, eff, backward=False),
              pass_phase("train", shape, dev, lay, wl, eff, backward=True),
              sync_phase(shape, dev, lay, eff),
              checkpoint_phase(shape, lay, wl, eff))
    lengths = [round(wl.prompt_len) + x for x in wl.lengths.sample(wl.prompts_per_step * wl.n_samples)]
    flops = wl.ppo_epochs * train_flops(shape, lengths)
    peak = dev.fp8_dense_flops if lay.fp8 else dev.bf16_dense_flops
    return StepEstimate(phases, lay, wl, float(sum(lengths)), flops, lay.gpus, peak, dev.name)
