"""Every object the project hands a Kubernetes API server, checked against the official OpenAPI
schemas of every supported minor version (`k8s_schemas.supported_versions()`, 1.27 onwards), in
their strict variant: an unknown field is an error, as with `kubectl apply --validate=strict`.

- the batch/v1 Job of every stage of every strategy, under every resource/placement/operator
  setting that changes the manifest (`jobs.build_job`, fed with the planner's own StartStages);
- the core/v1 Event of every reason the operator emits (`events.event_body`);
- every object the Helm chart renders in every values scenario of test_chart;
- the CustomResourceDefinitions (crds/ and the chart's crds/);
- the README's minimum version against `k8s_schemas.MINIMUM`.

A failure names the Kubernetes version and the case; its message lists each object and field.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import k8s_schemas
import pytest
import yaml
from planner_sim import STRATEGIES, T0, Sim, run_spec
from selfimprove_operator.api import MAX_RUN_NAME
from selfimprove_operator.k8s.config import OperatorConfig
from selfimprove_operator.k8s.controller import Controller
from selfimprove_operator.k8s.events import EVENT_MESSAGE_LIMIT, event_body
from selfimprove_operator.k8s.jobs import build_job
from selfimprove_operator.k8s.reconciler import OWN_DEGRADED
from selfimprove_operator.planner import Event, RunIdentity
from selfimprove_operator.presets import ROUND_STAGES
from selfimprove_operator.strategies import strategy as strategy_of

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = k8s_schemas.supported_versions()
UID = "5f1c2a9e-8d3b-4c1e-9a7f-0123456789ab"


def check(objects: list[tuple[str, dict]], version: str) -> None:
    """Every (label, object) is valid under `version`; else one message naming them all."""
    found = [f"{label}: {p}" for label, obj in objects for p in k8s_schemas.problems(obj, version)]
    if found:
        pytest.fail(f"Kubernetes {version}: {len(found)} problem(s)\n" + "\n".join(found[:40]), pytrace=False)


def test_every_supported_version_has_schemas():
    assert VERSIONS[0] == k8s_schemas.MINIMUM and len(VERSIONS) >= 11  # 1.27 … 1.37 at least
    for version in VERSIONS:
        s = k8s_schemas.schemas(version)
        for api_version, kind in (("batch/v1", "Job"), ("v1", "Event"), ("apps/v1", "Deployment"),
                                  ("apiextensions.k8s.io/v1", "CustomResourceDefinition")):
            assert s.knows(api_version, kind), (version, kind)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_schemas_are_strict(version):
    """Guards the checks below against a validator that accepts anything."""
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"},
           "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i", "bogus": 1}]}}}}
    assert k8s_schemas.problems(job, version) == [
        'spec.template.spec.containers[0].bogus: unknown field "spec.template.spec.containers[0].bogus"']
    del job["spec"]["template"]["spec"]["containers"][0]["name"]
    assert "spec.template.spec.containers[0].name: Required value" in k8s_schemas.problems(job, version)


# ====================================================================================== Jobs
NODE_AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H200"]},
            {"key": "node.kubernetes.io/lifecycle", "operator": "NotIn", "values": ["spot"]},
        ]}]},
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "preference": {"matchExpressions": [
                {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["us-east-1a"]}]}},
        ],
    },
    "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 10, "podAffinityTerm": {"labelSelector": {"matchLabels": {"selfimprove.dev/stage": "train"}},
                                          "topologyKey": "kubernetes.io/hostname"}},
    ]},
}
TOLERATIONS = [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "pool", "operator": "Equal", "value": "training", "effect": "PreferNoSchedule"},
    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
    {"operator": "Exists"},
]

# name -> (spec.resources, spec.storage changes, OperatorConfig settings)
JOB_CASES: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "operator-defaults": ({}, {}, {}),
    "cpu-only": ({"gpus": 0, "cpu": "4", "memory": "16Gi"}, {}, {}),
    "gpus-custom-resource": ({"gpus": 8, "gpuResourceName": "amd.com/gpu", "cpu": "500m", "memory": "64Gi"}, {}, {}),
    "gpus-operator-resource": ({"gpus": 2}, {}, {"gpu_resource_name": "gpu.intel.com/i915"}),
    "gpus-only-no-cpu-memory": ({"gpus": 1}, {}, {}),
    "memory-only": ({"gpus": 0, "memory": "8Gi"}, {}, {}),
    "model-cache-from-spec": ({"modelCache": {"claimName": "models", "mountPath": "/models"}}, {}, {}),
    "model-cache-default-path": ({"modelCache": {"claimName": "models"}}, {}, {}),
    "model-cache-from-operator": ({}, {}, {"model_cache_claim": "hf-cache", "model_cache_path": "/var/cache/hf"}),
    "kueue-queue": ({"queueName": "team-a"}, {}, {}),
    "deadline-ttl-backoff": ({"activeDeadlineSeconds": 7200, "ttlSecondsAfterFinished": 0, "backoffLimit": 3}, {}, {}),
    "no-ttl": ({"ttlSecondsAfterFinished": None}, {}, {}),
    "placement-from-spec": ({"affinity": NODE_AFFINITY, "tolerations": TOLERATIONS,
                             "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
                             "priorityClassName": "batch-low"}, {}, {}),
    "placement-from-operator": ({}, {}, {"node_selector": {"pool": "gpu"}, "tolerations": TOLERATIONS[:2],
                                         "priority_class_name": "batch-high"}),
    "pull-secrets-and-service-account": ({}, {}, {"image_pull_secrets": ("regcred", "mirror"), "service_account": "stages",
                                                  "image_pull_policy": "Always",
                                                  "worker_image": "registry.local/worker@sha256:" + "a" * 64}),
    "service-account-and-image-from-spec": ({"serviceAccountName": "trainer", "image": "my/worker:2"}, {},
                                            {"service_account": "ignored"}),
    "shm-size-limit": ({}, {}, {"shm_size_limit": "16Gi"}),
    "no-credentials": ({}, {"secretRef": None}, {}),
    "storage-from-operator": ({}, {"secretRef": None}, {"storage_secret": "minio", "storage_endpoint": "http://minio:9000",
                                                        "storage_region": "eu-west-1"}),
    "security-settings": ({}, {}, {"run_as_user": 1000, "termination_grace_seconds": 0}),
    # A big teacher's stages on 8 GPUs of their own pool, the student's train / evaluate on 1 or 0.
    "per-stage": ({"gpus": 1, "memory": "32Gi", "nodeSelector": {"pool": "l4"}, "stages": {
        "sample": {"gpus": 8, "memory": "900Gi", "cpu": "64", "nodeSelector": {"pool": "h200"},
                   "tolerations": TOLERATIONS[:1], "image": "my/worker:vllm"},
        "augment": {"gpus": 8, "gpuResourceName": "nvidia.com/mig-7g.80gb", "nodeSelector": {"pool": "h200"},
                    "affinity": NODE_AFFINITY, "priorityClassName": "batch-high", "activeDeadlineSeconds": 3600},
        "filter": {"gpus": 0, "memory": "8Gi", "nodeSelector": {}},
        "evaluate": {"gpus": 2}}}, {}, {}),
    "everything": ({"gpus": 4, "gpuResourceName": "nvidia.com/mig-3g.40gb", "cpu": "16", "memory": "200Gi",
                    "image": "my/worker:2", "serviceAccountName": "trainer", "nodeSelector": {"pool": "h100"},
                    "tolerations": TOLERATIONS, "affinity": NODE_AFFINITY, "priorityClassName": "batch-low",
                    "queueName": "team-a", "activeDeadlineSeconds": 86400, "backoffLimit": 1,
                    "ttlSecondsAfterFinished": 600, "modelCache": {"claimName": "models", "mountPath": "/models"}},
                   {}, {"image_pull_secrets": ("regcred",), "shm_size_limit": "32Gi", "model_cache_claim": "ignored"}),
}


def run_object(name: str = "demo") -> dict[str, Any]:
    return {"apiVersion": "selfimprove.dev/v1alpha1", "kind": "SelfImproveRun",
            "metadata": {"name": name, "namespace": "team-a", "uid": UID, "generation": 1, "resourceVersion": "7"}}


@functools.cache
def jobs_of(case: str, run_name: str = "demo", rounds: int = 1) -> tuple[tuple[str, dict], ...]:
    """(label, Job) of every stage attempt a full run of every strategy starts under `case`:
    round 0's evaluate, a retry of it (attempt 2), and every stage of rounds 1..`rounds`."""
    resources, storage, settings = JOB_CASES[case]
    config = OperatorConfig(metrics_port=None, **settings)
    out = []
    for strategy in STRATEGIES:
        # As the controller does: operator defaults filled in, then planned, then built.
        spec = config.with_run_defaults(run_spec(strategy, resources, storage, rounds={"max": rounds, "patience": 0}))
        ident = RunIdentity(name=run_name, namespace="team-a", uid=UID, generation=1)
        sim = Sim(spec, ident)
        sim.step()
        sim.fail_all()           # round 0's evaluate fails once ...
        sim.run_to_end()         # ... is retried after the backoff as attempt 2, and the run goes on
        stages = {(s.round, s.stage) for s in sim.starts}
        skips = strategy_of(strategy).last_round_skips   # LLM2LLM: the last round does not augment
        assert stages == {(0, "evaluate")} | {(r, st) for r in range(1, rounds + 1) for st in ROUND_STAGES[strategy]
                                              if not (r == rounds and st in skips)}
        assert [s.job_name for s in sim.starts][:2] == [f"{run_name}-r0-evaluate", f"{run_name}-r0-evaluate-a2"]
        for start in sim.starts:
            out.append((f"{strategy} {start.job_name}", build_job(run_object(run_name), spec, start, config)))
    return tuple(out)


def test_the_job_cases_cover_every_stage_and_setting():
    """Every stage of every strategy is built, and the cases really vary what they claim."""
    stages = {job["metadata"]["labels"]["selfimprove.dev/stage"] for _, job in jobs_of("operator-defaults", rounds=2)}
    assert stages == {"sample", "filter", "augment", "train", "evaluate", "exemplars"}
    pods = {case: jobs_of(case)[0][1]["spec"]["template"]["spec"] for case in JOB_CASES}
    specs = {case: jobs_of(case)[0][1]["spec"] for case in JOB_CASES}
    res = lambda case: pods[case]["containers"][0].get("resources", {})  # noqa: E731
    assert res("cpu-only")["requests"] == {"cpu": "4", "memory": "16Gi"}
    assert res("gpus-custom-resource")["limits"]["amd.com/gpu"] == "8"
    assert res("gpus-operator-resource")["limits"] == {"gpu.intel.com/i915": "2"}
    assert any("persistentVolumeClaim" in v for v in pods["model-cache-from-operator"]["volumes"])
    assert any("persistentVolumeClaim" in v for v in pods["model-cache-from-spec"]["volumes"])
    assert specs["kueue-queue"]["suspend"] is True
    assert specs["deadline-ttl-backoff"]["activeDeadlineSeconds"] == 7200
    assert specs["deadline-ttl-backoff"]["ttlSecondsAfterFinished"] == 0
    assert "ttlSecondsAfterFinished" not in specs["no-ttl"]
    assert pods["placement-from-spec"]["affinity"] == NODE_AFFINITY
    assert pods["placement-from-spec"]["tolerations"] == TOLERATIONS
    assert pods["placement-from-operator"]["priorityClassName"] == "batch-high"
    assert pods["pull-secrets-and-service-account"]["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    assert pods["pull-secrets-and-service-account"]["serviceAccountName"] == "stages"
    assert pods["service-account-and-image-from-spec"]["serviceAccountName"] == "trainer"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pods["shm-size-limit"]["volumes"]
    assert not any("valueFrom" in e for e in pods["no-credentials"]["containers"][0]["env"])
    assert any("valueFrom" in e for e in pods["storage-from-operator"]["containers"][0]["env"])


def test_one_run_gives_each_stage_its_own_resources():
    """`per-stage`: the GPUs, memory, pool, image and deadline of each stage's Jobs are its own."""
    by_stage: dict[str, set] = {}
    for _, job in jobs_of("per-stage", rounds=2):   # round 2: LLM2LLM's round 1 augments
        pod = job["spec"]["template"]["spec"]
        c = pod["containers"][0]
        gpus = {k: v for k, v in c.get("resources", {}).get("limits", {}).items() if k != "memory"}
        by_stage.setdefault(job["metadata"]["labels"]["selfimprove.dev/stage"], set()).add((
            tuple(sorted(gpus.items())), c["resources"]["limits"]["memory"], pod.get("nodeSelector", {}).get("pool"),
            c["image"].endswith("my/worker:vllm"), job["spec"].get("activeDeadlineSeconds")))
    assert by_stage == {
        "sample": {((("nvidia.com/gpu", "8"),), "900Gi", "h200", True, None)},
        "augment": {((("nvidia.com/mig-7g.80gb", "8"),), "32Gi", "h200", False, 3600)},
        "filter": {((), "8Gi", None, False, None)},
        "train": {((("nvidia.com/gpu", "1"),), "32Gi", "l4", False, None)},
        "evaluate": {((("nvidia.com/gpu", "2"),), "32Gi", "l4", False, None)},
        "exemplars": {((("nvidia.com/gpu", "1"),), "32Gi", "l4", False, None)},   # the student: the run's
    }


@pytest.mark.parametrize("case", list(JOB_CASES))
@pytest.mark.parametrize("version", VERSIONS)
def test_stage_jobs_are_valid(version, case):
    check(list(jobs_of(case)), version)


@pytest.mark.parametrize("version", VERSIONS)
def test_jobs_of_a_longer_run_with_the_longest_name_are_valid(version):
    """Later rounds (adapters from earlier rounds, accumulated augmented data) and the longest
    run name the API allows."""
    check(list(jobs_of("everything", "r" * MAX_RUN_NAME, rounds=3)), version)


# ============================================================================== sharded Jobs
def _version_at_least(version: str, minor: str) -> bool:
    return tuple(map(int, version.split("."))) >= tuple(map(int, minor.split(".")))


@functools.cache
def sharded_jobs(per_index: bool) -> tuple[tuple[str, dict], ...]:
    """(label, Job) of every shardable stage a run starts, as 4 shards, and as the retry that
    runs only shards 1 and 3; `backoffLimitPerIndex` on or off."""
    from selfimprove_workers.contract import StageTask
    from selfimprove_workers.stage_registry import STAGES

    config = OperatorConfig(metrics_port=None, backoff_limit_per_index=per_index)
    spec = config.with_run_defaults(run_spec("lmsi", {"backoffLimit": 2, "queueName": "team-a"}, {}))
    sim = Sim(spec, RunIdentity(name="demo", namespace="team-a", uid=UID, generation=1))
    sim.run_to_end()
    out = []
    for start in sim.starts:
        if not STAGES[start.stage].shardable:
            continue
        for indexes in (None, [1, 3]):
            task = StageTask.model_validate({**start.task.wire(), "shards": 4, "shardIndexes": indexes})
            sharded = dataclasses.replace(start, task=task)
            out.append((f"{start.job_name} shards {indexes or 'all'}", build_job(run_object(), spec, sharded, config)))
    # Every shardable stage the run starts (the registry decides which: sample and evaluate at least).
    assert {job["metadata"]["labels"]["selfimprove.dev/stage"] for _, job in out} == \
        {s.stage for s in sim.starts if STAGES[s.stage].shardable} >= {"sample", "evaluate"}
    return tuple(out)


@pytest.mark.parametrize("per_index", [True, False], ids=["backoffLimitPerIndex", "backoffLimit"])
@pytest.mark.parametrize("version", VERSIONS)
def test_sharded_stage_jobs_are_valid(version, per_index):
    """The Indexed Job of a sharded stage, and of its retry, on every version where its mode
    exists: backoffLimitPerIndex from 1.29 (on by default there), plain backoffLimit on all."""
    if per_index and not _version_at_least(version, "1.29"):
        pytest.skip("backoffLimitPerIndex is off by default before 1.29: the operator setting is false there")
    check(list(sharded_jobs(per_index)), version)


def test_backoff_limit_per_index_is_refused_by_the_oldest_schema():
    """Why the operator setting exists: 1.27's API server does not know the field."""
    job = sharded_jobs(True)[0][1]
    assert any("backoffLimitPerIndex" in p for p in k8s_schemas.problems(job, VERSIONS[0]))


# ============================================================================== multi-node training
@functools.cache
def multi_node_objects(run_name: str = "demo") -> tuple[tuple[str, dict], ...]:
    """(label, object) of a train stage on 4 nodes: its Indexed Job (first attempt and a retry,
    Kueue on) and the headless Service the operator creates for it (given the Job's uid)."""
    from selfimprove_operator.k8s.jobs import build_service
    from selfimprove_operator.planner import job_name

    config = OperatorConfig(metrics_port=None)
    spec = config.with_run_defaults(run_spec("lmsi", {"backoffLimit": 3, "queueName": "team-a", "gpus": 8,
                                                      "stages": {"train": {"nodes": 4}}}, {}))
    sim = Sim(spec, RunIdentity(name=run_name, namespace="team-a", uid=UID, generation=1))
    sim.run_to_end()
    out: list[tuple[str, dict]] = []
    for start in sim.starts:
        if start.stage != "train":
            continue
        for attempt in (1, 2):
            again = dataclasses.replace(start, attempt=attempt, job_name=job_name(run_name, start.round, "train", attempt),
                                        task=start.task.model_copy(update={"attempt": attempt}))
            job = build_job(run_object(run_name), spec, again, config)
            created = {**job, "metadata": {**job["metadata"], "uid": f"0000000{attempt}-aaaa-bbbb-cccc-dddddddddddd"}}
            out += [(f"{again.job_name} Job", job), (f"{again.job_name} Service", build_service(created))]
    assert len(out) == 4
    return tuple(out)


@pytest.mark.parametrize("version", VERSIONS)
def test_multi_node_train_job_and_its_service_are_valid(version):
    check(list(multi_node_objects()), version)
    # A digit first (no Service name), the longest run name: pod hostnames `<job>-<k>` stay labels.
    long = multi_node_objects("7" + "r" * (MAX_RUN_NAME - 1))
    check(list(long), version)
    assert all(len(job["metadata"]["name"] + "-63") <= 63 for label, job in long if label.endswith(" Job"))


def test_a_multi_node_train_stage_is_one_indexed_job_with_a_headless_service():
    from selfimprove_operator.k8s.jobs import rendezvous_endpoint, service_name

    objects = dict(multi_node_objects())
    for label, job in objects.items():
        if not label.endswith(" Job"):
            continue
        name = job["metadata"]["name"]
        spec, pod = job["spec"], job["spec"]["template"]["spec"]
        service = objects[label[:-len(" Job")] + " Service"]
        assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
        # A gang: the first failed pod fails the Job whatever resources.backoffLimit (3) says.
        assert spec["backoffLimit"] == 0 and "backoffLimitPerIndex" not in spec
        assert [r["action"] for r in spec["podFailurePolicy"]["rules"]] == ["Ignore", "FailJob"]
        assert job["metadata"]["annotations"]["selfimprove.dev/nodes"] == "4"
        assert pod["subdomain"] == service["metadata"]["name"] == service_name(name)
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["SELFIMPROVE_RDZV_ENDPOINT"] == rendezvous_endpoint(name) == f"{name}-0.{service_name(name)}:29400"
        assert env["SELFIMPROVE_RDZV_ID"] == name   # per attempt: a retry never joins its predecessor
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"   # per node
        assert spec["suspend"] is True   # Kueue admits all the nodes at once
        svc = service["spec"]
        assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
        assert svc["selector"] == {"batch.kubernetes.io/job-name": name}
        assert [p["port"] for p in svc["ports"]] == [29400]
        [owner] = service["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["controller"]) == ("Job", name, True)
        assert "kueue.x-k8s.io/queue-name" not in service["metadata"]["labels"]
    # A one-node train Job is exactly the Job of before.
    plain = {label: job for label, job in jobs_of("operator-defaults") if label.startswith("lmsi ") and "-train" in label}
    assert plain
    for job in plain.values():
        assert not {"completionMode", "completions", "parallelism"} & set(job["spec"])
        assert "subdomain" not in job["spec"]["template"]["spec"]


def test_service_names_are_dns_1035_labels():
    from selfimprove_operator.k8s.jobs import service_name

    assert service_name("demo-r1-train-a2") == "demo-r1-train-a2"
    odd = service_name("7up-r1-train")
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", odd) and odd == service_name("7up-r1-train")
    assert service_name("7up-r1-train") != service_name("7up-r2-train")


def test_a_sharded_stage_is_one_indexed_job():
    plain = {label: job for label, job in jobs_of("operator-defaults") if label.startswith("lmsi ")}
    for per_index in (True, False):
        for label, job in sharded_jobs(per_index):
            spec, annotations = job["spec"], job["metadata"]["annotations"]
            subset = label.endswith("[1, 3]")
            assert spec["completionMode"] == "Indexed"
            assert spec["completions"] == spec["parallelism"] == (2 if subset else 4)
            assert annotations["selfimprove.dev/shards"] == "4"
            assert annotations.get("selfimprove.dev/shard-indexes") == ("1,3" if subset else None)
            if per_index:
                assert spec["backoffLimitPerIndex"] == 2 and "backoffLimit" not in spec and "maxFailedIndexes" not in spec
            else:
                assert spec["backoffLimit"] == 2 and "backoffLimitPerIndex" not in spec
            # backoffLimitPerIndex requires restartPolicy Never; every rule action is valid in both modes.
            assert spec["template"]["spec"]["restartPolicy"] == "Never"
            assert [r["action"] for r in spec["podFailurePolicy"]["rules"]] == ["Ignore", "FailJob"]
            assert spec["suspend"] is True   # Kueue admits all the shards at once
            one = plain[f"lmsi {job['metadata']['name']}"]["spec"]
            assert spec["podFailurePolicy"] == one["podFailurePolicy"]
    # A one-shard stage's Job is exactly the Job of before sharding existed.
    for _, job in plain.items():
        assert not {"completionMode", "completions", "parallelism", "backoffLimitPerIndex"} & set(job["spec"])
        assert set(job["metadata"]["annotations"]) == {"selfimprove.dev/output"}


# ==================================================================================== Events
# Every (type, reason) the operator emits: the planner's Events, the observation's notices and
# the controller's own (reconcile errors, invalid specs). test_every_reason_is_covered keeps the
# list complete.
EVENT_REASONS = {
    ("Normal", "Started"), ("Warning", "ImmutableFieldChanged"), ("Normal", "Extended"),
    ("Normal", "Suspended"), ("Normal", "Resumed"), ("Normal", "StageSucceeded"),
    ("Warning", "StageRetrying"), ("Warning", "StageFailed"), ("Normal", "RoundCompleted"),
    ("Normal", "Succeeded"), ("Warning", "NoValidationSet"), ("Normal", "StageSkipped"),
    ("Normal", "StageDisrupted"), ("Warning", "StagePending"), ("Warning", "StageShards"),  # observe.py
    ("Warning", "ReconcileError"), ("Warning", "JobCreationFailed"), ("Warning", "JobConflict"),
    ("Warning", "InvalidSpec"),                                                           # reconciler.py
}
OPERATOR = ROOT / "operator" / "selfimprove_operator"


def test_every_reason_is_covered():
    planner = (OPERATOR / "planner.py").read_text()
    observe = (OPERATOR / "k8s" / "observe.py").read_text()
    k8s_code = "".join(p.read_text() for p in sorted((OPERATOR / "k8s").glob("*.py")))
    emitted = set(re.findall(r'Event\("(Normal|Warning)", "(\w+)"', planner))
    for call in observe.split("Notice(")[1:]:
        args = call[:400]
        type_ = re.search(r'type="(\w+)"', args)
        emitted.add((type_.group(1) if type_ else "Normal", re.search(r'reason="(\w+)"', args).group(1)))
    emitted |= set(re.findall(r'recorder\.event\([^,]+, "(Normal|Warning)", "(\w+)"', k8s_code))
    emitted |= {("Warning", r) for r in OWN_DEGRADED}  # report_error's and _invalid_spec's reasons
    assert emitted == EVENT_REASONS, f"emitted, not covered: {sorted(emitted - EVENT_REASONS)}; " \
                                     f"covered, not emitted: {sorted(EVENT_REASONS - emitted)}"


def planner_events() -> list[Event]:
    """The Events of real planner runs: success, retry, permanent failure, suspend/resume,
    extension and an immutable-field change."""
    ident = RunIdentity(name="demo", namespace="team-a", uid=UID, generation=1)
    events: list[Event] = []
    for strategy in STRATEGIES:
        sim = Sim(run_spec(strategy, {}, {}, rounds={"max": 1, "patience": 0}), ident)
        sim.step()
        sim.spec = run_spec(strategy, {}, {}, rounds={"max": 1, "patience": 0}, suspend=True)
        sim.step()
        sim.spec = run_spec(strategy, {}, {}, rounds={"max": 1, "patience": 0})
        sim.step()
        sim.fail_all(message="CUDA out of memory. " * 80)   # a long message (StageRetrying)
        sim.step(advance=30)
        sim.run_to_end()
        sim.spec = run_spec(strategy, {}, {}, rounds={"max": 2, "patience": 0})
        sim.step()                                           # Extended
        sim.fail_all(exit_code=2, reason="BadInput", message="no question has an answer")
        sim.step()                                           # StageFailed
        sim.spec = run_spec(strategy, {}, {}, model={"base": "s3://m/other/", "teacher": "s3://m/teacher/"})
        sim.step()                                           # ImmutableFieldChanged
        events += sim.events
    return events


LONG = {
    "at-limit": "x" * EVENT_MESSAGE_LIMIT,
    "over-limit": "x" * (EVENT_MESSAGE_LIMIT + 1),
    "far-over-limit": "traceback line\n" * 1000,
    "multibyte-1024-characters": "é" * EVENT_MESSAGE_LIMIT,  # 2048 bytes
    "multibyte-over-limit": "…" * (EVENT_MESSAGE_LIMIT + 5),
    "empty": "",
}


@functools.cache
def event_bodies() -> tuple[tuple[str, dict], ...]:
    seen = planner_events()
    reasons = {(e.type, e.reason) for e in seen}
    planner_reasons = {r for r in EVENT_REASONS if r[1] not in ("StageDisrupted", "StagePending", "StageShards", *OWN_DEGRADED)}
    assert reasons == planner_reasons, sorted(planner_reasons ^ reasons)  # the runs above emit them all
    samples = [(e.type, e.reason, e.message) for e in seen]
    samples += [(t, r, f"{r}: something happened") for t, r in sorted(EVENT_REASONS)]
    samples += [("Warning", "StageFailed", m) for m in LONG.values()]
    out = []
    for i, (type_, reason, message) in enumerate(samples):
        run = run_object("r" * MAX_RUN_NAME if i % 2 else "demo")
        body = event_body(run, type_, reason, message, T0 + timedelta(microseconds=123456),
                          "selfimprove-operator-7d9f8b6c5-x2x4z")
        out.append((f"{reason} #{i}", body))
    return tuple(out)


@pytest.mark.parametrize("version", VERSIONS)
def test_events_are_valid(version):
    check(list(event_bodies()), version)


def test_event_messages_fit_the_api_limit():
    """The API server limits an Event's note to 1024 bytes (Go's len: bytes of UTF-8, not
    characters); the operator cuts longer messages and says so with an ellipsis."""
    for label, body in event_bodies():
        assert len(body["message"].encode()) <= EVENT_MESSAGE_LIMIT, (label, len(body["message"].encode()))
    for name, message in LONG.items():
        got = event_body(run_object(), "Warning", "StageFailed", message, T0, "op")["message"]
        if len(message.encode()) <= EVENT_MESSAGE_LIMIT:
            assert got == message, name
        else:
            assert got.endswith("…") and message.startswith(got[:-1]), name
            assert len(got.encode()) > EVENT_MESSAGE_LIMIT - 4, name  # cut at the limit, not before


def test_event_body_is_what_the_controller_posts():
    posted: list[tuple[str, dict]] = []

    class Kube:
        async def create(self, path, body):
            posted.append((path, body))
            return body

    config = OperatorConfig(metrics_port=None, reporting_instance="op-0")

    async def main():
        c = Controller(config, kube=Kube(), clock=lambda: T0)
        c.recorder.event(run_object(), "Warning", "StageFailed", "é" * 2000)
        await c.recorder.drain()
        assert c.recorder.in_flight() == 0

    asyncio.run(main())
    assert posted == [("/api/v1/namespaces/team-a/events",
                       event_body(run_object(), "Warning", "StageFailed", "é" * 2000, T0, "op-0"))]


# ===================================================================================== chart
# Kinds the official schemas cannot know (they come with other projects' CRDs), by name.
NOT_IN_KUBERNETES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),  # Prometheus Operator
    ("kopf.dev/v1", "ClusterKopfPeering"),           # kopf's peering (charts/selfimprove/crds/kopf.dev_peerings.yaml)
    ("kopf.dev/v1", "KopfPeering"),
}

from chart_render import CHART, SCENARIOS, render  # noqa: E402

try:  # the native library may fail to load, not only to import (test_chart skips the same way)
    import helm_python

    helm_python.helm_sdk_version()
    CHART_SKIP = None
except Exception as exc:  # noqa: BLE001
    CHART_SKIP = f"helm-python-sdk unavailable ({exc})"


@functools.cache
def rendered(scenario: str) -> tuple[dict, ...]:
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        return tuple(render(chart, SCENARIOS[scenario]))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("version", VERSIONS)
def test_chart_objects_are_valid(version, scenario):
    if CHART_SKIP:  # CI has everything: there a missing Helm engine is a failure
        (pytest.fail if os.environ.get("CI") else pytest.skip)(CHART_SKIP)
    docs = rendered(scenario)
    assert docs
    schemas = k8s_schemas.schemas(version)
    checked = []
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        label = f"{doc['kind']} {doc['metadata']['name']}"
        if key in NOT_IN_KUBERNETES:
            assert not schemas.knows(*key), f"{key} is in Kubernetes {version} now: validate it"
            continue
        assert schemas.knows(*key), f"Kubernetes {version} has no {key} ({label}); add it to NOT_IN_KUBERNETES only if it is a CRD's kind"
        checked.append((label, doc))
    assert any(doc["kind"] == "Deployment" for _, doc in checked)
    check(checked, version)


# ====================================================================================== CRDs
CRD_FILES = sorted([*ROOT.glob("crds/*.yaml"), *ROOT.glob("charts/selfimprove/crds/*.yaml")])


@functools.cache
def crd_docs() -> tuple[tuple[str, dict], ...]:
    out = []
    for path in CRD_FILES:
        for doc in yaml.load_all(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if doc:
                out.append((f"{path.relative_to(ROOT)} {doc['metadata']['name']}", doc))
    return tuple(out)


def test_crd_files_are_there():
    names = {label for label, _ in crd_docs()}
    assert "crds/selfimprove.dev_selfimproveruns.yaml selfimproveruns.selfimprove.dev" in names
    assert "charts/selfimprove/crds/kopf.dev_peerings.yaml kopfpeerings.kopf.dev" in names
    assert all(doc["kind"] == "CustomResourceDefinition" and doc["apiVersion"] == "apiextensions.k8s.io/v1"
               for _, doc in crd_docs())


@pytest.mark.parametrize("path", [p.relative_to(ROOT).as_posix() for p in CRD_FILES])
@pytest.mark.parametrize("version", VERSIONS)
def test_crds_are_valid(version, path):
    check([d for d in crd_docs() if d[0].startswith(path + " ")], version)


# ================================================================================== versions
def test_readme_minimum_is_the_schemas_minimum():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install on a cluster", 1)[1].split("\n## ", 1)[0]
    stated = re.findall(r"Kubernetes ≥ (\d+\.\d+)", section)
    assert stated == [k8s_schemas.MINIMUM], stated


def test_newest_shipped_schemas_are_supported():
    shipped = k8s_schemas._available()
    assert shipped[-1] in VERSIONS and VERSIONS == shipped[shipped.index(k8s_schemas.MINIMUM):]
