"""Progress records: what a stage logs (rate-bounded, with an ETA), how a reader parses them, how
the planner puts them on the status, and the operator's read schedule (k8s/progress.py)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from datetime import UTC, datetime

import pytest
from selfimprove_operator.api import SelfImproveRunStatus
from selfimprove_operator.planner import Observed, RunIdentity, plan, stage_progress
from selfimprove_workers import log as slog


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _logger(name: str) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    logger = logging.getLogger(name)
    logger.handlers[:] = []
    handler = logging.StreamHandler(out)
    handler.setFormatter(slog.JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, out


def test_progress_lines_are_rate_bounded_and_carry_an_eta(monkeypatch):
    monkeypatch.setenv(slog.PROGRESS_INTERVAL_ENV, "2")
    logger, out = _logger("selfimprove.test-progress-rate")
    clock = Clock()
    written = []
    for i in range(101):  # one call every 0.1 s: 10 s in all
        written.append(slog.progress(logger, i, 100, "paths", clock=clock))
        clock.t += 0.1
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    # the first, one per 2 s, and the last
    assert written[0] and written[100] and 5 <= sum(written) <= 7
    assert [line["progress"]["done"] for line in lines][0] == 0 and lines[-1]["progress"]["done"] == 100
    mid = next(line for line in lines if 40 <= line["progress"]["done"] <= 60)["progress"]
    # 10 paths a second: the rest takes (100 - done) / 10 seconds
    assert mid["etaSeconds"] == pytest.approx((100 - mid["done"]) / 10, abs=0.2)
    assert "etaSeconds" not in lines[0]["progress"]  # no rate yet


def test_a_new_count_restarts_the_rate():
    logger, out = _logger("selfimprove.test-progress-restart")
    clock = Clock()
    slog.progress(logger, 0, 10, "steps", clock=clock)
    clock.t += 100
    slog.progress(logger, 10, 10, "steps", clock=clock)
    slog.progress(logger, 0, 4, "steps", clock=clock)  # another total: a new count
    clock.t += 1
    slog.progress(logger, 4, 4, "steps", clock=clock)
    last = json.loads(out.getvalue().splitlines()[-1])["progress"]
    assert last == {"done": 4, "total": 4, "unit": "steps", "etaSeconds": 0.0}


def test_parse_progress_accepts_only_well_formed_records():
    good = json.dumps({"ts": "2026-01-01T00:00:00Z", "msg": "x", "progress": {"done": 3, "total": 9, "unit": "paths", "etaSeconds": 12}})
    rec = slog.parse_progress(good)
    assert rec == slog.ProgressRecord(3, 9, "paths", "2026-01-01T00:00:00Z", 12.0) and rec.percent == 33
    for bad in ("plain text", "{not json", json.dumps([1]), json.dumps({"ts": "t", "progress": {"done": "3", "total": 9, "unit": "u"}}),
                json.dumps({"ts": "t", "progress": {"done": True, "total": 9, "unit": "u"}}),
                json.dumps({"progress": {"done": 1, "total": 9, "unit": "u"}})):
        assert slog.parse_progress(bad) is None, bad
    text = "\n".join([good, "noise", json.dumps({"ts": "t2", "progress": {"done": 5, "total": 9, "unit": "paths"}}), "{}"])
    assert slog.last_progress(text).done == 5


NOW = datetime(2026, 1, 1, tzinfo=UTC)
RUN = RunIdentity(name="p", uid="u")


def _running():
    from selfimprove_operator.api import SelfImproveRunSpec

    spec = SelfImproveRunSpec.model_validate({
        "strategy": "lmsi", "model": {"base": "/m"}, "data": {"questions": "/q.jsonl", "evaluation": "/e.jsonl"},
        "storage": {"uri": "file:///tmp/x"}, "rounds": {"max": 1}})
    p = plan(spec, None, {}, NOW, RUN)
    return spec, p.status


def test_the_planner_puts_the_running_attempts_record_on_the_status():
    spec, status = _running()
    [stage] = [s for s in status.rounds[0].stages if s.state == "Running"]
    rec = slog.ProgressRecord(30, 120, "answers", "2026-01-01T00:00:05Z", 3700.0)
    p = plan(spec, status, {(0, stage.name): Observed(attempt=1, state="running", report=rec)}, NOW, RUN)
    prog = p.status.progress
    assert prog is not None and (prog.round, prog.stage, prog.attempt, prog.percent) == (0, stage.name, 1, 25)
    assert prog.estimated_remaining_seconds == 3700 and prog.summary == f"{stage.name} 25% (30/120 answers, 1h01m left)"
    assert p.status.rounds[0].stages[0].progress == "30/120 answers"
    # Nothing newer seen (an operator that restarted): the stored progress stays.
    again = plan(spec, p.status, {}, NOW, RUN)
    assert again.status.progress == prog
    # An older attempt's record is not this attempt's progress.
    assert stage_progress(p.status, {(0, stage.name): Observed(attempt=0, state="running", report=rec)}, None) is None
    # The stage is over: no progress.
    from selfimprove_workers.contract import StageResult

    result = StageResult(stage=stage.name, round=0, status="Succeeded", metrics={"accuracy": 0.5}, outputs={})
    done = plan(spec, p.status, {(0, stage.name): Observed(attempt=1, state="succeeded", result=result)}, NOW, RUN)
    assert done.status.progress is None
    assert "progress" not in SelfImproveRunStatus.model_validate(done.status.wire()).wire()


def test_token_bucket_and_per_run_interval_bound_the_reads():
    from selfimprove_operator.k8s.cache import RunState
    from selfimprove_operator.k8s.progress import ProgressReader, TokenBucket

    clock = Clock(0.0)
    bucket = TokenBucket(2.0, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]
    clock.t += 0.5
    assert bucket.take() == 0.0

    _, status = _running()
    job = next(s for s in status.rounds[0].stages if s.state == "Running").job

    class Kube:
        def __init__(self):
            self.calls = []

        async def text(self, path, params=None):
            self.calls.append((path, params))
            return json.dumps({"ts": "t", "progress": {"done": len(self.calls), "total": 10, "unit": "answers"}}) + "\n"

    kube = Kube()
    reader = ProgressReader(kube, interval=10.0, rate=100.0, clock=clock)  # type: ignore[arg-type]
    state = RunState()
    key = ("default", "p")
    assert asyncio.run(reader.poll(key, state, status)) == 10.0  # no running pod yet: look again later
    state.pods["p-1"] = {"metadata": {"name": "p-1", "labels": {"job-name": job}}, "status": {"phase": "Running"}}
    assert asyncio.run(reader.poll(key, state, status)) == 10.0
    assert kube.calls == [("/api/v1/namespaces/default/pods/p-1/log",
                           {"container": "worker", "tailLines": "40", "limitBytes": "65536"})]
    clock.t += 4
    assert asyncio.run(reader.poll(key, state, status)) == pytest.approx(6.0)  # not its turn: no read
    clock.t += 6
    asyncio.run(reader.poll(key, state, status))
    assert len(kube.calls) == 2 and reader.record(key, job).done == 2
    assert reader.record(key, "another-job") is None


def test_the_live_view_shows_the_status_progress():
    from selfimprove_operator.view import stages_line

    spec, status = _running()
    [stage] = [s for s in status.rounds[0].stages if s.state == "Running"]
    rec = slog.ProgressRecord(30, 120, "answers", "2026-01-01T00:00:05Z", 3700.0)
    status = plan(spec, status, {(0, stage.name): Observed(attempt=1, state="running", report=rec)}, NOW, RUN).status
    assert stages_line(status).plain == f"round 0: {stage.name} [25% 30/120 answers, ~1h01m left]"


def test_a_sharded_stages_progress_combines_its_running_shards():
    rec = slog.ProgressRecord
    # 4 shards of ~100 paths: one done before, two running and read, one running not read yet.
    got = slog.combine_shards({1: rec(40, 100, "paths", "2026-01-01T00:00:05Z", 30.0),
                               2: rec(10, 102, "paths", "2026-01-01T00:00:09Z", 90.0)}, shards=4, finished=1)
    assert (got.done, got.total, got.unit) == (101 + 40 + 10, 404, "paths")
    assert got.eta_seconds == 90.0 and got.ts == "2026-01-01T00:00:09Z"   # the slowest shard; the newest read
    assert slog.combine_shards({}, shards=4, finished=2) is None           # nothing read: nothing claimed
    # Every shard done but one nearly so: never more than the total, never over 100%.
    last = slog.combine_shards({3: rec(99, 100, "paths", "2026-01-01T00:00:00Z")}, shards=4, finished=3)
    assert (last.done, last.total, last.percent) == (399, 400, 99)


def test_the_planner_says_how_many_shards_are_done():
    from selfimprove_operator.api import RoundStatus, StageStatus

    status = SelfImproveRunStatus(rounds=[RoundStatus(round=1, stages=[
        StageStatus(name="sample", state="Running", attempts=1, shards="1/4", completed_shards=[0])])])
    obs = Observed(attempt=1, state="running", report=slog.ProgressRecord(150, 400, "paths", "2026-01-01T00:00:00Z", 65.0))
    prog = stage_progress(status, {(1, "sample"): obs}, None)
    assert prog.summary == "sample 37% (150/400 paths, 1m05s left; shards 1/4)"


def test_a_multi_node_jobs_progress_is_read_from_node_0():
    """Only global rank 0 logs progress, and on an Indexed Job index 0's pod holds it: the
    reader reads that pod, not the newest one (which may be another node)."""
    from selfimprove_operator.k8s.cache import RunState
    from selfimprove_operator.k8s.progress import ProgressReader

    _, status = _running()
    job = next(s for s in status.rounds[0].stages if s.state == "Running").job

    class Kube:
        def __init__(self):
            self.paths = []

        async def text(self, path, params=None):
            self.paths.append(path)
            return json.dumps({"ts": "t", "progress": {"done": 3, "total": 10, "unit": "steps"}}) + "\n"

    kube = Kube()
    reader = ProgressReader(kube, interval=10.0, rate=100.0, clock=Clock(0.0))  # type: ignore[arg-type]
    state = RunState()
    for index, created in ((1, "2026-01-01T00:00:02Z"), (0, "2026-01-01T00:00:01Z")):  # node 1 is the newest
        state.pods[f"n-{index}"] = {"metadata": {
            "name": f"n-{index}", "labels": {"job-name": job}, "creationTimestamp": created,
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}}, "status": {"phase": "Running"}}
    asyncio.run(reader.poll(("default", "p"), state, status))
    assert kube.paths == ["/api/v1/namespaces/default/pods/n-0/log"]
