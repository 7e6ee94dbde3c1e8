"""Sharded stages: the API field, the contract and the planner's shard bookkeeping."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from selfimprove_operator.api import ResourcesSpec, SelfImproveRunSpec
from selfimprove_operator.manifest import ManifestInvalid, runs_from_text
from selfimprove_workers.contract import StageResult, StageTask
from selfimprove_workers.stage_registry import STAGES

MANIFEST = """\
apiVersion: selfimprove.dev/v1alpha1
kind: SelfImproveRun
metadata: {name: run}
spec:
  strategy: lmsi
  model: {base: s3://m/base/}
  data: {questions: s3://d/q.jsonl, evaluation: s3://d/e.jsonl}
  storage: {uri: s3://b/runs/}
  resources: RESOURCES
"""


def spec_with(resources: str) -> SelfImproveRunSpec:
    return runs_from_text(MANIFEST.replace("RESOURCES", resources), "run.yaml")[0].spec


def test_shardable_stages_are_the_row_wise_ones():
    # augment: its order-dependent dedup runs in the merge; filter's shardability is decided (and
    # tested) with its scoring split, tests/unit/test_filter_streaming.py
    assert {n for n, k in STAGES.items() if k.shardable} - {"filter"} == {"sample", "evaluate", "augment"}


def test_run_level_shards_and_a_stage_override_merge():
    res = spec_with("{shards: 4, stages: {evaluate: {shards: 2}}}").resources
    assert res.for_stage("sample").shards == 4
    assert res.for_stage("evaluate").shards == 2


def test_a_non_shardable_stage_with_shards_is_refused_naming_the_field():
    with pytest.raises(ManifestInvalid) as info:
        spec_with("{stages: {train: {shards: 2}}}")
    text = "\n".join(str(e) for e in info.value.errors)
    assert "resources.stages.train.shards" in text and "cannot be sharded" in text
    # 1 is what it is anyway: allowed.
    assert spec_with("{stages: {train: {shards: 1}}}").resources.for_stage("train").shards == 1
    with pytest.raises(ValidationError):
        ResourcesSpec(shards=1001)


def task(**kw) -> StageTask:
    body = {"run": {"name": "r"}, "round": 0, "stage": "sample", "output": "file:///tmp/o/",
            "model": {"base": "/m"}, "inputs": {"questions": "file:///q.jsonl"},
            "sampling": {"paths": 2, "temperature": 0.7}, **kw}
    return StageTask.model_validate(body)


def test_task_digest_ignores_attempt_and_shard_indexes_but_not_shards():
    one = task()
    assert "shards" not in one.wire() or one.wire()["shards"] == 1
    two = task(shards=2)
    assert two.digest() == task(shards=2, shardIndexes=[1], attempt=3).digest()
    assert two.digest() != one.digest()


def test_task_shard_indexes_are_checked():
    with pytest.raises(ValidationError, match="shardIndexes"):
        task(shards=2, shardIndexes=[2])
    with pytest.raises(ValidationError, match="shardIndexes"):
        task(shards=2, shardIndexes=[1, 1])
    with pytest.raises(ValidationError, match="cannot be sharded"):
        StageTask.model_validate({"run": {"name": "r"}, "round": 1, "stage": "train", "output": "/o/",
                                  "model": {"base": "/m"}, "inputs": {"train": ["/k.jsonl"]},
                                  "training": {}, "shards": 2})


def test_result_carries_its_shard():
    r = StageResult(stage="sample", round=0, status="Succeeded", shard=1, shards=2)
    back = StageResult.parse_summary(r.summary_json())
    assert (back.shard, back.shards) == (1, 2)
    assert StageResult(stage="sample", round=0, status="Succeeded").shard is None


# ---------------------------------------------------------------------------- the planner
def _planner_sim(**resources):
    from tests.unit.test_planner import Sim, spec
    return Sim(spec(resources=resources))


def test_planner_shards_only_shardable_stages_and_retries_only_missing_shards():
    from selfimprove_operator.planner import Observed
    sim = _planner_sim(shards=3)
    [start] = sim.step().starts
    assert start.stage == "evaluate" and start.task.shards == 3 and start.task.shard_indexes is None
    st = sim.status.rounds[0].stages[0]
    assert st.shards == "0/3"
    # Shard 0 and 2 finish while 1 still runs: the status shows it.
    sim.observed[(0, "evaluate")] = Observed(attempt=1, state="running", completed_shards=frozenset({0}))
    sim.step()
    assert sim.status.rounds[0].stages[0].shards == "1/3"
    sim.observed[(0, "evaluate")] = Observed(attempt=1, state="failed", exit_code=1, message="shard 1 died",
                                             completed_shards=frozenset({2}))
    sim.step()
    st = sim.status.rounds[0].stages[0]
    assert (st.state, st.shards, st.completed_shards) == ("Pending", "2/3", [0, 2])
    # The retry (after the backoff, the old attempt's observation gone) runs shard 1 only.
    del sim.observed[(0, "evaluate")]
    [retry] = sim.step(advance=60).starts
    assert (retry.attempt, retry.task.shards, retry.task.shard_indexes) == (2, 3, [1])
    assert retry.task.digest() == start.task.digest()
    merged = StageResult(stage="evaluate", round=0, status="Succeeded", metrics={"accuracy": 0.5}, shards=3)
    sim.observed[(0, "evaluate")] = Observed(attempt=2, state="succeeded", result=merged,
                                             completed_shards=frozenset({1}))
    [nxt] = sim.step().starts
    st = sim.status.rounds[0].stages[0]
    assert (st.state, st.shards) == ("Succeeded", "3/3")
    assert sim.status.rounds[0].accuracy == 0.5
    # The next round's sample and filter are sharded too; train never is.
    assert nxt.stage == "sample" and nxt.task.shards == 3
    sim.finish(1, "sample")
    [f] = sim.step().starts
    assert f.stage == "filter" and f.task.shards == 3 and sim.status.rounds[1].stages[1].shards == "0/3"
    sim.finish(1, "filter")
    [t] = sim.step().starts
    assert t.stage == "train" and t.task.shards == 1 and sim.status.rounds[1].stages[2].shards is None


def test_one_shard_tasks_are_unchanged():
    sim = _planner_sim()
    [start] = sim.step().starts
    assert start.task.shards == 1 and start.task.shard_indexes is None
    assert sim.status.rounds[0].stages[0].shards is None
