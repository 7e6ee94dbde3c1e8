"""Teacher→student LMSI (strategy lmsi-teacher): who runs which stage, where the refreshed
exemplars go, and the exemplar selection itself."""

from __future__ import annotations

from planner_sim import Sim, run_spec
from selfimprove_operator.planner import RunIdentity
from selfimprove_workers.exemplars import Candidate, fill, rationale_of, select
from selfimprove_workers.spec import FewShotExample

IDENT = RunIdentity(name="t", namespace="ns", uid="0123456789")


def starts_of(rounds: int = 2):
    spec = run_spec("lmsi-teacher", {}, {}, rounds={"max": rounds, "patience": 0},
                    task={"fewShot": [{"question": "1+1?", "rationale": "1 + 1 = 2.", "answer": "2"}]},
                    exemplars={"count": 2, "selection": "diverse"})
    sim = Sim(spec, IDENT)
    sim.run_to_end()
    return {(s.round, s.stage): s.task for s in sim.starts}


def test_the_teacher_samples_and_the_student_trains_evaluates_and_answers():
    tasks = starts_of()
    prefix = "s3://b/runs/ns/t-01234567/"
    for r in (1, 2):
        assert (tasks[(r, "sample")].model.base, tasks[(r, "sample")].model.adapter) == ("s3://m/teacher/", None)
        for stage in ("train", "evaluate", "exemplars"):
            assert tasks[(r, stage)].model.base == "s3://m/student/", (r, stage)
        assert tasks[(r, "exemplars")].model.adapter == f"s3://b/runs/a{r}/"          # this round's student
        assert tasks[(r, "exemplars")].inputs.votes == f"{prefix}round-{r:03d}/sample/votes.jsonl"
        assert tasks[(r, "exemplars")].exemplars.selection == "diverse"
    assert tasks[(0, "evaluate")].model.base == "s3://m/student/"


def test_each_round_the_teacher_prompts_with_the_previous_rounds_exemplars():
    tasks = starts_of(3)
    first = tasks[(1, "sample")].prompting
    assert [e.question for e in first.few_shot] == ["1+1?"] and first.few_shot_file is None
    for r in (2, 3):
        p = tasks[(r, "sample")].prompting
        assert p.few_shot == [] and p.few_shot_file == f"s3://b/runs/ns/t-01234567/round-{r - 1:03d}/exemplars/exemplars.jsonl"
        # the exemplars stage fills up from what the teacher sampled with this round
        assert tasks[(r, "exemplars")].prompting == p
    assert tasks[(2, "evaluate")].prompting.few_shot_file is None  # the student's prompts never change


def cand(i: str, q: str, s: float, t: float = 0.9) -> Candidate:
    return Candidate(id=i, question=q, answer="1", rationale="r", student_confidence=s, teacher_confidence=t)


def test_confidence_selection_takes_the_most_confident_ties_by_teacher_then_id():
    cs = [cand("a", "what is 1 plus 2", 0.6), cand("b", "what is 1 plus 3", 0.9, 0.5),
          cand("c", "what is 2 plus 3", 0.9, 0.8), cand("d", "how many apples", 0.9, 0.8)]
    assert [c.id for c in select(cs, 3, "confidence")] == ["c", "d", "b"]


def test_diverse_selection_prefers_questions_unlike_those_chosen():
    cs = [cand("a", "what is 1 plus 2 plus 3", 1.0), cand("b", "what is 1 plus 2 plus 4", 0.9),
          cand("c", "Tom has five apples and eats two", 0.7), cand("d", "what is 1 plus 2 plus 5", 0.8)]
    assert [c.id for c in select(cs, 2, "confidence")] == ["a", "b"]
    assert [c.id for c in select(cs, 2, "diverse")] == ["a", "c"]


def test_fill_carries_current_exemplars_into_empty_places():
    current = [FewShotExample(question="old", rationale="x", answer="1"), FewShotExample(question="q1", answer="2")]
    out = fill([cand("1", "q1", 0.9)], current, 3)
    assert [e.question for e in out] == ["q1", "old"]
    assert [e.question for e in fill([], current, 1)] == ["old"]


def test_the_rationale_is_the_path_without_its_answer_sentence():
    assert rationale_of("3 + 4 = 7\n7 + 1 = 8\n#### 8", "8", "#### {answer}") == "3 + 4 = 7\n7 + 1 = 8"
    assert rationale_of("2 + 2 = 4. The answer is 4.", "4", "The answer is {answer}.") == "2 + 2 = 4."
    assert rationale_of("a\nb\nfinal: 4", "4", "#### {answer}") == "a\nb"
