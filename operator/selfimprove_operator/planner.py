"""The planner: (spec, status, observed stages, now) → (new status, actions).

Pure: no I/O and no clock (time is an argument), so both executors — kopf on Kubernetes and the
local process runner — behave the same and every transition is unit-testable. An executor's loop
is: observe its stage attempts, call `plan`, carry out the actions, persist the status.

The status is the planner's memory. A stage attempt is started exactly once: `StartStage` is
only emitted together with a status in which that attempt is recorded as Running, and the
executor persists the status with the action. Observations of older attempts are ignored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from selfimprove_workers.constants import BAD_INPUT_REASON, EXIT_BAD_INPUT, PERMANENT_REASONS, rfc3339
from selfimprove_workers.contract import (
    ModelRef,
    PinnedInput,
    RunRef,
    StageName,
    StageResult,
    StageTask,
    StorageRef,
)
from selfimprove_workers.log import ProgressRecord
from selfimprove_workers.stage_registry import stage as stage_kind

from .api import (
    STAGE_PHASE,
    Condition,
    InputDigest,
    RoundStatus,
    SelfImproveRunSpec,
    SelfImproveRunStatus,
    StageProgress,
    StageStatus,
)
from .presets import resolve, stages_of_round
from .status_history import compact_rounds
from .strategies import strategy
from .task_limits import oversize
from .wiring import WiringContext, wiring_for

__all__ = [
    "EXIT_BAD_INPUT", "PERMANENT_REASONS", "Observed", "RunIdentity", "StartStage", "SuspendStage", "Event",
    "Action", "Plan", "rfc3339", "parse_time", "immutable_digest", "run_prefix", "stage_prefix", "job_name",
    "set_condition", "condition", "is_terminal", "new_round", "build_task", "record_result", "update_best",
    "stop_reason", "backoff_seconds", "plan", "shards_of", "nodes_of", "selection_score", "pinned_inputs", "record_inputs", "NO_VALIDATION",
]


# =========================================================================== inputs and outputs
@dataclass(frozen=True)
class Observed:
    """What an executor saw of one stage attempt."""

    attempt: int
    state: Literal["pending", "running", "succeeded", "failed", "missing"]
    result: StageResult | None = None       # the summary (succeeded, and failed when written)
    exit_code: int | None = None
    reason: str | None = None               # OOMKilled, DeadlineExceeded, ImagePullBackOff, …
    message: str | None = None
    progress: str | None = None             # "N/M" of a running attempt
    report: ProgressRecord | None = None    # its latest progress record (the stage's log)
    # Shards of a sharded stage that are done, cumulated over its attempts (Kubernetes: the Jobs'
    # completedIndexes mapped through their tasks' shardIndexes); the planner also keeps them on
    # the stage's status, so a retry runs only the others even when older attempts are gone.
    completed_shards: frozenset[int] = frozenset()

    @property
    def permanent(self) -> bool:
        if self.exit_code == EXIT_BAD_INPUT:
            return True
        reason = self.reason or (self.result.reason if self.result else None)
        return reason in PERMANENT_REASONS


@dataclass(frozen=True)
class RunIdentity:
    name: str
    namespace: str = "default"
    uid: str = ""
    generation: int = 1


@dataclass(frozen=True)
class StartStage:
    round: int
    stage: str
    attempt: int
    job_name: str
    task: StageTask


@dataclass(frozen=True)
class SuspendStage:
    """Stop a running attempt because the run is suspended (it resumes from its checkpoint)."""

    round: int
    stage: str
    attempt: int
    job_name: str


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


Action = StartStage | SuspendStage | Event


@dataclass
class Plan:
    status: SelfImproveRunStatus
    actions: list[Action] = field(default_factory=list)
    requeue_after: float | None = None      # seconds until the planner wants to look again

    @property
    def starts(self) -> list[StartStage]:
        return [a for a in self.actions if isinstance(a, StartStage)]


NO_VALIDATION = ("no data.validation: the best round, patience and target are judged on data.evaluation, the set "
                 "whose accuracy is reported, so that accuracy is optimistically biased; add a validation split")


# =========================================================================== helpers
def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def immutable_digest(spec: SelfImproveRunSpec) -> str:
    body = {k: spec.wire()[k] for k in ("strategy", "model", "data")}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def run_prefix(spec: SelfImproveRunSpec, run: RunIdentity) -> str:
    """`<storage.uri>/<namespace>/<run>-<uid prefix>/`: a recreated run with the same name gets
    a fresh directory, so it never mistakes the old run's outputs for its own."""
    base = spec.storage.uri.rstrip("/")
    leaf = f"{run.name}-{run.uid[:8]}" if run.uid else run.name
    return f"{base}/{run.namespace}/{leaf}/"


def stage_prefix(prefix: str, round_no: int, stage: str) -> str:
    return f"{prefix}round-{round_no:03d}/{stage}/"


def job_name(run: str, round_no: int, stage: str, attempt: int) -> str:
    name = f"{run}-r{round_no}-{stage}"
    return name if attempt <= 1 else f"{name}-a{attempt}"


def set_condition(status: SelfImproveRunStatus, type_: str, value: bool, reason: str, message: str, now: datetime, generation: int) -> None:
    text = "True" if value else "False"
    for i, cond in enumerate(status.conditions):
        if cond.type == type_:
            changed = cond.status != text
            status.conditions[i] = Condition(
                type=type_, status=text, reason=reason, message=message,
                last_transition_time=rfc3339(now) if changed else cond.last_transition_time,
                observed_generation=generation,
            )
            return
    status.conditions.append(Condition(
        type=type_, status=text, reason=reason, message=message,
        last_transition_time=rfc3339(now), observed_generation=generation,
    ))


def condition(status: SelfImproveRunStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def is_terminal(status: SelfImproveRunStatus) -> bool:
    return status.phase in ("Succeeded", "Failed")


# StageStatus.reason of a stage skipped because its round is rounds.max (Strategy.last_round_skips).
LAST_ROUND_SKIP = "LastRound"


def new_round(strategy: str, round_no: int, now: datetime) -> RoundStatus:
    return RoundStatus(
        round=round_no,
        stages=[StageStatus(name=s) for s in stages_of_round(strategy, round_no)],
        start_time=rfc3339(now),
    )


# =========================================================================== tasks
def build_task(spec: SelfImproveRunSpec, status: SelfImproveRunStatus, run: RunIdentity, round_no: int, stage: str, attempt: int) -> StageTask:
    """The exact task a stage gets, on Kubernetes and locally alike. `spec` is resolved."""
    prefix = run_prefix(spec, run)
    ctx = WiringContext(spec=spec, status=status, round=round_no, prefix=prefix)
    inputs, adapter = wiring_for(strategy(spec.strategy), stage)(ctx)

    # The parameter sections the stage kind declares, and only those (the task digest is the
    # stage's identity: an unrelated section changing must not invalidate finished work).
    sections: dict[str, Any] = {name: getattr(spec, name) for name in stage_kind(stage).sections}
    if "sampling" in sections:
        sections["sampling"] = spec.sampling.model_copy(update={"seed": spec.sampling.seed + round_no})
    if "filters" in sections:
        sections["filters"] = list(spec.filters or [])
    task = StageTask(
        run=RunRef(name=run.name, namespace=run.namespace, uid=run.uid),
        round=round_no,
        stage=StageName(stage),
        attempt=attempt,
        output=stage_prefix(prefix, round_no, stage),
        storage=StorageRef(endpoint=spec.storage.endpoint, region=spec.storage.region),
        model=ModelRef(base=spec.model.base, adapter=adapter, teacher=spec.model.teacher,
                       judge=next((m for f in spec.filters or [] if (m := getattr(f.get("judge"), "model", None))), None),
                       # Served models without where their keys are (the Job's environment has them).
                       teacher_endpoint=spec.model.teacher_endpoint.task_form() if spec.model.teacher_endpoint else None,
                       judge_endpoint=spec.model.judge_endpoint.task_form() if spec.model.judge_endpoint else None),
        engine=spec.engine,
        gpus=spec.resources.for_stage(stage).gpus or 0,
        shards=shards_of(spec, stage),
        nodes=nodes_of(spec, stage),
        inputs=inputs,
        prompting=spec.task,
        pinned=pinned_inputs(spec, status),
        **sections,
    )
    adjust = strategy(spec.strategy).tasks.get(stage)
    return adjust(ctx, task) if adjust is not None else task


def shards_of(spec: SelfImproveRunSpec, stage: str) -> int:
    """How many shards a stage runs as: its resources' `shards` when the stage kind is
    shardable (the run-level value applies to those only), else 1."""
    return (spec.resources.for_stage(stage).shards or 1) if stage_kind(stage).shardable else 1


def nodes_of(spec: SelfImproveRunSpec, stage: str) -> int:
    """How many nodes a stage trains on: `resources.stages.train.nodes` (the API allows it on
    that stage only), else 1."""
    override = getattr(spec.resources.stages, stage, None) if spec.resources.stages is not None else None
    return getattr(override, "nodes", None) or 1


def _note_shards(stage: StageStatus, obs: Observed, total: int) -> None:
    """Cumulate the finished shards on the status (the planner's memory: older attempts' Jobs
    may be gone when the retry starts) and show them as done/total."""
    if total <= 1:
        return
    done = set(stage.completed_shards or ()) | {i for i in obs.completed_shards if 0 <= i < total}
    stage.completed_shards = sorted(done)
    stage.shards = f"{len(done)}/{total}"


def pinned_inputs(spec: SelfImproveRunSpec, status: SelfImproveRunStatus) -> list[PinnedInput]:
    """Every `spec.data` file, with the digest recorded when the run started (none until the
    first stage recorded them: that stage computes them)."""
    recorded = {d.field: d for d in status.inputs}
    pins = []
    for name, uri in spec.data.wire().items():
        known = recorded.get(f"data.{name}")
        pins.append(PinnedInput(field=f"data.{name}", uri=uri,
                                digest=known.digest if known is not None and known.uri == uri else None))
    return pins


def record_inputs(spec: SelfImproveRunSpec, status: SelfImproveRunStatus, result: StageResult) -> None:
    """The first stage's digests of the run's input files become the run's pins."""
    if status.inputs or not result.inputs:
        return
    uris = {f"data.{name}": uri for name, uri in spec.data.wire().items()}
    status.inputs = [InputDigest(field=f, uri=uris[f], digest=d) for f, d in sorted(result.inputs.items()) if f in uris]


# =========================================================================== results
def record_result(round_status: RoundStatus, stage: StageStatus, result: StageResult) -> None:
    """Copy a result's headline metrics onto the stage and, as its stage kind declares
    (stage_registry.py), onto the round."""
    m = result.metrics
    stage.metrics = {k: v for k, v in m.items() if isinstance(v, (int, float, str, bool))}
    kind = stage_kind(stage.name)
    for key, (field_name, cast) in kind.round_metrics.items():
        setattr(round_status, field_name, (_int if cast == "int" else _float)(m.get(key)))
    for key, field_name in kind.round_outputs.items():
        setattr(round_status, field_name, result.outputs.get(key))


def _int(v: object) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _float(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def selection_score(status: SelfImproveRunStatus, round_status: RoundStatus) -> float | None:
    """The accuracy a round is judged by: on the validation split when the run has one (never
    the reported test set), else on the evaluation set."""
    return round_status.validation_accuracy if status.selected_on == "validation" else round_status.accuracy


def update_best(status: SelfImproveRunStatus) -> None:
    """Best = argmax of the selection score over finished evaluations; the earliest round wins
    ties. `best_accuracy` is that round's evaluation accuracy (what the run reports)."""
    scored = [(s, r) for r in status.rounds if (s := selection_score(status, r)) is not None]
    if not scored:
        return
    _, best = max(scored, key=lambda sr: (sr[0], -sr[1].round))
    status.best_round, status.best_accuracy = best.round, best.accuracy
    status.best_validation_accuracy = best.validation_accuracy
    status.best_adapter = best.adapter if best.round > 0 else None


def stop_reason(spec: SelfImproveRunSpec, status: SelfImproveRunStatus) -> tuple[str, str] | None:
    """Why the run ends after its latest complete round, or None to go on."""
    last = status.rounds[-1]
    rounds = spec.rounds
    split = status.selected_on or "evaluation"
    score = selection_score(status, last)
    if rounds.target_accuracy is not None and score is not None and score >= rounds.target_accuracy:
        return "TargetReached", f"round {last.round} reached {split} accuracy {score:.4f} ≥ target {rounds.target_accuracy}"
    if last.round >= (rounds.max or 0):
        return "MaxRoundsReached", f"finished round {last.round} of {rounds.max}"
    if rounds.patience > 0 and status.best_round is not None:
        # Rounds since the best one that did not beat it by min_improvement.
        best_round = next(r for r in status.rounds if r.round == status.best_round)
        best = selection_score(status, best_round) or 0.0
        stale = [r for r in status.rounds if r.round > status.best_round and (s := selection_score(status, r)) is not None
                 and s < best + rounds.min_improvement]
        if len(stale) >= rounds.patience and last.round > status.best_round:
            return "NoImprovement", f"no {split} improvement over round {status.best_round} for {len(stale)} round(s)"
    return None


def backoff_seconds(spec: SelfImproveRunSpec, failures: int) -> float:
    retry = spec.retry
    return float(min(retry.max_backoff_seconds, retry.backoff_seconds * (2 ** max(0, failures - 1))))


# =========================================================================== the planner
def plan(
    spec: SelfImproveRunSpec,
    status: SelfImproveRunStatus | None,
    observed: dict[tuple[int, str], Observed],
    now: datetime,
    run: RunIdentity,
) -> Plan:
    p = _plan(spec, status, observed, now, run)
    p.status.progress = stage_progress(p.status, observed, status.progress if status else None)
    return p


def stage_progress(status: SelfImproveRunStatus, observed: dict[tuple[int, str], Observed],
                   previous: StageProgress | None) -> StageProgress | None:
    """`status.progress`: the running attempt's latest progress record; the one already on the
    status while that attempt runs and nothing newer is seen (an executor that restarted has
    not read the log yet); none once no attempt runs."""
    if not status.rounds:
        return None
    current = status.rounds[-1]
    stage = next((s for s in current.stages if s.state == "Running"), None)
    if stage is None:
        return None
    obs = observed.get((current.round, stage.name))
    rec = obs.report if obs is not None and obs.attempt == stage.attempts else None
    if rec is None:
        same = previous is not None and (previous.round, previous.stage, previous.attempt) == (current.round, stage.name, stage.attempts)
        return previous if same else None
    eta = None if rec.eta_seconds is None else int(round(rec.eta_seconds))
    left = f", {duration_text(eta)} left" if eta is not None and rec.done < rec.total else ""
    # A sharded stage's record combines its running shards (k8s/progress.py): say how many are done.
    left += f"; shards {stage.shards}" if stage.shards else ""
    return StageProgress(
        round=current.round, stage=stage.name, attempt=stage.attempts, unit=rec.unit, done=rec.done, total=rec.total,
        percent=rec.percent, estimated_remaining_seconds=eta, last_update=rec.ts,
        summary=f"{stage.name} {rec.percent}% ({rec.done}/{rec.total} {rec.unit}{left})",
    )


def duration_text(seconds: int) -> str:
    """45s, 3m05s, 2h07m: how `kubectl get sir` and the live view show time left."""
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _plan(
    spec: SelfImproveRunSpec,
    status: SelfImproveRunStatus | None,
    observed: dict[tuple[int, str], Observed],
    now: datetime,
    run: RunIdentity,
) -> Plan:
    status = (status or SelfImproveRunStatus()).model_copy(deep=True)
    p = Plan(status=status)
    gen = run.generation
    spec = resolve(spec)

    # ---- first look: remember what may not change
    digest = immutable_digest(spec)
    if status.applied_spec is None:
        status.applied_spec = digest
        status.start_time = rfc3339(now)
        status.artifacts = run_prefix(spec, run)
        status.rounds = [new_round(spec.strategy, 0, now)]
        p.actions.append(Event("Normal", "Started", f"{spec.strategy} run started; artifacts under {status.artifacts}"))
        if not spec.data.validation:
            p.actions.append(Event("Warning", "NoValidationSet", NO_VALIDATION))
    elif status.applied_spec != digest:
        msg = "spec.strategy, spec.model and spec.data cannot change after creation; revert them or create a new run"
        set_condition(status, "Degraded", True, "ImmutableFieldChanged", msg, now, gen)
        set_condition(status, "Ready", False, "ImmutableFieldChanged", msg, now, gen)
        degraded = condition(status, "Degraded")
        if degraded is not None and degraded.last_transition_time == rfc3339(now):
            p.actions.append(Event("Warning", "ImmutableFieldChanged", msg))
        status.observed_generation = gen
        return p
    elif (c := condition(status, "Degraded")) is not None and c.reason == "ImmutableFieldChanged" and c.status == "True":
        set_condition(status, "Degraded", False, "SpecRestored", "immutable fields match the run again", now, gen)
    status.observed_generation = gen
    # The split model selection is judged on (spec.data is immutable: set on every look, so a run
    # created before this field existed gets it too).
    status.selected_on = "validation" if spec.data.validation else "evaluation"
    if spec.data.validation:
        set_condition(status, "ValidationSelection", True, "ValidationSet",
                      "best round, patience and target are judged on data.validation; data.evaluation is only reported", now, gen)
    else:
        set_condition(status, "ValidationSelection", False, "NoValidationSet", NO_VALIDATION, now, gen)

    # ---- finished runs: only a raised rounds.max reopens one (GitOps "extend the run")
    if status.phase == "Failed":
        return p
    if status.phase == "Succeeded":
        done = condition(status, "Succeeded")
        if done and done.reason == "MaxRoundsReached" and (spec.rounds.max or 0) > status.rounds[-1].round:
            last = status.rounds[-1]
            skipped = [st for st in last.stages if st.state == "Skipped" and st.reason == LAST_ROUND_SKIP]
            if skipped:
                # The stages the last round skipped (their output feeds the next round) run first.
                for st in skipped:
                    st.state, st.reason, st.message = "Pending", None, None
                last.completion_time = None
                what = f"round {last.round}'s {', '.join(st.name for st in skipped)}"
            else:
                nxt = last.round + 1
                status.rounds.append(new_round(spec.strategy, nxt, now))
                status.round = nxt
                what = f"round {nxt}"
            status.completion_time = None
            set_condition(status, "Succeeded", False, "Extended", f"rounds.max raised to {spec.rounds.max}", now, gen)
            p.actions.append(Event("Normal", "Extended", f"rounds.max raised to {spec.rounds.max}; continuing with {what}"))
        else:
            return p

    # ---- suspend: start nothing, stop what runs; resuming continues where it stopped
    current = status.rounds[-1]
    if spec.suspend:
        for st in current.stages:
            if st.state == "Running":
                p.actions.append(SuspendStage(current.round, st.name, st.attempts, st.job or ""))
                # Resumed later as a new attempt (training continues from its checkpoint);
                # a suspension is not a failure, so it uses up no retry.
                st.state = "Pending"
                st.message = "suspended"
        if status.phase != "Suspended":
            p.actions.append(Event("Normal", "Suspended", "run suspended"))
        status.phase = "Suspended"
        set_condition(status, "Suspended", True, "Suspended", "spec.suspend is true", now, gen)
        set_condition(status, "Progressing", False, "Suspended", "spec.suspend is true", now, gen)
        return p
    if (c := condition(status, "Suspended")) is not None and c.status == "True":
        set_condition(status, "Suspended", False, "Resumed", "spec.suspend is false", now, gen)
        p.actions.append(Event("Normal", "Resumed", "run resumed"))

    # ---- walk the current round's stages in order, as far as observations allow
    while True:
        current = status.rounds[-1]
        stage = next((s for s in current.stages if s.state not in ("Succeeded", "Skipped")), None)
        if stage is None:
            if not _finish_round(spec, status, p, now, gen):
                return p
            continue
        if (stage.state == "Pending" and stage.attempts == 0 and current.round > 0 and spec.rounds.max is not None
                and current.round >= spec.rounds.max and stage.name in strategy(spec.strategy).last_round_skips):
            stage.state, stage.reason = "Skipped", LAST_ROUND_SKIP
            stage.message = f"round {current.round} is the last (rounds.max {spec.rounds.max}): nothing would train on its {stage.name}"
            p.actions.append(Event("Normal", "StageSkipped", f"round {current.round} {stage.name}: {stage.message}"))
            continue
        if not _advance_stage(spec, status, current, stage, observed.get((current.round, stage.name)), p, now, run):
            return p


def _advance_stage(spec, status, current: RoundStatus, stage: StageStatus, obs: Observed | None, p: Plan, now: datetime, run: RunIdentity) -> bool:
    """Move one stage forward; True when it succeeded and the walk may go on."""
    gen = run.generation
    if stage.state == "Running":
        if obs is None or obs.attempt != stage.attempts:
            # Nothing seen yet of this attempt (or only of an older one): the executor reports
            # `missing` itself once it knows the attempt is gone.
            return _set_phase(status, stage, p)
        _note_shards(stage, obs, shards_of(spec, stage.name))
        if obs.state in ("pending", "running"):
            stage.progress = obs.progress or (obs.report.text() if obs.report else None) or stage.progress
            if obs.state == "pending" and obs.reason:
                # Stuck before running (image pull, unschedulable): visible, not yet failed.
                stage.reason, stage.message = obs.reason, obs.message
                set_condition(status, "Degraded", True, obs.reason, f"{stage.name}: {obs.message or obs.reason}", now, gen)
                if obs.reason in PERMANENT_REASONS:
                    return _fail_stage(spec, status, stage, obs, p, now, gen)
            return _set_phase(status, stage, p)
        if obs.state == "succeeded" and obs.result is not None:
            if obs.result.shards > 1:
                stage.shards = f"{obs.result.shards}/{obs.result.shards}"
                stage.completed_shards = list(range(obs.result.shards))
            stage.state = "Succeeded"
            stage.completion_time = rfc3339(now)
            stage.reason = stage.message = stage.exit_code = stage.retry_after = None
            stage.progress = None
            record_result(current, stage, obs.result)
            record_inputs(spec, status, obs.result)
            update_best(status)
            if (c := condition(status, "Degraded")) is not None and c.status == "True" and c.reason != "ImmutableFieldChanged":
                set_condition(status, "Degraded", False, "Recovered", f"{stage.name} succeeded", now, gen)
            p.actions.append(Event("Normal", "StageSucceeded", f"round {current.round} {stage.name} succeeded"
                                   + (" (already complete)" if obs.result.skipped else "")))
            return True
        # failed, missing, or "succeeded" without a readable result
        if obs.state == "missing":
            obs = Observed(attempt=obs.attempt, state="failed", reason="Lost", message=f"{stage.job or stage.name} disappeared before finishing")
        elif obs.state == "succeeded":
            obs = Observed(attempt=obs.attempt, state="failed", reason="NoResult", message="the stage exited 0 without a result summary")
        return _fail_stage(spec, status, stage, obs, p, now, gen)

    # Pending: first attempt, a retry after backoff, or after a suspension
    if stage.state == "Failed":
        return False
    if stage.retry_after and parse_time(stage.retry_after) > now:
        p.requeue_after = max(1.0, (parse_time(stage.retry_after) - now).total_seconds())
        return _set_phase(status, stage, p)
    attempt = stage.attempts + 1
    name = job_name(run.name, current.round, stage.name, attempt)
    task = build_task(spec, status, run, current.round, stage.name, attempt)
    if (too_big := oversize(task)) is not None:
        # Refused before any Job exists: its container could not start (task_limits.py).
        stage.attempts = attempt
        return _fail_stage(spec, status, stage, Observed(attempt, "failed", reason=BAD_INPUT_REASON, message=too_big),
                           p, now, gen)
    if task.shards > 1:
        # A retry runs only the shards not finished yet; finished ones are never redone.
        done = set(stage.completed_shards or ())
        left = [i for i in range(task.shards) if i not in done]
        if done and left:
            task = task.model_copy(update={"shard_indexes": left})
        stage.shards = f"{len(done & set(range(task.shards)))}/{task.shards}"
    stage.state, stage.attempts, stage.job = "Running", attempt, name
    stage.output = task.output
    stage.start_time = rfc3339(now)
    stage.retry_after = None
    stage.progress = None
    status.round = current.round
    p.actions.append(StartStage(current.round, stage.name, attempt, name, task))
    set_condition(status, "Progressing", True, "StageRunning", f"round {current.round}: {stage.name} (attempt {attempt})", now, gen)
    set_condition(status, "Ready", True, "Running", "the run is progressing", now, gen)
    return _set_phase(status, stage, p)


def _set_phase(status: SelfImproveRunStatus, stage: StageStatus, p: Plan) -> bool:
    status.phase = STAGE_PHASE[stage.name]
    status.message = f"round {status.rounds[-1].round}: {stage.name}"
    return False


def _fail_stage(spec, status, stage: StageStatus, obs: Observed, p: Plan, now: datetime, gen: int) -> bool:
    reason = obs.reason or (obs.result.reason if obs.result else None) or (f"ExitCode{obs.exit_code}" if obs.exit_code is not None else "Failed")
    message = (obs.result.message if obs.result and obs.result.message else None) or obs.message or reason
    stage.reason, stage.message, stage.exit_code = reason, message, obs.exit_code
    stage.completion_time = rfc3339(now)
    stage.failures += 1
    retries_used = stage.failures - 1
    where = f"round {status.rounds[-1].round} {stage.name}"
    if not obs.permanent and retries_used < spec.retry.limit:
        delay = backoff_seconds(spec, stage.failures)
        stage.state = "Pending"
        stage.retry_after = rfc3339(now + timedelta(seconds=delay))
        p.requeue_after = max(1.0, delay)
        set_condition(status, "Degraded", True, reason, f"{where} failed ({message}); retry {retries_used + 1} of {spec.retry.limit} in {delay:.0f}s", now, gen)
        p.actions.append(Event("Warning", "StageRetrying", f"{where} attempt {stage.attempts} failed: {reason}: {message}"))
        return _set_phase(status, stage, p)
    stage.state = "Failed"
    status.phase = "Failed"
    status.completion_time = rfc3339(now)
    why = "permanent" if obs.permanent else f"after {stage.attempts} attempt(s)"
    status.message = f"{where} failed ({why}): {message}"
    set_condition(status, "Failed", True, reason, status.message, now, gen)
    set_condition(status, "Ready", False, reason, status.message, now, gen)
    set_condition(status, "Progressing", False, "Failed", status.message, now, gen)
    p.actions.append(Event("Warning", "StageFailed", status.message))
    return False


def _finish_round(spec, status: SelfImproveRunStatus, p: Plan, now: datetime, gen: int) -> bool:
    """Close the current round; True when a next round was opened."""
    current = status.rounds[-1]
    current.completion_time = current.completion_time or rfc3339(now)
    update_best(status)
    acc = f"{current.accuracy:.4f}" if current.accuracy is not None else "n/a"
    p.actions.append(Event("Normal", "RoundCompleted", f"round {current.round} accuracy {acc}; best round {status.best_round}"))
    stop = stop_reason(spec, status)
    if stop is not None:
        reason, message = stop
        status.phase = "Succeeded"
        status.completion_time = rfc3339(now)
        status.message = message
        set_condition(status, "Succeeded", True, reason, message, now, gen)
        set_condition(status, "Progressing", False, reason, message, now, gen)
        set_condition(status, "Ready", True, reason, f"best round {status.best_round}, accuracy {status.best_accuracy}", now, gen)
        p.actions.append(Event("Normal", "Succeeded", message))
        return False
    nxt = current.round + 1
    status.rounds.append(new_round(spec.strategy, nxt, now))
    status.round = nxt
    compact_rounds(status)  # older rounds keep their summary: the status must fit etcd
    return True
