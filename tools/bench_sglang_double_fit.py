"""The SGLang double's timing model against one real SGLang 0.5.23 server on this CPU.

Starts one real CPU server (.venv-sglang, tools/sglang_cpu/python) on a tiny random Qwen2 with
``--max-running-requests SLOTS``, measures its time per decode step against the running sequences
(the time of R sequences x T2 tokens minus R x T1 tokens, over T2 - T1), fits t_step = a + b * running
by least squares, then sends the same requests (one per sequence, long-tailed lengths drawn by the
double's length model, more sequences than slots so some queue) to the real server and to a double
timed with the fit, and prints both makespans and their ratio.

Each is measured twice: in wall seconds, and in CPU seconds of the server's scheduler process (where
SGLang runs the model). On a host other jobs load, wall time mostly measures the load; the
scheduler's CPU time is the work itself. The double's CPU-fit makespan is its simulated decode time.
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

import psutil
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


def scheduler_of(proc: subprocess.Popen) -> psutil.Process:
    for child in psutil.Process(proc.pid).children(recursive=True):
        if "sglang::scheduler" in " ".join(child.cmdline()):
            return child
    raise SystemExit("no sglang::scheduler process under the server")


def cpu_s(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return times.user + times.system


def timed(http: SGLangHTTP, prompts: list[list[int]], new_tokens: list[int],
          scheduler: psutil.Process | None = None) -> tuple[float, float]:
    """Wall seconds, and the scheduler's CPU seconds, until every sequence (one request each, sent at
    once) has its tokens."""
    def one(i: int) -> None:
        http.post("/generate", {"input_ids": prompts[i], "sampling_params": {
            "max_new_tokens": new_tokens[i], "ignore_eos": True, "temperature": 1.0}})

    start, cpu = time.perf_counter(), cpu_s(scheduler)
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        list(pool.map(one, range(len(prompts))))
    return time.perf_counter() - start, cpu_s(scheduler) - cpu


def step_time(http: SGLangHTTP, scheduler: psutil.Process, running: int, short: int, long: int,
              repeats: int) -> tuple[float, float]:
    """(wall, scheduler CPU) seconds per decode step with ``running`` sequences."""
    prompts = [[(7 * i + j) % 200 + 1 for j in range(8)] for i in range(running)]
    runs = {t: [timed(http, prompts, [t] * running, scheduler) for _ in range(repeats)] for t in (short, long)}
    return tuple((min(r[k] for r in runs[long]) - min(r[k] for r in runs[short])) / (long - short) for k in (0, 1))


def fit(points: dict[int, float]) -> tuple[float, float]:
    x = torch.tensor([[1.0, n] for n in points], dtype=torch.float64)
    y = torch.tensor(list(points.values()), dtype=torch.float64).unsqueeze(1)
    a, b = torch.linalg.lstsq(x, y).solution.squeeze(1).tolist()
    return a, b


def timing(slots: int, a: float, b: float, scale: float = 1.0) -> DecodeTiming:
    # A negative intercept (noise at one running) is clamped: a step takes some time.
    return DecodeTiming(max_running_requests=slots, step_s=max(a, 1e-6), step_per_seq_s=max(b, 0.0), time_scale=scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--running", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--short", type=int, default=8)
    parser.add_argument("--long", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=1, help="runs per point; the fastest counts")
    parser.add_argument("--rounds", type=int, default=2)
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
            scheduler = scheduler_of(proc)
            timed(http, [[1, 2, 3]], [4])  # warm-up
            shape = DecodeTiming(length_median=args.median, seed=1)
            prompts = [[(11 * i + j) % 200 + 1 for j in range(8)] for i in range(args.sequences)]
            lengths = [shape.length(p, 0, args.cap, ignore_eos=False) for p in prompts]
            rounds = []  # the host's load moves: each round fits and runs the workload back to back
            for r in range(args.rounds):
                steps = {n: step_time(http, scheduler, n, args.short, args.long, args.repeats) for n in args.running}
                fits = [fit({n: t[k] for n, t in steps.items()}) for k in (0, 1)]
                print(f"round {r} (load {os.getloadavg()[0]:.1f}): ms/step wall | scheduler CPU: "
                      + ", ".join(f"{n} running {1000 * w:.1f} | {1000 * c:.1f}" for n, (w, c) in steps.items()))
                for name, (a, b) in zip(("wall", "CPU"), fits):
                    print(f"  fit ({name}): t_step = {1000 * a:.2f} ms + {1000 * b:.3f} ms x running")
                rounds.append((fits, timed(http, prompts, lengths, scheduler)))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    print(f"workload: {args.sequences} requests at once, {sum(lengths)} tokens, longest {max(lengths)}, "
          f"{args.slots} slots")
    for r, ((wall_fit, cpu_fit), (real_wall, real_cpu)) in enumerate(rounds):
        double = SGLangDouble(timing=timing(args.slots, *wall_fit))
        try:
            simulated_wall, _ = timed(SGLangHTTP(double.url), prompts, lengths)
        finally:
            double.close()
        double = SGLangDouble(timing=timing(args.slots, *cpu_fit, scale=0.01))
        try:
            timed(SGLangHTTP(double.url), prompts, lengths)
            simulated_cpu = double.decoder.stats()["decode_s"]  # simulated seconds, whatever the scale
        finally:
            double.close()
        print(f"round {r}: wall: real {real_wall:.2f} s, double {simulated_wall:.2f} s, double / real = "
              f"{simulated_wall / real_wall:.2f}; scheduler CPU: real {real_cpu:.2f} s, double (CPU fit) "
              f"{simulated_cpu:.2f} s, double / real = {simulated_cpu / real_cpu:.2f}")


if __name__ == "__main__":
    sys.exit(main())
