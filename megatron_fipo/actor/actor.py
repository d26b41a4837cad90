"""The Megatron-Core policy: logprobs of rollout tokens and PPO mini-batch updates with the FIPO loss."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from megatron_fipo.actor.batching import MicroBatch, build_microbatch, gather_response, partition
from megatron_fipo.actor.logprobs import LogprobContext, logprob_output_processor
from megatron_fipo.actor.offload import Offloader, OffloadStats
from megatron_fipo.actor.model import (
    build_model_chunks,
    build_optimizer,
    transformer_engine_available,
    wrap_ddp,
)
from megatron_fipo.actor.parallel import init_process_groups, world_from_env
from megatron_fipo.algo import dapo_policy_loss, fipo_policy_loss
from megatron_fipo.algo.future_kl_cp import ContextParallelShards
from megatron_fipo.algo.policy_loss import LOCAL_SHARDS, SequenceShards
from megatron_fipo.config import TrainerSections
from megatron_fipo.validation import validate_parallel
from megatron_fipo.metrics import merge_metrics
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.sequences import SequenceBatch
from megatron_fipo import timings


@dataclass
class StepResult:
    loss: float  # token-mean policy loss over the mini-batch (all DP x CP ranks)
    grad_norm: float
    updated: bool  # False when the update was skipped for a non-finite loss or gradient
    lr: float
    num_tokens: int
    entropy: float
    metrics: dict[str, float]  # loss diagnostics, token-weighted over micro-batches of this rank


class MegatronActor:
    """Owns the model chunks, optimizer and schedule of one rank; every rank calls every method."""

    def __init__(self, sections: TrainerSections, arch: ModelArch):
        self.sections, self.arch = sections, arch
        par, actor = sections.parallel, sections.actor
        world = dist.get_world_size() if dist.is_initialized() else world_from_env()[1]
        # Before any model is built (or Megatron imported): a bad layout fails in milliseconds.
        self.dp_size = validate_parallel(par, arch, world)

        from megatron.core import parallel_state
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func
        init_process_groups(par, actor.seed)
        self.ps = parallel_state
        self.chunks = build_model_chunks(arch, actor, par)
        self.model = wrap_ddp(self.chunks, par)
        bundle = build_optimizer(self.model, sections.optim, actor, par)
        self.optimizer, self.scheduler = bundle.optimizer, bundle.scheduler
        config = self.chunks[0].config
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        config.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
        self.forward_backward = get_forward_backward_func()
        self.use_te = transformer_engine_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.steps = 0  # optimizer steps taken
        self.skipped_updates = 0
        self.offloader = Offloader(self.chunks, self.optimizer, self.device)

    # ---- layout ---------------------------------------------------------------------------
    @property
    def is_last_stage(self) -> bool:
        return self.ps.is_pipeline_last_stage(ignore_virtual=True)

    def microbatches(self, batch: SequenceBatch) -> list[MicroBatch]:
        actor, par = self.sections.actor, self.sections.parallel
        pad = par.tensor_model_parallel_size if par.sequence_parallel else 1
        cp = par.context_parallel_size
        # Context parallelism splits packed sequences (validation refuses packing=off with it).
        pack = cp > 1 or actor.packing == "on" or (actor.packing == "auto" and self.use_te)
        cp_rank = self.ps.get_context_parallel_rank()
        return [
            build_microbatch(batch, idx, pack, pad_multiple=pad, dense_mask=not self.use_te, cp_size=cp, cp_rank=cp_rank)
            for idx in partition(batch, actor.max_tokens_per_microbatch, pack)
        ]

    def _context(self, temperature: float) -> LogprobContext:
        par = self.sections.parallel
        return LogprobContext(
            temperature=temperature,
            chunk_size=self.sections.actor.logprob_chunk_size,
            tp_group=self.ps.get_tensor_model_parallel_group(),
            tp_rank=self.ps.get_tensor_model_parallel_rank(),
            tp_size=par.tensor_model_parallel_size,
            sequence_parallel=par.sequence_parallel,
            vocab_size=self.arch.vocab_size,
        )

    def _forward(self, mb: MicroBatch, model, ctx: LogprobContext):
        from megatron.core.packed_seq_params import PackedSeqParams

        packed = None
        cp = self.sections.parallel.context_parallel_size
        if mb.cu_seqlens is not None and (self.use_te or cp > 1):
            cu = mb.cu_seqlens.to(self.device)
            longest = int((mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]).max())
            # Under CP the offsets are the padded slots that TE's CP attention, Megatron's THD RoPE
            # and the CPU CP attention read the zig-zag chunks from.
            padded = cu if cp > 1 else None
            packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                     cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
                                     max_seqlen_q=longest, max_seqlen_kv=longest)
        mask = mb.attention_mask.to(self.device) if mb.attention_mask is not None else None
        tokens = mb.tokens.to(self.device)
        position_ids = mb.position_ids.to(self.device)
        return model(tokens, position_ids, mask, labels=mb.labels.to(self.device), packed_seq_params=packed,
                     output_processor=logprob_output_processor, output_processor_context=ctx)

    def _run(self, microbatches: list[MicroBatch], loss_fn, forward_only: bool, temperature: float):
        if self.offloader.offloaded:  # its tensors have no memory: a segfault on CPU, garbage on GPU
            raise RuntimeError("MegatronActor: weights are offloaded (rollout phase); call onload() first")
        starts: list[float] = []  # when each micro-batch's forward step began (timings.py)

        def forward_step(data_iterator, model):
            starts.append(time.perf_counter())
            mb = next(data_iterator)
            ctx = self._context(temperature)
            return self._forward(mb, model, ctx), partial(loss_fn, mb, ctx)

        n_chunks = len(self.model)
        iterators = [iter(microbatches) for _ in range(n_chunks)] if n_chunks > 1 else iter(microbatches)
        longest = max(mb.tokens.shape[1] for mb in microbatches)
        out = self.forward_backward(
            forward_step_func=forward_step,
            data_iterator=iterators,
            model=self.model if n_chunks > 1 else self.model[0],
            num_microbatches=len(microbatches),
            seq_length=longest,
            micro_batch_size=max(mb.tokens.shape[0] for mb in microbatches),
            forward_only=forward_only,
        )
        if self.ps.get_pipeline_model_parallel_world_size() == 1:
            # Without a pipeline, micro-batch i runs (forward, loss, backward) from its forward step
            # to the next one's; the last until the schedule returns.
            ends = starts[1:] + [time.perf_counter()]
            for mb, start, end in zip(microbatches, starts, ends):
                timings.record("forward" if forward_only else "train", *_attention_size(mb), end - start)
        return out

    def _broadcast_from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(tensor, src=self.ps.get_pipeline_model_parallel_last_rank(),
                           group=self.ps.get_pipeline_model_parallel_group())
        return tensor

    # ---- public API -------------------------------------------------------------------------
    @torch.no_grad()
    def compute_logprobs(
        self, batch: SequenceBatch, temperature: float = 1.0, minibatches: Optional[list[list[int]]] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp, entropy), each [B, max_response_len] fp32 on CPU, 0 on padding, on every rank.

        ``minibatches``: the row groups that ``train_step`` will take as PPO mini-batches. Each is
        split into micro-batches exactly as the update splits it, so the first update's forward runs
        the same GEMM shapes and its Delta logp is exactly 0 in any precision.
        """
        for m in self.model:
            m.eval()
        logp = torch.zeros(len(batch), batch.max_response_length)
        entropy = torch.zeros_like(logp)

        def collect(mb, ctx, output_tensor):
            rows = mb.sample_index
            width = mb.response_mask.shape[1]
            logp[rows, :width] = gather_response(output_tensor, mb).float().cpu()
            entropy[rows, :width] = gather_response(ctx.entropy, mb).float().cpu()
            zero = torch.zeros((), device=output_tensor.device)
            return zero, torch.tensor(1, dtype=torch.int), {}

        mbs = []
        for rows in minibatches or [list(range(len(batch)))]:
            for mb in self.microbatches(batch.select(rows)):
                mb.sample_index = torch.tensor(rows, dtype=torch.long)[mb.sample_index]
                mbs.append(mb)
        if mbs:
            self._run(mbs, collect, forward_only=True, temperature=temperature)
        stacked = torch.stack([logp, entropy]).to(self.device)
        if self.sections.parallel.context_parallel_size > 1:
            # Each response token is scored on one CP rank, zero on the others.
            dist.all_reduce(stacked, group=self.ps.get_context_parallel_group())
        stacked = self._broadcast_from_last_stage(stacked).cpu()
        return stacked[0], stacked[1]

    def train_step(
        self,
        batch: SequenceBatch,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        temperature: float = 1.0,
        rollout_logp: Optional[torch.Tensor] = None,
    ) -> StepResult:
        """One optimizer step on this rank's share of a PPO mini-batch.

        old_logp [B, Lr]; advantages [B] or [B, Lr]; rollout_logp [B, Lr], the engine's logprobs,
        needed with ``algo.tis_cap`` > 0. The loss is a token-level mean over the whole
        mini-batch: each micro-batch returns its token sum and count, Megatron all-reduces the
        count over DP x CP and divides the gradient by it.
        """
        loss, tokens, entropy, metrics = self.compute_gradients(batch, old_logp, advantages, temperature, rollout_logp)
        updated, grad_norm = self._optimizer_step(finite_loss=math.isfinite(loss))
        return StepResult(
            loss=loss,
            grad_norm=grad_norm,
            updated=updated,
            lr=self.optimizer.param_groups[0]["lr"],
            num_tokens=tokens,
            entropy=entropy,
            metrics=metrics,
        )

    def compute_gradients(
        self, batch: SequenceBatch, old_logp: torch.Tensor, advantages: torch.Tensor, temperature: float = 1.0,
        rollout_logp: Optional[torch.Tensor] = None,
    ) -> tuple[float, int, float, dict[str, float]]:
        """Policy-loss forward/backward over all micro-batches into the DDP grad buffers (main_grad).

        Returns (token-mean loss, tokens, mean entropy, loss metrics) over all DP x CP ranks.
        """
        cfg = self.sections.algo
        loss_impl = fipo_policy_loss if self.sections.actor.loss == "fipo" else dapo_policy_loss

        def policy_loss(mb, logp, mask):
            rows, width = mb.sample_index, mask.shape[1]
            adv = advantages[rows].to(logp.device)
            adv = adv[:, :width] if adv.dim() == 2 else adv
            rollout = rollout_logp[rows, :width].to(logp.device) if rollout_logp is not None else None
            loss_sum, metrics = loss_impl(logp, old_logp[rows, :width].to(logp.device), adv, mask, cfg, num_tokens=1.0,
                                          shards=self._sequence_shards(mb), rollout_logp=rollout)
            return loss_sum, int(metrics["num_tokens_kept"]), metrics

        return self._accumulate_gradients(batch, policy_loss, temperature)

    def _sequence_shards(self, mb: MicroBatch) -> SequenceShards:
        """Whole sequences on this rank, or under CP its chunks of them (Future-KL swaps carries)."""
        cp = self.sections.parallel.context_parallel_size
        if cp == 1:
            return LOCAL_SHARDS
        return ContextParallelShards(mb.chunk_bounds, cp, self.ps.get_context_parallel_rank(),
                                     self.ps.get_context_parallel_group())

    def sft_step(self, batch: SequenceBatch, advance_schedule: bool = True) -> StepResult:
        """Supervised step: token-mean negative log-likelihood of the responses (warm start).

        With advance_schedule=False the LR scheduler does not count the step, so a warm start at
        its own learning rate leaves the RL schedule where it was.
        """
        loss, tokens, entropy, _ = self._accumulate_gradients(
            batch, lambda mb, logp, mask: (-(logp * mask).sum(), int(mask.sum().item()), {}), temperature=1.0
        )
        updated, grad_norm = self._optimizer_step(finite_loss=math.isfinite(loss), advance_schedule=advance_schedule)
        return StepResult(loss, grad_norm, updated, self.optimizer.param_groups[0]["lr"], tokens, entropy, {})

    def _accumulate_gradients(self, batch: SequenceBatch, per_microbatch_loss, temperature: float):
        """Run forward/backward; ``per_microbatch_loss(mb, logp, mask)`` -> (loss sum, tokens it
        averages over, metrics). Megatron divides the gradients by those tokens summed over all
        micro-batches and DP x CP ranks (finalize_model_grads): one exact token mean over the mini-batch.

        Returns (token-mean loss, response tokens, mean entropy, metrics) over all DP x CP ranks.
        """
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        records: list[tuple[float, dict[str, float]]] = []
        sums = torch.zeros(4, dtype=torch.float64)  # loss sum, tokens averaged over, response tokens, entropy sum

        def loss_fn(mb, ctx, output_tensor):
            mask = mb.response_mask.to(output_tensor.device)
            loss_sum, n_mean, metrics = per_microbatch_loss(mb, gather_response(output_tensor, mb), mask)
            n_tok = int(mask.sum().item())
            ent = (gather_response(ctx.entropy, mb) * mask).sum()
            sums.add_(torch.tensor([loss_sum.item(), n_mean, n_tok, ent.item()], dtype=torch.float64))
            records.append((float(n_tok), metrics))
            return loss_sum, torch.tensor(n_mean, dtype=torch.int, device=output_tensor.device), {}

        self._run(self.microbatches(batch), loss_fn, forward_only=False, temperature=temperature)

        # Loss totals live on the last stage; share them across the pipeline and DP x CP.
        totals = self._broadcast_from_last_stage(sums.to(self.device))
        if self.dp_size * self.sections.parallel.context_parallel_size > 1:
            dist.all_reduce(totals, group=self.ps.get_data_parallel_group(with_context_parallel=True))
        loss_total, n_mean, tokens, ent_total = totals.tolist()
        return loss_total / max(n_mean, 1), int(tokens), ent_total / max(tokens, 1), merge_metrics(records)

    def _optimizer_step(self, finite_loss: bool, advance_schedule: bool = True) -> tuple[bool, float]:
        """Clip and step, or skip the update when the loss or gradient norm is not finite."""
        self.optimizer.prepare_grads()
        clip = self.sections.optim.clip_grad
        grad_norm = self.optimizer.clip_grad_norm(clip) if clip > 0 else self.optimizer.get_grad_norm()
        grad_norm = float(grad_norm)
        if not (finite_loss and math.isfinite(grad_norm)):
            self.optimizer.zero_grad()
            self.skipped_updates += 1
            return False, grad_norm
        self.optimizer.step_with_ready_grads()
        if advance_schedule:
            self.scheduler.step(increment=1)
            self.steps += 1
        return True, grad_norm

    def offload(self) -> OffloadStats:
        """Free this rank's weights, grads and optimizer state on the device (colocated rollout phase)."""
        return self.offloader.offload()

    def onload(self) -> OffloadStats:
        """Bring them back, bit for bit (grads as zeros), into the same tensors."""
        return self.offloader.onload()

    def named_parameters_local(self):
        """(name, param) of this rank's model chunks, names as in Megatron's GPTModel."""
        for vp, chunk in enumerate(self.chunks):
            for name, param in chunk.named_parameters():
                yield vp, name, param


def _attention_size(mb: MicroBatch) -> tuple[int, int]:
    """(tokens computed, sum of squared sequence lengths) of a micro-batch, as the planner counts them:
    packed, each sequence attends within itself; padded, every row over the whole width."""
    rows, width = mb.tokens.shape
    if mb.cu_seqlens is not None:
        lengths = (mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]).long()
        return mb.tokens.numel(), int((lengths * lengths).sum())
    return mb.tokens.numel(), rows * width * width


def build_actor(sections: TrainerSections, arch: Optional[ModelArch] = None) -> MegatronActor:
    arch = arch or ModelArch.from_hf_config(sections.actor.model_config)
    return MegatronActor(sections, arch)
