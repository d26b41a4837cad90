"""`eval` and `convert` of a training run's directory, as the README runs them on the tiny job.

- `eval RUN_DIR` scores the run's newest checkpoint (reproducing the run's final eval) and writes
  RUN_DIR/eval/, leaving the run's own files as they were.
- `convert --to hf RUN_DIR/checkpoints HF` needs no --hf-config: the run's model config and tokenizer
  go along; every file is readable by all (0644). `convert --to megatron HF` keeps the tokenizer in
  hf_config/. `actor.load_hf` alone (no actor.model_config) loads the export, and scores the same
  as the Megatron checkpoint converted from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHORT = ["trainer.total_steps=1", "trainer.warmup_sft_steps=20", "trainer.eval_every=1", "trainer.save_every=1",
         "trainer.prompts_per_step=8", "trainer.minibatch_prompts=4", "trainer.gen_prompts_per_batch=12",
         "data.eval_size=8", "rollout.eval_n_samples=2"]

pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "megatron_fipo.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tiny") / "run"
    cli("train", "examples/tiny_cpu.yaml", f"run_dir={run}", *SHORT)
    return run


def test_eval_of_a_run_dir_scores_its_newest_checkpoint_and_leaves_the_run_alone(run_dir):
    before = digest(run_dir)
    proc = cli("eval", run_dir)
    result = json.loads((run_dir / "eval" / "eval.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"written to {run_dir / 'eval'}/eval.json" in proc.stdout
    assert result["step"] == 1 and result["weights"] == str(run_dir / "checkpoints")
    assert (result["eval_accuracy"], result["mean_response_length"]) == (
        summary["eval_accuracy_end"], summary["mean_response_length_end"])
    after = {k: v for k, v in digest(run_dir).items() if not k.startswith("eval/")}
    assert after == before


def test_convert_a_run_to_hf_and_back_then_load_hf_alone(run_dir, tmp_path):
    hf, megatron = tmp_path / "hf", tmp_path / "megatron"
    cli("convert", "--to", "hf", run_dir / "checkpoints", hf)
    cli("convert", "--to", "megatron", hf, megatron)
    tokenizer = (run_dir / "tokenizer.model").read_bytes()
    assert (hf / "tokenizer.model").read_bytes() == tokenizer
    assert (megatron / "hf_config" / "tokenizer.model").read_bytes() == tokenizer
    assert (hf / "config.json").read_bytes() == (REPO / "examples" / "tiny_qwen2" / "config.json").read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    for path in [hf, *hf.iterdir()]:
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path
    scores = {}
    for name, weights in (("hf", ["actor.model_config=", f"actor.load_hf={hf}"]),
                          ("megatron", [f"actor.load_megatron={megatron}"])):
        cli("eval", run_dir / "config.yaml", f"run_dir={tmp_path / name}-eval", *weights)
        result = json.loads((tmp_path / f"{name}-eval" / "eval.json").read_text())
        scores[name] = (result["step"], result["eval_accuracy"], result["mean_response_length"])
    assert scores["hf"] == scores["megatron"]
    saved = (tmp_path / "hf-eval" / "config.yaml").read_text()
    assert f"model_config: {hf}\n" in saved  # taken from actor.load_hf
