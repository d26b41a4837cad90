"""Seconds to push a model's weights into a running SGLang server, per transport, vs a plain copy.

Runs the real SGLang server on this machine (on a CPU: tools/sglang_cpu/setup.sh first). Each
transport moves the same in-memory HF-named buckets: ``tensor`` (shared-memory / CUDA-IPC handles),
``disk`` (safetensors snapshot + reload) and ``distributed`` (broadcast from this process; gloo on a
CPU, NCCL on GPUs). Each push gets freshly made tensors, as from the bridge; the baseline is copying
the same bytes once inside this process, so a transport's time includes that one copy.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from benchlib import time_fn

from megatron_fipo.bridge.hf_io import HFCheckpointReader
from megatron_fipo.bridge.mapping import hf_names
from megatron_fipo.config import RolloutConfig, SGLangConfig
from megatron_fipo.rollout.sglang_engine import SGLangEngine
from megatron_fipo.rollout.sglang_weights import DiskTransport, DistributedTransport, TensorTransport
from megatron_fipo.testing import make_hf_checkpoint

REPO = Path(__file__).resolve().parents[1]
CPU_ARGS = ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph", "--dtype", "float32",
            "--max-total-tokens", "4096", "--skip-server-warmup", "--sleep-on-idle"]


def _buckets(named: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    out, size = [[]], 0
    for name, t in named:
        if size >= bucket_bytes:
            out.append([])
            size = 0
        out[-1].append((name, t))
        size += t.numel() * t.element_size()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--port", type=int, default=31900)
    parser.add_argument("--python", default=str(REPO / "tools" / "sglang_cpu" / "python"),
                        help="interpreter that runs sglang.launch_server (GPU nodes: this venv's python)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_weight_update-"))
    reader = HFCheckpointReader(make_hf_checkpoint(
        root / "hf", seed=0, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=12, num_key_value_heads=4, vocab_size=32768, max_position_embeddings=1024))
    arch = reader.arch()
    named = [(n, reader.read(n).clone()) for n in hf_names(arch)]
    total = sum(t.numel() * t.element_size() for _, t in named)
    buckets = _buckets(named, args.bucket_mb * 2**20)
    cfg = RolloutConfig(engine="sglang", sglang=SGLangConfig(
        python=args.python, base_port=args.port, mem_fraction_static=0.05, extra_args=CPU_ARGS, release_memory=False))
    engine = SGLangEngine(cfg, arch, root / "run")
    try:
        engine.update_weights(buckets, version=0)
        engine.resume()  # the first generation phase starts the server from that snapshot
        t_copy = time_fn(lambda: [t.clone() for _, t in named], repeats=3)
        print(f"model {total / 2**30:.2f} GiB fp32, {len(buckets)} buckets of <= {args.bucket_mb} MiB, "
              f"threads={torch.get_num_threads()}")
        print(f"{'in-process copy':>16}: {t_copy:7.3f} s  {total / t_copy / 1e9:6.2f} GB/s  (baseline)")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        transports = {"tensor": TensorTransport(), "disk": DiskTransport(root / "snapshots", arch),
                      f"distributed/{backend}": DistributedTransport("127.0.0.1", args.port + 100, backend)}
        for version, (name, transport) in enumerate(transports.items(), start=1):
            # Fresh tensors per push, as the bridge yields them: a tensor already in shared memory
            # would skip the copy into it and flatter the tensor transport.
            fresh = lambda: ([(n, t.clone()) for n, t in bucket] for bucket in buckets)  # noqa: E731
            seconds = time_fn(lambda: transport.push(engine.servers, fresh(), version), repeats=3)
            print(f"{name:>16}: {seconds:7.3f} s  {total / seconds / 1e9:6.2f} GB/s  "
                  f"({seconds / t_copy:5.1f}x the copy)")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
