"""Which form a chain_arithmetic policy answers in, and how often each form is right.

    python tools/chain_forms.py RUN_DIR [RUN_DIR ...] [--samples 8]

For each run, at its newest checkpoint (a compare run's warm start: the policy RL starts from), the
eval problems are sampled as the run's eval samples them; prints the share of worked / short answers
and the accuracy of each. Output: one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_fipo.cli import _eval_defaults, _load, _prepare  # noqa: E402
from megatron_fipo.data.chain_arithmetic import response_form  # noqa: E402


def forms(run_dir: str, samples: int, out_dir: str) -> dict:
    from megatron_fipo.loop import _trainer

    overrides = _eval_defaults(run_dir, [f"run_dir={out_dir}", f"rollout.eval_n_samples={samples}",
                                         "trainer.tensorboard=false"])
    cfg = _load(run_dir, overrides)
    data = _prepare(cfg)
    with _trainer(cfg, data) as trainer:
        trainer._sync_weights(version=0)
        problems = data.eval_problems
        groups = trainer.engine.generate([data.prompt_ids(p) for p in problems], samples,
                                         trainer._sampling(eval_mode=True), seed=cfg.trainer.seed)
        correct = trainer.scorer.score(groups, problems).correct
    tally: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        for j, sample in enumerate(group):
            n_right = tally.setdefault(response_form(data.tokenizer.decode(sample.response_ids)), [0, 0])
            n_right[0] += 1
            n_right[1] += int(correct[i, j])
    total = sum(n for n, _ in tally.values())
    return {"run": run_dir, "weights": cfg.actor.load_megatron, "samples": total,
            **{f"{form}_share": n / total for form, (n, _) in tally.items()},
            **{f"{form}_accuracy": right / n for form, (n, right) in tally.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--samples", type=int, default=8, help="samples per eval problem")
    args = parser.parse_args()
    for run in args.runs:
        print(json.dumps(forms(run, args.samples, str(Path(run) / "forms"))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
