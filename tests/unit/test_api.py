"""The SelfImproveRun models, presets and `selfimprove validate`."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError
from selfimprove_operator.api import SelfImproveRun, SelfImproveRunSpec
from selfimprove_operator.cli import main
from selfimprove_operator.manifest import ManifestInvalid, load_runs, runs_from_text
from selfimprove_operator.presets import PRESETS, resolve, stages_of_round

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "apiVersion": "selfimprove.dev/v1alpha1",
    "kind": "SelfImproveRun",
    "metadata": {"name": "run"},
    "spec": {
        "strategy": "lmsi",
        "model": {"base": "s3://m/base/"},
        "data": {"questions": "s3://d/q.jsonl", "evaluation": "s3://d/e.jsonl"},
        "storage": {"uri": "s3://b/runs/"},
    },
}


def run_with(**spec_changes) -> dict:
    doc = copy.deepcopy(BASE)
    doc["spec"].update(spec_changes)
    return doc


def test_minimal_lmsi_resolves_to_preset():
    run = SelfImproveRun.model_validate(BASE)
    assert run.spec.sampling.paths is None  # the stored spec stays what the user wrote
    spec = resolve(run.spec)
    assert spec.sampling.paths == 32 and spec.sampling.temperature == 0.7
    assert [f.kind for f in spec.filters] == ["consistency"]
    assert spec.filters[0].consistency.min_confidence == 0.9
    assert spec.training.lora.r == 16 and spec.training.learning_rate == 2e-4
    assert spec.training.formats == ["fewShotCot", "fewShotDirect", "zeroShotCot", "zeroShotDirect"]
    assert spec.training.from_ == "base"
    assert spec.rounds.max == 3


def test_iwsi_preset_from_methods():
    doc = run_with(strategy="iwsi", data={**BASE["spec"]["data"], "validation": "s3://d/v.jsonl"})
    spec = resolve(SelfImproveRun.model_validate(doc).spec)
    assert (spec.sampling.paths, spec.sampling.temperature) == (15, 1.1)
    assert [f.kind for f in spec.filters] == ["consistency", "distributionShift"]
    assert spec.filters[1].distribution_shift.keep == 0.8
    assert (spec.training.lora.r, spec.training.lora.alpha, spec.training.epochs) == (64, 16, 4)
    assert spec.training.lora.target_modules == ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    assert spec.training.learning_rate == 3e-4


def test_llm2llm_preset_and_stages():
    doc = run_with(strategy="llm2llm", data={"seed": "s3://d/s.jsonl", "evaluation": "s3://d/e.jsonl"})
    spec = resolve(SelfImproveRun.model_validate(doc).spec)
    assert spec.rounds.max == 10 and spec.training.learning_rate == 2e-5
    assert spec.augment.per_example == 1 and spec.augment.rouge_threshold == 0.95
    assert stages_of_round("llm2llm", 1) == ("train", "evaluate", "augment")
    assert stages_of_round("lmsi", 0) == ("evaluate",)
    assert stages_of_round("iwsi", 2) == ("sample", "filter", "train", "evaluate")


def test_user_values_win_over_preset():
    doc = run_with(sampling={"paths": 4}, training={"lora": {"r": 8}}, filters=[{"entropy": {"max": 0.2}}])
    spec = resolve(SelfImproveRun.model_validate(doc).spec)
    assert spec.sampling.paths == 4 and spec.sampling.temperature == 0.7
    assert spec.training.lora.r == 8 and spec.training.lora.alpha == 32
    assert [f.kind for f in spec.filters] == ["entropy"]


@pytest.mark.parametrize("strategy", sorted(PRESETS))
def test_presets_are_valid_specs(strategy):
    data = {"questions": "q", "seed": "s", "validation": "v", "evaluation": "e"}
    if strategy != "llm2llm":
        data.pop("seed")
    model = {"base": "m", "teacher": "t"} if strategy == "lmsi-teacher" else {"base": "m"}
    spec = SelfImproveRunSpec.model_validate({"strategy": strategy, "model": model, "data": data, "storage": {"uri": "/tmp/x"}})
    assert resolve(spec).training.epochs >= 1


def errors_of(doc_text: str) -> list[str]:
    with pytest.raises(ManifestInvalid) as info:
        runs_from_text(textwrap.dedent(doc_text), "run.yaml")
    return [str(e) for e in info.value.errors]


def test_cross_field_rules():
    doc = run_with(strategy="iwsi")
    with pytest.raises(ValidationError, match="data.validation"):
        SelfImproveRun.model_validate(doc)
    doc = run_with(strategy="llm2llm", data={"evaluation": "e"})
    with pytest.raises(ValidationError, match="data.seed"):
        SelfImproveRun.model_validate(doc)
    doc = run_with(filters=[{"distributionShift": {"keep": 0.5}}])
    with pytest.raises(ValidationError, match="distributionShift"):
        SelfImproveRun.model_validate(doc)
    doc = run_with(filters=[{"consistency": {}, "entropy": {}}])
    with pytest.raises(ValidationError, match="exactly one"):
        SelfImproveRun.model_validate(doc)
    doc = run_with(training={"lora": {"r": 128}})
    with pytest.raises(ValidationError, match="maxLoraRank"):
        SelfImproveRun.model_validate(doc)


def test_three_mistakes_give_three_field_named_errors_with_lines():
    errors = errors_of("""\
        apiVersion: selfimprove.dev/v1alpha1
        kind: SelfImproveRun
        metadata:
          name: r
        spec:
          strategy: lmsi
          model: {base: m}
          data: {questions: q, evaluation: e}
          sampling:
            paths: 0
            temprature: 0.7
          filters:
            - consistency: {minConfidence: 1.5}
          storage: {uri: /tmp/runs}
        """)
    assert errors == [
        "run.yaml:10: spec.sampling.paths: must be ≥ 1",
        "run.yaml:11: spec.sampling.temprature: unknown field",
        "run.yaml:13: spec.filters[0].consistency.minConfidence: must be ≤ 1.0",
    ]


def test_cross_field_errors_are_field_named():
    errors = errors_of("""\
        kind: SelfImproveRun
        metadata: {name: r}
        spec:
          strategy: iwsi
          model: {base: m}
          data: {evaluation: e}
          storage: {uri: /tmp/runs}
        """)
    assert "run.yaml:6: spec.data.questions: is required for strategy iwsi" in errors
    assert "run.yaml:6: spec.data.validation: is required for strategy iwsi" in errors


def test_missing_and_enum_errors():
    errors = errors_of("""\
        kind: SelfImproveRun
        metadata: {name: Bad_Name}
        spec:
          strategy: star
          data: {questions: q, evaluation: e}
          storage: {uri: /tmp/runs}
        """)
    assert any(e.startswith("run.yaml:2: metadata.name: must be a DNS label") for e in errors)
    assert any("spec.strategy: must be one of 'lmsi', 'iwsi', 'llm2llm' or 'lmsi-teacher'" in e for e in errors)
    assert any("spec.model: is required" in e for e in errors)


def test_yaml_syntax_error_names_the_line():
    errors = errors_of("kind: SelfImproveRun\nspec:\n  a: [1, 2\n  b: 3\n")
    assert len(errors) == 1 and errors[0].startswith("run.yaml:4: YAML syntax error")


def test_wrong_kind_and_empty_file():
    assert errors_of("kind: Deployment\n") == ["run.yaml:1: kind: must be SelfImproveRun"]
    assert errors_of("") == ["run.yaml: no SelfImproveRun in the file"]


def test_validate_cli(tmp_path, capsys):
    examples = sorted(str(p) for p in (ROOT / "examples").glob("*.yaml"))
    assert main(["validate", *examples]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(examples) and all(": ok" in line for line in out)

    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: SelfImproveRun\nmetadata: {name: r}\nspec:\n  strategy: lmsi\n")
    assert main(["validate", examples[0], str(bad)]) == 1
    captured = capsys.readouterr()
    assert f"{examples[0]}: ok" in captured.out
    assert f"{bad}:3: spec.model: is required" in captured.err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_every_example_loads():
    for path in (ROOT / "examples").glob("*.yaml"):
        assert load_runs(path)
