"""The handful of Kubernetes API calls the controller makes itself.

kopf watches and lists; creating Jobs, patching status and posting Events go through kopf's own
aiohttp client (`kopf._cogs.clients.api`): it shares the operator's login (token refresh and
re-login on 401 included), its TLS setup and its retry of transient errors, and it costs no
second HTTP stack. kopf exposes no public general-purpose client, so this module is the only
place that touches kopf internals; everything else sees `Kube` and `ApiError`.
"""

from __future__ import annotations

import logging
import urllib.parse
from typing import Any

from kopf._cogs.clients import api as kopf_api
from kopf._cogs.clients import errors as kopf_errors

from ..api import GROUP, PLURAL, VERSION

logger = logging.getLogger("selfimprove.operator.kube")

JSON_PATCH = "application/json-patch+json"
# Retries inside one call are short: the work queue retries a failed reconcile with its own,
# longer backoff and records the failure on the run meanwhile.
CALL_BACKOFFS = (0.5, 1.0, 2.0)


class ApiError(Exception):
    def __init__(self, status: int, reason: str | None, message: str | None):
        super().__init__(f"{status} {reason or ''}: {message or ''}".strip())
        self.status, self.reason, self.message = status, reason, message

    @property
    def conflict(self) -> bool:
        # 409 Conflict (resourceVersion precondition) or 422 from a failed JSON-patch `test`.
        return self.status in (409, 422) and self.reason != "AlreadyExists"

    @property
    def not_found(self) -> bool:
        return self.status == 404


def run_path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
    return path + (f"/{name}" if name else "") + (f"/{subresource}" if subresource else "")


def job_path(namespace: str, name: str | None = None) -> str:
    return f"/apis/batch/v1/namespaces/{namespace}/jobs" + (f"/{name}" if name else "")


def event_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/events"


class Kube:
    def __init__(self, settings: Any):
        self.settings = settings  # kopf.OperatorSettings: timeouts and the shared session

    async def _call(self, method: str, path: str, payload: Any = None, headers: dict[str, str] | None = None,
                    params: dict[str, str] | None = None, text: bool = False) -> Any:
        if params:
            path += "?" + urllib.parse.urlencode(params)
        try:
            response = await kopf_api.request(
                method, path, payload=payload, headers=headers, settings=self.settings,
                backoffs=CALL_BACKOFFS, logger=logger,
            )
        except kopf_errors.APIError as exc:
            body = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
            raise ApiError(exc.status, body.get("reason"), exc.message or (str(exc.args[0]) if exc.args else None)) from None
        async with response:
            return await (response.text() if text else response.json())

    async def get(self, path: str) -> dict[str, Any]:
        return await self._call("get", path)

    async def text(self, path: str, params: dict[str, str] | None = None) -> str:
        """A plain-text resource (a pod's log)."""
        return await self._call("get", path, params=params, text=True)

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call("post", path, payload=body)

    async def json_patch(self, path: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        return await self._call("patch", path, payload=ops, headers={"Content-Type": JSON_PATCH})

    async def delete(self, path: str, propagation: str = "Background") -> None:
        # batch/v1 Jobs deleted through the API orphan their pods unless told otherwise.
        await self._call("delete", path, payload={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation})
