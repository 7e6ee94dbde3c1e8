"""The one interface both inference engines (vLLM, transformers) implement.

A stage builds one engine per process and hands it all its prompts at once: batching, prefix
caching and scheduling are the engine's job, never a per-question loop in a stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class GenerationParams:
    n: int = 1                      # completions per prompt
    temperature: float = 0.0        # 0 → greedy
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    text: str
    tokens: int                     # generated tokens
    finish_reason: str | None = None


@dataclass
class GenerationOutput:
    prompt: str
    completions: list[Completion] = field(default_factory=list)


class Engine(Protocol):
    """Implemented by `VllmEngine` and `TransformersEngine` (see `load_engine`)."""

    kind: str
    tokenizer: object               # a transformers tokenizer

    def generate(
        self, prompts: Sequence[str], params: GenerationParams, adapter: str | None = None
    ) -> list[GenerationOutput]:
        """One output per prompt, in order. `adapter` is a local peft directory or None."""

    def completion_losses(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Mean per-token negative log-likelihood of each completion given its prompt, under the
        base model without adapter (IWSI's SFT loss)."""

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Mean-pooled, L2-normalized last hidden states (LTD's embedding)."""

    def close(self) -> None:
        """Free the model (and vLLM's engine process)."""
