"""The planner: one test per transition, and properties over random event sequences."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from selfimprove_operator.api import SelfImproveRunSpec
from selfimprove_operator.planner import (
    Event,
    Observed,
    RunIdentity,
    StartStage,
    SuspendStage,
    condition,
    job_name,
    plan,
)
from selfimprove_workers.contract import StageResult

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RUN = RunIdentity(name="demo", namespace="ns", uid="0123456789abcdef", generation=1)


def spec(**changes) -> SelfImproveRunSpec:
    body = {
        "strategy": "lmsi",
        "model": {"base": "s3://m/base/"},
        "data": {"questions": "s3://d/q.jsonl", "evaluation": "s3://d/e.jsonl"},
        "rounds": {"max": 2, "patience": 0},
        "retry": {"limit": 1, "backoffSeconds": 10},
        "storage": {"uri": "s3://b/runs"},
    }
    for key, value in changes.items():
        body[key] = value
    return SelfImproveRunSpec.model_validate(body)


def ok(stage: str, round_no: int, **metrics) -> StageResult:
    defaults = {
        "sample": {"paths": 64, "questions": 2, "meanConfidence": 0.8},
        "filter": {"kept": 40},
        "train": {"trainLoss": 0.3},
        "evaluate": {"accuracy": 0.5},
        "augment": {"augmented": 3},
    }[stage]
    outputs = {"adapter": f"s3://b/a{round_no}/"} if stage == "train" else {}
    return StageResult(stage=stage, round=round_no, status="Succeeded", metrics={**defaults, **metrics}, outputs=outputs)


class Sim:
    """Drives the planner like an executor: persists status, remembers started attempts."""

    def __init__(self, s: SelfImproveRunSpec, run: RunIdentity = RUN):
        self.spec, self.run, self.status, self.now = s, run, None, T0
        self.observed: dict = {}
        self.started: list[tuple[int, str, int]] = []
        self.events: list[Event] = []
        self.suspended: list[SuspendStage] = []

    def step(self, advance: float = 1.0):
        self.now += timedelta(seconds=advance)
        p = plan(self.spec, self.status, self.observed, self.now, self.run)
        for a in p.actions:
            if isinstance(a, StartStage):
                self.started.append((a.round, a.stage, a.attempt))
                self.observed[(a.round, a.stage)] = Observed(attempt=a.attempt, state="running")
            elif isinstance(a, Event):
                self.events.append(a)
            elif isinstance(a, SuspendStage):
                self.suspended.append(a)
        self.status = p.status
        return p

    def finish(self, round_no: int, stage: str, **metrics):
        attempt = self.observed[(round_no, stage)].attempt
        self.observed[(round_no, stage)] = Observed(attempt=attempt, state="succeeded", result=ok(stage, round_no, **metrics))

    def fail(self, round_no: int, stage: str, exit_code: int = 1, reason: str | None = None, message: str = "boom"):
        attempt = self.observed[(round_no, stage)].attempt
        self.observed[(round_no, stage)] = Observed(attempt=attempt, state="failed", exit_code=exit_code, reason=reason, message=message)

    def running(self):
        return [(r.round, s.name) for r in self.status.rounds for s in r.stages if s.state == "Running"]


def test_round_zero_evaluates_the_base_model():
    sim = Sim(spec())
    p = sim.step()
    [start] = p.starts
    assert (start.round, start.stage, start.attempt) == (0, "evaluate", 1)
    assert start.job_name == "demo-r0-evaluate"
    assert start.task.model.adapter is None
    assert start.task.output == "s3://b/runs/ns/demo-01234567/round-000/evaluate/"
    assert sim.status.phase == "Evaluating"
    assert condition(sim.status, "Progressing").status == "True"
    # Nothing new while it runs.
    assert sim.step().starts == []


def test_full_lmsi_run_wires_inputs_and_tracks_best():
    sim = Sim(spec())
    sim.step()
    sim.finish(0, "evaluate", accuracy=0.30)
    p = sim.step()
    [start] = p.starts
    assert (start.round, start.stage) == (1, "sample")
    assert start.task.inputs.questions == "s3://d/q.jsonl" and start.task.model.adapter is None
    assert start.task.sampling.paths == 32 and start.task.sampling.seed == 1  # preset, per-round seed
    sim.finish(1, "sample")
    [start] = sim.step().starts
    assert start.stage == "filter"
    assert start.task.inputs.samples.endswith("round-001/sample/samples.jsonl")
    assert [f.kind for f in start.task.filters] == ["consistency"]
    sim.finish(1, "filter")
    [start] = sim.step().starts
    assert start.stage == "train" and start.task.inputs.train[0].endswith("round-001/filter/kept.jsonl")
    assert start.task.model.adapter is None  # fresh from base by default
    sim.finish(1, "train", trainLoss=0.2)
    [start] = sim.step().starts
    assert start.stage == "evaluate" and start.task.model.adapter == "s3://b/a1/"
    sim.finish(1, "evaluate", accuracy=0.45)
    [start] = sim.step().starts
    assert (start.round, start.stage) == (2, "sample")
    assert start.task.model.adapter == "s3://b/a1/"  # the improved model samples round 2
    for stage in ("sample", "filter", "train"):
        sim.finish(2, stage)
        sim.step()
    sim.finish(2, "evaluate", accuracy=0.40)
    p = sim.step()
    assert p.starts == []
    st_ = sim.status
    assert st_.phase == "Succeeded" and condition(st_, "Succeeded").reason == "MaxRoundsReached"
    assert (st_.best_round, st_.best_accuracy, st_.best_adapter) == (1, 0.45, "s3://b/a1/")
    r1 = st_.rounds[1]
    assert (r1.samples, r1.kept, r1.mean_confidence, r1.train_loss, r1.accuracy) == (64, 40, 0.8, 0.2, 0.45)
    assert st_.completion_time is not None
    # A finished run starts nothing more.
    assert sim.step().starts == []


def test_transient_failure_retries_after_backoff_then_fails():
    sim = Sim(spec())
    sim.step()
    sim.fail(0, "evaluate", exit_code=1, message="connection reset")
    p = sim.step()
    assert p.starts == [] and p.requeue_after == 10
    stage = sim.status.rounds[0].stages[0]
    assert stage.state == "Pending" and stage.retry_after is not None and stage.failures == 1
    assert condition(sim.status, "Degraded").status == "True"
    assert sim.step(advance=5).starts == []          # still backing off
    [retry] = sim.step(advance=10).starts
    assert retry.attempt == 2 and retry.job_name == "demo-r0-evaluate-a2"
    sim.fail(0, "evaluate", exit_code=137, reason="OOMKilled", message="container ran out of memory")
    sim.step()
    failed = condition(sim.status, "Failed")
    assert sim.status.phase == "Failed" and failed.status == "True" and failed.reason == "OOMKilled"
    assert "out of memory" in failed.message
    assert sim.status.rounds[0].stages[0].exit_code == 137


def test_bad_input_is_permanent():
    sim = Sim(spec(retry={"limit": 5}))
    sim.step()
    sim.observed[(0, "evaluate")] = Observed(
        attempt=1, state="failed", exit_code=2,
        result=StageResult(stage="evaluate", round=0, status="Failed", reason="BadInput", message="e.jsonl:3: missing \"question\""),
    )
    sim.step()
    assert sim.status.phase == "Failed"
    assert condition(sim.status, "Failed").reason == "BadInput"
    assert "e.jsonl:3" in sim.status.message
    assert len(sim.started) == 1


def test_pending_pod_problems_surface_and_image_errors_fail():
    sim = Sim(spec())
    sim.step()
    sim.observed[(0, "evaluate")] = Observed(attempt=1, state="pending", reason="Unschedulable", message="0/3 nodes have nvidia.com/gpu")
    sim.step()
    assert condition(sim.status, "Degraded").reason == "Unschedulable"
    assert sim.status.phase == "Evaluating"
    sim.observed[(0, "evaluate")] = Observed(attempt=1, state="pending", reason="ImagePullBackOff", message="pull access denied")
    sim.step()
    assert sim.status.phase == "Failed" and condition(sim.status, "Failed").reason == "ImagePullBackOff"


def test_lost_attempt_counts_as_transient_failure():
    sim = Sim(spec())
    sim.step()
    sim.observed[(0, "evaluate")] = Observed(attempt=1, state="missing")
    sim.step()
    assert sim.status.rounds[0].stages[0].reason == "Lost"
    assert sim.status.phase != "Failed"


def test_stale_observation_of_an_older_attempt_is_ignored():
    sim = Sim(spec())
    sim.step()
    sim.fail(0, "evaluate")
    sim.step()
    sim.step(advance=20)  # attempt 2 starts
    sim.observed[(0, "evaluate")] = Observed(attempt=1, state="failed", exit_code=1)
    sim.step()
    assert sim.status.rounds[0].stages[0].state == "Running" and sim.status.rounds[0].stages[0].attempts == 2


def test_suspend_and_resume():
    sim = Sim(spec())
    sim.step()
    sim.spec = spec(suspend=True)
    p = sim.step()
    assert [type(a) for a in p.actions if not isinstance(a, Event)] == [SuspendStage]
    assert sim.status.phase == "Suspended" and condition(sim.status, "Suspended").status == "True"
    assert sim.step().starts == []
    sim.spec = spec()
    [start] = sim.step().starts
    assert start.attempt == 2 and condition(sim.status, "Suspended").status == "False"
    assert sim.status.rounds[0].stages[0].failures == 0


def test_patience_and_target_stop():
    sim = Sim(spec(rounds={"max": 5, "patience": 1}))
    sim.step()
    sim.finish(0, "evaluate", accuracy=0.5)
    sim.step()
    for stage in ("sample", "filter", "train"):
        sim.finish(1, stage)
        sim.step()
    sim.finish(1, "evaluate", accuracy=0.4)
    sim.step()
    assert sim.status.phase == "Succeeded" and condition(sim.status, "Succeeded").reason == "NoImprovement"
    assert sim.status.best_round == 0 and sim.status.best_adapter is None

    sim = Sim(spec(rounds={"max": 5, "targetAccuracy": 0.6}))
    sim.step()
    sim.finish(0, "evaluate", accuracy=0.7)
    sim.step()
    assert condition(sim.status, "Succeeded").reason == "TargetReached"


def test_raising_max_rounds_continues_a_finished_run():
    sim = Sim(spec(rounds={"max": 1, "patience": 0}))
    sim.step()
    sim.finish(0, "evaluate")
    sim.step()
    for stage in ("sample", "filter", "train", "evaluate"):
        sim.finish(1, stage)
        sim.step()
    assert sim.status.phase == "Succeeded"
    sim.spec = spec(rounds={"max": 2, "patience": 0})
    sim.run = RunIdentity(**{**RUN.__dict__, "generation": 2})
    [start] = sim.step().starts
    assert (start.round, start.stage) == (2, "sample")
    assert sim.status.observed_generation == 2 and sim.status.phase == "Sampling"


def test_immutable_change_is_rejected_with_a_condition():
    sim = Sim(spec())
    sim.step()
    sim.spec = spec(model={"base": "s3://m/other/"})
    p = sim.step()
    assert p.starts == []
    degraded = condition(sim.status, "Degraded")
    assert degraded.status == "True" and degraded.reason == "ImmutableFieldChanged"
    sim.spec = spec()
    sim.step()
    assert condition(sim.status, "Degraded").status == "False"


def test_llm2llm_accumulates_augmented_data_and_trains_from_base():
    s = spec(strategy="llm2llm", data={"seed": "s3://d/seed.jsonl", "evaluation": "s3://d/e.jsonl"},
             rounds={"max": 3, "patience": 0}, training={"from": "previous"})
    sim = Sim(s)
    sim.step()
    [ev] = [a for a in sim.step().starts] or [None]
    sim.finish(0, "evaluate")
    [train] = sim.step().starts
    assert train.task.inputs.train == ["s3://d/seed.jsonl"]
    sim.finish(1, "train")
    [ev] = sim.step().starts
    assert ev.task.inputs.seed == "s3://d/seed.jsonl"
    sim.finish(1, "evaluate")
    [aug] = sim.step().starts
    assert aug.task.inputs.predictions.endswith("round-001/evaluate/seed_predictions.jsonl")
    assert aug.task.inputs.existing == ["s3://d/seed.jsonl"]
    sim.finish(1, "augment")
    [train2] = sim.step().starts
    assert train2.task.inputs.train == ["s3://d/seed.jsonl", "s3://b/runs/ns/demo-01234567/round-001/augment/augmented.jsonl"]
    assert train2.task.model.adapter == "s3://b/a1/"  # from: previous honoured when asked


def test_llm2llm_last_round_skips_augment_and_raising_max_reopens_it():
    """LLM2LLM as the paper runs it: round rounds.max does not augment (nothing would train on
    it). Raising rounds.max afterwards runs that augment first, so the next round trains on it."""
    base = {"strategy": "llm2llm", "data": {"seed": "s3://d/seed.jsonl", "evaluation": "s3://d/e.jsonl"},
            "rounds": {"max": 2, "patience": 0}}
    sim = Sim(spec(**base))
    for round_no, stage in [(0, "evaluate"), (1, "train"), (1, "evaluate"), (1, "augment"), (2, "train"), (2, "evaluate")]:
        sim.step()
        assert sim.running() == [(round_no, stage)]
        sim.finish(round_no, stage, accuracy=0.5)
    p = sim.step()
    assert p.starts == [] and sim.status.phase == "Succeeded"
    assert condition(sim.status, "Succeeded").reason == "MaxRoundsReached"
    last = sim.status.rounds[-1]
    assert [(st.name, st.state) for st in last.stages] == [("train", "Succeeded"), ("evaluate", "Succeeded"), ("augment", "Skipped")]
    assert last.stages[2].reason == "LastRound" and "rounds.max 2" in last.stages[2].message
    assert any(e.reason == "StageSkipped" for e in sim.events)
    assert (2, "augment", 1) not in sim.started and (1, "augment", 1) in sim.started

    sim.spec = spec(**{**base, "rounds": {"max": 3, "patience": 0}})
    [aug] = sim.step().starts
    assert (aug.round, aug.stage) == (2, "augment") and sim.status.phase != "Succeeded"
    assert any(e.reason == "Extended" and "round 2's augment" in e.message for e in sim.events)
    sim.finish(2, "augment")
    [train3] = sim.step().starts
    assert (train3.round, train3.stage) == (3, "train")
    assert train3.task.inputs.train[-1].endswith("round-002/augment/augmented.jsonl")
    for stage in ("train", "evaluate"):
        sim.finish(3, stage, accuracy=0.5)
        sim.step()
    assert sim.status.phase == "Succeeded" and sim.status.rounds[-1].stages[2].state == "Skipped"


def test_lmsi_last_round_skips_nothing():
    sim = Sim(spec(rounds={"max": 1, "patience": 0}))
    for round_no, stage in [(0, "evaluate"), (1, "sample"), (1, "filter"), (1, "train"), (1, "evaluate")]:
        sim.step()
        sim.finish(round_no, stage, accuracy=0.5)
    sim.step()
    assert sim.status.phase == "Succeeded" and all(st.state == "Succeeded" for st in sim.status.rounds[-1].stages)


def test_job_names_fit_a_dns_label():
    assert len(job_name("x" * 40, 999, "evaluate", 99)) <= 63


# --------------------------------------------------------------------------- properties
EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["succeed", "fail", "fail_permanent", "missing", "tick", "suspend", "resume", "pending_stuck", "raise_max"]),
        st.floats(min_value=0, max_value=0.99),
        st.integers(min_value=1, max_value=120),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=EVENTS, strategy=st.sampled_from(["lmsi", "llm2llm"]))
def test_properties_over_random_event_sequences(events, strategy):
    data = {"questions": "q", "evaluation": "e"} if strategy == "lmsi" else {"seed": "s", "evaluation": "e"}
    base = {"strategy": strategy, "data": data, "rounds": {"max": 3, "patience": 1}, "retry": {"limit": 2, "backoffSeconds": 5}}
    sim = Sim(spec(**base))
    sim.step()
    accuracies: dict[int, float] = {}
    for kind, value, dt in events:
        terminal_before = sim.status.phase in ("Succeeded", "Failed")
        running = sim.running()
        if kind in ("succeed", "fail", "fail_permanent", "missing", "pending_stuck") and running:
            round_no, stage = running[0]
            attempt = sim.observed[(round_no, stage)].attempt
            if kind == "succeed":
                acc = round(value, 3)
                sim.finish(round_no, stage, accuracy=acc)
                if stage == "evaluate":
                    accuracies[round_no] = acc
            elif kind == "fail":
                sim.fail(round_no, stage, exit_code=1)
            elif kind == "fail_permanent":
                sim.fail(round_no, stage, exit_code=2)
            elif kind == "missing":
                sim.observed[(round_no, stage)] = Observed(attempt=attempt, state="missing")
            else:
                sim.observed[(round_no, stage)] = Observed(attempt=attempt, state="pending", reason="Unschedulable", message="no gpu")
        elif kind == "suspend":
            sim.spec = spec(**{**base, "suspend": True})
        elif kind == "resume":
            sim.spec = spec(**base)
        elif kind == "raise_max":
            base = {**base, "rounds": {"max": base["rounds"]["max"] + 1, "patience": 1}}
            sim.spec = spec(**{**base, "suspend": sim.spec.suspend})
        before = len(sim.started)
        p = sim.step(advance=dt)
        status = sim.status
        # A terminal run never starts anything (raising rounds.max is the one way to reopen one).
        if terminal_before and kind != "raise_max":
            assert p.starts == []
        # A suspended run starts nothing.
        if sim.spec.suspend:
            assert p.starts == []
        # At most one stage runs at a time.
        assert len(sim.running()) <= 1
        # Every failure leaves a condition with a reason.
        if status.phase == "Failed":
            failed = condition(status, "Failed")
            assert failed is not None and failed.status == "True" and failed.reason
        for r in status.rounds:
            for s_ in r.stages:
                if s_.failures and s_.state != "Succeeded":
                    assert s_.reason
                    degraded_or_failed = condition(status, "Failed") or condition(status, "Degraded")
                    assert degraded_or_failed is not None and degraded_or_failed.reason
        # The best round is the argmax of accuracy (earliest on ties).
        scored = [(r.accuracy, -r.round) for r in status.rounds if r.accuracy is not None]
        if scored:
            assert status.best_round == -max(scored)[1]
        assert len(sim.started) - before == len(p.starts)
    # No stage attempt starts twice.
    assert len(sim.started) == len(set(sim.started))
