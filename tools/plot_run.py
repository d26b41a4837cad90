"""Draw a run's reward, accuracy, response-length and influence-weight curves to PNG.

Usage: python tools/plot_run.py RUN_DIR [--out FILE]
"""

import argparse
from pathlib import Path

from megatron_fipo.plotting import plot_run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = plot_run(args.run_dir / "metrics.jsonl", args.out or args.run_dir / "curves.png")
    print(out)
