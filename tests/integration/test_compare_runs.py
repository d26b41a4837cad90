"""`megatron-fipo compare` end to end on two very short real runs (FIPO and DAPO, one seed, a shared
warm start): the report's table carries each run's own final eval, and the diagnostics come from
the runs' own losses."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = ["trainer.total_steps=2", "trainer.warmup_sft_steps=10", "trainer.eval_every=1", "trainer.save_every=1",
        "trainer.prompts_per_step=4", "trainer.minibatch_prompts=2", "trainer.gen_prompts_per_batch=8",
        "data.eval_size=4", "rollout.eval_n_samples=2", "trainer.tensorboard=false"]


def test_compare_two_very_short_runs(tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "megatron_fipo.cli", "compare", "examples/tiny_cpu.yaml", *TINY,
           "--algos", "fipo,dapo", "--seeds", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / "report.md").read_text()
    assert "| | fipo | dapo |" in text
    finals = [json.loads((out / f"{algo}-seed1" / "summary.json").read_text())["eval_accuracy_end"] for algo in ("fipo", "dapo")]
    row = next(line for line in text.splitlines() if line.startswith("| eval accuracy, final |"))
    assert row == "| eval accuracy, final | " + " | ".join(f"{a:.3f} ± 0.000 ({a:.3f}–{a:.3f})" for a in finals) + " |"
    # Both losses started from the one warm start: the same eval before RL.
    starts = {json.loads((out / f"{algo}-seed1" / "summary.json").read_text())["eval_accuracy_start"] for algo in ("fipo", "dapo")}
    assert len(starts) == 1
    assert (out / "compare_curves.png").stat().st_size > 10_000 and (out / "compare_diagnostics.png").stat().st_size > 10_000
