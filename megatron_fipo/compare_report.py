"""The side-by-side report of ``megatron-fipo compare``: curves with seed bands, the Δlogp
diagnostics by token position, and a table of means and spreads, as PNG and markdown."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from megatron_fipo.algo.position_diagnostics import DELTA_LOGP_THRESHOLDS, POSITION_BUCKETS
from megatron_fipo.metrics import read_metrics

CURVES = [("Eval accuracy", "eval/accuracy"), ("Eval response length (tokens)", "eval/response_length"),
          ("Rollout accuracy", "rollout/accuracy"), ("Rollout response length (tokens)", "response_length/mean")]
COLORS = {"fipo": "tab:red", "dapo": "tab:blue"}
DIAG = "actor/diag/"  # the loop files the loss's metrics under actor/


class Run:
    def __init__(self, algo: str, seed: int, run_dir: str | Path):
        self.algo, self.seed, self.run_dir = algo, seed, Path(run_dir)
        self.rows = read_metrics(self.run_dir / "metrics.jsonl")
        summary = self.run_dir / "summary.json"
        self.summary = json.loads(summary.read_text()) if summary.is_file() else {}

    def series(self, key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in self.rows if key in r}

    def first(self, key: str) -> float:
        s = self.series(key)
        return s[min(s)] if s else math.nan

    def last(self, key: str) -> float:
        s = self.series(key)
        return s[max(s)] if s else math.nan

    def step_mean(self, key: str) -> float:
        """Mean over the run's RL steps."""
        values = list(self.series(key).values())
        return sum(values) / len(values) if values else math.nan

    def bucket_means(self, name: str) -> list[float]:
        """``diag/<name>`` per token at each position bucket, averaged over the RL steps where the bucket
        has tokens (a step's value is its bucket sum over its bucket tokens); nan where none has."""
        out = []
        for k in range(POSITION_BUCKETS):
            num, den = f"{DIAG}{name}_b{k:02d}", f"{DIAG}tokens_b{k:02d}"
            values = [r[num] / r[den] for r in self.rows if r.get(den, 0) > 0 and num in r]
            out.append(sum(values) / len(values) if values else math.nan)
        return out


def bucket_label(k: int) -> str:
    if k == 0:
        return "0"
    lo, hi = 2 ** (k - 1), 2 ** k - 1
    return f"{lo}+" if k == POSITION_BUCKETS - 1 else (str(lo) if lo == hi else f"{lo}-{hi}")


def spread(values: list[float]) -> str:
    """mean ± sd (min-max) over seeds, ignoring missing values."""
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return "n/a"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    fmt = (lambda x: f"{x:.3f}") if max(abs(x) for x in v) < 10 else (lambda x: f"{x:.1f}")
    return f"{fmt(statistics.mean(v))} ± {fmt(sd)} ({fmt(min(v))}–{fmt(max(v))})"


def _band(ax, runs: list[Run], key: str, color: str, label: str) -> None:
    """Mean over seeds at the steps every seed logged, min-max band."""
    series = [r.series(key) for r in runs]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not steps:
        return
    values = [[s[t] for s in series] for t in steps]
    ax.plot(steps, [sum(v) / len(v) for v in values], color=color, label=f"{label} (n={len(runs)})")
    ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.2, linewidth=0)


def _save(fig, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _by_algo(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(r.algo, []).append(r)
    return out


def _plot_curves(groups: dict[str, list[Run]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, key) in zip(axes.flat, CURVES):
        for algo, runs in groups.items():
            _band(ax, runs, key, COLORS.get(algo, "tab:gray"), algo)
        ax.set(title=title, xlabel="RL step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    _save(fig, "FIPO vs DAPO: mean over seeds, band = min-max", path)


def _plot_diagnostics(groups: dict[str, list[Run]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    used = [k for k in range(POSITION_BUCKETS) if any(not math.isnan(r.bucket_means("tokens")[k])
                                                      for runs in groups.values() for r in runs)]
    for ax, (name, title) in zip(axes.flat[:3], [("abs_delta_logp", "|Δlogp| per token, by position"),
                                                  ("delta_logp", "Δlogp per token (signed), by position"),
                                                  ("influence", "influence weight f_t by position (applied under fipo; "
                                                   "what fipo would apply under dapo)")]):
        for algo, runs in groups.items():
            per_run = [[r.bucket_means(name)[k] for k in used] for r in runs]
            mean = [statistics.mean([v for v in col if not math.isnan(v)] or [math.nan]) for col in zip(*per_run)]
            ax.plot(range(len(used)), mean, marker="o", color=COLORS.get(algo, "tab:gray"), label=algo)
            for row in per_run:
                ax.plot(range(len(used)), row, color=COLORS.get(algo, "tab:gray"), alpha=0.25, linewidth=0.8)
        ax.set_xticks(range(len(used)), [bucket_label(k) for k in used], fontsize=7)
        ax.set(title=title, xlabel="response token position (log2 buckets)")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    ax = axes.flat[3]
    for algo, runs in groups.items():
        for t, style in zip(DELTA_LOGP_THRESHOLDS, ("-", "--")):
            _band(ax, runs, f"{DIAG}abs_delta_logp_frac_gt_{t:g}", COLORS.get(algo, "tab:gray"), f"{algo} |Δlogp|>{t:g}")
            ax.lines[-1].set_linestyle(style)
    ax.set(title="fraction of tokens with |Δlogp| above a threshold", xlabel="RL step")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    _save(fig, "Δlogp = log π_θ − log π_old over the step's mini-batch updates; thin lines: single seeds", path)


TABLE = [  # (row, how a run gives it)
    ("eval accuracy after warm start", lambda r: r.first("eval/accuracy")),
    ("eval accuracy, final", lambda r: r.last("eval/accuracy")),
    ("eval accuracy, best", lambda r: max(r.series("eval/accuracy").values(), default=math.nan)),
    ("eval response length after warm start", lambda r: r.first("eval/response_length")),
    ("eval response length, final", lambda r: r.last("eval/response_length")),
    ("rollout response length, final step", lambda r: r.last("response_length/mean")),
    ("mean |Δlogp| per token", lambda r: r.step_mean(f"{DIAG}abs_delta_logp_mean")),
    *[(f"fraction of tokens with |Δlogp| > {t:g}", lambda r, t=t: r.step_mean(f"{DIAG}abs_delta_logp_frac_gt_{t:g}"))
      for t in DELTA_LOGP_THRESHOLDS],
    ("mean influence weight f_t", lambda r: r.step_mean(f"{DIAG}influence_mean")),
    ("wall seconds", lambda r: r.summary.get("wall_seconds", math.nan)),
]


def _derived(run: Run) -> None:
    """Whole-response means from the bucket densities, as extra per-step keys."""
    for row in run.rows:
        tokens = sum(row.get(f"{DIAG}tokens_b{k:02d}", 0.0) for k in range(POSITION_BUCKETS))
        if tokens > 0:
            for name in ("abs_delta_logp", "influence"):
                row[f"{DIAG}{name}_mean"] = sum(row[f"{DIAG}{name}_b{k:02d}"] for k in range(POSITION_BUCKETS)) / tokens


def markdown(groups: dict[str, list[Run]], curves: str, diagnostics: str) -> str:
    algos = list(groups)
    lines = ["| | " + " | ".join(algos) + " |", "|---|" + "---|" * len(algos)]
    for label, get in TABLE:
        lines.append(f"| {label} | " + " | ".join(spread([get(r) for r in groups[a]]) for a in algos) + " |")
    runs = [r for a in algos for r in groups[a]]
    per_run = ["| run | eval acc start → final | eval length start → final | wall s |", "|---|---|---|---|"]
    for r in runs:
        per_run.append(f"| {r.algo} seed {r.seed} | {r.first('eval/accuracy'):.3f} → {r.last('eval/accuracy'):.3f} | "
                       f"{r.first('eval/response_length'):.1f} → {r.last('eval/response_length'):.1f} | "
                       f"{r.summary.get('wall_seconds', math.nan):.0f} |")
    return "\n".join([
        "# FIPO vs DAPO: side by side", "",
        "Cells: mean ± sd (min–max) over seeds. Δlogp = log π_θ − log π_old per response token, over the "
        "step's mini-batch updates.", "",
        *lines, "", f"![curves]({curves})", "", f"![diagnostics]({diagnostics})", "", "## Runs", "", *per_run, "",
    ])


def write_report(runs: list[tuple[str, int, str | Path]], out: str | Path) -> Path:
    """report.md, compare_curves.png and compare_diagnostics.png under ``out``; returns the markdown's path."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = [Run(*spec) for spec in runs]
    for run in loaded:
        _derived(run)
    groups = _by_algo(loaded)
    _plot_curves(groups, out / "compare_curves.png")
    _plot_diagnostics(groups, out / "compare_diagnostics.png")
    path = out / "report.md"
    path.write_text(markdown(groups, "compare_curves.png", "compare_diagnostics.png"))
    return path
