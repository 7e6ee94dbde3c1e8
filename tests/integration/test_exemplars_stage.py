"""The `exemplars` stage through the real runtime, with a stand-in engine whose paths are written
by hand: which questions the student is asked, agreement with the teacher, the confidence bar,
the selection, the fill from the current exemplars, and what the round's artifacts record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from selfimprove_workers.contract import StageTask
from selfimprove_workers.engines.base import Completion, GenerationOutput
from selfimprove_workers.errors import BadInput
from selfimprove_workers.runtime import run_task

QUESTIONS = {f"q{i}": f"What is {i} + {i}?" for i in range(5)}
# teacher votes: q4 has no majority; confidences order the questions asked (q0 first)
TEACHER = [("q0", "0", 1.0), ("q1", "2", 0.9), ("q2", "4", 0.8), ("q3", "6", 0.7), ("q4", None, 0.0)]
# the student's paths per question
STUDENT = {
    "What is 0 + 0?": ["0 + 0 = 0 #### 0", "0 + 0 = 0 #### 0"],          # agrees, confidence 1
    "What is 1 + 1?": ["1 + 1 = 2 #### 2", "1 + 1 = 3 #### 3"],          # agrees, confidence 0.5
    "What is 2 + 2?": ["2 + 2 = 5 #### 5", "2 + 2 = 5 #### 5"],          # confident, disagrees
    "What is 3 + 3?": ["3 + 3 = 6 #### 6", "3+3 makes 6 #### 6"],        # agrees, confidence 1
}


class Student:
    kind, tokenizer, max_model_len = "stub", None, 4096

    def __init__(self):
        self.prompts: list[str] = []

    def generate(self, prompts, params, adapter=None, progress=None):
        self.prompts += prompts
        out = []
        for p in prompts:
            q = p.rsplit("Question: ", 1)[1].split("\n")[0]
            out.append(GenerationOutput(prompt=p, completions=[Completion(t, tokens=5) for t in STUDENT[q][: params.n]]))
        return out

    def close(self):
        pass


def write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def student(monkeypatch):
    import selfimprove_workers.engines as engines

    engine = Student()
    monkeypatch.setattr(engines, "open_model", lambda *a, **k: (engine, None))
    return engine


def task(tmp: Path, **exemplars) -> StageTask:
    q = write(tmp / "q.jsonl", [{"id": i, "question": t} for i, t in QUESTIONS.items()])
    v = write(tmp / "votes.jsonl", [{"id": i, "question": QUESTIONS[i], "majority": m, "confidence": c} for i, m, c in TEACHER])
    return StageTask.model_validate({
        "run": {"name": "r"}, "round": 1, "stage": "exemplars", "output": (tmp / "exemplars").as_uri() + "/",
        "model": {"base": str(tmp / "student"), "adapter": str(tmp / "adapter")},
        "inputs": {"questions": q, "votes": v},
        "prompting": {"answerTemplate": "#### {answer}", "cotTrigger": "",
                      "fewShot": [{"question": "What is 9 + 9?", "rationale": "9 + 9 = 18", "answer": "18"}]},
        "exemplars": {"count": 2, "paths": 2, "questions": 4, "minConfidence": 0.6, **exemplars},
    })


def test_the_students_confident_agreed_answers_become_the_exemplars(tmp_path, student):
    result = run_task(task(tmp_path))
    out = tmp_path / "exemplars"
    rows = [json.loads(x) for x in (out / "exemplars.jsonl").read_text().splitlines()]
    assert rows == [{"question": "What is 0 + 0?", "rationale": "0 + 0 = 0", "answer": "0"},
                    {"question": "What is 3 + 3?", "rationale": "3 + 3 = 6", "answer": "6"}]
    assert result.metrics | {"seconds": 0} == {"answered": 4, "candidates": 2, "refreshed": 2, "carried": 0,
                                               "meanStudentConfidence": 0.875, "seconds": 0}
    # the teacher's four most confident answered questions were asked; q4 (no majority) was not
    assert len(student.prompts) == 4 and not any("4 + 4" in p for p in student.prompts)
    cands = {c["id"]: c for c in map(json.loads, (out / "candidates.jsonl").read_text().splitlines())}
    assert (cands["q1"]["agreed"], cands["q2"]["agreed"], cands["q2"]["studentMajority"]) == (True, False, "5")
    chosen = [json.loads(x) for x in (out / "chosen.jsonl").read_text().splitlines()]
    assert [(c["rank"], c["id"], c["source"], c["studentConfidence"]) for c in chosen] == [(1, "q0", "student", 1.0),
                                                                                         (2, "q3", "student", 1.0)]


def test_too_few_candidates_are_filled_from_the_current_exemplars(tmp_path, student):
    run_task(task(tmp_path, count=3, minConfidence=1.0, questions=1))
    chosen = [json.loads(x) for x in (tmp_path / "exemplars" / "chosen.jsonl").read_text().splitlines()]
    assert [(c["question"], c["source"]) for c in chosen] == [("What is 0 + 0?", "student"), ("What is 9 + 9?", "carried")]


def test_no_exemplar_at_all_is_a_bad_input(tmp_path, student):
    t = task(tmp_path, minConfidence=1.0, questions=1)
    t = t.model_copy(update={"prompting": t.prompting.model_copy(update={"few_shot": []})})
    STUDENT_BACKUP = STUDENT["What is 0 + 0?"]
    STUDENT["What is 0 + 0?"] = ["0 + 0 = 1 #### 1", "#### 2"]
    try:
        with pytest.raises(BadInput, match="no exemplar chosen and none to carry over"):
            run_task(t)
    finally:
        STUDENT["What is 0 + 0?"] = STUDENT_BACKUP
