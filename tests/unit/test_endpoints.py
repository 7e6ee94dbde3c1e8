"""The served teacher and judge (`model.teacherEndpoint`, `model.judgeEndpoint`) on the control
plane's side: what the API accepts (the models and the CRD alike), what a task carries (no key),
what the Job gives the stage (the key from a secretKeyRef, valid on every supported Kubernetes
version), and that the key never leaves a message."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

import k8s_schemas
import pytest
import yaml
from planner_sim import Sim
from pydantic import ValidationError
from selfimprove_operator.api import SelfImproveRunSpec
from selfimprove_operator.k8s.config import OperatorConfig
from selfimprove_operator.k8s.jobs import build_job
from selfimprove_operator.planner import RunIdentity
from selfimprove_workers.constants import JUDGE_API_KEY_ENV, TEACHER_API_KEY_ENV
from selfimprove_workers.endpoint_client import MAX_BACKOFF_S, MAX_RETRY_AFTER_S, backoff_seconds, retry_after_seconds
from selfimprove_workers.errors import EndpointError
from selfimprove_workers.redaction import redact

ENDPOINT = {"url": "https://api.example.com/v1", "model": "big-teacher",
            "apiKeySecret": {"name": "teacher-api", "key": "api-key"}}
UID = "0b5e3d3a-4a55-4c1a-9c1e-3f0e2f1b2a99"


def llm2llm(**model: Any) -> dict[str, Any]:
    return {"strategy": "llm2llm", "model": {"base": "s3://m/base/", **model},
            "data": {"seed": "s3://d/seed.jsonl", "evaluation": "s3://d/e.jsonl"},
            "storage": {"uri": "s3://b/runs", "secretRef": "creds"}, "rounds": {"max": 2, "patience": 0}}


def lmsi_judge(judge: dict[str, Any], **model: Any) -> dict[str, Any]:
    return {"strategy": "lmsi", "model": {"base": "s3://m/base/", **model},
            "data": {"questions": "s3://d/q.jsonl", "evaluation": "s3://d/e.jsonl"},
            "filters": [{"consistency": {"minConfidence": 0.5}}, {"judge": judge}],
            "storage": {"uri": "s3://b/runs", "secretRef": "creds"}, "rounds": {"max": 1, "patience": 0}}


def errors(body: dict[str, Any]) -> list[str]:
    try:
        SelfImproveRunSpec.model_validate(body)
    except ValidationError as exc:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    return []


@pytest.fixture(scope="module")
def served() -> Any:
    from crd_semantics import CustomResourceSchema
    from k8s_fixtures import CRD_FILE

    return CustomResourceSchema(yaml.safe_load(CRD_FILE.read_text()))


def cel_causes(served: Any, spec: dict[str, Any]) -> list[str]:
    obj = {"apiVersion": "selfimprove.dev/v1alpha1", "kind": "SelfImproveRun", "metadata": {"name": "p"}, "spec": spec}
    return [f"{c.field}: {c.message}" for c in served.admit(obj)[2]]


# --------------------------------------------------------------------------- the API
def test_a_served_teacher_and_judge_are_accepted(served):
    for body in (llm2llm(teacherEndpoint=ENDPOINT), lmsi_judge({}, judgeEndpoint=ENDPOINT),
                 lmsi_judge({}, teacherEndpoint=ENDPOINT)):
        assert errors(body) == []
        assert cel_causes(served, body) == []


@pytest.mark.parametrize("body, field, words", [
    (llm2llm(teacher="s3://m/t/", teacherEndpoint=ENDPOINT), "model.teacherEndpoint", "not both"),
    (lmsi_judge({"model": "s3://m/j/"}, judgeEndpoint=ENDPOINT), "model.judgeEndpoint", "not both"),
    ({**llm2llm(judgeEndpoint=ENDPOINT)}, "model.judgeEndpoint", "no filter is a judge filter"),
    ({**llm2llm(teacher="s3://m/t/", teacherEndpoint=ENDPOINT), "strategy": "lmsi-teacher",
      "data": {"questions": "s3://d/q.jsonl", "evaluation": "s3://d/e.jsonl"}},
     "model.teacherEndpoint", "not supported by strategy lmsi-teacher"),
])
def test_conflicting_forms_are_refused_by_the_model_and_the_crd_naming_the_field(served, body, field, words):
    mine = [e for e in errors(body) if words in e]
    assert len(mine) == 1 and f"{field}: " in mine[0], errors(body)
    cel = [c for c in cel_causes(served, body) if words in c]
    assert len(cel) == 1 and f"{field}: " in cel[0], cel_causes(served, body)


def test_the_teachers_output_may_pass_a_served_judge(served):
    """augment.filters: a judge at AlpaGasus's 4.5 uses model.judgeEndpoint (which then needs no
    other judge filter); the task of the augment stage carries the filters."""
    body = {**llm2llm(judgeEndpoint=ENDPOINT), "augment": {"filters": [{"judge": {"minScore": 4.5}}]}}
    assert errors(body) == [] and cel_causes(served, body) == []
    augment = next(s for s in starts_of(body) if s.stage == "augment")
    assert [f.kind for f in augment.task.augment.filters] == ["judge"]
    assert augment.task.augment.filters[0].params.min_score == 4.5
    assert augment.task.model.judge_endpoint is not None


@pytest.mark.parametrize("kind", ["consistency", "entropy", "self", "correct", "distributionShift"])
def test_augment_filters_that_cannot_rate_a_new_example_are_refused(served, kind):
    params = {"keep": 0.5} if kind == "distributionShift" else {}
    body = {**llm2llm(), "augment": {"filters": [{"rewardModel": {"model": "s3://m/rm/", "keep": 0.5}}, {kind: params}]}}
    found = errors(body)
    assert len(found) == 1 and found[0].startswith("augment.filters: ") and f"[1]: a {kind} filter" in found[0], found
    cel = cel_causes(served, body)
    assert any("augment.filters: only judge, rewardModel, diversity filters" in c for c in cel), cel


@pytest.mark.parametrize("url", ["https://user:sk-secret@api.example.com/v1", "ftp://api.example.com/v1",
                                 "https://api.example.com/v1?key=sk-secret", "api.example.com/v1", "https:// x/v1"])
def test_a_bad_url_is_refused_naming_the_field_and_never_echoed(served, url):
    body = llm2llm(teacherEndpoint={**ENDPOINT, "url": url})
    found = errors(body)
    assert len(found) == 1 and found[0].startswith("model.teacherEndpoint.url: "), found
    assert "sk-secret" not in found[0] and "base URL" in found[0]
    cel = cel_causes(served, body)
    assert len(cel) == 1 and cel[0].startswith("spec.model.teacherEndpoint.url: ") and "base URL" in cel[0], cel


def test_bounds_name_the_field():
    found = errors(llm2llm(teacherEndpoint={**ENDPOINT, "maxConcurrency": 0, "timeoutSeconds": 0}))
    assert sorted(e.split(":")[0] for e in found) == ["model.teacherEndpoint.maxConcurrency",
                                                        "model.teacherEndpoint.timeoutSeconds"]


# --------------------------------------------------------------------------- tasks and Jobs
def starts_of(body: dict[str, Any]) -> list[Any]:
    spec = SelfImproveRunSpec.model_validate(body)
    sim = Sim(spec, RunIdentity(name="demo", namespace="team-a", uid=UID, generation=1))
    sim.run_to_end()
    return sim.starts


def test_the_task_carries_the_endpoint_without_the_key_and_the_job_fills_it_from_the_secret():
    config = OperatorConfig(metrics_port=None)
    body = llm2llm(teacherEndpoint={**ENDPOINT, "maxConcurrency": 4, "extraBody": {"top_k": 20}})
    spec = SelfImproveRunSpec.model_validate(body)
    starts = starts_of(body)
    augment = next(s for s in starts if s.stage == "augment")
    served_teacher = augment.task.model.teacher_endpoint
    assert served_teacher is not None and served_teacher.wire() == {
        "url": "https://api.example.com/v1", "model": "big-teacher", "api": "chat", "maxConcurrency": 4,
        "timeoutSeconds": 120.0, "maxRetries": 5, "backoffSeconds": 1.0, "extraBody": {"top_k": 20}}
    run = {"metadata": {"name": "demo", "namespace": "team-a", "uid": UID}}
    job = build_job(run, spec, augment, config)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "teacher-api" not in container["args"][0] and "apiKeySecret" not in container["args"][0]
    key_env = [e for e in container["env"] if e["name"] == TEACHER_API_KEY_ENV]
    assert key_env == [{"name": TEACHER_API_KEY_ENV, "valueFrom": {"secretKeyRef": {
        "name": "teacher-api", "key": "api-key", "optional": False}}}]
    assert not [e for e in container["env"] if e["name"] == JUDGE_API_KEY_ENV]
    # A run without an endpoint: the same Job as before, no key variable.
    plain = llm2llm(teacher="s3://m/t/")
    start = next(s for s in starts_of(plain) if s.stage == "augment")
    plain_env = build_job(run, SelfImproveRunSpec.model_validate(plain), start, config)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {e["name"] for e in plain_env} & {TEACHER_API_KEY_ENV, JUDGE_API_KEY_ENV} == set()
    # ... and the same task (so the same digest: finished stages of existing runs stay done).
    assert start.task.model.teacher_endpoint is None and "Endpoint" not in json.dumps(start.task.wire())


@pytest.mark.parametrize("version", k8s_schemas.supported_versions())
def test_jobs_with_served_models_are_valid(version):
    config = OperatorConfig(metrics_port=None)
    run = {"metadata": {"name": "demo", "namespace": "team-a", "uid": UID}}
    for body in (llm2llm(teacherEndpoint=ENDPOINT), lmsi_judge({}, judgeEndpoint=ENDPOINT)):
        spec = SelfImproveRunSpec.model_validate(body)
        for start in starts_of(body):
            job = build_job(run, spec, start, config)
            assert k8s_schemas.problems(job, version) == [], start.job_name


def test_the_filter_task_names_the_served_judge():
    starts = starts_of(lmsi_judge({"minScore": 3}, judgeEndpoint=ENDPOINT))
    task = next(s for s in starts if s.stage == "filter").task
    assert task.model.judge_endpoint is not None and task.model.judge_endpoint.model == "big-teacher"
    assert task.model.judge is None


# --------------------------------------------------------------------------- the key stays secret
def test_the_key_is_redacted_wherever_it_appears(monkeypatch):
    key = "sk-proj-" + "".join(random.Random(3).choices("abcdefghijklmnop0123456789", k=40))
    monkeypatch.setenv(TEACHER_API_KEY_ENV, key)
    monkeypatch.setenv(JUDGE_API_KEY_ENV, key[::-1])
    for text in (f"401 from server: key {key} is invalid", f'{{"api": "{key[::-1]}"}}', f"https://x/v1?k={key}"):
        assert key not in redact(text) and key[::-1] not in redact(text)
    assert key not in str(EndpointError(f"model.teacherEndpoint: answered 500: echo {key}"))


# --------------------------------------------------------------------------- waits
def test_retry_after_in_every_form():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after": "0.5"}) == 0.5
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "Thu, 01 Jan 2026 00:00:07 GMT"}, now=now) == 7.0
    assert retry_after_seconds({"retry-after": "Wed, 31 Dec 2025 00:00:00 GMT"}, now=now) == 0.0  # past
    assert retry_after_seconds({"retry-after": "86400"}) == MAX_RETRY_AFTER_S
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None and retry_after_seconds(None) is None


def test_backoff_doubles_with_jitter_within_its_bounds():
    rng = random.Random(0)
    for retry in range(10):
        cap = min(MAX_BACKOFF_S, 0.5 * 2 ** retry)
        waits = [backoff_seconds(0.5, retry, rng) for _ in range(200)]
        assert all(cap / 2 <= w <= cap for w in waits)
        assert max(waits) - min(waits) > cap / 4  # jittered, not one fixed value


def test_who_judges():
    from selfimprove_workers.contract import ModelRef
    from selfimprove_workers.endpoints import Endpoint
    from selfimprove_workers.spec import JudgeFilter
    from selfimprove_workers.stages.filter import judge_model

    served = Endpoint(url="http://judge:8000/v1", model="j")
    teacher = Endpoint(url="http://teacher:8000/v1", model="t")
    own = JudgeFilter(model="s3://m/own/")
    plain = JudgeFilter()
    assert judge_model(own, ModelRef(base="s3://m/b/", judge_endpoint=served)) == ("s3://m/own/", None)
    assert judge_model(plain, ModelRef(base="s3://m/b/", judge="s3://m/j/", teacher_endpoint=teacher)) == ("s3://m/j/", None)
    assert judge_model(plain, ModelRef(base="s3://m/b/", judge_endpoint=served, teacher_endpoint=teacher)) == (
        "http://judge:8000/v1 (j)", (served, "model.judgeEndpoint", JUDGE_API_KEY_ENV))
    assert judge_model(plain, ModelRef(base="s3://m/b/", teacher_endpoint=teacher)) == (
        "http://teacher:8000/v1 (t)", (teacher, "model.teacherEndpoint", TEACHER_API_KEY_ENV))
    assert judge_model(plain, ModelRef(base="s3://m/b/", teacher="s3://m/t/")) == ("s3://m/t/", None)
    assert judge_model(plain, ModelRef(base="s3://m/b/")) == ("s3://m/b/", None)
