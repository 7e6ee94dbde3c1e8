"""Label-aware selection (STaR / RFT / ReST-EM: the `correct` filter) and the rewardModel filter's
parameters: RFT's equation lists on GSM8K-style paths, the cap and de-duplication, STaR's
rationalization (the hint reaches the model, never the training row), and the errors a user sees."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError
from selfimprove_workers.contract import StageTask
from selfimprove_workers.data import parse_example
from selfimprove_workers.engines.base import Completion, GenerationOutput
from selfimprove_workers.errors import BadInput
from selfimprove_workers.runtime import StageContext
from selfimprove_workers.spec import CorrectFilter, FilterSpec, RewardModelFilter
from selfimprove_workers.stages import filter as filter_stage
from selfimprove_workers.stages.filter_extra import HINT, correct, equation_list, load_labels, select_correct
from selfimprove_workers.validation import describe

GSM8K_PATH = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


@pytest.mark.parametrize("text, expected", [
    (GSM8K_PATH, ("48/2=24", "48+24=72")),
    # The annotations win over the plain-text equations around them (RFT's own key).
    ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute. 0.2 x 50 = $<<0.2*50=10>>10.", ("12/60=0.2", "0.2*50=10")),
    ("In May she sold 48 / 2 = 24 clips. Altogether 48 + 24 = 72. The answer is 72.", ("48/2=24", "48+24=72")),
    ("He pays $1,200 × 3 = $3,600, then 3 x 4 = 12 and 10 - (2 + 3) = 5.", ("1200*3=3600", "3*4=12", "10-(2+3)=5")),
    ("Chained: 2 + 3 = 5 * 2 = 10.", ("2+3=5", "5*2=10")),
    ("Half is 0.5*4=2, so 3÷3 = 1.", ("0.5*4=2", "3/3=1")),
    ("In 2019 = the year, x = 5 and 5 apples. The answer is 5.", ()),   # no arithmetic expression
    ("", ()),
])
def test_equation_list(text: str, expected: tuple[str, ...]) -> None:
    assert equation_list(text) == expected


def test_equation_list_ignores_spacing_and_separators() -> None:
    assert equation_list("48 / 2 = 24 and 1,000 + 5 = 1,005") == equation_list("48/2=24 and 1000+5=1005")
    assert equation_list("<<48 / 2=24>>") == equation_list("<<48/2=24>>")


def cand(qid: str, path: int, text: str, answer: str | None, majority: str = "72") -> filter_stage.Candidate:
    return filter_stage.Candidate(qid, f"question {qid}", path, text, answer, majority, 0.5, 0.5)


def labels(**golds: str) -> dict[str, Any]:
    return {qid: parse_example({"id": qid, "question": f"question {qid}", "answer": f"work\n#### {g}"}, "x")
            for qid, g in golds.items()}


def test_select_correct_drops_wrong_duplicates_and_over_cap() -> None:
    cands = [
        cand("a", 0, "48/2 = 24, 48+24 = 72. The answer is 72.", "72"),
        cand("a", 1, "She sold 48 / 2 = 24 then 48 + 24 = 72 in all.", "72.0"),   # same equations: duplicate
        cand("a", 2, "48 - 24 = 24, 24 * 3 = 72.", "72"),
        cand("a", 3, "Wrong: 48 + 2 = 50.", "50"),
        cand("a", 4, "72 = 72, 36 * 2 = 72.", "72"),                              # over the cap of 2
        cand("b", 0, "1 + 1 = 2", None, majority="2"),                           # no answer: never correct
        cand("b", 1, "1 + 1 = 2", "2", majority="3"),                            # gold, not the majority
    ]
    kept, counts = select_correct(cands, labels(a="72", b="2"), max_per_question=2, dedup="equations")
    assert [(c.id, c.path) for c in kept] == [("a", 0), ("a", 2), ("b", 1)]
    assert counts == {"wrong": 2, "duplicates": 1, "overCap": 1}
    assert [c.row()["answer"] for c in kept] == ["72", "72", "2"]   # the gold answer, not the majority
    kept, counts = select_correct(cands, labels(a="72", b="2"), max_per_question=None, dedup="none")
    assert len(kept) == 5 and counts == {"wrong": 2, "duplicates": 0, "overCap": 0}


class _Engine:
    tokenizer = None

    def __init__(self, reply: str):
        self.reply, self.prompts = reply, []

    def generate(self, prompts, params, adapter=None, progress=None):
        self.prompts.extend(prompts)
        return [GenerationOutput(prompt=p, completions=[Completion(text=self.reply, tokens=5, finish_reason="stop")
                                                        for _ in range(params.n)], prompt_tokens=1) for p in prompts]


def _fr(engine: _Engine, golds: dict[str, Any], tmp: Path) -> filter_stage.FilterRun:
    task = StageTask.model_validate({
        "run": {"name": "r"}, "round": 1, "stage": "filter", "output": str(tmp / "out"),
        "model": {"base": "/models/base"}, "inputs": {"samples": "s", "votes": "v", "questions": "q.jsonl"},
        "filters": [{"correct": {"rationalize": True}}],
    })
    ctx = SimpleNamespace(task=task, storage_for=lambda uri: None, local_dir=lambda uri: Path(uri))
    return filter_stage.FilterRun(ctx, SimpleNamespace(get=lambda uri: engine), [], golds)


def test_rationalization_keeps_the_rationale_not_the_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selfimprove_workers.training import data as training_data

    monkeypatch.setattr(training_data, "load_exemplars", lambda storage_for, task: [])
    engine = _Engine("She has 3 + 4 = 7 apples. The answer is 7.")
    golds = labels(a="72", b="7", c="9")
    fr = _fr(engine, golds, tmp_path)
    cands = [cand("a", 0, "48/2 = 24, 48+24 = 72.", "72"), cand("b", 0, "3 + 3 = 6.", "6", majority="6")]
    kept, info = correct(fr, cands, CorrectFilter(rationalize=True))
    # b (wrong path) and c (no path at all) are re-prompted with their gold answers as hints.
    assert len(engine.prompts) == 2
    assert HINT.format(answer="7") in engine.prompts[0] and HINT.format(answer="9") in engine.prompts[1]
    assert info["rationalized"] == 2 and info["rationalizedKept"] == 1   # c's rationale says 7, not 9
    assert [(c.id, c.path) for c in kept] == [("a", 0), ("b", 10000)]
    row = kept[1].row()
    assert row["question"] == "question b" and "Hint" not in row["question"]   # the original prompt
    assert row["cot"] == engine.reply and row["answer"] == "7" and row["rationalized"] is True
    assert "Hint" not in json.dumps(row)


def test_a_question_outside_the_labels_is_named(tmp_path: Path) -> None:
    fr = _fr(_Engine(""), labels(a="1"), tmp_path)
    with pytest.raises(BadInput, match="question 'z' is not in data.questions"):
        correct(fr, [cand("z", 0, "", "1")], CorrectFilter())


def test_labels_missing_an_answer_fail_naming_file_line_and_setting(tmp_path: Path) -> None:
    q = tmp_path / "questions.jsonl"
    q.write_text(json.dumps({"id": "a", "question": "1+1?", "answer": "#### 2"}) + "\n"
                 + json.dumps({"id": "b", "question": "2+2?"}) + "\n")
    task = StageTask.model_validate({
        "run": {"name": "r"}, "round": 1, "stage": "filter", "output": str(tmp_path / "out"),
        "model": {"base": "/m"}, "inputs": {"samples": "s", "votes": "v", "questions": str(q)},
        "filters": [{"consistency": {}}, {"correct": {}}],
    })
    ctx = StageContext(task, tmp_path / "work")
    with pytest.raises(BadInput, match=r'questions.jsonl:2: no "answer"; filters\[1\].correct .* data.questions'):
        load_labels(ctx, 1)
    no_file = task.model_copy(update={"inputs": task.inputs.model_copy(update={"questions": None})})
    with pytest.raises(BadInput, match=r"inputs.questions: filters\[1\].correct needs"):
        load_labels(StageContext(no_file, tmp_path / "work2"), 1)


@pytest.mark.parametrize("raw, message", [
    ({"rewardModel": {"model": "s3://b/rm"}}, "filters[0].rewardModel.keep: set exactly one of keep, minScore"),
    ({"rewardModel": {"model": "s3://b/rm", "keep": 0.5, "minScore": 1.0}}, "filters[0].rewardModel.keep: set exactly one"),
    ({"rewardModel": {"keep": 0.5}}, "filters[0].rewardModel.model: is required"),
    ({"rewardModel": {"model": "m", "keep": 1.5}}, "filters[0].rewardModel.keep: must be ≤ 1"),
    ({"correct": {"maxPerQuestion": 0}}, "filters[0].correct.maxPerQuestion: must be ≥ 1"),
    ({"correct": {"dedup": "text"}}, "filters[0].correct.dedup: must be one of 'none' or 'equations'"),
    ({"correct": {"rationalizePaths": 4}}, "filters[0].correct.temperature: must be > 0 when rationalizePaths > 1"),
    ({"diversity": {"clusters": 0}}, "filters[0].diversity.clusters: must be ≥ 1"),
])
def test_bad_filter_parameters_name_the_field(raw: dict[str, Any], message: str) -> None:
    from pydantic import BaseModel

    class Holder(BaseModel):
        filters: list[FilterSpec]

    with pytest.raises(ValidationError) as exc:
        Holder.model_validate({"filters": [raw]})
    assert message in describe(exc.value)


def test_good_filter_parameters() -> None:
    f = FilterSpec.model_validate({"rewardModel": {"model": "s3://b/rm", "minScore": -0.5}})
    assert isinstance(f.params, RewardModelFilter) and f.params.min_score == -0.5 and f.params.keep is None
    c = FilterSpec.model_validate({"correct": {"maxPerQuestion": 10, "rationalize": True}})
    assert c.kind == "correct" and c.params.dedup == "equations"


def test_filter_wiring_adds_labels_and_the_sampling_adapter_only_when_needed() -> None:
    from selfimprove_operator.api import RoundStatus, SelfImproveRunSpec, SelfImproveRunStatus
    from selfimprove_operator.wiring import WiringContext, filter_

    def inputs(filters: list[dict[str, Any]]):
        spec = SelfImproveRunSpec.model_validate({
            "strategy": "lmsi", "model": {"base": "s3://m/base/"}, "filters": filters,
            "data": {"questions": "s3://d/q.jsonl", "evaluation": "s3://d/e.jsonl"}, "storage": {"uri": "s3://b/runs"}})
        status = SelfImproveRunStatus(rounds=[RoundStatus(round=1, adapter="s3://b/a1/"), RoundStatus(round=2)])
        return filter_(WiringContext(spec=spec, status=status, round=2, prefix="s3://b/runs/r/"))

    assert inputs([{"consistency": {}}]) == (inputs([{"consistency": {}}])[0], None)
    assert inputs([{"consistency": {}}])[0].questions is None   # unlabeled runs never read answers
    got, adapter = inputs([{"consistency": {}}, {"correct": {"maxPerQuestion": 4}}])
    assert got.questions == "s3://d/q.jsonl" and adapter is None
    got, adapter = inputs([{"correct": {"rationalize": True}}])
    assert got.questions == "s3://d/q.jsonl" and adapter == "s3://b/a1/"   # the model that sampled round 2
