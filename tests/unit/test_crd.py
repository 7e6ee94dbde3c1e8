"""The generated CRD: committed copy fresh, structural, and agreeing with the pydantic models."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml
from selfimprove_operator.api import Condition, RoundStatus, SelfImproveRunStatus, StageProgress, StageStatus
from selfimprove_operator.cli import main
from selfimprove_operator.crd import CRD_PATH, build_crd, render_crd
from selfimprove_operator.manifest import load_runs
from structural import check, to_jsonschema

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def crd() -> dict:
    return build_crd()


@pytest.fixture(scope="module")
def schema(crd) -> dict:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_is_fresh():
    assert (ROOT / CRD_PATH).read_text() == render_crd(), "run `selfimprove crd` and commit crds/"


def test_crd_command_writes_identical_file(tmp_path, capsys):
    out = tmp_path / "crd.yaml"
    assert main(["crd", "-o", str(out)]) == 0
    assert out.read_text() == (ROOT / CRD_PATH).read_text()
    assert main(["crd", "-o", str(out), "--check"]) == 0
    out.write_text(out.read_text() + "# edited\n")
    assert main(["crd", "-o", str(out), "--check"]) == 1


def test_schema_is_structural(schema):
    assert check(schema) == []


def test_checker_catches_violations():
    bad = {
        "type": "object",
        "properties": {
            "a": {"description": "no type"},
            "b": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "c": {"type": "object", "properties": {"x": {"type": "string"}}, "additionalProperties": {"type": "string"}},
            "d": {"$ref": "#/definitions/D"},
            "e": {"type": "integer", "exclusiveMinimum": 0},
        },
    }
    errors = "\n".join(check(bad))
    for fragment in ("a: must specify a type", "`anyOf` is not allowed", "mutually exclusive",
                     "`$ref` is not allowed", "exclusiveMinimum must be a boolean"):
        assert fragment in errors


def test_crd_shape(crd):
    spec = crd["spec"]
    assert spec["names"]["shortNames"] == ["sir"]
    assert crd["metadata"]["name"] == "selfimproveruns.selfimprove.dev"
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Round"] == ".status.round"
    assert columns["Best"] == ".status.bestAccuracy"
    assert columns["Age"] == ".metadata.creationTimestamp"


def test_immutability_rules(schema):
    # On the fields themselves: the error names the field without `fieldPath` (1.28+ only).
    for name in ("strategy", "model", "data"):
        rules = schema["properties"]["spec"]["properties"][name]["x-kubernetes-validations"]
        assert rules == [{"rule": "self == oldSelf", "message": f"spec.{name} is immutable"}]
    # What each rule does on a real CEL evaluator: tests/integration/test_apiserver.py.


def _walk(node, path=""):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_every_field_is_described(schema):
    missing = [p for p, n in _walk(schema["properties"]["spec"], "spec") if p != "spec" and not n.get("description") and not p.endswith(("[]", "{}"))]
    missing += [p for p, n in _walk(schema["properties"]["status"], "status") if p != "status" and not n.get("description") and not p.endswith(("[]", "{}"))]
    assert missing == []


def test_preset_fields_carry_no_server_default(schema):
    # An API-server default would be indistinguishable from a user's value and hide the preset.
    spec = schema["properties"]["spec"]["properties"]
    assert "default" not in spec["sampling"]["properties"]["paths"]
    assert "default" not in spec["training"]["properties"]["learningRate"]
    assert spec["sampling"]["properties"]["maxTokens"]["default"] == 512


def test_bounds_and_enums(schema):
    spec = schema["properties"]["spec"]["properties"]
    paths = spec["sampling"]["properties"]["paths"]
    assert paths["minimum"] == 1 and paths["type"] == "integer" and paths["nullable"] is True
    assert spec["strategy"]["enum"] == ["lmsi", "iwsi", "llm2llm", "lmsi-teacher"]
    top_p = spec["sampling"]["properties"]["topP"]
    assert top_p["exclusiveMinimum"] is True and top_p["minimum"] == 0


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_models_and_crd(path, schema):
    runs = load_runs(path)
    validator = jsonschema.Draft202012Validator(to_jsonschema(schema))
    for doc in yaml.safe_load_all(path.read_text()):
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    assert runs


def test_examples_exist_for_every_strategy():
    strategies = {run.spec.strategy for p in EXAMPLES for run in load_runs(p)}
    assert strategies >= {"lmsi", "iwsi", "llm2llm"}


def full_status() -> dict:
    """A status with every field filled, as the controller could write it."""
    stage = {
        "name": "train", "state": "Failed", "attempts": 2, "failures": 2, "job": "run-r001-train-a2",
        "output": "s3://b/runs/ns/run-abc/round-001/train/", "startTime": "2026-01-01T00:00:00Z",
        "completionTime": "2026-01-01T01:00:00Z", "retryAfter": "2026-01-01T01:01:00Z",
        "reason": "OOMKilled", "message": "container ran out of memory", "exitCode": 137,
        "progress": "3/10", "shards": "1/2", "completedShards": [0],
        "metrics": {"trainLoss": 0.42, "steps": 10, "engine": "vllm", "resumed": True},
    }
    round_ = {
        "round": 1, "stages": [stage], "samples": 3200, "questions": 100, "kept": 1500,
        "meanConfidence": 0.81, "augmented": 12, "trainLoss": 0.4, "accuracy": 0.55,
        "seedAccuracy": 0.7, "validationAccuracy": 0.6, "adapter": "s3://b/a/", "startTime": "2026-01-01T00:00:00Z",
        "completionTime": "2026-01-01T02:00:00Z",
    }
    return {
        "phase": "Training", "round": 1, "rounds": [round_], "bestRound": 1, "bestAccuracy": 0.55,
        "bestAdapter": "s3://b/a/", "artifacts": "s3://b/runs/ns/run-abc/", "bestValidationAccuracy": 0.6,
        "selectedOn": "validation",
        "inputs": [{"field": "data.questions", "uri": "s3://d/q.jsonl", "digest": 'etag:9b2cf535f27731c974343645a3985328@v1'}],
        "conditions": [{"type": "Degraded", "status": "True", "reason": "StageRetrying",
                        "message": "train failed: OOMKilled", "lastTransitionTime": "2026-01-01T01:00:00Z",
                        "observedGeneration": 3}],
        "observedGeneration": 3, "appliedSpec": "sha256:abc", "startTime": "2026-01-01T00:00:00Z",
        "completionTime": "2026-01-01T03:00:00Z", "message": "training round 1",
        "progress": {"round": 1, "stage": "train", "attempt": 2, "unit": "steps", "done": 3, "total": 10, "percent": 30,
                     "estimatedRemainingSeconds": 70, "lastUpdate": "2026-01-01T01:30:00Z",
                     "summary": "train 30% (3/10 steps, 1m10s left)"},
    }


def test_full_status_validates_against_status_schema(schema):
    status = full_status()
    # Every field the models know is present: otherwise the test would not guard against pruning.
    def names(model):
        return {f.alias or n for n, f in model.model_fields.items()}

    assert names(SelfImproveRunStatus) == set(status)
    assert names(RoundStatus) == set(status["rounds"][0])
    assert names(StageStatus) == set(status["rounds"][0]["stages"][0])
    assert names(Condition) == set(status["conditions"][0])
    assert names(StageProgress) == set(status["progress"])
    SelfImproveRunStatus.model_validate(status)
    validator = jsonschema.Draft202012Validator(to_jsonschema(schema["properties"]["status"]))
    errors = list(validator.iter_errors(status))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def test_status_schema_rejects_unknown_fields(schema):
    validator = jsonschema.Draft202012Validator(to_jsonschema(schema["properties"]["status"]))
    assert list(validator.iter_errors({"phase": "Training", "notAField": 1}))
