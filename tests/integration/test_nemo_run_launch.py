"""The tiny job through `megatron-fipo launch nemo-run`: run by NeMo-Run's LocalExecutor under torchrun,
and the SlurmExecutor's sbatch script for the 7B recipe rendered without a cluster."""

import json

from helpers.launch_cli import REPO, SHORT, cli, metric_steps


def test_tiny_job_through_nemo_run_local_executor(tmp_path):
    cli("launch", "nemo-run", "--executor", "local", "examples/tiny_cpu.yaml", f"run_dir={tmp_path}", *SHORT)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
    assert metric_steps(tmp_path) == [0, 1, 2]
    assert "total_steps: 2" in (tmp_path / "launch" / "config.yaml").read_text()


def test_slurm_executor_dry_run_renders_the_job(tmp_path):
    proc = cli("launch", "nemo-run", "--dry-run", "--executor", "slurm", "examples/qwen2.5-7b-fipo-h100.yaml",
               f"run_dir={tmp_path}", "launch.nodes=1", "rollout.sglang.num_servers=8", "launch.account=rl",
               "launch.partition=batch", "launch.sbatch_directives=[--exclusive,--qos=high]",
               env={"COLUMNS": "1000"})  # NeMo-Run prints through rich, which wraps at the terminal width
    text = proc.stdout + proc.stderr
    for directive in ("#SBATCH --account=rl", "#SBATCH --partition=batch", "#SBATCH --gpus-per-node=8",
                      "#SBATCH --nodes=1", "#SBATCH --exclusive", "#SBATCH --qos=high",
                      "#SBATCH --job-name=megatron-fipo-train",
                      "#SBATCH --signal=TERM@900"):  # the step itself: NeMo-Run's batch shell passes nothing on
        assert directive in text, directive
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=900" in text  # the recipe's launch.preempt_notice_s
    assert "export PATH=/" in text and "/.venv/bin:$PATH" in text  # NeMo-Run's torchrun is the venv's
    trainer = next(line for line in text.splitlines() if line.lstrip().startswith("srun --output"))
    assert f"--chdir {REPO}" in trainer.split("--wait=60")[1]  # the launch dir, after NeMo-Run's code dir
    assert "torchrun" in trainer and "--nnodes 1 --nproc-per-node 8" in trainer
    assert f"-m megatron_fipo.cli train {tmp_path}/launch/config.yaml" in trainer
    assert not (tmp_path / "launch").exists()  # a dry run writes nothing
