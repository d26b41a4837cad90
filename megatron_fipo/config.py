"""The one typed schema of a run: every section a dataclass, loaded from YAML with overrides."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_fipo.algo.fipo_config import FIPOConfig
from megatron_fipo.config_base import ConfigError


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1  # TP: each layer's weights split over this many ranks
    pipeline_model_parallel_size: int = 1  # PP: the layers split into this many stages
    # Interleaved 1F1B: model chunks per pipeline rank (None = plain 1F1B).
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1  # CP: each sequence split over this many ranks
    # SP: with TP > 1, norms and dropout run on sequence shards (less activation memory)
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True  # Optimizer state and fp32 master weights sharded over data-parallel ranks
    # Collectives wait this long: training ranks sit in a broadcast while rank 0 drives a rollout,
    # which at 32B and 20k-token responses takes far longer than Megatron's default 10 minutes.
    distributed_timeout_minutes: int = 30

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 2 or self.pipeline_model_parallel_size < 2):
            raise ConfigError(
                "parallel.virtual_pipeline_model_parallel_size needs >= 2 chunks and "
                "pipeline_model_parallel_size >= 2; set it to null otherwise"
            )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("parallel.sequence_parallel needs tensor_model_parallel_size > 1; set it to false")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size


@dataclass
class OptimConfig:
    lr: float = 1e-6  # Peak learning rate of the RL updates
    min_lr: float = 0.0  # Where linear / cosine decay ends
    lr_warmup_steps: int = 10  # Optimizer steps of linear warmup
    # Optimizer steps over which to decay; 0 = constant after warmup (the FIPO/DAPO recipes).
    lr_decay_steps: int = 0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"  # Shape of the decay over lr_decay_steps
    weight_decay: float = 0.1  # AdamW weight decay
    adam_beta1: float = 0.9  # Adam beta1
    adam_beta2: float = 0.999  # Adam beta2
    adam_eps: float = 1e-8  # Adam epsilon
    clip_grad: float = 1.0  # Global gradient-norm clip

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.lr_decay_style != "constant" and self.lr_decay_steps <= 0:
            raise ConfigError(f"optim.lr_decay_steps must be > 0 with lr_decay_style={self.lr_decay_style!r}")


@dataclass
class ActorConfig:
    # Path to a Hugging Face config.json (or its directory) of a Qwen2 / Qwen2.5 / Llama dense model;
    # empty = load_hf's config.json.
    model_config: str = ""
    # Initial weights: a Hugging Face safetensors directory, or empty for random init (tests, tiny job).
    load_hf: str = ""
    # Or a Megatron dist checkpoint: `megatron-fipo convert --to megatron` output, or a run's checkpoints
    # directory (its newest step). Model weights only; any TP/PP.
    load_megatron: str = ""
    precision: Literal["fp32", "bf16"] = "bf16"  # Parameter and compute dtype; logprobs are fp32 either way
    # FP8 Transformer Engine layers on Hopper; null = off. Needs CUDA and transformer-engine.
    fp8: Optional[Literal["delayed", "current"]] = None
    # Activation recomputation: none, full (every layer), or selective (attention core)
    recompute: Literal["none", "full", "selective"] = "none"
    # fipo: Future-KL influence-weighted clipped loss; dapo: the same with all weights 1
    loss: Literal["fipo", "dapo"] = "fipo"
    # Micro-batches hold up to this many tokens (prompt + response, padding included).
    max_tokens_per_microbatch: int = 8192
    # auto: pack with Transformer Engine (THD attention skips cross-sequence pairs), pad on the CPU's
    # local attention, where a packed micro-batch costs a dense [T, T] mask (4x slower measured).
    # Context parallelism always packs (its zig-zag split is of packed sequences).
    packing: Literal["auto", "on", "off"] = "auto"
    # Sequence chunk for vocab-parallel logprobs: bounds the live [chunk, vocab/TP] fp32 logits.
    logprob_chunk_size: int = 1024
    # Colocated: move the trainer's weights, grads and optimizer state off the GPU while SGLang
    # generates, and back for training. The memory ledger (megatron_fipo/plan) counts the trainer's
    # residual during rollouts and the host RAM this takes from it.
    offload: bool = False
    seed: int = 1234  # Seed of the model's random init (when no weights are loaded)

    def __post_init__(self) -> None:
        if self.load_hf and self.load_megatron:
            raise ConfigError("actor.load_hf and actor.load_megatron are both set; the initial weights come from one: "
                              "set the other to ''")
        if not self.model_config and self.load_hf:
            self.model_config = self.load_hf  # an HF model directory describes itself
        if self.max_tokens_per_microbatch < 1:
            raise ConfigError("actor.max_tokens_per_microbatch must be >= 1")
        if self.logprob_chunk_size < 1:
            raise ConfigError("actor.logprob_chunk_size must be >= 1")


@dataclass
class TrainerSections:
    """The sections the actor reads; the full run config extends it."""

    actor: ActorConfig = field(default_factory=ActorConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    algo: FIPOConfig = field(default_factory=FIPOConfig)


@dataclass
class DataConfig:
    # arithmetic: the tiny CPU job's synthetic task; dapo_math: DAPO-Math-17k, AIME eval;
    # chain_arithmetic: sums of one-digit terms, warm-started on a short and a worked form (FIPO vs DAPO)
    task: Literal["arithmetic", "dapo_math", "chain_arithmetic"] = "dapo_math"
    train_path: str = ""  # DAPO-Math-17k parquet/jsonl (task dapo_math)
    eval_path: str = ""  # AIME24/25 jsonl (task dapo_math)
    # A malformed row: skipped with a warning naming file and line, or fatal
    on_bad_row: Literal["skip", "fail"] = "skip"
    # hf: a Hugging Face tokenizer and its chat template; sentencepiece: the tiny job's
    tokenizer: Literal["sentencepiece", "hf"] = "hf"
    tokenizer_path: str = ""  # HF tokenizer dir; for sentencepiece, empty = train one on the task
    tokenizer_vocab_size: int = 48  # sentencepiece training only
    max_prompt_length: int = 2048  # Prompts over this many tokens are dropped (all of a set: an error)
    # Synthetic arithmetic task (the tiny CPU job).
    arithmetic_max_operand: int = 30
    eval_size: int = 64  # Arithmetic task: eval problems
    # False: the eval problems are held out of training. True: a fixed sample of the training
    # problems (the tiny job measures how much RL improves the policy, not generalization).
    arithmetic_eval_from_train: bool = False
    chain_problems: int = 2000  # chain_arithmetic: distinct problems drawn (eval_size of them held out)
    chain_min_terms: int = 3  # chain_arithmetic: fewest one-digit terms in a problem (at least 2)
    chain_max_terms: int = 6  # chain_arithmetic: most terms (a worked answer takes about 8 tokens a term)
    # chain_arithmetic: 0 = one-digit terms, plain sums; m = terms 0..m-1, sums mod m (2: parity of bits)
    chain_modulus: int = 0
    # Your own prompt for training and eval problems: "package.module:function" called as
    # function(problem) -> prompt text or chat messages; see megatron_fipo/hooks.py
    custom_prompt: str = ""

    def __post_init__(self) -> None:
        if self.task == "dapo_math" and self.tokenizer == "sentencepiece" and not self.tokenizer_path:
            raise ConfigError("data.tokenizer_path: task dapo_math needs a tokenizer; sentencepiece is trained only for arithmetic")
        if self.task == "chain_arithmetic":
            if not 2 <= self.chain_min_terms <= self.chain_max_terms:
                raise ConfigError("data.chain_min_terms / data.chain_max_terms: need 2 <= min <= max, got "
                                  f"{self.chain_min_terms} and {self.chain_max_terms}")
            if self.chain_modulus < 0 or self.chain_modulus == 1 or self.chain_modulus > 10:
                raise ConfigError(f"data.chain_modulus: {self.chain_modulus}; give 0 (plain sums) or 2..10")
            distinct = sum((self.chain_modulus or 10) ** k for k in range(self.chain_min_terms, self.chain_max_terms + 1))
            if not self.eval_size < self.chain_problems <= distinct:
                raise ConfigError(f"data.chain_problems: {self.chain_problems} must exceed data.eval_size ({self.eval_size}) "
                                  f"and be at most the {distinct} distinct problems of that many terms")


@dataclass
class SGLangConfig:
    host: str = "127.0.0.1"  # loopback unless a cluster placement needs otherwise
    base_port: int = 30000  # Server i listens on base_port + i
    num_servers: int = 1  # Servers the trainer launches (none with urls)
    tp_size: int = 1  # GPUs (tensor parallel) per server
    mem_fraction_static: float = 0.8  # SGLang's --mem-fraction-static: GPU memory for weights and KV cache
    api_key: str = ""  # Servers refuse requests without it; empty = no key
    extra_args: list[str] = field(default_factory=list)  # More sglang.launch_server arguments, as on its command line
    # Interpreter that runs sglang.launch_server; empty = this one. tools/sglang_cpu/python on a CPU.
    python: str = ""
    # Servers launched elsewhere (disaggregated nodes): their URLs; then none is launched here.
    urls: list[str] = field(default_factory=list)
    # tensor: CUDA IPC / shared memory (colocated); distributed: NCCL broadcast; disk: safetensors.
    weight_transport: Literal["tensor", "distributed", "disk"] = "tensor"
    distributed_backend: Literal["nccl", "gloo"] = "nccl"  # Process group of the distributed weight transport
    weights_update_port: int = 29700  # Rendezvous port of that process group
    # Colocated: release weights and KV cache while the trainer runs (needs CUDA).
    release_memory: bool = True
    # Sequences in flight across all servers, at most; 0 = no cap beyond each server's capacity
    max_concurrency: int = 0
    # Sequences one server runs at once (SGLang's --max-running-requests); 0 = ask each server (/server_info)
    max_running_requests: int = 0
    max_retries: int = 3  # per request, each on the then least-loaded server
    request_timeout_s: float = 3600.0  # Time limit of one request
    startup_timeout_s: float = 600.0  # Time a server may take to come up

    def __post_init__(self) -> None:
        for name in ("num_servers", "tp_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rollout.sglang.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_concurrency < 0:
            raise ConfigError(f"rollout.sglang.max_concurrency must be >= 0 (0: no cap beyond the servers' "
                              f"capacity), got {self.max_concurrency}")
        if self.max_retries < 0:
            raise ConfigError(f"rollout.sglang.max_retries must be >= 0, got {self.max_retries}")
        if self.max_running_requests < 0:
            raise ConfigError(f"rollout.sglang.max_running_requests must be >= 0 (0: ask the server), "
                              f"got {self.max_running_requests}")


@dataclass
class RolloutConfig:
    # embedded: in-process engine (CPU, tests); sglang: SGLang servers
    engine: Literal["embedded", "sglang"] = "embedded"
    # colocated: engines on the trainer's GPUs; disaggregated: on nodes of their own
    placement: Literal["colocated", "disaggregated"] = "colocated"
    n_samples: int = 16  # Responses per prompt: the group of group-normalized advantages
    temperature: float = 1.0  # Sampling temperature of training rollouts (logprobs use it too)
    top_p: float = 1.0  # Nucleus sampling of training rollouts; 1 = off
    top_k: int = -1  # Top-k sampling; -1 = off
    max_response_length: int = 20480  # Tokens generated at most per response
    max_batch: int = 256  # embedded engine: sequences decoded together
    # Aborted responses (the step had its groups) continue next step from their prefix, keeping their
    # tokens, behaviour logprobs and weight versions (APRIL, slime --partial-rollout); off in the paper's recipe
    partial_rollouts: bool = False
    bridge_bucket_mb: int = 512  # Weight sync: size of each bucket of HF-named tensors sent to the engines
    eval_n_samples: int = 32  # k of avg@k: samples per eval problem
    eval_temperature: float = 1.0  # Sampling temperature of eval
    eval_top_p: float = 0.7  # Nucleus sampling of eval
    sglang: SGLangConfig = field(default_factory=SGLangConfig)

    def __post_init__(self) -> None:
        if self.n_samples < 2:
            raise ConfigError("rollout.n_samples must be >= 2: group-normalized advantages need a group")


@dataclass
class RewardConfig:
    # The answer is a last 'Answer:' line (dapo), the last \boxed{} (boxed) or the whole response
    # (plain); eval prompts ask for it in that form.
    answer_format: Literal["dapo", "boxed", "plain"] = "dapo"
    correct_score: float = 1.0  # Reward of a correct answer
    wrong_score: float = -1.0  # Reward of a wrong, missing or unparsable answer
    timeout_seconds: float = 5.0  # math-verify's wall-clock limit per answer
    # DAPO overlong penalty: starts this many tokens before rollout.max_response_length (0 = off)
    overlong_buffer_length: int = 4096
    overlong_penalty_factor: float = 1.0  # The penalty at rollout.max_response_length, falling linearly from 0
    # Your own reward instead of math-verify: "package.module:function" called as
    # function(response, answer, problem) -> score or (score, correct); see megatron_fipo/hooks.py
    custom_reward: str = ""
    # Processes scoring on rank 0 while generation runs; a worker past timeout_seconds + 0.5 s (a
    # custom reward too) is killed and the sample scores as a timeout. 0 = in the trainer, serially
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"reward.num_workers must be >= 0 (0 scores in the trainer process), got {self.num_workers}")


@dataclass
class TrainerConfig:
    total_steps: int = 100  # RL steps of the run; a resumed run goes on to this
    prompts_per_step: int = 512  # prompt groups per RL step, after dynamic sampling
    minibatch_prompts: int = 64  # PPO mini-batch: optimizer steps per RL step = prompts_per_step / this
    ppo_epochs: int = 1  # Passes over each RL step's mini-batches
    dynamic_sampling: bool = True  # Drop groups whose rewards are all equal, generating more (max_gen_batches)
    gen_prompts_per_batch: int = 2048  # prompts sampled per generation batch
    max_gen_batches: int = 10  # dynamic-sampling refills before training on what there is
    norm_adv_by_std: bool = True  # Divide group advantages by the group's reward std
    eval_every: int = 5  # RL steps between evals (and at the last step)
    eval_before_train: bool = True  # Eval at step 0, before RL
    save_every: int = 5  # RL steps between checkpoints (and at the last step)
    keep_last_checkpoints: int = 2  # Older checkpoints are deleted
    max_consecutive_bad_steps: int = 3  # non-finite loss/grad steps in a row before stopping
    # Supervised warm start (tiny job): optimizer steps on reference answers before RL.
    warmup_sft_steps: int = 0
    warmup_sft_lr: float = 1e-3  # Learning rate of the warm start
    warmup_sft_batch: int = 64  # Sequences per warm-start step
    seed: int = 1234  # Data order and sampling seeds
    tensorboard: bool = True  # TensorBoard events in RUN_DIR/tensorboard
    wandb_project: str = ""  # Weights & Biases project; empty = off. Needs scripts/setup_env.sh requirements-wandb.txt
    # Asynchronous rollouts: the engines draw the next steps' batches while the trainer trains, each
    # sample at most this many weight updates old (docs/async-rollouts.md); 0 = the synchronous loop
    max_staleness: int = 0

    def __post_init__(self) -> None:
        if self.prompts_per_step % self.minibatch_prompts:
            raise ConfigError(
                f"trainer.minibatch_prompts ({self.minibatch_prompts}) must divide trainer.prompts_per_step "
                f"({self.prompts_per_step})"
            )
        if self.gen_prompts_per_batch < 1 or self.max_gen_batches < 1:
            raise ConfigError("trainer.gen_prompts_per_batch and trainer.max_gen_batches must be >= 1")
        if self.max_staleness < 0:
            raise ConfigError(f"trainer.max_staleness must be >= 0 (0: synchronous rollouts), got {self.max_staleness}")


@dataclass
class LaunchConfig:
    """How `megatron-fipo launch slurm|nemo-run` places the job on a cluster."""

    nodes: int = 1  # Nodes of the job, sglang_nodes included
    gpus_per_node: int = 8  # GPUs requested per node; 0 for a CPU job
    # The nodes' GPU, one of megatron_fipo/plan/hardware.py's: the memory ledger's budget per GPU.
    gpu_type: str = "h100-80gb"
    nproc_per_node: int = 8  # trainer processes per node (torchrun)
    # Disaggregated rollouts: the last sglang_nodes nodes run only SGLang servers.
    sglang_nodes: int = 0
    time: str = "24:00:00"  # Slurm time limit
    partition: str = ""  # Slurm partition; empty = the cluster's default
    account: str = ""  # Slurm account; empty = the user's default
    job_name: str = "megatron-fipo"  # Slurm job name
    container_image: str = ""  # pyxis/enroot image; empty = the nodes' own environment
    container_mounts: list[str] = field(default_factory=list)  # pyxis mounts, SRC:DST
    sbatch_directives: list[str] = field(default_factory=list)  # extra #SBATCH options, e.g. --exclusive
    # Exported in the job: a mapping, or a list of KEY=VALUE strings (values stay strings, e.g. OMP_NUM_THREADS=8).
    env: dict[str, str] | list[str] = field(default_factory=dict)
    python: str = ".venv/bin/python"  # on the nodes, relative to the repo
    log_dir: str = ""  # Slurm and SGLang server logs; empty = RUN_DIR/launch
    rdzv_port: int = 29500  # torchrun's rendezvous port on the first node
    # --requeue, and a job that got SIGTERM requeues itself once the trainer has checkpointed: a
    # time-limited run goes on from its checkpoint.
    requeue: bool = False
    # Slurm sends SIGTERM this long before the time limit, and torchrun gives the trainer as long to
    # finish its step and checkpoint before it kills it. Enough for small jobs; a large one needs its
    # worst case, a stop just after the rollout's last safe point: the old-logprob pass, every
    # mini-batch and a checkpoint (`megatron-fipo plan --explain`; the 32B recipe sets 1200).
    preempt_notice_s: int = 120
    # NeMo-Run's Slurm executor reaches the cluster through this tunnel: local (on a login node) or ssh.
    tunnel: Literal["local", "ssh"] = "local"
    ssh_host: str = ""  # NeMo-Run ssh tunnel: the cluster's login host
    ssh_user: str = ""  # NeMo-Run ssh tunnel: user name
    remote_job_dir: str = ""  # NeMo-Run ssh tunnel: the job directory on the cluster

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"launch.nodes must be >= 1, got {self.nodes}")
        if self.nproc_per_node < 1 or self.gpus_per_node < 0:
            raise ConfigError("launch.nproc_per_node must be >= 1 and launch.gpus_per_node >= 0")
        if self.gpus_per_node and self.nproc_per_node > self.gpus_per_node:
            raise ConfigError(f"launch.nproc_per_node ({self.nproc_per_node}) exceeds launch.gpus_per_node "
                              f"({self.gpus_per_node}): one trainer process per GPU")
        if not 0 <= self.sglang_nodes < self.nodes:
            raise ConfigError(f"launch.sglang_nodes ({self.sglang_nodes}) must leave at least one of the "
                              f"{self.nodes} launch.nodes for training")
        if self.tunnel == "ssh" and not self.ssh_host:
            raise ConfigError("launch.ssh_host: set it for launch.tunnel=ssh")
        if isinstance(self.env, list):
            bad = next((item for item in self.env if "=" not in item), None)
            if bad is not None:
                raise ConfigError(f"launch.env: {bad!r} is not KEY=VALUE; write it as e.g. NCCL_DEBUG=WARN")
            self.env = dict(item.split("=", 1) for item in self.env)
        for key in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ConfigError(f"launch.env: {key!r} is not an environment variable name (letters, digits, _)")
        for directive in self.sbatch_directives:
            if not directive.startswith("-"):
                raise ConfigError(f"launch.sbatch_directives: {directive!r} is not an sbatch option; "
                                  "write it as on the command line, e.g. --exclusive or --qos=high")

    @property
    def training_world_size(self) -> int:
        return (self.nodes - self.sglang_nodes) * self.nproc_per_node


@dataclass
class RunConfig(TrainerSections):
    run_dir: str = "runs/default"  # Where the run writes config, checkpoints, metrics, plots; rerun on it to resume
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        k = self.trainer.max_staleness
        if k and self.rollout.engine == "sglang" and self.rollout.placement == "colocated":
            raise ConfigError(f"trainer.max_staleness={k} needs engines that generate while the trainer trains: "
                              "colocated SGLang servers share its GPUs; set rollout.placement=disaggregated "
                              "(servers on GPUs of their own) or trainer.max_staleness=0")
        if k and self.actor.offload:
            raise ConfigError(f"trainer.max_staleness={k}: actor.offload hands the GPUs to the engines only between "
                              "training phases, and asynchronous rollouts generate during them; set actor.offload=false "
                              "or trainer.max_staleness=0")
