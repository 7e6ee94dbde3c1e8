"""`selfimprove data gsm8k`: the files the GSM8K example manifests name, from the original
`train.jsonl` / `test.jsonl` (github.com/openai/grade-school-math), in a directory or under an
s3:// prefix.

    train-questions.jsonl   every train question not held out below, `id` + `question` only:
                            LMSI / IWSI never see a label of these
    valid-100.jsonl         100 labeled train examples: IWSI's distribution-shift reference and
                            the split model selection is judged on
    seed-100.jsonl          100 other labeled train examples: LLM2LLM's seed set
    test.jsonl              the 1,319 test examples, labeled, as they are: the reported accuracy

The held-out draws are a seeded permutation of the train file, so the same seed writes the same
files byte for byte. Ids are the row's position in its source file (`gsm8k-train-00042`), stable
whatever is held out. Answers stay in GSM8K's own form (`rationale #### N`): the evaluation reads
the number after `####` as the gold answer and compares the model's extracted final answer to it
numerically — the standard GSM8K accuracy.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfimprove_workers.storage import storage_for

FILES = ("train-questions.jsonl", "valid-100.jsonl", "seed-100.jsonl", "test.jsonl")


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class Prepared:
    out: str
    counts: dict[str, int]


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DatasetError(f"{path}: not found (GSM8K's train.jsonl and test.jsonl are expected in --source)")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or "####" not in str(obj.get("answer", "")):
            raise DatasetError(f"{path}:{lineno}: expected GSM8K's {{\"question\": ..., \"answer\": \"... #### N\"}}")
        rows.append(obj)
    return rows


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


HELD_OUT = 100  # the size in the file names valid-100 / seed-100


def prepare_gsm8k(source: str | Path, out: str, *, seed: int = 0, endpoint: str | None = None) -> Prepared:
    source = Path(source)
    train = [{"id": f"gsm8k-train-{i:05d}", "question": r["question"], "answer": r["answer"]}
             for i, r in enumerate(_rows(source / "train.jsonl"))]
    test = [{"id": f"gsm8k-test-{i:04d}", "question": r["question"], "answer": r["answer"]}
            for i, r in enumerate(_rows(source / "test.jsonl"))]
    if 2 * HELD_OUT >= len(train):
        raise DatasetError(f"{source / 'train.jsonl'}: {len(train)} rows; at least {2 * HELD_OUT + 1} are needed")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    valid_idx = sorted(order[:HELD_OUT])
    seed_idx = sorted(order[HELD_OUT:2 * HELD_OUT])
    held = set(valid_idx) | set(seed_idx)
    files = {
        "train-questions.jsonl": [{"id": r["id"], "question": r["question"]} for i, r in enumerate(train) if i not in held],
        "valid-100.jsonl": [train[i] for i in valid_idx],
        "seed-100.jsonl": [train[i] for i in seed_idx],
        "test.jsonl": test,
    }
    prefix = out if out.endswith("/") else out + "/"
    if "://" not in prefix:
        Path(prefix).mkdir(parents=True, exist_ok=True)
        prefix = Path(prefix).resolve().as_uri() + "/"
    storage = storage_for(prefix, endpoint=endpoint)
    for name, rows in files.items():
        storage.write_bytes(prefix + name, _jsonl(rows))
    return Prepared(prefix, {name: len(rows) for name, rows in files.items()})
