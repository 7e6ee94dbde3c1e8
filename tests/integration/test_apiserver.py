"""The strict test API server answers as a real one would (tests/k8s_fixtures.py, k8s_schemas.py,
crd_semantics.py), over HTTP, for the oldest and the newest supported Kubernetes version; and
what the operator writes survives it: every status the planner produces is stored unpruned, and
every `kubectl get sir` column resolves to the intended value."""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any

import pytest
from k8s_fixtures import RUNS, need_kmock, run_manifest

pytestmark = [pytest.mark.k8s]


@pytest.fixture(autouse=True)
def _kmock_required():
    need_kmock()


async def call(k8s, method: str, path: str, body: Any = None, content_type: str = "application/json",
               params: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.request(method, str(k8s.url).rstrip("/") + path, json=body, params=params,
                                   headers={"Content-Type": content_type}) as response:
            return response.status, await response.json()


RUNS_PATH = "/apis/selfimprove.dev/v1alpha1/namespaces/default/selfimproveruns"
JOBS_PATH = "/apis/batch/v1/namespaces/default/jobs"
MERGE = "application/merge-patch+json"


def job(**spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "w", "image": "busybox"}]}}},
    }
    body["spec"].update(spec)
    return body


# =========================================================================== built-in kinds
@pytest.mark.asyncio
async def test_a_job_with_a_schema_error_is_422_with_the_field_path(k8s):
    bad = job(backoffLimit="six")
    bad["spec"]["template"]["spec"]["containers"][0].pop("name")
    status, body = await call(k8s, "POST", JOBS_PATH, bad)
    assert status == 422
    assert (body["kind"], body["status"], body["reason"], body["code"]) == ("Status", "Failure", "Invalid", 422)
    assert body["message"].startswith('Job.batch "j" is invalid: [')
    assert body["details"]["name"] == "j" and body["details"]["group"] == "batch" and body["details"]["kind"] == "Job"
    causes = {c["field"]: c for c in body["details"]["causes"]}
    assert causes["spec.backoffLimit"]["reason"] == "FieldValueTypeInvalid"
    assert causes["spec.template.spec.containers[0].name"] == {
        "reason": "FieldValueRequired", "message": "Required value", "field": "spec.template.spec.containers[0].name"}
    assert not k8s.jobs()  # nothing stored


@pytest.mark.asyncio
async def test_an_unknown_field_of_a_builtin_is_a_strict_decoding_error(k8s):
    bad = job()
    bad["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    status, body = await call(k8s, "POST", JOBS_PATH, bad)
    assert status == 400 and body["reason"] == "BadRequest"
    assert 'strict decoding error: unknown field "spec.template.spec.containers[0].gpus"' in body["message"]


@pytest.mark.asyncio
async def test_fields_differ_between_versions(k8s):
    # Job.spec.managedBy exists from 1.30 on: the oldest supported server does not know it.
    status, body = await call(k8s, "POST", JOBS_PATH, job(managedBy="kueue.x-k8s.io/multikueue"))
    if k8s.version == "1.27":
        assert status == 400 and 'unknown field "spec.managedBy"' in body["message"]
    else:
        assert status == 201 and body["spec"]["managedBy"] == "kueue.x-k8s.io/multikueue"


@pytest.mark.asyncio
async def test_secret_string_data_is_stored_as_data(k8s):
    status, body = await call(k8s, "POST", "/api/v1/namespaces/default/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "v"}})
    assert status == 201 and body["data"] == {"k": "dg=="} and "stringData" not in body


# =========================================================================== SelfImproveRuns
@pytest.mark.asyncio
async def test_schema_errors_of_a_run_name_their_fields(k8s):
    bad = run_manifest("bad", sampling={"paths": 0}, rounds={"max": "three"})
    bad["spec"]["strategy"] = "rlhf"
    status, body = await call(k8s, "POST", RUNS_PATH, bad)
    assert status == 422 and body["reason"] == "Invalid"
    assert body["message"].startswith('SelfImproveRun.selfimprove.dev "bad" is invalid: [')
    causes = {c["field"]: c for c in body["details"]["causes"]}
    assert causes["spec.sampling.paths"]["message"] == (
        "Invalid value: 0: spec.sampling.paths in body should be greater than or equal to 1")
    assert causes["spec.rounds.max"]["reason"] == "FieldValueTypeInvalid"
    assert causes["spec.strategy"]["reason"] == "FieldValueNotSupported"
    assert '"lmsi", "iwsi", "llm2llm"' in causes["spec.strategy"]["message"]


@pytest.mark.asyncio
async def test_cel_rules_of_the_crd_are_enforced(k8s):
    # Exactly one kind per filter (a CEL rule on the items).
    two = run_manifest("two", filters=[{"consistency": {"threshold": 0.5}, "entropy": {"keep": 0.5}}])
    status, body = await call(k8s, "POST", RUNS_PATH, two)
    assert status == 422
    [cause] = body["details"]["causes"]
    assert cause["field"] == "spec.filters[0]" and "set exactly one of" in cause["message"]
    # The run name bound (a rule at the root, on metadata.name).
    status, body = await call(k8s, "POST", RUNS_PATH, run_manifest("x" * 41))
    assert status == 422 and body["details"]["causes"][0]["field"] == ""
    assert "at most 40 characters" in body["details"]["causes"][0]["message"]
    # A cross-field rule: llm2llm needs a seed set.
    status, body = await call(k8s, "POST", RUNS_PATH, run_manifest("teach", strategy="llm2llm"))
    assert status == 422 and "data.seed: is required for strategy llm2llm" in body["message"]


@pytest.mark.asyncio
@pytest.mark.parametrize("field, change", [
    ("model", {"model": {"base": "s3://models/other/"}}),
    ("data", {"data": {"validation": "s3://data/more.jsonl"}}),
    ("strategy", {"strategy": "iwsi", "data": None}),
])
async def test_an_immutable_field_edit_is_refused_by_its_cel_rule(k8s, field, change):
    await k8s.create_object(RUNS, "default", run_manifest("imm"))
    if change.get("data", 1) is None:
        change = {"strategy": change["strategy"]}
    status, body = await call(k8s, "PATCH", RUNS_PATH + "/imm", {"spec": change}, MERGE)
    assert status == 422 and body["reason"] == "Invalid"
    assert {"reason": "FieldValueInvalid", "field": f"spec.{field}",
            "message": f'Invalid value: "{"string" if field == "strategy" else "object"}": spec.{field} is immutable'} \
        in body["details"]["causes"]
    assert k8s.run("imm")["metadata"]["generation"] == 1
    # A mutable field changes, and the generation with it.
    status, body = await call(k8s, "PATCH", RUNS_PATH + "/imm", {"spec": {"rounds": {"max": 5}}}, MERGE)
    assert status == 200 and body["metadata"]["generation"] == 2 and body["spec"]["rounds"]["max"] == 5


@pytest.mark.asyncio
async def test_unknown_fields_are_pruned_in_spec_and_status(k8s):
    manifest = run_manifest("prune")
    manifest["spec"]["sampling"] = {"paths": 4, "temprature": 0.7}  # a typo: dropped, as on a real cluster
    status, body = await call(k8s, "POST", RUNS_PATH, manifest)
    assert status == 201 and body["spec"]["sampling"] == {
        "paths": 4, "topP": 1.0, "maxTokens": 512, "seed": 0}  # the typo gone, the defaults applied
    status, body = await call(k8s, "PATCH", RUNS_PATH + "/prune/status",
                              {"status": {"phase": "Sampling", "progressPercent": 40, "rounds": [
                                  {"round": 0, "stages": [{"name": "sample", "eta": "5m"}]}]}}, MERGE)
    assert status == 200
    assert "progressPercent" not in body["status"] and body["status"]["phase"] == "Sampling"
    stage = body["status"]["rounds"][0]["stages"][0]
    assert "eta" not in stage and (stage["state"], stage["attempts"]) == ("Pending", 0)  # pruned, then defaulted
    assert {("default", "prune", "spec.sampling.temprature"), ("default", "prune", "status.progressPercent"),
            ("default", "prune", "status.rounds[0].stages[0].eta")} <= set(k8s.pruned)
    # kubectl apply --validate=strict (fieldValidation=Strict) refuses instead.
    manifest["metadata"]["name"] = "strict"
    status, body = await call(k8s, "POST", RUNS_PATH, manifest, params={"fieldValidation": "Strict"})
    assert status == 400 and 'unknown field "spec.sampling.temprature"' in body["message"]


@pytest.mark.asyncio
async def test_duplicate_condition_types_are_refused(k8s):
    await k8s.create_object(RUNS, "default", run_manifest("dup"))
    cond = {"type": "Ready", "status": "True", "reason": "Running", "lastTransitionTime": "2026-01-01T00:00:00Z"}
    status, body = await call(k8s, "PATCH", RUNS_PATH + "/dup/status", {"status": {"conditions": [cond, cond]}}, MERGE)
    assert status == 422 and body["details"]["causes"][0]["reason"] == "FieldValueDuplicate"
    assert body["details"]["causes"][0]["field"] == "status.conditions[1]"


@pytest.mark.asyncio
async def test_the_status_subresource(k8s):
    await k8s.create_object(RUNS, "default", run_manifest("sub"))
    # Spec sent to /status is ignored; so is a status sent to the main resource.
    status, body = await call(k8s, "PATCH", RUNS_PATH + "/sub/status",
                              {"spec": {"suspend": True}, "status": {"phase": "Sampling"}}, MERGE)
    assert status == 200 and body["spec"]["suspend"] is False and body["status"]["phase"] == "Sampling"
    assert body["metadata"]["generation"] == 1
    status, body = await call(k8s, "PATCH", RUNS_PATH + "/sub", {"status": {"phase": "Failed"}}, MERGE)
    assert status == 200 and body["status"]["phase"] == "Sampling"
    # Generation: spec changes only — not metadata, not status.
    _, body = await call(k8s, "PATCH", RUNS_PATH + "/sub", {"metadata": {"labels": {"team": "a"}}}, MERGE)
    assert body["metadata"]["generation"] == 1
    _, body = await call(k8s, "PATCH", RUNS_PATH + "/sub", {"spec": {"suspend": True}}, MERGE)
    assert body["metadata"]["generation"] == 2
    # A status on create is dropped.
    manifest = run_manifest("born")
    manifest["status"] = {"phase": "Succeeded"}
    _, body = await call(k8s, "POST", RUNS_PATH, manifest)
    assert "status" not in body


@pytest.mark.asyncio
async def test_a_json_patch_against_the_stored_defaults(k8s):
    """The operator's status patch tests and replaces paths of the *stored* object, which holds
    the server's defaults: a replace of a defaulted field works, a test of it sees the default."""
    await k8s.create_object(RUNS, "default", run_manifest("jp", rounds={"max": 1}))
    status, body = await call(k8s, "PATCH", RUNS_PATH + "/jp", [
        {"op": "test", "path": "/spec/rounds/patience", "value": 1},
        {"op": "replace", "path": "/spec/rounds/patience", "value": 2}], "application/json-patch+json")
    assert status == 200 and body["spec"]["rounds"]["patience"] == 2


# =========================================================================== what the operator writes
def _planner_statuses() -> list[tuple[str, dict[str, Any]]]:
    """Statuses the real planner produces along whole runs: success of each strategy, a failed
    stage after retries, a suspension."""
    from planner_sim import RunIdentity, Sim, run_spec

    out = []
    ident = RunIdentity(name="demo", namespace="default", uid="0123456789abcdef", generation=1)
    for strategy in ("lmsi", "iwsi", "llm2llm"):
        sim = Sim(run_spec(strategy, {}, {"uri": "s3://b/runs"}, rounds={"max": 3, "patience": 0}), ident)
        sim.step()
        out.append((f"{strategy}-started", sim.status.wire()))
        sim.run_to_end()
        out.append((f"{strategy}-succeeded", sim.status.wire()))
    sim = Sim(run_spec("lmsi", {}, {"uri": "s3://b/runs"}, retry={"limit": 1, "backoffSeconds": 0}), ident)
    for _ in range(6):
        sim.step()
        sim.fail_all(exit_code=137, reason="OOMKilled", message="killed")
    out.append(("failed", sim.status.wire()))
    sim = Sim(run_spec("lmsi", {}, {"uri": "s3://b/runs"}, suspend=True), ident)
    sim.step()
    out.append(("suspended", sim.status.wire()))
    return out


@pytest.mark.parametrize("case, status", _planner_statuses(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_status_the_planner_writes_is_stored_unpruned(case, status):
    """A status field the CRD lacks would be dropped without an error (and never be seen by
    `kubectl`, the GitOps health checks or the operator's next pass)."""
    import yaml
    from crd_semantics import CustomResourceSchema
    from k8s_fixtures import CRD_FILE
    from selfimprove_operator.api import SelfImproveRunStatus

    schema = CustomResourceSchema(yaml.safe_load(CRD_FILE.read_text()))
    obj = run_manifest("demo")
    obj["status"] = copy.deepcopy(status)
    stored, pruned, causes = schema.admit(obj)
    assert pruned == [] and causes == []
    # What the server adds (defaults) reads back as the same status.
    assert SelfImproveRunStatus.model_validate(stored["status"]).wire() == status


# =========================================================================== kubectl get sir
def test_printer_columns_resolve_on_a_planner_status():
    """Each additionalPrinterColumns JSONPath, evaluated with a JSONPath library on a run whose
    status the planner wrote, gives the intended value with the column's type."""
    import yaml
    from jsonpath_ng import parse
    from k8s_fixtures import CRD_FILE
    from selfimprove_operator.api import SelfImproveRunStatus

    crd = yaml.safe_load(CRD_FILE.read_text())
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    [status] = [s for c, s in _planner_statuses() if c == "lmsi-succeeded"]
    obj = run_manifest("demo")
    obj["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    obj["status"] = status
    model = SelfImproveRunStatus.model_validate(status)
    intended = {
        "Strategy": "lmsi", "Phase": model.phase, "Round": model.round, "Best": model.best_accuracy,
        "Age": "2026-01-01T00:00:00Z", "Progress": "train 40% (8/20 steps, 1m05s left)",
    }
    # A finished run has no progress; the column's value is that of a running stage's.
    assert "progress" not in status
    obj["status"] = {**status, "progress": {"round": 1, "stage": "train", "attempt": 1, "unit": "steps", "done": 8,
                                            "total": 20, "percent": 40, "estimatedRemainingSeconds": 65,
                                            "lastUpdate": "2026-01-01T00:00:00Z", "summary": intended["Progress"]}}
    SelfImproveRunStatus.model_validate(obj["status"])
    assert {c["name"] for c in columns} == set(intended)
    types = {"string": str, "integer": int, "number": float, "date": str, "boolean": bool}
    for column in columns:
        path = column["jsonPath"]
        assert path.startswith("."), f"{column['name']}: a printer column's JSONPath starts with '.'"
        found = [m.value for m in parse("$" + path).find(obj)]
        assert found == [intended[column["name"]]], column
        assert isinstance(found[0], types[column["type"]]), column
        if column["type"] == "date":
            datetime.strptime(found[0], "%Y-%m-%dT%H:%M:%SZ")
    assert model.phase == "Succeeded" and model.round == 3 and model.best_accuracy == pytest.approx(0.7)  # 0.4 + 0.1 × round
