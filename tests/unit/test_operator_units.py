"""The Kubernetes executor's pure parts: the Job builder, observation of Jobs and Pods, the status
JSON patch, the work queue, settings — and the controller's ordering rules with a fake API."""

from __future__ import annotations

import asyncio
import copy
import json
import os
from datetime import UTC, datetime, timedelta

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from selfimprove_operator.api import MAX_RUN_NAME, SelfImproveRunSpec
from selfimprove_operator.planner import RunIdentity, StartStage, build_task, job_name, plan
from selfimprove_operator.presets import resolve
from selfimprove_workers.contract import StageResult, StageTask

try:
    import kopf  # noqa: F401 - the controller's API adapter needs kopf (the `operator` extra)
except ImportError:  # pragma: no cover
    if os.environ.get("CI"):
        raise
    pytest.skip("kopf not installed", allow_module_level=True)

from selfimprove_operator.k8s.cache import RunState
from selfimprove_operator.k8s.config import OperatorConfig, default_priority, parse_setting, unknown_settings
from selfimprove_operator.k8s.controller import Controller
from selfimprove_operator.k8s.jobs import build_job
from selfimprove_operator.k8s.kube import ApiError
from selfimprove_operator.k8s.observe import Observation, log_tail, observe_job, observe_run
from selfimprove_operator.k8s.reconciler import Result
from selfimprove_operator.k8s.status import status_patch
from selfimprove_operator.k8s.workqueue import WorkQueue

T0 = datetime(2026, 1, 1, tzinfo=UTC)
UID = "0123456789abcdef-uid"
RUN = {"apiVersion": "selfimprove.dev/v1alpha1", "kind": "SelfImproveRun",
       "metadata": {"name": "demo", "namespace": "ns", "uid": UID, "generation": 1, "resourceVersion": "7"}}


def spec(**changes) -> SelfImproveRunSpec:
    body = {
        "strategy": "lmsi",
        "model": {"base": "s3://m/base/"},
        "data": {"questions": "s3://d/q.jsonl", "evaluation": "s3://d/e.jsonl"},
        "rounds": {"max": 1, "patience": 0},
        "storage": {"uri": "s3://b/runs", "secretRef": "creds"},
    }
    body.update(changes)
    return SelfImproveRunSpec.model_validate(body)


def start_of(s: SelfImproveRunSpec, round_no: int = 0, stage: str = "evaluate", attempt: int = 1, run: str = "demo") -> StartStage:
    ident = RunIdentity(run, "ns", UID)
    status = plan(s, None, {}, T0, ident).status
    task = build_task(resolve(s), status, ident, round_no, stage, attempt)
    return StartStage(round_no, stage, attempt, job_name(run, round_no, stage, attempt), task)


def ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


# =========================================================================== the Job
def test_job_carries_the_task_owner_labels_and_restricted_pod():
    s = OperatorConfig().with_run_defaults(spec())  # as the controller does: gpus defaults to 1
    start = start_of(s)
    job = build_job(RUN, s, start, OperatorConfig())
    meta, pod = job["metadata"], job["spec"]["template"]["spec"]
    assert meta["name"] == "demo-r0-evaluate" and meta["namespace"] == "ns"
    assert {k: v for k, v in meta["labels"].items() if k.startswith("selfimprove.dev/")} == {
        "selfimprove.dev/run": "demo", "selfimprove.dev/round": "0",
        "selfimprove.dev/stage": "evaluate", "selfimprove.dev/attempt": "1"}
    assert job["spec"]["template"]["metadata"]["labels"] == meta["labels"]
    assert meta["ownerReferences"] == [{"apiVersion": "selfimprove.dev/v1alpha1", "kind": "SelfImproveRun", "name": "demo",
                                        "uid": UID, "controller": True, "blockOwnerDeletion": True}]
    [c] = pod["containers"]
    assert c["image"] == OperatorConfig().worker_image and c["command"] == ["python3", "-m", "selfimprove_workers"]
    assert StageTask.model_validate_json(c["args"][0]) == start.task
    assert c["resources"] == {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError" and pod["restartPolicy"] == "Never"
    # Pod Security Standards, "restricted".
    assert c["securityContext"] == {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    # Credentials by reference only: the operator names the Secret, never reads it.
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert refs == {
        "AWS_ACCESS_KEY_ID": {"name": "creds", "key": "AWS_ACCESS_KEY_ID", "optional": False},
        "AWS_SECRET_ACCESS_KEY": {"name": "creds", "key": "AWS_SECRET_ACCESS_KEY", "optional": False},
        "AWS_SESSION_TOKEN": {"name": "creds", "key": "AWS_SESSION_TOKEN", "optional": True},
        "HF_TOKEN": {"name": "creds", "key": "HF_TOKEN", "optional": True},
    }
    js = job["spec"]
    assert js["backoffLimit"] == 0 and js["ttlSecondsAfterFinished"] == 3600 and "suspend" not in js
    assert js["podFailurePolicy"]["rules"] == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onPodConditions": [],
         "onExitCodes": {"containerName": "worker", "operator": "In", "values": [2]}},
    ]


def test_job_takes_placement_queue_and_resources_from_the_spec():
    s = spec(resources={
        "gpus": 2, "gpuResourceName": "amd.com/gpu", "cpu": "8", "memory": "64Gi", "image": "my/worker:2",
        "serviceAccountName": "trainer", "nodeSelector": {"pool": "h100"}, "priorityClassName": "batch-low",
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"x": 1}}, "queueName": "team-a", "activeDeadlineSeconds": 7200,
        "backoffLimit": 2, "ttlSecondsAfterFinished": 60, "modelCache": {"claimName": "models", "mountPath": "/models"},
    }, storage={"uri": "s3://b/runs"})
    cfg = OperatorConfig(service_account="default-sa", model_cache_claim="ignored", shm_size_limit="16Gi",
                         image_pull_secrets=("regcred",))
    job = build_job(RUN, s, start_of(s), cfg)
    pod = job["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["image"] == "my/worker:2"
    assert c["resources"] == {"requests": {"cpu": "8", "memory": "64Gi", "amd.com/gpu": "2"},
                              "limits": {"memory": "64Gi", "amd.com/gpu": "2"}}
    assert pod["serviceAccountName"] == "trainer" and pod["priorityClassName"] == "batch-low"
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["affinity"] == {"nodeAffinity": {"x": 1}}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "models"}} in pod["volumes"]
    assert {"name": "SELFIMPROVE_CACHE", "value": "/models"} in c["env"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
    assert not any("valueFrom" in e for e in c["env"])  # no secretRef: no credentials (IRSA, workload identity)
    # Kueue admits the Job by unsuspending it.
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and job["spec"]["suspend"] is True
    assert (job["spec"]["activeDeadlineSeconds"], job["spec"]["backoffLimit"], job["spec"]["ttlSecondsAfterFinished"]) == (7200, 2, 60)


def test_operator_defaults_fill_what_the_run_leaves_out():
    s = spec(resources={"gpus": 0})
    job = build_job(RUN, s, start_of(s), OperatorConfig(service_account="stages", model_cache_claim="cache",
                                                         gpu_resource_name="gpu.intel.com/i915"))
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "stages" and "resources" not in pod["containers"][0]
    assert {"name": "SELFIMPROVE_CACHE", "value": "/cache"} in pod["containers"][0]["env"]
    s = spec(resources={"gpus": 4})
    job = build_job(RUN, s, start_of(s), OperatorConfig(gpu_resource_name="gpu.intel.com/i915"))
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"gpu.intel.com/i915": "4"}


def test_longest_job_name_is_a_dns_label():
    assert len(job_name("r" * MAX_RUN_NAME, 999, "evaluate", 99)) <= 63


# =========================================================================== observing
def job(name="demo-r0-evaluate", attempt=1, conditions=(), suspend=False, created=T0, **status) -> dict:
    rnd, stage_ = name.split("-r")[1].split("-")[:2]
    return {"metadata": {"name": name, "uid": "job-" + name, "creationTimestamp": ts(created),
                         "labels": {"selfimprove.dev/run": "demo", "selfimprove.dev/round": rnd,
                                    "selfimprove.dev/stage": stage_, "selfimprove.dev/attempt": str(attempt)},
                         "ownerReferences": [{"uid": UID, "controller": True}]},
            "spec": {"suspend": suspend} if suspend else {},
            "status": {"conditions": list(conditions), **status}}


def cond(type_, reason=None, at=T0, message=None) -> dict:
    c = {"type": type_, "status": "True", "lastTransitionTime": ts(at)}
    if reason:
        c["reason"] = reason
    if message:
        c["message"] = message
    return c


def pod(job_name_="demo-r0-evaluate", phase="Running", name="p1", created=T0, conditions=(), **container_state) -> dict:
    return {"metadata": {"name": name, "uid": "uid-" + name, "creationTimestamp": ts(created),
                         "labels": {"batch.kubernetes.io/job-name": job_name_, "selfimprove.dev/run": "demo"}},
            "status": {"phase": phase, "conditions": list(conditions),
                       "containerStatuses": [{"name": "worker", "state": container_state}] if container_state else []}}


def summary(**kw) -> str:
    body = {"stage": "evaluate", "round": 0, "status": "Succeeded", "metrics": {"accuracy": 0.5}} | kw
    return StageResult(**body).summary_json()


def obs(j, pods=(), now=T0, **kw):
    out = Observation()
    o = observe_job(j, list(pods), now, out, pending_timeout=kw.pop("pending_timeout", 60),
                    result_grace=kw.pop("result_grace", 10), **kw)
    return o, out


def test_complete_job_yields_the_summary_of_its_pod():
    o, _ = obs(job(conditions=[cond("Complete")]), [pod(phase="Succeeded", terminated={"exitCode": 0, "message": summary()})])
    assert o.state == "succeeded" and o.result.metrics == {"accuracy": 0.5} and o.attempt == 1


def test_complete_job_waits_briefly_for_a_late_pod_then_reports_no_result():
    j = job(conditions=[cond("Complete", at=T0)], completionTime=ts(T0))
    o, out = obs(j, [], now=T0 + timedelta(seconds=3))
    assert o.state == "running" and out.wake_at == T0 + timedelta(seconds=10)
    o, _ = obs(j, [], now=T0 + timedelta(seconds=11))
    assert o.state == "succeeded" and o.result is None
    # A pod that finished without a valid summary is not worth waiting for.
    o, _ = obs(j, [pod(phase="Succeeded", terminated={"exitCode": 0, "message": "hello"})], now=T0)
    assert o.state == "succeeded" and o.result is None


def test_failed_job_reason_comes_from_the_pod():
    log = "\n".join([json.dumps({"level": "info", "msg": "loading"}), json.dumps({"level": "error", "msg": "CUDA error: device lost"})])
    j = job(conditions=[cond("Failed", "BackoffLimitExceeded", message="Job has reached the specified backoff limit")])
    o, _ = obs(j, [pod(phase="Failed", terminated={"exitCode": 1, "reason": "Error", "message": log})])
    assert (o.state, o.reason, o.exit_code, o.message) == ("failed", None, 1, "CUDA error: device lost")
    o, _ = obs(j, [pod(phase="Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})])
    assert (o.reason, o.exit_code) == ("OOMKilled", 137)
    bad = summary(status="Failed", reason="BadInput", message="data.evaluation: e.jsonl:3: answer missing")
    o, _ = obs(job(conditions=[cond("Failed", "PodFailurePolicy")]), [pod(phase="Failed", terminated={"exitCode": 2, "message": bad})])
    assert o.permanent and o.result.reason == "BadInput" and o.message.endswith("answer missing")


def test_failed_job_without_its_pod_uses_the_jobs_reason_after_a_grace():
    j = job(conditions=[cond("Failed", "DeadlineExceeded", message="Job was active longer than specified deadline")])
    o, _ = obs(j, [])
    assert (o.state, o.reason) == ("failed", "DeadlineExceeded")  # the Job's reason is the whole story
    j = job(conditions=[cond("Failed", "PodFailurePolicy", message="Container worker for pod ns/p failed with exit code 2 matching FailJob rule at index 1")])
    assert obs(j, [])[0].state == "running"
    o, _ = obs(j, [], now=T0 + timedelta(seconds=30))
    assert (o.state, o.reason, o.exit_code, o.permanent) == ("failed", "PodFailurePolicy", 2, True)


def test_disrupted_pod_is_a_notice_not_a_failure():
    gone = pod(phase="Failed", name="p1", conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}],
               terminated={"exitCode": 143})
    again = pod(phase="Running", name="p2", created=T0 + timedelta(seconds=5), running={"startedAt": ts(T0 + timedelta(seconds=9))})
    o, out = obs(job(), [gone, again])
    assert o.state == "running"
    assert [n.reason for n in out.notices] == ["StageDisrupted"] and "PreemptionByScheduler" in out.notices[0].message
    assert out.started == [("job-demo-r0-evaluate", "evaluate", 9.0)]


@pytest.mark.parametrize("reason", ["ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError"])
def test_stuck_pod_is_reported_after_the_pending_timeout(reason):
    p = pod(phase="Pending", waiting={"reason": reason, "message": "boom"})
    o, out = obs(job(), [p], now=T0 + timedelta(seconds=30))
    assert (o.state, o.reason) == ("pending", None) and out.wake_at == T0 + timedelta(seconds=60)
    o, _ = obs(job(), [p], now=T0 + timedelta(seconds=61))
    assert (o.state, o.reason) == ("pending", reason) and "boom" in o.message


def test_unschedulable_and_queued_pods():
    p = pod(phase="Pending", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "Insufficient nvidia.com/gpu"}])
    o, _ = obs(job(), [p], now=T0 + timedelta(seconds=61))
    assert o.reason == "Unschedulable" and "Insufficient" in o.message and not o.permanent
    o, _ = obs(job(suspend=True), [])
    assert (o.state, o.reason) == ("pending", None)


def test_run_observation_keeps_the_latest_attempt_and_only_its_own_jobs():
    first = job(conditions=[cond("Failed", "BackoffLimitExceeded")])
    second = job("demo-r0-evaluate-a2", attempt=2)
    foreign = job("demo-r1-sample")
    foreign["metadata"]["ownerReferences"] = [{"uid": "other", "controller": True}]
    seen = observe_run(UID, [second, first, foreign], [], T0, pending_timeout=60, result_grace=10)
    assert set(seen.observed) == {(0, "evaluate")} and seen.observed[(0, "evaluate")].attempt == 2
    # A Job deleted before finishing is missing; one deleted after finishing still tells how.
    seen = observe_run(UID, [], [], T0, pending_timeout=60, result_grace=10, deleted_jobs=[job()])
    assert seen.observed[(0, "evaluate")].state == "missing"
    done = job(conditions=[cond("Complete")])
    seen = observe_run(UID, [], [pod(phase="Succeeded", terminated={"exitCode": 0, "message": summary()})], T0,
                       pending_timeout=60, result_grace=10, deleted_jobs=[done])
    assert seen.observed[(0, "evaluate")].state == "succeeded"


def test_log_tail_is_short_and_prefers_error_records():
    assert log_tail("a\nb\nc\nd") == "b | c | d"
    assert len(log_tail("x" * 5000)) == 600
    assert log_tail(None) is None


# =========================================================================== status patch
def test_status_patch_creates_then_edits_conditions_in_place():
    new = {"phase": "Sampling", "conditions": [{"type": "Ready", "status": "True"}]}
    assert status_patch(None, new, "5") == [{"op": "test", "path": "/metadata/resourceVersion", "value": "5"},
                                            {"op": "add", "path": "/status", "value": new}]
    assert status_patch(new, copy.deepcopy(new), "5") == []
    newer = {"phase": "Training", "conditions": [{"type": "Ready", "status": "False"}, {"type": "Degraded", "status": "True"}]}
    ops = status_patch(new, newer, "6")
    assert ops == [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "6"},
        {"op": "test", "path": "/status/conditions/0/type", "value": "Ready"},
        {"op": "replace", "path": "/status/conditions/0", "value": {"type": "Ready", "status": "False"}},
        {"op": "add", "path": "/status/conditions/-", "value": {"type": "Degraded", "status": "True"}},
        {"op": "replace", "path": "/status/phase", "value": "Training"},
    ]


def test_status_patch_keeps_other_writers_conditions():
    # Someone else's condition, stored at index 0, survives; ours is edited where it is.
    old = {"conditions": [{"type": "Foreign", "status": "True"}, {"type": "Ready", "status": "True"}]}
    ops = status_patch(old, {"conditions": [{"type": "Foreign", "status": "True"}, {"type": "Ready", "status": "False"}]}, "1")
    doc = jsonpatch.apply_patch({"metadata": {"resourceVersion": "1"}, "status": old}, ops)
    assert doc["status"]["conditions"][0]["type"] == "Foreign"


_values = st.one_of(st.integers(0, 3), st.text("ab", max_size=2), st.none())
_status = st.fixed_dictionaries({}, optional={
    "phase": st.sampled_from(["Pending", "Sampling"]), "round": st.integers(0, 3), "message": _values,
    "conditions": st.lists(st.fixed_dictionaries({"type": st.sampled_from(["Ready", "Degraded", "Failed", "Suspended"]),
                                                  "status": st.sampled_from(["True", "False"])}),
                           max_size=4, unique_by=lambda c: c["type"]),
}).map(lambda d: {k: v for k, v in d.items() if v is not None})


@settings(max_examples=200, deadline=None)
@given(_status, _status)
def test_status_patch_turns_any_old_status_into_the_new(old, new):
    def keyed(status: dict) -> dict:  # conditions are a map by type; their order is the store's
        return {**status, "conditions": {c["type"]: c for c in status.get("conditions", [])}}

    doc = {"metadata": {"resourceVersion": "9"}, "status": old}
    patched = jsonpatch.apply_patch(doc, status_patch(old, new, "9"))
    assert keyed(patched.get("status") or {}) == keyed(new)
    # Applied to a newer version of the object, it is refused (the resourceVersion test).
    ops = status_patch(old, new, "9")
    if ops:
        with pytest.raises(jsonpatch.JsonPatchTestFailed):
            jsonpatch.apply_patch({"metadata": {"resourceVersion": "10"}, "status": old}, ops)


# =========================================================================== work queue
@pytest.mark.asyncio
async def test_work_queue_collapses_keys_and_serialises_each_key():
    q = WorkQueue()
    q.add("a"), q.add("a"), q.add("b")
    assert len(q) == 2
    key = await q.get()
    assert key == "a"
    q.add("a")                        # while "a" is processed: once more afterwards, not in parallel
    assert await q.get() == "b"
    q.done("b")
    q.done("a")
    assert await asyncio.wait_for(q.get(), 1) == "a"
    q.done("a")
    await asyncio.wait_for(q.wait_idle(), 1)


@pytest.mark.asyncio
async def test_work_queue_delays_and_backs_off():
    q = WorkQueue()
    q.add_after("k", 0.05)
    q.add_after("k", 5)               # a later wake-up does not postpone an earlier one
    assert await asyncio.wait_for(q.get(), 1) == "k"
    q.done("k")
    assert [q.failed("x", 1.0, 5.0) for _ in range(4)] == [1.0, 2.0, 4.0, 5.0]
    q.succeeded("x")
    assert q.failures("x") == 0
    q.forget("x")
    q.close()


# =========================================================================== settings
def test_settings_from_environment():
    c = OperatorConfig.from_env({"SELFIMPROVE_NAMESPACES": "team-a, team-b", "SELFIMPROVE_METRICS_PORT": "off",
                                 "SELFIMPROVE_PENDING_TIMEOUT": "45", "SELFIMPROVE_STANDALONE": "true",
                                 "SELFIMPROVE_GPU_RESOURCE_NAME": "amd.com/gpu", "SELFIMPROVE_WORKERS": "3"})
    assert (c.namespaces, c.metrics_port, c.pending_timeout, c.standalone, c.gpu_resource_name, c.workers) == \
        (("team-a", "team-b"), None, 45.0, True, "amd.com/gpu", 3)
    assert not c.clusterwide and OperatorConfig().clusterwide
    assert parse_setting("model_cache_claim", "none") is None
    assert unknown_settings({"SELFIMPROVE_GPU": "2", "SELFIMPROVE_WORKERS": "2", "HOME": "/"}) == ["SELFIMPROVE_GPU"]


def test_operator_defaults_fill_only_what_a_run_leaves_empty():
    c = OperatorConfig.from_env({
        "SELFIMPROVE_NODE_SELECTOR": '{"pool": "gpu"}', "SELFIMPROVE_TOLERATIONS": '[{"key": "gpu", "operator": "Exists"}]',
        "SELFIMPROVE_PRIORITY_CLASS_NAME": "batch", "SELFIMPROVE_STORAGE_ENDPOINT": "http://minio:9000",
        "SELFIMPROVE_STORAGE_SECRET": "minio-creds", "SELFIMPROVE_STORAGE_REGION": ""})
    s = c.with_run_defaults(spec(storage={"uri": "s3://b/runs"}))
    assert s.resources.node_selector == {"pool": "gpu"} and s.resources.tolerations[0].key == "gpu"
    assert s.resources.priority_class_name == "batch" and s.storage.region is None
    assert (s.storage.endpoint, s.storage.secret_ref) == ("http://minio:9000", "minio-creds")
    assert start_of(s).task.storage.endpoint == "http://minio:9000"  # the task sees the same spec
    own = c.with_run_defaults(spec(resources={"nodeSelector": {"pool": "a100"}}))
    assert own.resources.node_selector == {"pool": "a100"} and own.storage.secret_ref == "creds"
    assert OperatorConfig().with_run_defaults(s).resources.gpus == 1
    assert OperatorConfig(gpus=2).with_run_defaults(spec(resources={"gpus": 0})).resources.gpus == 0
    assert OperatorConfig.from_env({"SELFIMPROVE_NODE_SELECTOR": "{}"}).node_selector is None


def test_an_earlier_replica_has_the_higher_peering_priority():
    assert default_priority(1_800_000_000.0) > default_priority(1_800_000_001.0)
    assert default_priority(1_800_000_000.0) < 2**53


# =========================================================================== controller rules
class FakeKube:
    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.fail_patch: ApiError | None = None
        self.objects: dict[str, dict] = {}

    async def json_patch(self, path, ops):
        self.calls.append(("patch", path))
        if self.fail_patch:
            raise self.fail_patch
        doc = jsonpatch.apply_patch(self.objects["run"], ops)
        doc["metadata"]["resourceVersion"] = str(int(doc["metadata"]["resourceVersion"]) + 1)
        self.objects["run"] = doc
        return copy.deepcopy(doc)

    async def get(self, path):
        self.calls.append(("get", path))
        if self.fail_patch and self.fail_patch.message == "stale":  # someone else wrote meanwhile
            self.objects["run"]["metadata"]["resourceVersion"] = "99"
        return copy.deepcopy(self.objects["run"])

    async def create(self, path, body):
        self.calls.append(("create", path))
        return {**body, "metadata": {**body["metadata"], "uid": "j"}}

    async def delete(self, path, propagation="Background"):
        self.calls.append(("delete", path))


def _controller() -> tuple[Controller, FakeKube]:
    kube = FakeKube()
    run = {**copy.deepcopy(RUN), "spec": spec().wire()}
    kube.objects["run"] = run
    c = Controller(OperatorConfig(metrics_port=None), kube=kube, clock=lambda: T0)
    c.run_event(None, copy.deepcopy(run))
    c.queue = WorkQueue()  # the tests call reconcile() themselves
    return c, kube


@pytest.mark.asyncio
async def test_status_is_stored_before_the_job_is_created():
    c, kube = _controller()
    result = await c.reconcile(("ns", "demo"))
    assert [k for k, _ in kube.calls] == ["patch", "create"]
    assert kube.calls[1][1] == "/apis/batch/v1/namespaces/ns/jobs"
    stored = kube.objects["run"]["status"]["rounds"][0]["stages"][0]
    assert (stored["state"], stored["job"]) == ("Running", "demo-r0-evaluate")
    # A running run is looked at again by the resync safety net; reconcile only says so.
    assert result == Result(requeue=False, requeue_after=c.config.resync_seconds) and not c.queue.pending()
    c.queue.close()


@pytest.mark.asyncio
async def test_a_plan_from_a_stale_copy_is_never_acted_upon():
    c, kube = _controller()
    kube.fail_patch = ApiError(422, "Invalid", "stale")
    result = await c.reconcile(("ns", "demo"))
    assert [k for k, _ in kube.calls] == ["patch", "get"]  # re-read, and no Job created
    assert result == Result(requeue=True)                 # planned again from the fresh copy
    assert c.run_state(("ns", "demo")).body["metadata"]["resourceVersion"] == "99"  # the fresh copy
    c.queue.close()


@pytest.mark.asyncio
async def test_a_conflict_is_a_replan_even_when_a_watch_event_lands_during_the_patch():
    """CI caught this race: the newer copy arrived by watch while the patch was in flight, the
    fresh GET matched it, and the conflict was taken for a status the API rejects."""
    c, kube = _controller()
    key = ("ns", "demo")
    newer = copy.deepcopy(kube.objects["run"])
    newer["metadata"]["resourceVersion"] = "9"

    async def patch_losing_the_race(path, ops):
        kube.calls.append(("patch", path))
        kube.objects["run"] = copy.deepcopy(newer)  # someone else wrote meanwhile...
        c.run_event("MODIFIED", copy.deepcopy(newer))  # ...and its watch event came in first
        raise ApiError(422, "Invalid", "9 is not equal to tested value 7")

    kube.json_patch = patch_losing_the_race
    result = await c.reconcile(key)  # no exception: nothing to count as a reconcile error
    assert [k for k, _ in kube.calls] == ["patch", "get"] and result == Result(requeue=True)
    c.queue.close()


@pytest.mark.asyncio
async def test_a_status_the_api_rejects_is_an_error_not_a_loop():
    c, kube = _controller()
    kube.fail_patch = ApiError(422, "Invalid", "status.rounds[0].stages[0].state: Unsupported value")
    with pytest.raises(ApiError):
        await c.reconcile(("ns", "demo"))  # the worker counts it, records it and backs off
    assert [k for k, _ in kube.calls] == ["patch", "get"] and not c.queue.pending()
    c.queue.close()


@pytest.mark.asyncio
async def test_the_workers_apply_what_a_reconcile_returns():
    c, _ = _controller()
    key = ("ns", "demo")
    results = iter([Result(requeue=True), Result(requeue_after=30)])
    seen = []

    async def reconcile(k):
        seen.append(k)
        return next(results, Result())

    c.reconciler.reconcile = reconcile
    await c.start()
    c.queue.add(key)
    await asyncio.wait_for(c.queue.wait_idle(), 1)
    assert seen == [key, key]                    # requeue: once more, right after the pass
    assert 29 < c.queue.delay_of(key) <= 30      # requeue_after: a wake-up later
    await c.stop()


@pytest.mark.asyncio
async def test_a_failed_reconcile_backs_off_and_is_recorded_on_the_run():
    c, kube = _controller()
    key = ("ns", "demo")

    async def reconcile(k):
        raise RuntimeError("boom")

    c.reconciler.reconcile = reconcile
    await c.start()
    c.queue.add(key)
    await asyncio.wait_for(c.queue.wait_idle(), 1)
    assert c.queue.failures(key) == 1 and 0 < c.queue.delay_of(key) <= c.config.reconcile_backoff
    assert c.metrics.registry.get_sample_value("selfimprove_reconcile_errors_total") == 1
    degraded = {x["type"]: x for x in kube.objects["run"]["status"]["conditions"]}["Degraded"]
    assert (degraded["status"], degraded["reason"], degraded["message"]) == ("True", "ReconcileError", "RuntimeError: boom")
    await c.stop()
    assert ("create", "/api/v1/namespaces/ns/events") in kube.calls


def test_own_echo_and_older_events_do_not_replace_a_newer_copy():
    c, _ = _controller()
    key = ("ns", "demo")
    state: RunState = c.run_state(key)
    newer = copy.deepcopy(state.body)
    newer["metadata"]["resourceVersion"] = "9"
    state.body, state.pinned_rv = newer, "9"
    older = copy.deepcopy(RUN) | {"spec": spec().wire()}
    older["metadata"]["resourceVersion"] = "8"
    c.run_event("MODIFIED", older)
    assert state.body["metadata"]["resourceVersion"] == "9"        # the older event is ignored
    c.run_event("MODIFIED", newer)                                   # the echo clears the pin
    assert state.pinned_rv is None
    edited = copy.deepcopy(newer)
    edited["metadata"].update(resourceVersion="12", generation=2)
    state.pinned_rv = "11"
    c.run_event("MODIFIED", edited)                                  # a spec change always gets through
    assert state.body["metadata"]["generation"] == 2
    c.queue.close()
