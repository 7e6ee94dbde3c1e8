"""The controller's cache: what the watches said about each run, its Jobs and its Pods.

kopf's watch events (runs, and the Jobs and Pods labelled `selfimprove.dev/run`) feed it through
`run_changed` / `job_changed` / `pod_changed`; each returns the run's key when the event may
change what the planner sees, and only then does the controller wake the key in its work queue.
Jobs and Pods are kept slim (`observe.slim_job`/`slim_pod`): only what observing them needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import cast

from ..api import SelfImproveRunSpec, SelfImproveRunStatus
from ..planner import Observed
from .bodies import JobBody, PodBody, RunBody
from .desired import running_jobs
from .jobs import RUN_LABEL
from .observe import job_name_of_pod, job_signature, pod_signature, slim_job, slim_pod

logger = logging.getLogger("selfimprove.operator")

RunKey = tuple[str, str]  # (namespace, name)


@dataclass
class RunState:
    body: RunBody | None = None
    pinned_rv: str | None = None          # newest resourceVersion we wrote or read ourselves
    jobs: dict[str, JobBody] = field(default_factory=dict)
    tombstones: dict[str, JobBody] = field(default_factory=dict)   # last state of deleted Jobs
    pods: dict[str, PodBody] = field(default_factory=dict)
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

    def prune(self, status: SelfImproveRunStatus) -> None:
        """Forget tombstones and pods no Running attempt needs any more (bounded memory)."""
        running = running_jobs(status)
        gone = [n for n in self.tombstones if n not in running]
        for name in gone:
            del self.tombstones[name]
        # Pods of a pruned tombstone go too. Pods of a Job not seen yet stay: after a restart
        # the Pods' listing may come before the Jobs'.
        for pod_name, pod in list(self.pods.items()):
            if job_name_of_pod(pod) in gone:
                del self.pods[pod_name]
                self.first_seen.pop((pod.get("metadata") or {}).get("uid") or pod_name, None)
        for k in [k for k in self.start_failures if not any(
                r.round == k[0] and s.name == k[1] and s.attempts == k[2] for r in status.rounds for s in r.stages)]:
            del self.start_failures[k]


def rv_of(obj: RunBody | None) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("resourceVersion")


def generation_of(obj: RunBody | None) -> int:
    return int(((obj or {}).get("metadata") or {}).get("generation") or 0)


def newer(rv: str | None, than: str | None) -> bool:
    """resourceVersions are opaque; in practice they are etcd revisions, and comparing them
    only lets a newer event through sooner. When they are not numbers, nothing is assumed: a
    stale copy is caught anyway by the resourceVersion test of the next status write."""
    return bool(rv and than and rv.isdigit() and than.isdigit() and int(rv) > int(than))


def run_key(body: RunBody) -> RunKey:
    meta = body.get("metadata") or {}
    # A run as the API delivers it always has both (SelfImproveRun is namespaced): the cast
    # only says so; nothing is checked, as before.
    return cast(RunKey, (meta.get("namespace"), meta.get("name")))


class Cache:
    def __init__(self, clock: Callable[[], datetime]):
        self.clock = clock
        self._runs: dict[RunKey, RunState] = {}

    # ---------------------------------------------------------------- reading
    def get(self, key: RunKey) -> RunState | None:
        return self._runs.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._runs

    def __len__(self) -> int:
        return len(self._runs)

    def phases(self) -> Iterator[str]:
        """The phase of every run known (the `selfimprove_runs` collector reads it at scrape time)."""
        for state in self._runs.values():
            if state.body is not None:
                yield ((state.body.get("status") or {}).get("phase")) or "Pending"

    # ---------------------------------------------------------------- feeds
    def run_deleted(self, body: RunBody) -> RunKey:
        key = run_key(body)
        state = self._runs.pop(key, None)
        if state is not None:
            logger.info(f"{key[0]}/{key[1]}: run deleted; its Jobs go with it (owner references)")
        return key

    def run_changed(self, type_: str | None, body: RunBody) -> RunKey | None:
        key = run_key(body)
        state = self._runs.setdefault(key, RunState())
        if type_ == "MODIFIED" and state.pinned_rv is not None and state.body is not None:
            if rv_of(body) == state.pinned_rv:
                # The echo of our own write (or of the object we last read): the cache already
                # holds it, and there is nothing new to act on.
                state.body, state.pinned_rv = body, None
                return None
            if generation_of(body) <= generation_of(state.body) and not newer(rv_of(body), state.pinned_rv):
                # An older event still in flight after our write; our copy is newer.
                return None
        state.body, state.pinned_rv = body, None
        return key

    def job_changed(self, type_: str | None, body: JobBody) -> RunKey | None:
        meta = body.get("metadata") or {}
        run = (meta.get("labels") or {}).get(RUN_LABEL)
        namespace, name = meta.get("namespace"), meta.get("name")
        if not run or namespace is None or name is None:
            return None  # not a run's, or not an object the API could deliver (Jobs and Pods are named, namespaced)
        key: RunKey = (namespace, run)
        body = slim_job(body)
        state = self._runs.get(key)
        if type_ == "DELETED":
            if state is None:
                return None
            if state.jobs.pop(name, None) is not None or name not in state.tombstones:
                state.tombstones[name] = body
            self._drop_if_empty(key, state)
        else:
            if state is None:
                state = self._runs.setdefault(key, RunState())
            old = state.jobs.get(name)
            state.jobs[name] = body
            state.tombstones.pop(name, None)
            if old is not None and job_signature(old) == job_signature(body):
                return None  # e.g. the echo of our own create, or `active` counting up
        return key

    def pod_changed(self, type_: str | None, body: PodBody) -> RunKey | None:
        meta = body.get("metadata") or {}
        run = (meta.get("labels") or {}).get(RUN_LABEL)
        namespace, name = meta.get("namespace"), meta.get("name")
        if not run or namespace is None or name is None:
            return None  # not a run's, or not an object the API could deliver (Jobs and Pods are named, namespaced)
        key: RunKey = (namespace, run)
        body = slim_pod(body)
        state = self._runs.get(key)
        if type_ == "DELETED":
            if state is None:
                return None
            phase = (body.get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed") and job_name_of_pod(body) in set(state.jobs) | set(state.tombstones):
                state.pods[name] = body  # its final state still tells how the attempt ended
            else:
                state.pods.pop(name, None)
            self._drop_if_empty(key, state)
        else:
            if state is None:
                state = self._runs.setdefault(key, RunState())
            before = pod_signature(state.pods.get(name))
            state.pods[name] = body
            uid = meta.get("uid") or name
            state.first_seen.setdefault(uid, self.clock())
            if pod_signature(body) == before:
                return None  # created, scheduled, started: nothing the planner would act on
        return key

    def _drop_if_empty(self, key: RunKey, state: RunState) -> None:
        if state.body is None and not state.jobs:
            # Jobs and Pods of a run that is gone (being garbage-collected): nothing to keep.
            self._runs.pop(key, None)
