"""Question data: JSONL files of ``{"question": ..., "answer": ..., "id": ...}``.

``question`` is required (a non-empty string); ``answer`` (string or number) and ``id`` (string or
integer) are optional; other fields are ignored. GSM8K-style answers end in ``#### <final>``: the
text before is the rationale, the text after the final answer.

Every problem is reported as ``DataError("<file>:<line>: <reason>")`` so a user can go straight
to the bad line.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import DataError
from .storage import Storage, display_name, json_type_name, read_jsonl

__all__ = ["Example", "split_final_answer", "example_id", "parse_example", "load_examples"]

_FINAL_MARK = "####"
# A comma between digit groups of three ("1,000", "12,345,678"), not one in "3, 4" or "1,5".
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


@dataclass(frozen=True)
class Example:
    """One question, with its answer split into rationale and final answer when there is one."""

    id: str
    question: str
    answer: str | None
    """The raw answer text as given (numbers converted to text)."""
    rationale: str | None
    """The reasoning before ``####``; ``None`` when the answer has no ``####`` or no answer."""
    final: str | None
    """The final answer (thousands commas removed); ``None`` when there is no answer."""


def split_final_answer(text: str) -> tuple[str | None, str]:
    """Split an answer into ``(rationale, final)``.

    ``"Adds 2 and 3.\\n#### 1,005"`` → ``("Adds 2 and 3.", "1005")``. Without ``####`` the
    rationale is ``None`` and the final answer is the whole (stripped) text. Thousands separators are
    removed from the final answer so ``1,000`` and ``1000`` compare equal.
    """
    if _FINAL_MARK in text:
        before, _, after = text.rpartition(_FINAL_MARK)
        rationale: str | None = before.strip() or None
        final = after.strip()
    else:
        rationale, final = None, text.strip()
    return rationale, _THOUSANDS_COMMA.sub("", final)


def example_id(question: str) -> str:
    """Stable id for a question without one: the same text gets the same id in every file/round."""
    return "q-" + hashlib.sha1(question.strip().encode("utf-8")).hexdigest()[:12]


def parse_example(obj: Any, where: str) -> Example:
    """Validate one parsed JSON line; ``where`` (``file:line``) prefixes every error message."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {json_type_name(obj)}")

    if "question" not in obj or obj["question"] is None:
        raise DataError(f'{where}: missing "question"')
    question = obj["question"]
    if not isinstance(question, str):
        raise DataError(f'{where}: "question" must be a string, got {json_type_name(question)}')
    if not question.strip():
        raise DataError(f'{where}: "question" is empty')

    answer: str | None
    raw_answer = obj.get("answer")
    if raw_answer is None:
        answer = None
    elif isinstance(raw_answer, bool):
        # bool is an int subclass in Python; true/false is almost surely a data bug.
        raise DataError(f'{where}: "answer" must be a string or number, got boolean')
    elif isinstance(raw_answer, int):
        answer = str(raw_answer)
    elif isinstance(raw_answer, float):
        if not math.isfinite(raw_answer):
            raise DataError(f'{where}: "answer" must be a finite number, got {raw_answer}')
        answer = repr(raw_answer)
    elif isinstance(raw_answer, str):
        if not raw_answer.strip():
            raise DataError(f'{where}: "answer" is empty (omit it or use null for no answer)')
        answer = raw_answer
    else:
        raise DataError(
            f'{where}: "answer" must be a string or number, got {json_type_name(raw_answer)}'
        )

    rationale = final = None
    if answer is not None:
        rationale, final = split_final_answer(answer)
        if not final:
            raise DataError(f'{where}: "answer" has nothing after "{_FINAL_MARK}"')

    raw_id = obj.get("id")
    if raw_id is None:
        ex_id = example_id(question)
    elif isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        raise DataError(f'{where}: "id" must be a string or integer, got {json_type_name(raw_id)}')
    else:
        ex_id = str(raw_id)
        if not ex_id.strip():
            raise DataError(f'{where}: "id" is empty')

    return Example(id=ex_id, question=question, answer=answer, rationale=rationale, final=final)


def load_examples(
    storage: Storage, uri: str, *, require_answer: bool = False, limit: int | None = None
) -> list[Example]:
    """Load and validate a question file, streaming it line by line.

    ``require_answer`` makes a missing answer an error (labeled sets: seed, validation,
    evaluation). ``limit`` stops after that many examples without reading the rest. Ids must be
    unique within the file; the second occurrence is reported with the line of the first.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    display = display_name(uri)
    out: list[Example] = []
    first_line: dict[str, int] = {}
    if limit == 0:
        return out
    for lineno, obj in read_jsonl(storage, uri):
        where = f"{display}:{lineno}"
        ex = parse_example(obj, where)
        if require_answer and ex.answer is None:
            raise DataError(f'{where}: missing "answer"')
        if ex.id in first_line:
            raise DataError(
                f"{where}: duplicate id {ex.id!r} (first on line {first_line[ex.id]})"
            )
        first_line[ex.id] = lineno
        out.append(ex)
        if limit is not None and len(out) >= limit:
            break
    return out
