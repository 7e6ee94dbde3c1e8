"""A teacher or judge served over HTTP with the OpenAI API instead of weights in the stage pod.

`model.teacherEndpoint` / `model.judgeEndpoint` name a server (`vllm serve`, a hosted provider)
by its base URL and served model name. The task carries `Endpoint` — everything but the key: an
API key is a credential, and tasks are visible (`kubectl get job -o yaml`). The Job puts the key
in the stage's environment from the Secret the spec names (`TEACHER_API_KEY_ENV`,
`JUDGE_API_KEY_ENV`; the redactor knows both), a local run reads the same variables from the
user's shell. `endpoint_client.py` talks to the server; this module only says what one is, so the
operator image (no openai, no torch) can import it.

Stdlib and pydantic only.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from .constants import JUDGE_API_KEY_ENV, TEACHER_API_KEY_ENV
from .rules import AnyItemHas, AnyOf, Has, Not, Rule
from .spec import WireModel

__all__ = ["Endpoint", "EndpointUrl", "ENDPOINT_RULES", "TEACHER_API_KEY_ENV", "JUDGE_API_KEY_ENV"]

# One RE2 pattern for pydantic and the CRD's CEL rule. No userinfo (`https://user:key@…`): the key
# would then sit in the task; no query or fragment: the client appends `/chat/completions`.
_URL_RE2 = r"^https?://[^ /@?#]+(/[^ ?#]*)?$"
URL_MESSAGE = ("must be the http:// or https:// base URL of an OpenAI-compatible API, e.g. "
               "https://api.example.com/v1, without credentials, query or fragment (the key goes in apiKeySecret)")


def _check_url(value: str) -> str:
    if not re.match(_URL_RE2, value):
        raise ValueError(URL_MESSAGE)  # not the value: it may hold a key (user:key@host)
    return value.rstrip("/")


EndpointUrl = Annotated[
    str,
    Field(min_length=8, max_length=2048,
          json_schema_extra={"x-kubernetes-validations": [{"rule": f"self.matches('{_URL_RE2}')",
                                                           "message": URL_MESSAGE}]}),
    AfterValidator(_check_url),
]


class Endpoint(WireModel):
    """The served model as a stage task carries it (no credentials)."""

    url: EndpointUrl = Field(
        ..., description="Base URL of the OpenAI-compatible API, including its version path: "
        "http://teacher.ns.svc:8000/v1 for `vllm serve`, https://api.example.com/v1 for a hosted one.")
    model: str = Field(..., min_length=1, max_length=256,
                       description="The served model's name, sent as each request's `model`.")
    api: Literal["chat", "completions"] = Field(
        "chat", description="`chat`: POST /chat/completions with the messages (the server applies the "
        "model's chat template); `completions`: POST /completions with the plain transcript a model without "
        "a chat template gets locally (for a base model served without one).")
    max_concurrency: int = Field(8, ge=1, le=256, description="Requests in flight at once, at most.")
    timeout_seconds: float = Field(
        120.0, gt=0, le=3600, description="Longest wait for one request's answer; a request that times out is retried.")
    max_retries: int = Field(
        5, ge=0, le=20, description="Retries of a request answered 408, 409, 429 or 5xx, timed out or not "
        "connected, with exponential backoff and jitter (a Retry-After header is honoured); the stage then "
        "fails (reason EndpointError) and is retried as a whole by the run's retry policy.")
    backoff_seconds: float = Field(
        1.0, ge=0, le=60, description="Delay before the first retry of a request, doubling with each retry "
        "(capped at 60 s), jittered between half and all of it.")
    extra_body: dict[str, Any] | None = Field(
        None, description="Provider-specific fields merged into every request body, e.g. vLLM's "
        "`structured_outputs: {regex: …}` or `top_k`; the request's own fields win.")


# A field set twice is refused by the model and, as CEL, by `kubectl apply` (see rules.py).
ENDPOINT_RULES: tuple[Rule, ...] = (
    Rule(require=Not(Has("model.teacher")), field="model.teacherEndpoint",
         message="set model.teacher (weights) or model.teacherEndpoint (a served model), not both",
         when=Has("model.teacherEndpoint")),
    Rule(require=Not(AnyOf((AnyItemHas("filters", "judge.model"), AnyItemHas("augment.filters", "judge.model")))),
         field="model.judgeEndpoint",
         message="set filters[].judge.model or augment.filters[].judge.model (weights) or model.judgeEndpoint "
                 "(a served model), not both",
         when=Has("model.judgeEndpoint")),
    Rule(require=AnyOf((AnyItemHas("filters", "judge"), AnyItemHas("augment.filters", "judge"))),
         field="model.judgeEndpoint",
         message="is set but no filter is a judge filter (filters[].judge or augment.filters[].judge) to use it",
         when=Has("model.judgeEndpoint")),
)
