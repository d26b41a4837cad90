"""Config mistakes fail before torch loads, with the key's name and the fix."""

import pytest
from test_first_day_errors import run_cli


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1e-3", "unknown key optim.lrr in OptimConfig; valid keys:"),
    ("trainer.total_steps=ten", "trainer.total_steps: expected int, got 'ten'"),
    ("parallel.tensor_model_parallel_size=3", "must divide the world size 1"),
    ("trainer.minibatch_prompts=7", "trainer.minibatch_prompts (7) must divide trainer.prompts_per_step (32)"),
    ("algo.dual_clip_c=1.1", "dual_clip_c (1.1) must exceed 1 + clip_ratio_high"),
    ("rollout.n_samples=1", "rollout.n_samples must be >= 2"),
])
def test_config_error_names_the_key_before_torch_loads(override, message):
    # What makes it fast is not importing torch and Megatron (seconds); a wall-clock bound would
    # only measure how loaded the machine is.
    proc, torch_loaded = run_cli("train", "examples/tiny_cpu.yaml", override)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not torch_loaded


def test_parallel_sizes_that_do_not_divide_the_model(monkeypatch):
    from megatron_fipo.config import ParallelConfig
    from megatron_fipo.config_base import ConfigError
    from megatron_fipo.model_arch import ModelArch
    from megatron_fipo.testing import TINY_QWEN2
    from megatron_fipo.validation import validate_parallel

    arch = ModelArch.from_hf_config(TINY_QWEN2)  # 4 heads, 2 KV groups, 4 layers
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=4 must divide num_key_value_heads=2"):
        validate_parallel(ParallelConfig(tensor_model_parallel_size=4), arch, 4)
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size=3 .* must divide num_layers=4"):
        validate_parallel(ParallelConfig(pipeline_model_parallel_size=3), arch, 3)
    with pytest.raises(ConfigError, match="virtual_pipeline_model_parallel_size: interleaved 1F1B is not supported"):
        validate_parallel(ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
                          arch, 2)
    assert validate_parallel(ParallelConfig(tensor_model_parallel_size=2), arch, 8) == 4
    # Context parallelism runs on CPU too (actor/cpu_layers.py), with or without Transformer Engine.
    assert validate_parallel(ParallelConfig(context_parallel_size=2), arch, 4) == 2
