"""Writing the planner's status: a JSON patch (`status.status_patch`) to the status subresource,
guarded by the resourceVersion the plan was made from.

A plan made from a stale copy of the run is rejected by the API server (the patch's `test` of
`metadata.resourceVersion` fails) and never acted upon: the writer re-reads the run into the
cache and says so (`Write.STALE`), and the caller re-plans from the fresh copy.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

from pydantic import ValidationError

from ..api import SelfImproveRunStatus
from ..planner import set_condition
from .bodies import RunBody
from .cache import RunKey, RunState, generation_of, rv_of
from .kube import ApiError, Kube, run_path
from .status import status_patch


class Write(enum.Enum):
    DONE = "done"      # stored (or nothing to store)
    STALE = "stale"    # the run changed underneath: re-read into the cache; plan again from it
    GONE = "gone"      # the run does not exist any more


class StatusWriter:
    def __init__(self, kube: Kube | None, clock: Callable[[], datetime]):
        self.kube = kube
        self.clock = clock

    @property
    def _kube(self) -> Kube:
        # Set by the controller at start-up (`Controller.start`), before any reconcile writes.
        if self.kube is None:
            raise RuntimeError("StatusWriter used before the controller set its Kubernetes client")
        return self.kube

    async def write(self, key: RunKey, state: RunState, raw: dict[str, Any] | None, new: SelfImproveRunStatus,
                    parsed: SelfImproveRunStatus | None = None) -> Write:
        """Store `new`; STALE when the run changed underneath (re-read: the caller re-plans), GONE
        when it is gone. `parsed` is `raw` as a model, when the caller has it."""
        wire = new.wire()
        try:
            current = (parsed or SelfImproveRunStatus.model_validate(raw)).wire() if raw else None
        except ValidationError:
            current = None
        # The version the patch tests, taken now: a watch event may replace state.body while the
        # request is in flight, and comparing the fresh copy with *that* would call a plain
        # conflict a rejected status.
        tested = rv_of(state.body)
        ops = status_patch(raw, wire, tested) if current != wire else []
        if not ops:  # nothing changed (or only the order of conditions: the store's order stands)
            state.status, state.status_rv = new, tested
            return Write.DONE
        namespace, name = key
        try:
            patched = cast(RunBody, await self._kube.json_patch(run_path(namespace, name, "status"), ops))
        except ApiError as exc:
            if exc.not_found:
                return Write.GONE
            if exc.conflict:
                fresh = cast(RunBody, await self._kube.get(run_path(namespace, name)))
                state.body, state.pinned_rv = fresh, rv_of(fresh)
                if rv_of(fresh) == tested:
                    # Not a newer version: the API server rejects the status itself (422 from
                    # its schema). Re-planning would loop; fail this pass loudly instead.
                    raise
                return Write.STALE  # re-plan from the fresh copy right after this pass
            raise
        state.body, state.pinned_rv = patched, rv_of(patched)
        state.status, state.status_rv = new, rv_of(patched)
        return Write.DONE

    async def set_conditions(self, key: RunKey, state: RunState, conditions: list[tuple[str, bool, str, str]]) -> Write:
        """Set conditions (type, value, reason, message) on the stored status and nothing else."""
        raw = (state.body or {}).get("status") or None
        try:
            status = SelfImproveRunStatus.model_validate(raw) if raw else SelfImproveRunStatus()
        except ValidationError:
            status = SelfImproveRunStatus()
        gen = generation_of(state.body) or 1
        for type_, value, reason, message in conditions:
            set_condition(status, type_, value, reason, message, self.clock(), gen)
        return await self.write(key, state, raw, status)
