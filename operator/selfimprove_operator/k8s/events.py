"""The run's core/v1 Events: the body (pure, `event_body`) and a recorder that posts them.

The recorder posts in the background, a few at a time: Events are best effort and must never
delay a Job, nor pile up unbounded requests while the API server is slow.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from selfimprove_workers.redaction import redact

from ..api import API_VERSION, KIND
from ..planner import rfc3339
from .bodies import RunBody
from .kube import Kube, event_path

logger = logging.getLogger("selfimprove.operator")

EVENT_MESSAGE_LIMIT = 1024


def truncate_message(message: str, limit: int = EVENT_MESSAGE_LIMIT) -> str:
    """`message` cut to at most `limit` bytes of UTF-8, an ellipsis (3 bytes) marking the cut:
    the API server's limit on an Event's note (1024) counts bytes (Go's len), not characters."""
    if len(message.encode()) <= limit:
        return message
    cut = message.encode()[: limit - len("…".encode())].decode(errors="ignore")
    return cut + "…"


def event_body(run: RunBody, type_: str, reason: str, message: str, now: datetime,
               reporting_instance: str) -> dict[str, Any]:
    """The core/v1 Event the operator posts about `run` (pure: `EventRecorder.event` sends it)."""
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
        # The operator holds no credentials, but a stage's message quotes what the worker saw
        # (an endpoint URL with userinfo, a presigned URL): the one redactor runs on it too.
        "message": truncate_message(redact(message)),
        "action": reason,
        "source": {"component": "selfimprove-operator"},
        "reportingComponent": "selfimprove.dev/operator",
        "reportingInstance": reporting_instance,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


class EventRecorder:
    def __init__(self, kube: Kube | None, clock: Callable[[], datetime], reporting_instance: str, concurrency: int = 8):
        self.kube = kube
        self.clock = clock
        self.reporting_instance = reporting_instance
        self._tasks: set[asyncio.Task] = set()
        self._slots = asyncio.Semaphore(concurrency)

    def event(self, run: RunBody | None, type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about the run in the background: Events must never delay a Job."""
        kube = self.kube
        if run is None or kube is None:
            return
        meta = run["metadata"]
        body = event_body(run, type_, reason, message, self.clock(), self.reporting_instance)

        async def post() -> None:
            async with self._slots:
                try:
                    await kube.create(event_path(meta["namespace"]), body)
                except Exception as exc:  # noqa: BLE001 - an Event is best effort
                    logger.warning(f"{meta['namespace']}/{meta['name']}: could not post Event {reason}: {exc}")

        task = asyncio.create_task(post())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def in_flight(self) -> int:
        """Events still being posted."""
        return len(self._tasks)

    async def drain(self, timeout: float | None = None) -> None:
        """Until every Event posted so far is sent (or failed), or `timeout` seconds passed."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
