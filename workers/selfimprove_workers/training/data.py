"""Training data: rows → rendered prompts and targets → token arrays → batches.

Every training row is rendered once per configured prompt format (LMSI's mixed formats) with the
same `prompts` functions the sample and evaluate stages use, so the model is trained on exactly
the text it is later asked. The prompt is tokenized on its own, the way an inference engine
encodes it, and the target's tokens are appended: training then sees precisely the ids that
generation continues from (tokenizing prompt+target jointly could merge tokens across the
boundary, which generation never does).

All sequences are kept in one flat int32 array with offsets (no per-example Python objects), so
collating a batch is a few vectorized numpy operations. Labels are the input ids with every
prompt position set to -100: the loss is on the answer only.

No torch here: the stage validates and tokenizes its inputs before the heavy libraries load.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from ..errors import BadInput, DataError
from ..prompts import ANSWER_TEMPLATE, TrainingRow, answer_end_id, render_prompt, render_target, training_row, uses_chat_template
from ..spec import FewShotExample, PromptFormat, TaskSpec
from ..storage import Storage, display_name, read_jsonl

__all__ = [
    "IGNORE_INDEX",
    "EncodedExamples",
    "load_training_rows",
    "load_exemplars",
    "resolve_format",
    "resolve_formats",
    "encode_prompts",
    "encode_examples",
    "plan_epoch",
    "batch_digest",
]

IGNORE_INDEX = -100
"""Label of positions that carry no loss (the prompt, padding): PyTorch's cross-entropy default."""

# HF's LengthGroupedSampler groups `50 × batch` random examples and sorts them by length: big
# enough that neighbouring lengths are close (little padding), small enough that batches still
# mix the whole data set over an epoch.
MEGABATCH_MULT = 50

log = logging.getLogger("selfimprove.train")

StorageFor = Callable[[str], Storage]


# --------------------------------------------------------------------------- loading
def load_training_rows(storage_for: StorageFor, uris: Sequence[str], template: str = ANSWER_TEMPLATE) -> list[TrainingRow]:
    """Every row of every training file, in file order. A bad line raises DataError `file:line`."""
    rows: list[TrainingRow] = []
    for uri in uris:
        shown = display_name(uri)
        n = len(rows)
        for lineno, obj in read_jsonl(storage_for(uri), uri):
            rows.append(training_row(obj, f"{shown}:{lineno}", template))
        log.info(f"{shown}: {len(rows) - n} training rows")
    if not rows:
        raise BadInput(f"inputs.train: no training examples in {', '.join(map(display_name, uris))}")
    return rows


def load_exemplars(storage_for: StorageFor, task: TaskSpec) -> list[FewShotExample]:
    """`task.fewShot` followed by the rows of `task.fewShotFile` (when set)."""
    shots = list(task.few_shot)
    if task.few_shot_file:
        from ..validation import describe

        uri = task.few_shot_file
        shown = display_name(uri)
        for lineno, obj in read_jsonl(storage_for(uri), uri):
            try:
                shots.append(FewShotExample.model_validate(obj))
            except ValidationError as exc:
                raise DataError(f"{shown}:{lineno}: {describe(exc)}") from None
    return shots


# --------------------------------------------------------------------------- formats
def resolve_format(fmt: PromptFormat, has_exemplars: bool) -> PromptFormat:
    """A few-shot format without exemplars is its zero-shot variant.

    Rendered without exemplars, `fewShotCot` would be the bare question with a reasoning target
    — neither LMSI's few-shot nor its zero-shot CoT prompt (which carries the step-by-step
    trigger) — so it falls back to the zero-shot variant, whose prompt is well defined.
    """
    if fmt.startswith("fewShot") and not has_exemplars:
        return "zeroShot" + fmt[len("fewShot"):]  # type: ignore[return-value]
    return fmt


def resolve_formats(formats: Iterable[PromptFormat], has_exemplars: bool) -> list[PromptFormat]:
    """`resolve_format` of each, duplicates removed (order kept): two formats that render the
    same prompt would silently double the weight of those examples."""
    return list(dict.fromkeys(resolve_format(f, has_exemplars) for f in formats))


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of prompts, as the inference engines encode them (`engines.base.encode_prompt`,
    batched): with the tokenizer's special tokens (a leading BOS), except for a text that already
    starts with the BOS text, as a chat template writes it — a second BOS would train on a prompt
    no engine ever sends."""
    bos = getattr(tokenizer, "bos_token", None)
    has_bos = [bool(bos) and p.startswith(str(bos)) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    for already in (False, True):
        idx = [i for i, b in enumerate(has_bos) if b == already]
        if idx:
            ids = tokenizer([prompts[i] for i in idx], add_special_tokens=not already)["input_ids"]
            for i, e in zip(idx, ids):
                out[i] = list(e)
    return out


# --------------------------------------------------------------------------- encoding
@dataclass
class EncodedExamples:
    """Training sequences (prompt + target + EOS) as flat arrays.

    `tokens[offsets[i] : offsets[i] + lengths[i]]` is sequence i; its first `prompt_lengths[i]`
    tokens are the prompt (label -100), the rest the answer.
    """

    tokens: np.ndarray          # int32, all sequences concatenated
    offsets: np.ndarray         # int64
    lengths: np.ndarray         # int32
    prompt_lengths: np.ndarray  # int32
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def answer_lengths(self) -> np.ndarray:
        return self.lengths - self.prompt_lengths

    def collate(self, idx: np.ndarray, pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, np.ndarray]:
        """A right-padded batch (dynamic padding: as wide as its longest sequence), vectorized.

        Returns int64 `input_ids`, `attention_mask` and `labels` (prompt and padding = -100).
        """
        idx = np.asarray(idx, dtype=np.int64)
        lens = self.lengths[idx].astype(np.int64)
        width = int(lens.max())
        if pad_to_multiple_of > 1:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        pos = np.arange(width, dtype=np.int64)[None, :]
        valid = pos < lens[:, None]
        gather = self.offsets[idx][:, None] + np.minimum(pos, lens[:, None] - 1)
        ids = np.where(valid, self.tokens[gather], pad_id).astype(np.int64)
        answer = valid & (pos >= self.prompt_lengths[idx][:, None])
        labels = np.where(answer, ids, IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": valid.astype(np.int64), "labels": labels}

    def save(self, path: Path) -> None:
        np.savez(path, tokens=self.tokens, offsets=self.offsets, lengths=self.lengths,
                 prompt_lengths=self.prompt_lengths, stats=np.array(json.dumps(self.stats)))

    @classmethod
    def load(cls, path: Path) -> "EncodedExamples":
        with np.load(path) as z:
            return cls(z["tokens"], z["offsets"], z["lengths"], z["prompt_lengths"],
                       json.loads(str(z["stats"])))


def encode_examples(
    rows: Sequence[TrainingRow],
    formats: Sequence[PromptFormat],
    task: TaskSpec,
    tokenizer: Any,
    max_length: int,
    exemplars: Sequence[FewShotExample] = (),
) -> EncodedExamples:
    """Render every row in every format and tokenize it, ready for `collate`.

    A sequence longer than `max_length` keeps its whole answer and loses prompt tokens from the
    left (the question sits at the end of the prompt; the exemplars go first), keeping a leading
    BOS. An example is dropped, and counted, only when even its answer does not fit after one
    prompt token.
    """
    eos = answer_end_id(task, tokenizer)
    if eos is None:
        raise BadInput("model.base: the tokenizer has no EOS token; training could not teach the model to stop")
    formats = list(formats)
    chat = uses_chat_template(task, tokenizer)
    prompts: list[str] = []
    targets: list[str] = []
    for row in rows:
        for fmt in formats:
            prompts.append(render_prompt(task, row.question, fmt, tokenizer, exemplars))
            targets.append(render_target(fmt, row.cot, row.answer, chat, task.answer_template))
    prompt_ids = encode_prompts(tokenizer, prompts)
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id

    seqs: list[list[int]] = []
    plen: list[int] = []
    truncated = dropped = 0
    for p, t in zip(prompt_ids, target_ids):
        t = t + [eos]
        room = max_length - len(t)
        if room < 1:
            dropped += 1
            continue
        if len(p) > room:
            truncated += 1
            keep_bos = bos is not None and p and p[0] == bos and room >= 2
            p = ([bos] + p[len(p) - room + 1:]) if keep_bos else p[len(p) - room:]
        seqs.append(p + t)
        plen.append(len(p))
    if not seqs:
        raise BadInput(
            f"training.maxLength: {max_length} tokens fit none of the {len(prompts)} training "
            "examples' answers; raise it"
        )
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int32, count=len(seqs))
    offsets = np.zeros(len(seqs), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    tokens = np.fromiter(chain.from_iterable(seqs), dtype=np.int32, count=int(lengths.sum()))
    stats = {
        "rows": len(rows),
        "formats": formats,
        "sequences": len(seqs),
        "truncated": truncated,
        "dropped": dropped,
        "tokens": int(lengths.sum()),
        "answerTokens": int(lengths.sum() - sum(plen)),
        "maxSequence": int(lengths.max()),
    }
    return EncodedExamples(tokens, offsets, lengths, np.asarray(plen, dtype=np.int32), stats)


# --------------------------------------------------------------------------- batch order
def plan_epoch(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[np.ndarray]:
    """The batches (arrays of example indices) of one epoch.

    A pure function of (lengths, batch size, seed, epoch): a run resumed at epoch e sees exactly
    the order an uninterrupted run would have, without storing any sampler state.

    With `group_by_length`, random megabatches of `50 × batch_size` examples are sorted by length
    and cut into batches (HF's LengthGroupedSampler), so a batch pads to a length close to its
    members'. The batches are then shuffled — sorting within megabatches alone would make the
    length of consecutive batches drift with the learning-rate schedule — and the batch holding
    the longest sequence goes first, so an out-of-memory shows at step 1, not hours in.
    """
    n = int(lengths.shape[0])
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    if not group_by_length:
        return [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    mega = MEGABATCH_MULT * batch_size
    batches: list[np.ndarray] = []
    for start in range(0, n, mega):
        chunk = perm[start:start + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    batches = [batches[i] for i in rng.permutation(len(batches))]
    longest = int(np.argmax([lengths[b].max() for b in batches]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def batch_digest(indices: Iterable[np.ndarray]) -> str:
    """Short fingerprint of the examples of one optimizer step (recorded per step: proves that
    a resumed run trains on the same data order as an uninterrupted one)."""
    h = hashlib.blake2b(digest_size=8)
    for idx in indices:
        h.update(np.asarray(idx, dtype=np.int64).tobytes())
    return h.hexdigest()
