"""Config mistakes fail fast (well under a second) with the key's name and the fix."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1e-3", "unknown key optim.lrr in OptimConfig; valid keys:"),
    ("trainer.total_steps=ten", "trainer.total_steps: expected int, got 'ten'"),
    ("parallel.tensor_model_parallel_size=3", "must divide the world size 1"),
    ("trainer.minibatch_prompts=7", "trainer.minibatch_prompts (7) must divide trainer.prompts_per_step (32)"),
    ("algo.dual_clip_c=1.1", "dual_clip_c (1.1) must exceed 1 + clip_ratio_high"),
    ("rollout.n_samples=1", "rollout.n_samples must be >= 2"),
])
def test_config_error_is_fast_and_names_the_key(override, message):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "megatron_fipo.cli", "train", "examples/tiny_cpu.yaml", override],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert elapsed < 1.0, f"config error took {elapsed:.2f} s"


def test_parallel_sizes_that_do_not_divide_the_model(monkeypatch):
    from megatron_fipo.config import ParallelConfig
    from megatron_fipo.config_base import ConfigError
    from megatron_fipo.model_arch import ModelArch
    from megatron_fipo.testing import TINY_QWEN2
    from megatron_fipo.validation import validate_parallel

    arch = ModelArch.from_hf_config(TINY_QWEN2)  # 4 heads, 2 KV groups, 4 layers
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=4 must divide num_key_value_heads=2"):
        validate_parallel(ParallelConfig(tensor_model_parallel_size=4), arch, 4, has_te=False)
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size=3 .* must divide num_layers=4"):
        validate_parallel(ParallelConfig(pipeline_model_parallel_size=3), arch, 3, has_te=False)
    with pytest.raises(ConfigError, match="context_parallel_size=2 needs Transformer Engine"):
        validate_parallel(ParallelConfig(context_parallel_size=2), arch, 2, has_te=False)
    with pytest.raises(ConfigError, match="virtual_pipeline_model_parallel_size: interleaved 1F1B is not supported"):
        validate_parallel(ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
                          arch, 2, has_te=False)
    assert validate_parallel(ParallelConfig(tensor_model_parallel_size=2), arch, 8, has_te=False) == 4
