"""Token sequences as they travel from rollout to trainer: prompts and responses, ragged."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceBatch:
    prompts: list[list[int]]
    responses: list[list[int]]

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.responses):
            raise ValueError(f"SequenceBatch: {len(self.prompts)} prompts but {len(self.responses)} responses")
        for i, prompt in enumerate(self.prompts):
            if not prompt:
                raise ValueError(f"SequenceBatch: sample {i} has an empty prompt (a response token needs a context)")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def response_lengths(self) -> torch.Tensor:
        return torch.tensor([len(r) for r in self.responses], dtype=torch.long)

    @property
    def max_response_length(self) -> int:
        return max((len(r) for r in self.responses), default=0)

    def total_length(self, i: int) -> int:
        return len(self.prompts[i]) + len(self.responses[i])

    def response_mask(self) -> torch.Tensor:
        """[B, max_response_len] float: 1 on response tokens, 0 on padding."""
        lengths = self.response_lengths
        return (torch.arange(self.max_response_length).unsqueeze(0) < lengths.unsqueeze(1)).float()

    def select(self, indices) -> "SequenceBatch":
        return SequenceBatch([self.prompts[i] for i in indices], [self.responses[i] for i in indices])


def pad_rows(rows: list[list[float]], width: int, value: float = 0.0) -> torch.Tensor:
    """Ragged float rows -> [len(rows), width] fp32, right-padded."""
    out = torch.full((len(rows), width), value, dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.float32)
    return out
