"""One reconcile of one run: observe → plan → persist status → act, and when to look again.

1. observe the run's Jobs and Pods, as the cache holds them (`observe.observe_run`);
2. plan (`planner.plan`, the same pure function the local executor runs);
3. persist the planner's status with a JSON patch guarded by the run's resourceVersion — a plan
   made from a stale copy is rejected and re-made from a fresh read, never acted upon
   (`status_writer`);
4. act: create the Job of every Running attempt that has none (idempotent: the Job name is
   fixed per attempt, 409 means it exists), delete Jobs that no longer belong to a Running
   attempt (suspension, a superseded attempt, a run that failed) (`desired`, `actuator`), post
   the planner's Events (`events`);
5. return when to wake again (`Result`): right away after a stale write, at backoff expiry or a
   pending timeout, and at the resync interval as a safety net. The controller's loop applies
   it, as controller-runtime's does; a reconcile never touches the work queue itself.

Persisting before acting means an attempt is recorded before its Job exists. If the operator
dies in between, the next reconcile finds a Running attempt without a Job and creates it — the
same Job, under the same name — so nothing runs twice and nothing is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from pydantic import ValidationError

from ..api import SelfImproveRunSpec, SelfImproveRunStatus
from ..planner import Event, RunIdentity, StartStage, SuspendStage, condition, is_terminal, job_name, plan
from ..presets import resolve
from .actuator import JobActuator, JobConflict, JobCreationFailed
from .cache import Cache, RunKey, RunState, generation_of, rv_of
from .config import OperatorConfig
from .events import EVENT_MESSAGE_LIMIT, EventRecorder
from .kube import ApiError
from .metrics import Metrics
from .observe import observe_run
from .progress import ProgressReader
from .status_writer import StatusWriter, Write

logger = logging.getLogger("selfimprove.operator")

# Degraded reasons the controller itself sets (the planner owns the others); cleared once a
# reconcile goes through again.
OWN_DEGRADED = ("ReconcileError", "JobCreationFailed", "JobConflict", "InvalidSpec")


@dataclass(frozen=True)
class Result:
    """What a reconcile asks of the work queue: `requeue` — once more right after this pass
    (the plan was made from a stale copy, or the API refused a Job the next plan must record);
    `requeue_after` — again in that many seconds unless an event comes first."""

    requeue: bool = False
    requeue_after: float | None = None


class Reconciler:
    def __init__(self, config: OperatorConfig, cache: Cache, status_writer: StatusWriter, actuator: JobActuator,
                 recorder: EventRecorder, metrics: Metrics, clock: Callable[[], datetime],
                 progress: ProgressReader | None = None):
        self.config = config
        self.progress = progress
        self.cache = cache
        self.status_writer = status_writer
        self.actuator = actuator
        self.recorder = recorder
        self.metrics = metrics
        self.clock = clock

    async def reconcile(self, key: RunKey) -> Result:
        state = self.cache.get(key)
        if state is None or state.body is None:
            return Result()
        body = state.body
        meta = body["metadata"]
        namespace, name = key
        if meta.get("deletionTimestamp"):
            return Result()  # being deleted: start nothing, the garbage collector removes the Jobs
        generation = meta.get("generation")
        spec_key = (meta.get("uid"), generation, None if generation else repr(body.get("spec")))
        if state.spec_key != spec_key:
            try:
                parsed = self.config.with_run_defaults(SelfImproveRunSpec.model_validate(body.get("spec") or {}))
            except ValidationError as exc:
                return await self._invalid_spec(key, state, exc)
            state.spec_key, state.spec, state.resolved = spec_key, parsed, resolve(parsed)
        spec = state.spec
        assert spec is not None  # parsed just above, or by an earlier pass with the same spec_key
        state.invalid_generation = None
        raw_status = body.get("status") or None
        if raw_status and state.status_rv is not None and state.status_rv == rv_of(body):
            status = state.status  # the model we wrote ourselves; plan() works on a copy
        else:
            status = SelfImproveRunStatus.model_validate(raw_status) if raw_status else None
        identity = RunIdentity(name=name, namespace=namespace, uid=meta.get("uid") or "",
                               generation=int(meta.get("generation") or 1))
        now = self.clock()
        # The running pod's latest progress record, when its turn to be read has come (bounded).
        progress_in = await self.progress.poll(key, state, status) if self.progress is not None else None

        seen = observe_run(
            identity.uid, list(state.jobs.values()), list(state.pods.values()), now,
            pending_timeout=self.config.pending_timeout, result_grace=self.config.result_grace,
            first_seen=state.first_seen, deleted_jobs=list(state.tombstones.values()),
        )
        observed = dict(seen.observed)
        for (r, s, attempt), obs in state.start_failures.items():
            if (r, s) not in observed or observed[(r, s)].attempt <= attempt:
                observed[(r, s)] = obs
        if self.progress is not None:
            for (r, s), obs in observed.items():
                if obs.state == "running" and (rec := self.progress.record(key, job_name(name, r, s, obs.attempt))):
                    observed[(r, s)] = replace(obs, report=rec)
        p = plan(spec, status, observed, now, identity)
        new = p.status

        # ---- persist: the status that records new attempts is stored before they start
        written = await self.status_writer.write(key, state, raw_status, new, status)
        if written is not Write.DONE:
            return Result(requeue=written is Write.STALE)  # re-plan from the fresh copy, never act on this one
        self.metrics.count_transitions(status, new)

        # ---- act (pain #8: a finished run starts nothing; `is_terminal` is checked again in
        # `desired.jobs_to_create`)
        starts = {a.job_name: a for a in p.actions if isinstance(a, StartStage)}
        stops = {a.job_name for a in p.actions if isinstance(a, SuspendStage)}
        await self.actuator.delete_stale(key, state, new, stops)
        requeue = await self.actuator.ensure(key, state, spec, new, identity, starts)
        for action in p.actions:
            if isinstance(action, Event):
                self.recorder.event(state.body, action.type, action.reason, action.message)
                log = logger.warning if action.type == "Warning" else logger.info
                log(f"{namespace}/{name}: {action.reason}: {action.message}")
        for notice in seen.notices:
            if notice.key not in state.noticed:
                state.noticed.add(notice.key)
                if notice.reason == "StageDisrupted":
                    self.metrics.disruptions.inc()
                self.recorder.event(state.body, notice.type, notice.reason, notice.message)
                (logger.warning if notice.type == "Warning" else logger.info)(f"{namespace}/{name}: {notice.reason}: {notice.message}")
        for job_uid, stage, seconds in seen.started:
            if job_uid not in state.started_jobs:
                state.started_jobs.add(job_uid)
                self.metrics.stage_start.labels(stage).observe(seconds)
        state.prune(new)
        if (c := condition(new, "Degraded")) is not None and c.status == "True" and c.reason in OWN_DEGRADED:
            # The whole pass went through: the failure recorded earlier is over.
            cleared = await self.status_writer.set_conditions(
                key, state, [("Degraded", False, "Reconciled", "the operator reconciles the run again")])
            requeue = requeue or cleared is Write.STALE
        state.reported_error = None

        # ---- when to look again without an event
        delays = [d for d in (p.requeue_after, (seen.wake_at - now).total_seconds() if seen.wake_at else None,
                              progress_in) if d is not None]
        if not is_terminal(new) and new.phase != "Suspended":
            delays.append(self.config.resync_seconds)  # safety net for anything missed
        return Result(requeue=requeue, requeue_after=max(0.05, min(delays)) if delays else None)

    async def _invalid_spec(self, key: RunKey, state: RunState, exc: ValidationError) -> Result:
        """A spec the API server accepted but the models reject (cross-field rules): say so on
        the run and wait for the next spec change."""
        from selfimprove_workers.validation import describe

        gen = generation_of(state.body)
        if state.invalid_generation == gen:
            return Result()
        message = describe(exc)[:EVENT_MESSAGE_LIMIT // 2]
        written = await self.status_writer.set_conditions(key, state, [
            ("Ready", False, "InvalidSpec", message),
            ("Degraded", True, "InvalidSpec", message),
        ])
        state.invalid_generation = gen
        self.recorder.event(state.body, "Warning", "InvalidSpec", message)
        logger.warning(f"{key[0]}/{key[1]}: InvalidSpec: {message}")
        return Result(requeue=written is Write.STALE)

    async def report_error(self, key: RunKey, exc: Exception, delay: float) -> Result:
        """A reconcile of `key` raised `exc` and is retried in `delay` seconds: log it, and the
        first time a failure is seen, record it on the run (condition + Event)."""
        reason = ("JobCreationFailed" if isinstance(exc, JobCreationFailed)
                  else "JobConflict" if isinstance(exc, JobConflict) else "ReconcileError")
        message = str(exc) if isinstance(exc, (ApiError, JobCreationFailed, JobConflict)) else f"{type(exc).__name__}: {exc}"
        message = message[:EVENT_MESSAGE_LIMIT // 2]
        state = self.cache.get(key)
        first = state is not None and state.reported_error != message
        if isinstance(exc, (ApiError, JobCreationFailed, JobConflict)):
            logger.warning(f"{key[0]}/{key[1]}: {reason}: {message}; retrying in {delay:.0f}s")
        elif first:
            logger.exception(f"{key[0]}/{key[1]}: reconcile failed; retrying in {delay:.0f}s")
        else:
            logger.warning(f"{key[0]}/{key[1]}: reconcile failed again ({message}); retrying in {delay:.0f}s")
        if not first or state is None or state.body is None:
            return Result()
        # Never silent: the failure is on the run (condition + Event), not only in the log.
        state.reported_error = message
        result = Result()
        try:
            written = await self.status_writer.set_conditions(key, state, [("Degraded", True, reason, message)])
            result = Result(requeue=written is Write.STALE)
        except Exception as again:  # noqa: BLE001 - the API may be what is failing
            logger.warning(f"{key[0]}/{key[1]}: could not record {reason} on the run: {again}")
        self.recorder.event(state.body, "Warning", reason, message)
        return result
