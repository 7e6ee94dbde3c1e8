"""Per-stage resources (`spec.resources.stages.<stage>`): the field-by-field merge onto the run's
resources, its validation, the planner's task and the Job it builds."""

from __future__ import annotations

import textwrap

import pytest
from planner_sim import Sim, run_spec
from selfimprove_operator.api import ResourcesSpec, SelfImproveRunSpec
from selfimprove_operator.k8s.config import OperatorConfig
from selfimprove_operator.k8s.jobs import build_job
from selfimprove_operator.manifest import ManifestInvalid, runs_from_text
from selfimprove_operator.planner import RunIdentity
from selfimprove_workers.stage_registry import stage_names

RUN = {"gpus": 1, "cpu": "4", "memory": "16Gi", "image": "w:1", "nodeSelector": {"pool": "a10"},
       "tolerations": [{"key": "gpu", "operator": "Exists"}], "priorityClassName": "batch", "queueName": "q"}


def test_a_stage_without_overrides_gets_the_runs_resources():
    res = ResourcesSpec.model_validate({**RUN, "stages": {"sample": {"gpus": 8}}})
    for stage in ("filter", "train", "evaluate", "augment"):
        assert res.for_stage(stage).wire() == ResourcesSpec.model_validate(RUN).wire()
    assert ResourcesSpec.model_validate(RUN).for_stage("sample") == ResourcesSpec.model_validate(RUN)


def test_overrides_replace_field_by_field():
    res = ResourcesSpec.model_validate({**RUN, "stages": {"sample": {
        "gpus": 8, "memory": "600Gi", "image": "w:big", "nodeSelector": {"pool": "h200"},
        "tolerations": [{"key": "h200", "operator": "Exists", "effect": "NoSchedule"}]}}})
    got = res.for_stage("sample").wire()
    assert got["gpus"] == 8 and got["memory"] == "600Gi" and got["image"] == "w:big"
    # maps and lists are replaced, not merged: a teacher pool's selector must not keep the student's
    assert got["nodeSelector"] == {"pool": "h200"}
    assert got["tolerations"] == [{"key": "h200", "operator": "Exists", "effect": "NoSchedule"}]
    # what the stage leaves out is the run's
    assert got["cpu"] == "4" and got["priorityClassName"] == "batch" and got["queueName"] == "q"
    assert "stages" not in got


def test_an_explicit_zero_or_empty_override_counts():
    res = ResourcesSpec.model_validate({**RUN, "stages": {"filter": {"gpus": 0, "nodeSelector": {}, "tolerations": []}}})
    got = res.for_stage("filter")
    assert got.gpus == 0 and got.node_selector == {} and got.tolerations == []


def test_every_registered_stage_can_be_overridden():
    res = ResourcesSpec.model_validate({"stages": {name: {"gpus": i} for i, name in enumerate(stage_names())}})
    assert [res.for_stage(name).gpus for name in stage_names()] == list(range(len(stage_names())))


def test_an_unknown_stage_name_is_rejected_with_its_field_and_line():
    with pytest.raises(ManifestInvalid) as info:
        runs_from_text(textwrap.dedent("""\
            kind: SelfImproveRun
            metadata: {name: r}
            spec:
              strategy: lmsi
              model: {base: m}
              data: {questions: q, evaluation: e}
              storage: {uri: /tmp/runs}
              resources:
                gpus: 1
                stages:
                  smaple: {gpus: 8}
                  train: {gpus: -1}
            """), "run.yaml")
    errors = [str(e) for e in info.value.errors]
    assert "run.yaml:11: spec.resources.stages.smaple: unknown field" in errors
    assert "run.yaml:12: spec.resources.stages.train.gpus: must be ≥ 0" in errors


def test_the_task_and_the_job_of_each_stage_carry_its_own_gpus():
    """One LLM2LLM run: the teacher's augment on 8 GPUs of another pool and image, the student's
    train on 2, the rest on the run's 1."""
    spec = run_spec("llm2llm", {"gpus": 1, "nodeSelector": {"pool": "small"}, "stages": {
        "augment": {"gpus": 8, "nodeSelector": {"pool": "big"}, "image": "w:teacher"},
        "train": {"gpus": 2}}}, {}, rounds={"max": 2, "patience": 0})  # round 2 (the last) skips augment
    config = OperatorConfig(metrics_port=None)
    sim = Sim(config.with_run_defaults(spec), RunIdentity(name="r", uid="u" * 8))
    sim.run_to_end()
    seen = {}
    for start in sim.starts:
        job = build_job({"metadata": {"name": "r", "namespace": "ns", "uid": "u" * 8}}, spec, start, config)
        pod = job["spec"]["template"]["spec"]
        container = pod["containers"][0]
        seen[start.stage] = (start.task.gpus, container["resources"]["limits"]["nvidia.com/gpu"],
                             pod["nodeSelector"]["pool"], container["image"].split("/")[-1])
    assert seen["augment"] == (8, "8", "big", "w:teacher")
    assert seen["train"][:3] == (2, "2", "small")
    assert seen["evaluate"][:3] == (1, "1", "small")
    assert seen["train"][3] == seen["evaluate"][3] != "w:teacher"


def test_the_operator_default_gpus_fill_what_neither_run_nor_stage_says():
    spec = SelfImproveRunSpec.model_validate({
        "strategy": "lmsi", "model": {"base": "m"}, "data": {"questions": "q", "evaluation": "e"},
        "storage": {"uri": "/tmp/r"}, "resources": {"stages": {"sample": {"gpus": 4}}}})
    res = OperatorConfig(metrics_port=None, gpus=2).with_run_defaults(spec).resources
    assert res.for_stage("sample").gpus == 4 and res.for_stage("train").gpus == 2
