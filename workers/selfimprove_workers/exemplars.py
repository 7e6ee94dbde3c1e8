"""Few-shot exemplar refresh for teacher→student LMSI (strategy `lmsi-teacher`): the parameter
model and the selection, pure (no engine, no storage), so both are unit-testable.

Each round the student (base + this round's adapter) answers the questions its teacher was most
confident about; a question is a candidate when the student's own majority over `paths` sampled
paths agrees with the teacher's majority and the student's confidence is at least
`minConfidence`. Of the candidates, `count` become the teacher's exemplars for the next round:
`confidence` takes the most confident (ties: the teacher's confidence, then the id); `diverse`
starts from the most confident and then repeatedly adds the candidate whose question is farthest
(1 - Jaccard similarity of word sets) from every exemplar chosen so far, ties by confidence —
farthest-point selection, so a handful of exemplars covers more of the question distribution.
Fewer candidates than `count`: the round's current exemplars fill the remaining places.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from .spec import FewShotExample, Probability, PromptFormat, WireModel


class ExemplarsSpec(WireModel):
    count: int = Field(4, ge=1, le=64, description="Exemplars the teacher's next prompts get.")
    selection: Literal["confidence", "diverse"] = Field(
        "confidence", description="confidence: the student's most confident agreed answers; diverse: "
        "farthest-point selection over the questions' word sets, starting from the most confident.")
    questions: int = Field(
        64, ge=1, le=100000,
        description="Questions the student answers: the ones the teacher was most confident about.")
    paths: int = Field(8, ge=1, le=256, description="Paths the student samples per question for its own vote.")
    temperature: float = Field(0.7, ge=0.0, le=5.0, description="The student's sampling temperature.")
    max_tokens: int = Field(512, ge=1, le=32768, description="Generated tokens per path, at most.")
    min_confidence: Probability = Field(
        0.5, description="Least student confidence (its majority's share of paths) of a candidate.")
    format: PromptFormat = Field(
        "zeroShotCot", description="Prompt format the student answers in (how it was trained and is evaluated).")


@dataclass(frozen=True)
class Candidate:
    id: str
    question: str
    answer: str                 # the agreed answer (student majority == teacher majority)
    rationale: str              # from the student's first path giving it, answer sentence removed
    student_confidence: float
    teacher_confidence: float


def rationale_of(text: str, answer: str, template: str) -> str:
    """The reasoning of a sampled path: the text before its answer sentence (the template filled
    in with the answer), else everything but its last line."""
    text = text.strip()
    sentence = template.replace("{answer}", answer)
    at = text.rfind(sentence)
    if at >= 0:
        return text[:at].strip()
    lines = text.splitlines()
    return "\n".join(lines[:-1]).strip()


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"\w+", text.lower()))


def _distance(a: frozenset[str], b: frozenset[str]) -> float:
    union = a | b
    return 1.0 - (len(a & b) / len(union) if union else 1.0)


def select(candidates: Sequence[Candidate], count: int, selection: str) -> list[Candidate]:
    """`count` of the candidates, by `selection` (module docstring). Deterministic."""
    ranked = sorted(candidates, key=lambda c: (-c.student_confidence, -c.teacher_confidence, c.id))
    if selection == "confidence" or len(ranked) <= count:
        return ranked[:count]
    chosen = [ranked[0]]
    words = {c.id: _words(c.question) for c in ranked}
    rest = ranked[1:]
    while len(chosen) < count and rest:
        # max over the remaining of (min distance to the chosen); `max` keeps the first of equals,
        # and `rest` is in confidence order, so ties go to the more confident.
        best = max(rest, key=lambda c: min(_distance(words[c.id], words[x.id]) for x in chosen))
        chosen.append(best)
        rest.remove(best)
    return chosen


def fill(chosen: Sequence[Candidate], current: Sequence[FewShotExample], count: int) -> list[FewShotExample]:
    """The next exemplars: the chosen ones, then current ones with other questions, up to `count`."""
    out = [FewShotExample(question=c.question, rationale=c.rationale, answer=c.answer) for c in chosen]
    seen = {c.question for c in chosen}
    for ex in current:
        if len(out) >= count:
            break
        if ex.question not in seen:
            out.append(ex)
            seen.add(ex.question)
    return out[:count]
