"""The memory ledger: bytes per GPU, term by term, in each phase of an RL step. Torch-free.

Phases of one colocated step, and what each holds on a GPU that carries a trainer rank and one TP
rank of an SGLang engine:

- ``rollout``: SGLang generates (weights, KV cache, CUDA graphs, activations); the trainer holds
  its residual when ``actor.offload`` moved its state to host RAM, its whole state otherwise.
- ``old-logprob``: the trainer's forward over the rollouts (state, one layer's workspace, the
  logits chunk); SGLang has released its memory tags and keeps its context.
- ``training``: the trainer's forward/backward (state, stored activations, workspace, logits chunk).
- ``weight-sync``: SGLang's weights resumed to be overwritten, the trainer's state and the HF
  buckets it hands over.

Every figure follows from the inputs in :class:`Layout` by a formula named where it is computed;
the few no formula gives (CUDA context, NCCL buffers, allocations kept when released) are the
explicit estimates in :class:`Overheads`. A GPU-only run refuses a layout whose any phase leaves
less than ``MIN_HEADROOM`` of the GPU free (:func:`check_fits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, Optional

from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import ConfigError
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.plan.hardware import GPU, gpu as gpu_named

GiB = 1 << 30
MiB = 1 << 20
# Fragmentation of the caching allocator and the error of the estimates below need room: a phase
# fits when this fraction of the GPU is left over.
MIN_HEADROOM = 0.10
GRAD_BYTES = 4  # actor/model.py builds DDP with grad_reduce_in_fp32=True: an fp32 main_grad buffer
ADAM_MOMENT_BYTES = 4  # exp_avg and exp_avg_sq in fp32 (torch Adam on CPU, TE FusedAdam on GPU)
MAIN_PARAM_BYTES = 4  # the optimizer's fp32 master copy of a lower-precision parameter


@dataclass(frozen=True)
class Overheads:
    """Per-process GPU memory that no formula gives. Estimates, not measured on a GPU here: replace
    them with nvidia-smi figures from the cluster.

    - ``cuda_context``: a bare PyTorch CUDA context is ~0.5 GiB on Hopper with CUDA 12 lazy module
      loading; cuBLAS/cuBLASLt workspaces and Transformer Engine / FlashInfer kernels bring a working
      process to about 1 GiB.
    - ``trainer_nccl``: NCCL keeps 4 MiB (NCCL_BUFFSIZE) per protocol per channel per peer, for up to
      32 channels, in each communicator the trainer uses (TP, DP x CP, model-parallel, world), plus
      NVLink SHARP buffers on NVSwitch systems.
    - ``trainer_kept_offloaded``: what stays when the trainer's state is offloaded and the cache
      emptied: RoPE tables, RNG states, small buffers outside the offloaded regions.
    - ``sglang_nccl``: the engine's TP communicator and its custom all-reduce IPC buffers.
    - ``sglang_untagged``: what a server keeps with every memory tag released (sampling and
      scheduling buffers outside SGLang's ``weights`` / ``kv_cache`` / ``cuda_graph`` regions).
    """

    cuda_context: int = 1 * GiB
    trainer_nccl: int = 2 * GiB
    trainer_kept_offloaded: int = 512 * MiB
    sglang_nccl: int = 1 * GiB
    sglang_untagged: int = 512 * MiB


@dataclass(frozen=True)
class SGLangLayout:
    """One SGLang engine TP rank: on a trainer GPU (colocated) or on a GPU of its own (disaggregated)."""

    tp: int
    mem_fraction_static: float
    # SGLang 0.5.23 picks these from the GPU's memory when not given (arg_groups/memory_hook.py,
    # _handle_gpu_memory_settings): H100/H200 8192 tokens and 256 (TP < 4) or 512 sequences, B200 16384 / 512.
    chunked_prefill_size: int
    cuda_graph_max_bs: int
    # Colocated servers release their memory tags while the trainer runs (rollout.sglang.release_memory).
    release_memory: bool = True
    colocated: bool = True
    weight_bytes: int = 2  # bf16 serving weights
    kv_bytes: int = 2  # --kv-cache-dtype auto: the model's dtype

    @staticmethod
    def defaults_for(gpu: GPU, tp: int) -> tuple[int, int]:
        """SGLang 0.5.23's (chunked_prefill_size, decode cuda_graph_max_bs) for a GPU of this size."""
        mib = gpu.memory_bytes / MiB
        if mib < 60 * 1024:
            raise ConfigError(f"launch.gpu_type={gpu.name}: the ledger models GPUs of >= 60 GiB only")
        if mib < 160 * 1024:
            return 8192, 256 if tp < 4 else 512
        return 16384, 512


@dataclass(frozen=True)
class Layout:
    """Everything the ledger reads: one trainer rank's share of the model and its micro-batch, and
    the SGLang engine rank beside it. Built from a RunConfig by :func:`layout_from_config`; a
    planner may vary any field."""

    arch: ModelArch
    gpu: GPU
    tp: int
    pp: int
    cp: int
    dp: int
    sequence_parallel: bool
    distributed_optimizer: bool
    params_bytes: int  # 2 for bf16, 4 for fp32
    # te: Transformer Engine layers (GPU), norm weights in the params dtype; local: Megatron's local
    # spec (CPU), whose torch.nn.RMSNorm keeps fp32 weights.
    spec: Literal["te", "local"]
    recompute: Literal["none", "selective", "full"]
    tokens_per_microbatch: int
    logprob_chunk_size: int
    offload: bool
    nproc_per_node: int
    bridge_bucket_bytes: int
    longest_sequence: int  # prompt + response: one request SGLang must be able to hold
    sglang: Optional[SGLangLayout]  # None: no SGLang servers this job places (embedded engine, or URLs)
    overheads: Overheads = field(default_factory=Overheads)


# ---- the trainer's parameters, as Megatron lays them out --------------------------------------

@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    elem_bytes: int
    shared_embedding: bool = False  # tied embedding on a PP stage: Megatron gives it its own bucket


def megatron_params(lay: Layout, pp_rank: int) -> list[Param]:
    """This PP stage's parameters, TP-local shapes, in Megatron's registration order (GPTModel with
    the local or TE layer spec); the order matters only for the 64-element alignment gaps."""
    a, h, tp, pb = lay.arch, lay.arch.hidden_size, lay.tp, lay.params_bytes
    norm = pb if lay.spec == "te" else 4
    q_rows = a.num_attention_heads * a.head_dim // tp
    qkv_rows = q_rows + 2 * a.num_kv_heads * a.head_dim // tp
    vocab = a.padded_vocab_size(tp) // tp  # the actor's rows: TP pads a vocabulary it does not divide
    shared = a.tie_word_embeddings and lay.pp > 1
    first, last = pp_rank == 0, pp_rank == lay.pp - 1
    params = [Param("embedding.word_embeddings.weight", vocab * h, pb, shared)] if first else []
    offset = pp_rank * (a.num_layers // lay.pp)
    for i in range(offset, offset + a.num_layers // lay.pp):
        p = f"decoder.layers.{i - offset}."
        proj = Param(p + "self_attention.linear_proj.weight", h * q_rows, pb)
        qkv = [Param(p + "self_attention.linear_qkv.weight", qkv_rows * h, pb)]
        if a.qkv_bias:
            qkv.append(Param(p + "self_attention.linear_qkv.bias", qkv_rows, pb))
        mlp = [Param(p + "mlp.linear_fc1.weight", 2 * a.ffn_hidden_size // tp * h, pb),
               Param(p + "mlp.linear_fc2.weight", h * a.ffn_hidden_size // tp, pb)]
        if lay.spec == "local":
            params += [Param(p + "input_layernorm.weight", h, norm), proj, *qkv,
                       Param(p + "pre_mlp_layernorm.weight", h, norm), *mlp]
        else:  # TE fuses each norm into the linear after it (LayerNormColumnParallelLinear)
            params += [proj, Param(p + "self_attention.linear_qkv.layer_norm_weight", h, norm), *qkv,
                       Param(p + "mlp.linear_fc1.layer_norm_weight", h, norm), *mlp]
    if last:
        params.append(Param("decoder.final_layernorm.weight", h, norm))
        if not a.tie_word_embeddings or lay.pp > 1:
            params.append(Param("output_layer.weight", vocab * h, pb, shared))
    return params


def _pad(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


@dataclass(frozen=True)
class Buffer:
    """One DDP param-and-grad buffer (all parameters of one dtype): Megatron 0.19.2's layout."""

    elem_bytes: int
    numel: int  # padded
    numel_unpadded: int
    ranges: tuple[tuple[int, int, int], ...]  # (start, end, elem_bytes) of each parameter
    buckets: tuple[tuple[int, int], ...]


def ddp_buffers(params: list[Param], shards: int, distributed_optimizer: bool) -> list[Buffer]:
    """Megatron 0.19.2 groups parameters by dtype into one buffer each (grad_reduce_in_fp32 makes
    every grad fp32). With the distributed optimizer (DistributedOptimizer._compute_per_buffer_param_layout)
    it lays them out in reverse order, each starting on a 64-element boundary, a tied embedding in a
    bucket of its own, and pads each bucket's end to a multiple of lcm(DP x CP, 128) so the bucket
    splits evenly into optimizer shards; without it, back to back and unpadded. overlap_grad_reduce
    is off, so there is one bucket besides the tied embedding's."""
    by_dtype: dict[int, list[Param]] = {}
    for p in params:
        by_dtype.setdefault(p.elem_bytes, []).append(p)
    end_divisor = math.lcm(shards, 128)
    buffers = []
    for elem_bytes, group in by_dtype.items():
        ranges, buckets = [], []
        start = bucket_start = 0
        in_bucket = False
        for p in reversed(group):
            if distributed_optimizer:
                start = _pad(start, 64)
                if p.shared_embedding and in_bucket:
                    buckets.append((bucket_start, _pad(start, end_divisor)))
                    start = bucket_start = buckets[-1][1]
            ranges.append((start, start + p.numel, p.elem_bytes))
            start += p.numel
            in_bucket = True
            if distributed_optimizer and p.shared_embedding:
                buckets.append((bucket_start, _pad(start, end_divisor)))
                start = bucket_start = buckets[-1][1]
                in_bucket = False
        if in_bucket:
            buckets.append((bucket_start, _pad(start, end_divisor) if distributed_optimizer else start))
        unpadded = sum(e - s for s, e, _ in ranges)
        buffers.append(Buffer(elem_bytes, buckets[-1][1], unpadded, tuple(ranges), tuple(buckets)))
    return buffers


@dataclass(frozen=True)
class OptimizerShard:
    """What one rank's optimizer holds: elements of its shard, and those needing an fp32 copy."""

    elements: int
    lowp_elements: int  # elements of non-fp32 parameters: these get an fp32 master copy

    @property
    def main_param_bytes(self) -> int:
        return self.lowp_elements * MAIN_PARAM_BYTES

    @property
    def moment_bytes(self) -> int:
        return 2 * self.elements * ADAM_MOMENT_BYTES


def optimizer_shard(buffers: list[Buffer], shards: int, rank: int, distributed_optimizer: bool) -> OptimizerShard:
    """The distributed optimizer splits each bucket into ``shards`` equal ranges (DP x CP ranks); a
    rank's Adam state covers the parameter elements inside its range (padding holds none). fp32
    parameters are their own master copy (the shard is a view); bf16 ones get an fp32 clone. Without
    the distributed optimizer every rank holds all of it."""
    elements = lowp = 0
    for buf in buffers:
        for b_start, b_end in buf.buckets:
            size = (b_end - b_start) // shards if distributed_optimizer else b_end - b_start
            lo = b_start + rank * size if distributed_optimizer else b_start
            hi = lo + size
            for s, e, elem_bytes in buf.ranges:
                n = max(0, min(e, hi) - max(s, lo))
                elements += n
                lowp += n if elem_bytes < 4 else 0
    return OptimizerShard(elements, lowp)


@dataclass(frozen=True)
class TrainerState:
    """The trainer's model state on its most loaded rank (bytes)."""

    param_bytes_unpadded: int  # sum of the parameters' numel x element size
    weights: int  # the DDP param buffer (padded) with the distributed optimizer, else the parameters
    grads: int  # the fp32 grad buffer, padded like the param buffer
    main_params: int
    moments: int
    pp_rank: int
    dp_rank: int

    @property
    def optimizer(self) -> int:
        return self.main_params + self.moments

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def trainer_state(lay: Layout, pp_rank: int | None = None, dp_rank: int | None = None) -> TrainerState:
    """A given rank's state, or the largest over PP stages and optimizer shards."""
    shards = lay.dp * lay.cp  # Megatron shards the optimizer over the DP x CP group
    candidates = []
    for pr in [pp_rank] if pp_rank is not None else range(lay.pp):
        params = megatron_params(lay, pr)
        buffers = ddp_buffers(params, shards, lay.distributed_optimizer)
        unpadded = sum(p.numel * p.elem_bytes for p in params)
        weights = sum(b.numel * b.elem_bytes for b in buffers) if lay.distributed_optimizer else unpadded
        grads = sum(b.numel for b in buffers) * GRAD_BYTES
        for dr in [dp_rank] if dp_rank is not None else range(shards if lay.distributed_optimizer else 1):
            shard = optimizer_shard(buffers, shards, dr, lay.distributed_optimizer)
            candidates.append(TrainerState(unpadded, weights, grads, shard.main_param_bytes, shard.moment_bytes, pr, dr))
    return max(candidates, key=lambda s: s.total)


# ---- activations -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Activations:
    stored: int  # kept for backward across the forward pass (all in-flight micro-batches)
    workspace: int  # one layer's full activations: recomputed in backward, or the forward-only pass
    logits_chunk: int  # the live output-layer chunk of the chunked logprob


def activations(lay: Layout) -> Activations:
    """Per-GPU activation bytes for one micro-batch of ``tokens_per_microbatch`` tokens (packed).

    After Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
    (Megatron's per-layer accounting, sbh(34 + 5as/h) for GPT), redone term by term for this model:
    a Qwen2/Llama layer (GQA, SwiGLU, no dropout) with Transformer Engine flash attention, which
    stores no [s, s] scores. Per token and layer, in the activation dtype:

    - outside the TP regions: both norms' inputs, and the inputs of linear_qkv and linear_fc1 (the
      norms' outputs): 4h; split over TP only with sequence parallelism (Megatron keeps the
      un-gathered input and gathers it again in backward);
    - inside, split over TP: q and the attention output 2·a·d, k and v 2·kv·d, fc1's output 2f and
      the SwiGLU output f; plus flash attention's fp32 softmax statistics, 4 bytes per head.

    ``selective`` recomputes core attention only: with flash attention its inputs and output are kept
    by the neighbouring linears anyway, so it saves just the softmax statistics. ``full`` (uniform,
    one layer per group) keeps each layer's input (h per token, split over TP with SP) and recomputes
    one layer at a time in backward. The first 1F1B stage holds ``pp`` micro-batches in flight, each
    of num_layers / pp layers. CP splits the tokens.
    """
    a, t = lay.arch, lay.tp
    act = lay.params_bytes
    sp = t if lay.sequence_parallel else 1
    tokens = -(-lay.tokens_per_microbatch // lay.cp)
    h, d, f = a.hidden_size, a.head_dim, a.ffn_hidden_size
    heads, kv = a.num_attention_heads, a.num_kv_heads
    softmax_stats = 4 * heads // t
    inside = act * (2 * heads * d + 2 * kv * d + 3 * f) // t
    per_layer_none = act * 4 * h // sp + inside + softmax_stats
    per_layer = {"none": per_layer_none, "selective": per_layer_none - softmax_stats,
                 "full": act * h // sp}[lay.recompute]
    # The final norm's input and output (the output layer's input), outside the layers.
    outside_layers = 2 * act * h // sp
    stored = tokens * (a.num_layers * per_layer + outside_layers)  # = (L/pp) layers x pp in flight
    # One layer's activations live at once: recomputed in backward (full), or built in the forward
    # pass; with SP plus the all-gathered [s, h] input of a TP region.
    workspace = tokens * (per_layer_none + (act * h if lay.sequence_parallel else 0))
    return Activations(stored, workspace, logits_chunk_bytes(lay))


def logits_chunk_bytes(lay: Layout) -> int:
    """actor/logprobs.py scores ``logprob_chunk_size`` rows of the local sequence at a time; with SP
    the output layer all-gathers them, so a chunk has TP x chunk rows, each vocab / TP wide. Live at
    once: the logits in the params dtype, their fp32 scaled copy z, exp(z) (turned into the softmax
    in place) and the fp32 product exp(z)·z of the entropy sum."""
    sp = lay.tp if lay.sequence_parallel else 1
    local = -(-lay.tokens_per_microbatch // lay.cp) // sp
    rows = min(lay.logprob_chunk_size, max(local, 1)) * sp
    return rows * (lay.arch.padded_vocab_size(lay.tp) // lay.tp) * (lay.params_bytes + 3 * 4)


# ---- SGLang ----------------------------------------------------------------------------------

def sglang_weight_bytes(arch: ModelArch, tp: int, elem_bytes: int = 2) -> int:
    """One TP rank of SGLang's Qwen2/Llama: vocab-parallel embedding and LM head (vocab padded to a
    multiple of 64, or of 64 x TP when TP does not divide that: VocabParallelEmbedding), QKVParallelLinear with KV heads replicated when
    TP exceeds them, row/column-parallel o_proj, gate_up_proj and down_proj, replicated norms."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    vocab = _pad(arch.vocab_size, 64)
    vocab = (vocab if vocab % tp == 0 else _pad(arch.vocab_size, 64 * tp)) // tp
    kv_heads = max(1, arch.num_kv_heads // tp)
    qkv_rows = (arch.num_attention_heads // tp + 2 * kv_heads) * d
    layer = qkv_rows * h + (qkv_rows if arch.qkv_bias else 0) + h * arch.num_attention_heads // tp * d
    layer += 2 * f // tp * h + h * f // tp + 2 * h
    embeddings = vocab * h * (1 if arch.tie_word_embeddings else 2)
    return (embeddings + arch.num_layers * layer + h) * elem_bytes


def sglang_kv_bytes_per_token(arch: ModelArch, tp: int, elem_bytes: int = 2) -> int:
    """SGLang's cell_size: K and V of every layer for this rank's KV heads (at least one)."""
    return max(1, arch.num_kv_heads // tp) * arch.head_dim * arch.num_layers * 2 * elem_bytes


def sglang_reserve_bytes(gpu: GPU, sg: SGLangLayout) -> int:
    """SGLang 0.5.23's own estimate of its activations and CUDA graphs, the memory it leaves out of
    ``mem_fraction_static`` when it picks the fraction itself (arg_groups/memory_hook.py):
    512 MiB + 1.5 MiB per chunked-prefill token + TP/8 GiB + 2 MiB per decode CUDA-graph batch slot,
    at least 10 GiB on a GPU of more than 60 GiB."""
    mib = 512 + 1.5 * max(sg.chunked_prefill_size, 2048) + sg.tp / 8 * 1024 + 2 * sg.cuda_graph_max_bs
    if gpu.memory_bytes > 60 * 1024 * MiB:
        mib = max(mib, 10 * 1024)
    return int(mib * MiB)


def sglang_pre_load_bytes(lay: Layout) -> int:
    """Free memory SGLang measures after its own context and NCCL, before loading weights
    (bootstrap.measure_pre_model_load_memory): its static pool is ``mem_fraction_static`` of this.
    Taken with nothing of the trainer's on the GPU yet, the largest it can be: a server that starts
    beside the trainer's residual measures less and sizes a smaller KV cache."""
    o = lay.overheads
    return lay.gpu.memory_bytes - o.cuda_context - o.sglang_nccl


@dataclass(frozen=True)
class SGLangMemory:
    weights: int
    kv_cache: int
    kv_tokens: int  # tokens the KV cache holds at once on this engine
    reserve: int  # CUDA graphs and activations


def sglang_memory(lay: Layout) -> SGLangMemory:
    """SGLang 0.5.23 (mem_cache/kv_cache_configurator.py, _profile_available_bytes): the KV cache
    gets what is free after the weights load minus (1 - fraction) of the pre-load free memory, i.e.
    fraction x pre-load - weights. Post-capture KV sizing is off with --enable-memory-saver."""
    sg = lay.sglang
    assert sg is not None
    weights = sglang_weight_bytes(lay.arch, sg.tp, sg.weight_bytes)
    kv = max(0, int(sg.mem_fraction_static * sglang_pre_load_bytes(lay)) - weights)
    return SGLangMemory(weights, kv, kv // sglang_kv_bytes_per_token(lay.arch, sg.tp, sg.kv_bytes),
                        sglang_reserve_bytes(lay.gpu, sg))


# ---- phases ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    name: str
    bytes: int


@dataclass(frozen=True)
class Phase:
    name: str
    terms: tuple[Term, ...]
    capacity: int

    @property
    def used(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def headroom(self) -> float:
        return 1 - self.used / self.capacity

    @property
    def largest(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)


@dataclass(frozen=True)
class Ledger:
    layout: Layout
    state: TrainerState
    acts: Activations
    sglang: Optional[SGLangMemory]
    phases: tuple[Phase, ...]
    host_bytes_per_node: int  # host copies of one node's offloaded trainer state

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    @property
    def serving_phase(self) -> Phase:
        """The phase that holds SGLang's KV cache: the rollout on the trainer's GPUs, or on SGLang's own."""
        return next(p for p in self.phases if any(t.name == "SGLang KV cache" for t in p.terms))

    @property
    def checkpoint_bytes_per_gpu(self) -> int:
        """What a checkpoint writes per trainer rank: its weights and optimizer shard."""
        return self.state.param_bytes_unpadded + self.state.optimizer

    def table(self) -> str:
        lay, lines = self.layout, []
        lines.append(f"memory ledger, computed (not measured): {lay.arch.model_type} {lay.gpu.name} "
                     f"{lay.gpu.memory_bytes / GiB:.2f} GiB per GPU; trainer TP={lay.tp} PP={lay.pp} CP={lay.cp} "
                     f"DP={lay.dp}{' SP' if lay.sequence_parallel else ''}, recompute {lay.recompute}, "
                     f"{lay.tokens_per_microbatch} tokens/micro-batch, offload {'on' if lay.offload else 'off'}")
        if self.sglang is not None:
            sg = lay.sglang
            where = "on the same GPU" if sg.colocated else "on GPUs of its own"
            lines.append(f"SGLang TP={sg.tp} rank {where}, mem_fraction_static {sg.mem_fraction_static}: "
                         f"KV cache {self.sglang.kv_tokens:,} tokens per engine "
                         f"({sglang_kv_bytes_per_token(lay.arch, sg.tp, sg.kv_bytes):,} B/token per rank); the largest "
                         f"fraction with {100 * MIN_HEADROOM:.0f}% headroom is {max_mem_fraction_static(lay):.2f}")
        for ph in self.phases:
            lines.append("")
            lines.append(f"{ph.name:<44}{'GiB':>10}")
            for t in ph.terms:
                lines.append(f"  {t.name:<42}{t.bytes / GiB:>10.2f}")
            lines.append(f"  {'total':<42}{ph.used / GiB:>10.2f}")
            lines.append(f"  {'headroom':<42}{(ph.capacity - ph.used) / GiB:>10.2f}  ({100 * ph.headroom:.1f}%)")
        lines.append("")
        lines.append(f"host RAM per node for offloaded trainer state: {self.host_bytes_per_node / GiB:.1f} GiB "
                     f"of {lay.gpu.host_memory_bytes_per_node / GiB:.0f} GiB")
        return "\n".join(lines)


def _trainer_terms(state: TrainerState, o: Overheads, resident: bool) -> list[Term]:
    base = [Term("trainer CUDA context", o.cuda_context), Term("trainer NCCL buffers", o.trainer_nccl)]
    if not resident:
        return base + [Term("trainer allocations kept while offloaded", o.trainer_kept_offloaded)]
    return base + [Term("trainer weights", state.weights), Term("trainer grads (fp32 buffer)", state.grads),
                   Term("optimizer fp32 main params (shard)", state.main_params),
                   Term("optimizer Adam m, v (shard)", state.moments)]


def _sglang_base(o: Overheads) -> list[Term]:
    return [Term("SGLang CUDA context", o.cuda_context), Term("SGLang NCCL buffers", o.sglang_nccl)]


def build_ledger(lay: Layout) -> Ledger:
    o, cap = lay.overheads, lay.gpu.memory_bytes
    state, acts = trainer_state(lay), activations(lay)
    sgm = sglang_memory(lay) if lay.sglang is not None else None
    colocated = sgm is not None and lay.sglang.colocated
    serving = _sglang_base(o) + [Term("SGLang weights", sgm.weights), Term("SGLang KV cache", sgm.kv_cache),
                                 Term("SGLang CUDA graphs + activations", sgm.reserve)] if sgm else []
    released = []  # SGLang's terms on a trainer GPU while the trainer computes
    if colocated:
        released = serving if not lay.sglang.release_memory else _sglang_base(o) + [
            Term("SGLang allocations kept while released", o.sglang_untagged)]
    phases = [Phase("rollout", tuple(_trainer_terms(state, o, resident=not lay.offload)
                                     + (serving if colocated else [])), cap)]
    if sgm and not colocated:
        phases.append(Phase("rollout on SGLang GPUs", tuple(serving), cap))
    resident = _trainer_terms(state, o, resident=True)
    phases.append(Phase("old-logprob", tuple(resident + [
        Term("forward workspace (one layer)", acts.workspace), Term("logits chunk", acts.logits_chunk)] + released), cap))
    phases.append(Phase("training", tuple(resident + [
        Term("stored activations", acts.stored), Term("backward workspace (one layer)", acts.workspace),
        Term("logits chunk", acts.logits_chunk)] + released), cap))
    if sgm:
        # The gathered HF bucket and the TP all-gather buffer it is built from; colocated, SGLang's
        # weights resumed beside them.
        buckets = [Term("HF buckets (2 x bridge_bucket_mb)", 2 * lay.bridge_bucket_bytes)]
        beside = _sglang_base(o) + [Term("SGLang weights", sgm.weights)] if colocated else []
        phases.append(Phase("weight-sync", tuple(resident + buckets + beside), cap))
    # actor/offload.py copies weights and optimizer state to (pinned) host buffers and frees the
    # grads without a copy: every step zeroes them before its first backward.
    host = lay.nproc_per_node * (state.weights + state.optimizer) if lay.offload else 0
    return Ledger(lay, state, acts, sgm, tuple(phases), host)


# ---- from a run's config ---------------------------------------------------------------------

def layout_from_config(cfg: RunConfig, arch: ModelArch, world_size: int, gpu: GPU | None = None,
                       spec: Literal["te", "local"] = "te") -> Layout:
    par, actor, sg = cfg.parallel, cfg.actor, cfg.rollout.sglang
    gpu = gpu or gpu_named(cfg.launch.gpu_type)
    sglang = None
    if cfg.rollout.engine == "sglang" and not sg.urls:  # servers this job starts, on GPUs of its own type
        chunked, max_bs = SGLangLayout.defaults_for(gpu, sg.tp_size)
        sglang = SGLangLayout(sg.tp_size, sg.mem_fraction_static, chunked, max_bs, sg.release_memory,
                              colocated=cfg.rollout.placement == "colocated")
    return Layout(
        arch=arch, gpu=gpu, tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size,
        cp=par.context_parallel_size, dp=world_size // par.model_parallel_size,
        sequence_parallel=par.sequence_parallel, distributed_optimizer=par.use_distributed_optimizer,
        params_bytes=2 if actor.precision == "bf16" else 4, spec=spec, recompute=actor.recompute,
        tokens_per_microbatch=actor.max_tokens_per_microbatch, logprob_chunk_size=actor.logprob_chunk_size,
        offload=actor.offload, nproc_per_node=cfg.launch.nproc_per_node,
        bridge_bucket_bytes=cfg.rollout.bridge_bucket_mb * MiB,
        longest_sequence=cfg.data.max_prompt_length + cfg.rollout.max_response_length, sglang=sglang)


# ---- fitting -----------------------------------------------------------------------------------

def max_mem_fraction_static(lay: Layout, headroom: float = MIN_HEADROOM) -> float:
    """The largest ``mem_fraction_static`` (to 0.01) whose serving phase leaves ``headroom`` of the
    GPU beside the trainer's residual (colocated) or alone: the phase is linear in the fraction (only
    the KV cache moves)."""
    assert lay.sglang is not None
    at_zero = replace(lay, sglang=replace(lay.sglang, mem_fraction_static=0.0))
    ledger = build_ledger(at_zero)
    # At fraction 0 the KV cache term is 0 and clamps; add back the weights it would have covered.
    fixed = ledger.serving_phase.used - ledger.sglang.weights
    budget = (1 - headroom) * lay.gpu.memory_bytes - fixed
    return math.floor(100 * budget / sglang_pre_load_bytes(lay)) / 100


def _fix(ledger: Ledger, phase: Phase) -> str:
    lay, name = ledger.layout, phase.largest.name
    colocated = lay.sglang is not None and lay.sglang.colocated
    if name == "SGLang KV cache" or (colocated and phase.name == "rollout" and name.startswith(("trainer", "optimizer"))):
        frac = max_mem_fraction_static(lay)
        if lay.offload or not colocated:
            return f"lower rollout.sglang.mem_fraction_static to {frac:.2f}"
        offloaded = max_mem_fraction_static(replace(lay, offload=True))
        fix = f"enable actor.offload and set rollout.sglang.mem_fraction_static to {offloaded:.2f}"
        return fix + (f", or keep offload off and lower it to {frac:.2f}" if frac > 0 else "")
    if name == "SGLang weights":
        return "raise rollout.sglang.tp_size"
    if name.startswith(("trainer", "optimizer")):
        return "raise parallel.tensor_model_parallel_size or parallel.pipeline_model_parallel_size (or DP, for the optimizer shard)"
    if name == "stored activations":
        return ("set actor.recompute=full" if lay.recompute != "full" else
                "lower actor.max_tokens_per_microbatch or raise parallel.context_parallel_size")
    if name == "logits chunk":
        return "lower actor.logprob_chunk_size"
    if "workspace" in name:
        return "lower actor.max_tokens_per_microbatch or raise parallel.tensor_model_parallel_size"
    if name.startswith("SGLang CUDA graphs"):
        return "lower SGLang's --chunked-prefill-size / --cuda-graph-max-bs (rollout.sglang.extra_args)"
    return "raise parallel sizes"


def check_fits(ledger: Ledger, headroom: float = MIN_HEADROOM) -> None:
    """Raise ConfigError naming the phase, its largest term and a fix, for the first phase that
    leaves less than ``headroom`` of the GPU; also when the KV cache cannot hold one longest request."""
    lay = ledger.layout
    for phase in ledger.phases:
        if phase.headroom < headroom:
            big = phase.largest
            raise ConfigError(
                f"memory: the {phase.name} phase needs {phase.used / GiB:.1f} GiB of the {lay.gpu.name}'s "
                f"{lay.gpu.memory_bytes / GiB:.1f} GiB per GPU ({100 * phase.headroom:.1f}% headroom, "
                f"{100 * headroom:.0f}% needed); largest term: {big.name} {big.bytes / GiB:.1f} GiB. "
                f"Fix: {_fix(ledger, phase)}. `megatron-fipo plan --memory CONFIG` prints every term")
    if ledger.sglang is not None and ledger.sglang.kv_tokens < lay.longest_sequence:
        raise ConfigError(
            f"memory: SGLang's KV cache holds {ledger.sglang.kv_tokens} tokens per engine, fewer than one "
            f"request of data.max_prompt_length + rollout.max_response_length = {lay.longest_sequence}; "
            f"raise rollout.sglang.mem_fraction_static (at most {max_mem_fraction_static(lay):.2f} fits) "
            "or rollout.sglang.tp_size")
    if ledger.host_bytes_per_node > lay.gpu.host_memory_bytes_per_node:
        raise ConfigError(
            f"memory: offloaded trainer state needs {ledger.host_bytes_per_node / GiB:.0f} GiB of host RAM per "
            f"node, more than a {lay.gpu.name} node's {lay.gpu.host_memory_bytes_per_node / GiB:.0f} GiB; "
            "raise the parallel sizes or turn actor.offload off")
