"""The Kubernetes executor's controller: the parts below, put together (controller-runtime's shape).

kopf feeds the cache (`cache`: runs, and the Jobs and Pods labelled `selfimprove.dev/run`) and
the controller wakes the run's key in a work queue (`workqueue`); a pool of workers takes keys
and reconciles one run at a time each (`reconciler`: observe → plan → persist status → act),
then applies the `Result` the reconcile returns — a requeue now, or a wake-up later — or, when
it raised, counts the failure and retries with backoff. The reconcile writes the status through
`status_writer`, creates and deletes Jobs through `actuator` (what should exist: `desired`),
and posts Events through `events`; `metrics_server` serves the Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .actuator import JobActuator
from .bodies import JobBody, PodBody, RunBody
from .cache import Cache, RunKey, RunState
from .config import OperatorConfig
from .events import EventRecorder
from .kube import Kube
from .metrics import Metrics
from .metrics_server import MetricsServer
from .progress import ProgressReader
from .reconciler import Reconciler, Result
from .status_writer import StatusWriter
from .workqueue import WorkQueue


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Controller:
    def __init__(self, config: OperatorConfig, kube: Kube | None = None, clock: Callable[[], datetime] = _utcnow):
        self.config = config
        self.clock = clock
        self.cache = Cache(clock)
        self.queue: WorkQueue[RunKey] = WorkQueue()
        self.metrics = Metrics(self.cache.phases)
        self.recorder = EventRecorder(kube, clock, config.reporting_instance)
        self.status_writer = StatusWriter(kube, clock)
        self.actuator = JobActuator(kube, config, self.metrics)
        self.progress = ProgressReader(kube, config.progress_interval, config.progress_rate)
        self.reconciler = Reconciler(config, self.cache, self.status_writer, self.actuator, self.recorder,
                                     self.metrics, clock, self.progress)
        self.kube = kube
        self._workers: list[asyncio.Task] = []
        self._metrics_server: MetricsServer | None = None
        self.metrics_port: int | None = None

    @property
    def kube(self) -> Kube | None:
        return self._kube

    @kube.setter
    def kube(self, kube: Kube | None) -> None:
        # Made at start-up from kopf's settings (its login); every part that calls the API uses it.
        self._kube = kube
        self.recorder.kube = self.status_writer.kube = self.actuator.kube = self.progress.kube = kube

    # ================================================================== lifecycle
    async def start(self, settings: Any = None) -> None:
        if self.kube is None:
            self.kube = Kube(settings)
        for i in range(max(1, self.config.workers)):
            self._workers.append(asyncio.create_task(self._worker(), name=f"selfimprove reconciler {i}"))
        if self.config.metrics_port is not None:
            self._metrics_server = MetricsServer(self.metrics, self.config.metrics_host, self.config.metrics_port)
            self.metrics_port = await self._metrics_server.start()

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        self.queue.close()
        await self.recorder.drain(timeout=5)
        if self._metrics_server is not None:
            await self._metrics_server.stop()
            self._metrics_server = None

    # ================================================================== cache feeds (kopf handlers)
    def run_event(self, type_: str | None, body: RunBody) -> None:
        if type_ == "DELETED":
            gone = self.cache.run_deleted(body)
            self.queue.forget(gone)
            self.progress.forget(gone)
        elif (key := self.cache.run_changed(type_, body)) is not None:
            self.queue.add(key)

    def job_event(self, type_: str | None, body: JobBody) -> None:
        if (key := self.cache.job_changed(type_, body)) is not None:
            self.queue.add(key)

    def pod_event(self, type_: str | None, body: PodBody) -> None:
        if (key := self.cache.pod_changed(type_, body)) is not None:
            self.queue.add(key)

    def run_state(self, key: RunKey) -> RunState | None:
        """What the cache holds about the run `key` (namespace, name), if anything."""
        return self.cache.get(key)

    # ================================================================== the workers
    async def reconcile(self, key: RunKey) -> Result:
        """One reconcile of `key`; the result is for the caller to apply (the workers do)."""
        return await self.reconciler.reconcile(key)

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            started = time.perf_counter()
            result: Result | None = None
            try:
                result = await self.reconcile(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is counted, recorded and retried
                result = await self._on_error(key, exc)
            else:
                self.queue.succeeded(key)
            finally:
                self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
                if result is not None:
                    self._apply(key, result)  # before `done`: a requeue now runs right after this pass
                self.queue.done(key)

    def _apply(self, key: RunKey, result: Result) -> None:
        if result.requeue:
            self.queue.add(key)
        if result.requeue_after is not None:
            self.queue.add_after(key, result.requeue_after)

    async def _on_error(self, key: RunKey, exc: Exception) -> Result:
        self.metrics.reconcile_errors.inc()
        delay = self.queue.failed(key, self.config.reconcile_backoff, self.config.reconcile_max_backoff)
        return await self.reconciler.report_error(key, exc, delay)
