"""kopf wiring: settings, handlers and the operator's entry point.

The handlers only feed the controller's caches and wake a run's key; the reconcile runs in the
controller's work queue (one run at a time, bounded concurrency, backoff on errors). Choices:

- **No finalizer.** Only watching handlers (`kopf.on.event`) are registered — no change,
  deletion, daemon or timer handlers, which would make kopf put its finalizer on every run.
  Owner references clean up the Jobs, so deleting a run never waits for the operator (and works
  when it is not installed any more). For the same reason kopf keeps no bookkeeping annotations
  on runs: the operator writes nothing but `.status`.
- **Watch streams that cannot stall** (kopf #847): a server-side timeout, a client-side timeout
  slightly above it and a connect timeout, so an idle stream is re-opened rather than left
  hanging; kopf's inactivity timeout is a further guard.
- **Only our Jobs and Pods are watched**: a server-side label selector `selfimprove.dev/run`
  keeps a busy cluster's pods out of the operator's memory.
- **Peering**: replicas share a kopf peering object; the priority derives from the start time
  (see `config.default_priority`), so the running replica stays active and a second one stands by.
- **No CRD or namespace scanning**: resources are discovered once at start (no cluster-wide list
  permission on CRDs is needed, so a namespaced install can live with Roles only).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

import kopf

from ..api import GROUP, PLURAL, VERSION
from .bodies import JobBody, PodBody, RunBody
from .config import OperatorConfig, unknown_settings
from .controller import Controller
from .jobs import RUN_LABEL

logger = logging.getLogger("selfimprove.operator")


class _NoDiffBase(kopf.DiffBaseStorage):
    """kopf computes a deep-copied "essence" of every object on every event to detect changes
    for change handlers. This operator registers none (only watching handlers), so the essence
    is never used — and copying big Pods, Jobs and run statuses was most of kopf's CPU time under
    load. `build_registry` asserts that no handler needs it."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: Any) -> None:
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        pass


class _NoProgress(kopf.ProgressStorage):
    """Handler progress (retries of change handlers) is never stored: there are none."""

    def fetch(self, *, key: Any, body: Any) -> None:
        return None

    def store(self, *, key: Any, record: Any, body: Any, patch: Any) -> None:
        pass

    def purge(self, *, key: Any, body: Any, patch: Any) -> None:
        pass

    def touch(self, *, body: Any, patch: Any, value: Any) -> None:
        pass

    def clear(self, *, essence: Any) -> Any:
        return essence


def make_settings(config: OperatorConfig) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = config.watch_server_timeout
    settings.watching.client_timeout = config.watch_client_timeout
    settings.watching.connect_timeout = config.watch_connect_timeout
    settings.networking.request_timeout = config.request_timeout
    settings.networking.connect_timeout = config.watch_connect_timeout
    # Server-side selection (kopf ≥ 1.45); the handlers' `labels=` filter is the same selection
    # client-side, so an older kopf still works, only watching more.
    if hasattr(settings.watching, "label_selectors"):
        settings.watching.label_selectors["batch", "v1", "jobs"] = RUN_LABEL
        settings.watching.label_selectors["v1", "pods"] = RUN_LABEL
    settings.scanning.disabled = True
    # kopf's own Events (from log lines) are off; the controller posts the run's Events itself.
    settings.posting.enabled = False
    settings.peering.stealth = True
    settings.peering.name = config.peering_name
    settings.peering.priority = config.priority
    settings.peering.standalone = config.standalone
    settings.peering.mandatory = not config.standalone
    settings.persistence.diffbase_storage = _NoDiffBase()
    settings.persistence.progress_storage = _NoProgress()
    return settings


def build_registry(controller: Controller) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry, retries=3, backoff=1)
    async def start_controller(settings: kopf.OperatorSettings, **_: Any) -> None:
        await controller.start(settings)

    @kopf.on.cleanup(registry=registry, timeout=30)
    async def stop_controller(**_: Any) -> None:
        await controller.stop()

    @kopf.on.login(registry=registry, retries=10, backoff=3)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # In a pod: the service account; elsewhere: $KUBECONFIG or ~/.kube/config (tokens and
        # client certificates; not exec plugins). Neither needs the `kubernetes` client library.
        # kopf calls this again on a 401, which picks up rotated service-account tokens.
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    # The watch's raw objects are what the API sent; the casts name which kind each one is.
    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def run_changed(event: kopf.RawEvent, **_: Any) -> None:
        controller.run_event(event.get("type"), cast(RunBody, event["object"]))

    @kopf.on.event("batch", "v1", "jobs", labels={RUN_LABEL: kopf.PRESENT}, registry=registry)
    async def job_changed(event: kopf.RawEvent, **_: Any) -> None:
        controller.job_event(event.get("type"), cast(JobBody, event["object"]))

    @kopf.on.event("v1", "pods", labels={RUN_LABEL: kopf.PRESENT}, registry=registry)
    async def pod_changed(event: kopf.RawEvent, **_: Any) -> None:
        controller.pod_event(event.get("type"), cast(PodBody, event["object"]))

    # The no-op storages in `make_settings` (and "no finalizer") hold only while every resource
    # handler is a watching one: change, daemon and timer handlers need kopf's bookkeeping.
    if registry._changing.get_all_handlers() or registry._spawning.get_all_handlers():
        raise RuntimeError("change/daemon/timer handlers need kopf's diff-base and progress storages")
    return registry


async def operator(
    config: OperatorConfig,
    *,
    controller: Controller | None = None,
    stop_flag: Any = None,
    ready_flag: Any = None,
    settings_hook: Callable[[kopf.OperatorSettings], None] | None = None,
) -> None:
    """Run the operator until `stop_flag` (an asyncio or threading Event) is set, or until
    SIGTERM/SIGINT when it runs in the main thread. kopf owns the event loop it runs in: when it
    stops, it cancels every task started after it."""
    controller = controller or Controller(config)
    settings = make_settings(config)
    if settings_hook is not None:
        settings_hook(settings)
    await kopf.operator(
        registry=build_registry(controller),
        settings=settings,
        clusterwide=config.clusterwide,
        namespaces=list(config.namespaces),
        standalone=config.standalone,
        priority=config.priority,
        peering_name=None if config.standalone else config.peering_name,
        liveness_endpoint=config.liveness_endpoint,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        memo=kopf.Memo(controller=controller),
    )


def run_operator(config: OperatorConfig) -> int:
    """Entry point of `selfimprove operator`."""
    kopf.configure(
        verbose=config.verbose,
        log_format=kopf.LogFormat.JSON if config.log_format == "json" else kopf.LogFormat.FULL,
        log_refkey="object" if config.log_format == "json" else None,
    )
    if not config.verbose:
        # kopf logs every handled watch event at INFO ("Handler … succeeded"): one line per Pod
        # update is noise, and costly at scale. Its warnings and errors still show.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    for name in unknown_settings():
        logger.warning(f"{name} is not a setting of the operator; ignored")
    where = "all namespaces" if config.clusterwide else ", ".join(config.namespaces)
    logger.info(
        f"selfimprove operator: watching {where}; worker image {config.worker_image}; "
        + ("standalone" if config.standalone else f"peering {config.peering_name!r} priority {config.priority}")
    )
    asyncio.run(operator(config))
    return 0
