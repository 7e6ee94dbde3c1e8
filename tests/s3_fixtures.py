"""A real S3 HTTP server for tests: moto's ``ThreadedMotoServer`` on 127.0.0.1 and a free port.

Import the fixtures into ``tests/conftest.py`` (``from s3_fixtures import *``):

- ``s3_server`` (session): starts the server, points the standard AWS credential variables at
  fake test credentials (and hides any real AWS configuration for the session), yields an
  :class:`S3Server`. Stopped at the end of the session.
- ``s3_bucket`` (function): a fresh, empty bucket; yields ``"s3://<name>"`` and removes it after.

Code under test reaches the server by passing ``endpoint=s3_server.endpoint``; subprocesses get
``s3_server.env`` (which also sets ``AWS_ENDPOINT_URL_S3``).
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

__all__ = ["S3Server", "s3_server", "s3_bucket", "moto_auth_enforced", "TEST_CREDENTIALS"]

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-access-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-access-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}

# Anything that could make boto3 pick up a developer's real AWS setup or talk to another endpoint.
_HIDDEN_ENV = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@dataclass
class S3Server:
    """A running moto S3 server."""

    host: str
    port: int
    region: str = "us-east-1"
    _server: Any = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should use this server with the test credentials."""
        return {**TEST_CREDENTIALS, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def client(self, **kwargs: Any) -> Any:
        """A plain boto3 S3 client for arranging test state (independent of the code under test)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
            **kwargs,
        )


@contextlib.contextmanager
def moto_auth_enforced(server: S3Server) -> Iterator[None]:
    """Make moto check signatures and IAM permissions (it accepts anything by default).

    Global to the server, so it is switched back off even when the test fails. Create IAM users
    and keys *before* entering: with enforcement on, the test credentials are unknown to moto.
    """

    def post(value: str) -> None:
        req = urllib.request.Request(
            f"{server.endpoint}/moto-api/reset-auth", data=value.encode(),
            method="POST",
            # Not form-encoded: moto reads the raw body, which werkzeug empties for forms.
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            json.load(resp)

    post("0")
    try:
        yield
    finally:
        post("inf")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """Session-wide moto S3 server on a free port, with fake credentials in the environment."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        # A developer's partial install skips the S3 tests; CI must run them.
        if os.environ.get("CI"):
            pytest.fail("moto[server] is not installed, and CI must run the S3 tests")
        pytest.skip("moto[server] is not installed")

    mp = pytest.MonkeyPatch()
    for name in _HIDDEN_ENV:
        mp.delenv(name, raising=False)
    for name, value in TEST_CREDENTIALS.items():
        mp.setenv(name, value)
    # No ~/.aws files and no instance-metadata lookups (which would hang for seconds offline).
    mp.setenv("AWS_CONFIG_FILE", os.devnull)
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")

    # port=0: the OS picks a free port, so parallel sessions and leftovers never collide.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        info = S3Server(host=host, port=port, _server=server)
        info.client().list_buckets()  # fail here, clearly, if the server is not answering
        yield info
    finally:
        server.stop()
        mp.undo()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh empty bucket for one test; yields ``s3://<name>``."""
    name = f"test-{uuid.uuid4().hex[:20]}"
    client = s3_server.client()
    client.create_bucket(Bucket=name)
    yield f"s3://{name}"
    with contextlib.suppress(Exception):
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            for obj in page.get("Contents", ()):
                client.delete_object(Bucket=name, Key=obj["Key"])
        client.delete_bucket(Bucket=name)
