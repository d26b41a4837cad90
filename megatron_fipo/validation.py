"""Checks that need the model and the world size but no torch: they fail fast, before heavy imports."""

from __future__ import annotations

import os
from pathlib import Path

from megatron_fipo.config import ParallelConfig, RunConfig
from megatron_fipo.config_base import ConfigError
from megatron_fipo.launch import job_starts_servers
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.plan.memory import Ledger, build_ledger, check_fits, layout_from_config


def validate_parallel(par: ParallelConfig, arch: ModelArch, world_size: int) -> int:
    """Raise ConfigError naming the field for any size that does not divide; return the DP size."""
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    if world_size % par.model_parallel_size:
        raise ConfigError(
            f"parallel: tensor ({tp}) x pipeline ({pp}) x context ({cp}) = {par.model_parallel_size} "
            f"must divide the world size {world_size}; change one of the three or the number of ranks"
        )
    checks = [
        (arch.num_attention_heads % tp, f"parallel.tensor_model_parallel_size={tp} must divide num_attention_heads={arch.num_attention_heads}"),
        (arch.num_kv_heads % tp, f"parallel.tensor_model_parallel_size={tp} must divide num_key_value_heads={arch.num_kv_heads} (KV groups)"),
        (arch.ffn_hidden_size % tp, f"parallel.tensor_model_parallel_size={tp} must divide intermediate_size={arch.ffn_hidden_size}"),
    ]
    stages = pp * (par.virtual_pipeline_model_parallel_size or 1)
    checks.append((arch.num_layers % stages,
                   f"parallel.pipeline_model_parallel_size={pp} x virtual_pipeline_model_parallel_size="
                   f"{par.virtual_pipeline_model_parallel_size} = {stages} stages must divide num_layers={arch.num_layers}"))
    for bad, message in checks:
        if bad:
            raise ConfigError(message)
    if par.virtual_pipeline_model_parallel_size is not None:
        raise ConfigError(
            "parallel.virtual_pipeline_model_parallel_size: interleaved 1F1B is not supported yet (with ragged "
            "rollout micro-batches it deadlocked in testing); set it to null"
        )
    return world_size // par.model_parallel_size


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))


def gpus_visible() -> bool:
    """Torch-free: an NVIDIA device node exists and CUDA_VISIBLE_DEVICES does not hide every GPU."""
    return os.path.exists("/dev/nvidiactl") and os.environ.get("CUDA_VISIBLE_DEVICES", "0") not in ("", "-1")


def validate_memory(cfg: RunConfig, arch: ModelArch, world_size: int, enforce: bool) -> Ledger:
    """The memory ledger of this layout (megatron_fipo/plan/memory.py). A run on GPUs (``enforce``)
    that leaves any phase without its headroom is refused, naming the largest term and a fix; on a
    CPU the ledger is informational."""
    ledger = build_ledger(layout_from_config(cfg, arch, world_size))
    if enforce:
        check_fits(ledger)
    return ledger


def validate_weight_handoff(cfg: RunConfig, nodes: int, nproc_per_node: int) -> None:
    """How colocated SGLang servers get the trainer's weights (rollout/sglang_handoff.py)."""
    rollout, sg, par = cfg.rollout, cfg.rollout.sglang, cfg.parallel
    if rollout.engine != "sglang" or rollout.placement != "colocated":
        return
    if sg.weight_transport == "distributed":
        raise ConfigError(
            "rollout.sglang.weight_transport=distributed with rollout.placement=colocated: its broadcast group "
            "would hold trainer rank 0 and the first TP rank of server 0, both on GPU 0 of node 0, and NCCL "
            "refuses two ranks on one GPU; set it to tensor (each node hands CUDA-IPC handles to its own "
            "servers) or disk (a broadcast is for disaggregated placement)")
    if sg.weight_transport != "tensor" or nodes == 1:
        return
    replica = par.tensor_model_parallel_size * par.context_parallel_size
    if par.pipeline_model_parallel_size != 1 or nproc_per_node % replica:
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size={par.pipeline_model_parallel_size}, tensor x context = "
            f"{replica}: the per-node weight handoff needs whole model replicas on each node of "
            f"{nproc_per_node} ranks (pipeline size 1, tensor x context dividing it), so that every node's "
            "first rank builds the full weights; change the layout or set rollout.sglang.weight_transport=disk")
    if sg.urls and len(sg.urls) % nodes:
        raise ConfigError(f"rollout.sglang.urls: {len(sg.urls)} servers do not spread evenly over the {nodes} "
                          "training nodes; list the same number per node, node by node")


def validate_run(cfg: RunConfig, world_size: int | None = None, nproc_per_node: int | None = None) -> ModelArch:
    """Everything checkable from the config, the model's config.json and the launch environment
    (or, for a job about to be launched, its world size and ranks per node)."""
    if not cfg.actor.model_config:
        raise ConfigError("actor.model_config: set it to a Hugging Face config.json (or its directory), "
                          "or set actor.load_hf and its config.json is used")
    arch = ModelArch.from_hf_config(cfg.actor.model_config)
    longest = cfg.data.max_prompt_length + cfg.rollout.max_response_length
    if longest > arch.max_position_embeddings:
        raise ConfigError(
            f"data.max_prompt_length ({cfg.data.max_prompt_length}) + rollout.max_response_length "
            f"({cfg.rollout.max_response_length}) = {longest} tokens exceeds the model's max_position_embeddings "
            f"({arch.max_position_embeddings}, {cfg.actor.model_config}); lower one of the two")
    if cfg.reward.overlong_buffer_length > cfg.rollout.max_response_length:
        raise ConfigError(
            f"reward.overlong_buffer_length ({cfg.reward.overlong_buffer_length}) exceeds rollout.max_response_length "
            f"({cfg.rollout.max_response_length}): the overlong penalty would start before the response does; "
            "lower it (0 turns the penalty off)")
    if cfg.actor.offload and cfg.rollout.placement == "disaggregated":
        raise ConfigError("actor.offload frees the trainer's GPUs for engines that share them; with "
                          "rollout.placement=disaggregated the engines have GPUs of their own: set actor.offload=false")
    world_size = world_size or world_size_from_env()
    dp = validate_parallel(cfg.parallel, arch, world_size)
    if cfg.parallel.context_parallel_size > 1 and cfg.actor.packing == "off":
        raise ConfigError(
            f"actor.packing=off: parallel.context_parallel_size={cfg.parallel.context_parallel_size} splits packed "
            "sequences over the CP ranks (Megatron's THD layout); set actor.packing to auto or on")
    per_node = nproc_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    validate_weight_handoff(cfg, max(world_size // per_node, 1), per_node)
    mb = cfg.trainer.minibatch_prompts * cfg.rollout.n_samples
    if mb % dp:
        raise ConfigError(
            f"trainer.minibatch_prompts x rollout.n_samples = {mb} samples per mini-batch must divide evenly over "
            f"the {dp} data-parallel ranks"
        )
    return arch


_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _must_exist(key: str, path: str, what: str, is_dir: bool = False) -> None:
    found = Path(path).is_dir() if is_dir else Path(path).is_file()
    if not found:
        raise ConfigError(f"{key}: {path} is not {'a directory' if is_dir else 'a file'}; set it to {what}")


def validate_inputs(cfg: RunConfig) -> None:
    """What a run on this machine reads, checked before torch loads: data and tokenizer paths, initial
    weights, optional packages. Not part of validate_run: a login node that launches a job need not
    see the cluster's paths."""
    d, actor = cfg.data, cfg.actor
    if d.task == "dapo_math":
        for key, path, what in (("data.train_path", d.train_path, "a DAPO-Math-17k parquet/jsonl file"),
                                ("data.eval_path", d.eval_path, "an AIME jsonl file")):
            if not path:
                raise ConfigError(f"{key}: task dapo_math needs it; set it to {what} (local: no hub downloads)")
            _must_exist(key, path, what)
    if d.tokenizer_path:
        if d.tokenizer == "hf":
            _must_exist("data.tokenizer_path", d.tokenizer_path, "a local Hugging Face tokenizer directory", True)
            if not any((Path(d.tokenizer_path) / name).is_file() for name in _HF_TOKENIZER_FILES):
                raise ConfigError(f"data.tokenizer_path: {d.tokenizer_path} has none of {', '.join(_HF_TOKENIZER_FILES)}; "
                                  "set it to a Hugging Face model or tokenizer directory")
        else:
            _must_exist("data.tokenizer_path", d.tokenizer_path, "a sentencepiece .model file (or leave it empty "
                        "to train one on the arithmetic task)")
    if actor.load_hf:
        _must_exist("actor.load_hf", actor.load_hf, "a Hugging Face safetensors directory", is_dir=True)
        if not any(Path(actor.load_hf).glob("*.safetensors")):
            raise ConfigError(f"actor.load_hf: {actor.load_hf} has no *.safetensors weights; set it to a Hugging Face "
                              "model directory (convert --to hf writes one)")
    if actor.load_megatron:
        _must_exist("actor.load_megatron", actor.load_megatron,
                    "a Megatron checkpoint (convert --to megatron output) or a run's checkpoints directory", is_dir=True)
    if cfg.trainer.wandb_project:
        try:
            import wandb  # noqa: F401  (optional: only a run that logs to W&B needs it)
        except ImportError:
            raise ConfigError(f"trainer.wandb_project={cfg.trainer.wandb_project!r} needs wandb, which is not "
                              "installed: run scripts/setup_env.sh requirements-wandb.txt (or pip install -e '.[wandb]'), "
                              "or set trainer.wandb_project=''") from None
    if cfg.reward.custom_reward:  # user code that does not import fails here, not once the model is built
        from megatron_fipo.hooks import load_hook

        load_hook(cfg.reward.custom_reward, "reward.custom_reward")


def validate_launch(cfg: RunConfig) -> ModelArch:
    """The run as ``launch.*`` places it: its layout at the job's world size, and its SGLang servers."""
    launch, rollout, sg = cfg.launch, cfg.rollout, cfg.rollout.sglang
    disaggregated = rollout.engine == "sglang" and rollout.placement == "disaggregated"
    if launch.sglang_nodes and not disaggregated:
        raise ConfigError(f"launch.sglang_nodes={launch.sglang_nodes}: nodes of their own serve only "
                          "rollout.engine=sglang with rollout.placement=disaggregated; set it to 0 or change those")
    if rollout.engine == "sglang" and not sg.urls:
        serve_nodes = launch.sglang_nodes or launch.nodes
        per_node, rest = divmod(sg.num_servers, serve_nodes)
        if rest or not per_node or (launch.gpus_per_node and per_node * sg.tp_size > launch.gpus_per_node):
            raise ConfigError(
                f"rollout.sglang.num_servers={sg.num_servers} must spread evenly over the {serve_nodes} serving "
                f"node(s), each server's rollout.sglang.tp_size={sg.tp_size} GPUs within launch.gpus_per_node="
                f"{launch.gpus_per_node}; change num_servers, tp_size or launch.nodes / launch.sglang_nodes")
    if rollout.engine == "sglang" and not sg.urls and not sg.python:
        raise ConfigError("rollout.sglang.python: the job's SGLang servers run in SGLang's own environment (its "
                          "pins clash with the trainer's); set it to that interpreter on the nodes, e.g. "
                          ".venv-sglang/bin/python from requirements-sglang-gpu.txt (README: SGLang on the nodes)")
    if job_starts_servers(cfg):
        if disaggregated and not launch.sglang_nodes:
            raise ConfigError(f"launch.sglang_nodes: rollout.placement=disaggregated on launch.nodes={launch.nodes} "
                              "needs nodes for the SGLang servers; set it >= 1 (or rollout.placement=colocated)")
        if not cfg.actor.load_hf:
            raise ConfigError("actor.load_hf: SGLang servers on other nodes start from a Hugging Face checkpoint; "
                              "set it")
    arch = validate_run(cfg, world_size=launch.training_world_size, nproc_per_node=launch.nproc_per_node)
    validate_memory(cfg, arch, launch.training_world_size, enforce=launch.gpus_per_node > 0)
    return arch

