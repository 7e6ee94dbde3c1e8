"""The operator against kmock's Kubernetes API emulator, with a fake cluster playing kubelet and
Job controller (tests/k8s_fixtures.py). The operator runs in-process (its own thread and loop)
and talks HTTP to the emulator exactly as to an API server.

Regenerate tests/data/operator-api-usage.json with `UPDATE_API_USAGE=1`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import pytest
from k8s_fixtures import (
    EVENTS,
    JOBS,
    PODS,
    RUNS,
    Fail,
    Hold,
    Pending,
    Preempt,
    Succeed,
    need_kmock,
    progress_line,
    run_manifest,
    running_pod,
)

try:
    from kmock import KubernetesError
except ImportError:  # pragma: no cover - need_kmock() skips (or fails in CI)
    KubernetesError = Exception

pytestmark = [pytest.mark.k8s, pytest.mark.asyncio]

USAGE_FILE = Path(__file__).resolve().parents[1] / "data" / "operator-api-usage.json"
SECRET_VALUE = "very-secret-value-8c1f"  # the fixture's Secret; must never leave it


@pytest.fixture(autouse=True)
def _kmock_required():
    need_kmock()


def condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def stage(status: dict, round_no: int, name: str) -> dict:
    rnd = next(r for r in status["rounds"] if r["round"] == round_no)
    return next(s for s in rnd["stages"] if s["name"] == name)


def phase_is(k8s, name: str, *phases: str):
    return lambda: k8s.status(name).get("phase") in phases


def reasons(k8s, name: str) -> list[str]:
    return [e["reason"] for e in k8s.events(name)]


async def events_posted(k8s, name: str, *wanted: str) -> list[str]:
    """Events are posted in the background, after the status is written: wait for them."""
    return await k8s.wait_for(lambda: set(wanted) <= set(reasons(k8s, name)) and reasons(k8s, name),
                              what=f"Events {wanted} of {name}")


# =========================================================================== the happy path
async def test_full_lmsi_run_reaches_succeeded(k8s, cluster, start_operator, s3_server, s3_bucket):
    cluster.s3 = s3_server
    op = await start_operator(metrics_port=0)
    manifest = run_manifest("demo", storage={"uri": f"{s3_bucket}/runs", "secretRef": "s3-credentials",
                                             "endpoint": s3_server.endpoint})
    await k8s.create_object(RUNS, "default", manifest)
    await k8s.wait_for(phase_is(k8s, "demo", "Succeeded"), what="the run to succeed")

    st = k8s.status("demo")
    uid = k8s.run("demo")["metadata"]["uid"]
    prefix = f"{s3_bucket}/runs/default/demo-{uid[:8]}/"
    assert st["artifacts"] == prefix
    assert [r["round"] for r in st["rounds"]] == [0, 1, 2]
    assert [s["name"] for s in st["rounds"][1]["stages"]] == ["sample", "filter", "train", "evaluate"]
    assert all(s["state"] == "Succeeded" and s["attempts"] == 1 for r in st["rounds"] for s in r["stages"])
    assert [r["accuracy"] for r in st["rounds"]] == [0.3, 0.4, 0.5]
    assert (st["bestRound"], st["bestAccuracy"]) == (2, 0.5)
    assert st["bestAdapter"] == prefix + "round-002/train/adapter/"
    assert st["rounds"][1]["samples"] == 64 and st["rounds"][1]["kept"] == 40 and st["rounds"][1]["trainLoss"] == 0.3
    assert st["observedGeneration"] == 1 and st["completionTime"]
    assert condition(st, "Succeeded") | {"lastTransitionTime": None} == {
        "type": "Succeeded", "status": "True", "reason": "MaxRoundsReached", "message": "finished round 2 of 2",
        "lastTransitionTime": None, "observedGeneration": 1}
    assert condition(st, "Ready")["status"] == "True" and condition(st, "Progressing")["status"] == "False"

    # One Job per stage, each owned by the run, with the labels the operator selects by.
    jobs = {j["metadata"]["name"]: j for j in k8s.jobs("demo")}
    assert sorted(jobs) == sorted(["demo-r0-evaluate"] + [f"demo-r{r}-{s}" for r in (1, 2) for s in ("sample", "filter", "train", "evaluate")])
    job = jobs["demo-r1-train"]
    assert job["metadata"]["labels"]["selfimprove.dev/stage"] == "train"
    assert job["metadata"]["ownerReferences"][0]["uid"] == uid
    task = json.loads(job["spec"]["template"]["spec"]["containers"][0]["args"][0])
    assert task["inputs"]["train"] == [prefix + "round-001/filter/kept.jsonl"]
    assert json.loads(jobs["demo-r2-sample"]["spec"]["template"]["spec"]["containers"][0]["args"][0])["model"]["adapter"] \
        == prefix + "round-001/train/adapter/"

    # Events tell the story; the artifacts are where the status says.
    await events_posted(k8s, "demo", "Started", "StageSucceeded", "RoundCompleted", "Succeeded")
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket[5:])["Contents"]}
    assert f"runs/default/demo-{uid[:8]}/round-002/train/_SUCCESS" in keys

    # Metrics: runs by phase, stage durations, Jobs created.
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{op.controller.metrics_port}/metrics") as rsp:
            text = await rsp.text()
    assert 'selfimprove_runs{phase="Succeeded"} 1.0' in text
    assert 'selfimprove_stage_duration_seconds_count{outcome="Succeeded",stage="train"} 2.0' in text
    assert "selfimprove_jobs_created_total 9.0" in text
    assert "selfimprove_reconcile_errors_total 0.0" in text


async def test_each_stage_job_gets_its_stages_resources(k8s, cluster, start_operator):
    """`spec.resources.stages`: through the CRD (stored, not pruned) to each stage's Job."""
    await start_operator()
    await k8s.create_object(RUNS, "default", run_manifest("staged", rounds={"max": 1, "patience": 0}, resources={
        "gpus": 1, "nodeSelector": {"pool": "l4"},
        "stages": {"sample": {"gpus": 4, "nodeSelector": {"pool": "h200"}}, "filter": {"gpus": 0}}}))
    await k8s.wait_for(phase_is(k8s, "staged", "Succeeded"), what="the run to succeed")
    got = {}
    for job in k8s.jobs("staged"):
        pod = job["spec"]["template"]["spec"]
        limits = pod["containers"][0].get("resources", {}).get("limits", {})
        task = json.loads(pod["containers"][0]["args"][0])
        got[job["metadata"]["name"]] = (limits.get("nvidia.com/gpu"), task["gpus"], pod["nodeSelector"]["pool"])
    assert got == {"staged-r0-evaluate": ("1", 1, "l4"), "staged-r1-sample": ("4", 4, "h200"),
                   "staged-r1-filter": (None, 0, "l4"), "staged-r1-train": ("1", 1, "l4"),
                   "staged-r1-evaluate": ("1", 1, "l4")}


async def test_secret_values_never_appear_in_status_events_or_logs(k8s, cluster, start_operator, caplog):
    caplog.set_level(logging.DEBUG, logger="selfimprove")
    caplog.set_level(logging.DEBUG, logger="kopf")
    cluster.scripts["leak-r1-sample"] = Fail(exit_code=1)
    await start_operator()
    await k8s.create_object(RUNS, "default", run_manifest("leak", rounds={"max": 1, "patience": 0}))
    await k8s.wait_for(phase_is(k8s, "leak", "Succeeded"), what="the run to succeed")

    env = k8s.jobs("leak")[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert refs["AWS_SECRET_ACCESS_KEY"] == {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY", "optional": False}
    assert refs["AWS_SESSION_TOKEN"]["optional"] is True
    everything = json.dumps([k8s.find(r) for r in (RUNS, JOBS, PODS, EVENTS)])
    assert SECRET_VALUE not in everything
    assert SECRET_VALUE not in caplog.text and "AKIA-TEST-ONLY" not in caplog.text
    assert "secrets" not in {r for _, r in k8s.usage}  # it never even reads one


async def test_selfimprove_operator_command_runs_the_operator(k8s, cluster, kubeconfig, tmp_path):
    """The CLI entry point as a container runs it: its own process, login from $KUBECONFIG,
    JSON logs, a clean exit on SIGTERM."""
    import signal
    import subprocess
    import sys

    log = tmp_path / "operator.log"
    env = {**os.environ, "SELFIMPROVE_METRICS_PORT": "0", "SELFIMPROVE_LIVENESS_ENDPOINT": "off",
           "SELFIMPROVE_WORKER_IMAGE": "example.org/worker:1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "selfimprove_operator.cli", "operator", "--workers", "2"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        await k8s.create_object(RUNS, "default", run_manifest("cli", rounds={"max": 1, "patience": 0}))
        await k8s.wait_for(phase_is(k8s, "cli", "Succeeded"), timeout=60, what="the run to succeed")
        assert k8s.jobs("cli")[0]["spec"]["template"]["spec"]["containers"][0]["image"] == "example.org/worker:1"
    finally:
        proc.send_signal(signal.SIGTERM)
        for _ in range(300):  # keep serving the emulator while the operator says goodbye
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        else:
            proc.kill()
    assert proc.returncode == 0, log.read_text()[-2000:]
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any("created Job cli-r0-evaluate" in r.get("message", "") for r in records)


# =========================================================================== restarts
async def test_operator_restart_mid_stage_resumes_without_a_duplicate_job(k8s, cluster, start_operator):
    cluster.scripts["resume-r1-sample"] = Hold()
    op = await start_operator()
    await k8s.create_object(RUNS, "default", run_manifest("resume"))
    await k8s.wait_for(lambda: any(p.get("status", {}).get("phase") == "Running" for p in k8s.find(PODS, "default", "selfimprove.dev/stage=sample")),
                       what="the sample stage to run")
    await op.stop()
    jobs_before = len(k8s.jobs("resume"))

    # A new operator process finds the stage running: it adopts it and starts nothing.
    second = await start_operator()
    def adopted() -> bool:
        state = second.controller.run_state(("default", "resume"))
        return state is not None and "resume-r1-sample" in state.jobs

    await k8s.wait_for(adopted, what="adoption")
    await asyncio.sleep(0.5)
    assert len(k8s.jobs("resume")) == jobs_before
    await second.stop()

    # While no operator runs, the stage finishes; the next one carries on from there.
    cluster.release("resume-r1-sample")
    await k8s.wait_for(lambda: cluster.completed_at.get("resume-r1-sample"), what="the stage to finish")
    await start_operator()
    await k8s.wait_for(phase_is(k8s, "resume", "Succeeded"), what="the run to succeed after the restart")
    names = [j["metadata"]["name"] for j in k8s.jobs("resume")]
    assert len(names) == len(set(names)) == 9 and not any("-a2" in n for n in names)
    assert stage(k8s.status("resume"), 1, "sample")["attempts"] == 1


async def test_attempt_recorded_before_a_crash_gets_its_job_not_a_retry(k8s, cluster, start_operator):
    # The operator persisted "evaluate attempt 1 is Running" and died before creating the Job.
    manifest = run_manifest("crash")
    created = await k8s.create_object(RUNS, "default", manifest)
    await k8s.patch_object(RUNS, "default", "crash", {"status": {
        "phase": "Evaluating", "round": 0, "appliedSpec": _digest(manifest),
        "artifacts": f"s3://artifacts/runs/default/crash-{created['metadata']['uid'][:8]}/",
        "startTime": "2026-01-01T00:00:00Z",
        "rounds": [{"round": 0, "startTime": "2026-01-01T00:00:00Z", "stages": [
            {"name": "evaluate", "state": "Running", "attempts": 1, "failures": 0, "job": "crash-r0-evaluate",
             "startTime": "2026-01-01T00:00:00Z"}]}]}}, "merge", "status")
    await start_operator()
    await k8s.wait_for(phase_is(k8s, "crash", "Succeeded"), what="the run to succeed")
    st = k8s.status("crash")
    assert stage(st, 0, "evaluate")["attempts"] == 1 and stage(st, 0, "evaluate")["failures"] == 0
    assert "crash-r0-evaluate" in [j["metadata"]["name"] for j in k8s.jobs("crash")]


def _digest(manifest: dict) -> str:
    from selfimprove_operator.api import SelfImproveRunSpec
    from selfimprove_operator.planner import immutable_digest
    from selfimprove_operator.presets import resolve

    return immutable_digest(resolve(SelfImproveRunSpec.model_validate(manifest["spec"])))


# =========================================================================== failures
async def test_failing_job_is_retried_then_fails_with_its_reason(k8s, cluster, start_operator):
    cluster.scripts["flaky-r0-evaluate"] = Fail(exit_code=1)
    cluster.scripts["flaky-r0-evaluate-a2"] = Fail(exit_code=137, container_reason="OOMKilled", log=None)
    op = await start_operator()
    await k8s.create_object(RUNS, "default", run_manifest("flaky"))
    await k8s.wait_for(phase_is(k8s, "flaky", "Failed"), what="the run to fail")

    st = k8s.status("flaky")
    ev = stage(st, 0, "evaluate")
    assert (ev["state"], ev["attempts"], ev["failures"], ev["reason"], ev["exitCode"]) == ("Failed", 2, 2, "OOMKilled", 137)
    failed = condition(st, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "OOMKilled"
    assert "round 0 evaluate failed (after 2 attempt(s))" in failed["message"]
    assert condition(st, "Ready")["status"] == "False"
    assert [j["metadata"]["name"] for j in k8s.jobs("flaky")] == ["flaky-r0-evaluate", "flaky-r0-evaluate-a2"]
    await events_posted(k8s, "flaky", "StageRetrying", "StageFailed")
    events = {e["reason"]: e for e in k8s.events("flaky")}
    assert "ConnectionResetError" in events["StageRetrying"]["message"]  # the log tail of the crash
    assert events["StageFailed"]["type"] == "Warning"
    sample = op.controller.metrics.registry.get_sample_value
    assert sample("selfimprove_stage_failures_total", {"stage": "evaluate", "reason": "OOMKilled"}) == 1
    assert sample("selfimprove_stage_failures_total", {"stage": "evaluate", "reason": "ExitCode1"}) == 1
    # A failed run creates nothing more (pain #8), whatever happens next.
    await k8s.patch_object(RUNS, "default", "flaky", {"metadata": {"labels": {"touched": "yes"}}}, "merge")
    await asyncio.sleep(0.5)
    assert len(k8s.jobs("flaky")) == 2


async def test_bad_input_fails_at_once_with_the_workers_message(k8s, cluster, start_operator):
    cluster.scripts["bad-r0-evaluate"] = Fail(
        exit_code=2, job_reason="PodFailurePolicy",
        summary={"reason": "BadInput", "message": "data.evaluation: s3://data/test.jsonl:3: answer is missing"})
    await start_operator()
    await k8s.create_object(RUNS, "default", run_manifest("bad"))
    await k8s.wait_for(phase_is(k8s, "bad", "Failed"), what="the run to fail")
    st = k8s.status("bad")
    assert condition(st, "Failed")["reason"] == "BadInput"
    assert "test.jsonl:3: answer is missing" in condition(st, "Failed")["message"]
    assert stage(st, 0, "evaluate")["attempts"] == 1  # permanent: no retry


async def test_preempted_pod_is_not_counted_as_a_failure(k8s, cluster, start_operator):
    cluster.scripts["spot-r0-evaluate"] = Preempt(then=Succeed())
    op = await start_operator()
    await k8s.create_object(RUNS, "default", run_manifest("spot", rounds={"max": 1, "patience": 0}))
    await k8s.wait_for(phase_is(k8s, "spot", "Succeeded"), what="the run to succeed")
    ev = stage(k8s.status("spot"), 0, "evaluate")
    assert (ev["attempts"], ev["failures"]) == (1, 0)
    assert len(k8s.find(PODS, "default", "job-name=spot-r0-evaluate")) == 2  # the Job replaced the pod
    await events_posted(k8s, "spot", "StageDisrupted")
    assert op.controller.metrics.registry.get_sample_value("selfimprove_stage_disruptions_total") == 1


async def test_image_pull_error_is_surfaced_and_fails_the_run(k8s, cluster, start_operator):
    cluster.scripts["pull-r0-evaluate"] = Pending("ImagePullBackOff", 'Back-off pulling image "registry.invalid/worker:1"')
    await start_operator(pending_timeout=0.5)
    await k8s.create_object(RUNS, "default", run_manifest("pull"))
    await k8s.wait_for(phase_is(k8s, "pull", "Failed"), what="the run to fail")
    st = k8s.status("pull")
    assert condition(st, "Failed")["reason"] == "ImagePullBackOff"
    assert "registry.invalid/worker:1" in condition(st, "Failed")["message"]
    assert stage(st, 0, "evaluate")["reason"] == "ImagePullBackOff"
    await events_posted(k8s, "pull", "StageFailed")
    # The stuck Job would hold its GPU request forever: it is deleted.
    await k8s.wait_for(lambda: not k8s.jobs("pull"), what="the stuck Job to be deleted")


async def test_unschedulable_pod_is_degraded_not_failed(k8s, cluster, start_operator):
    cluster.scripts["tight-r0-evaluate"] = Pending("Unschedulable")
    await start_operator(pending_timeout=0.5)
    await k8s.create_object(RUNS, "default", run_manifest("tight", rounds={"max": 1, "patience": 0}))
    await k8s.wait_for(lambda: condition(k8s.status("tight"), "Degraded").get("reason") == "Unschedulable",
                       what="Degraded/Unschedulable")
    st = k8s.status("tight")
    assert st["phase"] == "Evaluating" and "Insufficient nvidia.com/gpu" in condition(st, "Degraded")["message"]
    assert stage(st, 0, "evaluate")["reason"] == "Unschedulable"
    await events_posted(k8s, "tight", "StagePending")
    cluster.release("tight-r0-evaluate")  # a node joins
    await k8s.wait_for(phase_is(k8s, "tight", "Succeeded"), what="the run to succeed")
    assert condition(k8s.status("tight"), "Degraded")["status"] == "False"


async def test_job_creation_failure_leaves_a_condition_then_recovers(k8s, cluster, start_operator):
    k8s.inject_fault("create", "jobs", 403, "Forbidden", 'jobs is forbidden: exceeded quota: gpu-quota', times=4)
    await start_operator()
    await k8s.create_object(RUNS, "default", run_manifest("quota", rounds={"max": 1, "patience": 0}))
    await k8s.wait_for(lambda: condition(k8s.status("quota"), "Degraded").get("reason") == "JobCreationFailed",
                       what="Degraded/JobCreationFailed")
    assert "exceeded quota" in condition(k8s.status("quota"), "Degraded")["message"]
    await events_posted(k8s, "quota", "JobCreationFailed")
    await k8s.wait_for(phase_is(k8s, "quota", "Succeeded"), timeout=30, what="the run to succeed once the quota allows")
    assert condition(k8s.status("quota"), "Degraded")["status"] == "False"


async def test_job_the_api_rejects_fails_the_stage_permanently(k8s, cluster, start_operator):
    k8s.inject_fault("create", "jobs", 422, "Invalid",
                     'Job.batch "bad-cpu-r0-evaluate" is invalid: spec.template.spec.containers[0].resources.requests[cpu]: '
                     'Invalid value: "lots"', times=1)
    await start_operator()
    await k8s.create_object(RUNS, "default", run_manifest("bad-cpu"))
    await k8s.wait_for(phase_is(k8s, "bad-cpu", "Failed"), what="the run to fail")
    failed = condition(k8s.status("bad-cpu"), "Failed")
    assert failed["reason"] == "BadInput" and 'Invalid value: "lots"' in failed["message"]


async def test_spec_the_crd_rejects_never_reaches_the_operator(k8s):
    # A cross-field rule the CRD carries as CEL: the API server refuses the object itself.
    with pytest.raises(KubernetesError) as refused:
        await k8s.create_object(RUNS, "default", run_manifest("typo", strategy="iwsi"))
    assert refused.value.status == 422
    assert refused.value.details["causes"] == [{
        "reason": "FieldValueInvalid", "field": "spec",
        "message": 'Invalid value: "object": data.validation: is required for strategy iwsi'}]
    assert k8s.run("typo") is None


async def test_spec_the_models_reject_is_reported_not_retried(k8s, cluster, start_operator):
    # A cross-field rule only the models check (the CRD has no CEL for it): the LoRA rank must
    # fit vLLM's maxLoraRank. The API server stores the run; the operator says what is wrong.
    await start_operator()
    await k8s.create_object(RUNS, "default", run_manifest("typo", training={"lora": {"r": 128}}))
    await k8s.wait_for(lambda: condition(k8s.status("typo"), "Degraded").get("reason") == "InvalidSpec", what="InvalidSpec")
    assert "training.lora.r" in condition(k8s.status("typo"), "Degraded")["message"]
    assert condition(k8s.status("typo"), "Ready")["status"] == "False"
    await events_posted(k8s, "typo", "InvalidSpec")
    assert not k8s.jobs("typo")
    # Fixing the spec (a mutable field) starts the run.
    await k8s.patch_object(RUNS, "default", "typo", {"spec": {"training": {"lora": {"r": 16}}}}, "merge")
    await k8s.wait_for(lambda: k8s.jobs("typo"), what="the first Job after the fix")
    await k8s.wait_for(lambda: condition(k8s.status("typo"), "Degraded")["status"] == "False", what="Degraded cleared")


# =========================================================================== spec changes
async def test_suspend_stops_the_stage_and_resume_continues(k8s, cluster, start_operator):
    cluster.scripts["pause-r0-evaluate"] = Hold()
    await start_operator()
    await k8s.create_object(RUNS, "default", run_manifest("pause", rounds={"max": 1, "patience": 0}))
    await k8s.wait_for(lambda: k8s.jobs("pause"), what="the first Job")

    await k8s.patch_object(RUNS, "default", "pause", {"spec": {"suspend": True}}, "merge")
    await k8s.wait_for(phase_is(k8s, "pause", "Suspended"), what="Suspended")
    await k8s.wait_for(lambda: not k8s.jobs("pause") and not k8s.find(PODS, "default", "selfimprove.dev/run=pause"),
                       what="the Job and its pod to be deleted")
    st = k8s.status("pause")
    assert condition(st, "Suspended")["status"] == "True" and stage(st, 0, "evaluate")["state"] == "Pending"
    await asyncio.sleep(0.5)
    assert not k8s.jobs("pause")  # suspended: nothing new starts

    await k8s.patch_object(RUNS, "default", "pause", {"spec": {"suspend": False}}, "merge")
    await k8s.wait_for(phase_is(k8s, "pause", "Succeeded"), what="the run to succeed after resuming")
    st = k8s.status("pause")
    ev = stage(st, 0, "evaluate")
    assert (ev["attempts"], ev["failures"], ev["job"]) == (2, 0, "pause-r0-evaluate-a2")
    assert condition(st, "Suspended")["status"] == "False" and st["observedGeneration"] == 3
    await events_posted(k8s, "pause", "Suspended", "Resumed")


async def test_raising_max_rounds_after_success_continues_the_run(k8s, cluster, start_operator):
    await start_operator()
    await k8s.create_object(RUNS, "default", run_manifest("grow", rounds={"max": 1, "patience": 0}))
    await k8s.wait_for(phase_is(k8s, "grow", "Succeeded"), what="the first success")
    assert len(k8s.jobs("grow")) == 5
    await k8s.patch_object(RUNS, "default", "grow", {"spec": {"rounds": {"max": 2}}}, "merge")
    await k8s.wait_for(lambda: k8s.status("grow").get("round") == 2 and k8s.status("grow").get("phase") == "Succeeded",
                       what="round 2 to finish")
    st = k8s.status("grow")
    assert [r["round"] for r in st["rounds"]] == [0, 1, 2] and st["bestRound"] == 2
    assert condition(st, "Succeeded")["message"] == "finished round 2 of 2" and st["observedGeneration"] == 2
    assert len(k8s.jobs("grow")) == 9
    await events_posted(k8s, "grow", "Extended")


async def test_deleting_a_run_removes_its_jobs_and_keeps_artifacts(k8s, cluster, start_operator, s3_server, s3_bucket):
    cluster.s3 = s3_server
    cluster.scripts["gone-r1-sample"] = Hold()
    await start_operator()
    await k8s.create_object(RUNS, "default", run_manifest("gone", storage={"uri": f"{s3_bucket}/runs", "endpoint": s3_server.endpoint}))
    await k8s.wait_for(lambda: "gone-r1-sample" in cluster.tasks, what="round 1 to start")
    assert k8s.run("gone")["metadata"].get("finalizers") is None  # deletion never waits for the operator
    await k8s.delete_object(RUNS, "default", "gone")
    assert not k8s.jobs("gone") and not k8s.find(PODS, "default", "selfimprove.dev/run=gone")
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket[5:])["Contents"]]
    assert any(k.endswith("round-000/evaluate/_SUCCESS") for k in keys)
    await asyncio.sleep(0.3)
    assert not k8s.jobs("gone")  # and nothing is recreated


async def test_fifty_runs_at_once_all_succeed(k8s, cluster, start_operator):
    op = await start_operator(workers=8)
    names = [f"many-{i:02d}" for i in range(50)]
    await asyncio.gather(*(k8s.create_object(RUNS, "default", run_manifest(n, rounds={"max": 1, "patience": 0})) for n in names))
    await k8s.wait_for(lambda: all(k8s.status(n).get("phase") == "Succeeded" for n in names), timeout=90,
                       what="50 runs to succeed")
    assert len(k8s.jobs()) == 50 * 5
    assert op.controller.metrics.registry.get_sample_value("selfimprove_reconcile_errors_total") == 0


# =========================================================================== peering
async def test_a_second_replica_stands_by_and_takes_over(k8s, cluster, start_operator):
    first = await start_operator()
    await k8s.wait_for(lambda: (k8s.find("kopf.dev/v1/clusterkopfpeerings")[0].get("status") or {}), what="the first peer")
    second = await start_operator()  # started later: lower priority
    assert second.config.priority < first.config.priority
    cluster.scripts["ha-r0-evaluate"] = Hold()
    await k8s.create_object(RUNS, "default", run_manifest("ha", rounds={"max": 1, "patience": 0}))
    await k8s.wait_for(lambda: k8s.jobs("ha"), what="the first Job")
    assert first.controller.run_state(("default", "ha")) is not None and second.controller.run_state(("default", "ha")) is None

    await first.stop()
    cluster.release("ha-r0-evaluate")
    await k8s.wait_for(phase_is(k8s, "ha", "Succeeded"), timeout=30, what="the standby to finish the run")
    assert second.controller.run_state(("default", "ha")) is not None


async def test_namespaced_operator_serves_only_its_namespaces(k8s, cluster, start_operator):
    # Namespaced peering: a KopfPeering in every served namespace (the chart creates them).
    await k8s.create_object("kopf.dev/v1/kopfpeerings", "team-a", {
        "apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "selfimprove"}})
    await start_operator(namespaces=("team-a",))
    await k8s.create_object(RUNS, "team-a", run_manifest("mine", namespace="team-a", rounds={"max": 1, "patience": 0}))
    await k8s.create_object(RUNS, "default", run_manifest("theirs", rounds={"max": 1, "patience": 0}))
    await k8s.wait_for(lambda: k8s.status("mine", "team-a").get("phase") == "Succeeded", what="the team-a run to succeed")
    assert k8s.status("theirs") == {} and not k8s.jobs("theirs")
    # Every request stays inside the namespace: a Role is enough (pain #10).
    scoped = [r for r in k8s._requests if r.resource is not None and r.resource.plural is not None
              and str(r.headers.get("User-Agent", "")).startswith("kopf")]
    assert scoped and {r.namespace for r in scoped} == {"team-a"}
    assert {r.resource.plural for r in scoped} >= {"kopfpeerings", "selfimproveruns", "jobs", "pods", "events"}


# =========================================================================== RBAC input
# Permissions the API server checks without a request of that verb: setting
# `blockOwnerDeletion` on a Job's owner reference needs `update` on the owner's finalizers
# (OwnerReferencesPermissionEnforcement admission, e.g. OpenShift).
IMPLIED_USAGE = {("selfimprove.dev", "selfimproveruns/finalizers"): {"update"}}


async def test_api_usage_matches_committed_file(k8s, cluster, start_operator):
    """One scenario walks every code path that calls the API; the verbs and resources it used
    are the operator's RBAC (the chart's test reads the committed file)."""
    # A foreign Job holds the name of the first attempt: create → 409 → get → JobConflict.
    await k8s.create_object(JOBS, "default", {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "usage-r0-evaluate"},
        "spec": {"suspend": True, "template": {"spec": {"containers": []}}}})
    cluster.scripts["usage-r0-evaluate"] = Hold()
    # The first status write meets a concurrent change: re-read (get) and re-plan.
    k8s.inject_fault("patch", "selfimproveruns/status", 409, "Conflict", "the object has been modified", times=1,
                     touch=(RUNS, "default", "usage"))
    await start_operator()
    await k8s.create_object(RUNS, "default", run_manifest("usage", rounds={"max": 1, "patience": 0}))
    await k8s.wait_for(lambda: condition(k8s.status("usage"), "Degraded").get("reason") == "JobConflict", what="JobConflict")
    assert "belongs to another object" in condition(k8s.status("usage"), "Degraded")["message"]
    await k8s.delete_object(JOBS, "default", "usage-r0-evaluate")
    await k8s.wait_for(lambda: stage_or_none(k8s, "usage") == "Running" and k8s.jobs("usage"), what="evaluate to run")
    # Progress: the running pod's log tail (pods/log) onto the status.
    pod = await k8s.wait_for(lambda: running_pod(k8s, stage(k8s.status("usage"), 0, "evaluate")["job"]), what="the pod to run")
    k8s.write_log("default", pod, progress_line(3, 10, "answers"))
    await k8s.wait_for(lambda: (k8s.status("usage").get("progress") or {}).get("done") == 3, what="progress on the status")
    # Suspend: the running Job is deleted; resume: a new attempt.
    await k8s.patch_object(RUNS, "default", "usage", {"spec": {"suspend": True}}, "merge")
    await k8s.wait_for(lambda: not k8s.jobs("usage"), what="the Job to be deleted")
    await k8s.patch_object(RUNS, "default", "usage", {"spec": {"suspend": False}}, "merge")
    await k8s.wait_for(phase_is(k8s, "usage", "Succeeded"), what="the run to succeed")
    assert condition(k8s.status("usage"), "Degraded")["status"] == "False"
    await events_posted(k8s, "usage", "JobConflict", "Succeeded")

    usage = {key: set(verbs) for key, verbs in k8s.usage.items()}
    for key, verbs in IMPLIED_USAGE.items():
        usage.setdefault(key, set()).update(verbs)
    table = [{"group": g, "resource": r, "verbs": sorted(v)} for (g, r), v in sorted(usage.items())]
    if os.environ.get("UPDATE_API_USAGE"):
        USAGE_FILE.parent.mkdir(parents=True, exist_ok=True)
        USAGE_FILE.write_text(json.dumps(table, indent=2) + "\n")
    assert USAGE_FILE.exists(), "run with UPDATE_API_USAGE=1 to create tests/data/operator-api-usage.json"
    assert table == json.loads(USAGE_FILE.read_text()), \
        "the operator's API usage changed: check the chart's RBAC, then regenerate with UPDATE_API_USAGE=1"


def stage_or_none(k8s, name: str) -> str | None:
    st = k8s.status(name)
    try:
        return stage(st, 0, "evaluate")["state"]
    except (KeyError, StopIteration):
        return None
