"""Every shipped config loads, and its parallel layout fits its model and cluster."""

from pathlib import Path

import pytest

from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import load_config
from megatron_fipo.validation import validate_run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("name,world,dp", [
    ("tiny_cpu.yaml", 1, 1),
    ("qwen2.5-32b-fipo-h100.yaml", 128, 16),
    ("qwen2.5-7b-fipo-h100.yaml", 32, 16),
    ("qwen3-8b-fipo-h100.yaml", 16, 8),
    ("tiny_cpu_qwen3.yaml", 1, 1),
])
def test_recipe_validates(name, world, dp, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = load_config(RunConfig, EXAMPLES / name)
    arch = validate_run(cfg)
    assert world // cfg.parallel.model_parallel_size == dp
    assert cfg.trainer.prompts_per_step // cfg.trainer.minibatch_prompts >= 1
    assert arch.vocab_size % cfg.parallel.tensor_model_parallel_size == 0


def test_32b_recipe_is_the_papers():
    cfg = load_config(RunConfig, EXAMPLES / "qwen2.5-32b-fipo-h100.yaml")
    assert (cfg.trainer.prompts_per_step, cfg.rollout.n_samples, cfg.trainer.minibatch_prompts) == (512, 16, 64)
    assert (cfg.data.max_prompt_length, cfg.rollout.max_response_length) == (2048, 20480)
    assert (cfg.reward.overlong_buffer_length, cfg.reward.overlong_penalty_factor) == (4096, 1.0)
    assert (cfg.optim.lr, cfg.optim.lr_warmup_steps, cfg.optim.weight_decay, cfg.optim.clip_grad) == (1e-6, 10, 0.1, 1.0)
    assert (cfg.trainer.max_gen_batches, cfg.rollout.eval_n_samples, cfg.rollout.eval_top_p) == (10, 32, 0.7)
    assert cfg.algo.influence_bounds == (1.0, pytest.approx(1.2))
