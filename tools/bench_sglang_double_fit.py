"""The SGLang double's timing model against one real SGLang 0.5.23 server on this CPU.

Starts one real CPU server (.venv-sglang, tools/sglang_cpu/python) on a tiny random Qwen2 with
``--max-running-requests SLOTS``, measures its time per decode step against the running sequences
(the time of R sequences x T2 tokens minus R x T1 tokens, over T2 - T1), fits t_step = a + b * running
by least squares, then sends the same requests (one per sequence, long-tailed lengths drawn by the
double's length model, more sequences than slots so some queue) to the real server and to a double
timed with the fit, and prints both makespans and their ratio.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from megatron_fipo.rollout.sglang_http import SGLangHTTP
from megatron_fipo.testing import make_hf_checkpoint
from megatron_fipo.testing_sglang import SGLangDouble
from megatron_fipo.testing_sglang_timing import DecodeTiming

REPO = Path(__file__).resolve().parents[1]
CPU_ARGS = ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph", "--dtype", "float32",
            "--max-total-tokens", "32768", "--skip-server-warmup", "--sleep-on-idle", "--skip-tokenizer-init",
            "--mem-fraction-static", "0.3"]


def start_server(model: Path, port: int, slots: int, log: Path) -> subprocess.Popen:
    cmd = [str(REPO / "tools" / "sglang_cpu" / "python"), "-m", "sglang.launch_server", "--model-path", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--max-running-requests", str(slots), *CPU_ARGS]
    with open(log, "wb") as out:  # its own session: the stop below ends the scheduler child too
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def timed(http: SGLangHTTP, prompts: list[list[int]], new_tokens: list[int]) -> float:
    """Wall seconds until every sequence (one request each, sent at once) has its tokens."""
    def one(i: int) -> None:
        http.post("/generate", {"input_ids": prompts[i], "sampling_params": {
            "max_new_tokens": new_tokens[i], "ignore_eos": True, "temperature": 1.0}})

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        list(pool.map(one, range(len(prompts))))
    return time.perf_counter() - start


def step_time(http: SGLangHTTP, running: int, short: int, long: int, repeats: int) -> float:
    prompts = [[(7 * i + j) % 200 + 1 for j in range(8)] for i in range(running)]
    best = {t: min(timed(http, prompts, [t] * running) for _ in range(repeats)) for t in (short, long)}
    return (best[long] - best[short]) / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--running", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--short", type=int, default=8)
    parser.add_argument("--long", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=48, help="makespan workload: sequences (> slots)")
    parser.add_argument("--median", type=float, default=24.0, help="makespan workload: median length")
    parser.add_argument("--cap", type=int, default=96, help="makespan workload: max_new_tokens")
    parser.add_argument("--port", type=int, default=31791)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        model = make_hf_checkpoint(Path(d) / "hf", max_position_embeddings=2048)
        proc = start_server(model, args.port, args.slots, Path(d) / "server.log")
        try:
            http = SGLangHTTP(f"http://127.0.0.1:{args.port}", timeout_s=600)
            deadline = time.monotonic() + 600
            while not http.healthy():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the SGLang server did not start:\n" + (Path(d) / "server.log").read_text()[-3000:])
                time.sleep(2)
            info = http.get("/get_server_info")
            print(f"real server: max_running_requests={info['max_running_requests']}, effective "
                  f"{info['internal_states'][0]['effective_max_running_requests_per_dp']}, cpu threads "
                  f"{os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
            timed(http, [[1, 2, 3]], [4])  # warm-up
            steps = {r: step_time(http, r, args.short, args.long, args.repeats) for r in args.running}
            x = torch.tensor([[1.0, r] for r in steps], dtype=torch.float64)
            y = torch.tensor(list(steps.values()), dtype=torch.float64)
            a, b = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1).tolist()
            for r, t in steps.items():
                print(f"  running {r:3d}: {1000 * t:7.2f} ms/step measured, fit {1000 * (a + b * r):7.2f}")
            print(f"fit: t_step = {1000 * a:.2f} ms + {1000 * b:.3f} ms x running")
            shape = DecodeTiming(length_median=args.median, seed=1)
            prompts = [[(11 * i + j) % 200 + 1 for j in range(8)] for i in range(args.sequences)]
            lengths = [shape.length(p, 0, args.cap, ignore_eos=False) for p in prompts]
            real = timed(http, prompts, lengths)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    double = SGLangDouble(timing=DecodeTiming(max_running_requests=args.slots, step_s=max(a, 1e-6),
                                              step_per_seq_s=max(b, 0.0)))
    try:
        simulated = timed(SGLangHTTP(double.url), prompts, lengths)
    finally:
        double.close()
    print(f"same {args.sequences} requests ({sum(lengths)} tokens, longest {max(lengths)}, {args.slots} slots): "
          f"real {real:.2f} s, double {simulated:.2f} s, double / real = {simulated / real:.2f}")


if __name__ == "__main__":
    sys.exit(main())
