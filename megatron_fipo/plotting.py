"""Training curves to PNG: reward, accuracy, response length, influence weights."""

from __future__ import annotations

from pathlib import Path

from megatron_fipo.metrics import read_metrics

PANELS = [
    ("Reward", ["reward/mean"]),
    ("Accuracy", ["rollout/accuracy", "eval/accuracy"]),
    ("Response length", ["response_length/mean", "response_length/max"]),
    ("Influence weight", ["actor/influence_weight/mean", "actor/influence_weight_raw/mean", "actor/influence_weight/max"]),
]


def plot_run(metrics_path: str | Path, out_path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"megatron-fipo: {Path(metrics_path).parent.name}")
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
