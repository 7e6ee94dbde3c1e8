"""Observing a sharded stage's Indexed Job (k8s/observe.py): the compressed index lists, the
completion index → shard mapping of a retry, the merged summary, and what the cache keeps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from selfimprove_operator.k8s.observe import (
    Observation,
    job_signature,
    observe_job,
    observe_run,
    parse_indexes,
    slim_job,
    slim_pod,
)
from selfimprove_workers.contract import StageResult

T0 = datetime(2026, 1, 1, tzinfo=UTC)
UID = "run-uid"


def ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


# =========================================================================== the index lists
@pytest.mark.parametrize("text, indexes", [
    (None, set()), ("", set()), ("0", {0}), ("3", {3}), ("0-2", {0, 1, 2}), ("0-2,4", {0, 1, 2, 4}),
    ("1,3,5-7,9", {1, 3, 5, 6, 7, 9}), ("2-2", {2}), ("10-12,999", {10, 11, 12, 999}),
])
def test_compressed_index_lists(text, indexes):
    assert parse_indexes(text) == frozenset(indexes)


@pytest.mark.parametrize("text, part", [
    ("a", "'a'"), ("1,,2", "''"), ("1-", "'1-'"), ("-1", "'-1'"), ("1-2-3", "'1-2-3'"), (" 1", "' 1'"),
    ("3-1", "'3-1'"), ("2,1", "'1'"), ("0-3,2", "'2'"), ("1,1", "'1'"), ("0,", "''"),
])
def test_malformed_index_lists_name_the_bad_part(text, part):
    with pytest.raises(ValueError, match="index list") as err:
        parse_indexes(text)
    assert part in str(err.value) and repr(text) in str(err.value)


# =========================================================================== observing
def job(shards=4, indexes=None, attempt=1, conditions=(), **status) -> dict:
    name = "demo-r1-sample" + (f"-a{attempt}" if attempt > 1 else "")
    annotations = {"selfimprove.dev/output": "s3://b/runs/demo/r1/sample/", "selfimprove.dev/shards": str(shards)}
    if indexes is not None:
        annotations["selfimprove.dev/shard-indexes"] = ",".join(map(str, indexes))
    return {"metadata": {"name": name, "uid": "job-" + name, "creationTimestamp": ts(T0), "annotations": annotations,
                         "labels": {"selfimprove.dev/run": "demo", "selfimprove.dev/round": "1",
                                    "selfimprove.dev/stage": "sample", "selfimprove.dev/attempt": str(attempt)},
                         "ownerReferences": [{"uid": UID, "controller": True}]},
            "spec": {"completionMode": "Indexed"},
            "status": {"conditions": list(conditions), **status}}


def cond(type_, reason=None, message=None) -> dict:
    return {"type": type_, "status": "True", "lastTransitionTime": ts(T0),
            **({"reason": reason} if reason else {}), **({"message": message} if message else {})}


def pod(index: int, phase: str, job_name="demo-r1-sample", **state) -> dict:
    name = f"{job_name}-{index}-x{phase[:3].lower()}"
    return {"metadata": {"name": name, "uid": "uid-" + name, "creationTimestamp": ts(T0),
                         "annotations": {"batch.kubernetes.io/job-completion-index": str(index), "other": "dropped"},
                         "labels": {"batch.kubernetes.io/job-name": job_name}},
            "status": {"phase": phase, "containerStatuses": [{"name": "worker", "state": state}] if state else []}}


def summary(shard: int | None, shards: int = 4) -> str:
    return StageResult(stage="sample", round=1, status="Succeeded", metrics={"paths": 8 if shard is None else 2},
                       shard=shard, shards=shards).summary_json()


def done(index: int, shard: int | None, job_name="demo-r1-sample") -> dict:
    return pod(index, "Succeeded", job_name, terminated={"exitCode": 0, "message": summary(shard)})


def obs(j, pods=(), now=T0):
    out = Observation()
    return observe_job(j, list(pods), now, out, pending_timeout=60, result_grace=10), out


def test_running_sharded_job_reports_the_shards_done():
    o, _ = obs(job(completedIndexes="0,2"), [done(0, 0), pod(1, "Running", running={}), done(2, 2), pod(3, "Pending")])
    assert (o.state, o.completed_shards) == ("running", {0, 2})
    # Between a finished pod and its replacement's start, a Job with shards done is still running.
    o, _ = obs(job(completedIndexes="0-2"), [done(0, 0), done(1, 1), done(2, 2)])
    assert (o.state, o.completed_shards) == ("running", {0, 1, 2})


def test_complete_sharded_job_yields_the_merged_summary_whichever_pod_wrote_it():
    pods = [done(0, 0), done(1, None), done(2, 2), done(3, 3)]
    o, _ = obs(job(conditions=[cond("Complete")], completedIndexes="0-3"), pods)
    assert (o.state, o.result.shard, o.result.shards, o.result.metrics) == ("succeeded", None, 4, {"paths": 8})
    assert o.completed_shards == {0, 1, 2, 3}


def test_complete_sharded_job_without_a_merged_summary_fails_after_a_grace():
    j = job(conditions=[cond("Complete")], completedIndexes="0-3", completionTime=ts(T0))
    pods = [done(k, k) for k in range(4)]
    o, out = obs(j, pods, now=T0 + timedelta(seconds=3))
    assert o.state == "running" and out.wake_at == T0 + timedelta(seconds=10)
    o, _ = obs(j, pods, now=T0 + timedelta(seconds=11))
    assert (o.state, o.reason, o.permanent) == ("failed", "MissingResult", False)
    assert "merged" in o.message and o.completed_shards == {0, 1, 2, 3}


def test_a_retry_maps_completion_indexes_back_to_its_shards():
    """Attempt 2 runs shards 1 and 3: its index 0 is shard 1, its index 1 shard 3."""
    name = "demo-r1-sample-a2"
    j = job(indexes=[1, 3], attempt=2, completedIndexes="1")
    o, _ = obs(j, [pod(0, "Running", name, running={}), done(1, 3, name)])
    assert o.completed_shards == {3}
    j = job(indexes=[1, 3], attempt=2, conditions=[cond("Complete")], completedIndexes="0-1")
    o, _ = obs(j, [done(0, None, name), done(1, 3, name)])
    assert (o.state, o.result.shard, o.completed_shards) == ("succeeded", None, {1, 3})


def test_failed_index_names_its_shard_and_keeps_the_others_done():
    log = '{"level": "error", "msg": "CUDA error: device lost"}'
    j = job(conditions=[cond("FailureTarget", "FailedIndexes"), cond("Failed", "FailedIndexes", "Job has failed indexes")],
            completedIndexes="0,2-3", failedIndexes="1")
    o, _ = obs(j, [done(0, 0), pod(1, "Failed", terminated={"exitCode": 1, "reason": "Error", "message": log}),
                   done(2, 2), done(3, None)])
    assert (o.state, o.exit_code, o.completed_shards) == ("failed", 1, {0, 2, 3})
    assert o.message == "shard 1: CUDA error: device lost"
    # The same failure in a retry that ran shards 1 and 3: index 0 is shard 1.
    name = "demo-r1-sample-a2"
    j = job(indexes=[1, 3], attempt=2, conditions=[cond("Failed", "BackoffLimitExceeded")], completedIndexes="1")
    o, _ = obs(j, [pod(0, "Failed", name, terminated={"exitCode": 137, "reason": "OOMKilled"}), done(1, 3, name)])
    assert (o.reason, o.message, o.completed_shards) == ("OOMKilled", "shard 1 failed", {3})


def test_a_malformed_index_list_is_a_warning_not_a_crash():
    o, out = obs(job(completedIndexes="0-x"), [pod(0, "Running", running={})])
    assert (o.state, o.completed_shards) == ("running", frozenset())
    assert [(n.reason, n.type) for n in out.notices] == [("StageShards", "Warning")]
    assert "status.completedIndexes" in out.notices[0].message and "'0-x'" in out.notices[0].message


def test_shards_done_by_earlier_attempts_stay_done():
    first = job(conditions=[cond("Failed", "BackoffLimitExceeded")], completedIndexes="0,2")
    second = job(indexes=[1, 3], attempt=2, completedIndexes="1")
    seen = observe_run(UID, [first, second], [], T0, pending_timeout=60, result_grace=10)
    o = seen.observed[(1, "sample")]
    assert (o.attempt, o.completed_shards) == (2, {0, 2, 3})


def test_a_plain_job_has_no_shards():
    j = job(completedIndexes="0")
    del j["metadata"]["annotations"]["selfimprove.dev/shards"]
    o, _ = obs(j, [pod(0, "Running", running={})])
    assert o.completed_shards == frozenset()


def test_the_cache_keeps_what_observing_shards_needs():
    j = job(indexes=[1, 3], completedIndexes="0", failedIndexes="1", active=1)
    slim = slim_job(j)
    assert slim["metadata"]["annotations"] == {"selfimprove.dev/shards": "4", "selfimprove.dev/shard-indexes": "1,3"}
    assert slim["status"] == {"conditions": [], "completedIndexes": "0", "failedIndexes": "1"}
    assert slim_pod(done(0, 0))["metadata"]["annotations"] == {"batch.kubernetes.io/job-completion-index": "0"}
    # A shard finishing changes what the planner sees: the Job's event is not skipped.
    assert job_signature(job(completedIndexes="0")) != job_signature(job(completedIndexes="0-1"))
    assert job_signature(job(completedIndexes="0", active=2)) == job_signature(job(completedIndexes="0", active=1))


def test_a_failed_node_of_a_multi_node_train_job_is_named():
    """A multi-node train Job (Indexed, not sharded): the failure says which node, and the
    cache keeps the annotation that says it has several."""
    name = "demo-r1-train"
    j = job(conditions=[cond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")])
    j["metadata"]["name"] = name
    j["metadata"]["labels"]["selfimprove.dev/stage"] = "train"
    ann = j["metadata"]["annotations"]
    del ann["selfimprove.dev/shards"]
    ann["selfimprove.dev/nodes"] = "2"
    log = '{"level": "error", "msg": "NCCL timeout"}'
    o, _ = obs(slim_job(j), [pod(0, "Running", name, running={}),
                             pod(1, "Failed", name, terminated={"exitCode": 1, "reason": "Error", "message": log})])
    assert (o.state, o.message, o.completed_shards) == ("failed", "node 1: NCCL timeout", frozenset())
