"""Progress of running stages: the last progress record of the stage pod's log, read at a bounded rate.

Why the log: the control plane reads no data and holds no storage credentials, and worker pods
hold no API token (docs/architecture.md), so a stage cannot patch the run and the operator
cannot read the stage's storage. What a stage prints is already the channel everyone reads
(`kubectl logs`): every stage logs JSON lines and a progress line carries
`{"progress": {"done", "total", "unit", "etaSeconds"}}` (`selfimprove_workers.log.progress`,
itself bounded to one line every few seconds). The operator reads the tail of the running pod's
log (`GET pods/{name}/log?container=worker&tailLines=N&limitBytes=M`, RBAC `pods/log: get`)
and the planner copies the newest record onto `status.progress`.

A sharded stage (one Indexed Job) has a pod per shard: each read takes up to
`SHARD_READS` of its running pods, the least recently read first, and the record handed to the
planner combines the latest of each running shard with the shards already done
(`selfimprove_workers.log.combine_shards`), so `status.progress` counts the whole stage.

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
from dataclasses import dataclass, field

from selfimprove_workers.log import ProgressRecord, combine_shards, last_progress

from ..api import SelfImproveRunStatus, StageStatus
from .bodies import PodBody
from .cache import RunKey, RunState
from .jobs import CONTAINER
from .kube import ApiError, Kube
from .observe import completion_index, job_name_of_pod

logger = logging.getLogger("selfimprove.operator.progress")

TAIL_LINES = 40
LIMIT_BYTES = 64 * 1024
# Pods of one sharded stage read per turn (each takes a token): a 1,000-shard stage is sampled,
# not read whole, and its figure is an estimate from the shards read (combine_shards).
SHARD_READS = 4


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
    # A sharded stage: the latest record of each running pod (by completion index), when each
    # was last read, and the stage's shards in all and done (from the status, at the last read).
    shard_records: dict[int, ProgressRecord] = field(default_factory=dict)
    read_at: dict[int, float] = field(default_factory=dict)
    shards: int = 1
    finished: int = 0


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
        """The newest record read for the attempt `job` of run `key` (a sharded stage's: its
        running shards' combined)."""
        poll = self._polls.get(key)
        if poll is None or job is None or poll.job != job:
            return None
        if poll.shards > 1:
            return combine_shards(poll.shard_records, poll.shards, poll.finished)
        return poll.record

    async def poll(self, key: RunKey, state: RunState, status: SelfImproveRunStatus | None) -> float | None:
        """Read the running pod's (a sharded stage's: up to SHARD_READS running pods') log tail if
        its turn has come; seconds until the next read is due (None: nothing runs, or progress is
        off)."""
        if not self.enabled or self.kube is None:
            return None
        stage = _running_stage(status)
        job = stage.job if stage is not None else None
        if stage is None or job is None:
            self._polls.pop(key, None)
            return None
        pods = _running_pods(state, job)
        if not pods:
            # A pod that starts running wakes nobody (nothing the planner sees changes): look again.
            return self.interval
        poll = self._polls.get(key)
        if poll is None or poll.job != job:
            poll = self._polls[key] = _Poll(job)
        now = self.clock()
        if now < poll.next_at:
            return poll.next_at - now
        assert self.bucket is not None
        shards = _shard_counts(stage.shards)
        if shards is None:
            # One pod; or the nodes of a multi-node train Job, where only global rank 0 logs
            # progress: index 0's pod, whose hostname sorts first in the rendezvous.
            indexed = sorted(((k, p) for p in pods if (k := completion_index(p)) is not None), key=lambda kp: kp[0])
            chosen: list[tuple[int | None, PodBody]] = [(None, indexed[0][1] if indexed else pods[-1])]
        else:
            poll.shards, poll.finished = shards[1], len(stage.completed_shards or ())
            by_index = {k: p for p in pods if (k := completion_index(p)) is not None}
            # Shards no longer running are counted by `finished`, not by their last record.
            for k in set(poll.shard_records) - set(by_index):
                poll.shard_records.pop(k)
            order = sorted(by_index, key=lambda k: (poll.read_at.get(k, -1.0), k))
            chosen = [(k, by_index[k]) for k in order[:SHARD_READS]]
        took = False
        for index, pod in chosen:
            wait = self.bucket.take()
            if wait > 0:
                if not took:
                    return wait
                break
            took = True
            rec = await self._read(key, pod)
            if index is None:
                poll.record = rec or poll.record
            else:
                poll.read_at[index] = now
                if rec is not None:
                    poll.shard_records[index] = rec
        poll.next_at = now + self.interval
        return self.interval

    async def _read(self, key: RunKey, pod: PodBody) -> ProgressRecord | None:
        namespace = key[0]
        name = (pod.get("metadata") or {}).get("name") or ""
        self.reads += 1
        try:
            text = await self.kube.text(pod_log_path(namespace, name), params={  # type: ignore[union-attr]
                "container": CONTAINER, "tailLines": str(TAIL_LINES), "limitBytes": str(LIMIT_BYTES)})
        except ApiError as exc:
            # 400 while the container starts, 403 without the RBAC verb, 404 once it is gone:
            # progress is best effort and never fails a reconcile.
            logger.debug(f"{namespace}/{key[1]}: cannot read the log of pod {name}: {exc}")
            return None
        return last_progress(text)


def _shard_counts(text: str | None) -> tuple[int, int] | None:
    """(done, total) of a StageStatus.shards "3/8"; None for a stage that is not sharded."""
    try:
        done, total = (int(x) for x in (text or "").split("/"))
    except ValueError:
        return None
    return (done, total) if total > 1 else None


def _running_stage(status: SelfImproveRunStatus | None) -> StageStatus | None:
    if status is None or not status.rounds:
        return None
    return next((s for s in status.rounds[-1].stages if s.state == "Running"), None)


def _running_pods(state: RunState, job: str) -> list[PodBody]:
    """The Job's pods whose container runs, oldest first (a one-pod Job's newest is last, should
    the Job have replaced one)."""
    pods = [p for p in state.pods.values()
            if job_name_of_pod(p) == job and (p.get("status") or {}).get("phase") == "Running"
            and not (p.get("metadata") or {}).get("deletionTimestamp")]
    return sorted(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
