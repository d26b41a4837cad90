"""In-process rollout engine: batched sampling with a KV cache, for CPU runs and tests.

It receives the same HF-named tensors the bridge sends to SGLang, so the weight path is exercised
end to end; its logprobs agree with the Megatron actor's on the same tokens (fp32).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterable, Iterator

import torch

from megatron_fipo import timings
from megatron_fipo.bridge.mapping import hf_shapes
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.rollout.base import (GenerationAborted, GroupRequest, GroupResult, Sample, SamplingParams,
                                        StreamStats)
from megatron_fipo.rollout.torch_decoder import TorchDecoder


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the mass before it already reaches top_p (the first always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


class EmbeddedEngine:
    def __init__(self, arch: ModelArch, max_batch: int = 256, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 prompts_per_chunk: int = 0):
        self.arch, self.max_batch, self.dtype, self.device = arch, max_batch, dtype, torch.device(device)
        # A stream's unit of work: this many prompts (the trainer's generation batch), each chunk
        # sampled as one ``generate`` call; 0: as many whole groups as fill max_batch sequences.
        self.prompts_per_chunk = prompts_per_chunk
        self.shapes = hf_shapes(arch)
        self.weights: dict[str, torch.Tensor] = {}
        self.weight_version = -1
        self._aborted = False

    # ---- weights -----------------------------------------------------------------------------
    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int) -> None:
        for bucket in buckets:
            for name, tensor in bucket:
                if name not in self.shapes:
                    raise KeyError(f"embedded engine: unexpected weight {name!r} (not in the {self.arch.model_type} layout)")
                if tuple(tensor.shape) != self.shapes[name]:
                    raise ValueError(f"embedded engine: {name} has shape {tuple(tensor.shape)}, expected {self.shapes[name]}")
                if name in self.weights:
                    self.weights[name].copy_(tensor)
                else:
                    self.weights[name] = tensor.detach().to(self.device, self.dtype, copy=True)
        missing = set(self.shapes) - set(self.weights)
        if missing:
            raise ValueError(f"embedded engine: weights never received: {sorted(missing)[:5]}")
        self.weight_version = version

    def pause(self) -> None:  # CPU memory is shared with the trainer anyway
        pass

    def resume(self) -> None:
        pass

    def shutdown(self) -> None:
        self.weights.clear()

    def abort(self) -> None:
        """Make the ``generate`` in flight raise GenerationAborted at its next decode step."""
        self._aborted = True

    @torch.no_grad()
    def score(self, prompt: list[int], response: list[int], temperature: float = 1.0) -> torch.Tensor:
        """Teacher-forced log pi(response_t | prefix) under softmax(logits / temperature), fp32 [len(response)].

        The reference another engine's sampled logprobs are checked against (train/inference mismatch).
        """
        model = TorchDecoder(self.arch, self.weights)
        ids = torch.tensor([prompt + response], device=self.device)
        t = ids.shape[1]
        cache = model.new_cache(1, t, self.dtype, self.device)
        causal = torch.ones(1, 1, t, t, dtype=torch.bool, device=self.device).tril()
        hidden = model.forward(ids, torch.arange(t, device=self.device)[None], cache, 0, causal)[0, len(prompt) - 1 : -1]
        logp = torch.log_softmax((hidden @ model.lm_head().T).float() / temperature, dim=-1)
        return logp.gather(-1, torch.tensor(response, device=self.device)[:, None]).squeeze(-1).cpu()

    # ---- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams, seed: int) -> list[list[Sample]]:
        if not self.weights:
            raise RuntimeError("embedded engine: no weights loaded; call update_weights first")
        self._aborted = False  # an abort is for the call in flight; one that came between calls is spent
        samples = self._generate_flat([p for p in prompts for _ in range(n)], sampling, seed)
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _generate_flat(self, flat: list[list[int]], sampling: SamplingParams, seed: int) -> list[Sample]:
        """One sample per entry, max_batch sequences at a time, all from one generator seeded ``seed``."""
        samples: list[Sample] = []
        generator = torch.Generator(device=self.device).manual_seed(seed)
        for start in range(0, len(flat), self.max_batch):
            samples += self._generate_batch(flat[start : start + self.max_batch], sampling, generator)
        return samples

    def stream(self, requests: Iterator[GroupRequest], sampling: SamplingParams, seed: int) -> "EmbeddedStream":
        if not self.weights:
            raise RuntimeError("embedded engine: no weights loaded; call update_weights first")
        self._aborted = False
        return EmbeddedStream(self, requests, sampling, seed)

    def _generate_batch(self, prompts: list[list[int]], sp: SamplingParams, generator) -> list[Sample]:
        started = time.perf_counter()
        model = TorchDecoder(self.arch, self.weights)
        b = len(prompts)
        width = max(len(p) for p in prompts)
        total = width + sp.max_new_tokens
        tokens = torch.zeros(b, width, dtype=torch.long, device=self.device)
        key_valid = torch.zeros(b, total, dtype=torch.bool, device=self.device)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at column width - 1
            tokens[i, width - len(p) :] = torch.tensor(p)
            key_valid[i, width - len(p) : width] = True
        positions = (key_valid[:, :width].long().cumsum(-1) - 1).clamp(min=0)
        cache = model.new_cache(b, total, self.dtype, self.device)
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        # Padding queries attend to themselves only, so no softmax row is empty.
        mask = (causal & key_valid[:, None, None, :width]) | torch.eye(width, dtype=torch.bool, device=self.device)
        hidden = model.forward(tokens, positions, cache, 0, mask)[:, -1]
        next_pos = positions[:, -1] + 1
        head = model.lm_head()
        out_tokens = torch.zeros(b, sp.max_new_tokens, dtype=torch.long)
        out_logp = torch.zeros(b, sp.max_new_tokens)
        lengths = torch.full((b,), sp.max_new_tokens, dtype=torch.long)
        done = torch.zeros(b, dtype=torch.bool)
        stops = torch.tensor(sp.stop_token_ids or [-1], device=self.device)
        for step in range(sp.max_new_tokens):
            if self._aborted:
                raise GenerationAborted("embedded engine: generation aborted")
            logits = (hidden @ head.T).float()
            scaled = logits / sp.temperature if sp.temperature > 0 else logits
            logp_all = torch.log_softmax(scaled, dim=-1)
            if sp.temperature == 0:
                token = logits.argmax(-1)
            else:
                filtered = _filter_top_k_top_p(scaled, sp.top_k, sp.top_p)
                token = torch.multinomial(torch.softmax(filtered, -1), 1, generator=generator).squeeze(-1)
            out_tokens[:, step] = token.cpu()
            out_logp[:, step] = logp_all.gather(-1, token.unsqueeze(-1)).squeeze(-1).cpu()
            stopped = torch.isin(token, stops).cpu() & ~done
            lengths[stopped] = step + 1
            done |= stopped
            if bool(done.all()) or step + 1 == sp.max_new_tokens:
                break
            key_valid[:, width + step] = True
            slot = width + step
            hidden = model.forward(token.unsqueeze(-1), next_pos.unsqueeze(-1), cache, slot,
                                   key_valid[:, None, None, : slot + 1])[:, -1]
            next_pos = next_pos + 1
        timings.record("decode", b, width, step + 1, time.perf_counter() - started)
        return [
            Sample(
                prompt_ids=list(prompts[i]),
                response_ids=out_tokens[i, : lengths[i]].tolist(),
                logprobs=out_logp[i, : lengths[i]].tolist(),
                finish_reason="stop" if done[i] else "length",
                weight_version=self.weight_version,
            )
            for i in range(b)
        ]


class EmbeddedStream:
    """Whole groups a chunk at a time, in the caller's thread as it asks for more.

    A chunk is the engine's ``prompts_per_chunk`` prompts (the trainer's generation batch), sampled
    as ``generate`` samples them with the seed ``seed + chunk index``: a step's rollout draws, samples
    and keeps exactly what the generation batches before streaming did (one engine has no concurrency
    to gain from smaller units). Nothing is in flight between chunks, so a cancel has nothing to cut
    short. Its stats cover the chunks' decoding only: the caller scores in between, while nothing runs here.
    """

    blocking = True

    def __init__(self, engine: EmbeddedEngine, requests: Iterator[GroupRequest], sampling: SamplingParams, seed: int):
        self.engine, self.requests, self.sampling = engine, iter(requests), sampling
        self.seed, self.chunks = seed, 0
        self.stats = StreamStats(busy_s=[0.0], slot_s=[0.0])
        self.cancelled = self.exhausted = False
        self.left: deque[GroupResult] = deque()  # the chunk's groups not yet taken

    def __iter__(self) -> Iterator[GroupResult]:
        while not self.cancelled:
            chunk = self._next_chunk()
            while self.left and not self.cancelled:  # carried groups, handed back as they are
                yield self.left.popleft()
            if not chunk:
                if self.exhausted:
                    return
                continue
            started = time.monotonic()
            flat = [r.prompt_ids for r in chunk for _ in range(r.n)]
            samples = self.engine._generate_flat(flat, self.sampling, self.seed + self.chunks)
            self.chunks += 1
            done = time.monotonic()
            self.stats.wall_s += done - started
            self.stats.busy_s[0] += done - started
            self.stats.slot_s[0] += (done - started) * len(flat) / self.engine.max_batch
            at = 0
            for request in chunk:
                group = samples[at : at + request.n]
                at += request.n
                self.left.append(GroupResult(request.key, group, request.n, sum(len(s.response_ids) for s in group),
                                             done - started, done))
            while self.left and not self.cancelled:
                yield self.left.popleft()

    def _next_chunk(self) -> list[GroupRequest]:
        """The next chunk's requests; a carried group ends a chunk (it is handed back as is)."""
        chunk, size, per_chunk = [], 0, self.engine.prompts_per_chunk
        for request in self.requests:
            if request.partial is not None:  # a carried group: complete, as nothing is in flight here to cut
                if not all(s.finished for s in request.partial):
                    raise ValueError("embedded engine: it cannot continue a partial sample (it never cuts one short)")
                self.left.append(GroupResult(request.key, request.partial, 0, 0, 0.0, time.monotonic()))
                return chunk
            chunk.append(request)
            size += request.n
            if len(chunk) == per_chunk or (not per_chunk and size + request.n > self.engine.max_batch):
                return chunk
        self.exhausted = True
        return chunk

    def cancel(self, keep_partial: bool = True) -> list[GroupResult]:
        """The chunk's groups not yet taken (complete: nothing is ever in flight here, so nothing to wait for)."""
        self.cancelled = True
        left, self.left = list(self.left), deque()
        return left
