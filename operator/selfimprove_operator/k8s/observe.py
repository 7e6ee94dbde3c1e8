"""Jobs and Pods of a run → the planner's `Observed`, one per (round, stage) (pure).

What the planner needs from Kubernetes, and where it comes from:
- success and the stage's result: the Job's `Complete` condition and the worker container's
  termination message (the result summary, ≤ 4 KiB);
- failure and why: the Job's `Failed` condition (`DeadlineExceeded`, `BackoffLimitExceeded`,
  `PodFailurePolicy`) refined by the failed pod's container state (`OOMKilled`, exit code, and
  the summary or — with `FallbackToLogsOnError` — the tail of the log);
- a pod stuck before running (image pull errors, unschedulable, a missing Secret): reported only
  after `pending_timeout`, so a slow pull or a scale-up does not raise a condition;
- disruptions (preemption, eviction, drain): not failures — the Job's pod failure policy ignores
  them and the Job makes a new pod — but worth an Event, so they are returned as notices.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from selfimprove_workers.constants import IMAGE_ERROR_REASONS
from selfimprove_workers.contract import StageResult

from ..planner import Observed, parse_time
from .bodies import Condition, ContainerStateTerminated, ContainerStatus, JobBody, PodBody
from .jobs import ATTEMPT_LABEL, CONTAINER, JOB_NAME_LABELS, ROUND_LABEL, STAGE_LABEL

# Waiting reasons of a container that will not fix themselves quickly.
STUCK_REASONS = IMAGE_ERROR_REASONS | {"CreateContainerConfigError", "CreateContainerError"}
MESSAGE_LIMIT = 600


@dataclass(frozen=True)
class Notice:
    """Something worth an Event that the planner has no transition for: a preempted pod, a pod
    stuck before running (the planner marks the run Degraded, or fails it when permanent)."""

    key: str            # dedupe key: one Event per pod and cause
    reason: str
    message: str
    type: str = "Normal"


@dataclass
class Observation:
    observed: dict[tuple[int, str], Observed] = field(default_factory=dict)
    wake_at: datetime | None = None          # when an observation changes by time alone
    notices: list[Notice] = field(default_factory=list)
    started: list[tuple[str, str, float]] = field(default_factory=list)  # (job uid, stage, seconds to running)

    def wake(self, when: datetime) -> None:
        if self.wake_at is None or when < self.wake_at:
            self.wake_at = when


def stage_key(obj: JobBody | PodBody) -> tuple[int, str, int] | None:
    """(round, stage, attempt) from a Job's or Pod's labels; None when they are not ours."""
    labels = obj.get("metadata", {}).get("labels") or {}
    try:
        return int(labels[ROUND_LABEL]), labels[STAGE_LABEL], int(labels.get(ATTEMPT_LABEL, "1"))
    except (KeyError, ValueError):
        return None


def controller_uid(obj: JobBody | PodBody) -> str | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or ():
        if ref.get("controller"):
            return ref.get("uid")
    return None


def job_name_of_pod(pod: PodBody) -> str | None:
    labels = pod.get("metadata", {}).get("labels") or {}
    for key in JOB_NAME_LABELS:
        if labels.get(key):
            return labels[key]
    return None


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return parse_time(text)
    except ValueError:
        return None


def _true_conditions(obj: JobBody | PodBody) -> dict[str | None, Condition]:
    return {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or () if c.get("status") == "True"}


def _container(pod: PodBody) -> ContainerStatus | None:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for cs in statuses:
        if cs.get("name") == CONTAINER:
            return cs
    return statuses[0] if statuses else None


def _terminated(pod: PodBody) -> ContainerStateTerminated | None:
    cs = _container(pod)
    if cs is None:
        return None
    return (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")


def disrupted(pod: PodBody) -> Condition | None:
    return _true_conditions(pod).get("DisruptionTarget")


def parse_result(text: str | None) -> StageResult | None:
    """The result summary in a termination message, or None when the message is something else
    (the log tail of a crashed worker, or nothing)."""
    if not text or not text.lstrip().startswith("{"):
        return None
    try:
        return StageResult.parse_summary(text)
    except ValueError:  # pydantic's ValidationError included
        return None


def log_tail(text: str | None) -> str | None:
    """A short message from the log tail Kubernetes put in the termination message: the error
    records of the worker's JSON log when there are any, else the last lines as they are."""
    if not text:
        return None
    errors, plain = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            plain.append(line)
            continue
        if isinstance(record, dict) and record.get("level") in ("error", "critical") and record.get("msg"):
            errors.append(str(record["msg"]))
    text = "; ".join(errors[-3:]) if errors else " | ".join(plain[-3:])
    return _short(text) if text else None


def _short(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else "…" + text[-(MESSAGE_LIMIT - 1):]


def _sorted_pods(pods: Iterable[PodBody]) -> list[PodBody]:
    return sorted(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"].get("name") or ""))


# =========================================================================== one Job
def observe_job(
    job: JobBody,
    pods: list[PodBody],
    now: datetime,
    out: Observation,
    *,
    pending_timeout: float,
    result_grace: float,
    first_seen: dict[str, datetime] | None = None,
    deleted: bool = False,
) -> Observed | None:
    key = stage_key(job)
    if key is None:
        return None
    attempt = key[2]
    pods = _sorted_pods(pods)
    status = job.get("status") or {}
    conds = _true_conditions(job)

    for pod in pods:
        if (d := disrupted(pod)) is not None:
            name = pod["metadata"].get("name")
            out.notices.append(Notice(
                key=pod["metadata"].get("uid") or name or "",
                reason="StageDisrupted",
                message=f"pod {name} of {job['metadata']['name']} was disrupted ({d.get('reason') or 'DisruptionTarget'}"
                        f"{': ' + d['message'] if d.get('message') else ''}); the Job replaces it without counting a failure",
            ))
        _record_start(job, pod, out)

    if "Complete" in conds or "SuccessCriteriaMet" in conds:
        done = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
        term = _terminated(done[-1]) if done else None
        if term is not None:
            result = parse_result(term.get("message"))
            if result is not None:
                return Observed(attempt=attempt, state="succeeded", result=result)
            return Observed(attempt=attempt, state="succeeded", message=log_tail(term.get("message")))
        # The Job says Complete but its pod's final state has not reached us yet (the pod's
        # watch event lags, or the pod is gone): wait a little for the summary.
        since = _time(status.get("completionTime")) or _time((conds.get("Complete") or conds.get("SuccessCriteriaMet") or {}).get("lastTransitionTime")) or now
        deadline = since + timedelta(seconds=result_grace)
        if now >= deadline:
            return Observed(attempt=attempt, state="succeeded", message="the Job completed but its pod's result summary was never seen")
        out.wake(deadline)
        return Observed(attempt=attempt, state="running")

    if "Failed" in conds or "FailureTarget" in conds:
        cond = conds.get("Failed") or conds["FailureTarget"]
        job_reason, job_message = cond.get("reason"), cond.get("message")
        failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed" and disrupted(p) is None]
        failed_pod = failed[-1] if failed else None
        term = _terminated(failed_pod) if failed_pod is not None else None
        if term is None and job_reason != "DeadlineExceeded":
            # The failed pod's final state (exit code, OOMKilled, the worker's summary) has not
            # reached us yet: it says far more than BackoffLimitExceeded, so wait a little.
            since = _time(cond.get("lastTransitionTime")) or now
            deadline = since + timedelta(seconds=result_grace)
            if now < deadline:
                out.wake(deadline)
                return Observed(attempt=attempt, state="running")
        exit_code = term.get("exitCode") if term else None
        result = parse_result(term.get("message")) if term else None
        if job_reason == "DeadlineExceeded":
            reason = "DeadlineExceeded"
        elif term is not None and term.get("reason") == "OOMKilled":
            reason = "OOMKilled"
        elif term is not None:
            reason = None   # the planner takes the summary's reason, else ExitCode<n>
        else:
            reason = (failed_pod or {}).get("status", {}).get("reason") or job_reason or "Failed"
        if exit_code is None and job_message and (m := re.search(r"exit code (\d+)", job_message)):
            exit_code = int(m.group(1))
        message = (result.message if result and result.message else None) or (log_tail(term.get("message")) if term else None) or job_message
        return Observed(attempt=attempt, state="failed", result=result, exit_code=exit_code, reason=reason, message=message)

    if deleted:
        return Observed(attempt=attempt, state="missing")

    live = [p for p in pods if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
    if not live:
        if (job.get("spec") or {}).get("suspend"):
            return Observed(attempt=attempt, state="pending", message="waiting for admission (Job suspended)")
        return Observed(attempt=attempt, state="pending")
    pod = live[-1]
    phase = (pod.get("status") or {}).get("phase")
    if phase == "Running":
        return Observed(attempt=attempt, state="running")
    stuck = _stuck(pod)
    if stuck is None:
        return Observed(attempt=attempt, state="pending")
    reason, message = stuck
    uid = pod["metadata"].get("uid") or pod["metadata"].get("name")
    since = _time(pod["metadata"].get("creationTimestamp")) or (first_seen.get(uid) if first_seen and uid is not None else None) or now
    deadline = since + timedelta(seconds=pending_timeout)
    if now < deadline:
        out.wake(deadline)
        return Observed(attempt=attempt, state="pending")
    waited = int((now - since).total_seconds())
    text = _short(f"pod {pod['metadata'].get('name')} {reason} for {waited}s: {message}" if message
                  else f"pod {pod['metadata'].get('name')} {reason} for {waited}s")
    out.notices.append(Notice(key=f"{uid}:{reason}", reason="StagePending", type="Warning",
                              message=f"{job['metadata']['name']}: {text}"))
    return Observed(attempt=attempt, state="pending", reason=reason, message=text)


def _stuck(pod: PodBody) -> tuple[str, str | None] | None:
    status = pod.get("status") or {}
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_REASONS:
            return waiting["reason"], waiting.get("message")
    for cond in status.get("conditions") or ():
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
            return "Unschedulable", cond.get("message")
    return None


def _record_start(job: JobBody, pod: PodBody, out: Observation) -> None:
    """Time from the Job's creation to its worker running (queueing, scheduling, image pull)."""
    cs = _container(pod)
    if cs is None:
        return
    state = cs.get("state") or {}
    started = _time((state.get("running") or state.get("terminated") or {}).get("startedAt"))
    created = _time(job["metadata"].get("creationTimestamp"))
    key = stage_key(job)
    if started and created and key and disrupted(pod) is None:
        out.started.append((job["metadata"].get("uid") or job["metadata"]["name"], key[1], max(0.0, (started - created).total_seconds())))


# =========================================================================== what matters
_META_KEPT = ("name", "namespace", "uid", "labels", "ownerReferences", "creationTimestamp", "deletionTimestamp")
_POD_STATUS_KEPT = ("phase", "reason", "conditions", "containerStatuses", "initContainerStatuses")


def slim_job(job: JobBody) -> JobBody:
    """What observing and cleaning up need of a Job: a cache of full Jobs (each carries its task
    and pod template) would cost the operator memory per stage for nothing."""
    # Read as plain mappings: the kept keys are picked by name, and the result is a JobBody.
    meta: Mapping[str, Any] = job.get("metadata") or {}
    status: Mapping[str, Any] = job.get("status") or {}
    return cast(JobBody, {
        "metadata": {k: meta[k] for k in _META_KEPT if k in meta},
        "spec": {"suspend": True} if (job.get("spec") or {}).get("suspend") else {},
        "status": {k: status[k] for k in ("conditions", "completionTime") if k in status},
    })


def slim_pod(pod: PodBody) -> PodBody:
    meta: Mapping[str, Any] = pod.get("metadata") or {}
    status: Mapping[str, Any] = pod.get("status") or {}
    return cast(PodBody, {
        "metadata": {k: meta[k] for k in _META_KEPT if k in meta},
        "status": {k: status[k] for k in _POD_STATUS_KEPT if k in status},
    })


def job_signature(job: JobBody) -> tuple:
    """The parts of a Job an observation depends on: an event that leaves them unchanged (the
    `active` count, `ready`, `startTime` …) cannot change what the planner sees."""
    conditions = tuple(sorted((c.get("type") or "", c.get("reason") or "") for c in (job.get("status") or {}).get("conditions") or ()
                              if c.get("status") == "True"))
    return conditions, bool((job.get("spec") or {}).get("suspend")), bool(job.get("metadata", {}).get("deletionTimestamp"))


QUIET_POD = (None, None, False)


def pod_signature(pod: PodBody | None) -> tuple:
    """Likewise for a Pod: finished or not, stuck or not, disrupted or not. A pod that is
    created, scheduled and starts normally (QUIET_POD) changes nothing the planner sees."""
    if pod is None:
        return QUIET_POD
    phase = (pod.get("status") or {}).get("phase")
    stuck = _stuck(pod)
    return (phase if phase in ("Succeeded", "Failed") else None, stuck[0] if stuck else None, disrupted(pod) is not None)


# =========================================================================== a run
def observe_run(
    run_uid: str | None,
    jobs: Iterable[JobBody],
    pods: Iterable[PodBody],
    now: datetime,
    *,
    pending_timeout: float,
    result_grace: float,
    first_seen: dict[str, datetime] | None = None,
    deleted_jobs: Iterable[JobBody] = (),
) -> Observation:
    """The latest attempt of every (round, stage) the run's Jobs show. Jobs whose controller is
    another object (a deleted run of the same name) are not this run's. `deleted_jobs` are the
    last known states of Jobs that disappeared: a finished one still tells how it ended, an
    unfinished one is reported `missing`."""
    out = Observation()
    by_job: dict[str, list[PodBody]] = {}
    for pod in pods:
        name = job_name_of_pod(pod)
        if name:
            by_job.setdefault(name, []).append(pod)
    candidates: dict[tuple[int, str], tuple[int, Observed]] = {}
    for deleted, group in ((True, deleted_jobs), (False, jobs)):
        for job in group:
            if run_uid and controller_uid(job) not in (run_uid, None):
                continue
            key = stage_key(job)
            if key is None:
                continue
            obs = observe_job(job, by_job.get(job["metadata"]["name"], []), now, out,
                              pending_timeout=pending_timeout, result_grace=result_grace,
                              first_seen=first_seen, deleted=deleted)
            if obs is None:
                continue
            slot = (key[0], key[1])
            # The highest attempt wins; for the same attempt a live Job beats its tombstone.
            if slot not in candidates or candidates[slot][0] <= key[2]:
                candidates[slot] = (key[2], obs)
    out.observed = {slot: obs for slot, (_, obs) in candidates.items()}
    return out
