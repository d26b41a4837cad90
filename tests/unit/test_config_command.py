"""`megatron-fipo --version`, `megatron-fipo config`, and the generated reference page docs/config-reference.md."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import get_type_hints

import yaml

from megatron_fipo import __version__
from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import from_dict, load_config, to_dict
from megatron_fipo.config_reference import reference_markdown

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "megatron_fipo.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, from the schema itself."""
    hints = get_type_hints(cls)
    return [key for f in dataclasses.fields(cls)
            for key in (_keys(hints[f.name], f"{prefix}{f.name}.") if dataclasses.is_dataclass(hints[f.name])
                        else [f"{prefix}{f.name}"])]


def _cells(row: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]


def test_version():
    assert cli("--version").stdout.strip() == f"megatron-fipo {__version__}"


def test_config_prints_the_resolved_config_with_every_default():
    text = cli("config", "examples/tiny_cpu.yaml", "trainer.total_steps=3").stdout
    printed = yaml.safe_load(text)
    expected = load_config(RunConfig, REPO / "examples" / "tiny_cpu.yaml", ["trainer.total_steps=3"])
    assert printed == to_dict(expected)
    assert from_dict(RunConfig, printed) == expected  # it loads back as a config
    assert printed["trainer"]["total_steps"] == 3 and printed["rollout"]["sglang"]["max_retries"] == 3  # a default
    flat = []

    def walk(node, prefix=""):
        for k, v in node.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "env" else flat.append(f"{prefix}{k}")
    walk(printed)
    assert sorted(flat) == sorted(_keys(RunConfig))


def test_reference_page_is_current():
    page = (REPO / "docs" / "config-reference.md").read_text()
    assert page == reference_markdown(RunConfig), (
        "docs/config-reference.md is stale: regenerate it with "
        "`.venv/bin/megatron-fipo config --reference > docs/config-reference.md`")
    assert page == cli("config", "--reference").stdout


def test_reference_page_has_every_key_with_type_default_and_comment():
    page = (REPO / "docs" / "config-reference.md").read_text()
    rows = {_cells(line)[0].strip("`"): _cells(line) for line in page.splitlines() if line.startswith("| `")}
    assert sorted(rows) == sorted(_keys(RunConfig))
    # A trailing comment, and a comment block above a field, are both its meaning.
    assert rows["data.train_path"] == ["`data.train_path`", "str", "`''`", "DAPO-Math-17k parquet/jsonl (task dapo_math)"]
    assert rows["parallel.virtual_pipeline_model_parallel_size"][1:] == [
        "int \\| None", "`None`", "Interleaved 1F1B: model chunks per pipeline rank (None = plain 1F1B)."]
    assert rows["rollout.sglang.weight_transport"][1:3] == ["'tensor' \\| 'distributed' \\| 'disk'", "`'tensor'`"]
    assert rows["optim.adam_eps"][1:3] == ["float", "`1e-08`"]
