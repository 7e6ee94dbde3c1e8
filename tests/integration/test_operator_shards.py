"""Sharded stages through the operator, against the emulator and the fake cluster's Indexed Job
controller (tests/k8s_fixtures.py, `FakeCluster._run_indexed`): one Indexed Job per sharded
stage attempt, a failed shard retried inside its Job (backoffLimitPerIndex, Kubernetes >= 1.29)
or by the operator's next attempt, which runs only the shards not done.

The operator's `backoff_limit_per_index` follows the emulated version, as a cluster admin sets
it: on for the newest, off for the oldest (1.27's API server does not know the field).
"""

from __future__ import annotations

import json

import pytest
from k8s_fixtures import PODS, RUNS, Fail, Indexed, Succeed, need_kmock, run_manifest

pytestmark = [pytest.mark.k8s, pytest.mark.asyncio]


@pytest.fixture(autouse=True)
def _kmock_required():
    need_kmock()


def per_index(k8s) -> bool:
    return tuple(map(int, k8s.version.split("."))) >= (1, 29)


def stage(status: dict, round_no: int, name: str) -> dict:
    rnd = next(r for r in status["rounds"] if r["round"] == round_no)
    return next(s for s in rnd["stages"] if s["name"] == name)


def finished(k8s, name: str):
    return lambda: k8s.status(name).get("phase") in ("Succeeded", "Failed")


def sharded(name: str, shards: int = 3, backoff: int = 0) -> dict:
    return run_manifest(name, rounds={"max": 1, "patience": 0}, resources={"gpus": 1, "shards": shards, "backoffLimit": backoff})


def pods_of(k8s, job: str) -> list[dict]:
    return k8s.find(PODS, "default", f"job-name={job}")


async def test_sharded_stages_run_as_one_indexed_job_each(k8s, cluster, start_operator):
    await start_operator(backoff_limit_per_index=per_index(k8s))
    await k8s.create_object(RUNS, "default", sharded("wide"))
    await k8s.wait_for(finished(k8s, "wide"), what="the run to finish")
    st = k8s.status("wide")
    assert st["phase"] == "Succeeded", st.get("conditions")
    jobs = {j["metadata"]["name"]: j for j in k8s.jobs("wide")}
    for name in ("wide-r0-evaluate", "wide-r1-sample", "wide-r1-filter", "wide-r1-evaluate"):
        spec = jobs[name]["spec"]
        assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
        assert ("backoffLimitPerIndex" in spec) == per_index(k8s) and ("backoffLimit" in spec) != per_index(k8s)
        assert jobs[name]["status"]["completedIndexes"] == "0-2"
        pods = pods_of(k8s, name)
        assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods) == ["0", "1", "2"]
        assert all({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}
            in p["spec"]["containers"][0]["env"] for p in pods)
        task = json.loads(spec["template"]["spec"]["containers"][0]["args"][0])
        assert task["shards"] == 3 and task.get("shardIndexes") is None
    for name in ("wide-r1-train",):   # not shardable: one pod, as before
        assert "completionMode" not in jobs[name]["spec"] and len(pods_of(k8s, name)) == 1
    sample = stage(st, 1, "sample")
    assert (sample["attempts"], sample["shards"]) == (1, "3/3")
    # The round's figures are the merged result's (the summary with no shard), not one shard's.
    assert st["rounds"][1]["samples"] == 64 and st["rounds"][1]["accuracy"] == 0.4


async def test_a_failed_shard_is_retried_inside_its_job(k8s, cluster, start_operator):
    if not per_index(k8s):
        pytest.skip("backoffLimitPerIndex needs Kubernetes >= 1.29")
    cluster.scripts["again-r1-sample"] = Indexed({1: [Fail(), Succeed()]})
    await start_operator(backoff_limit_per_index=True)
    await k8s.create_object(RUNS, "default", sharded("again", backoff=1))
    await k8s.wait_for(finished(k8s, "again"), what="the run to finish")
    st = k8s.status("again")
    assert st["phase"] == "Succeeded", st.get("conditions")
    assert (stage(st, 1, "sample")["attempts"], stage(st, 1, "sample")["failures"]) == (1, 0)
    indexes = [p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods_of(k8s, "again-r1-sample")]
    assert sorted(indexes) == ["0", "1", "1", "2"]   # only shard 1 ran twice
    assert not any(j["metadata"]["name"].endswith("-a2") for j in k8s.jobs("again"))


async def test_the_next_attempt_runs_only_the_shards_not_done(k8s, cluster, start_operator):
    if per_index(k8s):
        # The other shards run to the end; the Job fails (FailedIndexes) with shard 1 alone missing.
        cluster.scripts["part-r1-sample"] = Indexed({1: [Fail()]})
        retried = "1"
    else:
        # backoffLimit: the first failure fails the Job and its running shard 2 is stopped too.
        cluster.scripts["part-r1-sample"] = Indexed({1: [Fail(seconds=0.3)], 2: [Succeed(seconds=60)]})
        retried = "1,2"
    await start_operator(backoff_limit_per_index=per_index(k8s))
    await k8s.create_object(RUNS, "default", sharded("part"))
    await k8s.wait_for(finished(k8s, "part"), timeout=30, what="the run to finish")
    st = k8s.status("part")
    assert st["phase"] == "Succeeded", st.get("conditions")
    sample = stage(st, 1, "sample")
    assert (sample["attempts"], sample["failures"], sample["shards"]) == (2, 1, "3/3")
    jobs = {j["metadata"]["name"]: j for j in k8s.jobs("part")}
    first, retry = jobs["part-r1-sample"], jobs["part-r1-sample-a2"]
    assert first["status"]["conditions"][-1]["reason"] == ("FailedIndexes" if per_index(k8s) else "BackoffLimitExceeded")
    assert retry["metadata"]["annotations"]["selfimprove.dev/shard-indexes"] == retried
    assert retry["spec"]["completions"] == len(retried.split(","))
    task = json.loads(retry["spec"]["template"]["spec"]["containers"][0]["args"][0])
    assert (task["shards"], task["shardIndexes"]) == (3, [int(i) for i in retried.split(",")])
    assert len(pods_of(k8s, "part-r1-sample-a2")) == len(retried.split(","))   # finished shards are not redone
    assert st["rounds"][1]["samples"] == 64
