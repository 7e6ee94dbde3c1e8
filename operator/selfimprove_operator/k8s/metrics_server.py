"""The Prometheus endpoint: `GET /metrics` on the operator's own event loop (aiohttp, already
kopf's HTTP stack), so rendering reads the controller's cache without locks and needs no thread."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .metrics import Metrics

if TYPE_CHECKING:
    from aiohttp import web

logger = logging.getLogger("selfimprove.operator")


class MetricsServer:
    def __init__(self, metrics: Metrics, host: str, port: int):
        self.metrics = metrics
        self.host = host
        self.port = port          # the bound port once started (port 0 picks a free one)
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        """Serve until `stop`; returns the port bound."""
        from aiohttp import web

        async def metrics(_: web.Request) -> web.Response:
            body, content_type = self.metrics.render()
            return web.Response(body=body, headers={"Content-Type": content_type})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        sockets = getattr(site._server, "sockets", None) or ()
        self.port = sockets[0].getsockname()[1] if sockets else self.port
        logger.info(f"metrics on http://{self.host}:{self.port}/metrics")
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
