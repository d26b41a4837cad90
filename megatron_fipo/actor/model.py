"""Build the GPTModel chunks (Qwen2, Qwen3 dense, Llama 3.x), Megatron DDP, distributed optimizer and LR schedule."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_fipo.config import ActorConfig, OptimConfig, ParallelConfig
from megatron_fipo.model_arch import ModelArch


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def params_dtype(actor: ActorConfig) -> torch.dtype:
    return torch.bfloat16 if actor.precision == "bf16" else torch.float32


def transformer_config(arch: ModelArch, actor: ActorConfig, par: ParallelConfig):
    from megatron.core.transformer import TransformerConfig

    dtype = params_dtype(actor)
    use_te = transformer_engine_available()
    if actor.fp8 and not use_te:
        raise RuntimeError("actor.fp8 needs CUDA and transformer-engine (requirements-gpu.txt); set actor.fp8=null")
    recompute = {}
    if actor.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif actor.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
        sequence_parallel=par.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Rollout batches have ragged lengths: pipeline stages exchange shapes before tensors.
        variable_seq_lengths=par.pipeline_model_parallel_size > 1,
        # Dense model; only set because the default MoE dispatcher rejects variable_seq_lengths.
        moe_token_dispatcher_type="alltoall",
        # The loss returns (sum, token count): the mean is exact over micro-batches and DP ranks.
        calculate_per_token_loss=True,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=True,
        # Fused kernels are CUDA-only; TE provides its own on GPU.
        bias_activation_fusion=use_te,
        bias_dropout_fusion=use_te,
        masked_softmax_fusion=use_te,
        apply_rope_fusion=use_te,
        persist_layer_norm=use_te,
        gradient_accumulation_fusion=False,
        fp8="hybrid" if actor.fp8 else None,
        fp8_recipe={"delayed": "delayed", "current": "tensorwise"}.get(actor.fp8 or "", "delayed"),
        **recompute,
    )


def decoder_spec(config, par: ParallelConfig, vp_stage):
    """GPTModel's transformer spec: Transformer Engine's layers on CUDA, else the local spec, in
    which exact stand-ins (actor/cpu_layers.py) replace the modules that refuse CP and SP."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if transformer_engine_available():
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    from megatron_fipo.actor.cpu_layers import ContextParallelCPUAttention, SequenceParallelNorm

    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=config.qk_layernorm)
    if par.context_parallel_size > 1:
        spec.submodules.self_attention.submodules.core_attention = ContextParallelCPUAttention
    if not par.sequence_parallel:
        return spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = SequenceParallelNorm
    # The block's final norm too: the block spec GPTModel builds from a layer spec, with that norm.
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=SequenceParallelNorm)


def build_model_chunks(arch: ModelArch, actor: ActorConfig, par: ParallelConfig, initialize: bool = True) -> list:
    """One GPTModel per virtual pipeline stage on this rank (a single one without VPP).

    ``initialize=False`` leaves the weights uninitialized, for a caller that overwrites them all
    (checkpoint conversion): random init of a large model on CPU takes minutes.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(arch, actor, par)
    config.perform_initialization = initialize
    chunks = []
    for vp in range(par.virtual_pipeline_model_parallel_size or 1):
        vp_stage = vp if par.virtual_pipeline_model_parallel_size else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=decoder_spec(config, par, vp_stage),
            vocab_size=arch.padded_vocab_size(par.tensor_model_parallel_size),
            max_sequence_length=arch.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta),
            vp_stage=vp_stage,
        )
        if arch.rope_scaling and model.rotary_pos_emb is not None:
            # Megatron's rope_scaling=True hard-codes Llama 3.1's band limits; set transformers' values.
            inv_freq = model.rotary_pos_emb.inv_freq
            model.rotary_pos_emb.inv_freq = arch.rope_inv_freq().to(inv_freq.device, inv_freq.dtype)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def wrap_ddp(chunks: list, par: ParallelConfig) -> list:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=par.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    return [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


@dataclass
class OptimizerBundle:
    optimizer: object
    scheduler: object


def build_optimizer(ddp_chunks: list, optim: OptimConfig, actor: ActorConfig, par: ParallelConfig) -> OptimizerBundle:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=actor.precision == "bf16",
        params_dtype=params_dtype(actor),
        use_distributed_optimizer=par.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, ddp_chunks)
    decay_steps = max(optim.lr_decay_steps, optim.lr_warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.lr_warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr if optim.lr_decay_style != "constant" else optim.lr,
        lr_warmup_steps=optim.lr_warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    return OptimizerBundle(optimizer, scheduler)
