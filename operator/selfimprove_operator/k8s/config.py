"""Operator settings: environment variables (what a Helm chart sets) overridden by CLI flags.

Every setting has an environment variable `SELFIMPROVE_<NAME>` so the chart can configure the
operator without templating its command line. Per-run values in `spec.resources` (image, GPU
resource name, service account, model cache) win over the operator-wide defaults here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..api import SelfImproveRunSpec

ENV_PREFIX = "SELFIMPROVE_"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("selfimprove")
    except PackageNotFoundError:  # running from a source tree
        return "0.1.0"


# The worker image released with this operator (images/worker/Dockerfile's tag).
DEFAULT_WORKER_IMAGE = f"ghcr.io/selfimprove/worker:{_version()}"


def default_priority(now: float | None = None) -> int:
    """Peering priority of this replica: the earlier a replica started, the higher its priority.

    kopf pauses an operator that sees a peer of higher *or equal* priority (two replicas of equal
    priority freeze each other, kopf #734). Deriving the priority from the start time makes the
    replica that already runs keep running and a newcomer (a rollout, a restarted pod) stand by
    until the active one's peering record expires. The low digits are random so replicas started
    in the same millisecond still differ. The value stays below 2**53 (a JSON number).
    """
    import random

    millis = int((now if now is not None else time.time()) * 1000)
    return (10**13 - millis) * 100 + random.randint(0, 99)


@dataclass(frozen=True)
class OperatorConfig:
    # ------------------------------------------------------------------ what to watch
    namespaces: tuple[str, ...] = ()
    """Namespaces served (exact names); empty: all namespaces (cluster-wide)."""

    # ------------------------------------------------------------------ stage Jobs
    worker_image: str = DEFAULT_WORKER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    gpu_resource_name: str = "nvidia.com/gpu"
    service_account: str | None = None
    """Service account of stage pods when the run names none (None: the namespace's default)."""
    model_cache_claim: str | None = None
    """PVC mounted into every stage pod as the model cache when the run names none."""
    model_cache_path: str = "/cache"
    shm_size_limit: str | None = None
    """sizeLimit of the memory-backed /dev/shm (None: bounded only by the pod's memory limit)."""
    run_as_user: int = 10001
    """UID (and GID, fsGroup) of stage pods; the worker image's user."""
    termination_grace_seconds: int = 60
    """Time a stage gets to checkpoint when its pod is stopped (suspend, preemption)."""
    backoff_limit_per_index: bool = True
    """Sharded stages' Jobs retry each shard on its own (`backoffLimitPerIndex`, on by default
    from Kubernetes 1.29, GA in 1.33). Set false on clusters older than 1.29 or with the
    JobBackoffLimitPerIndex feature gate off: a server without it drops the field (1.27 does not
    know it; strict validation refuses it), and the Job would fall back to the default backoffLimit (6 retries shared
    by all shards, not the run's `resources.backoffLimit`). With false a sharded Job uses
    backoffLimit, and the operator's next attempt reruns only the unfinished shards."""

    # ------------------------------------------------------------------ defaults for runs
    # Applied to a run's spec where the run leaves the field empty, before planning: the stage
    # tasks and Jobs see one complete spec. (`spec.resources.gpus` has no API-server default for
    # this reason.)
    gpus: int = 1
    """Accelerators per stage Job when the run does not say."""
    node_selector: dict[str, str] | None = None
    """Node labels of stage pods (JSON object), e.g. the GPU node pool."""
    tolerations: list[dict[str, Any]] | None = None
    """Tolerations of stage pods (JSON list, as in a PodSpec)."""
    priority_class_name: str | None = None
    storage_endpoint: str | None = None
    """S3 endpoint of runs that name none (an in-cluster MinIO, say)."""
    storage_region: str | None = None
    storage_secret: str | None = None
    """Secret with the storage credentials of runs that name none."""

    # ------------------------------------------------------------------ observation
    pending_timeout: float = 300.0
    """How long a pod may sit in ImagePullBackOff / ErrImagePull / Unschedulable /
    CreateContainerConfigError before the run reports it (a pull or scheduling hiccup of a few
    seconds is not worth a condition)."""
    result_grace: float = 30.0
    """How long the operator waits, after a Job finished, for its pod's final state (the result
    summary, the exit code) when the Job's event arrives first. A Complete Job whose summary never
    shows counts as finished without a result (and is retried); a Failed one fails with the Job's
    own reason."""

    # ------------------------------------------------------------------ the operator itself
    workers: int = 8
    """Runs reconciled concurrently (one reconcile per run at a time)."""
    resync_seconds: float = 600.0
    """An unfinished run is reconciled at least this often, events or not (a safety net)."""
    progress_interval: float = 10.0
    """Least seconds between two reads of a running stage's log, and so between two progress
    writes, per run (0: no progress on the status)."""
    progress_rate: float = 2.0
    """Most stage-log reads (and so progress writes) per second across all runs: a token bucket
    that bounds the operator's API load whatever the number of runs."""
    reconcile_backoff: float = 1.0
    reconcile_max_backoff: float = 300.0
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 8080
    """Prometheus endpoint port (None: no endpoint; 0: any free port)."""
    liveness_endpoint: str | None = "http://0.0.0.0:8081/healthz"
    peering_name: str = "selfimprove"
    standalone: bool = False
    """Run without peering (one replica only; a second one would act at the same time)."""
    priority: int = field(default_factory=default_priority)
    watch_server_timeout: float = 270.0
    watch_client_timeout: float = 300.0
    watch_connect_timeout: float = 30.0
    request_timeout: float = 60.0
    reporting_instance: str = field(default_factory=lambda: os.environ.get("POD_NAME") or socket.gethostname())
    log_format: str = "json"
    verbose: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "OperatorConfig":
        """Defaults overridden by `SELFIMPROVE_<SETTING>` variables (e.g. SELFIMPROVE_WORKER_IMAGE,
        SELFIMPROVE_NAMESPACES=a,b, SELFIMPROVE_METRICS_PORT=off)."""
        env = os.environ if env is None else env
        values = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = parse_setting(f.name, raw)
        return cls(**values)

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    def with_run_defaults(self, spec: "SelfImproveRunSpec") -> "SelfImproveRunSpec":
        """`spec` with the operator's defaults filled in where the run left a field empty."""
        from ..api import SelfImproveRunSpec

        res, storage = spec.resources, spec.storage
        resources: dict[str, Any] = {}
        if res.gpus is None:
            resources["gpus"] = self.gpus
        if self.node_selector and not res.node_selector:
            resources["nodeSelector"] = dict(self.node_selector)
        if self.tolerations and not res.tolerations:
            resources["tolerations"] = list(self.tolerations)
        if self.priority_class_name and not res.priority_class_name:
            resources["priorityClassName"] = self.priority_class_name
        stored: dict[str, Any] = {}
        for field_, value in (("endpoint", self.storage_endpoint), ("region", self.storage_region),
                              ("secretRef", self.storage_secret)):
            if value and not getattr(storage, "secret_ref" if field_ == "secretRef" else field_):
                stored[field_] = value
        if not resources and not stored:
            return spec
        body = spec.model_dump(mode="json", by_alias=True, exclude_unset=True)
        body["resources"] = {**body.get("resources", {}), **resources}
        body["storage"] = {**body.get("storage", {}), **stored}
        return SelfImproveRunSpec.model_validate(body)


def unknown_settings(env: Mapping[str, str] | None = None) -> list[str]:
    """`SELFIMPROVE_*` variables that name no setting (a typo, or a setting that does not exist)."""
    env = os.environ if env is None else env
    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(OperatorConfig)}
    return sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)


def parse_setting(name: str, raw: str):
    """A setting's value from its text form (environment variable or flag)."""
    kind = str(next(f for f in dataclasses.fields(OperatorConfig) if f.name == name).type)
    text = raw.strip()
    if "None" in kind and text.lower() in ("none", "off", "null", ""):
        return None
    if kind.startswith(("dict", "list")):
        value = json.loads(text)
        return value or None
    if kind.startswith("tuple"):
        return tuple(part.strip() for part in text.replace(" ", ",").split(",") if part.strip())
    if kind.startswith("bool"):
        return text.lower() in ("1", "true", "yes", "on")
    if kind.startswith("int"):
        return int(text)
    if kind.startswith("float"):
        return float(text)
    return text
