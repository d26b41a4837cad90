"""Build the run's tokenizer and problem sets from the data config."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import ConfigError
from megatron_fipo.data.arithmetic import arithmetic_problems, split_eval, tokenizer_corpus
from megatron_fipo.data.math_datasets import load_problems
from megatron_fipo.data.problems import Problem, ProblemStream
from megatron_fipo.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer
from megatron_fipo.model_arch import ModelArch

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    train_problems: list[Problem]
    eval_problems: list[Problem]
    train_stream: ProblemStream
    too_long: int  # prompts dropped for exceeding data.max_prompt_length

    def prompt_ids(self, problem: Problem) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.render_prompt(list(problem.messages)))

    def answer_ids(self, problem: Problem) -> list[int]:
        """Reference response for the supervised warm start: the answer, then end of sequence."""
        return self.tokenizer.encode(problem.answer) + [self.tokenizer.eos_id]


def _tokenizer(cfg: RunConfig, run_dir: Path, corpus: list[str]) -> Tokenizer:
    d = cfg.data
    if d.tokenizer == "hf":
        if not d.tokenizer_path:
            raise ConfigError("data.tokenizer_path: set it to a local Hugging Face tokenizer directory")
        return HFTokenizer(d.tokenizer_path)
    if d.tokenizer_path:
        return SentencePieceTokenizer(d.tokenizer_path)
    # Trained on the task itself; deterministic, and saved with the run for resume and eval.
    model = run_dir / "tokenizer.model"
    if model.is_file():
        return SentencePieceTokenizer(model)
    return SentencePieceTokenizer.train(corpus, run_dir / "tokenizer", d.tokenizer_vocab_size)


def setup_data(cfg: RunConfig, run_dir: Path, arch: ModelArch) -> DataBundle:
    d = cfg.data
    if d.task == "arithmetic":
        problems = arithmetic_problems(d.arithmetic_max_operand)
        train, evals = split_eval(problems, d.eval_size, cfg.trainer.seed)
        if d.arithmetic_eval_from_train:
            train = problems
        corpus = tokenizer_corpus(problems)
    else:
        if not d.train_path or not d.eval_path:
            raise ConfigError("data.train_path and data.eval_path: task dapo_math needs DAPO-Math-17k and AIME files")
        train, _ = load_problems(d.train_path, "dapo_math", d.on_bad_row)
        evals, _ = load_problems(d.eval_path, "aime", d.on_bad_row)
        corpus = []
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(cfg, run_dir, corpus)
    if tokenizer.vocab_size > arch.vocab_size:
        raise ConfigError(f"data.tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {arch.vocab_size}")
    bundle = DataBundle(tokenizer, [], [], None, 0)  # type: ignore[arg-type]
    fits = lambda p: len(bundle.prompt_ids(p)) <= d.max_prompt_length  # noqa: E731
    bundle.train_problems = [p for p in train if fits(p)]
    bundle.eval_problems = [p for p in evals if fits(p)]
    bundle.too_long = len(train) + len(evals) - len(bundle.train_problems) - len(bundle.eval_problems)
    if bundle.too_long:
        log.warning("%d prompts longer than data.max_prompt_length=%d were dropped", bundle.too_long, d.max_prompt_length)
    bundle.train_stream = ProblemStream(bundle.train_problems, cfg.trainer.seed)
    return bundle
