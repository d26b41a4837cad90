"""Checkpoint conversion before any weight moves: the dry-run mapping and the name/shape checks.

Both run in-process, from config.json and the safetensors headers alone; no process group starts.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_fipo.cli import main
from megatron_fipo.config import ActorConfig
from megatron_fipo.config_base import ConfigError
from megatron_fipo.testing import make_hf_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf") / "untied", seed=0)


def test_dry_run_prints_the_mapping(hf_dir):
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--to", "megatron", str(hf_dir), "--dry-run",
                           "--tp", "2", "--pp", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[2:]
            if line.startswith(("decoder", "embedding", "output"))}
    # name, PP stage, full shape, TP=2 shard, split, HF name(s) and shapes
    assert " ".join(rows["decoder.layers.0.self_attention.linear_qkv.weight"]) == (
        "decoder.layers.0.self_attention.linear_qkv.weight 0 [128, 64] [64, 64] dim 0 by query group "
        "model.layers.0.self_attn.{q,k,v}_proj.weight [64, 64] [32, 64] [32, 64]")
    assert " ".join(rows["decoder.layers.3.self_attention.linear_qkv.bias"][1:]) == (
        "1 [128] [64] dim 0 by query group model.layers.3.self_attn.{q,k,v}_proj.bias [64] [32] [32]")
    assert "model.layers.2.mlp.{gate,up}_proj.weight" in rows["decoder.layers.2.mlp.linear_fc1.weight"]
    assert rows["decoder.layers.2.self_attention.linear_proj.weight"][1:6] == ["1", "[64,", "64]", "[64,", "32]"]
    assert rows["output_layer.weight"][-3:] == ["lm_head.weight", "[256,", "64]"]
    assert len(rows) == 1 + 4 * 7 + 2  # embedding, 7 per layer (local spec, QKV bias), final norm, output layer
    assert "31 Megatron parameters <-> 51 HF tensors" in proc.stdout


def test_dry_run_of_tied_embeddings(tmp_path, capsys):
    tied = make_hf_checkpoint(tmp_path / "tied", seed=1, tie_word_embeddings=True)
    assert main(["convert", "--to", "megatron", str(tied), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "output_layer.weight" not in out.split("tied embeddings:")[0]
    assert "no lm_head.weight" in out


def _tamper(src: Path, dst: Path) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    tensors["model.layers.2.mlp.up_proj.weights"] = torch.zeros(128, 64)  # a misspelled name
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_a_mismatched_checkpoint_fails_naming_both_sides(hf_dir, tmp_path, capsys):
    bad = _tamper(hf_dir, tmp_path / "bad")
    assert main(["convert", "--to", "megatron", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "3 tensor(s) do not fit the model of config.json" in err
    assert ("missing HF tensor model.layers.2.mlp.up_proj.weight [128, 64], needed by Megatron "
            "decoder.layers.2.mlp.linear_fc1.weight [256, 64]") in err
    assert ("shape mismatch: HF model.layers.1.self_attn.k_proj.weight is [48, 64], Megatron "
            "decoder.layers.1.self_attention.linear_qkv.weight [128, 64] needs it [32, 64]") in err
    assert "unexpected HF tensor model.layers.2.mlp.up_proj.weights [128, 64]: no Megatron parameter maps to it" in err
    assert not (tmp_path / "out").exists()
    # The dry run checks the same way.
    assert main(["convert", "--to", "megatron", str(bad), "--dry-run"]) == 2


def test_conversion_needs_the_hf_config_and_an_empty_target(hf_dir, tmp_path, capsys):
    ckpt = tmp_path / "mcore"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text("{}")
    assert main(["convert", "--to", "hf", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"no config.json in {ckpt / 'hf_config'}; for a checkpoint without hf_config/ pass --hf-config" in err
    assert main(["convert", "--to", "megatron", str(hf_dir), str(ckpt)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_load_hf_and_load_megatron_exclude_each_other():
    with pytest.raises(ConfigError, match="actor.load_hf and actor.load_megatron are both set"):
        ActorConfig(load_hf="a", load_megatron="b")
