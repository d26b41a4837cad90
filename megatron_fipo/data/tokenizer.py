"""Tokenizers behind one small interface: sentencepiece (tiny CPU job) and Hugging Face (Qwen2.5)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Protocol


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def render_prompt(self, messages: list[dict]) -> str: ...


class SentencePieceTokenizer:
    def __init__(self, model: str | Path | bytes):
        """``model``: a .model file, or its bytes (a tokenizer trained in memory, saved with the run later)."""
        import sentencepiece as spm

        self.model_proto = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()

    @classmethod
    def train(cls, corpus: Iterable[str], vocab_size: int) -> "SentencePieceTokenizer":
        """Train a small unigram model on ``corpus`` in memory; deterministic for a fixed corpus."""
        import sentencepiece as spm

        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(corpus)), model_writer=model, vocab_size=vocab_size,
            model_type="unigram", character_coverage=1.0, split_digits=True, bos_id=-1, eos_id=1, unk_id=0,
            pad_id=-1, num_threads=1, minloglevel=2, hard_vocab_limit=False,
        )
        return cls(model.getvalue())

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.model_proto)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        # The model's vocabulary is padded past the tokenizer's: such ids decode to nothing.
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size and i != self.eos_id])

    def render_prompt(self, messages: list[dict]) -> str:
        return "\n".join(m["content"] for m in messages)


class HFTokenizer:
    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i < self.vocab_size], skip_special_tokens=True)

    def render_prompt(self, messages: list[dict]) -> str:
        """The tokenizer's chat template with the generation prompt, as the DAPO recipe applies it."""
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
