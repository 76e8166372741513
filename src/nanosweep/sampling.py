"""Text from a trained model, with nanoGPT's sample.py defaults."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanosweep.config import ConfigError, check_value
from nanosweep.data import Vocab
from nanosweep.model import GPT

SAMPLE_SEPARATOR = "\n---------------\n"  # what nanoGPT's sample.py prints between samples


@dataclass(frozen=True)
class SampleSettings:
    prompt: str = "\n"  # nanoGPT's start
    num_samples: int = 10
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int = 200
    seed: int = 1337

    def __post_init__(self) -> None:
        """TrainConfig's rules for its sampling fields: a run's samples, `nanosweep sample` and a served model agree."""
        if not self.prompt:
            raise ConfigError("prompt='' is not allowed: give at least one character (nanoGPT's default is a newline)")
        for name in ("num_samples", "max_new_tokens", "temperature", "top_k"):
            check_value(name, getattr(self, name))
        check_value("sample_seed", self.seed)


def generate_texts(model: GPT, vocab: Vocab, settings: SampleSettings) -> list[str]:
    """num_samples continuations of the prompt, generated as one batch (seeded, so repeatable)."""
    if settings.num_samples == 0:
        return []
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(settings.seed)
    start = torch.tensor([vocab.encode(settings.prompt)] * settings.num_samples, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    out = model.generate(start, settings.max_new_tokens, settings.temperature, settings.top_k, generator=generator)
    model.train(was_training)
    return [vocab.decode(row.tolist()) for row in out]


def format_samples(texts: list[str]) -> str:
    return "".join(text + SAMPLE_SEPARATOR for text in texts)
