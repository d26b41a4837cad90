"""The sbatch script rendered for the 32B recipe, and launch config errors (no Slurm needed)."""

import pytest

from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import ConfigError, load_config
from megatron_fipo.launch.sbatch import render_sbatch

RECIPE = "examples/qwen2.5-32b-fipo-h100.yaml"


def _script(*overrides: str) -> str:
    cfg = load_config(RunConfig, RECIPE, ["run_dir=/runs/x", "launch.nodes=16", "launch.partition=batch",
                                          "launch.account=rl", *overrides])
    return render_sbatch(cfg, "/runs/x/launch/config.yaml", "/repo")


def test_32b_on_16_nodes_colocated():
    text = _script()
    for line in ("#SBATCH --nodes=16", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=batch",
                 "#SBATCH --account=rl", "#SBATCH --signal=B:TERM@120", "#SBATCH --ntasks-per-node=1"):
        assert line in text.splitlines(), line
    # Two TP=4 SGLang servers on each of the 16 nodes, on GPUs 0-3 and 4-7, bound to the node's name.
    assert 'serve_nodes=("${nodes[@]:0}")' in text and "$(seq 0 1)" in text
    assert "--tp-size 4" in text and "--base-gpu-id $((j * 4))" in text and "--host $node" in text
    assert "--enable-memory-saver" in text  # colocated: released while the trainer runs
    trainer = next(line for line in text.splitlines() if "torch.distributed.run" in line)
    assert "--nnodes 16 --nproc-per-node 8 --node-rank \\$SLURM_NODEID --master-addr $head" in trainer
    assert "train /runs/x/launch/config.yaml" in trainer
    assert '\\"rollout.sglang.urls=$urls_yaml\\" rollout.sglang.weight_transport=distributed' in trainer
    assert "--overlap" in trainer
    assert "trap 'kill -TERM $trainer' TERM" in text


def test_disaggregated_serves_on_the_last_nodes_and_trains_on_the_rest():
    text = _script("launch.sglang_nodes=4", "rollout.placement=disaggregated")
    assert 'serve_nodes=("${nodes[@]:12}")' in text
    assert 'train_nodes=$(IFS=,; echo "${nodes[*]:0:12}")' in text
    assert "--nnodes 12" in text and "--enable-memory-saver" not in text


def test_single_node_leaves_the_servers_to_the_trainer_and_adds_containers():
    text = _script("launch.nodes=1", "launch.container_image=nvcr.io/nvidia/pytorch:25.09-py3",
                   "launch.container_mounts=[/data:/data]")
    assert "sglang.launch_server" not in text and "rollout.sglang.urls" not in text
    assert "--container-image=nvcr.io/nvidia/pytorch:25.09-py3" in text and "--container-mounts=/data:/data" in text


@pytest.mark.parametrize("override, key", [("launch.nodes=0", "launch.nodes"),
                                           ("launch.sglang_nodes=16", "launch.sglang_nodes"),
                                           ("launch.nproc_per_node=9", "launch.nproc_per_node"),
                                           ("launch.tunnel=ssh", "launch.ssh_host")])
def test_bad_launch_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        _script(override)


def test_remote_servers_need_a_checkpoint_to_start_from():
    with pytest.raises(ConfigError, match="actor.load_hf"):
        _script("actor.load_hf=")
