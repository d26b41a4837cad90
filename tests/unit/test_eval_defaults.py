"""What `megatron-fipo eval` of a run directory means when the command line says nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_fipo.cli import _eval_defaults, _load
from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import load_config, save_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run(tmp_path) -> Path:
    """A finished run's directory: its config (naming another run_dir, as a moved run would), a checkpoint
    and the tokenizer it trained."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("4")
    (run / "tokenizer.model").write_bytes(b"sp")
    cfg = load_config(RunConfig, REPO / "examples" / "tiny_cpu.yaml", ["run_dir=runs/where-it-was-trained"])
    save_config(cfg, run / "config.yaml")
    return run


@pytest.mark.parametrize("given", ["dir", "config.yaml"])
def test_a_run_dir_means_its_newest_checkpoint_its_tokenizer_and_run_dir_eval(run, given, monkeypatch):
    monkeypatch.chdir(REPO)
    config = str(run if given == "dir" else run / "config.yaml")
    cfg = _load(config, _eval_defaults(config, []))
    assert cfg.run_dir == str(run / "eval")
    assert cfg.actor.load_megatron == str(run / "checkpoints") and cfg.actor.load_hf == ""
    assert cfg.data.tokenizer_path == str(run / "tokenizer.model")


def test_the_command_line_wins(run, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = _load(str(run), _eval_defaults(str(run), ["run_dir=elsewhere", "actor.load_hf=examples/tiny_qwen2"]))
    assert cfg.run_dir == "elsewhere"
    assert cfg.actor.load_hf == "examples/tiny_qwen2" and cfg.actor.load_megatron == ""


def test_a_config_without_a_run_writes_next_to_its_run_dir(tmp_path, monkeypatch):
    """examples/tiny_cpu.yaml before `make run`: no checkpoint to default to; output under RUN_DIR/eval."""
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "examples" / "tiny_cpu.yaml")
    cfg = _load(config, _eval_defaults(config, ["actor.load_hf=hf"]))
    assert cfg.run_dir == "runs/tiny_cpu/eval" and cfg.actor.load_megatron == ""
