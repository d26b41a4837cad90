"""The training loop's SGLang calls, made by `megatron-fipo train` itself, against doubles of SGLang
0.5.23 that refuse exactly where SGLang does (megatron_fipo/testing_sglang.py, a test double at the
process boundary: memory release needs CUDA, so the real CPU server cannot take these calls)."""

import os
import subprocess
import sys
import threading
from pathlib import Path

from helpers.job_script import release_as_job_script

from megatron_fipo.testing_sglang import SGLangDouble

REPO = Path(__file__).resolve().parents[2]
REL, RES = "release_memory_occupation", "resume_memory_occupation"
ALL = ["weights", "kv_cache", "cuda_graph"]
REST = ["kv_cache", "cuda_graph"]


def test_two_steps_with_eval_and_an_unseen_restart_make_only_legal_calls(tmp_path):
    doubles = [SGLangDouble(vocab_size=64) for _ in range(2)]
    restarted = doubles[1]

    def restart_after_the_trainers_first_full_release(path: str) -> None:
        # The job script brings server 1 back while the trainer holds the GPU: a fresh process holding
        # every tag and its initial weights. Resuming a tag on it would kill it (KeyError).
        if path == f"/{REL}" and restarted.memory_calls.count((REL, ALL)) == 2 and not restarted.restarts:
            threading.Timer(0.0, restarted.restart).start()

    restarted.after_call = restart_after_the_trainers_first_full_release
    log = tmp_path / "train.log"
    try:
        # As the job script does before torchrun (launch/sbatch.py): every tag released, version stamped.
        release_as_job_script([d.url for d in doubles])
        cmd = [sys.executable, "-m", "megatron_fipo.cli", "train", "examples/tiny_cpu.yaml", f"run_dir={tmp_path}/run",
               "rollout.engine=sglang", f"rollout.sglang.urls=[{doubles[0].url},{doubles[1].url}]",
               "rollout.sglang.release_memory=true", "rollout.sglang.startup_timeout_s=60",
               "trainer.total_steps=2", "trainer.warmup_sft_steps=0", "trainer.dynamic_sampling=false",
               "trainer.eval_every=1", "trainer.save_every=10", "trainer.prompts_per_step=4",
               "trainer.minibatch_prompts=4", "trainer.gen_prompts_per_batch=4", "data.eval_size=4",
               "rollout.eval_n_samples=2", "rollout.n_samples=2"]
        with open(log, "w") as out:  # a file, not a pipe: torch's shm manager outlives the run holding its pipes
            proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"},
                                  stdout=out, stderr=subprocess.STDOUT, timeout=600)
    finally:
        for d in doubles:
            d.close()
    text = log.read_text()
    assert proc.returncode == 0, text[-5000:]
    assert [d.crash for d in doubles] == [None, None]
    # The job script's release, then the loop (loop.py): sync v0, eval; per step a rollout, training,
    # sync, eval. Generation phases (rollout, eval) give back everything when they end; a sync brings
    # back the weights only.
    script, after_sync, rollout = [(REL, ALL)], [(RES, REST), (REL, ALL)], [(RES, ALL), (REL, ALL)]
    sync = [(RES, ["weights"])]
    assert doubles[0].memory_calls == script + sync + after_sync + (rollout + sync + after_sync) * 2
    # Server 1 came back after eval's release: the next rollout found a fresh process and resumed nothing.
    assert restarted.restarts == 1
    assert restarted.memory_calls == script + sync + after_sync + [(REL, ALL)] + sync + after_sync + rollout + sync + after_sync
    assert "restarted since version 0 was stamped on it" in text
    for d in doubles:
        assert d.weight_version == "2" and d.session is None
    # Three syncs each; the restarted server's count spans both of its processes.
    assert [d.calls.count("/begin_weight_update") for d in doubles] == [3, 3]
