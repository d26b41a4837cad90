"""Per-step metrics to a jsonl file, TensorBoard and (optionally) Weights & Biases."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, wandb_project: str = "", config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb_dir = Path(run_dir) / "tensorboard" if tensorboard else None
        self.tb = None  # opened at the first point, once truncate_after said where the run goes on
        self.purge_step: int | None = None
        self.wandb = None
        if wandb_project:
            import wandb  # optional dependency, only when asked for

            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config or {}, resume="allow")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb_dir is not None:
            if self.tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.tb_dir), purge_step=self.purge_step)
            for key, value in clean.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(clean, step=step)

    def truncate_after(self, step: int) -> None:
        """Drop points logged after ``step`` (a resumed run replays them).

        metrics.jsonl is rewritten; TensorBoard's event files are append-only, so the new one starts
        with a purge marker (SessionLog START at step + 1) that makes readers drop the earlier files'
        points from that step on, whatever their tags.
        """
        self.purge_step = step + 1
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def merge_metrics(records: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """Combine per-micro-batch metrics: token-weighted means, max of maxima, min of minima, sums of counts."""
    total = sum(w for w, _ in records)
    if not records or total == 0:
        return {}
    out = {}
    for key in records[0][1]:
        values = [m[key] for _, m in records]
        if key.endswith(("/max", "_max")):
            out[key] = max(values)
        elif key.endswith(("/min", "_min")):
            out[key] = min(values)
        elif key in ("seqs_filtered", "num_tokens", "num_tokens_kept"):
            out[key] = sum(values)
        else:
            out[key] = sum(w * m[key] for w, m in records) / total
    return out
