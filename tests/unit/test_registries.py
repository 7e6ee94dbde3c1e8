"""The registries (stages, strategies, filters) and the rules declared once for both the models
and the CRD: a new filter is one module plus one registration, with no edit elsewhere; every
rule says the same thing in pydantic and in CEL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Field, ValidationError
from selfimprove_operator.api import STAGE_PHASE, SelfImproveRunSpec
from selfimprove_operator.crd import build_crd
from selfimprove_operator.strategies import STRATEGIES, spec_rules
from selfimprove_operator.wiring import DEFAULT_WIRING, wiring_for
from selfimprove_workers.contract import StageName, StageTask
from selfimprove_workers.filter_registry import FILTERS, register_filter, unregister_filter
from selfimprove_workers.spec import Fraction, WireModel
from selfimprove_workers.stage_registry import STAGES


# =========================================================================== a toy filter
# Everything a new filter needs, in one place: its parameters, its implementation, one call.
class KeepLongest(WireModel):
    keep: Fraction = Field(0.5, description="Fraction of paths kept, longest reasoning first.")


def keep_longest(fr: Any, cands: list, spec: KeepLongest) -> tuple[list, dict[str, Any]]:
    k = int(len(cands) * spec.keep)
    ranked = sorted(cands, key=lambda c: (-len(c.text), c.id, c.path))[:k]
    kept = {(c.id, c.path) for c in ranked}
    return [c for c in cands if (c.id, c.path) in kept], {"keep": spec.keep}


@pytest.fixture
def toy_filter():
    register_filter("keepLongest", KeepLongest, f"{__name__}:keep_longest", "Keeps the longest reasoning paths.")
    yield
    unregister_filter("keepLongest")


def manifest(**spec: Any) -> dict[str, Any]:
    body = {"strategy": "lmsi", "model": {"base": "s3://m/base/"},
            "data": {"questions": "s3://d/q.jsonl", "evaluation": "s3://d/e.jsonl"},
            "storage": {"uri": "s3://b/runs"}, **spec}
    return {"apiVersion": "selfimprove.dev/v1alpha1", "kind": "SelfImproveRun", "metadata": {"name": "toy"}, "spec": body}


def test_a_new_filter_is_one_module_and_one_registration(toy_filter, tmp_path: Path):
    from crd_semantics import CustomResourceSchema
    from selfimprove_workers.runtime import run_task

    # The models accept it, with its own parameter checks at its own path.
    spec = SelfImproveRunSpec.model_validate(manifest(filters=[{"keepLongest": {"keep": 0.5}}])["spec"])
    assert spec.filters[0].kind == "keepLongest" and spec.filters[0].params.keep == 0.5
    with pytest.raises(ValidationError) as bad:
        SelfImproveRunSpec.model_validate(manifest(filters=[{"keepLongest": {"keep": 2}}])["spec"])
    assert bad.value.errors()[0]["loc"] == ("filters", 0, "keepLongest", "keep")

    # The CRD documents it and its CEL rule counts it; a real CEL evaluator agrees.
    crd = build_crd()
    items = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["filters"]["items"]
    assert items["properties"]["keepLongest"]["properties"]["keep"]["maximum"] == 1.0
    assert "has(self.keepLongest)" in items["x-kubernetes-validations"][0]["rule"]
    server = CustomResourceSchema(crd)
    assert server.admit(manifest(filters=[{"keepLongest": {"keep": 0.5}}]))[2] == []
    causes = server.admit(manifest(filters=[{"keepLongest": {}, "consistency": {}}]))[2]
    assert [c.field for c in causes] == ["spec.filters[0]"]

    # The filter stage runs it.
    votes = tmp_path / "votes.jsonl"
    samples = tmp_path / "samples.jsonl"
    votes.write_text("".join(json.dumps({"id": q, "majority": "4", "confidence": 1.0, "entropy": 0.0}) + "\n" for q in "ab"))
    samples.write_text("".join(json.dumps({"id": q, "question": f"{q}?", "path": p, "text": "x" * (p + 1) + " #### 4",
                                           "answer": "4"}) + "\n" for q in "ab" for p in range(4)))
    task = StageTask.model_validate({
        "run": {"name": "toy"}, "round": 1, "stage": "filter", "output": str(tmp_path / "out") + "/",
        "model": {"base": str(tmp_path / "no-model")},
        "inputs": {"samples": str(samples), "votes": str(votes)},
        "filters": [{"keepLongest": {"keep": 0.5}}],
    })
    result = run_task(task)
    assert result.status == "Succeeded" and result.metrics["kept"] == 4
    kept = [json.loads(line) for line in (tmp_path / "out" / "kept.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in kept) == [2, 2, 3, 3]  # the longest two of each question


def test_the_toy_filter_is_gone_after_the_test():
    assert "keepLongest" not in FILTERS
    with pytest.raises(ValidationError, match="unknown filter 'keepLongest'"):
        SelfImproveRunSpec.model_validate(manifest(filters=[{"keepLongest": {}}])["spec"])


# =========================================================================== stages and strategies
def test_every_table_about_stages_derives_from_the_registry():
    from selfimprove_workers.runtime import STAGE_MODULES

    assert [s.value for s in StageName] == list(STAGES)
    assert STAGE_PHASE == {name: kind.phase for name, kind in STAGES.items()}
    assert {s.value: m for s, m in STAGE_MODULES.items()} == {name: kind.module for name, kind in STAGES.items()}
    crd = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    stage_enum = crd["properties"]["status"]["properties"]["rounds"]["items"]["properties"]["stages"]["items"]["properties"]["name"]["enum"]
    assert stage_enum == list(STAGES)
    assert crd["properties"]["spec"]["properties"]["strategy"]["enum"] == list(STRATEGIES)


def test_every_stage_has_wiring_and_every_strategy_runs_registered_stages():
    assert set(DEFAULT_WIRING) == set(STAGES)
    for strategy in STRATEGIES.values():
        assert set(strategy.round_stages) <= set(STAGES)
        assert set(strategy.wiring) <= set(strategy.round_stages) | {"evaluate"}
        for stage in strategy.round_stages:
            assert callable(wiring_for(strategy, stage))


def test_registering_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys; import selfimprove_workers.stage_registry, selfimprove_workers.filter_registry, "
            "selfimprove_workers.spec, selfimprove_operator.strategies, selfimprove_operator.api; "
            "heavy = [m for m in ('torch', 'transformers', 'vllm', 'peft', 'numpy', 'openai') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# =========================================================================== one rule, two checkers
_DATA_FIELDS = ("questions", "seed", "validation")
_FILTER_SETS = [None, [], [{"consistency": {}}], [{"distributionShift": {}}],
                [{"consistency": {}}, {"distributionShift": {"keep": 0.5}}], [{"entropy": {}}],
                [{"judge": {}}], [{"consistency": {}}, {"judge": {"model": "s3://j/"}}]]
_ENDPOINT = {"url": "http://teacher:8000/v1", "model": "t"}
# model.teacher and the served forms (endpoints.py): every combination of the three.
_MODEL_EXTRAS = [{}, {"teacher": "s3://t/"}, {"teacherEndpoint": _ENDPOINT}, {"judgeEndpoint": _ENDPOINT},
                 {"teacher": "s3://t/", "teacherEndpoint": _ENDPOINT}, {"teacherEndpoint": _ENDPOINT, "judgeEndpoint": _ENDPOINT}]


@st.composite
def specs(draw) -> dict[str, Any]:
    data = {"evaluation": "s3://d/e.jsonl"}
    for name in _DATA_FIELDS:
        if draw(st.booleans()):
            data[name] = f"s3://d/{name}.jsonl"
    spec = {"strategy": draw(st.sampled_from(list(STRATEGIES))), "model": {"base": "s3://m/", **draw(st.sampled_from(_MODEL_EXTRAS))},
            "data": data, "storage": {"uri": "s3://b/runs"}}
    filters = draw(st.sampled_from(_FILTER_SETS))
    if filters is not None:
        spec["filters"] = filters
    return spec


@pytest.fixture(scope="module")
def served() -> Any:
    from crd_semantics import CustomResourceSchema
    from k8s_fixtures import CRD_FILE

    return CustomResourceSchema(yaml.safe_load(CRD_FILE.read_text()))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=specs())
def test_the_models_and_the_api_server_refuse_the_same_specs(served, spec):
    """Each cross-field rule, checked by pydantic and by CEL on the committed CRD, gives the
    same verdict and the same message on every combination of strategy, data and filters."""
    python = sorted(e for r in spec_rules() if (e := r.violated(spec)))
    obj = {"apiVersion": "selfimprove.dev/v1alpha1", "kind": "SelfImproveRun", "metadata": {"name": "p"}, "spec": spec}
    causes = served.admit(obj)[2]
    cel = sorted(c.message.removeprefix('Invalid value: "object": ') for c in causes if c.field == "spec")
    assert python == cel
    # And the models' own validation reports exactly those lines.
    try:
        SelfImproveRunSpec.model_validate(spec)
        reported: list[str] = []
    except ValidationError as exc:
        reported = sorted(line for e in exc.errors() for line in str(e["msg"]).removeprefix("Value error, ").split("\n"))
    assert reported == python
