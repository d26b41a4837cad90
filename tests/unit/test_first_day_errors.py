"""Every bad input a new user meets fails as one line (exit 2), names the file/field and the fix, before
torch loads, and leaves no run directory behind."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
# The dapo_math task on the sample files with the tiny model: two of its three training prompts fit
# data.max_prompt_length=40, but no AIME prompt does with the DAPO instruction (116 and 92 tokens with
# the arithmetic task's tokenizer).
DAPO = ["data.task=dapo_math", f"data.train_path={DATA / 'dapo_math_sample.jsonl'}",
        f"data.eval_path={DATA / 'aime_sample.jsonl'}", "data.tokenizer=sentencepiece", "data.max_prompt_length=40",
        "reward.answer_format=dapo"]


def run_cli(*args: str, block_wandb: bool = False) -> tuple[subprocess.CompletedProcess, bool]:
    """``megatron-fipo ARGS`` in a fresh interpreter; (process, whether torch got imported).

    ``block_wandb`` makes ``import wandb`` fail as it does where wandb is not installed."""
    code = ("import sys\n"
            + ("sys.modules['wandb'] = None\n" if block_wandb else "")
            + "from megatron_fipo.cli import main\n"
            "rc = main(sys.argv[1:])\n"
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    return proc, "torch imported" in proc.stdout


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # Warnings (a skipped data row) may come first; the error is the last line, and no traceback.
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("megatron-fipo: config error: ") and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in error, (fragment, error)
    return error


def train_refused(tmp_path: Path, *overrides: str, block_wandb: bool = False) -> str:
    """``train examples/tiny_cpu.yaml run_dir=TMP/run OVERRIDES`` fails in one line, before torch loads and
    before the run directory exists; the error line."""
    proc, torch_loaded = run_cli("train", "examples/tiny_cpu.yaml", f"run_dir={tmp_path / 'run'}", *overrides,
                                 block_wandb=block_wandb)
    error = assert_one_line_error(proc)
    assert not torch_loaded and not (tmp_path / "run").exists()
    return error


@pytest.fixture
def tokenizer_file(tmp_path) -> Path:
    from megatron_fipo.data.arithmetic import arithmetic_problems, tokenizer_corpus
    from megatron_fipo.data.tokenizer import SentencePieceTokenizer

    path = tmp_path / "sp.model"
    SentencePieceTokenizer.train(tokenizer_corpus(arithmetic_problems(10)), 16).save(path)
    return path


def test_missing_config_file(tmp_path):
    proc, torch_loaded = run_cli("train", str(tmp_path / "nope.yaml"))
    assert_one_line_error(proc, f"{tmp_path / 'nope.yaml'}: no such config file")
    assert not torch_loaded


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: ../examples/tiny_cpu.yaml\ntrainer:\n  total_steps: 3\n   seed: 1\n")
    proc, torch_loaded = run_cli("train", str(bad), f"run_dir={tmp_path / 'run'}")
    assert_one_line_error(proc, f"{bad}:4:", "not valid YAML")
    assert not torch_loaded and not (tmp_path / "run").exists()


def test_malformed_override_value():
    proc, _ = run_cli("train", "examples/tiny_cpu.yaml", "trainer.total_steps=[3")
    assert_one_line_error(proc, "override 'trainer.total_steps=[3'", "not valid YAML")


@pytest.mark.parametrize("overrides,fragments", [
    (["data.tokenizer=hf", "data.tokenizer_path={tmp}/no-such-dir"],
     ["data.tokenizer_path: {tmp}/no-such-dir is not a directory"]),
    (["data.tokenizer=hf", "data.tokenizer_path={tmp}"],
     ["data.tokenizer_path: {tmp} has none of tokenizer.json"]),
    (["data.tokenizer_path={tmp}/garbage.model"],
     ["data.tokenizer_path: {tmp}/garbage.model does not load as a sentencepiece tokenizer"]),
])
def test_bad_tokenizer_path(tmp_path, overrides, fragments):
    (tmp_path / "garbage.model").write_text("not a sentencepiece model")
    error = train_refused(tmp_path, *(o.format(tmp=tmp_path) for o in overrides))
    for fragment in fragments:
        assert fragment.format(tmp=tmp_path) in error, error


def test_bad_row_with_on_bad_row_fail_names_file_and_line(tmp_path, tokenizer_file):
    error = train_refused(tmp_path, *DAPO, f"data.tokenizer_path={tokenizer_file}", "data.on_bad_row=fail")
    assert f"{DATA / 'dapo_math_sample.jsonl'}:3: malformed dapo_math row: missing key 'reward_model'" in error, error
    assert "set data.on_bad_row=skip" in error, error


@pytest.mark.parametrize("key", ["train_path", "eval_path"])
def test_missing_data_path(tmp_path, tokenizer_file, key):
    missing = tmp_path / "nope.parquet"
    error = train_refused(tmp_path, *DAPO, f"data.tokenizer_path={tokenizer_file}", f"data.{key}={missing}")
    assert f"data.{key}: {missing} is not a file" in error, error


@pytest.mark.parametrize("key", ["train_path", "eval_path"])
def test_empty_data_file(tmp_path, tokenizer_file, key):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    error = train_refused(tmp_path, *DAPO, f"data.tokenizer_path={tokenizer_file}", f"data.{key}={empty}")
    assert f"data.{key} {empty}: no usable problems" in error, error


@pytest.mark.parametrize("task,overrides,message", [
    # Today: the whole warm start ran, then ZeroDivisionError in the first eval.
    ("dapo_math", ["data.max_prompt_length=40"], f"data.eval_path {DATA / 'aime_sample.jsonl'}: all 2 prompts are "
                                                 "longer than data.max_prompt_length=40 tokens; raise data.max_prompt_length"),
    ("arithmetic", ["data.max_prompt_length=2"], "the arithmetic task's train split: all 100 prompts are longer than "
                                                 "data.max_prompt_length=2 tokens"),
])
def test_every_prompt_of_a_set_too_long(tmp_path, tokenizer_file, task, overrides, message):
    data = [*DAPO, f"data.tokenizer_path={tokenizer_file}"] if task == "dapo_math" else []
    assert message in train_refused(tmp_path, *data, *overrides)


@pytest.mark.parametrize("override,message", [
    ("rollout.max_response_length=60", "data.max_prompt_length (16) + rollout.max_response_length (60) = 76 tokens "
                                       "exceeds the model's max_position_embeddings (64"),
    # Today: the warm start and the first rollout ran, then a ValueError in the reward.
    ("reward.overlong_buffer_length=8", "reward.overlong_buffer_length (8) exceeds rollout.max_response_length (6)"),
])
def test_lengths_that_do_not_fit(tmp_path, override, message):
    assert message in train_refused(tmp_path, override)


def test_wandb_project_without_wandb_names_the_install_command(tmp_path):
    error = train_refused(tmp_path, "trainer.wandb_project=demo", block_wandb=True)
    assert "trainer.wandb_project='demo' needs wandb" in error, error
    assert "scripts/setup_env.sh requirements-wandb.txt" in error, error


def test_requirements_wandb_is_the_extra_the_error_names():
    extra = (REPO / "requirements-wandb.txt").read_text()
    assert "wandb==" in extra
    assert 'wandb = ["wandb"]' in (REPO / "pyproject.toml").read_text()


def test_load_hf_alone_sets_the_model_config(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from megatron_fipo.config import RunConfig
    from megatron_fipo.config_base import ConfigError, load_config
    from megatron_fipo.validation import validate_inputs, validate_run

    hf = tmp_path / "my-model"
    hf.mkdir()
    config = json.loads((REPO / "examples" / "tiny_qwen2" / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 6}))
    with pytest.raises(ConfigError, match=f"actor.load_hf: {hf} has no \\*.safetensors weights"):
        validate_inputs(load_config(RunConfig, REPO / "examples" / "tiny_cpu.yaml", [f"actor.load_hf={hf}"]))
    save_file({"w": np.zeros(1, dtype=np.float32)}, hf / "model.safetensors")
    cfg = load_config(RunConfig, REPO / "examples" / "tiny_cpu.yaml", ["actor.model_config=", f"actor.load_hf={hf}"])
    assert cfg.actor.model_config == str(hf)
    validate_inputs(cfg)
    assert validate_run(cfg).num_layers == 6


def test_eval_prompts_follow_the_answer_format(tmp_path, tokenizer_file):
    """AIME problems are wrapped in the instruction that asks for the answer as reward.answer_format reads it."""
    from megatron_fipo.config import RunConfig
    from megatron_fipo.config_base import ConfigError, load_config
    from megatron_fipo.data.math_datasets import DAPO_INSTRUCTION
    from megatron_fipo.data.tokenizer import SentencePieceTokenizer
    from megatron_fipo.data.setup import setup_data
    from megatron_fipo.model_arch import ModelArch

    def eval_prompts(answer_format: str) -> list[str]:
        cfg = load_config(RunConfig, REPO / "examples" / "tiny_cpu.yaml",
                          [*DAPO, f"data.tokenizer_path={tokenizer_file}", "data.max_prompt_length=58",
                           f"reward.answer_format={answer_format}", f"run_dir={tmp_path / 'run'}"])
        data = setup_data(cfg, ModelArch.from_hf_config(cfg.actor.model_config))
        return [p.messages[0]["content"] for p in data.eval_problems]

    problem = "Compute $\\sqrt{8}\\cdot\\sqrt{2}$."
    first = "Find the number of ordered pairs of positive integers $(m,n)$ such that $m+n=10$."
    data_tokenizer = SentencePieceTokenizer(tokenizer_file)
    assert eval_prompts("plain")[-1] == problem
    assert eval_prompts("boxed")[-1] == (problem + "\n\nPlease reason step by step, and put your final answer "
                                         "within \\boxed{}.")
    # The DAPO instruction (116 and 92 tokens) does not fit this max_prompt_length; it used to be added always.
    assert [len(data_tokenizer.encode(DAPO_INSTRUCTION.format(problem=q))) > 58 for q in (first, problem)] == [True, True]
    with pytest.raises(ConfigError, match="all 2 prompts are longer"):
        eval_prompts("dapo")
    assert not (tmp_path / "run").exists()


def test_data_setup_writes_nothing_and_the_trainer_saves_the_trained_tokenizer(tmp_path):
    """A tokenizer trained on the task stays in memory until the run directory exists."""
    from megatron_fipo.config import RunConfig
    from megatron_fipo.config_base import load_config
    from megatron_fipo.data.setup import setup_data
    from megatron_fipo.data.tokenizer import SentencePieceTokenizer
    from megatron_fipo.model_arch import ModelArch

    cfg = load_config(RunConfig, REPO / "examples" / "tiny_cpu.yaml", [f"run_dir={tmp_path / 'run'}"])
    data = setup_data(cfg, ModelArch.from_hf_config(cfg.actor.model_config))
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    data.save(tmp_path / "run")
    saved = SentencePieceTokenizer(tmp_path / "run" / "tokenizer.model")
    assert saved.encode("7+8=15") == data.tokenizer.encode("7+8=15") and saved.vocab_size == data.tokenizer.vocab_size
    # A resumed run reads the saved tokenizer instead of training one.
    again = setup_data(cfg, ModelArch.from_hf_config(cfg.actor.model_config))
    assert again.trained_tokenizer is None and again.tokenizer.encode("3+4=7") == data.tokenizer.encode("3+4=7")


def test_eval_without_weights_or_checkpoint_says_what_to_give(tmp_path):
    config = tmp_path / "fresh.yaml"
    config.write_text(f"base: {REPO / 'examples' / 'tiny_cpu.yaml'}\nrun_dir: {tmp_path / 'never-trained'}\n")
    proc, torch_loaded = run_cli("eval", str(config), f"run_dir={tmp_path / 'out'}")
    assert_one_line_error(proc, f"eval needs weights: {tmp_path / 'never-trained'} has no checkpoint",
                          "actor.load_megatron=RUN_DIR/checkpoints", "actor.load_hf=HF_DIR")
    assert not torch_loaded and not (tmp_path / "out").exists()


def test_convert_of_a_missing_source_fails_before_torch_loads(tmp_path):
    proc, torch_loaded = run_cli("convert", "--to", "megatron", str(tmp_path / "Qwen2.5-32B"), str(tmp_path / "out"))
    assert proc.returncode == 2 and not torch_loaded and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (f"megatron-fipo convert: {tmp_path / 'Qwen2.5-32B'}: no such file or directory; "
                                   "give the HF directory (--to megatron) or the Megatron checkpoint / run's "
                                   "checkpoints directory (--to hf)")
    assert not (tmp_path / "out").exists()


def test_setup_refuses_before_installing_on_a_full_disk():
    """scripts/need_disk.sh, which both setup scripts call before creating a venv: a full disk is
    named with its free space and what needs it, instead of pip's OSError minutes into the install."""
    ok = subprocess.run([str(REPO / "scripts/need_disk.sh"), "0", "nothing"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stderr == ""
    refused = subprocess.run([str(REPO / "scripts/need_disk.sh"), "1000000", "a new .venv"],
                             capture_output=True, text=True)
    assert refused.returncode == 1
    assert re.search(r"a new \.venv needs about 1000000 GB free on /\S*, which has \d+ GB", refused.stderr), refused.stderr
    for script in ("scripts/setup_env.sh", "tools/sglang_cpu/setup.sh"):
        assert "scripts/need_disk.sh" in (REPO / script).read_text(), script


def test_a_ctrl_c_a_library_swallows_during_import_still_ends_the_command():
    """Megatron-Core guards optional imports with bare ``except:``: a KeyboardInterrupt raised inside
    one is swallowed and the import goes on. The CLI notes the signal and raises it again once the
    heavy imports are done (CI once saw the run go on to exit 0 after a Ctrl-C during start-up)."""
    import os
    import signal
    import time

    from megatron_fipo import cli

    previous = signal.getsignal(signal.SIGINT)
    try:
        cli._note_interrupts()
        cli._raise_swallowed_interrupt()  # nothing noted yet: no effect
        try:  # what megatron/core/transformer/attention.py:117 does around an optional import
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except:  # noqa: E722 - the library's bare except, swallowing the KeyboardInterrupt
            pass
        with pytest.raises(KeyboardInterrupt):
            cli._raise_swallowed_interrupt()
    finally:
        cli._interrupted = False
        signal.signal(signal.SIGINT, previous)
