"""The accelerators a run is planned for: memory, bandwidths and peak throughput, one GPU each.

``memory_bytes`` is what the driver hands out (nvidia-smi ``memory.total``), which is the budget the
ledger fills; the data sheet's nominal capacity is in the comment. Throughput figures are dense
(without 2:4 sparsity) per GPU; bandwidths are bytes per second. The step-time planner builds on
these; the memory ledger reads only ``memory_bytes`` and ``host_memory_bytes_per_node``.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_fipo.config_base import ConfigError

MiB = 1 << 20
GB = 10**9
TB = 10**12


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int  # per GPU, as the driver reports it
    hbm_bandwidth: float  # bytes/s
    bf16_dense_flops: float  # FLOP/s
    fp8_dense_flops: float  # FLOP/s
    nvlink_bandwidth: float  # bytes/s per GPU, both directions together, as the data sheets quote it
    nic_bandwidth: float  # bytes/s per GPU (one NIC per GPU), one direction
    host_memory_bytes_per_node: int  # CPU RAM of the reference node, for offloaded state


GPUS: dict[str, GPU] = {
    # NVIDIA H100 Tensor Core GPU data sheet (SXM5): 80 GB HBM3, 3.35 TB/s, BF16 1,979 TFLOPS and FP8
    # 3,958 TFLOPS with sparsity (half dense), NVLink 900 GB/s. DGX H100 data sheet: 8x ConnectX-7
    # 400 Gb/s, 2 TB system memory. nvidia-smi reports 81559 MiB on "NVIDIA H100 80GB HBM3".
    "h100-80gb": GPU("h100-80gb", 81559 * MiB, 3.35 * TB, 989e12, 1979e12, 900 * GB, 400e9 / 8, 2 * TB),
    # NVIDIA H200 Tensor Core GPU data sheet (SXM): 141 GB HBM3e, 4.8 TB/s, compute as H100 SXM, NVLink
    # 900 GB/s. DGX H200 data sheet: 8x ConnectX-7 400 Gb/s, 2 TB system memory. nvidia-smi: 143771 MiB.
    "h200-141gb": GPU("h200-141gb", 143771 * MiB, 4.8 * TB, 989e12, 1979e12, 900 * GB, 400e9 / 8, 2 * TB),
    # NVIDIA HGX B200 / DGX B200 data sheets: 1,440 GB HBM3e and 64 TB/s per 8 GPUs (180 GB, 8 TB/s each),
    # FP8 72 PFLOPS and FP16/BF16 36 PFLOPS with sparsity per 8 GPUs (4.5 / 2.25 PFLOPS dense each),
    # NVLink 5 1.8 TB/s per GPU, 8x ConnectX-7 400 Gb/s, up to 4 TB system memory. nvidia-smi: 183359 MiB.
    "b200": GPU("b200", 183359 * MiB, 8 * TB, 2.25e15, 4.5e15, 1.8 * TB, 400e9 / 8, 4 * TB),
    # NVIDIA GB200 NVL72 data sheet: per 72 GPUs 13.4 TB HBM3e (186 GB each), 576 TB/s (8 TB/s each),
    # FP8 720 PFLOPS and FP16/BF16 360 PFLOPS with sparsity (5 / 2.5 PFLOPS dense each), NVLink 5
    # 1.8 TB/s per GPU; a compute tray (2 Grace + 4 GPUs) has 4x ConnectX-7 400 Gb/s and 960 GB LPDDR5X
    # (480 GB per Grace). nvidia-smi: 189471 MiB.
    "gb200": GPU("gb200", 189471 * MiB, 8 * TB, 2.5e15, 5e15, 1.8 * TB, 400e9 / 8, 960 * GB),
}


def gpu(name: str, key: str = "launch.gpu_type") -> GPU:
    if name not in GPUS:
        raise ConfigError(f"{key}: unknown GPU {name!r}; choose one of {', '.join(GPUS)}")
    return GPUS[name]
