"""Progress of a running stage on the emulator: the pod log's last progress record (pods/log) →
`status.progress` and the `Progress` printer column, at a bounded write rate (k8s/progress.py)."""

from __future__ import annotations

import asyncio
import json

import pytest
from k8s_fixtures import PODS, RUNS, Hold, Indexed, Succeed, need_kmock, progress_line, run_manifest, running_pod

pytestmark = [pytest.mark.k8s, pytest.mark.asyncio]


@pytest.fixture(autouse=True)
def _kmock_required():
    need_kmock()


def printer_column(k8s, obj: dict, name: str):
    """What `kubectl get sir` shows in column `name`: its JSONPath on the stored object."""
    from jsonpath_ng import parse

    [column] = [c for c in k8s.crd["spec"]["versions"][0]["additionalPrinterColumns"] if c["name"] == name]
    found = [m.value for m in parse("$" + column["jsonPath"]).find(obj)]
    return found[0] if found else None


async def test_running_stage_progress_reaches_status_and_printer_column(k8s, cluster, start_operator):
    cluster.scripts["prog-r0-evaluate"] = Hold()
    await start_operator(progress_interval=0.5)
    await k8s.create_object(RUNS, "default", run_manifest("prog", rounds={"max": 1, "patience": 0}))
    pod = await k8s.wait_for(lambda: running_pod(k8s, "prog-r0-evaluate"), what="the evaluate pod to run")

    # Other log lines around the progress record (the operator takes the newest record of the tail).
    k8s.write_log("default", pod, "plain text from a library")
    k8s.write_log("default", pod, progress_line(120, 300, "answers", eta=95.4, stage="evaluate"))
    k8s.write_log("default", pod, json.dumps({"ts": "2026-01-01T00:00:00Z", "level": "info", "msg": "batch done"}))
    st = await k8s.wait_for(lambda: (s := k8s.status("prog")).get("progress") and s, what="status.progress")
    prog = st["progress"]
    assert prog | {"lastUpdate": None} == {
        "round": 0, "stage": "evaluate", "attempt": 1, "unit": "answers", "done": 120, "total": 300, "percent": 40,
        "estimatedRemainingSeconds": 95, "lastUpdate": None, "summary": "evaluate 40% (120/300 answers, 1m35s left)"}
    assert prog["lastUpdate"].endswith("Z")
    stage = st["rounds"][0]["stages"][0]
    assert stage["state"] == "Running" and stage["progress"] == "120/300 answers"
    assert printer_column(k8s, k8s.run("prog"), "Progress") == "evaluate 40% (120/300 answers, 1m35s left)"

    # A newer record replaces it.
    k8s.write_log("default", pod, progress_line(299, 300, "answers", eta=0.3, stage="evaluate"))
    await k8s.wait_for(lambda: (k8s.status("prog").get("progress") or {}).get("done") == 299, what="the newer record")

    # Once the stage ends, the run shows no progress (nothing runs).
    cluster.release("prog-r0-evaluate")
    await k8s.wait_for(lambda: k8s.status("prog").get("phase") == "Succeeded", what="the run to succeed")
    assert "progress" not in k8s.status("prog")
    assert printer_column(k8s, k8s.run("prog"), "Progress") is None


async def test_a_sharded_stages_progress_counts_every_shard(k8s, cluster, start_operator):
    """Round 0's evaluate in 3 shards (one Indexed Job): shard 0 finishes at once, shards 1 and 2
    run and print their own counts; status.progress is the stage's, not one pod's."""
    cluster.scripts["wide-r0-evaluate"] = Indexed({0: [Succeed(seconds=0.1)], 1: [Succeed(seconds=120)],
                                                  2: [Succeed(seconds=120)]})
    # backoffLimitPerIndex only where the API server knows it (1.29+), as an admin sets it.
    await start_operator(progress_interval=0.3,
                         backoff_limit_per_index=tuple(map(int, k8s.version.split("."))) >= (1, 29))
    await k8s.create_object(RUNS, "default", run_manifest("wide", rounds={"max": 1, "patience": 0},
                                                          resources={"gpus": 1, "shards": 3}))

    def shard_pod(k: int) -> str | None:
        for pod in k8s.find(PODS, "default", "job-name=wide-r0-evaluate"):
            meta = pod["metadata"]
            if meta["annotations"].get("batch.kubernetes.io/job-completion-index") == str(k) \
                    and (pod.get("status") or {}).get("phase") == "Running":
                return meta["name"]
        return None

    pods = await k8s.wait_for(lambda: (a := shard_pod(1)) and (b := shard_pod(2)) and (a, b), what="shards 1 and 2 to run")
    await k8s.wait_for(lambda: (s := k8s.status("wide")) and s["rounds"][0]["stages"][0].get("shards") == "1/3",
                       what="shard 0 to be done")
    k8s.write_log("default", pods[0], progress_line(30, 100, "answers", eta=40, stage="evaluate"))
    k8s.write_log("default", pods[1], progress_line(70, 100, "answers", eta=15, stage="evaluate"))
    prog = await k8s.wait_for(lambda: (p := k8s.status("wide").get("progress")) and p["done"] == 200 and p,
                              what="both running shards' counts on the status")
    # Shard 0 done (100) + 30 + 70 of 3 × 100; time left is the slower shard's.
    assert (prog["done"], prog["total"], prog["percent"], prog["estimatedRemainingSeconds"]) == (200, 300, 66, 40)
    assert prog["summary"] == "evaluate 66% (200/300 answers, 40s left; shards 1/3)"
    assert k8s.status("wide")["rounds"][0]["stages"][0]["progress"] == "200/300 answers"


async def test_progress_writes_are_rate_bounded_under_fifty_concurrent_runs(k8s, cluster, start_operator):
    """50 runs whose stages print progress all the time: each run's status is written at most
    once per `progressInterval`, and all runs together at most `progressRate` times a second
    (plus the bucket's burst) — counted at the API server."""
    interval, rate, window = 2.0, 5.0, 6.0
    names = [f"busy-{i:02d}" for i in range(50)]
    for n in names:
        cluster.scripts[f"{n}-r0-evaluate"] = Hold()
    op = await start_operator(workers=8, progress_interval=interval, progress_rate=rate)
    await asyncio.gather(*(k8s.create_object(RUNS, "default", run_manifest(n, rounds={"max": 1, "patience": 0})) for n in names))
    pods = await k8s.wait_for(lambda: (found := {n: running_pod(k8s, f"{n}-r0-evaluate") for n in names})
                              and all(found.values()) and found, timeout=60, what="50 running pods")
    # Let the starts settle (their own status writes), then count only what progress causes.
    await k8s.wait_for(lambda: all(k8s.status(n)["rounds"][0]["stages"][0]["state"] == "Running" for n in names),
                       what="50 Running stages")
    await asyncio.sleep(1.0)

    writes: dict[str, int] = dict.fromkeys(names, 0)

    def count(type_, resource, body):
        if resource.plural == "selfimproveruns" and type_ == "MODIFIED":
            writes[body["metadata"]["name"]] += 1

    k8s.listeners.append(count)
    reads_before = op.controller.progress.reads
    loop = asyncio.get_running_loop()
    end = loop.time() + window
    done = 0
    try:
        while loop.time() < end:  # every pod prints a new count every 0.1 s
            done += 1
            for n in names:
                k8s.write_log("default", pods[n], progress_line(done, 10_000, "answers", stage="evaluate"))
            await asyncio.sleep(0.1)
    finally:
        k8s.listeners.remove(count)
    reads = op.controller.progress.reads - reads_before
    total = sum(writes.values())
    per_run_bound = int(window // interval) + 1
    global_bound = int(rate * window + max(1.0, rate)) + 1
    assert max(writes.values()) <= per_run_bound, writes
    assert total <= global_bound, (total, global_bound)
    assert reads <= global_bound, (reads, global_bound)
    # … and progress does flow: the bucket is used, not starved.
    assert total >= rate * window * 0.5, (total, writes)
    with_progress = [n for n in names if (k8s.status(n).get("progress") or {}).get("unit") == "answers"]
    assert len(with_progress) >= total * 0.5
    for n in names:
        cluster.release(f"{n}-r0-evaluate")
    await k8s.wait_for(lambda: all(k8s.status(n).get("phase") == "Succeeded" for n in names), timeout=90,
                       what="50 runs to succeed")
    assert op.controller.metrics.registry.get_sample_value("selfimprove_reconcile_errors_total") == 0


async def test_pod_log_endpoint_answers_as_the_api_server(k8s, cluster):
    """The emulator's pods/log: text/plain, tailLines, limitBytes, 400 for a waiting container or
    a wrong container name or a non-integer tailLines, 404 for an unknown pod."""
    import aiohttp

    cluster.scripts["logs-r0-evaluate"] = Hold()
    pod_body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p1"},
                "spec": {"containers": [{"name": "worker", "image": "busybox"}]}}
    await k8s.create_object(PODS, "default", pod_body)
    base = str(k8s.url).rstrip("/") + "/api/v1/namespaces/default/pods"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/p1/log") as rsp:
            assert rsp.status == 400 and "is waiting to start: ContainerCreating" in (await rsp.json())["message"]
        await k8s.patch_object(PODS, "default", "p1", {"status": {"phase": "Running", "containerStatuses": [{
            "name": "worker", "ready": True, "restartCount": 0, "image": "busybox", "imageID": "busybox@sha256:" + "0" * 64,
            "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}}, "replace-status", "status")
        for i in range(5):
            k8s.write_log("default", "p1", f"line {i}")
        async with http.get(f"{base}/p1/log", params={"container": "worker", "tailLines": "2"}) as rsp:
            assert rsp.status == 200 and rsp.content_type == "text/plain"
            assert await rsp.text() == "line 3\nline 4\n"
        async with http.get(f"{base}/p1/log", params={"limitBytes": "8"}) as rsp:
            assert await rsp.text() == "line 0\nl"
        async with http.get(f"{base}/p1/log", params={"container": "sidecar"}) as rsp:
            assert rsp.status == 400 and "container sidecar is not valid" in (await rsp.json())["message"]
        async with http.get(f"{base}/p1/log", params={"tailLines": "many"}) as rsp:
            assert rsp.status == 400
        async with http.get(f"{base}/nope/log") as rsp:
            assert rsp.status == 404
