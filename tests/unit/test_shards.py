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
    assert {n for n, k in STAGES.items() if k.shardable} == {"sample", "evaluate"}


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
