"""The planner driven as an executor would drive it, for tests that need the statuses, tasks and
Events of whole runs (the Job, Event and status checks against the API server's schemas)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from selfimprove_operator.api import SelfImproveRunSpec
from selfimprove_operator.planner import Event, Observed, RunIdentity, StartStage, plan
from selfimprove_workers.contract import StageResult

__all__ = ["STRATEGIES", "T0", "Sim", "ok", "run_spec", "RunIdentity"]

T0 = datetime(2026, 1, 1, tzinfo=UTC)

STRATEGIES: dict[str, dict[str, Any]] = {
    "lmsi": {"strategy": "lmsi", "data": {"questions": "s3://d/q.jsonl", "evaluation": "s3://d/e.jsonl"}},
    "iwsi": {"strategy": "iwsi", "data": {"questions": "s3://d/q.jsonl", "evaluation": "s3://d/e.jsonl",
                                           "validation": "s3://d/v.jsonl"}},
    "llm2llm": {"strategy": "llm2llm", "model": {"base": "s3://m/base/", "teacher": "s3://m/teacher/"},
                "data": {"seed": "s3://d/seed.jsonl", "evaluation": "s3://d/e.jsonl"}},
    "lmsi-teacher": {"strategy": "lmsi-teacher", "model": {"base": "s3://m/student/", "teacher": "s3://m/teacher/"},
                     "data": {"questions": "s3://d/q.jsonl", "evaluation": "s3://d/e.jsonl"}},
}


def ok(stage: str, round_no: int) -> StageResult:
    metrics = {"sample": {"paths": 64, "questions": 2, "meanConfidence": 0.8}, "filter": {"kept": 40},
               "train": {"trainLoss": 0.3}, "evaluate": {"accuracy": 0.4 + 0.1 * round_no},
               "augment": {"augmented": 3}, "exemplars": {"refreshed": 4}}[stage]
    outputs = {"adapter": f"s3://b/runs/a{round_no}/"} if stage == "train" else {}
    return StageResult(stage=stage, round=round_no, status="Succeeded", metrics=metrics, outputs=outputs)


class Sim:
    """Drives the planner as an executor does, keeping every StartStage and Event it plans."""

    def __init__(self, spec: SelfImproveRunSpec, ident: RunIdentity):
        self.spec, self.ident, self.status, self.now = spec, ident, None, T0
        self.observed: dict[tuple[int, str], Observed] = {}
        self.starts: list[StartStage] = []
        self.events: list[Event] = []

    def step(self, advance: float = 1.0) -> None:
        self.now += timedelta(seconds=advance)
        p = plan(self.spec, self.status, self.observed, self.now, self.ident)
        for a in p.actions:
            if isinstance(a, StartStage):
                self.starts.append(a)
                self.observed[(a.round, a.stage)] = Observed(attempt=a.attempt, state="running")
            elif isinstance(a, Event):
                self.events.append(a)
        self.status = p.status

    def running(self) -> list[tuple[int, str]]:
        return [k for k, o in self.observed.items() if o.state == "running"]

    def succeed_all(self) -> None:
        for (r, s) in self.running():
            self.observed[(r, s)] = Observed(attempt=self.observed[(r, s)].attempt, state="succeeded", result=ok(s, r))

    def fail_all(self, exit_code: int = 1, reason: str | None = "Error", message: str = "boom") -> None:
        for key in self.running():
            self.observed[key] = Observed(attempt=self.observed[key].attempt, state="failed",
                                          exit_code=exit_code, reason=reason, message=message)

    def run_to_end(self, limit: int = 60) -> None:
        for _ in range(limit):
            self.step()
            if self.status.phase in ("Succeeded", "Failed"):
                return
            self.succeed_all()
        raise AssertionError(f"run did not finish: phase {self.status.phase}")


def run_spec(strategy: str, resources: dict, storage: dict, **changes) -> SelfImproveRunSpec:
    body: dict[str, Any] = {
        "model": {"base": "s3://m/base/"},
        "rounds": {"max": 1, "patience": 0},
        "retry": {"limit": 1, "backoffSeconds": 10},
        "storage": {"uri": "s3://b/runs", "secretRef": "creds", **storage},
        "resources": resources,
        **copy.deepcopy(STRATEGIES[strategy]),
        **changes,
    }
    body["storage"] = {k: v for k, v in body["storage"].items() if v is not None}
    return SelfImproveRunSpec.model_validate(body)


