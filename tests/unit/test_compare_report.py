"""Δlogp position diagnostics, and the compare command's plan and report (on synthetic runs whose
metric keys come from the real losses, so a renamed metric breaks the report here)."""

import json
import math

import pytest
import torch

from megatron_fipo.algo.fipo_config import FIPOConfig
from megatron_fipo.algo.policy_loss import dapo_policy_loss, fipo_policy_loss
from megatron_fipo.algo.position_diagnostics import POSITION_BUCKETS, position_bucket, position_metrics
from megatron_fipo.compare import check_overrides, command, plan_runs, run_all
from megatron_fipo.compare_report import Run, spread, write_report
from megatron_fipo.config_base import ConfigError
from megatron_fipo.metrics import merge_metrics


def test_position_buckets_are_log2():
    assert position_bucket(torch.tensor([0, 1, 2, 3, 4, 7, 8, 100, 10 ** 6])).tolist() == [0, 1, 2, 2, 3, 3, 4, 7, 15]


def test_position_metrics_on_hand_computed_tokens():
    delta = torch.tensor([[0.5, -0.2, 0.05, 0.0, 0.3], [0.02, -0.001, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    influence = torch.tensor([[1.2, 1.1, 1.0, 1.0, 1.05], [1.0, 1.0, 9.0, 9.0, 9.0]])
    m = position_metrics(delta, influence, valid)  # 7 valid tokens
    assert m["diag/abs_delta_logp_frac_gt_0.1"] == pytest.approx(3 / 7)  # 0.5, 0.2, 0.3
    assert m["diag/abs_delta_logp_frac_gt_0.01"] == pytest.approx(5 / 7)  # and 0.05, 0.02
    assert [m[f"diag/tokens_b{k:02d}"] * 7 for k in range(4)] == pytest.approx([2, 2, 2, 1])
    assert m["diag/abs_delta_logp_b00"] * 7 == pytest.approx(0.52)
    assert m["diag/abs_delta_logp_b01"] * 7 == pytest.approx(0.201)
    assert m["diag/delta_logp_b01"] * 7 == pytest.approx(-0.201)
    assert m["diag/abs_delta_logp_b02"] * 7 == pytest.approx(0.05)  # positions 2, 3 of row 0
    assert m["diag/influence_b03"] * 7 == pytest.approx(1.05)  # the padding's 9.0 counts nowhere
    assert len([k for k in m if k.startswith("diag/tokens_b")]) == POSITION_BUCKETS


def test_merged_densities_give_the_exact_bucket_mean_over_micro_batches():
    g = torch.Generator().manual_seed(0)
    parts = []
    for rows, width in ((3, 6), (2, 20)):
        delta = torch.randn(rows, width, generator=g)
        valid = torch.rand(rows, width, generator=g) > 0.3
        parts.append((delta, valid))
    records = [(float(v.sum()), position_metrics(d, torch.ones_like(d), v)) for d, v in parts]
    merged = merge_metrics(records)
    # bucket 3 = positions 4..7, pooled over both micro-batches
    pooled = torch.cat([d[:, 4:8][v[:, 4:8]] for d, v in parts]).abs()
    assert merged["diag/abs_delta_logp_b03"] / merged["diag/tokens_b03"] == pytest.approx(pooled.double().mean().item(), rel=1e-6)


def _loss_metrics(algo: str, shift: float) -> dict:
    """One mini-batch's metrics from the real loss: the keys the loop writes under actor/."""
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(4, 12, generator=g)
    logp = old + shift * torch.randn(4, 12, generator=g)
    mask = torch.ones(4, 12)
    mask[2:, 8:] = 0
    loss = fipo_policy_loss if algo == "fipo" else dapo_policy_loss
    _, m = loss(logp, old, torch.tensor([1.0, -1.0, 0.5, -0.5]), mask, FIPOConfig())
    return {f"actor/{k}": v for k, v in m.items()}


def _write_run(run_dir, algo, accs, lengths, shift):
    run_dir.mkdir(parents=True)
    rows = [{"step": 0, "eval/accuracy": accs[0], "eval/response_length": lengths[0]}]
    for step, (acc, length) in enumerate(zip(accs[1:], lengths[1:]), start=1):
        rows.append({"step": step, "eval/accuracy": acc, "eval/response_length": length, "rollout/accuracy": acc,
                     "response_length/mean": length, **_loss_metrics(algo, shift)})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "summary.json").write_text(json.dumps({"wall_seconds": 10.0 * len(rows)}))


def test_report_table_and_figures(tmp_path):
    runs = []
    for algo, seed, accs, lengths, shift in (("fipo", 1, [0.1, 0.3, 0.5], [10, 20, 30], 0.2),
                                             ("fipo", 2, [0.1, 0.2, 0.3], [10, 15, 20], 0.2),
                                             ("dapo", 1, [0.1, 0.2, 0.2], [10, 10, 12], 0.0)):
        _write_run(tmp_path / f"{algo}-seed{seed}", algo, accs, lengths, shift)
        runs.append((algo, seed, tmp_path / f"{algo}-seed{seed}"))
    report = write_report(runs, tmp_path / "out")
    text = report.read_text()
    assert (tmp_path / "out" / "compare_curves.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "compare_diagnostics.png").stat().st_size > 10_000
    assert "| | fipo | dapo |" in text
    # final eval accuracy: fipo 0.5 and 0.3 -> mean 0.4, sd 0.1414; dapo one seed
    assert "| eval accuracy, final | 0.400 ± 0.141 (0.300–0.500) | 0.200 ± 0.000 (0.200–0.200) |" in text
    assert "| eval response length, final | 25.0 ± 7.1 (20.0–30.0) | 12.0 ± 0.0 (12.0–12.0) |" in text
    # DAPO with logp == old_logp moved nothing; its influence weights are exp(0) = 1
    assert "| fraction of tokens with |Δlogp| > 0.01 |" in text
    dapo = Run("dapo", 1, tmp_path / "dapo-seed1")
    assert dapo.bucket_means("abs_delta_logp")[:4] == [0.0, 0.0, 0.0, 0.0]
    assert dapo.bucket_means("influence")[:4] == pytest.approx([1.0] * 4)
    assert math.isnan(dapo.bucket_means("tokens")[5])  # no response reaches position 16
    fipo = Run("fipo", 1, tmp_path / "fipo-seed1")
    assert fipo.bucket_means("abs_delta_logp")[3] > 0.05


def test_spread_formats_mean_sd_and_range():
    assert spread([1.0, 2.0, 3.0]) == "2.000 ± 1.000 (1.000–3.000)"
    assert spread([math.nan]) == "n/a"


def test_plan_resume_and_commands(tmp_path, capsys):
    specs = plan_runs(["fipo", "dapo"], 2, 5, tmp_path)
    assert [s.name for s in specs] == ["fipo-seed5", "dapo-seed5", "fipo-seed6", "dapo-seed6"]
    cmd = command(specs[1], "c.yaml", ["trainer.total_steps=3"], "slurm")
    assert cmd[3:] == ["launch", "slurm", "c.yaml", "trainer.total_steps=3", "actor.loss=dapo", "trainer.seed=5",
                       "actor.seed=5", f"run_dir={tmp_path / 'dapo-seed5'}"]
    specs[0].run_dir.mkdir()
    (specs[0].run_dir / "summary.json").write_text("{}")
    assert run_all(specs, "c.yaml", [], "local", dry_run=True) == []
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("compare: fipo-seed5: done") and len(out) == 4 and "train c.yaml" in out[1]
    with pytest.raises(ConfigError, match="--algos"):
        plan_runs(["ppo"], 1, 1, tmp_path)
    with pytest.raises(ConfigError, match="compare sets actor.loss"):
        check_overrides(["actor.loss=dapo"])


def test_shared_warm_start_runs_once_per_seed_and_the_losses_load_it(tmp_path, capsys):
    specs = plan_runs(["fipo", "dapo"], 1, 3, tmp_path, shared_warm_start=True)
    assert [s.name for s in specs] == ["warm-seed3", "fipo-seed3", "dapo-seed3"]
    run_all(specs, "c.yaml", ["x=1"], "local", dry_run=True, trained_tokenizer=True)
    warm, fipo, _ = (line.split(" c.yaml ")[1].split() for line in capsys.readouterr().out.splitlines())
    assert warm == ["x=1", "trainer.total_steps=0", "trainer.seed=3", "actor.seed=3", f"run_dir={tmp_path / 'warm-seed3'}"]
    assert fipo == ["x=1", f"actor.load_megatron={tmp_path / 'warm-seed3' / 'checkpoints'}", "actor.load_hf=",
                    "trainer.warmup_sft_steps=0", f"data.tokenizer_path={tmp_path / 'warm-seed3' / 'tokenizer.model'}",
                    "actor.loss=fipo", "trainer.seed=3", "actor.seed=3", f"run_dir={tmp_path / 'fipo-seed3'}"]
