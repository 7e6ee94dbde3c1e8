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
  them and the Job makes a new pod — but worth an Event, so they are returned as notices;
- a sharded stage (one Indexed Job, jobs.py): the shards done from the Job's
  `status.completedIndexes` (completion index k runs shard `shardIndexes[k]`, the Job's
  annotation), and the stage's result from the one pod whose summary is the merged result
  (`shard` none) — a Complete Job without it is a failure (MissingResult).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, cast

from selfimprove_workers.constants import IMAGE_ERROR_REASONS
from selfimprove_workers.contract import StageResult

from ..planner import Observed, parse_time
from .bodies import Condition, ContainerStateTerminated, ContainerStatus, JobBody, PodBody
from .jobs import (
    ATTEMPT_LABEL,
    COMPLETION_INDEX_KEY,
    CONTAINER,
    JOB_NAME_LABELS,
    NODES_ANNOTATION,
    ROUND_LABEL,
    SHARD_INDEXES_ANNOTATION,
    SHARDS_ANNOTATION,
    STAGE_LABEL,
)

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


def parse_indexes(text: str | None) -> frozenset[int]:
    """An Indexed Job's compressed index list (`status.completedIndexes`, `failedIndexes`):
    comma-separated indexes and inclusive ranges in increasing order, "0-2,4" = {0, 1, 2, 4};
    empty or absent = none. Anything else is a ValueError naming the part and the text."""
    found: set[int] = set()
    if not text:
        return frozenset()
    last = -1
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ValueError(f"index list {text!r}: {part!r} is neither an index nor a range a-b")
        low = int(m.group(1))
        high = int(m.group(2)) if m.group(2) is not None else low
        if high < low or low <= last:
            raise ValueError(f"index list {text!r}: {part!r} is not in increasing order")
        found.update(range(low, high + 1))
        last = high
    return frozenset(found)


def job_shards(job: JobBody) -> tuple[int, list[int]] | None:
    """(shards, the shard of each completion index) of a sharded stage's Job; None otherwise."""
    annotations = (job.get("metadata") or {}).get("annotations") or {}
    try:
        shards = int(annotations.get(SHARDS_ANNOTATION) or 1)
        listed = annotations.get(SHARD_INDEXES_ANNOTATION)
        indexes = [int(i) for i in listed.split(",")] if listed else list(range(shards))
    except ValueError:
        return None  # not written by this operator: observed as a one-pod Job
    return (shards, indexes) if shards > 1 else None


def completion_index(pod: PodBody) -> int | None:
    meta = pod.get("metadata") or {}
    text = (meta.get("annotations") or {}).get(COMPLETION_INDEX_KEY) or (meta.get("labels") or {}).get(COMPLETION_INDEX_KEY)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _shards_of(indexes: frozenset[int], mapping: list[int]) -> frozenset[int]:
    return frozenset(mapping[k] for k in indexes if 0 <= k < len(mapping))


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
    sharding = job_shards(job)
    done_shards: frozenset[int] = frozenset()
    if sharding is not None:
        try:
            done_shards = _shards_of(parse_indexes(status.get("completedIndexes")), sharding[1])
        except ValueError as exc:
            out.notices.append(Notice(key=f"{job['metadata'].get('uid')}:completedIndexes", reason="StageShards",
                                      type="Warning", message=f"{job['metadata']['name']}: status.completedIndexes: {exc}"))

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

    if ("Complete" in conds or "SuccessCriteriaMet" in conds) and sharding is not None:
        return _sharded_success(job, pods, conds, now, out, attempt, sharding, done_shards, result_grace)
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
                return Observed(attempt=attempt, state="running", completed_shards=done_shards)
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
        if sharding is not None and failed_pod is not None and (k := completion_index(failed_pod)) is not None \
                and k < len(sharding[1]):
            message = f"shard {sharding[1][k]}: {message}" if message else f"shard {sharding[1][k]} failed"
        elif _nodes(job) > 1 and failed_pod is not None and (k := completion_index(failed_pod)) is not None:
            # one node of a multi-node train Job: which one failed (the others stop with it)
            message = f"node {k}: {message}" if message else f"node {k} failed"
        return Observed(attempt=attempt, state="failed", result=result, exit_code=exit_code, reason=reason, message=message,
                        completed_shards=done_shards)

    if deleted:
        return Observed(attempt=attempt, state="missing", completed_shards=done_shards)

    live = [p for p in pods if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
    if not live:
        if (job.get("spec") or {}).get("suspend"):
            return Observed(attempt=attempt, state="pending", message="waiting for admission (Job suspended)")
        return Observed(attempt=attempt, state="running" if done_shards else "pending", completed_shards=done_shards)
    # One pod of a plain Job; a sharded Job runs while any of its pods does.
    if any((p.get("status") or {}).get("phase") == "Running" for p in live):
        return Observed(attempt=attempt, state="running", completed_shards=done_shards)
    pod = next((p for p in live if _stuck(p) is not None), live[-1])
    stuck = _stuck(pod)
    if stuck is None:
        return Observed(attempt=attempt, state="running" if done_shards else "pending", completed_shards=done_shards)
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
    return Observed(attempt=attempt, state="pending", reason=reason, message=text, completed_shards=done_shards)


def _sharded_success(job: JobBody, pods: list[PodBody], conds: dict[str | None, Condition], now: datetime, out: Observation,
                     attempt: int, sharding: tuple[int, list[int]], done_shards: frozenset[int],
                     result_grace: float) -> Observed:
    """Every index of the Job succeeded: the stage's result is the merged summary (shard none),
    written by the shard that finished last and saw every shard's marker."""
    for pod in reversed(pods):
        if (pod.get("status") or {}).get("phase") != "Succeeded":
            continue
        term = _terminated(pod)
        result = parse_result(term.get("message")) if term else None
        if result is not None and result.shard is None:
            return Observed(attempt=attempt, state="succeeded", result=result, completed_shards=done_shards)
    # The pod that merged may not have reached us yet (its watch event lags the Job's).
    cond = conds.get("Complete") or conds.get("SuccessCriteriaMet") or {}
    since = _time((job.get("status") or {}).get("completionTime")) or _time(cond.get("lastTransitionTime")) or now
    deadline = since + timedelta(seconds=result_grace)
    if now < deadline:
        out.wake(deadline)
        return Observed(attempt=attempt, state="running", completed_shards=done_shards)
    shards, indexes = sharding
    return Observed(attempt=attempt, state="failed", reason="MissingResult", completed_shards=done_shards,
                    message=f"the Job's {len(indexes)} pods of {shards} shards completed but none reported the merged "
                            f"result (a summary with no shard): no shard saw every shard's _SUCCESS marker")


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
# The only annotations observing reads: a sharded Job's shards, a multi-node Job's nodes, a pod's
# completion index.
_ANNOTATIONS_KEPT = (SHARDS_ANNOTATION, SHARD_INDEXES_ANNOTATION, NODES_ANNOTATION, COMPLETION_INDEX_KEY)


def _nodes(job: JobBody) -> int:
    try:
        return int(((job.get("metadata") or {}).get("annotations") or {}).get(NODES_ANNOTATION) or 1)
    except ValueError:
        return 1


def _slim_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    kept = {k: meta[k] for k in _META_KEPT if k in meta}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k in _ANNOTATIONS_KEPT}
    if annotations:
        kept["annotations"] = annotations
    return kept
_POD_STATUS_KEPT = ("phase", "reason", "conditions", "containerStatuses", "initContainerStatuses")


def slim_job(job: JobBody) -> JobBody:
    """What observing and cleaning up need of a Job: a cache of full Jobs (each carries its task
    and pod template) would cost the operator memory per stage for nothing."""
    # Read as plain mappings: the kept keys are picked by name, and the result is a JobBody.
    meta: Mapping[str, Any] = job.get("metadata") or {}
    status: Mapping[str, Any] = job.get("status") or {}
    return cast(JobBody, {
        "metadata": _slim_meta(meta),
        "spec": {"suspend": True} if (job.get("spec") or {}).get("suspend") else {},
        "status": {k: status[k] for k in ("conditions", "completionTime", "completedIndexes", "failedIndexes") if k in status},
    })


def slim_pod(pod: PodBody) -> PodBody:
    meta: Mapping[str, Any] = pod.get("metadata") or {}
    status: Mapping[str, Any] = pod.get("status") or {}
    return cast(PodBody, {
        "metadata": _slim_meta(meta),
        "status": {k: status[k] for k in _POD_STATUS_KEPT if k in status},
    })


def job_signature(job: JobBody) -> tuple:
    """The parts of a Job an observation depends on: an event that leaves them unchanged (the
    `active` count, `ready`, `startTime` …) cannot change what the planner sees."""
    conditions = tuple(sorted((c.get("type") or "", c.get("reason") or "") for c in (job.get("status") or {}).get("conditions") or ()
                              if c.get("status") == "True"))
    status = job.get("status") or {}
    return (conditions, bool((job.get("spec") or {}).get("suspend")), bool(job.get("metadata", {}).get("deletionTimestamp")),
            status.get("completedIndexes"), status.get("failedIndexes"))


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
    shards_done: dict[tuple[int, str], frozenset[int]] = {}
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
            shards_done[slot] = shards_done.get(slot, frozenset()) | obs.completed_shards
            # The highest attempt wins; for the same attempt a live Job beats its tombstone.
            if slot not in candidates or candidates[slot][0] <= key[2]:
                candidates[slot] = (key[2], obs)
    # A shard finished by an earlier attempt stays done (its Job may still be there, until its ttl).
    out.observed = {slot: obs if obs.completed_shards == shards_done[slot] else replace(obs, completed_shards=shards_done[slot])
                    for slot, (_, obs) in candidates.items()}
    return out
