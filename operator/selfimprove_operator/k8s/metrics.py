"""Prometheus metrics of the operator (lifecycle metrics users ask for: pain #9).

- `selfimprove_runs{phase}`: runs by phase, computed from the controller's cache at scrape time
  (a collector, not a gauge kept in step by hand, so it cannot drift);
- `selfimprove_stage_duration_seconds{stage,outcome}`: latest attempt's start → end of a stage;
- `selfimprove_stage_start_seconds{stage}`: Job created → worker running (queueing, scheduling,
  image pull);
- `selfimprove_stage_failures_total{stage,reason}`: failed attempts by reason;
- `selfimprove_stage_disruptions_total`: pods preempted or evicted (not failures);
- `selfimprove_reconcile_errors_total`, `selfimprove_reconcile_seconds`, `selfimprove_jobs_created_total`.

The endpoint (`metrics_server`) is served from the operator's event loop (aiohttp, already
kopf's HTTP stack), so the collector reads the cache without locks and no thread is needed.
"""

from __future__ import annotations

from collections import Counter as _Counter
from collections.abc import Callable, Iterable
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..api import Phase, SelfImproveRunStatus, StageStatus
from ..planner import parse_time

PHASES = get_args(Phase)
DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
START_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _RunsByPhase:
    def __init__(self, phases: Callable[[], Iterable[str]]):
        self._phases = phases

    def collect(self):
        counts = _Counter(self._phases())
        family = GaugeMetricFamily("selfimprove_runs", "SelfImproveRuns by phase.", labels=["phase"])
        for phase in PHASES:
            family.add_metric([phase], counts.get(phase, 0))
        yield family


class Metrics:
    def __init__(self, phases: Callable[[], Iterable[str]]):
        self.registry = CollectorRegistry()
        self.registry.register(_RunsByPhase(phases))
        self.stage_duration = Histogram(
            "selfimprove_stage_duration_seconds", "Duration of a stage's latest attempt.",
            ["stage", "outcome"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.stage_start = Histogram(
            "selfimprove_stage_start_seconds", "From a stage Job's creation to its worker running.",
            ["stage"], buckets=START_BUCKETS, registry=self.registry)
        self.stage_failures = Counter(
            "selfimprove_stage_failures", "Failed stage attempts by reason.",
            ["stage", "reason"], registry=self.registry)
        self.disruptions = Counter(
            "selfimprove_stage_disruptions", "Stage pods preempted or evicted (not failures).",
            registry=self.registry)
        self.reconcile_errors = Counter(
            "selfimprove_reconcile_errors", "Reconciles that raised and will be retried.",
            registry=self.registry)
        self.reconcile_seconds = Histogram(
            "selfimprove_reconcile_seconds", "Time of one reconcile of a run.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry)
        self.jobs_created = Counter(
            "selfimprove_jobs_created", "Stage Jobs created.", registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # ---------------------------------------------------------------- from status transitions
    def count_transitions(self, old: SelfImproveRunStatus | None, new: SelfImproveRunStatus) -> None:
        """Stage failures and durations from one stored status to the next."""
        before = {(r.round, s.name): s for r in (old.rounds if old else []) for s in r.stages}
        for r in new.rounds:
            for s in r.stages:
                prev = before.get((r.round, s.name))
                failures = s.failures - (prev.failures if prev else 0)
                if failures > 0:
                    self.stage_failures.labels(s.name, s.reason or "Unknown").inc(failures)
                    self._observe_duration(s, "Failed")
                if s.state == "Succeeded" and (prev is None or prev.state != "Succeeded"):
                    self._observe_duration(s, "Succeeded")

    def _observe_duration(self, stage: StageStatus, outcome: str) -> None:
        if stage.start_time and stage.completion_time:
            seconds = (parse_time(stage.completion_time) - parse_time(stage.start_time)).total_seconds()
            self.stage_duration.labels(stage.name, outcome).observe(max(0.0, seconds))
