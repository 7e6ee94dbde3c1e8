"""Requests to a served teacher or judge (`endpoints.Endpoint`) through the `openai` package.

Why these choices:

- **Messages, not a rendered prompt.** Locally a multi-turn prompt goes through the model's chat
  template (`chat.render_messages`); a chat endpoint applies the served model's own template, so
  sending the very messages the local path renders gives the model the same prompt. `api:
  completions` sends `render_messages(None, …)`, the plain transcript a model without a template
  gets locally: one renderer either way.
- **Our retries, not the library's** (`max_retries=0`): the stage reports how many requests were
  retried and why, and a request that still fails must name the field, the URL and the last status.
  Retried: 408, 409, 429, 5xx, timeouts, connection errors — with exponential backoff and jitter
  (half to all of `backoffSeconds · 2^retry`, at most 60 s), or exactly the server's Retry-After
  (`retry-after-ms`, seconds or an HTTP date; at most `MAX_RETRY_AFTER_S`). Any other answer (400
  a prompt too long, 401 a wrong key, 404 a wrong model name or URL) cannot change on a retry and
  is a BadInput naming the field.
- **Bounded concurrency**: a thread pool of `maxConcurrency` (the client is thread-safe; requests
  are I/O-bound), so a hosted API's rate limit is approached from below, not hammered.
- **Seeds** per request as the local vLLM engine draws them (`prompt_seed(seed, i)`, or
  `prompt_seed(seed, key)` with `seed_keys`: a question samples the same in any batch or shard),
  where the server honours `seed`.

Usage (`prompt_tokens`, `completion_tokens` of each answer), requests, retries and their causes
are counted in `EndpointStats` for the stage's metrics and result.json.
"""

from __future__ import annotations

import email.utils
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from .chat import Message, render_messages
from .endpoints import Endpoint
from .engines.base import prompt_seed
from .errors import BadInput, EndpointError

__all__ = ["Reply", "EndpointStats", "EndpointClient", "retry_after_seconds", "backoff_seconds"]

MAX_BACKOFF_S = 60.0
MAX_RETRY_AFTER_S = 300.0
RETRIED_STATUS = frozenset({408, 409, 429})  # and every 5xx
BODY_EXCERPT = 300  # characters of an error answer quoted in the message


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str | None  # "stop", "length" (cut off by maxTokens), …


@dataclass
class EndpointStats:
    requests: int = 0            # requests answered
    http_requests: int = 0       # HTTP attempts, retries included
    retries: int = 0
    retried: Counter = field(default_factory=Counter)  # why: "429", "503", "timeout", "connection"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    without_usage: int = 0       # answers that carried no `usage`
    wait_seconds: float = 0.0    # slept before retries, summed over threads
    seconds: float = 0.0         # wall time of the calls

    def details(self, endpoint: Endpoint) -> dict[str, Any]:
        """For result.json (the URL carries no credentials: endpoints.py refuses userinfo)."""
        return {"url": endpoint.url, "model": endpoint.model, "api": endpoint.api,
                "maxConcurrency": endpoint.max_concurrency, "requests": self.requests,
                "httpRequests": self.http_requests, "retries": self.retries,
                "retriedBy": dict(sorted(self.retried.items())), "promptTokens": self.prompt_tokens,
                "completionTokens": self.completion_tokens, "answersWithoutUsage": self.without_usage,
                "waitSeconds": round(self.wait_seconds, 3), "seconds": round(self.seconds, 3)}

    def metrics(self, prefix: str) -> dict[str, int]:
        """The headline counts for the summary: `<prefix>PromptTokens`, … (a few bytes each)."""
        return {f"{prefix}PromptTokens": self.prompt_tokens, f"{prefix}CompletionTokens": self.completion_tokens,
                f"{prefix}HttpRequests": self.http_requests, f"{prefix}Retries": self.retries}


def retry_after_seconds(headers: Any, now: datetime | None = None) -> float | None:
    """The wait a 429/503 asks for: `retry-after-ms` (OpenAI's), else `Retry-After` as seconds or
    an HTTP date; None when absent or unreadable. Capped at MAX_RETRY_AFTER_S."""
    if headers is None:
        return None
    wait_s: float | None = None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            wait_s = float(ms) / 1000.0
        except ValueError:
            wait_s = None
    if wait_s is None and (value := headers.get("retry-after")) is not None:
        try:
            wait_s = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            wait_s = (when - (now or datetime.now(UTC))).total_seconds()
    if wait_s is None or wait_s != wait_s:  # NaN
        return None
    return min(max(wait_s, 0.0), MAX_RETRY_AFTER_S)


def backoff_seconds(base: float, retry: int, rng: random.Random) -> float:
    """Retry `retry` (0 for the first): half to all of base·2^retry, capped at MAX_BACKOFF_S.
    The jitter spreads the retries of concurrent requests; the half kept always waits."""
    cap = min(MAX_BACKOFF_S, base * (2 ** retry))
    return cap / 2 + rng.uniform(0, cap / 2)


def _phrase(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


class EndpointClient:
    """Chat (or completion) requests to one endpoint. `field` (`model.teacherEndpoint`) names it
    in errors; the API key, if any, is the environment variable `api_key_env`."""

    def __init__(self, endpoint: Endpoint, *, field: str, api_key_env: str, rng: random.Random | None = None):
        import openai

        self.endpoint = endpoint
        self.field = field
        self.api_key_env = api_key_env
        self.stats = EndpointStats()
        self._rng = rng or random.Random()
        # Set when a request failed for good: the others stop retrying (the interpreter joins
        # the pool's threads at exit, so a thread still backing off would hold the failing stage).
        self._abort = threading.Event()
        self._lock = threading.Lock()
        self._openai = openai
        key = os.environ.get(api_key_env) or ""
        self._has_key = bool(key)
        # The library refuses an empty key; servers without auth (vllm serve) ignore this one.
        self._client = openai.OpenAI(base_url=endpoint.url, api_key=key or "none", timeout=endpoint.timeout_seconds,
                                     max_retries=0)
        self.path = "/chat/completions" if endpoint.api == "chat" else "/completions"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "EndpointClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ one request
    def _body(self, messages: Sequence[Message], temperature: float, max_tokens: int, seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = dict(self.endpoint.extra_body or {})
        body.update(model=self.endpoint.model, temperature=temperature, max_tokens=max_tokens, n=1)
        if seed is not None:
            body["seed"] = seed
        if self.endpoint.api == "chat":
            body["messages"] = [dict(m) for m in messages]
        else:
            body["prompt"] = render_messages(None, messages)
        return body

    def _post(self, body: dict[str, Any]) -> Any:
        # Known fields as arguments, the rest (extraBody's) as extra_body: the library rejects
        # unknown keyword arguments but sends extra_body as it is.
        known = {"model", "temperature", "max_tokens", "n", "seed", "messages", "prompt"}
        args = {k: v for k, v in body.items() if k in known}
        extra = {k: v for k, v in body.items() if k not in known}
        create = self._client.chat.completions.create if self.endpoint.api == "chat" else self._client.completions.create
        return create(**args, extra_body=extra or None)

    def _where(self) -> str:
        return f"{self.field}: POST {self.endpoint.url}{self.path} (model {self.endpoint.model!r})"

    def _bad_answer(self, status: int, text: str) -> BadInput:
        hint = ""
        if status in (401, 403):
            hint = (f"; the API key comes from {self.api_key_env}" + ("" if self._has_key else ", which is not set")
                    + f" ({self.field}.apiKeySecret on Kubernetes)")
        elif status == 404:
            hint = f"; check {self.field}.url (the API's base, usually ending in /v1) and {self.field}.model"
        elif status in (400, 422):
            hint = "; the server refused the request itself (a prompt longer than its context? the maxTokens setting?)"
        return BadInput(f"{self._where()} answered {_phrase(status)}: {text[:BODY_EXCERPT]}{hint}")

    def _one(self, body: dict[str, Any]) -> Reply:
        openai = self._openai
        retries = self.endpoint.max_retries
        last = ""
        t0 = time.monotonic()
        for attempt in range(retries + 1):
            retry_after: float | None = None
            with self._lock:
                self.stats.http_requests += 1
            try:
                response = self._post(body)
            except openai.APIStatusError as exc:
                status = exc.status_code
                text = _error_text(exc)
                if status not in RETRIED_STATUS and status < 500:
                    raise self._bad_answer(status, text) from None
                why, last = str(status), f"answered {_phrase(status)}: {text[:BODY_EXCERPT]}"
                retry_after = retry_after_seconds(exc.response.headers)
            except openai.APITimeoutError:
                why, last = "timeout", f"no answer within {self.endpoint.timeout_seconds:g} s (timeoutSeconds)"
            except openai.APIConnectionError as exc:
                cause = exc.__cause__ or exc
                why, last = "connection", f"could not connect: {type(cause).__name__}: {cause}"
            else:
                return self._reply(response)
            if attempt == retries or self._abort.is_set():
                break
            delay = retry_after if retry_after is not None else backoff_seconds(self.endpoint.backoff_seconds, attempt, self._rng)
            with self._lock:
                self.stats.retries += 1
                self.stats.retried[why] += 1
                self.stats.wait_seconds += delay
            if self._abort.wait(delay):
                break
        raise EndpointError(f"{self._where()} {last}, after {attempt + 1} attempt(s) in {time.monotonic() - t0:.1f} s "
                            f"(maxRetries {retries}); the stage is retried by the run's retry policy")

    def _reply(self, response: Any) -> Reply:
        choices = getattr(response, "choices", None)
        if not choices:
            raise EndpointError(f"{self._where()} answered without choices: {str(response)[:BODY_EXCERPT]}")
        choice = choices[0]
        text = (choice.message.content if self.endpoint.api == "chat" else choice.text) or ""
        usage = getattr(response, "usage", None)
        with self._lock:
            self.stats.requests += 1
            if usage is None:
                self.stats.without_usage += 1
            else:
                self.stats.prompt_tokens += int(usage.prompt_tokens or 0)
                self.stats.completion_tokens += int(usage.completion_tokens or 0)
        return Reply(text, choice.finish_reason)

    # ------------------------------------------------------------------ a batch
    def chat(self, requests: Sequence[Sequence[Message]], *, temperature: float, max_tokens: int,
             seed: int | None = None, seed_keys: Sequence[str] | None = None,
             progress: Callable[[int, int], None] | None = None) -> list[Reply]:
        """One reply per request, in order; at most maxConcurrency in flight. The first request
        that fails for good cancels those not started and raises. Request i is seeded
        `prompt_seed(seed, seed_keys[i])` (its position i without keys), as the vLLM engine does."""
        if not requests:
            return []
        if seed_keys is not None and len(seed_keys) != len(requests):
            raise ValueError(f"seed_keys: {len(seed_keys)} keys for {len(requests)} requests")
        bodies = [self._body(m, temperature, max_tokens,
                             None if seed is None else prompt_seed(seed, i if seed_keys is None else seed_keys[i]))
                  for i, m in enumerate(requests)]
        t0 = time.monotonic()
        out: list[Reply | None] = [None] * len(bodies)
        pool = ThreadPoolExecutor(max_workers=min(self.endpoint.max_concurrency, len(bodies)),
                                  thread_name_prefix="endpoint")
        failed = True
        try:
            futures = {pool.submit(self._one, b): i for i, b in enumerate(bodies)}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    out[futures[f]] = f.result()  # raises the request's error
                if progress is not None:
                    progress(len(bodies) - len(pending), len(bodies))
            failed = False
        finally:
            # On a failure do not wait for the requests in flight: the stage is failing. Those
            # not started are cancelled, those backing off stop.
            if failed:
                self._abort.set()
            pool.shutdown(wait=not failed, cancel_futures=True)
            with self._lock:
                self.stats.seconds += time.monotonic() - t0
        return [r for r in out if r is not None]


def _error_text(exc: Any) -> str:
    """The error answer's text, one line (a JSON body's `message` when it has one)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else None
        if isinstance(message, str):
            return " ".join(message.split())
    try:
        text = exc.response.text
    except Exception:  # noqa: BLE001 — a streamed or closed body: fall back to the exception
        text = str(exc)
    return " ".join(str(text).split())
