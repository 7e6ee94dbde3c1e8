"""The one credential redactor (selfimprove_workers.redaction) and every path that uses it."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from selfimprove_workers.redaction import (
    MASK,
    MIN_SECRET_LENGTH,
    is_credential_key,
    redact,
    redact_obj,
    secret_values,
)

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY+EXAMPLEKEY"  # AWS's documented example shape: / and +
TOKEN = "FwoGZXIvYXdzEJr//////////wEaDOKv+tq=SessionToken/Example=="
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)


def _clean(text: str, *secrets: str) -> None:
    for s in secrets or (SECRET, TOKEN, KEY_ID):
        assert s not in text
        assert quote(s, safe="") not in text and json.dumps(s)[1:-1] not in text
    assert redact(text) == text or redact(redact(text)) == redact(text)


# ------------------------------------------------------------------------------------------
# known values


def test_env_values_in_plain_text(creds: None) -> None:
    text = f"key {KEY_ID} secret {SECRET} token {TOKEN}."
    assert redact(text) == "key *** secret *** token ***."


@pytest.mark.parametrize(
    "encode",
    [
        lambda v: quote(v),
        lambda v: quote(v, safe=""),
        lambda v: re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), quote(v, safe="")),
        quote_plus,
        lambda v: json.dumps(v)[1:-1],
        lambda v: json.dumps(json.dumps(v))[1:-1],  # JSON inside a JSON string
        lambda v: json.dumps(v)[1:-1].replace("/", "\\/"),  # JSON with escaped slashes
    ],
    ids=["quote", "quote-all", "quote-lower-hex", "quote_plus", "json", "json-in-json", "json-slash"],
)
def test_env_values_encoded(creds: None, encode: Any) -> None:
    for value in (SECRET, TOKEN):
        out = redact(f"before {encode(value)} after")
        assert out == "before *** after" or out == 'before \\"***\\" after', out


def test_extra_values_like_frozen_session_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    profile_secret = "profile-secret-0123456789"
    assert redact(f"x {profile_secret} y", extra=[profile_secret, None, ""]) == "x *** y"
    assert secret_values([profile_secret, None]) == [profile_secret]


def test_short_values_are_not_redacted_by_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x" * (MIN_SECRET_LENGTH - 1))
    monkeypatch.setenv("AWS_SESSION_TOKEN", "y" * MIN_SECRET_LENGTH)
    assert MIN_SECRET_LENGTH == 8
    assert redact("a banana and xxxxxxx") == "a banana and xxxxxxx"
    assert redact("yyyyyyyy!") == "***!"
    assert redact("q", extra=["q"]) == "q"  # the same rule for extra values
    # ...but a short value is still caught in a credential shape
    assert redact("aws_secret_access_key = a") == "aws_secret_access_key = ***"
    assert secret_values() == ["y" * MIN_SECRET_LENGTH]


# ------------------------------------------------------------------------------------------
# URLs


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"s3://{KEY_ID}:{SECRET}@minio/bucket/k", "s3://***@minio/bucket/k"),
        ("https://user:pass@host/path?q=1", "https://***@host/path?q=1"),
        ("https://user:pass@host:9000/b", "https://***@host:9000/b"),
        ("http://user:p@ss@host:9000", "http://***@host:9000"),  # unencoded @ in a password
        ("http://token@host", "http://***@host"),
        ("minio+tls://u:p%40ss@h:1", "minio+tls://***@h:1"),
        ("https:\\/\\/u:p@h\\/x", "https:\\/\\/***@h\\/x"),  # JSON-escaped
        ("s3://AKIAX:wJal/K7MD+bPx@minio:9000/b", "s3://***@minio:9000/b"),  # unencoded / in the secret
        ("s3://bucket/a@b/key", "s3://bucket/a@b/key"),  # an @ in a path is no userinfo
        ("http://host:8080/a:b/c@d", "http://host:8080/a:b/c@d"),  # nor after host:port
        ("https://host:9000/b", "https://host:9000/b"),
        ("mail bob@example.com", "mail bob@example.com"),
    ],
)
def test_url_userinfo(url: str, expected: str) -> None:
    assert redact(f"at {url} failed") == f"at {expected} failed"


def test_presigned_url_query_parameters() -> None:
    url = (
        "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential={KEY_ID}%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
        "&X-Amz-Security-Token=FwoGZXIvYXdz%2F%2Fabc%3D&X-Amz-Signature=0123456789abcdef"
    )
    out = redact(url)
    assert out == (
        "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
        "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
        "&X-Amz-Security-Token=***&X-Amz-Signature=***"
    )
    # SigV2 presigned URLs too
    v2 = f"https://b.s3.amazonaws.com/k?AWSAccessKeyId={KEY_ID}&Expires=1&Signature=abc%2Bdef%3D"
    assert redact(v2) == "https://b.s3.amazonaws.com/k?AWSAccessKeyId=***&Expires=1&Signature=***"


# ------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("aws_secret_access_key = abc/def+ghi", "aws_secret_access_key = ***"),
        ("aws_session_token=abc\naws_access_key_id = AKIAxx", "aws_session_token=***\naws_access_key_id = ***"),
        ("AWS_SECRET_ACCESS_KEY: abc", "AWS_SECRET_ACCESS_KEY: ***"),
        ("Authorization: Bearer eyJhbGciOi.JIUzI1NiJ9.sig", "Authorization: ***"),
        (
            (f"Authorization: AWS4-HMAC-SHA256 Credential={KEY_ID}/20240101/us-east-1/s3/aws4_request, "
             "SignedHeaders=host;x-amz-date, Signature=deadbeef\nnext line"),
            "Authorization: ***\nnext line",
        ),
        (
            f"AWS4-HMAC-SHA256 Credential={KEY_ID}/20240101/us-east-1/s3/aws4_request, Signature=deadbeef",
            "AWS4-HMAC-SHA256 Credential=***, Signature=***",
        ),
        ("curl -H 'Authorization: Basic dXNlcjpwYXNz' x", "curl -H 'Authorization: ***' x"),
        ("sent Bearer abcdefghijklmnop to host", "sent Bearer *** to host"),
        ("{'Authorization': b'AWS4-HMAC-SHA256 Credential=x', 'Host': 'h'}", "{'Authorization': b'***', 'Host': 'h'}"),
        (
            '{"AccessKeyId": "ASIAIOSFODNN7EXAMPLE", "SecretAccessKey": "a\\"b", "SessionToken": "t", "Expiration": "e"}',
            '{"AccessKeyId": "***", "SecretAccessKey": "***", "SessionToken": "***", "Expiration": "e"}',
        ),
        ('{\\"password\\": \\"hunter2\\", \\"user\\": \\"bob\\"}', '{\\"password\\": \\"***\\", \\"user\\": \\"bob\\"}'),
        ("<SecretAccessKey>abc</SecretAccessKey><Expiration>e</Expiration>", "<SecretAccessKey>***</SecretAccessKey><Expiration>e</Expiration>"),
        ("client_secret=abc&grant=x", "client_secret=***&grant=x"),
        ('password="two words"; next', 'password="***"; next'),
        (f"id {KEY_ID} and ASIAABCDEFGHIJKLMNOP", "id *** and ***"),
        # not credentials: must stay readable
        ("max_tokens=512 max_new_tokens: 8 tokenizer: x", "max_tokens=512 max_new_tokens: 8 tokenizer: x"),
        ("pad_token: <pad> eos_token=</s> eos_token_id=2", "pad_token: <pad> eos_token=</s> eos_token_id=2"),
        ("signature_version=s3v4 secretRef: s3-creds secretKeyRef: x", "signature_version=s3v4 secretRef: s3-creds secretKeyRef: x"),
        ("/data/secret.jsonl:2: bad JSON", "/data/secret.jsonl:2: bad JSON"),
        ("AKIAIOSFODNN7EXAMPLEX is too long", "AKIAIOSFODNN7EXAMPLEX is too long"),
        ("token: (none)", "token: (none)"),
        ("s3://bucket/secret/token.json", "s3://bucket/secret/token.json"),
    ],
)
def test_credential_shapes(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    ("key", "credential"),
    [
        ("SecretAccessKey", True), ("aws_secret_access_key", True), ("SessionToken", True),
        ("X-Amz-Security-Token", True), ("X-Amz-Signature", True), ("X-Amz-Credential", True),
        ("AWSAccessKeyId", True), ("api_key", True), ("x-api-key", True), ("HF_TOKEN", True),
        ("password", True), ("Proxy-Authorization", True), ("private_key", True),
        ("max_tokens", False), ("tokenizer", False), ("pad_token", False), ("tokens", False),
        ("signature_version", False), ("secretRef", False), ("secretName", False),
        ("credential_source", False), ("api_key_env", False), ("question", False),
    ],
)
def test_is_credential_key(key: str, credential: bool) -> None:
    assert is_credential_key(key) is credential


# ------------------------------------------------------------------------------------------
# where credentials really show up


def test_formatted_traceback(creds: None) -> None:
    try:
        try:
            raise OSError(f"connect https://{KEY_ID}:{SECRET}@minio:9000 failed")
        except OSError as inner:
            raise RuntimeError(f"upload failed: token={TOKEN} {json.dumps({'secret': SECRET})}") from inner
    except RuntimeError:
        text = traceback.format_exc()
    assert SECRET in text  # the raw traceback does leak...
    out = redact(text)
    _clean(out)
    assert "https://***@minio:9000" in out and "Traceback (most recent call last)" in out


def test_botocore_client_error(creds: None) -> None:
    from botocore.exceptions import ClientError

    err = ClientError(
        {
            "Error": {
                "Code": "SignatureDoesNotMatch",
                "Message": f"The request signature we calculated does not match. StringToSign: AWS4-HMAC-SHA256 "
                f"Credential={KEY_ID}/20240101/us-east-1/s3/aws4_request token {TOKEN}",
            },
            "ResponseMetadata": {"HTTPStatusCode": 403},
        },
        "PutObject",
    )
    assert KEY_ID in str(err)
    out = redact(str(err))
    _clean(out)
    assert "SignatureDoesNotMatch" in out and "PutObject" in out


def test_botocore_endpoint_errors_with_userinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import (
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
    )

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)  # not known by value: only the URL shape can catch it
    url = "https://minio-user:Minio-Pass-123@minio.local:9000/bucket"
    for err in (EndpointConnectionError(endpoint_url=url), ConnectTimeoutError(endpoint_url=url)):
        assert "Minio-Pass-123" in str(err)
        out = redact(f"{type(err).__name__}: {err}")
        assert "Minio-Pass-123" not in out and "minio-user" not in out
        assert "https://***@minio.local:9000/bucket" in out
    assert redact(str(NoCredentialsError())) == "Unable to locate credentials"


def test_storage_error_path_uses_the_redactor(creds: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError
    from selfimprove_workers import storage
    from selfimprove_workers.errors import StorageError

    assert storage.redact is redact
    s = storage.S3Storage(endpoint=f"http://{KEY_ID}:{SECRET}@127.0.0.1:9", max_attempts=1)
    err = s._error("write", "s3://b/k", EndpointConnectionError(endpoint_url=f"http://{KEY_ID}:{SECRET}@127.0.0.1:9/b/k"))
    assert isinstance(err, StorageError)
    _clean(str(err))
    assert "http://***@127.0.0.1:9" in str(err)
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": f"denied X-Amz-Security-Token={TOKEN}"}}, "PutObject")
    _clean(str(s._error("write", "s3://b/k", denied)))

    # Credentials from a profile are not in the environment: the session's frozen ones are redacted.
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k)
    profile_secret = "ProfileOnlySecret0123456789abcdef"
    cred_file = tmp_path / "credentials"
    cred_file.write_text(f"[p]\naws_access_key_id = AKIAPROFILE000000000\naws_secret_access_key = {profile_secret}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(cred_file))
    monkeypatch.setenv("AWS_PROFILE", "p")
    storage.clear_client_cache()
    s = storage.S3Storage(endpoint="http://127.0.0.1:9", max_attempts=1)
    leaked = ClientError({"Error": {"Code": "Weird", "Message": f"echo {profile_secret}"}}, "GetObject")
    out = str(s._error("read", "s3://b/k", leaked))
    assert profile_secret not in out and "S3 error Weird" in out
    storage.clear_client_cache()


def test_our_errors_are_redacted_when_made(creds: None) -> None:
    from selfimprove_workers.errors import (
        BadInput,
        CorruptObjectError,
        DataError,
        StorageError,
    )

    for err in (
        StorageError(f"read s3://{KEY_ID}:{SECRET}@h/b: {TOKEN}"),
        BadInput(f"task: storage.endpoint: http://u:{SECRET}@h"),
        DataError(f"q.jsonl:2: {SECRET}"),
        CorruptObjectError(f"s3://u:{SECRET}@h/b/k", "size mismatch"),
    ):
        _clean(str(err))
        _clean(repr(err))
        try:
            raise err
        except (StorageError, BadInput):
            _clean(traceback.format_exc())


def test_log_formatter_uses_the_redactor(creds: None) -> None:
    from selfimprove_workers.log import JsonFormatter

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("selfimprove.test_redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(f"GET https://u:{SECRET}@h/x?X-Amz-Signature=abc", extra={"metrics": {"SessionToken": "t0k", "n": 3}})
        try:
            raise RuntimeError(f"boom {json.dumps({'SecretAccessKey': SECRET})}")
        except RuntimeError:
            logger.exception(f"failed with token {TOKEN}")
    finally:
        logger.removeHandler(handler)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]  # still valid JSON
    _clean(buf.getvalue())
    assert records[0]["msg"] == "GET https://***@h/x?X-Amz-Signature=***"
    assert records[0]["metrics"] == {"SessionToken": MASK, "n": 3}
    assert records[1]["msg"] == "failed with token ***"
    assert "RuntimeError: boom" in records[1]["error"] and "Traceback" in records[1]["error"]


def test_stage_failure_summary_uses_the_redactor(creds: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import selfimprove_workers.runtime as rt
    def task_dict(tmp: Path) -> dict[str, Any]:  # a sample task whose stage fails at once
        return {"run": {"name": "r", "namespace": "ns", "uid": "u-1"}, "round": 1, "stage": "sample",
                "output": (tmp / "out" / "round-001" / "sample").as_uri() + "/", "model": {"base": str(tmp / "model")},
                "inputs": {"questions": str(tmp / "q.jsonl")}, "sampling": {"paths": 4, "temperature": 0.7}}

    monkeypatch.setattr(rt.log, "setup", lambda *a, **k: None)  # keep pytest's log handlers
    monkeypatch.setenv("TERMINATION_LOG", str(tmp_path / "termination-log"))
    profile_like = "s3://minio-user:Minio-Pass-123@minio:9000/b"

    def stage(ctx: Any) -> Any:
        raise RuntimeError(f"upload to {profile_like} failed: {SECRET} Authorization: Bearer {TOKEN}")

    task = tmp_path / "task.json"
    task.write_text(json.dumps(task_dict(tmp_path)))
    assert rt.main([str(task)], stage_fn=stage) == rt.EXIT_TRANSIENT
    text = (tmp_path / "termination-log").read_text()
    summary = json.loads(text)
    assert summary["status"] == "Failed" and summary["reason"] == "Error"
    assert summary["message"] == "RuntimeError: upload to s3://***@minio:9000/b failed: *** Authorization: ***"
    _clean(text, SECRET, TOKEN, "Minio-Pass-123")

    # no task at all: the bare failure message is redacted too
    assert rt.main([json.dumps({"round": f"{SECRET}"})], stage_fn=stage) == rt.EXIT_BAD_INPUT
    _clean((tmp_path / "termination-log").read_text(), SECRET)


def test_local_executor_redacts_stage_output(creds: None, tmp_path: Path) -> None:
    from selfimprove_operator.local import LocalExecutor, StageProcess

    lines = [
        json.dumps({"level": "error", "msg": f"bad {SECRET}", "metrics": {"n": 1}}) + "\n",
        json.dumps({"level": "info", "msg": "fine", "progress": {"done": 1, "total": 2, "unit": "q"}}) + "\n",
        f"Traceback: OSError: https://u:{SECRET}@h token={TOKEN}\n",
    ]
    proc = SimpleNamespace(stderr=iter(lines), poll=lambda: 1, wait=lambda: 1)
    sp = StageProcess(SimpleNamespace(attempt=1), proc, tmp_path / "r.json", tmp_path / "s.log")  # type: ignore[arg-type]
    fake = SimpleNamespace(lock=threading.Lock(), on_update=lambda ex: None, running={(1, "sample"): sp}, observed={})
    LocalExecutor._pump(fake, sp)  # type: ignore[arg-type]
    log_text = (tmp_path / "s.log").read_text()
    _clean(log_text, SECRET, TOKEN)
    assert lines[1] in log_text  # clean lines are copied as they are
    assert sp.last_message == "bad ***" and sp.progress == "1/2 q" and sp.metrics == {"n": 1}

    # a stage that does not redact its own summary (a custom --stage-command)
    (tmp_path / "r.json").write_text(json.dumps({"stage": "sample", "round": 1, "status": "Failed", "message": f"x {SECRET}"}))
    assert LocalExecutor._collect(fake)  # type: ignore[arg-type]
    observed = fake.observed[(1, "sample")]
    assert observed.state == "failed" and observed.message == "x ***"
    assert observed.result is None or observed.result.message == "x ***"


def test_importable_without_heavy_modules() -> None:
    # The operator image has no torch; the operator's Events will use this redactor.
    code = (
        "import sys, selfimprove_workers.redaction as r\n"
        "heavy = {'torch', 'transformers', 'vllm', 'numpy', 'pydantic', 'boto3', 'botocore'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "print(r.redact('http://u:p@h'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "http://***@h"


# ------------------------------------------------------------------------------------------
# guarantees


def test_never_raises() -> None:
    class Bad:
        def __str__(self) -> str:
            raise ValueError("no")

    assert isinstance(redact(Bad()), str)
    assert redact(None) == "None" and redact(12) == "12"
    assert redact_obj({"a": [1, "http://u:p@h", None], "token": "x", 3: Bad()})["token"] == MASK
    with mock.patch("selfimprove_workers.redaction._redact", side_effect=RuntimeError):
        assert redact("http://u:p@h") == "http://***@h"  # the fallback still removes what it can


_SECRETS = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/+=-_.~", min_size=MIN_SECRET_LENGTH, max_size=80)
_ENCODINGS = st.sampled_from([lambda v: v, quote, lambda v: quote(v, safe=""), quote_plus, lambda v: json.dumps(v)[1:-1]])


@settings(max_examples=300, deadline=None)
@given(before=st.text(max_size=60), after=st.text(max_size=60), secret=_SECRETS, encode=_ENCODINGS,
       var=st.sampled_from(["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]))
def test_property_env_secret_never_survives(before: str, after: str, secret: str, encode: Any, var: str) -> None:
    with mock.patch.dict(os.environ, {var: secret}):
        out = redact(before + encode(secret) + after)
        assert secret not in out and encode(secret) not in out
        assert redact(out) == out


_FRAGMENTS = st.sampled_from([
    "a", " ", "\n", "=", ": ", '"', "'", "\\", "\\\"", "/", "//", "@", "&", "?", ",", "*", "***", "{", "}", "<", ">",
    "https://", "s3://", "user:pass@", "token", "SecretAccessKey", "password", "Authorization", "Bearer ", "AKIA",
    "IOSFODNN7EXAMPLE", "X-Amz-Signature", "max_tokens", "b'", "%2F", "\\u0041", "<Token>", "</Token>", SECRET[:12],
])


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(_FRAGMENTS | st.text(max_size=5), max_size=25))
def test_property_idempotent(parts: list[str]) -> None:
    with mock.patch.dict(os.environ, {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN}):
        once = redact("".join(parts))
        assert redact(once) == once


# ------------------------------------------------------------------------------------ Events
def test_operator_events_go_through_the_redactor(creds: None) -> None:
    """A stage's failure message reaches a core/v1 Event; whatever credential shape it quotes
    does not (the operator never holds the run's Secret, but a worker's error text can)."""
    from datetime import UTC, datetime

    from selfimprove_operator.k8s.events import event_body

    run = {"metadata": {"name": "r", "namespace": "ns", "uid": "u"}}
    message = ("round 1 sample failed: could not connect to https://minio:s3cr3t-pass@minio.local:9000/ "
               f"(key {os.environ['AWS_SECRET_ACCESS_KEY']}); presigned "
               "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAABCDEFGHIJKLMNOP%2F20260101&X-Amz-Signature=abcdef0123456789")
    body = event_body(run, "Warning", "StageFailed", message, datetime(2026, 1, 1, tzinfo=UTC), "op-0")
    text = json.dumps(body)
    for secret in ("s3cr3t-pass", os.environ["AWS_SECRET_ACCESS_KEY"], "AKIAABCDEFGHIJKLMNOP", "abcdef0123456789"):
        assert secret not in text
    assert "minio.local:9000" in body["message"] and "round 1 sample failed" in body["message"]
