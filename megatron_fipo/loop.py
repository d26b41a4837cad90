"""One FIPO run: prompts -> rollouts -> rewards -> dynamic sampling -> advantages -> actor -> bridge.

Every rank runs this loop (SPMD). Rollout generation, reward scoring and evaluation happen on
global rank 0, which holds the rollout engine (or talks to the SGLang servers) and streams prompt
groups through it (rollout/collect.py); it then sends each data-parallel rank only its token-balanced
share of every mini-batch, as tensors over gloo (rollout/shares.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_fipo.actor.actor import MegatronActor, build_actor
from megatron_fipo.actor.checkpoint import (latest_step, load_checkpoint, load_megatron_weights, model_checkpoint_dir,
                                           save_checkpoint)
from megatron_fipo.algo import group_advantages
from megatron_fipo.bridge.hf_io import HFCheckpointReader
from megatron_fipo.bridge.weights import iter_hf_buckets, load_hf_weights
from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import save_config
from megatron_fipo.data.setup import DataBundle
from megatron_fipo.metrics import MetricsLogger, merge_metrics
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.plan.hardware import gpu
from megatron_fipo.plan.step_time import ModelShape, train_flops
from megatron_fipo.plotting import plot_run
from megatron_fipo.progress import progress_bar
from megatron_fipo.reward.scoring import Scorer
from megatron_fipo.rollout.async_rollout import AsyncRollout, buffer_from_state, buffer_state
from megatron_fipo.rollout.base import GenerationAborted, SamplingParams
from megatron_fipo.rollout.collect import Collector, StepBatch
from megatron_fipo.rollout.factory import build_engine, build_handoff
from megatron_fipo.rollout.shares import Share, ShareChannel, pack_shares
from megatron_fipo.sequences import SequenceBatch
from megatron_fipo.stop import StopFlag
from megatron_fipo import timings

log = logging.getLogger("megatron_fipo")


@dataclass
class RunState:
    """Everything besides the actor checkpoint that a resumed run needs (saved with it)."""

    step: int = 0  # RL steps completed
    data_position: int = 0
    sft_done: bool = False
    consecutive_bad_steps: int = 0
    wall_seconds: float = 0.0
    start: dict = field(default_factory=dict)  # eval accuracy / response length before RL
    last: dict = field(default_factory=dict)
    # A stop between PPO mini-batches: step `step` is trained; its eval, log and save wait for the resume.
    pending_metrics: dict = field(default_factory=dict)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _broadcast(obj, group):
    """Rank 0's object on every rank, over ``group``: the CPU (gloo) one, as SGLang may hold the GPUs."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class Trainer:
    def __init__(self, cfg: RunConfig, data: DataBundle):
        self.cfg = cfg
        self.data = data  # built and checked by the CLI before torch loaded: bad data never gets this far
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.stop = StopFlag()
        self.stopped_at = ""  # where in the loop an agreed stop took effect, for its message
        self.saved_step: Optional[int] = None  # the step of the newest checkpoint, written or resumed from
        self.offload_times: dict[str, float] = {}  # the last generation phase's offload / onload seconds
        arch = ModelArch.from_hf_config(cfg.actor.model_config)
        self.actor: MegatronActor = build_actor(cfg, arch)
        self.stop.connect(cfg.parallel.distributed_timeout_minutes)
        self.shares = ShareChannel(self.stop.group, self.actor.ps.get_data_parallel_rank(),
                                   timedelta(minutes=cfg.parallel.distributed_timeout_minutes))
        self.is_rank0 = _rank() == 0
        if self.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            data.save(self.run_dir)
        if cfg.actor.load_hf:
            load_hf_weights(self.actor, HFCheckpointReader(cfg.actor.load_hf))
        elif cfg.actor.load_megatron:
            load_megatron_weights(self.actor, cfg.actor.load_megatron)
        self.flops_shape = ModelShape.from_arch(arch)  # model FLOPs of an update, for perf/mfu
        self.engine = build_engine(cfg, arch) if self.is_rank0 else None
        self.handoff = build_handoff(cfg, self.engine)  # each node loads its own servers, or None
        # Rank 0 scores (rollouts and eval), in reward.num_workers processes when set.
        self.scorer = Scorer(cfg.reward, self.data.tokenizer, cfg.rollout.max_response_length) if self.is_rank0 else None
        self.collector = Collector(cfg, self.engine, self.scorer, data) if self.is_rank0 else None
        # trainer.max_staleness > 0: rank 0's producer thread collects the next steps' batches
        # (rollout/async_rollout.py); 0: the synchronous loop, no thread.
        self.producer: Optional[AsyncRollout] = None
        if self.is_rank0 and cfg.trainer.max_staleness:
            self.producer = AsyncRollout(lambda step: self.collector.collect(step, self._sampling(eval_mode=False)),
                                         data.train_stream, cfg.trainer.max_staleness,
                                         getattr(self.engine, "abort", None), cfg.trainer.total_steps)
        self.metrics = MetricsLogger(self.run_dir, cfg.trainer.tensorboard, cfg.trainer.wandb_project,
                                     asdict(cfg)) if self.is_rank0 else None
        self.state = RunState()

    # ---- lifecycle ---------------------------------------------------------------------------
    def run(self) -> dict:
        tr = self.cfg.trainer
        self.stop.install()  # SIGTERM and SIGINT: an agreed stop, a checkpoint, exit 0
        started = time.time()
        resumed = self._resume()
        if self.producer is not None and not resumed:
            self.producer.start(0)  # held until the first step allows it
        if not self.state.sft_done and tr.warmup_sft_steps > 0:
            self._warm_start()
        self.state.sft_done = True
        self._sync_weights(version=self.state.step)
        if not resumed and tr.eval_before_train:
            self.state.start = self._evaluate()
            self._log(self.state.step, {f"eval/{k}": v for k, v in self.state.start.items()})
            self._checkpoint(started)
        if self.state.pending_metrics:  # stopped between mini-batches: that step's eval, log and save are left
            self._end_step(self.state.pending_metrics, started)
        bar = progress_bar(self.is_rank0)
        with bar:
            task = bar.add_task("FIPO", total=tr.total_steps, completed=self.state.step)
            while self.state.step < tr.total_steps:
                if self.stop.agree()[0]:
                    self.stopped_at = f"before step {self.state.step + 1}"
                    break
                metrics = self._rl_step()
                if metrics is None:
                    self.stopped_at = f"in step {self.state.step + 1}'s rollout, which a resume redoes"
                    break
                self.state.step += 1
                bar.update(task, advance=1, description=f"FIPO reward {metrics['reward/mean']:+.2f} "
                           f"acc {metrics['rollout/accuracy']:.2f}")
                if self.stop.agreed:
                    self.state.pending_metrics = metrics
                    self.stopped_at = f"after step {self.state.step}'s updates; its eval and log come with the resume"
                    break
                self._end_step(metrics, started)
        if self.stop.agreed:
            return self._stopped(started)
        return self._finish(started)

    def _end_step(self, metrics: dict, started: float) -> None:
        """After a step's updates and weight sync: eval when due, log, checkpoint when due."""
        tr = self.cfg.trainer
        self.state.pending_metrics = {}
        last_step = self.state.step == tr.total_steps
        if self.state.step % tr.eval_every == 0 or last_step:
            self.state.last = self._evaluate()
            metrics.update({f"eval/{k}": v for k, v in self.state.last.items()})
        self._log(self.state.step, metrics)
        if self.state.step % tr.save_every == 0 or last_step:
            self._checkpoint(started)

    def _stopped(self, started: float) -> dict:
        """An agreed stop: a checkpoint of the last whole step (unless it exists), one line, exit 0."""
        if self.saved_step != self.state.step:
            self._checkpoint(started)
        if self.is_rank0:
            log.warning("%s: checkpoint written at step %d; exiting (stopped %s; run the same command to resume)",
                        self.stop.name, self.state.step, self.stopped_at)
        return {}

    def _resume(self) -> bool:
        if latest_step(self.ckpt_dir) is None:
            if self.is_rank0 and self.metrics is not None:
                self.metrics.truncate_after(-1)
            return False
        common = load_checkpoint(self.actor, self.ckpt_dir)
        self.state = RunState(**common["extra"]["run_state"])
        self.saved_step = self.state.step
        self.data.train_stream.position = self.state.data_position
        buffered = buffer_from_state(common["extra"].get("async_buffer", []))
        if self.producer is not None:  # the batches collected for the next steps; the stream stands after them
            self.producer.start(self.state.step, buffered)
        elif buffered and self.is_rank0:
            log.warning("the checkpoint holds %d asynchronous batches, and trainer.max_staleness is 0: they are "
                        "not trained on (their prompts are skipped)", len(buffered))
        if self.metrics is not None:
            self.metrics.truncate_after(self.state.step)
        log.info("resumed from %s at step %d", self.ckpt_dir, self.state.step)
        return True

    def _checkpoint(self, started: float) -> None:
        self.state.data_position = self.data.train_stream.position
        state = asdict(self.state)
        state["wall_seconds"] = self.state.wall_seconds + time.time() - started
        extra = {"run_state": state}
        if self.producer is not None:  # held: whole batches only, and the stream stands after the last
            extra["async_buffer"] = buffer_state(self.producer.buffered())
        save_checkpoint(self.actor, self.ckpt_dir, self.state.step, extra, keep_last=self.cfg.trainer.keep_last_checkpoints)
        self.saved_step = self.state.step

    def _finish(self, started: float) -> dict:
        summary = {
            "steps": self.state.step,
            "wall_seconds": round(self.state.wall_seconds + time.time() - started, 2),
            "eval_accuracy_start": self.state.start.get("accuracy", float("nan")),
            "eval_accuracy_end": self.state.last.get("accuracy", float("nan")),
            "mean_response_length_start": self.state.start.get("response_length", float("nan")),
            "mean_response_length_end": self.state.last.get("response_length", float("nan")),
            "optimizer_steps": self.actor.steps,
            "skipped_updates": self.actor.skipped_updates,
        }
        if self.is_rank0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            summary["plot"] = str(plot_run(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png"))
            self.metrics.close()
            return summary
        return {}  # one summary per run: rank 0 prints it

    def _log(self, step: int, metrics: dict) -> None:
        records = timings.drain()  # every rank drains its own; rank 0's are written, for `plan --calibrate`
        if self.metrics is not None:
            self.metrics.log(step, metrics)
            timings.append(self.run_dir, step, records)

    # ---- phases ------------------------------------------------------------------------------
    def _sync_weights(self, version: int) -> float:
        """Bridge: Megatron shards -> HF-named buckets -> rollout engine."""
        start = time.time()
        sinks = self.handoff.sink_ranks if self.handoff is not None else frozenset({0})
        buckets = iter_hf_buckets(self.actor, self.cfg.rollout.bridge_bucket_mb * 2**20, sinks)
        if self.handoff is not None:
            self.handoff.sync(buckets, version)
        elif self.engine is not None:
            self.engine.update_weights(buckets, version)
        else:
            for _ in buckets:  # non-sink ranks still run the gathers
                pass
        return time.time() - start

    def _warm_start(self) -> None:
        tr = self.cfg.trainer
        problems = self.data.train_problems
        g = torch.Generator().manual_seed(tr.seed)
        for param_group in self.actor.optimizer.param_groups:
            param_group["lr"] = tr.warmup_sft_lr
        bar = progress_bar(self.is_rank0)
        with bar:
            task = bar.add_task("warm start (SFT)", total=tr.warmup_sft_steps)
            for _ in range(tr.warmup_sft_steps):
                idx = torch.randint(len(problems), (tr.warmup_sft_batch,), generator=g).tolist()
                prompts = [self.data.prompt_ids(problems[i]) for i in idx]
                answers = [self.data.answer_ids(problems[i]) for i in idx]
                res = self.actor.sft_step(self._dp_share(SequenceBatch(prompts, answers)), advance_schedule=False)
                bar.update(task, advance=1, description=f"warm start (SFT) nll {res.loss:.3f}")
        self.actor.scheduler.step(increment=0)  # back to the RL schedule's learning rate

    def _dp_share(self, batch: SequenceBatch) -> SequenceBatch:
        idx = list(range(self.actor.ps.get_data_parallel_rank(), len(batch), self.actor.dp_size))
        return batch.select(idx)

    def _sampling(self, eval_mode: bool) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(
            temperature=r.eval_temperature if eval_mode else r.temperature,
            top_p=r.eval_top_p if eval_mode else r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_response_length,
            stop_token_ids=(self.data.tokenizer.eos_id,),
        )

    @contextmanager
    def _generation_phase(self):
        """The engines hold the accelerator: the trainer gives it up first and takes it back last.

        Colocated with ``actor.offload``: every rank offloads, and only once all have (barrier: rank 0
        drives every node's engines) may the engines resume; they release before any rank onloads.
        Weight updates happen outside this phase, with the trainer resident.
        """
        offload = self.cfg.actor.offload
        if offload:
            self.offload_times["time/offload_s"] = self.actor.offload().seconds
            dist.barrier()
        if self.engine is not None:
            self.engine.resume()
        yield  # no try/finally: after a failure, a barrier here would hang the ranks still in a broadcast
        if self.engine is not None:
            self.engine.pause()
        if offload:
            dist.barrier()
            self.offload_times["time/onload_s"] = self.actor.onload().seconds

    def _evaluate(self) -> dict:
        with self._generation_phase():
            return self._score_eval_set()

    def _score_eval_set(self) -> dict:
        """avg@k accuracy and mean response length on the eval set (rank 0, broadcast)."""
        result = None
        if self.is_rank0:
            problems = self.data.eval_problems
            groups = self.engine.generate([self.data.prompt_ids(p) for p in problems], self.cfg.rollout.eval_n_samples,
                                          self._sampling(eval_mode=True), seed=self.cfg.trainer.seed + 7919 * self.state.step)
            scores = self.scorer.score(groups, problems)
            lengths = [len(s.response_ids) for g in groups for s in g]
            result = {"accuracy": scores.correct.float().mean().item(), "response_length": sum(lengths) / len(lengths)}
        return _broadcast(result, self.stop.group)

    def _collect(self) -> Optional[StepBatch]:
        """The step's rollout on rank 0 (streaming dynamic sampling, rollout/collect.py), then a stop agreement.

        On a stop the step is given up: the data stream goes back to where the step began (the
        sampling seeds are a function of the step), so a resumed run generates this step again, the
        same. Returns the batch on rank 0 (None on the others: ``_hand_out`` gives each rank its
        share), or None when stopped.
        """
        position = self.data.train_stream.position
        batch = None
        if self.is_rank0:
            self.stop.on_signal = getattr(self.engine, "abort", None)  # a signal on rank 0 cuts the rollout short
            try:
                batch = self.collector.collect(self.state.step, self._sampling(eval_mode=False))
            except GenerationAborted:
                pass  # this rank's stop flag is set: the agreement below stops the step
            finally:
                self.stop.on_signal = None
        if self.stop.agree()[0]:
            self.data.train_stream.position = position
            return None
        return batch

    def _take(self) -> Optional[StepBatch]:
        """Asynchronous rollouts: the step's batch from rank 0's producer, then the stop agreement
        ``_collect`` makes. The engines hold weights version ``step``: the producer may collect up to
        step + max_staleness meanwhile. Returns the batch on rank 0 (None on the others), or None
        when stopped (a batch taken stays buffered for the resumed run)."""
        batch = None
        if self.is_rank0:
            self.producer.allow(self.state.step)
            self.stop.on_signal = getattr(self.engine, "abort", None)  # a signal on rank 0 cuts the batch short
            try:
                batch, stats = self.producer.take(self.state.step)
                if batch is not None:
                    batch = StepBatch(batch.groups, batch.rewards, {**batch.stats, **stats})
            except GenerationAborted:
                pass  # this rank's stop flag is set: the agreement below stops the step
            finally:
                self.stop.on_signal = None
        if self.stop.agree()[0]:
            return None
        return batch

    def _hand_out(self, batch: Optional[StepBatch]) -> Share:
        """Each rank's share of the step's samples, from rank 0 over gloo (``rollout/shares.py``).

        Rank 0 first computes what needs every sample: advantages per prompt group, and the step's
        figures. Each PPO mini-batch (``minibatch_prompts`` whole groups) is split over the DP ranks
        by tokens.
        """
        messages = None
        if batch is not None:
            tr = self.cfg.trainer
            samples = [s for g in batch.groups for s in g]
            lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
            # How many weight updates behind the policy being trained each sample was drawn.
            staleness = torch.tensor([self.state.step - s.weight_version for s in samples], dtype=torch.float32)
            stats = {**batch.stats, "train/samples": len(samples), "train/tokens": sum(lengths),
                     "train/model_flops": tr.ppo_epochs * train_flops(self.flops_shape, lengths),
                     "rollout/staleness_mean": staleness.mean().item(), "rollout/staleness_max": staleness.max().item()}
            advantages = group_advantages(batch.rewards, norm_by_std=tr.norm_adv_by_std).flatten()
            messages = pack_shares(batch.groups, advantages, stats, tr.minibatch_prompts * len(batch.groups[0]),
                                   self.actor.dp_size)
        share = self.shares.hand_out(messages)
        if share is None:
            raise RuntimeError("no prompt group had differing rewards in trainer.max_gen_batches generation batches")
        return share

    def _rl_step(self) -> Optional[dict]:
        """One RL step's rollout, updates and weight sync; None when a stop was agreed during the rollout."""
        tr = self.cfg.trainer
        t0 = time.time()
        if self.cfg.trainer.max_staleness:
            batch = self._take()
        else:
            with self._generation_phase():
                batch = self._collect()
        t_rollout = time.time() - t0
        if self.stop.agreed:
            return None
        share = self._hand_out(batch)
        if self.producer is not None:
            self.producer.done(self.state.step)  # handed out: trained whatever comes next
        # Asynchronous: the producer's time on the batch, as the planner's rollout phase (the trainer waited less).
        t_rollout = share.stats.get("time/rollout_collect_s", t_rollout)
        seqs, rows_of, rollout_logp, dp = share.seqs, share.minibatches, share.rollout_logp, self.actor.dp_size

        t1 = time.time()
        old_logp, entropy = self.actor.compute_logprobs(seqs, self.cfg.rollout.temperature, minibatches=rows_of)
        t_old_logprob = time.time() - t1
        mask = seqs.response_mask()
        gap = ((old_logp - rollout_logp).abs() * mask).sum()
        kl = ((rollout_logp - old_logp) * mask).sum()
        step_metrics, results = {}, []
        for _ in range(tr.ppo_epochs):
            for rows in rows_of:
                res = self.actor.train_step(seqs.select(rows), old_logp[rows], share.advantages[rows],
                                            self.cfg.rollout.temperature, rollout_logp=rollout_logp[rows])
                results.append(res)
                # Once a stop is agreed the remaining mini-batches still run: a checkpoint holds whole
                # steps (stopping here would need the rollout and old logprobs saved with it).
                if not self.stop.agreed:
                    self.stop.agree()
        t_train = time.time() - t1

        bad = sum(not r.updated for r in results)
        self.state.consecutive_bad_steps = self.state.consecutive_bad_steps + 1 if bad else 0
        if bad:
            log.warning("step %d: %d of %d updates skipped (non-finite loss or gradient)", self.state.step, bad, len(results))
        if self.state.consecutive_bad_steps >= tr.max_consecutive_bad_steps:
            raise RuntimeError(f"{self.state.consecutive_bad_steps} steps in a row with non-finite loss or gradient: "
                               "stopping (lower optim.lr or check the data)")

        if self.producer is not None:  # no update inside a batch: held once it has what these weights allow
            step_metrics["time/rollout_hold_s"] = self.producer.hold(abort=self.stop.agreed)
        # Stopping: the resumed run syncs its engines at start, so the sync is skipped.
        t_sync = 0.0 if self.stop.agreed else self._sync_weights(version=self.state.step + 1)
        tokens = torch.tensor([mask.sum().item(), gap.item(), kl.item(), (entropy * mask).sum().item()], dtype=torch.float64)
        if dp > 1:
            dist.all_reduce(tokens, group=self.actor.ps.get_data_parallel_group())
        n_tok = max(tokens[0].item(), 1.0)
        world = dist.get_world_size() if dist.is_initialized() else 1
        step_metrics.update(share.stats)
        step_metrics.update(self.offload_times)
        step_metrics.update({
            "actor/loss": sum(r.loss for r in results) / len(results),
            "actor/grad_norm": sum(r.grad_norm for r in results if math.isfinite(r.grad_norm)) / max(len(results) - bad, 1),
            "actor/lr": results[-1].lr,
            "actor/entropy": tokens[3].item() / n_tok,
            "actor/skipped_updates": bad,
            "mismatch/train_rollout_logp_abs": tokens[1].item() / n_tok,
            "mismatch/kl_rollout_train": tokens[2].item() / n_tok,
            "time/rollout_s": t_rollout,
            "time/train_s": t_train,
            "time/sync_s": t_sync,
            # What `megatron-fipo plan --calibrate` fits to (train_s includes the old-logprob pass).
            "time/old_logprob_s": t_old_logprob,
            "train/world_size": world,
            "perf/model_tflops_per_rank": share.stats["train/model_flops"] / max(t_train - t_old_logprob, 1e-9) / world / 1e12,
            "throughput/train_tokens_per_s": n_tok / max(t_train, 1e-9),
            "throughput/rollout_tokens_per_s": share.stats["response_length/mean"] * share.stats["train/samples"]
            / max(t_rollout, 1e-9),
        })
        if torch.cuda.is_available():  # MFU against the data sheet's dense peak of launch.gpu_type
            peak = gpu(self.cfg.launch.gpu_type).fp8_dense_flops if self.cfg.actor.fp8 else gpu(self.cfg.launch.gpu_type).bf16_dense_flops
            step_metrics["perf/mfu"] = step_metrics["perf/model_tflops_per_rank"] * 1e12 / peak
        merged = merge_metrics([(r.num_tokens, r.metrics) for r in results if r.metrics])
        step_metrics.update({f"actor/{key}": value for key, value in merged.items()})
        return step_metrics


@contextmanager
def _trainer(cfg: RunConfig, data: DataBundle):
    trainer = Trainer(cfg, data)
    try:
        yield trainer
    finally:
        if trainer.producer is not None:
            trainer.producer.close()  # before the engine it drives
        if trainer.engine is not None:
            trainer.engine.shutdown()  # SGLang servers must not outlive the run
        if trainer.scorer is not None:
            trainer.scorer.close()  # nor the reward workers


def train(cfg: RunConfig, data: DataBundle) -> dict:
    """The run's summary on rank 0; {} on the other ranks and when a signal stopped the run."""
    with _trainer(cfg, data) as trainer:
        return trainer.run()


def evaluate(cfg: RunConfig, data: DataBundle) -> dict:
    """avg@k on the eval set for the weights ``actor.load_megatron`` / ``actor.load_hf`` name.

    Writes ``run_dir/eval.json``; the run directory is the evaluation's own, not the trained run's.
    A training run's checkpoint is scored with the sampling seed that run used at that step, so the
    embedded engine reproduces the run's own eval exactly. The summary on rank 0; {} on the other ranks.
    """
    with _trainer(cfg, data) as trainer:
        if cfg.actor.load_megatron:
            source = model_checkpoint_dir(cfg.actor.load_megatron).name
            trainer.state.step = int(source.removeprefix("step_")) if source.startswith("step_") else 0
        trainer._sync_weights(version=trainer.state.step)
        result = trainer._evaluate()
    summary = {
        "weights": cfg.actor.load_megatron or cfg.actor.load_hf,
        "step": trainer.state.step,
        "eval_accuracy": result["accuracy"],
        "mean_response_length": result["response_length"],
        "eval_problems": len(trainer.data.eval_problems),
        "samples_per_problem": cfg.rollout.eval_n_samples,
    }
    if trainer.is_rank0:
        (trainer.run_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
        trainer.metrics.close()
        return summary
    return {}  # one summary per run: rank 0 prints it
