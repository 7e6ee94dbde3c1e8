"""Acting on stage Jobs: create the Jobs `desired` asks for, delete the ones it calls stale.

Creating is idempotent: the Job name is fixed per attempt, so 409 means it exists already (made
by this operator before a restart or a lost response) and it is adopted when the run is its
controller. The Job manifest carries the run as its controlling owner: deleting the run deletes
its Jobs and Pods (no finalizer is involved, so deleting a run never waits for the operator),
while artifacts in storage stay.
"""

from __future__ import annotations

import logging
from typing import cast

from ..api import SelfImproveRunSpec, SelfImproveRunStatus
from ..planner import Observed, RunIdentity, StartStage, nodes_of
from .bodies import JobBody
from .cache import RunKey, RunState
from .config import OperatorConfig
from .desired import jobs_to_create, jobs_to_delete, running_stages
from .jobs import build_service, service_name
from .kube import ApiError, Kube, job_path
from .metrics import Metrics
from .observe import controller_uid, slim_job

logger = logging.getLogger("selfimprove.operator")


class JobCreationFailed(Exception):
    """The API refused a stage Job for a reason a retry may fix (quota, RBAC, API outage)."""


class JobConflict(Exception):
    """A Job of the attempt's name exists but belongs to another object."""


class JobActuator:
    def __init__(self, kube: Kube | None, config: OperatorConfig, metrics: Metrics):
        self.kube = kube
        self.config = config
        self.metrics = metrics
        # Per run, the uids of its multi-node Jobs whose Service this process has made (pruned to
        # the run's known Jobs, so it does not grow with the operator's lifetime).
        self._services: dict[RunKey, set[str]] = {}

    @property
    def _kube(self) -> Kube:
        # Set by the controller at start-up (`Controller.start`), before any reconcile acts.
        if self.kube is None:
            raise RuntimeError("JobActuator used before the controller set its Kubernetes client")
        return self.kube

    async def ensure(self, key: RunKey, state: RunState, spec: SelfImproveRunSpec, status: SelfImproveRunStatus,
                     identity: RunIdentity, starts: dict[str, StartStage]) -> bool:
        """Create the Job of every Running attempt that has none. True when the run needs another
        pass right away: the API rejected a Job as invalid, and the next plan records the failure."""
        namespace = key[0]
        requeue = False
        # The reconcile acts only on a run whose body is cached, and the cache never clears a
        # body (a deleted run's state is dropped as a whole).
        assert state.body is not None
        for start, manifest in jobs_to_create(
                state.body, spec, status, identity, starts, self.config,
                jobs=state.jobs, deleted=state.tombstones, failed=state.start_failures, resolved=state.resolved):
            # Cached before the request: the watch's ADDED event may beat the response, and
            # then finds the Job already known (no second reconcile for our own create).
            placeholder = state.jobs[start.job_name] = slim_job(cast(JobBody, manifest))
            try:
                created = cast(JobBody, await self._kube.create(job_path(namespace), manifest))
            except ApiError as exc:
                if state.jobs.get(start.job_name) is placeholder:
                    del state.jobs[start.job_name]
                requeue |= await self._not_created(key, state, start, exc)
                continue
            if state.jobs.get(start.job_name) is placeholder:
                state.jobs[start.job_name] = slim_job(created)
            self.metrics.jobs_created.inc()
            logger.info(f"{namespace}/{key[1]}: created Job {start.job_name} "
                        f"(round {start.round} {start.stage}, attempt {start.attempt})")
        await self._ensure_services(key, state, spec, status)
        return requeue

    async def _ensure_services(self, key: RunKey, state: RunState, spec: SelfImproveRunSpec,
                               status: SelfImproveRunStatus) -> None:
        """The headless Service of every running multi-node Job (jobs.build_service), made once
        per Job per operator process: right after the Job, and again after a restart (the
        operator may have died between the two creates; 409 means it exists). It needs the
        Job's uid (its owner), so it follows the Job rather than preceding it; the nodes wait
        for node 0's name to resolve meanwhile (torchrun's join timeout)."""
        namespace = key[0]
        made = self._services.setdefault(key, set())
        made &= {uid for job in state.jobs.values() if (uid := job["metadata"].get("uid"))}
        for _, st in running_stages(status):
            job = state.jobs.get(st.job) if st.job else None
            if job is None or not st.job or nodes_of(spec, st.name) <= 1:
                continue
            uid = job["metadata"].get("uid")
            if not uid or uid in made or job["metadata"].get("deletionTimestamp"):
                continue
            try:
                await self._kube.create(service_path(namespace), build_service(job))
            except ApiError as exc:
                if exc.status != 409:
                    # The reconcile is retried with backoff and the failure shows on the run
                    # (Degraded, JobCreationFailed: e.g. RBAC without services create); the Job's
                    # nodes keep waiting for node 0's name meanwhile.
                    raise JobCreationFailed(f"creating the Service of Job {st.job} failed: {exc}") from None
            made.add(uid)
            logger.info(f"{namespace}/{key[1]}: created Service {service_name(st.job)} for the nodes of Job {st.job}")

    async def _not_created(self, key: RunKey, state: RunState, start: StartStage, exc: ApiError) -> bool:
        """Handle a refused create; True when the refusal is recorded for the next plan."""
        assert state.body is not None  # as in `ensure`, which calls this
        namespace, uid = key[0], state.body["metadata"].get("uid")
        if exc.status == 409:
            # Created before (by us, before a restart or a lost response): adopt it if it is ours.
            existing = cast(JobBody, await self._kube.get(job_path(namespace, start.job_name)))
            if controller_uid(existing) == uid:
                state.jobs[start.job_name] = slim_job(existing)
                return False
            raise JobConflict(f"Job {start.job_name} exists and belongs to another object; "
                              "it blocks this attempt until it is deleted")
        if exc.status in (400, 422):
            # The API rejects the Job as invalid: something in the run's spec (a resource
            # quantity, a toleration) makes it so. No retry fixes that; the user must.
            state.start_failures[(start.round, start.stage, start.attempt)] = Observed(
                attempt=start.attempt, state="failed", reason="BadInput",
                message=f"the API server rejected Job {start.job_name}: {exc.message}")
            return True
        raise JobCreationFailed(f"creating Job {start.job_name} failed: {exc}")

    async def delete_stale(self, key: RunKey, state: RunState, status: SelfImproveRunStatus, stops: set[str]) -> None:
        """Delete the unfinished Jobs that no longer belong to a Running attempt
        (`desired.jobs_to_delete`)."""
        assert state.body is not None  # as in `ensure`
        for name, why in jobs_to_delete(state.body["metadata"].get("uid"), state.jobs, status, stops):
            try:
                await self._kube.delete(job_path(key[0], name), propagation="Background")
            except ApiError as exc:
                if not exc.not_found:
                    raise
            logger.info(f"{key[0]}/{key[1]}: deleted Job {name} ({why})")


def service_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/services"
