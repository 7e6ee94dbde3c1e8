"""The one interface both inference engines (vLLM, transformers) implement.

A stage builds one engine per process and hands it all its prompts at once: batching, prefix
caching and scheduling are the engine's job, never a per-question loop in a stage.

Both engines see the same token ids for the same text: `encode_prompt` and `encode_completion`
below are the only tokenization rules, and they match the train stage's (a prompt is encoded on
its own with the tokenizer's special tokens, unless a chat template already wrote the BOS; a
completion is appended without special tokens). A model is therefore scored and sampled on
exactly the ids it was trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import BadInput

# Called with (done, total) while a batch is generated; engines call it at most every few
# seconds and once at the end.
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class GenerationParams:
    n: int = 1                      # completions per prompt
    temperature: float = 0.0        # 0 → greedy
    top_p: float = 1.0
    max_tokens: int = 512           # generated tokens per completion, at most
    seed: int | None = None         # base seed; each prompt draws from its own `prompt_seed`
    # Per-prompt seed keys (the question ids): prompt i draws from prompt_seed(seed, keys[i]),
    # so a prompt samples the same wherever it sits (a shard's batch or the whole set). None:
    # its position in the batch.
    seed_keys: tuple[str, ...] | None = None
    stop: tuple[str, ...] = ()      # the text ends before the first of these (not included)
    # Tokens that end a completion besides the model's EOS ids (`hf.eos_token_ids`): the token a
    # chat template ends an assistant turn with, which training teaches (prompts.answer_end_id).
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class Completion:
    text: str
    tokens: int                     # generated tokens (the EOS token counts when generated)
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"


@dataclass
class GenerationOutput:
    prompt: str
    completions: list[Completion] = field(default_factory=list)
    prompt_tokens: int = 0


class Engine(Protocol):
    """Implemented by `VllmEngine` and `TransformersEngine` (see `load_engine`)."""

    kind: str
    tokenizer: Any                  # a transformers tokenizer
    max_model_len: int              # prompt + completion tokens the engine serves

    def generate(
        self,
        prompts: Sequence[str],
        params: GenerationParams,
        adapter: str | None = None,
        progress: ProgressFn | None = None,
    ) -> list[GenerationOutput]:
        """One output with `params.n` completions per prompt, in order. `adapter` is a local
        peft directory or None (the base model)."""

    def completion_losses(
        self, prompts: Sequence[str], completions: Sequence[str], *, add_eos: bool = False
    ) -> list[float]:
        """Mean per-token negative log-likelihood (nats) of each completion given its prompt,
        under the base model without adapter (IWSI's SFT loss). `add_eos` scores the EOS token
        after the completion too, as the train stage's loss does."""

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Mean-pooled (over the attention mask), L2-normalized last hidden states of the base
        model (LTD's embedding)."""

    def close(self) -> None:
        """Free the model (and vLLM's engine process)."""


# --------------------------------------------------------------------------- shared rules
def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt as every engine (and the train stage) encodes it: with the
    tokenizer's special tokens (a leading BOS), except when the text already starts with the BOS
    text, as a chat template writes it (a second BOS would be a prompt nobody trained on)."""
    bos = getattr(tokenizer, "bos_token", None)
    add = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])


def encode_completion(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a completion appended to a prompt: no special tokens. Encoded on its own
    (not jointly with the prompt), as generation produces it: tokens never merge across the
    prompt/completion boundary."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_seed(seed: int, index: int | str) -> int:
    """The sampling seed of prompt `index` of a batch (or of the prompt keyed `index`: its
    question id, `GenerationParams.seed_keys`).

    Every prompt gets its own seed so results do not depend on how the engine batches or
    schedules (vLLM draws a per-request generator from it). Seeds are hashed, not `seed +
    index`: vLLM gives the n completions of one prompt the seeds `s, s+1, …, s+n-1`, so
    consecutive prompt seeds would share random streams between prompts.
    """
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2  # < 2**62: leaves room for the n children


class PromptTooLong(BadInput):
    """A prompt that leaves no room in the model's context. `fact` is the measurement alone, so
    that a caller whose prompt the user did not write (a judge's) can give its own advice."""

    def __init__(self, fact: str, advice: str = "shorten the prompt (fewer few-shot exemplars)"):
        super().__init__(f"{fact}; {advice}")
        self.fact = fact


def completion_budget(prompt_len: int, max_tokens: int, max_model_len: int, where: str) -> int:
    """Tokens a completion may take after a prompt of `prompt_len` tokens: `max_tokens`, or
    fewer when the context would overflow. A prompt that leaves no room is a PromptTooLong."""
    room = max_model_len - prompt_len
    if room < 1:
        raise PromptTooLong(f"{where}: the prompt is {prompt_len} tokens and the model's context is "
                            f"{max_model_len} (engine.maxModelLen)")
    return min(max_tokens, room)


def scoring_ids(
    tokenizer: Any, prompt: str, completion: str, add_eos: bool, max_model_len: int, where: str
) -> tuple[list[int], int]:
    """(prompt + completion ids, prompt length) for scoring a completion.

    A sequence longer than the context keeps its completion and loses prompt tokens from the
    left (the question sits at the end of a prompt), as the train stage truncates; only a
    completion that alone overflows the context is cut at its end.
    """
    p = encode_prompt(tokenizer, prompt)
    c = encode_completion(tokenizer, completion)
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise BadInput("model.base: the tokenizer has no EOS token to score")
        c = c + [tokenizer.eos_token_id]
    if not c:
        raise BadInput(f"{where}: empty completion; there is nothing to score")
    # vLLM needs room for the one token it generates after a scored prompt.
    limit = max_model_len - 1
    if len(c) >= limit:
        c = c[: limit - 1]
    if len(p) + len(c) > limit:
        keep = limit - len(c)
        bos = getattr(tokenizer, "bos_token_id", None)
        p = ([bos] + p[len(p) - keep + 1:]) if (bos is not None and p and p[0] == bos and keep >= 2) else p[len(p) - keep:]
    return p + c, len(p)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string (excluded), and whether one was found."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
