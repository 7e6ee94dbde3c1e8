"""Honest model selection and pinned inputs (issue 16, item 6), in the planner: the best round,
patience and target judged on the validation split, never on the reported evaluation set; the
run's input digests recorded from its first stage and carried by every later task."""

from __future__ import annotations

from planner_sim import STRATEGIES, T0, run_spec
from selfimprove_operator.planner import Event, Observed, RunIdentity, StartStage, build_task, condition, plan
from selfimprove_workers.contract import StageResult

IDENT = RunIdentity(name="r", namespace="ns", uid="0123456789", generation=1)
WITH_VALIDATION = {"questions": "s3://d/q.jsonl", "validation": "s3://d/v.jsonl", "evaluation": "s3://d/e.jsonl"}
DIGESTS = {"data.questions": "etag:q1", "data.validation": "etag:v1", "data.evaluation": "sha256:" + "e" * 64}


def drive(spec, scores: dict[int, tuple[float, float | None]], inputs: dict[str, str] | None = None, fail=None):
    """Run to the end; round r's evaluate reports (test accuracy, validation accuracy)."""
    from datetime import timedelta

    status, observed, now, starts, events = None, {}, T0, [], []
    for _ in range(80):
        now += timedelta(seconds=1)
        p = plan(spec, status, observed, now, IDENT)
        status = p.status
        events += [a for a in p.actions if isinstance(a, Event)]
        for a in p.actions:
            if not isinstance(a, StartStage):
                continue
            starts.append(a)
            if fail is not None and fail(a):
                observed[(a.round, a.stage)] = Observed(attempt=a.attempt, state="failed", exit_code=2, result=StageResult(
                    stage=a.stage, round=a.round, status="Failed", reason="InputChanged",
                    message="data.questions: q.jsonl changed since the run started (etag:q1 → etag:q2)"))
                continue
            metrics: dict = {"sample": {"paths": 4}, "filter": {"kept": 2}, "train": {"trainLoss": 0.5}}.get(a.stage, {})
            if a.stage == "evaluate":
                test, val = scores[a.round]
                metrics = {"accuracy": test, **({"validationAccuracy": val} if val is not None else {})}
            outputs = {"adapter": f"s3://b/a{a.round}/"} if a.stage == "train" else {}
            observed[(a.round, a.stage)] = Observed(attempt=a.attempt, state="succeeded", result=StageResult(
                stage=a.stage, round=a.round, status="Succeeded", metrics=metrics, outputs=outputs,
                inputs=(inputs or {}) if a.round == 0 else {}))
        if status.phase in ("Succeeded", "Failed"):
            return status, starts, events
    raise AssertionError(status.phase)


def test_the_best_round_is_picked_on_validation_not_on_the_test_set():
    spec = run_spec("lmsi", {}, {}, data=WITH_VALIDATION, rounds={"max": 3, "patience": 0})
    # Round 1 is best on the test set (0.6) but round 3 on validation.
    status, _, _ = drive(spec, {0: (0.3, 0.30), 1: (0.6, 0.40), 2: (0.5, 0.45), 3: (0.55, 0.50)})
    assert status.selected_on == "validation"
    assert (status.best_round, status.best_accuracy, status.best_validation_accuracy) == (3, 0.55, 0.5)
    assert status.best_adapter == "s3://b/a3/"
    assert [r.validation_accuracy for r in status.rounds] == [0.3, 0.4, 0.45, 0.5]
    c = condition(status, "ValidationSelection")
    assert c is not None and (c.status, c.reason) == ("True", "ValidationSet")


def test_patience_counts_rounds_without_a_validation_gain():
    spec = run_spec("lmsi", {}, {}, data=WITH_VALIDATION, rounds={"max": 5, "patience": 1})
    # The test accuracy climbs, validation does not: the run stops after round 1.
    status, _, _ = drive(spec, {0: (0.3, 0.5), 1: (0.9, 0.4), 2: (0.95, 0.6)})
    assert [r.round for r in status.rounds] == [0, 1]
    done = condition(status, "Succeeded")
    assert done is not None and done.reason == "NoImprovement" and "no validation improvement over round 0" in done.message
    assert (status.best_round, status.best_accuracy) == (0, 0.3)


def test_the_target_is_judged_on_validation():
    spec = run_spec("lmsi", {}, {}, data=WITH_VALIDATION, rounds={"max": 3, "patience": 0, "targetAccuracy": 0.8})
    status, _, _ = drive(spec, {0: (0.3, 0.3), 1: (0.9, 0.5), 2: (0.9, 0.85), 3: (0.9, 0.9)})
    done = condition(status, "Succeeded")
    assert done is not None and done.reason == "TargetReached"
    assert done.message == "round 2 reached validation accuracy 0.8500 ≥ target 0.8"


def test_a_run_without_a_validation_split_says_so():
    spec = run_spec("lmsi", {}, {}, rounds={"max": 2, "patience": 0})
    status, _, events = drive(spec, {0: (0.3, None), 1: (0.5, None), 2: (0.4, None)})
    assert status.selected_on == "evaluation" and status.best_round == 1 and status.best_validation_accuracy is None
    c = condition(status, "ValidationSelection")
    assert c is not None and (c.status, c.reason) == ("False", "NoValidationSet")
    assert "optimistically biased" in c.message
    assert [e.reason for e in events if e.type == "Warning"] == ["NoValidationSet"]


def test_every_evaluate_task_gets_the_validation_split():
    for strategy in STRATEGIES:
        data = {**STRATEGIES[strategy]["data"], "validation": "s3://d/v.jsonl"}
        spec = run_spec(strategy, {}, {}, data=data)
        status, starts, _ = drive(spec, {0: (0.3, 0.3), 1: (0.4, 0.4)})
        evaluates = [s for s in starts if s.stage == "evaluate"]
        assert evaluates and all(s.task.inputs.validation == "s3://d/v.jsonl" for s in evaluates), strategy


def test_the_first_stage_records_the_input_digests_and_every_later_task_carries_them():
    spec = run_spec("lmsi", {}, {}, data=WITH_VALIDATION, rounds={"max": 1, "patience": 0})
    status, starts, _ = drive(spec, {0: (0.3, 0.3), 1: (0.4, 0.4)}, inputs=DIGESTS)
    first, *later = starts
    assert (first.round, first.stage) == (0, "evaluate")
    assert {p.field: (p.uri, p.digest) for p in first.task.pinned} == {
        "data.questions": ("s3://d/q.jsonl", None), "data.validation": ("s3://d/v.jsonl", None),
        "data.evaluation": ("s3://d/e.jsonl", None)}
    assert {d.field: d.digest for d in status.inputs} == DIGESTS
    assert {d.field: d.uri for d in status.inputs} == {k: v for k, v in
                                                       zip(("data.questions", "data.validation", "data.evaluation"),
                                                           ("s3://d/q.jsonl", "s3://d/v.jsonl", "s3://d/e.jsonl"), strict=True)}
    for start in later:
        assert {p.field: p.digest for p in start.task.pinned} == DIGESTS, start.stage
    # The task of a stage is a pure function of spec and status: built again, it is the same.
    assert build_task(spec.model_copy(), status, IDENT, 1, "train", 1).pinned == later[2].task.pinned


def test_a_changed_input_fails_the_run_at_once_naming_the_file():
    spec = run_spec("lmsi", {}, {}, data=WITH_VALIDATION, rounds={"max": 2, "patience": 0})
    status, starts, _ = drive(spec, {0: (0.3, 0.3), 1: (0.4, 0.4), 2: (0.5, 0.5)}, inputs=DIGESTS,
                              fail=lambda a: (a.round, a.stage) == (1, "sample"))
    assert status.phase == "Failed" and [(s.round, s.stage) for s in starts] == [(0, "evaluate"), (1, "sample")]
    failed = condition(status, "Failed")
    assert failed is not None and failed.reason == "InputChanged"
    assert "data.questions: q.jsonl changed since the run started" in failed.message and "permanent" in failed.message
