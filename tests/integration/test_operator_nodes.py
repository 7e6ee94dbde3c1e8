"""Multi-node training through the operator, against the emulator and the fake cluster's Indexed
Job controller (tests/k8s_fixtures.py): a train stage with `nodes: 2` is one Indexed Job whose
pods find each other through a headless Service the operator creates, owned by the Job. The fake
cluster fails the nodes' rendezvous when that Service is missing, not headless or selects other
pods; one failed node fails the Job (backoffLimit 0) and the operator's retry is a new Job with
its own Service.

Regenerate tests/data/operator-api-usage-nodes.json (the API calls multi-node training adds to
tests/data/operator-api-usage.json; the chart's RBAC test reads both) with `UPDATE_API_USAGE=1`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from k8s_fixtures import JOBS, PODS, RUNS, SERVICES, Fail, Indexed, Succeed, need_kmock, run_manifest

pytestmark = [pytest.mark.k8s, pytest.mark.asyncio]

DATA = Path(__file__).resolve().parents[1] / "data"
USAGE_FILE, NODES_USAGE_FILE = DATA / "operator-api-usage.json", DATA / "operator-api-usage-nodes.json"


@pytest.fixture(autouse=True)
def _kmock_required():
    need_kmock()


def stage(status: dict, round_no: int, name: str) -> dict:
    rnd = next(r for r in status["rounds"] if r["round"] == round_no)
    return next(s for s in rnd["stages"] if s["name"] == name)


def finished(k8s, name: str):
    return lambda: k8s.status(name).get("phase") in ("Succeeded", "Failed")


def two_nodes(name: str, backoff: int = 0) -> dict:
    return run_manifest(name, rounds={"max": 1, "patience": 0},
                        resources={"gpus": 1, "backoffLimit": backoff, "stages": {"train": {"nodes": 2}}})


def pods_of(k8s, job: str) -> list[dict]:
    return k8s.find(PODS, "default", f"job-name={job}")


def services(k8s) -> dict[str, dict]:
    return {s["metadata"]["name"]: s for s in k8s.find(SERVICES, "default")}


async def test_a_two_node_train_stage_is_one_indexed_job_with_its_headless_service(k8s, cluster, start_operator):
    cluster.scripts["duo-r1-train"] = Indexed(default=Succeed(metrics={"trainLoss": 0.25}))
    await start_operator()
    await k8s.create_object(RUNS, "default", two_nodes("duo"))
    await k8s.wait_for(finished(k8s, "duo"), what="the run to finish")
    st = k8s.status("duo")
    assert st["phase"] == "Succeeded", st.get("conditions")
    jobs = {j["metadata"]["name"]: j for j in k8s.jobs("duo")}
    train = jobs["duo-r1-train"]
    spec = train["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == ("Indexed", 2, 2, 0)
    assert spec["template"]["spec"]["subdomain"] == "duo-r1-train"
    task = json.loads(spec["template"]["spec"]["containers"][0]["args"][0])
    assert task["nodes"] == 2 and task.get("shards", 1) == 1
    env = {e["name"]: e.get("value") for e in spec["template"]["spec"]["containers"][0]["env"]}
    assert env["SELFIMPROVE_RDZV_ENDPOINT"] == "duo-r1-train-0.duo-r1-train:29400"
    assert env["SELFIMPROVE_RDZV_ID"] == "duo-r1-train"
    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
                  for p in pods_of(k8s, "duo-r1-train")) == ["0", "1"]
    # One Service, for the multi-node Job only; headless, selecting exactly its pods, owned by it.
    svc = services(k8s)
    assert list(svc) == ["duo-r1-train"]
    service = svc["duo-r1-train"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": "duo-r1-train"}
    [owner] = service["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Job", "duo-r1-train", train["metadata"]["uid"])
    for name in ("duo-r0-evaluate", "duo-r1-sample", "duo-r1-filter", "duo-r1-evaluate"):
        assert "completionMode" not in jobs[name]["spec"] and "subdomain" not in jobs[name]["spec"]["template"]["spec"]
    assert stage(st, 1, "train")["attempts"] == 1
    # The Service goes with its Job, deleted as the operator and the ttl-after-finished controller
    # delete Jobs (propagating; the garbage collector removes the dependents).
    await k8s.delete_object(JOBS, "default", "duo-r1-train", {"propagationPolicy": "Background"})
    await k8s.wait_for(lambda: "duo-r1-train" not in services(k8s), what="the Service to be collected with its Job")

    # What multi-node training adds to the operator's API usage (the chart's RBAC grants it).
    base = {(e["group"], e["resource"]) : set(e["verbs"]) for e in json.loads(USAGE_FILE.read_text())}
    extra = {key: verbs - base.get(key, set()) for key, verbs in k8s.usage.items()}
    table = [{"group": g, "resource": r, "verbs": sorted(v)} for (g, r), v in sorted(extra.items()) if v]
    if os.environ.get("UPDATE_API_USAGE"):
        NODES_USAGE_FILE.write_text(json.dumps(table, indent=2) + "\n")
    assert table == json.loads(NODES_USAGE_FILE.read_text()), \
        "multi-node training's API usage changed: check the chart's RBAC, then regenerate with UPDATE_API_USAGE=1"


async def test_one_failed_node_fails_the_attempt_and_the_retry_is_a_new_job_and_service(k8s, cluster, start_operator):
    # resources.backoffLimit 2 would retry a pod inside a one-pod Job; a multi-node Job has 0.
    cluster.scripts["gang-r1-train"] = Indexed({1: [Fail(seconds=0.2)]}, default=Succeed(seconds=30))
    cluster.scripts["gang-r1-train-a2"] = Indexed(default=Succeed())
    await start_operator()
    await k8s.create_object(RUNS, "default", two_nodes("gang", backoff=2))
    await k8s.wait_for(finished(k8s, "gang"), timeout=30, what="the run to finish")
    st = k8s.status("gang")
    assert st["phase"] == "Succeeded", st.get("conditions")
    train = stage(st, 1, "train")
    assert (train["attempts"], train["failures"]) == (2, 1)
    jobs = {j["metadata"]["name"]: j for j in k8s.jobs("gang")}
    first = jobs["gang-r1-train"]
    assert first["status"]["conditions"][-1]["reason"] == "BackoffLimitExceeded"
    # No pod retried inside the failed Job: node 1 failed once and node 0 was stopped with it.
    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
                  for p in pods_of(k8s, "gang-r1-train")) == ["1"]
    retry = jobs["gang-r1-train-a2"]
    env = {e["name"]: e.get("value") for e in retry["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SELFIMPROVE_RDZV_ID"] == "gang-r1-train-a2"   # never the failed attempt's rendezvous
    assert env["SELFIMPROVE_RDZV_ENDPOINT"] == "gang-r1-train-a2-0.gang-r1-train-a2:29400"
    svc = services(k8s)
    assert set(svc) == {"gang-r1-train", "gang-r1-train-a2"}
    assert svc["gang-r1-train-a2"]["metadata"]["ownerReferences"][0]["uid"] == retry["metadata"]["uid"]


async def test_a_refused_service_create_is_retried_and_shown_on_the_run(k8s, cluster, start_operator):
    """The Service create is refused once (403: RBAC without services create, fixed meanwhile; a
    5xx the client retries itself): the run says so (JobCreationFailed) and the retried
    reconcile creates it while the nodes wait."""
    k8s.inject_fault("create", "services", 403, "Forbidden",
                     'services is forbidden: User "system:serviceaccount:default:op" cannot create resource "services"',
                     times=4)   # every try of the first call (kube.CALL_BACKOFFS)
    await start_operator()
    await k8s.create_object(RUNS, "default", two_nodes("late"))
    await k8s.wait_for(finished(k8s, "late"), what="the run to finish")
    st = k8s.status("late")
    assert st["phase"] == "Succeeded", st.get("conditions")
    assert stage(st, 1, "train")["attempts"] == 1   # the nodes waited; no attempt was lost
    assert "late-r1-train" in services(k8s)
    assert any(e["reason"] == "JobCreationFailed" and "Service of Job late-r1-train" in e["message"]
               for e in k8s.events("late"))
