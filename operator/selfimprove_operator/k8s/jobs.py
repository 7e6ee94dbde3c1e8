"""The batch/v1 Job of one stage attempt (pure: no API calls).

One Job per attempt, named by `planner.job_name` (`<run>-r<round>-<stage>[-a<attempt>]`): the
name is deterministic, so creating it twice is harmless (409 AlreadyExists) and a restarted
operator never starts the same attempt twice.

The task travels inline as the container's argument (`python3 -m selfimprove_workers '<task
JSON>'`): it is small (no data, no credentials), it is visible with `kubectl get job -o yaml`,
and it needs no ConfigMap whose lifetime would have to be managed. Storage credentials come from
the run's Secret through `secretKeyRef`; the operator only names the Secret, it never reads it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from selfimprove_workers.constants import EXIT_BAD_INPUT, JUDGE_API_KEY_ENV, TEACHER_API_KEY_ENV
from selfimprove_workers.contract import RDZV_ENDPOINT_ENV, RDZV_ID_ENV, RDZV_PORT

from ..api import API_VERSION, KIND, SelfImproveRunSpec
from ..planner import StartStage
from .config import OperatorConfig

LABEL_PREFIX = "selfimprove.dev/"
RUN_LABEL = LABEL_PREFIX + "run"
ROUND_LABEL = LABEL_PREFIX + "round"
STAGE_LABEL = LABEL_PREFIX + "stage"
ATTEMPT_LABEL = LABEL_PREFIX + "attempt"
OUTPUT_ANNOTATION = LABEL_PREFIX + "output"
# A sharded stage's Job says which shards its completion indexes run (observe.py maps the Job's
# completedIndexes back through them): the shard count, and the shards when a retry runs a subset.
SHARDS_ANNOTATION = LABEL_PREFIX + "shards"
SHARD_INDEXES_ANNOTATION = LABEL_PREFIX + "shard-indexes"
# Set by the Job controller on the pods of an Indexed Job (the label since 1.28, the annotation always).
COMPLETION_INDEX_KEY = "batch.kubernetes.io/job-completion-index"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
NODES_ANNOTATION = LABEL_PREFIX + "nodes"
RDZV_PORT_NAME = "rendezvous"
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")  # set on pods by the Job controller
CONTAINER = "worker"
SHM_VOLUME = "dshm"
CACHE_VOLUME = "model-cache"
CACHE_ENV = "SELFIMPROVE_CACHE"  # selfimprove_workers.runtime.MODEL_CACHE_ENV
# (key, optional): HF_TOKEN reads gated or private hf:// models (selfimprove_workers.model_refs).
CREDENTIAL_KEYS = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True),
                   ("HF_TOKEN", True))


def owner_reference(run: Mapping[str, Any]) -> dict[str, Any]:
    """The run as the Job's controller: deleting the run deletes its Jobs (garbage collector),
    and blockOwnerDeletion keeps a foreground deletion of the run waiting for them."""
    meta = run["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def job_labels(run_name: str, start: StartStage) -> dict[str, str]:
    return {
        RUN_LABEL: run_name,
        ROUND_LABEL: str(start.round),
        STAGE_LABEL: start.stage,
        ATTEMPT_LABEL: str(start.attempt),
        "app.kubernetes.io/name": "selfimprove-worker",
        "app.kubernetes.io/managed-by": "selfimprove-operator",
    }


def build_job(run: Mapping[str, Any], spec: SelfImproveRunSpec, start: StartStage, config: OperatorConfig) -> dict[str, Any]:
    """The Job manifest of `start` for the run object `run` (its metadata: name, namespace, uid).
    `spec` is the run's spec (not preset-resolved: resources have no presets). The stage's
    `spec.resources.stages.<stage>` overrides the run's resources field by field."""
    meta = run["metadata"]
    res = spec.resources.for_stage(start.stage)
    labels = job_labels(meta["name"], start)

    gpu_name = res.gpu_resource_name or config.gpu_resource_name
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu:
        requests["cpu"] = res.cpu
    if res.memory:
        # Memory is incompressible: the request is also the limit, so a stage is OOM-killed in
        # its own pod (reason OOMKilled reaches the status) instead of evicting its neighbours.
        requests["memory"] = limits["memory"] = res.memory
    if res.gpus:
        # Extended resources cannot be overcommitted: request and limit must be equal.
        requests[gpu_name] = limits[gpu_name] = str(res.gpus)

    env: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if spec.storage.secret_ref:
        for key, optional in CREDENTIAL_KEYS:
            env.append({
                "name": key,
                "valueFrom": {"secretKeyRef": {"name": spec.storage.secret_ref, "key": key, "optional": optional}},
            })
    # A served teacher's or judge's API key, from the Secret the spec names; not optional, so a
    # missing key stops the run at its first Job (CreateContainerConfigError), not hours later.
    for endpoint, key_env in ((spec.model.teacher_endpoint, TEACHER_API_KEY_ENV),
                              (spec.model.judge_endpoint, JUDGE_API_KEY_ENV)):
        if endpoint is not None and endpoint.api_key_secret is not None:
            ref = endpoint.api_key_secret
            env.append({"name": key_env,
                        "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key, "optional": False}}})

    mounts: list[dict[str, Any]] = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    shm: dict[str, Any] = {"medium": "Memory"}
    if config.shm_size_limit:
        shm["sizeLimit"] = config.shm_size_limit
    volumes: list[dict[str, Any]] = [{"name": SHM_VOLUME, "emptyDir": shm}]
    claim, cache_path = (
        (res.model_cache.claim_name, res.model_cache.mount_path) if res.model_cache
        else (config.model_cache_claim, config.model_cache_path)
    )
    if claim:
        volumes.append({"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": CACHE_VOLUME, "mountPath": cache_path})
        env.append({"name": CACHE_ENV, "value": cache_path})

    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": res.image or config.worker_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["python3", "-m", "selfimprove_workers"],
        "args": [json.dumps(start.task.wire(), separators=(",", ":"), sort_keys=True)],
        "env": env,
        "volumeMounts": mounts,
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # The worker writes its result summary to /dev/termination-log; when it dies before
        # that (a crash, an import error), the tail of its log is the message instead.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if requests:
        container["resources"] = {"requests": requests, **({"limits": limits} if limits else {})}

    uid = config.run_as_user
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": volumes,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,  # the model cache volume must be writable by the worker
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # Workers never talk to the Kubernetes API: no token in their pods.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": config.termination_grace_seconds,
    }
    service_account = res.service_account_name or config.service_account
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    if config.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in config.image_pull_secrets]
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [t.wire() for t in res.tolerations]
    if res.affinity:
        pod_spec["affinity"] = res.affinity
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name

    job_meta: dict[str, Any] = {
        "name": start.job_name,
        "namespace": meta.get("namespace"),
        "labels": dict(labels),
        "annotations": {OUTPUT_ANNOTATION: start.task.output},
        "ownerReferences": [owner_reference(run)],
    }
    job_spec: dict[str, Any] = {
        "backoffLimit": res.backoff_limit,
        # Every rule below is valid with backoffLimitPerIndex too (FailJob still fails the whole
        # Job; FailIndex, valid only with it, is not needed: a bad input is every shard's).
        "podFailurePolicy": {
            "rules": [
                # Preemption, eviction, node drain: the Job controller replaces the pod without
                # counting a failure (pain: preempted spot pods must simply run again).
                # `status` is the server's default ("True"), spelled out: the schemas of 1.27–1.34
                # declare it required, so strict validation (kubectl --validate=strict, GitOps
                # linters) rejects a pattern without it.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                # Exit code 2 is the workers' "bad input": no retry inside the Job can fix it.
                # `onPodConditions: []`: required in the 1.27 and 1.28 schemas (optional from
                # 1.29); an empty list beside onExitCodes is valid on every version.
                {"action": "FailJob", "onPodConditions": [],
                 "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_BAD_INPUT]}},
            ],
        },
        "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
    }
    if start.task.shards > 1:
        _shard(job_meta, job_spec, start, res.backoff_limit, config)
    if start.task.nodes > 1:
        _multi_node(job_meta, job_spec, start)
    if res.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = res.active_deadline_seconds
    if res.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = res.ttl_seconds_after_finished
    if res.queue_name:
        # Kueue admits a suspended Job by unsuspending it; created unsuspended, the Job would
        # start before Kueue decides.
        job_meta["labels"][KUEUE_QUEUE_LABEL] = res.queue_name
        job_spec["suspend"] = True
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": job_meta, "spec": job_spec}


def _shard(job_meta: dict[str, Any], job_spec: dict[str, Any], start: StartStage, backoff_limit: int,
           config: OperatorConfig) -> None:
    """A sharded stage as ONE Indexed Job: pod k gets JOB_COMPLETION_INDEX=k from the Job
    controller and runs shard `shardIndexes[k]` (all shards when the task names none). One Job
    keeps one name per attempt, one deadline, one Kueue admission (all shards or none) and one
    ttl for the whole stage."""
    task = start.task
    indexes = task.shard_indexes if task.shard_indexes is not None else list(range(task.shards))
    job_meta["annotations"][SHARDS_ANNOTATION] = str(task.shards)
    if task.shard_indexes is not None:
        job_meta["annotations"][SHARD_INDEXES_ANNOTATION] = ",".join(map(str, indexes))
    job_spec["completionMode"] = "Indexed"
    job_spec["completions"] = job_spec["parallelism"] = len(indexes)
    if config.backoff_limit_per_index:
        # Each shard gets its own retries and a failing shard does not stop the others: the Job
        # fails (FailedIndexes) only once every shard finished, and the operator's next attempt
        # reruns just the failed ones. maxFailedIndexes stays unset for that reason. With it,
        # backoffLimit must be left to its default (unlimited): it would count every shard's
        # failures together.
        del job_spec["backoffLimit"]
        job_spec["backoffLimitPerIndex"] = backoff_limit


def service_name(job_name: str) -> str:
    """The headless Service of a multi-node Job: the Job's own name when that is a valid Service
    name (a DNS-1035 label: a letter first), else a stable one derived from it (a run name may
    begin with a digit, which Job names allow and Service names do not)."""
    if _DNS_1035.fullmatch(job_name):
        return job_name
    return "t" + hashlib.sha256(job_name.encode()).hexdigest()[:20]


_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def rendezvous_endpoint(job_name: str) -> str:
    """Node 0's pod by its DNS name under the headless Service (`<hostname>.<subdomain>`; an
    Indexed Job's pod k has hostname `<job>-<k>`), which hosts torchrun's c10d store."""
    return f"{job_name}-0.{service_name(job_name)}:{RDZV_PORT}"


def _multi_node(job_meta: dict[str, Any], job_spec: dict[str, Any], start: StartStage) -> None:
    """Multi-node training as ONE Indexed Job: pod k is node k (JOB_COMPLETION_INDEX=k), its
    hostname `<job>-<k>` resolvable under the headless Service (`build_service`) that the
    operator creates next to the Job, so every node finds node 0's rendezvous.

    The nodes are one gang: a lost node leaves the others' collectives without a peer, and a
    replacement pod cannot join a rendezvous that has already closed. So `backoffLimit` is 0
    whatever resources.backoffLimit says: the first failed pod fails the Job (the Job controller
    then stops the other pods), and the operator's next attempt — a new Job, so a new rendezvous
    id — resumes from the last checkpoint. A preemption (DisruptionTarget, still ignored) sends
    SIGTERM: every rank stops at the same step boundary with a checkpoint and exits 143, which
    fails the Job the same way and the retry resumes from that step."""
    task = start.task
    name = start.job_name
    job_meta["annotations"][NODES_ANNOTATION] = str(task.nodes)
    job_spec["completionMode"] = "Indexed"
    job_spec["completions"] = job_spec["parallelism"] = task.nodes
    job_spec["backoffLimit"] = 0
    pod_spec = job_spec["template"]["spec"]
    pod_spec["subdomain"] = service_name(name)
    container = pod_spec["containers"][0]
    container["env"].extend([
        {"name": RDZV_ENDPOINT_ENV, "value": rendezvous_endpoint(name)},
        {"name": RDZV_ID_ENV, "value": name},
    ])
    container["ports"] = [{"name": RDZV_PORT_NAME, "containerPort": RDZV_PORT, "protocol": "TCP"}]


def build_service(job: Mapping[str, Any]) -> dict[str, Any]:
    """The headless Service of a multi-node Job (`job`: the created Job, for its uid). Owned by
    the Job, so it goes when the Job goes — deleted by the operator, by its
    ttlSecondsAfterFinished, or with the run (run → Job → Service) — and the operator never has
    to track it. `publishNotReadyAddresses`: the pods have no readiness probe, and the nodes
    must resolve node 0 while it is still starting."""
    meta = job["metadata"]
    labels = {k: v for k, v in (meta.get("labels") or {}).items() if k != KUEUE_QUEUE_LABEL}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(meta["name"]),
            "namespace": meta.get("namespace"),
            "labels": labels,
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"],
                                 "controller": True}],
        },
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_NAME_LABELS[0]: meta["name"]},
            "publishNotReadyAddresses": True,
            "ports": [{"name": RDZV_PORT_NAME, "port": RDZV_PORT, "targetPort": RDZV_PORT, "protocol": "TCP"}],
        },
    }
