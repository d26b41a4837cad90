"""The sbatch script rendered for the recipes, and launch config errors (no Slurm needed)."""

import subprocess

import pytest

from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import ConfigError, load_config
from megatron_fipo.launch.sbatch import render_sbatch
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.plan.layouts import config_estimate, workload_from_config
from megatron_fipo.plan.memory import build_ledger, layout_from_config
from megatron_fipo.plan.step_time import default_efficiency, device
from megatron_fipo.validation import validate_launch

RECIPE_32B = "examples/qwen2.5-32b-fipo-h100.yaml"
# The 32B on one node: at DP=1 its whole optimizer state sits on each GPU, which 80 GB H100s cannot
# hold (the memory ledger refuses it); 180 GB B200s can.
ONE_NODE = ("launch.nodes=1", "launch.gpu_type=b200")


def _cfg(*overrides: str, recipe: str = RECIPE_32B) -> RunConfig:
    base = ["run_dir=/runs/x", "launch.partition=batch", "launch.account=rl"]
    return load_config(RunConfig, recipe, [*base, *overrides])


def _script(*overrides: str, recipe: str = RECIPE_32B) -> str:
    cfg = _cfg(*overrides, recipe=recipe)
    validate_launch(cfg)
    return render_sbatch(cfg, "/runs/x/launch/config.yaml", "/repo")


def _line(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def _dedent(text: str) -> str:
    return "\n".join(line.strip() for line in text.splitlines())


def test_32b_on_16_nodes_colocated():
    text = _script()
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert directives == ["#SBATCH --job-name=megatron-fipo", "#SBATCH --nodes=16", "#SBATCH --ntasks-per-node=1",
                          "#SBATCH --time=24:00:00", "#SBATCH --output=/runs/x/launch/slurm-%j.out",
                          "#SBATCH --open-mode=append", "#SBATCH --signal=B:TERM@1200", "#SBATCH --gpus-per-node=8",
                          "#SBATCH --partition=batch", "#SBATCH --account=rl"]
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=1200" in text.splitlines()
    # Two TP=4 SGLang servers on each of the 16 nodes, on GPUs 0-3 and 4-7, bound to the node's name.
    assert 'serve_nodes=("${nodes[@]:0}")' in text and "$(seq 0 1)" in text
    # Released servers answer /health without running a request on the memory they gave back.
    server = _line(_dedent(text), "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false srun --ntasks-per-node=1 "
                                  "--gpus-per-node=8 --overlap --nodes=1")
    assert "--tp-size 4" in server and "--base-gpu-id $((j * 4))" in server and "--host $node" in server
    assert "--model-path /models/Qwen2.5-32B" in server
    # SGLang's own venv, not the trainer's (.venv/bin/python, which has no SGLang).
    assert '-w "$node" .venv-sglang/bin/python -m sglang.launch_server' in server
    assert "--enable-memory-saver" in server  # colocated: released while the trainer runs
    # A server that exits is started again, for as long as the job runs.
    lines = _dedent(text).splitlines()
    start = lines.index("while true; do")
    assert lines[start + 1] == server and lines[start + 4:start + 6] == ["sleep 10", "done &"]
    assert "starting it again" in lines[start + 3]
    trainer = _line(text, "srun ")
    assert trainer.startswith('srun --ntasks-per-node=1 --gpus-per-node=8 --overlap --job-name=trainer --nodes=16 '
                              '-w "$train_nodes" bash -c ".venv/bin/python -m torch.distributed.run ')
    assert ("--nnodes 16 --nproc-per-node 8 --node-rank \\$SLURM_NODEID --master-addr $head --master-port 29500 "
            "-m megatron_fipo.cli train /runs/x/launch/config.yaml") in trainer
    # Colocated: each node's first rank loads its own node's servers by CUDA-IPC handles (the
    # recipe's tensor transport); no broadcast group, so no weight_transport or host override.
    assert trainer.endswith('train /runs/x/launch/config.yaml \\"rollout.sglang.urls=$urls_yaml\\"" &')
    assert "head=${nodes[0]}" in text and 'nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))' in text
    assert "trap stop_trainer TERM" in text and "scancel --signal=TERM" in text
    assert "scontrol requeue" not in text and text.endswith("exit $status\n")


def test_colocated_servers_release_every_tag_before_the_trainer_starts():
    """Start-up order: servers (background restart loops), each healthy and released, then torchrun:
    the trainer's 27.6 GB never meets SGLang's static pool (0.67 x 80 GB) on a GPU."""
    lines = _dedent(_script("rollout.sglang.api_key=s3cret")).splitlines()
    loops_started = lines.index('urls_yaml="[$(IFS=,; echo "${urls[*]}")]"')
    define, call = lines.index("release_server() {"), lines.index(
        'for url in "${urls[@]}"; do release_server "$url" & releases+=($!); done')
    joined = lines.index('for pid in "${releases[@]}"; do wait "$pid"; done  # set -e: one that failed ends the job')
    trainer = next(i for i, line in enumerate(lines) if line.startswith("srun ") and "--job-name=trainer" in line)
    assert loops_started < define < call < joined < trainer
    body = "\n".join(lines[define:call])
    auth = "curl -sf -H 'Authorization: Bearer s3cret'"
    # Health, then SGLang's three tags by name (never "all": sglang_memory.py), waited for up to the
    # server start-up timeout; then the version that tells the trainer they start released.
    assert f'until {auth} -m 60 "$url/health"' in body and "deadline=$((SECONDS + 600))" in body
    tags = """'{"tags": ["weights", "kv_cache", "cuda_graph"]}'"""
    assert f"""{auth} -m 600 -H 'Content-Type: application/json' -d {tags} "$url/release_memory_occupation" """ in body
    stamp = """'{"new_version": "-1", "abort_all_requests": false}'"""
    assert f'-d {stamp} "$url/update_weight_version"' in body
    assert "rollout.sglang.startup_timeout_s=600.0 s; see its sglang-*.log in /runs/x/launch" in body
    # The restart loop brings a server back holding every tag: not released there (the trainer does it).
    loop = lines[lines.index("while true; do"):lines.index("done &") + 1]
    assert not any("release_memory_occupation" in line for line in loop)


def _drain_seconds(cfg: RunConfig) -> tuple[float, float]:
    """From SIGTERM to a written checkpoint at worst: the step's old-logprob pass and every mini-batch
    (the planner's estimates), then a checkpoint (the ledger's bytes per GPU, a node's worth over the
    planner's file-system bandwidth). (drain seconds, checkpoint seconds)."""
    arch = ModelArch.from_hf_config(cfg.actor.model_config)
    dev = device(cfg.launch.gpu_type)
    eff = default_efficiency(dev)
    estimate, _ = config_estimate(cfg, arch, dev, workload_from_config(cfg), eff, cfg.launch.gpus_per_node)
    phase = {p.name: p.seconds for p in estimate.phases}
    ledger = build_ledger(layout_from_config(cfg, arch, cfg.launch.training_world_size, dev))
    checkpoint = ledger.checkpoint_bytes_per_gpu * cfg.launch.nproc_per_node / eff.fs_bandwidth_per_node
    return phase["old_logprob"] + phase["train"] + checkpoint, checkpoint


def test_the_32b_notice_covers_a_stop_just_after_the_rollout():
    drain, checkpoint = _drain_seconds(_cfg())
    assert checkpoint == 11_264_171_776 * 8 / 5e9  # 18.0 s
    assert drain == pytest.approx(826.4, abs=0.5)  # the figures in the recipe's comment


@pytest.mark.parametrize("recipe,notice", [(RECIPE_32B, 1200), ("examples/qwen2.5-7b-fipo-h100.yaml", 900),
                                           ("examples/qwen3-8b-fipo-h100.yaml", 900)])
def test_each_recipe_notice_covers_its_drain_with_at_most_25_percent_spare(recipe, notice):
    """The planner's drain, with its training sped up by as much as it outran NeMo-RL's measured 32B
    step (676 vs 571 tokens/s/GPU, docs/planner.md): the notice covers it, with at most 25% to spare."""
    cfg = _cfg(recipe=recipe)
    drain = _drain_seconds(cfg)[0] * 676 / 571
    assert drain < cfg.launch.preempt_notice_s == notice < 1.25 * drain


def test_7b_on_4_nodes_runs_8_servers_per_node():
    text = _script(recipe="examples/qwen2.5-7b-fipo-h100.yaml")
    assert "#SBATCH --nodes=4" in text and "$(seq 0 7)" in text and "--base-gpu-id $((j * 1))" in text
    assert "--nnodes 4 --nproc-per-node 8" in text


def test_disaggregated_serves_on_the_last_nodes_and_trains_on_the_rest():
    text = _script("launch.nodes=20", "launch.sglang_nodes=4", "rollout.placement=disaggregated",
                   "rollout.sglang.num_servers=8", "actor.offload=false")
    assert "#SBATCH --nodes=20" in text
    assert 'serve_nodes=("${nodes[@]:16}")' in text and "$(seq 0 1)" in text
    assert 'train_nodes=$(IFS=,; echo "${nodes[*]:0:16}")' in text
    trainer = _line(text, "srun ")
    assert "--overlap" not in trainer and "--nodes=16" in trainer and "--nnodes 16" in trainer
    # Disaggregated: trainer rank 0 broadcasts, as master of the group on the head node.
    assert ('\\"rollout.sglang.urls=$urls_yaml\\" rollout.sglang.weight_transport=distributed '
            "rollout.sglang.host=$head") in trainer
    # Servers on GPUs of their own keep their memory: nothing to release, at start or later.
    assert "--enable-memory-saver" not in text and "release_memory_occupation" not in text
    assert "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION" not in text


def test_single_node_leaves_the_servers_to_the_trainer_and_adds_containers():
    text = _script(*ONE_NODE, "rollout.sglang.num_servers=2",
                   "launch.container_image=nvcr.io/nvidia/pytorch:25.09-py3", "launch.container_mounts=[/data:/data,/repo:/repo]", "launch.log_dir=/logs", "launch.requeue=true",
                   "launch.sbatch_directives=[--exclusive]", "launch.env={NCCL_DEBUG: WARN}")
    assert "sglang.launch_server" not in text and "rollout.sglang.urls" not in text
    trainer = _line(text, "srun ")
    assert trainer.startswith("srun --ntasks-per-node=1 --gpus-per-node=8 "
                              "--container-image=nvcr.io/nvidia/pytorch:25.09-py3 --container-workdir=/repo "
                              "--container-mounts=/data:/data,/repo:/repo --job-name=trainer --nodes=1 ")
    lines = text.splitlines()
    assert {"#SBATCH --output=/logs/slurm-%j.out", "#SBATCH --requeue", "#SBATCH --exclusive",
            "export NCCL_DEBUG=WARN"} <= set(lines)
    assert 'if [ $preempted = 1 ]; then scontrol requeue "$SLURM_JOB_ID"; fi  # resumes from the checkpoint' in lines


def test_env_as_a_list_of_assignments():
    # The list form keeps values as written: OMP_NUM_THREADS=8 stays the string "8" (YAML {K: 8} is an int).
    text = _script("launch.env=[NCCL_DEBUG=WARN, OMP_NUM_THREADS=8, XLA_FLAGS=--a=b]")
    assert {"export NCCL_DEBUG=WARN", "export OMP_NUM_THREADS=8", "export XLA_FLAGS=--a=b"} <= set(text.splitlines())


def test_container_flags_reach_the_servers_and_the_trainer_on_16_nodes():
    text = _script("launch.container_image=nvcr.io/nvidia/pytorch:25.09-py3", "launch.container_mounts=[/data:/data]")
    flags = "--container-image=nvcr.io/nvidia/pytorch:25.09-py3 --container-workdir=/repo --container-mounts=/data:/data"
    server = _line(_dedent(text), "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false srun --ntasks-per-node=1 "
                                  "--gpus-per-node=8 --container-image")
    assert flags in server and "sglang.launch_server" in server and "--overlap --nodes=1" in server
    trainer = _line(text, "srun ")
    assert flags in trainer and "--nnodes 16 --nproc-per-node 8" in trainer


def test_cpu_job_requests_no_gpus():
    text = _script("launch.nodes=1", recipe="examples/tiny_cpu.yaml")
    assert "gpus-per-node" not in text and "--nnodes 1 --nproc-per-node 1" in text


def test_script_is_valid_bash():
    for text in (_script(), _script(*ONE_NODE, "rollout.sglang.num_servers=2", "launch.requeue=true")):
        subprocess.run(["bash", "-n"], input=text, text=True, check=True)


@pytest.mark.parametrize("override, key", [
    ("launch.nodes=0", "launch.nodes"),
    ("launch.sglang_nodes=16", "launch.sglang_nodes"),
    ("launch.nproc_per_node=9", "launch.nproc_per_node"),
    ("launch.tunnel=ssh", "launch.ssh_host"),
    ("launch.env={1BAD: x}", "launch.env"),
    ("launch.env=[NCCL_DEBUG]", "launch.env"),  # a list item without =
    ("launch.sbatch_directives=[exclusive]", "launch.sbatch_directives"),
    ("launch.gpu_per_node=8", "gpus_per_node"),  # a typo lists the valid keys
])
def test_bad_launch_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        _cfg(override)


@pytest.mark.parametrize("overrides, key", [
    # 32 servers of TP=4 on 8 nodes: 16 GPUs per node.
    (["launch.nodes=8"], "rollout.sglang.num_servers"),
    # 12 nodes: DP = 96 ranks / TP 8 = 12 does not divide a mini-batch of 64 prompts x 16 samples.
    (["launch.nodes=12", "rollout.sglang.num_servers=24"], "data-parallel"),
    (["launch.sglang_nodes=2"], "launch.sglang_nodes"),  # colocated placement
    (["rollout.placement=disaggregated"], "launch.sglang_nodes"),
    (["actor.load_hf="], "actor.load_hf"),
    # The servers need SGLang's own interpreter.
    (["rollout.sglang.python="], "rollout.sglang.python"),
    # Colocated broadcast: trainer rank 0 and server 0's first TP rank on GPU 0 in one NCCL group.
    (["rollout.sglang.weight_transport=distributed"], "rollout.sglang.weight_transport=distributed"),
    # Per-node handoff needs whole replicas on each node: TP 8 x PP 2 spans two nodes.
    (["parallel.pipeline_model_parallel_size=2", "launch.nodes=32", "rollout.sglang.num_servers=64"],
     "parallel.pipeline_model_parallel_size=2"),
    (["parallel.context_parallel_size=2"], "tensor x context = 16: the per-node weight handoff"),
    # One node of 6 GPUs: 6 ranks for TP=8.
    (["launch.nodes=1", "launch.nproc_per_node=6", "launch.gpus_per_node=6", "rollout.sglang.tp_size=2",
      "rollout.sglang.num_servers=3"], "parallel: tensor"),
])
def test_launch_that_does_not_fit_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        validate_launch(_cfg(*overrides))


@pytest.mark.parametrize("recipe, dp", [(RECIPE_32B, 16), ("examples/qwen2.5-7b-fipo-h100.yaml", 16)])
def test_recipes_fit_their_launch_section(recipe, dp):
    cfg = _cfg(recipe=recipe)
    validate_launch(cfg)
    assert cfg.launch.training_world_size // cfg.parallel.model_parallel_size == dp
