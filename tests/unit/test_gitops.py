"""GitOps examples: the Argo CD health check (run with a real Lua through lupa, on hand-written
statuses and on statuses the real planner produces), the argocd-cm snippet, the Applications and
the run manifests they sync."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest
import yaml
from selfimprove_operator.api import SelfImproveRunSpec
from selfimprove_operator.cli import main as cli
from selfimprove_operator.planner import Observed, RunIdentity, StartStage, plan
from selfimprove_workers.contract import StageResult

ROOT = Path(__file__).resolve().parents[2]
GITOPS = ROOT / "examples" / "gitops"
LUA = GITOPS / "health" / "selfimprove.dev_SelfImproveRun.lua"
CM_KEY = "resource.customizations.health.selfimprove.dev_SelfImproveRun"

lupa = pytest.importorskip("lupa")


# ------------------------------------------------------------------------------ the Lua check
@pytest.fixture(scope="module")
def health():
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    # Argo CD runs the script as a chunk with the object in the global `obj`.
    fn = lua.eval("function(src) return load(src, 'health', 't') end")(LUA.read_text())
    assert fn is not None, "the Lua does not compile"

    def run(obj: dict) -> tuple[str, str]:
        lua.globals().obj = lua.table_from(json.loads(json.dumps(obj)), recursive=True)
        hs = fn()
        assert hs is not None, "the script returned nothing"
        assert hs["status"] in {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
        return hs["status"], hs["message"]

    return run


def cond(type_: str, status: str = "True", reason: str = "R", message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z"}


def sir(status: dict | None, generation: int = 1) -> dict:
    obj = {"apiVersion": "selfimprove.dev/v1alpha1", "kind": "SelfImproveRun",
           "metadata": {"name": "r", "namespace": "ml", "generation": generation}, "spec": {}}
    if status is not None:
        obj["status"] = status
    return obj


CASES = [
    ("no status yet", sir(None), "Progressing", "Waiting"),
    ("empty status", sir({}, generation=1), "Progressing", None),
    ("running", sir({"phase": "Sampling", "round": 1, "observedGeneration": 1, "conditions": [
        cond("Ready", reason="Running"), cond("Progressing", message="round 1: sample (attempt 1)")]}),
     "Progressing", "round 1: sample"),
    ("succeeded", sir({"phase": "Succeeded", "observedGeneration": 1, "bestAdapter": "s3://b/a2/", "conditions": [
        cond("Succeeded", reason="MaxRoundsReached", message="3 rounds done"), cond("Progressing", "False")]}),
     "Healthy", "s3://b/a2/"),
    ("succeeded, spec raised in git, not yet observed", sir({"phase": "Succeeded", "observedGeneration": 1,
        "conditions": [cond("Succeeded")]}, generation=2), "Progressing", "generation 2"),
    ("failed", sir({"phase": "Failed", "observedGeneration": 1, "conditions": [
        cond("Failed", reason="BadInput", message="data.questions: line 3"), cond("Succeeded", "False")]}),
     "Degraded", "line 3"),
    ("failed while suspended", sir({"observedGeneration": 1, "conditions": [cond("Suspended"), cond("Failed", reason="X")]}),
     "Degraded", "X"),
    ("retrying", sir({"phase": "Training", "observedGeneration": 1, "conditions": [
        cond("Degraded", reason="OOMKilled", message="train failed; retry 1 of 2"), cond("Progressing")]}),
     "Degraded", "retry 1 of 2"),
    ("degraded condition cleared", sir({"phase": "Training", "observedGeneration": 1, "conditions": [
        cond("Degraded", "False", reason="Recovered"), cond("Progressing", message="training")]}), "Progressing", "training"),
    ("suspended", sir({"phase": "Suspended", "observedGeneration": 1, "conditions": [
        cond("Suspended", message="spec.suspend is true"), cond("Progressing", "False")]}), "Suspended", "spec.suspend"),
    ("resumed", sir({"phase": "Sampling", "observedGeneration": 1, "conditions": [
        cond("Suspended", "False", reason="Resumed")]}), "Progressing", None),
    ("condition without message", sir({"observedGeneration": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]}), "Degraded", "DeadlineExceeded"),
]


@pytest.mark.parametrize("obj,status,message", [pytest.param(o, s, m, id=i) for i, o, s, m in CASES])
def test_health_on_sample_statuses(health, obj, status, message):
    got_status, got_message = health(obj)
    assert got_status == status
    assert got_message
    if message:
        assert message in got_message


def test_health_on_what_the_planner_writes(health):
    """Drive the real planner through a run's life and map every status it writes."""
    spec_body = yaml.safe_load((GITOPS / "runs" / "qwen-gsm8k-lmsi.yaml").read_text())["spec"]
    spec_body["rounds"] = {"max": 1, "patience": 0}
    spec_body["retry"] = {"limit": 1, "backoffSeconds": 5}
    spec = SelfImproveRunSpec.model_validate(spec_body)
    run = RunIdentity(name="qwen-gsm8k-lmsi", namespace="ml", uid="0123456789abcdef", generation=1)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    status, observed, seen = None, {}, []

    def step(spec=spec, run=run):
        nonlocal status, now
        now += timedelta(seconds=10)
        p = plan(spec, status, observed, now, run)
        for a in p.actions:
            if isinstance(a, StartStage):
                observed[(a.round, a.stage)] = Observed(attempt=a.attempt, state="running")
        status = p.status
        obj = sir(status.wire(), generation=run.generation)
        seen.append(health(obj)[0])
        return health(obj)

    def finish_running(ok=True, **fail):
        for key, obs in list(observed.items()):
            if obs.state == "running":
                if ok:
                    metrics = {"sample": {"paths": 64, "questions": 2, "meanConfidence": 0.8}, "filter": {"kept": 4},
                               "train": {"trainLoss": 0.3}, "evaluate": {"accuracy": 0.5 + key[0] / 10}}[key[1]]
                    outputs = {"adapter": f"s3://b/a{key[0]}/"} if key[1] == "train" else {}
                    res = StageResult(stage=key[1], round=key[0], status="Succeeded", metrics=metrics, outputs=outputs)
                    observed[key] = Observed(attempt=obs.attempt, state="succeeded", result=res)
                else:
                    observed[key] = Observed(attempt=obs.attempt, state="failed", **fail)

    assert step()[0] == "Progressing"                 # round 0 evaluation starts
    finish_running(ok=False, exit_code=1, reason="OOMKilled", message="killed")
    assert step()[0] == "Degraded"                    # transient failure, retry pending
    now += timedelta(seconds=60)
    for _ in range(12):                               # retry, then the whole run
        step()
        finish_running()
        if status.phase == "Succeeded":
            break
    status_, message = step()
    assert (status_, status.phase) == ("Healthy", "Succeeded"), (status_, status.phase, message)
    # GitOps: rounds.max raised in git -> generation 2; before the operator sees it: Progressing.
    raised = SelfImproveRunSpec.model_validate({**spec_body, "rounds": {"max": 2, "patience": 0}})
    gen2 = RunIdentity(name=run.name, namespace=run.namespace, uid=run.uid, generation=2)
    assert health(sir(status.wire(), generation=2))[0] == "Progressing"
    assert step(raised, gen2)[0] == "Progressing"     # the operator extended the run
    # Suspended in git.
    suspended = SelfImproveRunSpec.model_validate({**spec_body, "rounds": {"max": 2, "patience": 0}, "suspend": True})
    gen3 = RunIdentity(name=run.name, namespace=run.namespace, uid=run.uid, generation=3)
    assert step(suspended, gen3)[0] == "Suspended"
    # Bad input fails for good.
    gen4 = RunIdentity(name=run.name, namespace=run.namespace, uid=run.uid, generation=4)
    step(raised, gen4)
    finish_running(ok=False, exit_code=2, reason="BadInput", message="data.questions: line 3: no question")
    for _ in range(3):
        step(raised, gen4)
    assert status.phase == "Failed" and seen[-1] == "Degraded"
    assert set(seen) == {"Progressing", "Degraded", "Healthy", "Suspended"}


def test_lua_stays_within_lua_5_1():
    """Argo CD runs gopher-lua (5.1); lupa here is a newer Lua, so keep newer syntax out."""
    src = re.sub(r"--[^\n]*", "", LUA.read_text())
    src = re.sub(r'"(?:[^"\\]|\\.)*"', '""', src)
    for pattern, what in [(r"\bgoto\b", "goto"), (r"//", "integer division"), (r"<(const|close)>", "attributes"),
                          (r"[^~=<>]=?\s*[&|]|<<|>>|~(?!=)", "bitwise operators"), (r"\butf8\.", "utf8 library"),
                          (r"\btable\.(unpack|move)\b", "5.2+ table functions"), (r"\bglobal\b", "global declarations")]:
        assert not re.search(pattern, src), f"{what} is not Lua 5.1"


def test_argocd_cm_snippet_holds_the_lua():
    cm = yaml.safe_load((GITOPS / "argocd" / "argocd-cm.yaml").read_text())
    assert (cm["apiVersion"], cm["kind"], cm["metadata"]["name"], cm["metadata"]["namespace"]) == \
        ("v1", "ConfigMap", "argocd-cm", "argocd")
    assert cm["data"][CM_KEY] == LUA.read_text(), "regenerate argocd/argocd-cm.yaml from the .lua file"


# ------------------------------------------------------------------------------ Applications
def applications() -> dict[str, dict]:
    apps = {}
    for path in sorted((GITOPS / "argocd").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "Application":
                assert doc["apiVersion"] == "argoproj.io/v1alpha1"
                apps[doc["metadata"]["name"]] = doc
    return apps


def test_applications_point_at_this_repository():
    apps = applications()
    assert set(apps) == {"selfimprove-operator", "selfimprove-runs"}
    for app in apps.values():
        src = app["spec"]["source"]
        assert (ROOT / src["path"]).is_dir(), src["path"]
        assert app["spec"]["destination"]["namespace"]
        assert app["spec"]["syncPolicy"]["automated"]["prune"] is True
    assert (ROOT / apps["selfimprove-operator"]["spec"]["source"]["path"] / "Chart.yaml").exists()
    wave = lambda a: int(a["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])  # noqa: E731
    assert wave(apps["selfimprove-operator"]) < wave(apps["selfimprove-runs"])


def test_chart_application_values_are_valid():
    app = applications()["selfimprove-operator"]
    values = app["spec"]["source"]["helm"]["valuesObject"]
    chart = ROOT / app["spec"]["source"]["path"]
    schema = json.loads((chart / "values.schema.json").read_text())
    defaults = yaml.safe_load((chart / "values.yaml").read_text())

    def merge(a, b):
        out = copy.deepcopy(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    jsonschema.validate(merge(defaults, values), schema, cls=jsonschema.Draft7Validator)
    runs_ns = applications()["selfimprove-runs"]["spec"]["destination"]["namespace"]
    assert runs_ns in values.get("watchNamespaces", [runs_ns]), "the operator must watch the runs' namespace"


def test_run_manifests_validate(capsys):
    app = applications()["selfimprove-runs"]
    folder = ROOT / app["spec"]["source"]["path"]
    files = sorted(folder.glob("*.yaml"))
    assert files
    assert cli(["validate", *map(str, files)]) == 0, capsys.readouterr().err
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            assert doc["metadata"].get("namespace", app["spec"]["destination"]["namespace"]) == \
                app["spec"]["destination"]["namespace"]
