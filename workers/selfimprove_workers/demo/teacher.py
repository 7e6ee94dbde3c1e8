"""A teacher for LLM2LLM on the demo task: the demo model trained further until it can write
new practice sums, with their worked answers, in the augment stage's exchange format.

LLM2LLM's teacher (GPT-3.5 in the paper) is a stronger model than the student that reads the
student's wrong question and writes new ones. On 2 CPU cores no such model exists, so the demo
makes one from the student's own warm-started model:

1. **More arithmetic.** The warm-started weights, with the context raised from 256 to
   `max_positions` (rotary positions: nothing positional is learned, so only the config limit
   changes), train on the labeled warm-start rows again until greedy accuracy on the dev split
   reaches `target_accuracy` (the student stops at 50%). Its labels for new questions are then
   right about that often.
2. **The exchange.** It then trains on the augment stage's own requests, rendered exactly as the
   stage renders them (`teacher_messages` with `INSTRUCTIONS` and no exemplar, the plain
   transcript of a model without a chat template), each answered by
   `1. Question: What is <a new sum with as many terms>?\\nAnswer: <steps>\\n#### <sum>`, the new
   sum drawn at random and its steps computed: a teacher taught to vary the numbers and keep the
   kind of problem, which is what LLM2LLM's prompt asks of GPT-3.5.

`INSTRUCTIONS` is short because the student's tokenizer is character-level: LLM2LLM's own
instructions and worked exchange are ~2,000 characters, which this teacher could read only at
several times the training cost; `augment.instructions` / `augment.exemplar: false` are how a user
gives any teacher its own prompt, and the bench does the same.

Both steps are `warm_start` calls, so each is cached on its inputs. `teacher_quality` measures what
the teacher writes for held-out wrong questions: the share of replies that parse, keep the number of
terms, and whose `####` is the right sum of the new question.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .arithmetic import ANSWER_MARK, TaskConfig, make_problem
from .warmstart import _dir_digest, greedy_accuracy, warm_start

__all__ = ["INSTRUCTIONS", "build_teacher", "exchange_rows", "teacher_prompt", "teacher_quality"]

INSTRUCTIONS = ("You write practice sums for a student. For the sum the student got wrong, write a new "
                "sum with as many terms and other numbers, and add it up step by step, in this form:\n"
                "1. Question: What is [TERMS]?\nAnswer: [STEPS]\n#### [SUM]")
DEFAULTS = {"target_accuracy": 0.85, "steps": 4000, "batch_size": 32, "lr": 3e-3, "eval_every": 100,
            "exchanges": 2000, "exchange_steps": 400, "exchange_batch_size": 16, "exchange_lr": 1e-3,
            "max_positions": 1024}
_TERMS = re.compile(r"What is ((?:\d+ \+ )+\d+)\?")


def teacher_prompt(question: str, answer_key: str, tokenizer: Any) -> str:
    """The augment stage's first request for one wrong question, as this teacher reads it."""
    from ..chat import render_messages
    from ..stages.augment import TeacherPrompt, teacher_messages

    messages = teacher_messages(question, answer_key, 1, prompt=TeacherPrompt(INSTRUCTIONS, exemplar=False))
    return render_messages(tokenizer, messages, use_template=False)


def _terms(question: str) -> list[int] | None:
    m = _TERMS.search(question)
    return [int(t) for t in m.group(1).split(" + ")] if m else None


def exchange_rows(rows: Sequence[dict[str, str]], n: int, seed: int, tokenizer: Any,
                  config: TaskConfig | None = None) -> list[dict[str, str]]:
    """`n` prompt/completion rows: a request for a random row of `rows`, answered with a new sum
    of as many terms (other random numbers, `config`'s range) and its worked answer."""
    cfg = config or TaskConfig()
    rng = random.Random(f"selfimprove-demo-teacher-{seed}")
    out = []
    for _ in range(n):
        src = rows[rng.randrange(len(rows))]
        k = len(_terms(src["question"]) or [0, 0])
        new = make_problem(rng, TaskConfig(min_terms=k, max_terms=k, min_value=cfg.min_value,
                                           max_value=cfg.max_value))
        steps = new["answer"].rpartition(ANSWER_MARK)[0].strip()
        out.append({"prompt": teacher_prompt(src["question"], src["answer"], tokenizer),
                    "completion": f" 1. Question: {new['question']}\nAnswer: {steps}\n#### {new['target']}"})
    return out


def _widen(student: Path, out: Path, max_positions: int) -> Path:
    """A copy of the student whose context is `max_positions` (same weights)."""
    mark = out / "student.sha256"
    if out.exists():
        cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
        if cfg.get("max_position_embeddings") == max_positions and mark.exists() and \
                mark.read_text() == _dir_digest(student):
            return out
        shutil.rmtree(out)  # another student or context, or a copy that never finished
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(student, tmp, ignore=shutil.ignore_patterns("warmstart.json"))
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["max_position_embeddings"] = max_positions
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / "student.sha256").write_text(_dir_digest(student))
    tmp.rename(out)
    return out


def build_teacher(student: str | Path, out: str | Path, warm_rows: Sequence[dict[str, str]],
                  dev_rows: Sequence[dict[str, str]], *, seed: int, params: dict[str, Any] | None = None,
                  log_every: int = 0) -> dict[str, Any]:
    """Train the teacher (module docstring) under `out`; its model is `out/model`. Returns the
    two steps' metrics."""
    from transformers import AutoTokenizer

    p = {**DEFAULTS, **(params or {})}
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    base = _widen(Path(student), root / "widened", p["max_positions"])
    arith = warm_start(root / "arith", warm_rows, steps=p["steps"], lr=p["lr"], batch_size=p["batch_size"],
                       seed=seed, base_model_dir=base, dev_data=list(dev_rows),
                       target_accuracy=p["target_accuracy"], eval_every=p["eval_every"], log_every=log_every)
    tok = AutoTokenizer.from_pretrained(root / "arith")
    exchanges = exchange_rows(warm_rows, p["exchanges"], seed, tok)
    taught = warm_start(root / "model", exchanges, steps=p["exchange_steps"], lr=p["exchange_lr"],
                        batch_size=p["exchange_batch_size"], seed=seed, base_model_dir=root / "arith",
                        log_every=log_every)
    return {"model": str(root / "model"), "arithmetic": arith, "exchange": taught}


def teacher_quality(model_dir: str | Path, rows: Sequence[dict[str, str]], *, max_new_tokens: int = 160
                    ) -> dict[str, float]:
    """What the teacher writes, greedily, for each of `rows` taken as a wrong question: the share
    of replies that parse as an item, that keep the number of terms, and whose answer is right;
    and its greedy accuracy on the rows themselves (plain task prompts)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..stages.augment import parse_teacher_reply

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    parsed = same_terms = right = 0
    side, tok.padding_side = tok.padding_side, "left"
    try:
        with torch.no_grad():
            for s in range(0, len(rows), 50):
                chunk = rows[s:s + 50]
                enc = tok([teacher_prompt(r["question"], r["answer"], tok) for r in chunk], return_tensors="pt",
                          padding=True)
                gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                texts = tok.batch_decode(gen[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
                for r, text in zip(chunk, texts, strict=True):
                    items = parse_teacher_reply(text).items
                    if not items:
                        continue
                    parsed += 1
                    terms = _terms(items[0].question)
                    if terms is None:
                        continue
                    same_terms += len(terms) == len(_terms(r["question"]) or [])
                    right += items[0].final == str(sum(terms))
    finally:
        tok.padding_side = side
    n = max(1, len(rows))
    return {"parsed": parsed / n, "sameTerms": same_terms / n, "rightAnswer": right / n,
            "taskAccuracy": greedy_accuracy(model, tok, rows)}
