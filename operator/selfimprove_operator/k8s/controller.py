"""The Kubernetes executor's loop, per run: observe → plan → persist status → act.

kopf feeds the caches (runs, and the Jobs and Pods labelled `selfimprove.dev/run`) and wakes the
run's key in a work queue; a pool of workers reconciles one run at a time each:

1. observe the run's Jobs and Pods (`observe.observe_run`);
2. plan (`planner.plan`, the same pure function the local executor runs);
3. persist the planner's status with a JSON patch guarded by the run's resourceVersion — a plan
   made from a stale copy is rejected and re-made from a fresh read, never acted upon;
4. act: create the Job of every Running attempt that has none (idempotent: the Job name is
   fixed per attempt, 409 means it exists), delete Jobs that no longer belong to a Running
   attempt (suspension, a superseded attempt, a run that failed), post the planner's Events;
5. wake again when the planner or the observation asks (backoff expiry, pending timeout).

Persisting before acting means an attempt is recorded before its Job exists. If the operator
dies in between, the next reconcile finds a Running attempt without a Job and creates it — the
same Job, under the same name — so nothing runs twice and nothing is lost. The Job manifest
carries the run as its controlling owner: deleting the run deletes its Jobs and Pods (no
finalizer is involved, so deleting a run never waits for the operator), while artifacts in
storage stay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from pydantic import ValidationError

from ..api import KIND, API_VERSION, SelfImproveRunSpec, SelfImproveRunStatus
from ..planner import (
    Event, Observed, RunIdentity, StartStage, SuspendStage, build_task, condition, is_terminal, parse_time, plan,
    rfc3339, set_condition,
)
from ..presets import resolve
from .config import OperatorConfig
from .jobs import RUN_LABEL, build_job
from .kube import ApiError, Kube, event_path, job_path, run_path
from .metrics import Metrics
from .observe import (
    controller_uid, job_name_of_pod, job_signature, observe_run, pod_signature, slim_job, slim_pod, stage_key,
)
from .status import status_patch
from .workqueue import WorkQueue

logger = logging.getLogger("selfimprove.operator")

RunKey = tuple[str, str]  # (namespace, name)
EVENT_MESSAGE_LIMIT = 1024
# Degraded reasons the controller itself sets (the planner owns the others); cleared once a
# reconcile goes through again.
OWN_DEGRADED = ("ReconcileError", "JobCreationFailed", "JobConflict", "InvalidSpec")


def truncate_message(message: str, limit: int = EVENT_MESSAGE_LIMIT) -> str:
    """`message` cut to at most `limit` bytes of UTF-8, an ellipsis (3 bytes) marking the cut:
    the API server's limit on an Event's note (1024) counts bytes (Go's len), not characters."""
    if len(message.encode()) <= limit:
        return message
    cut = message.encode()[: limit - len("…".encode())].decode(errors="ignore")
    return cut + "…"


def event_body(run: dict[str, Any], type_: str, reason: str, message: str, now: datetime,
               reporting_instance: str) -> dict[str, Any]:
    """The core/v1 Event the operator posts about `run` (pure: `_post_event` sends it)."""
    meta = run["metadata"]
    stamp = rfc3339(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": API_VERSION, "kind": KIND, "name": meta["name"],
            "namespace": meta["namespace"], "uid": meta.get("uid"),
        },
        "type": type_,
        "reason": reason,
        "message": truncate_message(message),
        "action": reason,
        "source": {"component": "selfimprove-operator"},
        "reportingComponent": "selfimprove.dev/operator",
        "reportingInstance": reporting_instance,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


class JobCreationFailed(Exception):
    """The API refused a stage Job for a reason a retry may fix (quota, RBAC, API outage)."""


class JobConflict(Exception):
    """A Job of the attempt's name exists but belongs to another object."""


@dataclass
class RunState:
    body: dict[str, Any] | None = None
    pinned_rv: str | None = None          # newest resourceVersion we wrote or read ourselves
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    tombstones: dict[str, dict[str, Any]] = field(default_factory=dict)   # last state of deleted Jobs
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    first_seen: dict[str, datetime] = field(default_factory=dict)          # pod uid → first seen
    start_failures: dict[tuple[int, str, int], Observed] = field(default_factory=dict)
    noticed: set[str] = field(default_factory=set)
    started_jobs: set[str] = field(default_factory=set)
    reported_error: str | None = None
    invalid_generation: int | None = None
    # Parsed models, kept while the object they came from is current (parsing is most of a
    # reconcile's cost at scale).
    spec_key: tuple | None = None
    spec: SelfImproveRunSpec | None = None
    resolved: SelfImproveRunSpec | None = None
    status_rv: str | None = None
    status: SelfImproveRunStatus | None = None


def _rv(obj: dict[str, Any] | None) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("resourceVersion")


def _generation(obj: dict[str, Any] | None) -> int:
    return int(((obj or {}).get("metadata") or {}).get("generation") or 0)


def _newer(rv: str | None, than: str | None) -> bool:
    """resourceVersions are opaque; in practice they are etcd revisions, and comparing them
    only lets a newer event through sooner. When they are not numbers, nothing is assumed: a
    stale copy is caught anyway by the resourceVersion test of the next status write."""
    return bool(rv and than and rv.isdigit() and than.isdigit() and int(rv) > int(than))


def _finished(job: dict[str, Any]) -> bool:
    # SuccessCriteriaMet / FailureTarget come first (Kubernetes ≥ 1.31) while pods terminate.
    return any(c.get("type") in ("Complete", "Failed", "SuccessCriteriaMet", "FailureTarget") and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or ())


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Controller:
    def __init__(self, config: OperatorConfig, kube: Kube | None = None, clock: Callable[[], datetime] = _utcnow):
        self.config = config
        self.kube = kube
        self.clock = clock
        self.runs: dict[RunKey, RunState] = {}
        self.queue = WorkQueue()
        self.metrics = Metrics(self._phases)
        self._workers: list[asyncio.Task] = []
        self._event_tasks: set[asyncio.Task] = set()
        self._event_slots = asyncio.Semaphore(8)
        self._metrics_runner = None
        self.metrics_port: int | None = None

    # ================================================================== lifecycle
    async def start(self, settings: Any = None) -> None:
        if self.kube is None:
            self.kube = Kube(settings)
        for i in range(max(1, self.config.workers)):
            self._workers.append(asyncio.create_task(self._worker(), name=f"selfimprove reconciler {i}"))
        if self.config.metrics_port is not None:
            await self._serve_metrics()

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        self.queue.close()
        if self._event_tasks:
            await asyncio.wait(self._event_tasks, timeout=5)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None

    async def _serve_metrics(self) -> None:
        from aiohttp import web

        async def metrics(_: web.Request) -> web.Response:
            body, content_type = self.metrics.render()
            return web.Response(body=body, headers={"Content-Type": content_type})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.metrics_host, self.config.metrics_port)
        await site.start()
        self._metrics_runner = runner
        sockets = getattr(site._server, "sockets", None) or ()
        self.metrics_port = sockets[0].getsockname()[1] if sockets else self.config.metrics_port
        logger.info(f"metrics on http://{self.config.metrics_host}:{self.metrics_port}/metrics")

    def _phases(self):
        for state in self.runs.values():
            if state.body is not None:
                yield ((state.body.get("status") or {}).get("phase")) or "Pending"

    # ================================================================== cache feeds (kopf handlers)
    def run_event(self, type_: str | None, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace"), meta.get("name"))
        if type_ == "DELETED":
            state = self.runs.pop(key, None)
            self.queue.forget(key)
            if state is not None:
                logger.info(f"{key[0]}/{key[1]}: run deleted; its Jobs go with it (owner references)")
            return
        state = self.runs.setdefault(key, RunState())
        if type_ == "MODIFIED" and state.pinned_rv is not None and state.body is not None:
            if _rv(body) == state.pinned_rv:
                # The echo of our own write (or of the object we last read): the cache already
                # holds it, and there is nothing new to act on.
                state.body, state.pinned_rv = body, None
                return
            if _generation(body) <= _generation(state.body) and not _newer(_rv(body), state.pinned_rv):
                # An older event still in flight after our write; our copy is newer.
                return
        state.body, state.pinned_rv = body, None
        self.queue.add(key)

    def job_event(self, type_: str | None, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        run = (meta.get("labels") or {}).get(RUN_LABEL)
        if not run:
            return
        key, name = (meta.get("namespace"), run), meta.get("name")
        body = slim_job(body)
        state = self.runs.get(key)
        if type_ == "DELETED":
            if state is None:
                return
            if state.jobs.pop(name, None) is not None or name not in state.tombstones:
                state.tombstones[name] = body
            self._drop_if_empty(key, state)
        else:
            if state is None:
                state = self.runs.setdefault(key, RunState())
            old = state.jobs.get(name)
            state.jobs[name] = body
            state.tombstones.pop(name, None)
            if old is not None and job_signature(old) == job_signature(body):
                return  # e.g. the echo of our own create, or `active` counting up
        self.queue.add(key)

    def pod_event(self, type_: str | None, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        run = (meta.get("labels") or {}).get(RUN_LABEL)
        if not run:
            return
        key, name = (meta.get("namespace"), run), meta.get("name")
        body = slim_pod(body)
        state = self.runs.get(key)
        if type_ == "DELETED":
            if state is None:
                return
            phase = (body.get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed") and job_name_of_pod(body) in set(state.jobs) | set(state.tombstones):
                state.pods[name] = body  # its final state still tells how the attempt ended
            else:
                state.pods.pop(name, None)
            self._drop_if_empty(key, state)
        else:
            if state is None:
                state = self.runs.setdefault(key, RunState())
            before = pod_signature(state.pods.get(name))
            state.pods[name] = body
            uid = meta.get("uid") or name
            state.first_seen.setdefault(uid, self.clock())
            if pod_signature(body) == before:
                return  # created, scheduled, started: nothing the planner would act on
        self.queue.add(key)

    def _drop_if_empty(self, key: RunKey, state: RunState) -> None:
        if state.body is None and not state.jobs:
            # Jobs and Pods of a run that is gone (being garbage-collected): nothing to keep.
            self.runs.pop(key, None)

    # ================================================================== the workers
    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            started = time.perf_counter()
            try:
                await self.reconcile(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is counted, recorded and retried
                await self._on_error(key, exc)
            else:
                self.queue.succeeded(key)
            finally:
                self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
                self.queue.done(key)

    async def _on_error(self, key: RunKey, exc: Exception) -> None:
        self.metrics.reconcile_errors.inc()
        delay = self.queue.failed(key, self.config.reconcile_backoff, self.config.reconcile_max_backoff)
        reason = ("JobCreationFailed" if isinstance(exc, JobCreationFailed)
                  else "JobConflict" if isinstance(exc, JobConflict) else "ReconcileError")
        message = str(exc) if isinstance(exc, (ApiError, JobCreationFailed, JobConflict)) else f"{type(exc).__name__}: {exc}"
        message = message[:EVENT_MESSAGE_LIMIT // 2]
        state = self.runs.get(key)
        first = state is not None and state.reported_error != message
        if isinstance(exc, (ApiError, JobCreationFailed, JobConflict)):
            logger.warning(f"{key[0]}/{key[1]}: {reason}: {message}; retrying in {delay:.0f}s")
        elif first:
            logger.exception(f"{key[0]}/{key[1]}: reconcile failed; retrying in {delay:.0f}s")
        else:
            logger.warning(f"{key[0]}/{key[1]}: reconcile failed again ({message}); retrying in {delay:.0f}s")
        if not first or state is None or state.body is None:
            return
        # Never silent: the failure is on the run (condition + Event), not only in the log.
        state.reported_error = message
        try:
            await self._set_conditions(key, state, [("Degraded", True, reason, message)])
        except Exception as again:  # noqa: BLE001 - the API may be what is failing
            logger.warning(f"{key[0]}/{key[1]}: could not record {reason} on the run: {again}")
        self._post_event(state.body, "Warning", reason, message)

    # ================================================================== reconcile
    async def reconcile(self, key: RunKey) -> None:
        state = self.runs.get(key)
        if state is None or state.body is None:
            return
        body = state.body
        meta = body["metadata"]
        namespace, name = key
        if meta.get("deletionTimestamp"):
            return  # being deleted: start nothing, the garbage collector removes the Jobs
        generation = meta.get("generation")
        spec_key = (meta.get("uid"), generation, None if generation else repr(body.get("spec")))
        if state.spec_key != spec_key:
            try:
                spec = self.config.with_run_defaults(SelfImproveRunSpec.model_validate(body.get("spec") or {}))
            except ValidationError as exc:
                await self._invalid_spec(key, state, exc)
                return
            state.spec_key, state.spec, state.resolved = spec_key, spec, resolve(spec)
        spec = state.spec
        state.invalid_generation = None
        raw_status = body.get("status") or None
        if raw_status and state.status_rv is not None and state.status_rv == _rv(body):
            status = state.status  # the model we wrote ourselves; plan() works on a copy
        else:
            status = SelfImproveRunStatus.model_validate(raw_status) if raw_status else None
        identity = RunIdentity(name=name, namespace=namespace, uid=meta.get("uid") or "",
                               generation=int(meta.get("generation") or 1))
        now = self.clock()

        seen = observe_run(
            identity.uid, list(state.jobs.values()), list(state.pods.values()), now,
            pending_timeout=self.config.pending_timeout, result_grace=self.config.result_grace,
            first_seen=state.first_seen, deleted_jobs=list(state.tombstones.values()),
        )
        observed = dict(seen.observed)
        for (r, s, attempt), obs in state.start_failures.items():
            if (r, s) not in observed or observed[(r, s)].attempt <= attempt:
                observed[(r, s)] = obs
        p = plan(spec, status, observed, now, identity)
        new = p.status

        # ---- persist: the status that records new attempts is stored before they start
        if not await self._write_status(key, state, raw_status, new, status):
            return
        self._count_transitions(status, new)

        # ---- act (pain #8: a finished run starts nothing; `is_terminal` is checked again here)
        starts = {a.job_name: a for a in p.actions if isinstance(a, StartStage)}
        stops = {a.job_name for a in p.actions if isinstance(a, SuspendStage)}
        await self._delete_stale_jobs(key, state, new, stops)
        if not is_terminal(new) and not spec.suspend:
            await self._ensure_jobs(key, state, spec, new, identity, starts)
        for action in p.actions:
            if isinstance(action, Event):
                self._post_event(state.body, action.type, action.reason, action.message)
                log = logger.warning if action.type == "Warning" else logger.info
                log(f"{namespace}/{name}: {action.reason}: {action.message}")
        for notice in seen.notices:
            if notice.key not in state.noticed:
                state.noticed.add(notice.key)
                if notice.reason == "StageDisrupted":
                    self.metrics.disruptions.inc()
                self._post_event(state.body, notice.type, notice.reason, notice.message)
                (logger.warning if notice.type == "Warning" else logger.info)(f"{namespace}/{name}: {notice.reason}: {notice.message}")
        for job_uid, stage, seconds in seen.started:
            if job_uid not in state.started_jobs:
                state.started_jobs.add(job_uid)
                self.metrics.stage_start.labels(stage).observe(seconds)
        self._prune(state, new)
        if (c := condition(new, "Degraded")) is not None and c.status == "True" and c.reason in OWN_DEGRADED:
            # The whole pass went through: the failure recorded earlier is over.
            await self._set_conditions(key, state, [("Degraded", False, "Reconciled", "the operator reconciles the run again")])
        state.reported_error = None

        # ---- when to look again without an event
        delays = [d for d in (p.requeue_after, (seen.wake_at - now).total_seconds() if seen.wake_at else None) if d is not None]
        if not is_terminal(new) and new.phase != "Suspended":
            delays.append(self.config.resync_seconds)  # safety net for anything missed
        if delays:
            self.queue.add_after(key, max(0.05, min(delays)))

    async def _write_status(self, key: RunKey, state: RunState, raw: dict[str, Any] | None, new: SelfImproveRunStatus,
                            parsed: SelfImproveRunStatus | None = None) -> bool:
        """Store `new`; False when the run changed underneath (re-read, and the key requeued)
        or is gone. `parsed` is `raw` as a model, when the caller has it."""
        wire = new.wire()
        try:
            current = (parsed or SelfImproveRunStatus.model_validate(raw)).wire() if raw else None
        except ValidationError:
            current = None
        # The version the patch tests, taken now: a watch event may replace state.body while the
        # request is in flight, and comparing the fresh copy with *that* would call a plain
        # conflict a rejected status.
        tested = _rv(state.body)
        ops = status_patch(raw, wire, tested) if current != wire else []
        if not ops:  # nothing changed (or only the order of conditions: the store's order stands)
            state.status, state.status_rv = new, tested
            return True
        namespace, name = key
        try:
            patched = await self.kube.json_patch(run_path(namespace, name, "status"), ops)
        except ApiError as exc:
            if exc.not_found:
                return False
            if exc.conflict:
                fresh = await self.kube.get(run_path(namespace, name))
                state.body, state.pinned_rv = fresh, _rv(fresh)
                if _rv(fresh) == tested:
                    # Not a newer version: the API server rejects the status itself (422 from
                    # its schema). Re-planning would loop; fail this pass loudly instead.
                    raise
                self.queue.add(key)  # re-plan from the fresh copy right after this pass
                return False
            raise
        state.body, state.pinned_rv = patched, _rv(patched)
        state.status, state.status_rv = new, _rv(patched)
        return True

    async def _set_conditions(self, key: RunKey, state: RunState, conditions: list[tuple[str, bool, str, str]]) -> None:
        """Set conditions (type, value, reason, message) on the stored status and nothing else."""
        raw = (state.body or {}).get("status") or None
        try:
            status = SelfImproveRunStatus.model_validate(raw) if raw else SelfImproveRunStatus()
        except ValidationError:
            status = SelfImproveRunStatus()
        gen = _generation(state.body) or 1
        for type_, value, reason, message in conditions:
            set_condition(status, type_, value, reason, message, self.clock(), gen)
        await self._write_status(key, state, raw, status)

    async def _invalid_spec(self, key: RunKey, state: RunState, exc: ValidationError) -> None:
        """A spec the API server accepted but the models reject (cross-field rules): say so on
        the run and wait for the next spec change."""
        from selfimprove_workers.validation import describe

        gen = _generation(state.body)
        if state.invalid_generation == gen:
            return
        message = describe(exc)[:EVENT_MESSAGE_LIMIT // 2]
        await self._set_conditions(key, state, [
            ("Ready", False, "InvalidSpec", message),
            ("Degraded", True, "InvalidSpec", message),
        ])
        state.invalid_generation = gen
        self._post_event(state.body, "Warning", "InvalidSpec", message)
        logger.warning(f"{key[0]}/{key[1]}: InvalidSpec: {message}")

    # ================================================================== acting on Jobs
    async def _ensure_jobs(self, key: RunKey, state: RunState, spec: SelfImproveRunSpec,
                           status: SelfImproveRunStatus, identity: RunIdentity, starts: dict[str, StartStage]) -> None:
        namespace = key[0]
        for rnd in status.rounds:
            for st in rnd.stages:
                if st.state != "Running" or not st.job:
                    continue
                if st.job in state.jobs or st.job in state.tombstones:
                    continue
                if (rnd.round, st.name, st.attempts) in state.start_failures:
                    continue
                start = starts.get(st.job) or StartStage(
                    rnd.round, st.name, st.attempts, st.job,
                    build_task(state.resolved or resolve(spec), status, identity, rnd.round, st.name, st.attempts))
                manifest = build_job(state.body, spec, start, self.config)
                # Cached before the request: the watch's ADDED event may beat the response, and
                # then finds the Job already known (no second reconcile for our own create).
                placeholder = state.jobs[st.job] = slim_job(manifest)
                try:
                    created = await self.kube.create(job_path(namespace), manifest)
                except ApiError as exc:
                    if state.jobs.get(st.job) is placeholder:
                        del state.jobs[st.job]
                    await self._job_not_created(key, state, start, exc)
                    continue
                if state.jobs.get(st.job) is placeholder:
                    state.jobs[st.job] = slim_job(created)
                self.metrics.jobs_created.inc()
                logger.info(f"{namespace}/{key[1]}: created Job {st.job} (round {rnd.round} {st.name}, attempt {st.attempts})")

    async def _job_not_created(self, key: RunKey, state: RunState, start: StartStage, exc: ApiError) -> None:
        namespace, uid = key[0], state.body["metadata"].get("uid")
        if exc.status == 409:
            # Created before (by us, before a restart or a lost response): adopt it if it is ours.
            existing = await self.kube.get(job_path(namespace, start.job_name))
            if controller_uid(existing) == uid:
                state.jobs[start.job_name] = slim_job(existing)
                return
            raise JobConflict(f"Job {start.job_name} exists and belongs to another object; "
                              "it blocks this attempt until it is deleted")
        if exc.status in (400, 422):
            # The API rejects the Job as invalid: something in the run's spec (a resource
            # quantity, a toleration) makes it so. No retry fixes that; the user must.
            state.start_failures[(start.round, start.stage, start.attempt)] = Observed(
                attempt=start.attempt, state="failed", reason="BadInput",
                message=f"the API server rejected Job {start.job_name}: {exc.message}")
            self.queue.add(key)
            return
        raise JobCreationFailed(f"creating Job {start.job_name} failed: {exc}")

    async def _delete_stale_jobs(self, key: RunKey, state: RunState, status: SelfImproveRunStatus, stops: set[str]) -> None:
        """Delete unfinished Jobs that no longer belong to a Running attempt: the attempt was
        suspended, superseded, or its stage failed permanently while the pod was still pending
        (image pull errors), so it holds no GPU or quota in vain. Safe on a stale status: attempt
        numbers only grow, so an older status marks fewer Jobs as stale, never more."""
        uid = state.body["metadata"].get("uid")
        current = {(r.round, s.name): (s.attempts, s.state) for r in status.rounds for s in r.stages}
        for name, job in list(state.jobs.items()):
            if _finished(job) or (job.get("metadata") or {}).get("deletionTimestamp"):
                continue
            if controller_uid(job) not in (uid, None):
                continue
            sk = stage_key(job)
            if sk is None or (sk[0], sk[1]) not in current:
                continue
            attempts, st = current[(sk[0], sk[1])]
            if name in stops or sk[2] < attempts or (sk[2] == attempts and st != "Running"):
                try:
                    await self.kube.delete(job_path(key[0], name), propagation="Background")
                except ApiError as exc:
                    if not exc.not_found:
                        raise
                logger.info(f"{key[0]}/{key[1]}: deleted Job {name} ({'suspended' if name in stops else 'no longer needed'})")

    def _prune(self, state: RunState, status: SelfImproveRunStatus) -> None:
        """Forget tombstones and pods no Running attempt needs any more (bounded memory)."""
        running = {s.job for r in status.rounds for s in r.stages if s.state == "Running" and s.job}
        gone = [n for n in state.tombstones if n not in running]
        for name in gone:
            del state.tombstones[name]
        # Pods of a pruned tombstone go too. Pods of a Job not seen yet stay: after a restart
        # the Pods' listing may come before the Jobs'.
        for pod_name, pod in list(state.pods.items()):
            if job_name_of_pod(pod) in gone:
                del state.pods[pod_name]
                state.first_seen.pop((pod.get("metadata") or {}).get("uid") or pod_name, None)
        for k in [k for k in state.start_failures if not any(
                r.round == k[0] and s.name == k[1] and s.attempts == k[2] for r in status.rounds for s in r.stages)]:
            del state.start_failures[k]

    # ================================================================== metrics and events
    def _count_transitions(self, old: SelfImproveRunStatus | None, new: SelfImproveRunStatus) -> None:
        before = {(r.round, s.name): s for r in (old.rounds if old else []) for s in r.stages}
        for r in new.rounds:
            for s in r.stages:
                prev = before.get((r.round, s.name))
                failures = s.failures - (prev.failures if prev else 0)
                if failures > 0:
                    self.metrics.stage_failures.labels(s.name, s.reason or "Unknown").inc(failures)
                    self._observe_duration(s, "Failed")
                if s.state == "Succeeded" and (prev is None or prev.state != "Succeeded"):
                    self._observe_duration(s, "Succeeded")

    def _observe_duration(self, stage, outcome: str) -> None:
        if stage.start_time and stage.completion_time:
            seconds = (parse_time(stage.completion_time) - parse_time(stage.start_time)).total_seconds()
            self.metrics.stage_duration.labels(stage.name, outcome).observe(max(0.0, seconds))

    def _post_event(self, run: dict[str, Any] | None, type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about the run in the background: Events must never delay a Job."""
        if run is None or self.kube is None:
            return
        meta = run["metadata"]
        body = event_body(run, type_, reason, message, self.clock(), self.config.reporting_instance)

        async def post() -> None:
            async with self._event_slots:
                try:
                    await self.kube.create(event_path(meta["namespace"]), body)
                except Exception as exc:  # noqa: BLE001 - an Event is best effort
                    logger.warning(f"{meta['namespace']}/{meta['name']}: could not post Event {reason}: {exc}")

        task = asyncio.create_task(post())
        self._event_tasks.add(task)
        task.add_done_callback(self._event_tasks.discard)
