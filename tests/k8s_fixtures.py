"""Kubernetes for tests: kmock's API emulator with the API-server semantics the operator relies
on, a fake cluster that plays kubelet and Job controller, and the operator run in-process.

Loaded as a pytest plugin by ``tests/conftest.py``. Fixtures:

- ``k8s`` (:class:`ApiServer`): the emulator on 127.0.0.1 (a free port), with the resources the
  operator uses declared for discovery and the peering object created;
- ``kubeconfig``: a kubeconfig for it, exported as ``$KUBECONFIG`` (the operator logs in with it
  exactly as it would against a real cluster);
- ``cluster`` (:class:`FakeCluster`): runs every stage Job it sees according to a script per Job
  (succeed, fail, OOM, preemption, image pull errors, hold until released …), writing the pod's
  termination message as a worker would (a valid StageResult summary) and, when given an S3
  server, the stage's artifacts;
- ``start_operator``: starts the operator in the test's event loop (``await start_operator()``),
  stopped at teardown; call it again after stopping to "restart" it.

What kmock's ``KubernetesEmulator`` lacks and :class:`ApiServer` adds (kmock stores objects as
plain JSON and merges every write into them):
1. server-set metadata: ``uid``, ``resourceVersion`` (bumped on every change, not on a no-op),
   ``generation`` (bumped when ``spec`` changes), ``creationTimestamp``, ``generateName``;
2. JSON patch (RFC 6902) with ``test`` ops (a failed test is 422), RFC 7386 merge patch, and the
   resourceVersion precondition of a merge patch (409);
3. the status subresource: ``PATCH …/status`` changes only ``status``, a write to the main
   resource leaves ``status`` alone, ``create`` drops it;
4. label selectors on list and watch (kopf sends ``labelSelector=selfimprove.dev/run``);
5. the garbage collector: deleting an owner deletes its dependents (owner references, background
   propagation; batch Jobs deleted through the API orphan their pods unless told otherwise);
6. a race-free watch: kmock snapshots the objects and subscribes to changes in two steps, so an
   object created in between was never streamed; here both happen under the store's lock;
7. Kubernetes error reasons (AlreadyExists, NotFound, Conflict, Invalid) and injected faults;
8. a record of the API usage (group, resource, verb) of the operator's requests, from which
   ``tests/data/operator-api-usage.json`` (the chart's RBAC) is checked;
9. **validation as strict as a real API server of one Kubernetes minor version** (``version``;
   the ``k8s`` fixture runs every test against the oldest and the newest supported version):
   - built-in kinds (Jobs, Pods, Events, Secrets, Namespaces, the CRD) against that version's
     official OpenAPI schema (tests/k8s_schemas.py): a schema error is ``422 Invalid`` with
     ``details.causes[].field``; an unknown field is ``400 BadRequest`` ("strict decoding
     error"), as with ``fieldValidation=Strict`` — a real server's default drops it with a
     warning, which for an operator is always a bug, so here it is an error;
   - ``SelfImproveRun`` objects against the CRD the chart ships (tests/crd_semantics.py): unknown
     fields pruned (spec and status; ``pruned`` records them), defaults applied, the schema and
     the CEL rules enforced (transition rules with ``oldSelf`` on updates), ``422`` otherwise;
   - Secrets' ``stringData`` folded into ``data``, as the API server does.

Every write stores a new version and never edits a stored one, so objects are shared with watch
events and readers without copying (copying was the emulator's main cost with hundreds of runs);
what ``find``/``run``/``jobs`` return must be treated as read-only.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import random
import re
import string
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    from pytest_asyncio import fixture as async_fixture
except ImportError:  # pragma: no cover - then the tests skip (or fail in CI) in need_kmock()
    async_fixture = pytest.fixture

try:
    import attrs
    import kmock
    from aiohttp import web
    from kmock import KubernetesError, ResourceInfo
    from kmock import resource as Resource
except ImportError:  # pragma: no cover - exercised where kmock is not installed
    kmock = None

__all__ = [
    "need_kmock", "K8S_VERSIONS", "run_manifest", "progress_line", "running_pod", "RUNS", "JOBS", "PODS", "EVENTS", "SECRETS",
    "Succeed", "Fail", "Hold", "Preempt", "Pending", "Indexed", "k8s", "kubeconfig", "cluster", "start_operator",
]

RUNS = "selfimprove.dev/v1alpha1/selfimproveruns"
JOBS = "batch/v1/jobs"
PODS = "v1/pods"
EVENTS = "v1/events"
SECRETS = "v1/secrets"
SERVICES = "v1/services"
PEERING_NAME = "selfimprove"
CRD_FILE = Path(__file__).resolve().parents[1] / "charts" / "selfimprove" / "crds" / "selfimprove.dev_selfimproveruns.yaml"


def _versions() -> list[str]:
    try:
        from k8s_schemas import supported_versions

        versions = supported_versions()
    except ImportError:  # pragma: no cover - kubernetes-validate missing: need_kmock() reports it
        return ["newest"]
    return [versions[0], versions[-1]] if len(versions) > 1 else versions


# The versions the operator's integration tests run against: the oldest and newest supported.
K8S_VERSIONS = _versions()
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}


def need_kmock() -> None:
    """Skip without kmock or kopf — but fail in CI, where a skipped operator suite would hide
    that it never ran."""
    missing = []
    if kmock is None:
        missing.append("kmock")
    try:
        import kopf  # noqa: F401
    except ImportError:
        missing.append("kopf")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} not installed; the operator tests must run in CI")
        pytest.skip(f"{', '.join(missing)} not installed")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def progress_line(done: int, total: int, unit: str, eta: float | None = None, stage: str = "sample") -> str:
    """A progress line exactly as a stage's log module writes it (selfimprove_workers.log)."""
    import logging

    from selfimprove_workers.log import PROGRESS_KEY, JsonFormatter

    body: dict[str, Any] = {"done": done, "total": total, "unit": unit}
    if eta is not None:
        body["etaSeconds"] = eta
    record = logging.LogRecord(f"selfimprove.{stage}", logging.INFO, __file__, 0, f"{done}/{total} {unit}", None, None)
    setattr(record, PROGRESS_KEY, body)
    return JsonFormatter().format(record)


def running_pod(server: Any, job: str, namespace: str = "default") -> str | None:
    """The name of the Job's pod whose container runs, if any."""
    for pod in server.find(PODS, namespace):
        if (pod["metadata"].get("labels") or {}).get("job-name") == job and (pod.get("status") or {}).get("phase") == "Running":
            return pod["metadata"]["name"]
    return None


def run_manifest(name: str, namespace: str = "default", **spec: Any) -> dict[str, Any]:
    """A small LMSI run: 2 rounds, no early stop, retries without delay."""
    body: dict[str, Any] = {
        "strategy": "lmsi",
        "model": {"base": "s3://models/tiny/"},
        "data": {"questions": "s3://data/questions.jsonl", "evaluation": "s3://data/test.jsonl"},
        "rounds": {"max": 2, "patience": 0},
        "retry": {"limit": 1, "backoffSeconds": 0},
        "resources": {"gpus": 1},
        "storage": {"uri": "s3://artifacts/runs", "secretRef": "s3-credentials"},
    }
    for key, value in spec.items():
        body[key] = value
    return {
        "apiVersion": "selfimprove.dev/v1alpha1",
        "kind": "SelfImproveRun",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


# =========================================================================== label selectors
def _selector(text: str | None) -> list[Callable[[dict[str, str]], bool]]:
    if not text:
        return []
    rules: list[Callable[[dict[str, str]], bool]] = []
    for part in re.split(r",(?![^()]*\))", text):
        part = part.strip()
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", part):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            rules.append((lambda k, vs: lambda ls: ls.get(k) in vs)(key, values) if op == "in"
                         else (lambda k, vs: lambda ls: ls.get(k) not in vs)(key, values))
        elif "!=" in part:
            key, value = part.split("!=", 1)
            rules.append((lambda k, v: lambda ls: ls.get(k) != v)(key.strip(), value.strip()))
        elif "=" in part:
            key, value = part.replace("==", "=").split("=", 1)
            rules.append((lambda k, v: lambda ls: ls.get(k) == v)(key.strip(), value.strip()))
        elif part.startswith("!"):
            rules.append((lambda k: lambda ls: k not in ls)(part[1:].strip()))
        else:
            rules.append((lambda k: lambda ls: k in ls)(part))
    return rules


def _selected(rules, obj: dict[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(rule(labels) for rule in rules)


def compress(indexes: set[int]) -> str:
    """A set of completion indexes in the Job status's compressed form: {0, 1, 2, 4} → "0-2,4"."""
    parts: list[str] = []
    for i in sorted(indexes):
        if parts and int(parts[-1].rpartition("-")[2]) == i - 1:
            parts[-1] = f"{parts[-1].partition('-')[0]}-{i}"
        else:
            parts.append(str(i))
    return ",".join(parts)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


if kmock is not None:

    def _error(status: int, reason: str, message: str, details: dict[str, Any] | None = None) -> "KubernetesError":
        return KubernetesError(status=status, reason=reason, message=message, details=details or {})

    RESOURCE_INFO: dict[str, dict[str, Any]] = {
        RUNS: dict(kind="SelfImproveRun", singular="selfimproverun", namespaced=True, shortnames={"sir"}, subresources={"status"}),
        JOBS: dict(kind="Job", singular="job", namespaced=True, subresources={"status"}),
        PODS: dict(kind="Pod", singular="pod", namespaced=True, subresources={"status", "log"}),
        EVENTS: dict(kind="Event", singular="event", namespaced=True),
        SECRETS: dict(kind="Secret", singular="secret", namespaced=True),
        SERVICES: dict(kind="Service", singular="service", namespaced=True, subresources={"status"}),
        "v1/namespaces": dict(kind="Namespace", singular="namespace", namespaced=False, subresources={"status"}),
        "kopf.dev/v1/kopfpeerings": dict(kind="KopfPeering", singular="kopfpeering", namespaced=True),
        "kopf.dev/v1/clusterkopfpeerings": dict(kind="ClusterKopfPeering", singular="clusterkopfpeering", namespaced=False),
        "apiextensions.k8s.io/v1/customresourcedefinitions": dict(
            kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False, subresources={"status"}),
    }

    @attrs.define(kw_only=True)
    class ApiServer(kmock.KubernetesEmulator):
        """kmock's emulator with API-server semantics (see the module's docstring)."""

        version: str = attrs.field(default=K8S_VERSIONS[-1])
        usage: dict[tuple[str, str], set[str]] = attrs.field(factory=dict, init=False)
        pruned: list[tuple[str, str, str]] = attrs.field(factory=list, init=False)  # (namespace, name, field)
        schemas: Any = attrs.field(default=None, init=False)      # k8s_schemas.OfficialSchemas of `version`
        crd: Any = attrs.field(default=None, init=False)          # the chart's CRD, as registered
        run_schema: Any = attrs.field(default=None, init=False)   # crd_semantics.CustomResourceSchema
        listeners: list[Callable[[str, Any, dict[str, Any]], None]] = attrs.field(factory=list, init=False)
        faults: list[dict[str, Any]] = attrs.field(factory=list, init=False)
        revision: int = attrs.field(default=0, init=False)
        # What each container printed, (namespace, pod, container) → lines: served by pods/log.
        logs: dict[tuple[str, str, str], list[str]] = attrs.field(factory=dict, init=False)
        _changed: asyncio.Condition = attrs.field(factory=asyncio.Condition, init=False)

        def __attrs_post_init__(self) -> None:
            super().__attrs_post_init__()
            for key, info in RESOURCE_INFO.items():
                self.resources[key] = ResourceInfo(verbs=VERBS, **info)
            from crd_semantics import CustomResourceSchema
            from k8s_schemas import schemas

            self.schemas = schemas(self.version)
            self.crd = yaml.safe_load(CRD_FILE.read_text())
            # Registering the CRD is the first thing a real server would validate.
            problems = self.schemas.causes(self.crd)
            if problems:
                raise AssertionError(f"Kubernetes {self.version} rejects the CRD {CRD_FILE.name}: "
                                     + "; ".join(map(str, problems)))
            self.run_schema = CustomResourceSchema(self.crd)

        # ------------------------------------------------------------ HTTP entry
        async def _handle(self, request):  # type: ignore[override]
            res = request.resource
            if res is None or res.plural is None:
                return await super()._handle(request)  # discovery, /version
            verb = self._verb(request)
            if str(request.headers.get("User-Agent", "")).startswith("kopf"):
                plural = res.plural + (f"/{request.subresource}" if request.subresource else "")
                self.usage.setdefault((res.group or "", plural), set()).add(verb)
            try:
                await self._fault(verb, res, request.subresource)
                if verb == "watch":
                    return await super()._handle(request)
                if verb == "get" and res.plural == "pods" and request.subresource == "log":
                    return self._pod_log(request.namespace, request.name, request.params)
                if verb == "list":
                    return web.json_response(self.list_objects(res, request.namespace, request.params.get("labelSelector")))
                if verb == "get":
                    return web.json_response(self.get_object(res, request.namespace, request.name))
                strict = request.params.get("fieldValidation") == "Strict"
                if verb == "create":
                    return web.json_response(await self.create_object(res, request.namespace, request.data, strict=strict),
                                             status=201)
                if verb in ("patch", "update"):
                    ctype = str(request.headers.get("Content-Type", "application/merge-patch+json"))
                    if verb == "update":
                        ctype = "update"
                    obj = await self.patch_object(res, request.namespace, request.name, request.data, ctype,
                                                  request.subresource, strict=strict)
                    return web.json_response(obj)
                if verb == "delete":
                    options = dict(request.data or {}) if isinstance(request.data, dict) else {}
                    if "propagationPolicy" in request.params:
                        options["propagationPolicy"] = request.params["propagationPolicy"]
                    return web.json_response(await self.delete_object(res, request.namespace, request.name, options))
                raise _error(405, "MethodNotAllowed", f"{verb} is not supported by the emulator")
            except KubernetesError as exc:
                return await self._render_error(exc)

        @staticmethod
        def _verb(request) -> str:
            method = str(request.method.value if hasattr(request.method, "value") else request.method).upper()
            action = getattr(request.action, "name", None)
            if method == "GET":
                return {"WATCH": "watch", "LIST": "list"}.get(action, "get" if request.name else "list")
            if method == "POST":
                return "create"
            if method == "PATCH":
                return "patch"
            if method == "PUT":
                return "update"
            if method == "DELETE":
                return "delete" if request.name else "deletecollection"
            return method.lower()

        # ------------------------------------------------------------ pods/log
        def write_log(self, namespace: str, pod: str, line: str, container: str = "worker") -> None:
            """The container prints `line` (what `pods/log` then serves)."""
            self.logs.setdefault((namespace, pod, container), []).append(line.rstrip("\n"))

        def _pod_log(self, namespace: str | None, name: str | None, params: Any):
            """`GET pods/{name}/log` as the API server answers it: text/plain, the container's
            output; `container` required when the pod has several; `tailLines`, `limitBytes`,
            `sinceSeconds` validated as integers (400 otherwise); 400 while the container waits to
            start, 404 for an unknown pod."""
            pod = self.get_object(PODS, namespace, name or "")  # 404 NotFound
            containers = [c["name"] for c in (pod.get("spec") or {}).get("containers") or []]
            container = params.get("container")
            if container is None:
                if len(containers) != 1:
                    raise _error(400, "BadRequest", f"a container name must be specified for pod {name}, "
                                 f"choose one of: {containers}")
                container = containers[0]
            if container not in containers:
                raise _error(400, "BadRequest", f"container {container} is not valid for pod {name}")
            numbers: dict[str, int] = {}
            for key, least in (("tailLines", 0), ("limitBytes", 1), ("sinceSeconds", 1)):
                if key in params:
                    try:
                        numbers[key] = int(params[key])
                    except ValueError:
                        raise _error(400, "BadRequest", f"{key}: invalid value {params[key]!r}") from None
                    if numbers[key] < least:
                        raise _error(422, "Invalid", f"PodLogOptions.{key}: must be greater than or equal to {least}")
            statuses = {c.get("name"): c for c in (pod.get("status") or {}).get("containerStatuses") or []}
            state = (statuses.get(container) or {}).get("state") or {}
            if "running" not in state and "terminated" not in state:
                waiting = (state.get("waiting") or {}).get("reason") or "ContainerCreating"
                raise _error(400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: {waiting}')
            lines = self.logs.get((namespace or "", name or "", container), [])
            if "tailLines" in numbers:
                lines = lines[len(lines) - numbers["tailLines"]:] if numbers["tailLines"] else []
            data = "".join(line + "\n" for line in lines).encode()
            if "limitBytes" in numbers:
                data = data[:numbers["limitBytes"]]
            return web.Response(body=data, content_type="text/plain", charset="utf-8")

        def inject_fault(self, verb: str, plural: str, status: int, reason: str, message: str = "injected",
                         times: int = 1, touch: tuple[str, str | None, str] | None = None) -> None:
            """Make the next `times` requests of `verb` on `plural` (e.g. "selfimproveruns/status")
            fail. `touch` (resource, namespace, name): first change that object, as a concurrent
            writer would (a real conflict: its resourceVersion moves on)."""
            self.faults.append(dict(verb=verb, plural=plural, status=status, reason=reason, message=message,
                                    times=times, touch=touch))

        async def _fault(self, verb: str, res, subresource: str | None) -> None:
            plural = res.plural + (f"/{subresource}" if subresource else "")
            for fault in self.faults:
                if fault["verb"] == verb and fault["plural"] == plural and fault["times"] > 0:
                    fault["times"] -= 1
                    if fault["touch"]:
                        resource, namespace, name = fault["touch"]
                        await self.patch_object(resource, namespace, name, {"metadata": {"annotations": {
                            "example.org/touched": str(self.revision)}}}, "merge")
                    raise _error(fault["status"], fault["reason"], fault["message"])

        # ------------------------------------------------------------ the store
        def _res(self, resource) -> Any:
            return resource if isinstance(resource, Resource) else Resource(resource)

        def _info(self, resource) -> ResourceInfo:
            return self.resources[resource]

        def _ns(self, resource, namespace: str | None) -> str | None:
            return namespace if self._info(resource).namespaced is not False else None

        def _current(self, key) -> dict[str, Any] | None:
            if key not in self.objects:
                return None
            obj = self.objects[key]
            return None if obj.deleted else obj.raw

        def _store(self, key, body: dict[str, Any] | None) -> None:
            if key not in self.objects:
                self.objects[key] = body
            elif body is None:
                self.objects[key].delete()
            else:
                self.objects[key].create(body)
            history = self.objects[key].history
            if len(history) > 2:
                del history[:-2]

        async def _emit(self, type_: str, resource, body: dict[str, Any]) -> None:
            await self._buses[resource].put({"type": type_, "object": body})
            for listener in list(self.listeners):
                listener(type_, resource, body)

        async def _notify(self) -> None:
            async with self._changed:
                self._changed.notify_all()

        # ------------------------------------------------------------ admission
        def _admit(self, resource, body: dict[str, Any], old: dict[str, Any] | None, strict: bool = False) -> dict[str, Any]:
            """`body` as a real server would store it, or the error it would answer."""
            info = self._info(resource)
            body = dict(body)
            body.setdefault("apiVersion", f"{resource.group}/{resource.version}".lstrip("/"))
            body.setdefault("kind", info.kind)
            name = (body.get("metadata") or {}).get("name") or ""
            group = resource.group or ""
            if resource == Resource(RUNS):
                stored, pruned, causes = self.run_schema.admit(body, old)
                if pruned and strict:
                    raise _error(400, "BadRequest", f'{info.kind} in version "{resource.version}" cannot be handled as a '
                                 f'{info.kind}: strict decoding error: ' + ", ".join(f'unknown field "{p}"' for p in pruned))
                ns = (body.get("metadata") or {}).get("namespace") or ""
                self.pruned.extend((ns, name, p) for p in pruned)
            elif self.schemas.knows(body["apiVersion"], body["kind"]):
                if info.kind == "Secret" and "stringData" in body:
                    data = dict(body.get("data") or {})
                    for k, v in (body.pop("stringData") or {}).items():
                        data[k] = base64.b64encode(str(v).encode()).decode()
                    body["data"] = data
                stored, causes = body, self.schemas.causes(body)
                unknown = [c for c in causes if c.message.startswith("unknown field")]
                if unknown:
                    raise _error(400, "BadRequest", f'{info.kind} in version "{resource.version}" cannot be handled as a '
                                 f'{info.kind}: strict decoding error: ' + ", ".join(c.message for c in unknown))
            else:
                return body  # kopf's peering objects: no schema the tests know
            if causes:
                from crd_semantics import invalid_message

                raise _error(422, "Invalid", invalid_message(info.kind, group, name, causes), {
                    "name": name, "group": group, "kind": info.kind, "causes": [c.wire() for c in causes]})
            return stored

        def _bump(self) -> str:
            self.revision += 1
            return str(self.revision)

        def get_object(self, resource, namespace: str | None, name: str) -> dict[str, Any]:
            resource = self._res(resource)
            body = self._current((resource, self._ns(resource, namespace), name))
            if body is None:
                raise _error(404, "NotFound", f'{resource.plural} "{name}" not found')
            return body

        def find(self, resource, namespace: str | None = None, selector: str | None = None) -> list[dict[str, Any]]:
            resource, rules = self._res(resource), _selector(selector)
            out = []
            for (res, ns, _), obj in self.objects.items():
                if res == resource and not obj.deleted and (namespace is None or ns == namespace) and _selected(rules, obj.raw):
                    out.append(obj.raw)
            return sorted(out, key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))

        def list_objects(self, resource, namespace: str | None, selector: str | None) -> dict[str, Any]:
            resource = self._res(resource)
            return {
                "apiVersion": f"{resource.group}/{resource.version}".lstrip("/"),
                "kind": f"{self._info(resource).kind}List",
                "metadata": {"resourceVersion": str(self.revision)},
                "items": self.find(resource, namespace, selector),
            }

        async def create_object(self, resource, namespace: str | None, body: dict[str, Any], strict: bool = False) -> dict[str, Any]:
            resource = self._res(resource)
            body = dict(body)
            meta = body["metadata"] = dict(body.get("metadata") or {})
            namespace = self._ns(resource, namespace or meta.get("namespace"))
            async with self._lock:
                if not meta.get("name"):
                    if not meta.get("generateName"):
                        raise _error(422, "Invalid", "metadata.name or metadata.generateName is required")
                    meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
                key = (resource, namespace, meta["name"])
                if self._current(key) is not None:
                    raise _error(409, "AlreadyExists", f'{resource.plural} "{meta["name"]}" already exists')
                if namespace is not None:
                    meta["namespace"] = namespace
                meta.update(uid=str(uuid.uuid4()), resourceVersion=self._bump(), generation=1, creationTimestamp=_now())
                if "status" in self._info(resource).subresources:
                    body.pop("status", None)
                body = self._admit(resource, body, None, strict)
                self._store(key, body)
                await self._emit("ADDED", resource, body)
            await self._notify()
            return body

        async def patch_object(self, resource, namespace: str | None, name: str, patch: Any, content_type: str,
                               subresource: str | None = None, strict: bool = False) -> dict[str, Any]:
            import jsonpatch

            resource = self._res(resource)
            key = (resource, self._ns(resource, namespace), name)
            async with self._lock:
                old = self._current(key)
                if old is None:
                    raise _error(404, "NotFound", f'{resource.plural} "{name}" not found')
                rv = old["metadata"].get("resourceVersion")
                if "json-patch" in content_type:
                    if not isinstance(patch, list):
                        raise _error(400, "BadRequest", "a JSON patch must be a list of operations")
                    try:
                        new = jsonpatch.apply_patch(old, patch)  # works on a copy
                    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                        raise _error(422, "Invalid", f"the server rejected our request due to an error in our request: {exc}") from None
                else:
                    if not isinstance(patch, dict):
                        raise _error(400, "BadRequest", "a merge patch must be an object")
                    wanted = (patch.get("metadata") or {}).get("resourceVersion")
                    if wanted is not None and wanted != rv:
                        raise _error(409, "Conflict", f'Operation cannot be fulfilled on {resource.plural} "{name}": '
                                                      "the object has been modified; please apply your changes to the latest version and try again")
                    if content_type == "update":
                        new = copy.deepcopy(patch)
                    elif content_type == "replace-status":  # the fake kubelet writes whole statuses
                        new = {**old, "status": patch.get("status")}
                    else:
                        new = merge_patch(old, patch)
                if subresource == "status":
                    base = dict(old)
                    if "status" in new:
                        base["status"] = new["status"]
                    else:
                        base.pop("status", None)
                    new = base
                elif "status" in self._info(resource).subresources:
                    new = dict(new)
                    if "status" in old:
                        new["status"] = old["status"]
                    else:
                        new.pop("status", None)
                # Stored versions are never changed in place (events of older versions may still
                # wait to be streamed), so the metadata gets its own dict before it is edited.
                new = dict(new)
                meta = new["metadata"] = dict(new.get("metadata") or {})
                for fixed in ("uid", "creationTimestamp", "namespace", "name", "generation", "resourceVersion"):
                    if fixed in old["metadata"]:
                        meta[fixed] = old["metadata"][fixed]
                new = self._admit(resource, new, old, strict)
                meta = new["metadata"] = dict(new["metadata"])
                if new == old:
                    return old  # a no-op changes nothing, not even the resourceVersion
                if subresource is None and new.get("spec") != old.get("spec"):
                    meta["generation"] = int(old["metadata"].get("generation") or 0) + 1
                meta["resourceVersion"] = self._bump()
                if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                    await self._remove(resource, key, new, "Background")
                else:
                    self._store(key, new)
                    await self._emit("MODIFIED", resource, new)
            await self._notify()
            return new

        async def delete_object(self, resource, namespace: str | None, name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
            resource = self._res(resource)
            key = (resource, self._ns(resource, namespace), name)
            options = options or {}
            # The REST default for batch/v1 Jobs is to orphan their pods (kubectl asks for
            # background deletion explicitly); everything else cascades in the background.
            propagation = options.get("propagationPolicy") or ("Orphan" if resource.plural == "jobs" else "Background")
            async with self._lock:
                old = self._current(key)
                if old is None:
                    raise _error(404, "NotFound", f'{resource.plural} "{name}" not found')
                if old["metadata"].get("finalizers"):
                    if not old["metadata"].get("deletionTimestamp"):
                        new = {**old, "metadata": {**old["metadata"], "deletionTimestamp": _now(), "resourceVersion": self._bump()}}
                        self._store(key, new)
                        await self._emit("MODIFIED", resource, new)
                        old = new
                else:
                    gone = {**old, "metadata": {**old["metadata"], "resourceVersion": self._bump()}}
                    await self._remove(resource, key, gone, propagation)
            await self._notify()
            return old

        async def _remove(self, resource, key, body: dict[str, Any], propagation: str) -> None:
            """Delete for real, then what the garbage collector does for the dependents."""
            self._store(key, None)
            await self._emit("DELETED", resource, body)
            uid = body["metadata"].get("uid")
            for dkey, obj in list(self.objects.items()):
                if obj.deleted:
                    continue
                refs = (obj.raw.get("metadata") or {}).get("ownerReferences") or []
                if not any(r.get("uid") == uid for r in refs):
                    continue
                dependent = {**obj.raw, "metadata": {**obj.raw["metadata"], "resourceVersion": self._bump()}}
                if propagation == "Orphan":
                    dependent["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                    self._store(dkey, dependent)
                    await self._emit("MODIFIED", dkey[0], dependent)
                else:
                    await self._remove(dkey[0], dkey, dependent, "Background")

        # ------------------------------------------------------------ watch
        async def _serve_watch(self, request):  # type: ignore[override]
            yield b""  # headers first: the stream is open even if nothing happens
            rules = _selector(request.params.get("labelSelector"))
            bus = self._buses[request.resource]
            async with self._lock:
                # Subscribe and snapshot atomically: nothing written in between is lost.
                marker = await bus.mark()
                initial = [{"type": "ADDED", "object": o} for o in self.find(request.resource, request.namespace)
                           if _selected(rules, o)]
            try:
                for event in initial:
                    yield event
                async for event in bus.stream(since=marker):
                    obj = event.get("object") or {}
                    ns = (obj.get("metadata") or {}).get("namespace")
                    if (request.namespace is None or ns == request.namespace) and _selected(rules, obj):
                        yield event
            finally:
                await bus.unmark(marker)

        # ------------------------------------------------------------ for tests
        async def wait_for(self, predicate: Callable[[], Any], timeout: float = 15.0, what: str = "a condition") -> Any:
            """Until `predicate()` is truthy; re-checked after every write (no polling)."""
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            async with self._changed:
                while True:
                    result = predicate()
                    if result:
                        return result
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise AssertionError(f"timed out after {timeout}s waiting for {what}")
                    try:
                        await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
                    except TimeoutError:
                        pass

        def usage_table(self) -> list[dict[str, Any]]:
            return [{"group": g, "resource": r, "verbs": sorted(v)} for (g, r), v in sorted(self.usage.items())]

        def run(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
            return self._current((Resource(RUNS), namespace, name))

        def status(self, name: str, namespace: str = "default") -> dict[str, Any]:
            return (self.run(name, namespace) or {}).get("status") or {}

        def jobs(self, run: str | None = None, namespace: str | None = "default") -> list[dict[str, Any]]:
            return self.find(JOBS, namespace, f"selfimprove.dev/run={run}" if run else None)

        def events(self, name: str | None = None, namespace: str | None = "default") -> list[dict[str, Any]]:
            events = self.find(EVENTS, namespace)
            return [e for e in events if name is None or e.get("involvedObject", {}).get("name") == name]


# =========================================================================== the fake cluster
@dataclass
class Succeed:
    metrics: dict[str, Any] | None = None
    outputs: dict[str, str] | None = None
    seconds: float = 0.0      # how long the "worker" runs


@dataclass
class Fail:
    exit_code: int = 1
    container_reason: str = "Error"       # OOMKilled, Error
    summary: dict[str, Any] | None = None  # fields of a failed StageResult written by the "worker"
    log: str | None = "Traceback (most recent call last):\nConnectionResetError: connection reset by peer"
    job_reason: str = "BackoffLimitExceeded"   # DeadlineExceeded, PodFailurePolicy
    seconds: float = 0.0      # how long the "worker" runs before failing


@dataclass
class Hold:
    """Keep the pod running until `cluster.release(job, then)`."""

    then: Any = None


@dataclass
class Preempt:
    then: Any = field(default_factory=Succeed)


@dataclass
class Pending:
    """A pod that never starts: an image pull error or an unschedulable pod."""

    reason: str = "ImagePullBackOff"
    message: str = 'Back-off pulling image "registry.invalid/worker:1"'


@dataclass
class Indexed:
    """The scripts of an Indexed Job's pods: `pods[k]` lists the scripts of completion index k's
    successive pods (the last one repeats); an index not listed runs `default`."""

    pods: dict[int, list[Any]] = field(default_factory=dict)
    default: Any = field(default_factory=Succeed)

    def script(self, index: int, tries: int) -> Any:
        scripts = self.pods.get(index) or [self.default]
        return scripts[min(tries, len(scripts) - 1)]


def default_metrics(stage: str, round_no: int) -> dict[str, Any]:
    return {
        "sample": {"paths": 64, "questions": 2, "meanConfidence": 0.8},
        "filter": {"kept": 40},
        "train": {"trainLoss": 0.3},
        "evaluate": {"accuracy": round(0.3 + 0.1 * round_no, 4)},
        "augment": {"augmented": 3},
    }[stage]


class FakeCluster:
    """Plays the kubelet and the Job controller for the stage Jobs the operator creates."""

    def __init__(self, server: "ApiServer", s3: Any = None):
        self.server = server
        self.s3 = s3
        self.scripts: dict[str, Any] = {}          # job name → script (default: Succeed)
        self.policy: Callable[[str, Any], Any] | None = None
        self.tasks: dict[str, asyncio.Task] = {}
        self.released: dict[str, asyncio.Future] = {}
        self.completed_at: dict[str, float] = {}   # job name → loop time it finished
        self.created_at: dict[str, float] = {}     # job name → loop time it was created
        self.pods_started = 0
        self.errors: list[BaseException] = []     # what the fake cluster itself failed at
        # A sharded stage's shard _SUCCESS markers, by output prefix: what a worker lists in storage
        # to decide whether it merges (it outlives the attempt, as storage does).
        self.shard_markers: dict[str, set[int]] = {}
        server.listeners.append(self._on_change)

    def close(self) -> None:
        self.server.listeners.remove(self._on_change)
        for task in self.tasks.values():
            task.cancel()

    def _on_change(self, type_: str, resource, body: dict[str, Any]) -> None:
        if resource.plural != "jobs":
            return
        name = body["metadata"]["name"]
        if type_ == "DELETED":
            task = self.tasks.pop(name, None)
            if task is not None:
                task.cancel()
            return
        if type_ == "ADDED":
            self.created_at[name] = asyncio.get_running_loop().time()
        if name in self.tasks or (body.get("spec") or {}).get("suspend"):
            return
        if (body.get("status") or {}).get("conditions"):
            return
        self.tasks[name] = task = asyncio.create_task(self._run(body))
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        # A write the API server refuses is a bug of the fake cluster (or of the Job it runs):
        # the test fails at teardown instead of timing out silently.
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(task.exception())

    def release(self, job: str, then: Any = None) -> None:
        self.released.setdefault(job, asyncio.get_running_loop().create_future())
        if not self.released[job].done():
            self.released[job].set_result(then or Succeed())

    def script_for(self, job: dict[str, Any], task) -> Any:
        name = job["metadata"]["name"]
        if name in self.scripts:
            return self.scripts[name]
        if self.policy is not None:
            script = self.policy(name, task)
            if script is not None:
                return script
        return Succeed()

    async def _run(self, job: dict[str, Any]) -> None:
        from selfimprove_workers.contract import StageTask

        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        task = StageTask.model_validate_json(job["spec"]["template"]["spec"]["containers"][0]["args"][0])
        if job["spec"].get("completionMode") == "Indexed":
            return await self._run_indexed(job, task)
        await self.server.patch_object(JOBS, ns, name, {"status": {"active": 1, "startTime": _now()}}, "merge", "status")
        script = self.script_for(job, task)
        while True:
            pod = await self._new_pod(job)
            if isinstance(script, Pending):
                cs = {"name": "worker", "ready": False, "restartCount": 0,
                      "state": {"waiting": {"reason": script.reason, "message": script.message}}}
                conditions = []
                if script.reason == "Unschedulable":
                    cs = None
                    conditions = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                   "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]
                status = {"phase": "Pending", "conditions": conditions}
                if cs:
                    status["containerStatuses"] = [cs]
                await self._pod_status(ns, pod, status)
                script = await self._released(name)
                continue
            started = _now()
            self.pods_started += 1
            await self._pod_status(ns, pod, {"phase": "Running", "startTime": started, "containerStatuses": [
                {"name": "worker", "ready": True, "restartCount": 0, "state": {"running": {"startedAt": started}}}]})
            if isinstance(script, Hold):
                script = script.then or await self._released(name)
            if isinstance(script, Preempt):
                await self._pod_status(ns, pod, {
                    "phase": "Failed",
                    "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                                    "message": "Preempted in order to admit critical pod"}],
                    "containerStatuses": [{"name": "worker", "ready": False, "restartCount": 0, "state": {"terminated": {
                        "exitCode": 143, "reason": "Error", "startedAt": started, "finishedAt": _now()}}}]})
                script = script.then  # the Job's pod failure policy ignores it: a new pod, no failure counted
                continue
            break
        if isinstance(script, Succeed):
            if script.seconds:
                await asyncio.sleep(script.seconds)
            summary = await self._result(task, script)
            await self._pod_status(ns, pod, {"phase": "Succeeded", "containerStatuses": [
                {"name": "worker", "ready": False, "restartCount": 0, "state": {"terminated": {
                    "exitCode": 0, "reason": "Completed", "message": summary, "startedAt": started, "finishedAt": _now()}}}]})
            now = _now()
            self.completed_at[name] = asyncio.get_running_loop().time()
            await self.server.patch_object(JOBS, ns, name, {"status": {
                "active": 0, "succeeded": 1, "completionTime": now,
                "conditions": [
                    {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": now},
                    {"type": "Complete", "status": "True", "lastTransitionTime": now},
                ]}}, "merge", "status")
        elif isinstance(script, Fail):
            message = script.log
            if script.summary is not None:
                from selfimprove_workers.contract import StageResult

                message = StageResult(stage=task.stage, round=task.round, status="Failed", **script.summary).summary_json()
            term = {"exitCode": script.exit_code, "reason": script.container_reason, "startedAt": started, "finishedAt": _now()}
            if message:
                term["message"] = message
            await self._pod_status(ns, pod, {"phase": "Failed", "containerStatuses": [
                {"name": "worker", "ready": False, "restartCount": 0, "state": {"terminated": term}}]})
            now = _now()
            self.completed_at[name] = asyncio.get_running_loop().time()
            await self.server.patch_object(JOBS, ns, name, {"status": {
                "active": 0, "failed": 1,
                "conditions": [
                    {"type": "FailureTarget", "status": "True", "reason": script.job_reason, "lastTransitionTime": now},
                    {"type": "Failed", "status": "True", "reason": script.job_reason, "lastTransitionTime": now,
                     "message": "Job has reached the specified backoff limit" if script.job_reason == "BackoffLimitExceeded"
                     else "Job was active longer than specified deadline" if script.job_reason == "DeadlineExceeded"
                     else f"Container worker for pod {ns}/{pod} failed with exit code {script.exit_code} matching FailJob rule at index 1"},
                ]}}, "merge", "status")

    async def _run_indexed(self, job: dict[str, Any], task) -> None:
        """The Job controller's Indexed mode: one pod per completion index, in parallel, pod k
        with JOB_COMPLETION_INDEX=k; `completedIndexes` in the status. With backoffLimitPerIndex
        an index is retried up to that many times and marked in `failedIndexes` after, the others
        run on, and the Job fails (FailedIndexes) once every index finished; without it, a failure
        beyond backoffLimit fails the Job at once and its running pods are deleted."""
        ns, name, spec = job["metadata"]["namespace"], job["metadata"]["name"], job["spec"]
        nodes = task.nodes > 1
        indexes = (list(range(task.nodes)) if nodes else
                   task.shard_indexes if task.shard_indexes is not None else list(range(task.shards)))
        assert spec["completions"] == spec["parallelism"] == len(indexes), spec
        rendezvous: str | None = None
        if nodes:
            # Multi-node training: the nodes find node 0 through the headless Service named by
            # the pods' subdomain, selecting them; without it they time out at the rendezvous.
            rendezvous = await self._node_service(job)
        script = self.script_for(job, task)
        scripts = script if isinstance(script, Indexed) else Indexed(default=script)
        per_index = spec.get("backoffLimitPerIndex")
        completed: set[int] = set()
        failed: set[int] = set()
        failures = 0
        pods: dict[int, str] = {}
        job_failed = asyncio.Event()
        await self.server.patch_object(JOBS, ns, name, {"status": {"active": len(indexes), "startTime": _now()}}, "merge", "status")

        async def job_status(**extra: Any) -> None:
            status: dict[str, Any] = {"active": len(indexes) - len(completed) - len(failed), "succeeded": len(completed),
                                      "failed": failures, "completedIndexes": compress(completed), **extra}
            if per_index is not None:
                status["failedIndexes"] = compress(failed)
            await self.server.patch_object(JOBS, ns, name, {"status": status}, "merge", "status")

        async def run_index(k: int) -> None:
            nonlocal failures
            shard = indexes[k]
            tries = 0
            while True:
                step = scripts.script(k, tries)
                assert isinstance(step, (Succeed, Fail)), f"{name} index {k}: an Indexed Job's pods run Succeed or Fail, not {step!r}"
                if nodes and rendezvous is not None:
                    step = Fail(log=f"RendezvousTimeoutError: {rendezvous}")
                pods[k] = pod = await self._new_pod(job, index=k)
                started = _now()
                self.pods_started += 1
                await self._pod_status(ns, pod, {"phase": "Running", "startTime": started, "containerStatuses": [
                    {"name": "worker", "ready": True, "restartCount": 0, "state": {"running": {"startedAt": started}}}]})
                if step.seconds:
                    await asyncio.sleep(step.seconds)
                if isinstance(step, Succeed) and nodes:
                    # Every node reports the one committed result (global rank 0's node commits).
                    summary = await self._result(task, step, shard=None)
                    await self._pod_status(ns, pod, {"phase": "Succeeded", "containerStatuses": [
                        {"name": "worker", "ready": False, "restartCount": 0, "state": {"terminated": {
                            "exitCode": 0, "reason": "Completed", "message": summary, "startedAt": started, "finishedAt": _now()}}}]})
                    completed.add(k)
                    await job_status()
                    return
                if isinstance(step, Succeed):
                    marks = self.shard_markers.setdefault(task.output, set())
                    marks.add(shard)
                    # The worker merges when it sees every shard's marker (the last one to finish does).
                    merged = len(marks) == task.shards
                    summary = await self._result(task, step, shard=None if merged else shard)
                    await self._pod_status(ns, pod, {"phase": "Succeeded", "containerStatuses": [
                        {"name": "worker", "ready": False, "restartCount": 0, "state": {"terminated": {
                            "exitCode": 0, "reason": "Completed", "message": summary, "startedAt": started, "finishedAt": _now()}}}]})
                    completed.add(k)
                    await job_status()
                    return
                term = {"exitCode": step.exit_code, "reason": step.container_reason, "startedAt": started, "finishedAt": _now()}
                if step.log:
                    term["message"] = step.log
                await self._pod_status(ns, pod, {"phase": "Failed", "containerStatuses": [
                    {"name": "worker", "ready": False, "restartCount": 0, "state": {"terminated": term}}]})
                failures += 1
                tries += 1
                if per_index is not None:
                    if tries > per_index:
                        failed.add(k)
                        await job_status()
                        return
                    await job_status()
                    continue
                if failures > spec.get("backoffLimit", 6):
                    failed.add(k)
                    job_failed.set()
                    return
                await job_status()

        runners = {k: asyncio.create_task(run_index(k)) for k in range(len(indexes))}
        waiter = asyncio.create_task(job_failed.wait())
        waiting: set[asyncio.Task] = {waiter, *runners.values()}
        while not job_failed.is_set() and not all(r.done() for r in runners.values()):
            _, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        for runner in runners.values():
            if runner.done() and runner.exception() is not None:
                raise runner.exception()  # type: ignore[misc]
        now = _now()
        self.completed_at[name] = asyncio.get_running_loop().time()
        if job_failed.is_set():
            for k, runner in runners.items():
                if not runner.done():
                    runner.cancel()
                    await self.server.delete_object(PODS, ns, pods[k])
            reason, message = "BackoffLimitExceeded", "Job has reached the specified backoff limit"
        elif failed:
            reason, message = "FailedIndexes", "Job has failed indexes"
        else:
            await job_status(active=0, completionTime=now, conditions=[
                {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": now},
                {"type": "Complete", "status": "True", "lastTransitionTime": now}])
            return
        await job_status(active=0, conditions=[
            {"type": "FailureTarget", "status": "True", "reason": reason, "lastTransitionTime": now},
            {"type": "Failed", "status": "True", "reason": reason, "lastTransitionTime": now, "message": message}])

    async def _node_service(self, job: dict[str, Any], timeout: float = 15.0) -> str | None:
        """None once the Service of the pods' subdomain exists, is headless and selects this Job's
        pods (by `batch.kubernetes.io/job-name`, which the Job controller sets); else why not."""
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        subdomain = job["spec"]["template"]["spec"].get("subdomain")
        if not subdomain:
            return f"{name}: the pods have no subdomain, so node 0 has no DNS name"
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = [s for s in self.server.find(SERVICES, ns) if s["metadata"]["name"] == subdomain]
            if found:
                svc = found[0]["spec"]
                pod_labels = {**job["spec"]["template"]["metadata"]["labels"], "batch.kubernetes.io/job-name": name}
                selector = svc.get("selector") or {}
                if svc.get("clusterIP") != "None":
                    return f"Service {subdomain} is not headless"
                if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
                    return f"Service {subdomain} does not select the pods of {name}"
                return None
            if asyncio.get_running_loop().time() > deadline:
                return f"no Service {subdomain}: {name}-0.{subdomain} does not resolve"
            await asyncio.sleep(0.05)

    async def _released(self, job: str) -> Any:
        fut = self.released.setdefault(job, asyncio.get_running_loop().create_future())
        return await fut

    async def _new_pod(self, job: dict[str, Any], index: int | None = None) -> str:
        meta = job["metadata"]
        template = job["spec"]["template"]
        labels = dict(template["metadata"]["labels"])
        labels.update({"batch.kubernetes.io/job-name": meta["name"], "job-name": meta["name"],
                       "batch.kubernetes.io/controller-uid": meta["uid"], "controller-uid": meta["uid"]})
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "generateName": meta["name"] + "-", "namespace": meta["namespace"], "labels": labels,
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"],
                                     "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": copy.deepcopy(template["spec"]),
        }
        if index is not None:
            # What the Job controller adds to an Indexed Job's pods: the index as an annotation,
            # a label (1.28+), and JOB_COMPLETION_INDEX from the annotation in every container.
            key = "batch.kubernetes.io/job-completion-index"
            pod["metadata"]["generateName"] = f"{meta['name']}-{index}-"
            pod["metadata"]["annotations"] = {key: str(index)}
            labels[key] = str(index)
            for container in pod["spec"]["containers"]:
                container.setdefault("env", []).append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {
                    "fieldRef": {"fieldPath": f"metadata.annotations['{key}']"}}})
        created = await self.server.create_object(PODS, meta["namespace"], pod)
        await self._pod_status(meta["namespace"], created["metadata"]["name"], {"phase": "Pending"})
        return created["metadata"]["name"]

    async def _pod_status(self, ns: str, pod: str, status: dict[str, Any]) -> None:
        # What the kubelet reports of a container always names its image (the API requires both).
        image = self.server.get_object(PODS, ns, pod)["spec"]["containers"][0]["image"]
        for cs in status.get("containerStatuses") or []:
            cs.setdefault("image", image)
            cs.setdefault("imageID", "" if "waiting" in (cs.get("state") or {}) else f"{image}@sha256:{'0' * 64}")
        await self.server.patch_object(PODS, ns, pod, {"status": status}, "replace-status", "status")

    async def _result(self, task, script: Succeed, shard: int | None = None) -> str:
        from selfimprove_workers.contract import StageResult, full_result

        metrics = script.metrics if script.metrics is not None else default_metrics(task.stage.value, task.round)
        outputs = dict(script.outputs or {})
        if task.stage.value == "train":
            outputs.setdefault("adapter", task.uri("adapter/"))
        result = StageResult(stage=task.stage, round=task.round, status="Succeeded", metrics=metrics, outputs=outputs,
                             started_at=_now(), finished_at=_now(), shard=shard, shards=task.shards)
        if shard is None and self.s3 is not None and task.output.startswith("s3://"):
            await asyncio.to_thread(self._write_artifacts, task, result, full_result(result))
        return result.summary_json()

    def _write_artifacts(self, task, result, full: dict[str, Any]) -> None:
        """What a worker leaves in storage: its files, result.json, then _SUCCESS last."""
        bucket, _, prefix = task.output[len("s3://"):].partition("/")
        client = self.s3.client()
        names = {"sample": ["samples.jsonl", "votes.jsonl"], "filter": ["kept.jsonl"], "train": ["adapter/adapter_config.json"],
                 "evaluate": ["predictions.jsonl"], "augment": ["augmented.jsonl"]}[task.stage.value]
        for n in names:
            client.put_object(Bucket=bucket, Key=prefix + n, Body=b'{"stub": true}\n')
        client.put_object(Bucket=bucket, Key=prefix + "result.json", Body=json.dumps(full).encode())
        client.put_object(Bucket=bucket, Key=prefix + "_SUCCESS", Body=json.dumps({"task": task.digest(), "files": names}).encode())


# =========================================================================== fixtures
# The fixtures exist without kmock too: they skip (or fail in CI) through need_kmock().


@async_fixture(params=K8S_VERSIONS, ids=lambda v: f"k8s-{v}")
async def k8s(request: pytest.FixtureRequest) -> "ApiServer":
    need_kmock()
    server = ApiServer(version=request.param)
    async with server, kmock.Server(server):
        await server.create_object("kopf.dev/v1/clusterkopfpeerings", None, {
            "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING_NAME}})
        await server.create_object(SECRETS, "default", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
            "stringData": {"AWS_ACCESS_KEY_ID": "AKIA-TEST-ONLY", "AWS_SECRET_ACCESS_KEY": "very-secret-value-8c1f"}})
        yield server


@pytest.fixture
def kubeconfig(k8s: "ApiServer", tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": str(k8s.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"}}],
        "current-context": "kmock",
    }))
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


@async_fixture
async def cluster(k8s: "ApiServer") -> "FakeCluster":
    fake = FakeCluster(k8s)
    yield fake
    fake.close()
    if fake.errors:
        raise AssertionError(f"the fake cluster's writes failed: {fake.errors!r}") from fake.errors[0]


class OperatorHandle:
    """The operator in a thread with its own event loop, as in its own process: kopf owns its
    loop (when it stops, it cancels every task the loop runs besides its caller), and the
    emulator keeps serving in the test's loop meanwhile."""

    def __init__(self, config: Any):
        from selfimprove_operator.k8s.controller import Controller

        self.config = config
        self.controller = Controller(config)
        self.ready = threading.Event()
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="operator", daemon=True)

    def _main(self) -> None:
        from selfimprove_operator.k8s.handlers import operator

        try:
            asyncio.run(operator(self.config, controller=self.controller, stop_flag=self.stop_flag,
                                 ready_flag=self.ready, settings_hook=_test_settings))
        except BaseException as exc:  # noqa: BLE001 - reported by start()/stop()
            self.error = exc
            self.ready.set()

    async def start(self) -> "OperatorHandle":
        self.thread.start()
        await asyncio.to_thread(self.ready.wait, 20)
        if self.error is not None:
            raise self.error
        return self

    async def stop(self) -> None:
        if self.thread.is_alive():
            self.stop_flag.set()
            await asyncio.to_thread(self.thread.join, 30)
        if self.error is not None:
            raise self.error


def _test_settings(settings: Any) -> None:
    # Never SIGKILL the test process when an operator thread is torn down ungracefully.
    settings.process.ultimate_exiting_timeout = None


TEST_SETTINGS = dict(
    metrics_port=None, liveness_endpoint=None, pending_timeout=1.0, result_grace=5.0,
    reconcile_backoff=0.2, reconcile_max_backoff=2.0, workers=4, watch_server_timeout=120.0,
    watch_client_timeout=150.0, watch_connect_timeout=5.0, request_timeout=10.0,
    reporting_instance="test-operator", worker_image="ghcr.io/selfimprove/worker:test",
    progress_interval=1.0,
)


@async_fixture
async def start_operator(k8s: "ApiServer", kubeconfig: Path) -> Iterator[Callable[..., Any]]:
    from selfimprove_operator.k8s.config import OperatorConfig

    handles: list[OperatorHandle] = []

    async def start(**overrides: Any) -> OperatorHandle:
        handle = OperatorHandle(OperatorConfig(**{**TEST_SETTINGS, **overrides}))
        handles.append(handle)
        return await handle.start()

    yield start
    for handle in handles:
        await handle.stop()
