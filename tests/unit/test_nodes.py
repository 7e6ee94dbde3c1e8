"""Multi-node training: the API field, the CRD's schema of it, the contract and the planner."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from selfimprove_operator.crd import build_crd
from selfimprove_operator.manifest import ManifestInvalid, runs_from_text
from selfimprove_operator.planner import nodes_of
from selfimprove_workers.contract import StageTask
from structural import to_jsonschema

MANIFEST = """\
apiVersion: selfimprove.dev/v1alpha1
kind: SelfImproveRun
metadata: {name: run}
spec:
  strategy: lmsi
  model: {base: s3://m/base/}
  data: {questions: s3://d/q.jsonl, evaluation: s3://d/e.jsonl}
  storage: {uri: s3://b/runs/}
  resources: RESOURCES
"""


def spec_with(resources: str):
    return runs_from_text(MANIFEST.replace("RESOURCES", resources), "run.yaml")[0].spec


def _errors(resources: str) -> str:
    with pytest.raises(ManifestInvalid) as info:
        spec_with(resources)
    return "\n".join(str(e) for e in info.value.errors)


def test_train_nodes_default_one_and_override():
    assert nodes_of(spec_with("{}"), "train") == 1
    spec = spec_with("{gpus: 2, stages: {train: {nodes: 4}}}")
    assert nodes_of(spec, "train") == 4
    assert nodes_of(spec, "sample") == 1
    # nodes is the train stage's own: the merged resources of a Job have no such field.
    assert not hasattr(spec.resources.for_stage("train"), "nodes")
    assert spec.resources.for_stage("train").gpus == 2


@pytest.mark.parametrize("stage", ["sample", "filter", "evaluate", "augment"])
def test_other_stages_refuse_nodes_naming_the_field(stage):
    text = _errors(f"{{stages: {{{stage}: {{nodes: 2}}}}}}")
    assert f"resources.stages.{stage}.nodes" in text and "only the train stage" in text
    assert nodes_of(spec_with(f"{{stages: {{{stage}: {{nodes: 1}}}}}}"), stage) == 1


@pytest.mark.parametrize("bad", [0, 65])
def test_train_nodes_bounds(bad):
    assert "resources.stages.train.nodes" in _errors(f"{{stages: {{train: {{nodes: {bad}}}}}}}")


def test_crd_schema_bounds_nodes_per_stage():
    import jsonschema

    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    stages = schema["properties"]["spec"]["properties"]["resources"]["properties"]["stages"]["properties"]
    assert (stages["train"]["properties"]["nodes"]["minimum"], stages["train"]["properties"]["nodes"]["maximum"]) == (1, 64)
    for name in ("sample", "filter", "evaluate"):
        assert stages[name]["properties"]["nodes"]["maximum"] == 1
    # What `kubectl apply` would get from the API server: the same refusals as the model.
    validator = jsonschema.Draft202012Validator(to_jsonschema(schema))
    base = {"apiVersion": "selfimprove.dev/v1alpha1", "kind": "SelfImproveRun", "metadata": {"name": "r"},
            "spec": {"strategy": "lmsi", "model": {"base": "s3://m/"}, "storage": {"uri": "s3://b/"},
                     "data": {"questions": "s3://d/q.jsonl", "evaluation": "s3://d/e.jsonl"}}}

    def errors(stages_value):
        doc = {**base, "spec": {**base["spec"], "resources": {"stages": stages_value}}}
        return [".".join(map(str, e.path)) for e in validator.iter_errors(doc)]

    assert errors({"train": {"nodes": 8}}) == []
    assert errors({"train": {"nodes": 65}}) == ["spec.resources.stages.train.nodes"]
    assert errors({"sample": {"nodes": 2}}) == ["spec.resources.stages.sample.nodes"]


def _task(**kw) -> StageTask:
    body = {"run": {"name": "r"}, "round": 1, "stage": "train", "output": "file:///tmp/o/",
            "model": {"base": "/m"}, "inputs": {"train": ["/k.jsonl"]}, "training": {}, **kw}
    return StageTask.model_validate(body)


def test_contract_nodes_digest_and_stage_check():
    one = _task()
    assert one.nodes == 1
    # A one-node task keeps the digest it had before the field existed (finished work is reused).
    assert one.digest() == _task(nodes=1).digest()
    body = one.wire()
    body.pop("nodes", None)
    assert StageTask.model_validate(body).digest() == one.digest()
    two = _task(nodes=2)
    assert two.digest() != one.digest()
    assert two.digest() == _task(nodes=2, attempt=3).digest()
    with pytest.raises(ValidationError, match="nodes: only the train stage"):
        StageTask.model_validate({"run": {"name": "r"}, "round": 0, "stage": "sample", "output": "/o/",
                                  "model": {"base": "/m"}, "inputs": {"questions": "/q.jsonl"},
                                  "sampling": {"paths": 2, "temperature": 0.7}, "nodes": 2})
    with pytest.raises(ValidationError, match="nodes"):
        _task(nodes=65)


def test_planner_gives_train_its_nodes():
    from tests.unit.test_planner import Sim, spec

    sim = Sim(spec(resources={"stages": {"train": {"nodes": 2}}}))
    [start] = sim.step().starts
    assert start.stage == "evaluate" and start.task.nodes == 1
    sim.finish(0, "evaluate")
    [s] = sim.step().starts
    sim.finish(1, s.stage)
    [f] = sim.step().starts
    sim.finish(1, f.stage)
    [t] = sim.step().starts
    assert (t.stage, t.task.nodes) == ("train", 2)


@pytest.mark.parametrize("env, field", [
    ({}, "SELFIMPROVE_RDZV_ENDPOINT"),
    ({"SELFIMPROVE_RDZV_ENDPOINT": "node0"}, "SELFIMPROVE_RDZV_ENDPOINT"),
    ({"SELFIMPROVE_RDZV_ENDPOINT": "node0:29400"}, "SELFIMPROVE_RDZV_ID"),
    ({"SELFIMPROVE_RDZV_ENDPOINT": "node0:29400", "SELFIMPROVE_RDZV_ID": "j", "JOB_COMPLETION_INDEX": "x"},
     "JOB_COMPLETION_INDEX"),
    ({"SELFIMPROVE_RDZV_ENDPOINT": "node0:29400", "SELFIMPROVE_RDZV_ID": "j", "JOB_COMPLETION_INDEX": "2"},
     "JOB_COMPLETION_INDEX"),
])
def test_a_node_without_its_rendezvous_settings_is_bad_input_naming_the_variable(monkeypatch, env, field):
    from selfimprove_workers.errors import BadInput
    from selfimprove_workers.stages.train import _rendezvous

    for name in ("SELFIMPROVE_RDZV_ENDPOINT", "SELFIMPROVE_RDZV_ID", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(BadInput, match=f"^{field}: "):
        _rendezvous(2)


def test_a_node_reads_its_rendezvous_from_the_environment(monkeypatch):
    from selfimprove_workers.stages.train import _rendezvous, torchrun_command

    monkeypatch.setenv("SELFIMPROVE_RDZV_ENDPOINT", "j-0.j:29400")
    monkeypatch.setenv("SELFIMPROVE_RDZV_ID", "j")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    nodes, index, endpoint, rdzv_id = _rendezvous(2)
    assert (nodes, index, endpoint, rdzv_id) == (2, 1, "j-0.j:29400", "j")
    cmd = torchrun_command(Path("/job"), 4, nodes=nodes, node_rank=index, endpoint=endpoint, rdzv_id=rdzv_id)
    i = cmd.index("--rdzv_endpoint")
    assert cmd[i + 1] == "j-0.j:29400" and cmd[cmd.index("--rdzv_id") + 1] == "j"
    assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--nproc_per_node") + 1] == "4"
