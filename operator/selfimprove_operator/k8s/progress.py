"""Progress of running stages: the last progress record of the stage pod's log, read at a bounded rate.

Why the log: the control plane reads no data and holds no storage credentials, and worker pods
hold no API token (docs/architecture.md), so a stage cannot patch the run and the operator
cannot read the stage's storage. What a stage prints is already the channel everyone reads
(`kubectl logs`): every stage logs JSON lines and a progress line carries
`{"progress": {"done", "total", "unit", "etaSeconds"}}` (`selfimprove_workers.log.progress`,
itself bounded to one line every few seconds). The operator reads the tail of the running pod's
log (`GET pods/{name}/log?container=worker&tailLines=N&limitBytes=M`, RBAC `pods/log: get`)
and the planner copies the newest record onto `status.progress`.

Two bounds keep the API load flat however many runs there are:
- per run, at most one read every `progress_interval` seconds (and so at most one progress
  write: a record that did not change writes nothing);
- across runs, a token bucket of `progress_rate` reads per second (burst: one second's worth);
  a run that finds the bucket empty tries again when the next token is due.
The reads happen inside the run's reconcile (the work queue's one-reconcile-per-run rule holds),
and the reconcile asks to be woken when the next read is due.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from selfimprove_workers.log import ProgressRecord, last_progress

from ..api import SelfImproveRunStatus
from .bodies import PodBody
from .cache import RunKey, RunState
from .jobs import CONTAINER
from .kube import ApiError, Kube
from .observe import job_name_of_pod

logger = logging.getLogger("selfimprove.operator.progress")

TAIL_LINES = 40
LIMIT_BYTES = 64 * 1024


def pod_log_path(namespace: str, pod: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods/{pod}/log"


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate)
        self.clock = clock
        self.tokens = self.burst
        self.at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def take(self) -> float:
        """0 when a token was taken; else the seconds until one is due (nothing taken)."""
        self._refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class _Poll:
    job: str
    next_at: float = 0.0
    record: ProgressRecord | None = None


class ProgressReader:
    def __init__(self, kube: Kube | None, interval: float, rate: float, clock: Callable[[], float] = time.monotonic):
        self.kube = kube
        self.interval = interval
        self.clock = clock
        self.bucket = TokenBucket(rate, clock=clock) if rate > 0 else None
        self.reads = 0
        self._polls: dict[RunKey, _Poll] = {}

    @property
    def enabled(self) -> bool:
        return self.interval > 0 and self.bucket is not None

    def forget(self, key: RunKey) -> None:
        self._polls.pop(key, None)

    def record(self, key: RunKey, job: str | None) -> ProgressRecord | None:
        """The newest record read for the attempt `job` of run `key`."""
        poll = self._polls.get(key)
        return poll.record if poll is not None and job is not None and poll.job == job else None

    async def poll(self, key: RunKey, state: RunState, status: SelfImproveRunStatus | None) -> float | None:
        """Read the running pod's log tail if its turn has come; seconds until the next read is
        due (None: nothing runs, or progress is off)."""
        if not self.enabled or self.kube is None:
            return None
        job = _running_job(status)
        if job is None:
            self._polls.pop(key, None)
            return None
        pod = _running_pod(state, job)
        if pod is None:
            # A pod that starts running wakes nobody (nothing the planner sees changes): look again.
            return self.interval
        poll = self._polls.get(key)
        if poll is None or poll.job != job:
            poll = self._polls[key] = _Poll(job)
        now = self.clock()
        if now < poll.next_at:
            return poll.next_at - now
        assert self.bucket is not None
        wait = self.bucket.take()
        if wait > 0:
            return wait
        poll.next_at = now + self.interval
        namespace = key[0]
        name = (pod.get("metadata") or {}).get("name") or ""
        self.reads += 1
        try:
            text = await self.kube.text(pod_log_path(namespace, name), params={
                "container": CONTAINER, "tailLines": str(TAIL_LINES), "limitBytes": str(LIMIT_BYTES)})
        except ApiError as exc:
            # 400 while the container starts, 403 without the RBAC verb, 404 once it is gone:
            # progress is best effort and never fails a reconcile.
            logger.debug(f"{namespace}/{key[1]}: cannot read the log of pod {name}: {exc}")
            return self.interval
        rec = last_progress(text)
        if rec is not None:
            poll.record = rec
        return self.interval


def _running_job(status: SelfImproveRunStatus | None) -> str | None:
    if status is None or not status.rounds:
        return None
    stage = next((s for s in status.rounds[-1].stages if s.state == "Running"), None)
    return stage.job if stage is not None else None


def _running_pod(state: RunState, job: str) -> PodBody | None:
    """The Job's pod whose container runs (the newest, should the Job have replaced one)."""
    pods = [p for p in state.pods.values()
            if job_name_of_pod(p) == job and (p.get("status") or {}).get("phase") == "Running"
            and not (p.get("metadata") or {}).get("deletionTimestamp")]
    if not pods:
        return None
    return max(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
