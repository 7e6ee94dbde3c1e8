"""The endpoint client's failures against a real HTTP server on 127.0.0.1 (endpoint_fixtures'
ScriptedProxy with no upstream: every answer is a scripted error or a delay), and a stage that
fails on them as a Job would. What succeeds is tested against vLLM's server (tests/e2e/test_endpoint.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from endpoint_fixtures import Scripted, ScriptedProxy
from model_fixtures import run_worker, write_jsonl
from selfimprove_workers.constants import TEACHER_API_KEY_ENV
from selfimprove_workers.endpoint_client import EndpointClient
from selfimprove_workers.endpoints import Endpoint
from selfimprove_workers.errors import BadInput, EndpointError

KEY = "sk-test-" + "q7RkT2vXw9LmN4pZs8HjB3cY"
HELLO = [[{"role": "user", "content": "hello"}]]


def endpoint(proxy: ScriptedProxy, **changes) -> Endpoint:
    return Endpoint.model_validate({"url": proxy.url, "model": "served", "backoffSeconds": 0.01, **changes})


def test_a_request_that_always_times_out_fails_naming_field_url_and_cause(monkeypatch):
    monkeypatch.setenv(TEACHER_API_KEY_ENV, KEY)
    with ScriptedProxy(None, [Scripted(delay=1.0), Scripted(delay=1.0)]) as proxy:
        client = EndpointClient(endpoint(proxy, timeoutSeconds=0.3, maxRetries=1), field="model.teacherEndpoint",
                                api_key_env=TEACHER_API_KEY_ENV)
        with pytest.raises(EndpointError) as caught:
            client.chat(HELLO, temperature=0.0, max_tokens=4)
        client.close()
    message = str(caught.value)
    assert message.startswith(f"model.teacherEndpoint: POST {proxy.url}/chat/completions (model 'served') "
                              "no answer within 0.3 s (timeoutSeconds), after 2 attempt(s)"), message
    assert caught.value.reason == "EndpointError"
    assert len(proxy.arrivals) == 2 and client.stats.retried == {"timeout": 1} and client.stats.requests == 0
    # The key went to the server, and nowhere else.
    assert {a.authorization for a in proxy.arrivals} == {f"Bearer {KEY}"}
    assert KEY not in message


def test_a_refused_key_is_a_bad_input_at_once_and_the_echoed_key_is_masked(monkeypatch):
    monkeypatch.setenv(TEACHER_API_KEY_ENV, KEY)
    body = json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}", "type": "invalid_request_error"}})
    with ScriptedProxy(None, [Scripted(401, body=body)]) as proxy:
        with EndpointClient(endpoint(proxy), field="model.teacherEndpoint", api_key_env=TEACHER_API_KEY_ENV) as client:
            with pytest.raises(BadInput) as caught:
                client.chat(HELLO, temperature=0.0, max_tokens=4)
    message = str(caught.value)
    assert "answered 401 Unauthorized: Incorrect API key provided: ***" in message, message
    assert f"the API key comes from {TEACHER_API_KEY_ENV} (model.teacherEndpoint.apiKeySecret on Kubernetes)" in message
    assert KEY not in message and len(proxy.arrivals) == 1


def test_a_wrong_model_name_is_a_bad_input_with_the_settings_to_check(monkeypatch):
    monkeypatch.delenv("SELFIMPROVE_JUDGE_API_KEY", raising=False)
    with ScriptedProxy(None, [Scripted(404)]) as proxy:
        with EndpointClient(endpoint(proxy), field="model.judgeEndpoint", api_key_env="SELFIMPROVE_JUDGE_API_KEY") as client:
            with pytest.raises(BadInput, match=r"answered 404 Not Found: scripted 404; check model.judgeEndpoint.url .* "
                                               r"and model.judgeEndpoint.model"):
                client.chat(HELLO, temperature=0.0, max_tokens=4)


def test_overload_is_retried_with_the_servers_retry_after_then_fails():
    script = [Scripted(503, {"Retry-After": "0.3"}), Scripted(429, {"retry-after-ms": "200"}), Scripted(503)]
    with ScriptedProxy(None, script) as proxy:
        with EndpointClient(endpoint(proxy, maxRetries=2), field="model.teacherEndpoint",
                            api_key_env=TEACHER_API_KEY_ENV) as client:
            with pytest.raises(EndpointError, match=r"answered 503 Service Unavailable: scripted 503, after 3 attempt"):
                client.chat(HELLO, temperature=0.0, max_tokens=4)
    at = [a.at for a in proxy.arrivals]
    assert len(at) == 3
    # Each wait is at least what the server asked for (a lower bound: these are not speed checks).
    assert at[1] - at[0] >= 0.3 and at[2] - at[1] >= 0.2
    assert client.stats.retried == {"503": 1, "429": 1} and client.stats.wait_seconds == pytest.approx(0.5)


def test_the_augment_stage_fails_with_endpoint_error_and_loads_no_weights(tmp_path: Path):
    """As a Job runs it: the served teacher never answers in time, the stage exits 1 (retried by the
    run's policy) with reason EndpointError, and the base model — a path that does not exist —
    was never loaded."""
    predictions = write_jsonl(tmp_path / "seed_predictions.jsonl", [
        {"id": "s1", "question": "What is 2 + 3?", "correct": False, "gold": "5"},
        {"id": "s2", "question": "What is 4 + 4?", "correct": True, "gold": "8"}])
    with ScriptedProxy(None, [Scripted(delay=1.5)] * 2) as proxy:
        task = {"apiVersion": "selfimprove.dev/v1alpha1", "kind": "StageTask", "run": {"name": "t"}, "round": 1,
                "stage": "augment", "output": str(tmp_path / "out"),
                "model": {"base": str(tmp_path / "no-such-model"),
                          "teacherEndpoint": {"url": proxy.url, "model": "served", "timeoutSeconds": 0.5,
                                              "maxRetries": 1, "backoffSeconds": 0.01}},
                "inputs": {"predictions": str(predictions)}, "augment": {"perExample": 1, "retries": 0}}
        rc, summary, stderr = run_worker(task, tmp_path, timeout=120)
    assert rc == 1, stderr
    assert summary is not None and summary["reason"] == "EndpointError"
    assert summary["message"].startswith(f"model.teacherEndpoint: POST {proxy.url}/chat/completions"), summary
    assert "no answer within 0.5 s (timeoutSeconds), after 2 attempt(s)" in summary["message"]
    assert "no-such-model" not in stderr and len(proxy.arrivals) == 2


def test_a_request_that_fails_for_good_stops_the_others_backing_off():
    """One request is refused (401) while another was told to come back in 30 s: the batch fails
    with the refusal, and the other thread stops waiting instead of holding the stage's exit."""
    import threading

    script = [Scripted(503, {"Retry-After": "30"}), Scripted(401, delay=0.3)]
    with ScriptedProxy(None, script) as proxy:
        with EndpointClient(endpoint(proxy, maxConcurrency=2), field="model.teacherEndpoint",
                            api_key_env=TEACHER_API_KEY_ENV) as client:
            with pytest.raises(BadInput, match="401"):
                client.chat(HELLO * 2, temperature=0.0, max_tokens=4)
            waiting = [t for t in threading.enumerate() if t.name.startswith("endpoint")]
            for t in waiting:
                t.join(timeout=10)
            assert not [t for t in waiting if t.is_alive()]
    assert len(proxy.arrivals) == 2
