"""Build the run's tokenizer and problem sets from the data config.

Everything here runs before the actor is built and before the run directory exists: a data set that
is missing, malformed or empty (after dropping over-long prompts) fails as a ConfigError naming the
file and the field, with nothing written. A tokenizer trained on the task lives in memory until the
trainer saves it with the run (``DataBundle.save``).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import ConfigError
from megatron_fipo.data.arithmetic import arithmetic_problems, split_eval, tokenizer_corpus
from megatron_fipo.data.chain_arithmetic import chain_problems, chain_tokenizer_corpus
from megatron_fipo.data.math_datasets import INSTRUCTIONS, load_problems
from megatron_fipo.data.problems import Problem, ProblemStream
from megatron_fipo.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer
from megatron_fipo.hooks import load_hook, problem_record
from megatron_fipo.model_arch import ModelArch

log = logging.getLogger(__name__)

TRAINED_TOKENIZER = "tokenizer.model"  # in the run directory: the sentencepiece model trained on the task


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    train_problems: list[Problem]
    eval_problems: list[Problem]
    train_stream: ProblemStream
    too_long: int  # prompts dropped for exceeding data.max_prompt_length
    trained_tokenizer: Optional[SentencePieceTokenizer] = None  # trained for this run, not yet saved
    custom_prompt: Optional[Callable] = None  # data.custom_prompt: problem -> text, or chat messages
    reference_rng: random.Random = field(default_factory=lambda: random.Random(0))  # picks among references

    def prompt_ids(self, problem: Problem) -> list[int]:
        """Training, warm-start and eval prompts alike."""
        prompt = self.custom_prompt(problem_record(problem)) if self.custom_prompt else list(problem.messages)
        return self.tokenizer.encode(prompt if isinstance(prompt, str) else self.tokenizer.render_prompt(prompt))

    def answer_ids(self, problem: Problem) -> list[int]:
        """Reference response for the supervised warm start, then end of sequence: the answer, or one of
        the problem's references drawn uniformly (a task that teaches several forms)."""
        text = self.reference_rng.choice(problem.references) if problem.references else problem.answer
        return self.tokenizer.encode(text) + [self.tokenizer.eos_id]

    def save(self, run_dir: Path) -> None:
        """Keep a tokenizer trained for this run with it, for resume, eval and convert (rank 0, once the
        run directory exists)."""
        if self.trained_tokenizer is not None:
            self.trained_tokenizer.save(run_dir / TRAINED_TOKENIZER)


def _tokenizer(cfg: RunConfig, corpus: list[str]) -> tuple[Tokenizer, bool]:
    """(tokenizer, trained here)."""
    d = cfg.data
    path = d.tokenizer_path
    if d.tokenizer == "hf":
        if not path:
            raise ConfigError("data.tokenizer_path: set it to a local Hugging Face tokenizer directory")
    elif not path:
        saved = Path(cfg.run_dir) / TRAINED_TOKENIZER  # a resumed run keeps the tokenizer it trained
        if not saved.is_file():
            # Trained on the task itself; deterministic.
            return SentencePieceTokenizer.train(corpus, d.tokenizer_vocab_size), True
        path = str(saved)
    try:
        return (HFTokenizer(path) if d.tokenizer == "hf" else SentencePieceTokenizer(path)), False
    except Exception as err:  # noqa: BLE001  (transformers and sentencepiece raise many kinds)
        kind = "Hugging Face" if d.tokenizer == "hf" else "sentencepiece"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"data.tokenizer_path: {path} does not load as a {kind} tokenizer ({reason}); "
                          f"point it at a {kind} tokenizer, or change data.tokenizer") from None


def _problems(cfg: RunConfig) -> tuple[list[Problem], list[Problem], list[str]]:
    """(train, eval, tokenizer corpus)."""
    d = cfg.data
    if d.task == "arithmetic":
        problems = arithmetic_problems(d.arithmetic_max_operand)
        train, evals = split_eval(problems, d.eval_size, cfg.trainer.seed)
        return (problems if d.arithmetic_eval_from_train else train), evals, tokenizer_corpus(problems)
    if d.task == "chain_arithmetic":
        problems = chain_problems(d.chain_problems, d.chain_min_terms, d.chain_max_terms, 0, d.chain_modulus)
        train, evals = split_eval(problems, d.eval_size, cfg.trainer.seed)
        return (problems if d.arithmetic_eval_from_train else train), evals, chain_tokenizer_corpus(problems)
    train, _ = load_problems(d.train_path, "dapo_math", d.on_bad_row)
    evals, _ = load_problems(d.eval_path, "aime", d.on_bad_row, INSTRUCTIONS[cfg.reward.answer_format])
    return train, evals, []


def _nonempty(kept: list[Problem], total: int, cfg: RunConfig, split: str) -> None:
    d = cfg.data
    if kept:
        return
    source = {"train": d.train_path, "eval": d.eval_path}[split] if d.task == "dapo_math" else ""
    where = f"data.{split}_path {source}" if source else f"the arithmetic task's {split} split"
    if total == 0:
        fix = (f"point data.{split}_path at a file with problems" if source
               else "raise data.arithmetic_max_operand" + (" or data.eval_size" if split == "eval" else ""))
        raise ConfigError(f"{where}: no usable problems; {fix}")
    raise ConfigError(f"{where}: all {total} prompts are longer than data.max_prompt_length={d.max_prompt_length} "
                      "tokens; raise data.max_prompt_length")


def setup_data(cfg: RunConfig, arch: ModelArch) -> DataBundle:
    d = cfg.data
    train, evals, corpus = _problems(cfg)
    tokenizer, trained = _tokenizer(cfg, corpus)
    if tokenizer.vocab_size > arch.vocab_size:
        raise ConfigError(f"data.tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {arch.vocab_size}")
    bundle = DataBundle(tokenizer, [], [], None, 0, tokenizer if trained else None,  # type: ignore[arg-type]
                        load_hook(d.custom_prompt, "data.custom_prompt") if d.custom_prompt else None)
    fits = lambda p: len(bundle.prompt_ids(p)) <= d.max_prompt_length  # noqa: E731
    bundle.train_problems = [p for p in train if fits(p)]
    bundle.eval_problems = [p for p in evals if fits(p)]
    _nonempty(bundle.train_problems, len(train), cfg, "train")
    _nonempty(bundle.eval_problems, len(evals), cfg, "eval")
    bundle.too_long = len(train) + len(evals) - len(bundle.train_problems) - len(bundle.eval_problems)
    if bundle.too_long:
        log.warning("%d prompts longer than data.max_prompt_length=%d were dropped", bundle.too_long, d.max_prompt_length)
    bundle.train_stream = ProblemStream(bundle.train_problems, cfg.trainer.seed)
    bundle.reference_rng.seed(cfg.trainer.seed)
    return bundle
