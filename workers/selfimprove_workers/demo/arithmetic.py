"""A synthetic arithmetic task with a written-out chain of thought, for the CPU demo.

A question asks for the sum of 4-6 one-digit numbers; the worked answer adds them one at a time,
in an order drawn at random, and ends with `#### N`:

    Question: What is 7 + 1 + 9 + 8 + 4?
    Answer: 7 + 1 = 8, 8 + 8 = 16, 16 + 4 = 20, 20 + 9 = 29 #### 29

Why this task: LMSI only works where sampling many reasoning paths and voting beats the single
greedy path. Addition is commutative, so one question has many valid paths with different
intermediate sums; a tiny model's slips (a wrong sum, a term used twice or skipped) land on
different steps in different paths and mostly disagree with each other, while correct paths
all agree. That is the diversity the majority vote feeds on. One-digit terms keep each step a
small lookup a 2-layer model learns from 2,000 examples; two-digit terms did not train within
the CPU budget (docs/demo-research.md). Everything is driven by the `random.Random` passed in, so a seed
fixes every split.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

__all__ = [
    "TaskConfig",
    "make_problem",
    "make_cot",
    "parse_answer",
    "format_prompt",
    "write_splits",
    "read_jsonl",
]

ANSWER_MARK = "####"
_ANSWER_RE = re.compile(r"####\s*(-?\d+)")


class TaskConfig:
    """Difficulty knobs. Defaults are the ones the research report recommends."""

    def __init__(self, min_terms: int = 4, max_terms: int = 6, min_value: int = 1, max_value: int = 9,
                 distinct: bool = False, random_order: bool = True):
        if not 2 <= min_terms <= max_terms:
            raise ValueError("need 2 <= min_terms <= max_terms")
        if not 0 <= min_value <= max_value:
            raise ValueError("need 0 <= min_value <= max_value")
        if distinct and max_value - min_value + 1 < max_terms:
            raise ValueError("distinct terms need at least max_terms values")
        self.min_terms, self.max_terms = min_terms, max_terms
        self.min_value, self.max_value = min_value, max_value
        self.distinct = distinct
        self.random_order = random_order

    def as_dict(self) -> dict[str, int | bool]:
        return dict(min_terms=self.min_terms, max_terms=self.max_terms, min_value=self.min_value,
                    max_value=self.max_value, distinct=self.distinct,
                    random_order=self.random_order)


def format_prompt(question: str) -> str:
    """The zero-shot prompt the pipeline's prompt builder uses; the model continues with ` {cot} #### {n}`."""
    return f"Question: {question}\nAnswer:"


def make_cot(terms: list[int], order: list[int]) -> str:
    """Worked solution that adds `terms` in the given index order, ending with `#### total`."""
    acc = terms[order[0]]
    steps = []
    for i in order[1:]:
        new = acc + terms[i]
        steps.append(f"{acc} + {terms[i]} = {new}")
        acc = new
    return f"{', '.join(steps)} {ANSWER_MARK} {acc}"


def make_problem(rng: random.Random, config: TaskConfig | None = None) -> dict[str, Any]:
    """One problem: `question` (plain text), `answer` (CoT ending in `#### N`) and `target` (N).

    The answer's summation order is random: the warm-start data has to show the model that
    several orders are valid, otherwise it samples one order only and the vote has nothing
    independent to compare.
    """
    cfg = config or TaskConfig()
    n = rng.randint(cfg.min_terms, cfg.max_terms)
    if cfg.distinct:
        terms = rng.sample(range(cfg.min_value, cfg.max_value + 1), n)
    else:
        terms = [rng.randint(cfg.min_value, cfg.max_value) for _ in range(n)]
    order = list(range(n))
    rng.shuffle(order)  # drawn either way, so both settings share the same questions
    if not cfg.random_order:
        order.sort()
    question = "What is " + " + ".join(str(t) for t in terms) + "?"
    return {"question": question, "answer": make_cot(terms, order), "target": sum(terms)}


def parse_answer(text: str) -> str | None:
    """The final number after `####` (the first one; generation stops at EOS after it)."""
    m = _ANSWER_RE.search(text)
    return m.group(1) if m else None


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_splits(out_dir: str | Path, seed: int, n_warm: int, n_unlabeled: int, n_eval: int,
                 config: TaskConfig | None = None, n_dev: int = 0) -> dict[str, Path]:
    """Write `warmstart.jsonl`, `unlabeled.jsonl` and `eval.jsonl` (and `dev.jsonl` if n_dev > 0).

    `dev.jsonl` is a small labeled set for the warm-start's stopping rule, kept apart from
    `eval.jsonl` so that the held-out accuracy the demo reports never steered training.

    Labeled rows are `{"id", "question", "answer"}`; unlabeled rows are `{"id", "question"}` only,
    so nothing downstream can peek at an answer key (LMSI must label them by voting alone); their
    answers go to `unlabeled.answers.jsonl`, which only the report reads (calibration).
    Questions are unique across all splits, so evaluation never sees a question trained on.
    """
    rng = random.Random(f"selfimprove-demo-arith-{seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, Any]]] = {}
    key: list[dict[str, Any]] = []
    # dev comes last so that adding it leaves the other splits of a seed unchanged.
    for name, count in (("warmstart", n_warm), ("unlabeled", n_unlabeled), ("eval", n_eval),
                        ("dev", n_dev)):
        if name == "dev" and not count:
            continue
        rows: list[dict[str, Any]] = []
        while len(rows) < count:
            p = make_problem(rng, config)
            if p["question"] in seen:
                continue
            seen.add(p["question"])
            row = {"id": f"{name}-{len(rows):05d}", "question": p["question"]}
            if name != "unlabeled":
                row["answer"] = p["answer"]
            else:
                key.append({"id": row["id"], "question": p["question"], "answer": p["answer"]})
            rows.append(row)
        splits[name] = rows
    # The unlabeled questions' answer key, in its own file that no stage reads: only for
    # analysis (`selfimprove report --labels`: LMSI's calibration plot of the sampled votes).
    splits["unlabeled.answers"] = key
    paths = {}
    for name, rows in splits.items():
        paths[name] = out / f"{name}.jsonl"
        _write_jsonl(paths[name], rows)
    return paths
