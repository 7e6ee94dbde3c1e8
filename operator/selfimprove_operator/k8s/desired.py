"""Which stage Jobs should exist, and which should go, for a run's planned status (pure).

The planner's status is the desired state: every attempt it records as Running should have its
Job, and no unfinished Job of the run should outlive its attempt. `running_stages` is that
reading of a status, shared with the local executor (which turns the same attempts into
processes); `jobs_to_create` and `jobs_to_delete` compare it with the Jobs the cache knows. No
API calls here: `actuator` makes them.
"""

from __future__ import annotations

from collections.abc import Container, Iterator, Mapping

from ..api import SelfImproveRunSpec, SelfImproveRunStatus, StageStatus
from ..planner import RunIdentity, StartStage, build_task, is_terminal
from ..presets import resolve
from .bodies import JobBody, RunBody
from .config import OperatorConfig
from .jobs import build_job
from .observe import controller_uid, stage_key


def running_stages(status: SelfImproveRunStatus | None) -> Iterator[tuple[int, StageStatus]]:
    """(round, stage) of every attempt `status` records as Running, in the status's order."""
    for rnd in status.rounds if status is not None else ():
        for st in rnd.stages:
            if st.state == "Running":
                yield rnd.round, st


def running_jobs(status: SelfImproveRunStatus) -> set[str]:
    """The Job names of the Running attempts."""
    return {st.job for _, st in running_stages(status) if st.job}


def finished(job: JobBody) -> bool:
    # SuccessCriteriaMet / FailureTarget come first (Kubernetes ≥ 1.31) while pods terminate.
    return any(c.get("type") in ("Complete", "Failed", "SuccessCriteriaMet", "FailureTarget") and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or ())


def jobs_to_create(
    run: RunBody,
    spec: SelfImproveRunSpec,
    status: SelfImproveRunStatus,
    identity: RunIdentity,
    starts: Mapping[str, StartStage],
    config: OperatorConfig,
    *,
    jobs: Container[str],
    deleted: Container[str],
    failed: Container[tuple[int, str, int]],
    resolved: SelfImproveRunSpec | None = None,
) -> Iterator[tuple[StartStage, dict]]:
    """(attempt, Job manifest) of every Running attempt that has no Job: neither a live one
    (`jobs`) nor one known to have been deleted (`deleted`), and no creation the API refused
    as invalid (`failed`, by (round, stage, attempt)). The attempt is the planner's StartStage
    when this plan started it (`starts`, by Job name), else rebuilt from the status: an attempt
    recorded before its Job was created (the operator died in between, or the create failed)
    gets the same Job, under the same name. `resolved` is `spec` preset-resolved, when the
    caller has it.

    Lazy, in the status's order: the caller creates each Job before the next is looked at, so a
    Job cached meanwhile (a watch event, an adopted 409) is not asked for again."""
    # Pain #8: a finished run starts nothing, whatever its status still says; nor does a
    # suspended one (the planner suspends its attempts in the same pass).
    if is_terminal(status) or spec.suspend:
        return
    for rnd, st in running_stages(status):
        if not st.job or st.job in jobs or st.job in deleted:
            continue
        if (rnd, st.name, st.attempts) in failed:
            continue
        start = starts.get(st.job) or StartStage(
            rnd, st.name, st.attempts, st.job,
            build_task(resolved or resolve(spec), status, identity, rnd, st.name, st.attempts))
        yield start, build_job(run, spec, start, config)


def jobs_to_delete(
    run_uid: str | None,
    jobs: Mapping[str, JobBody],
    status: SelfImproveRunStatus,
    stops: Container[str],
) -> list[tuple[str, str]]:
    """(Job name, why) of the unfinished Jobs that no longer belong to a Running attempt: the
    attempt was suspended (`stops`, the planner's SuspendStage Job names), superseded, or its
    stage failed permanently while the pod was still pending (image pull errors), so it holds no
    GPU or quota in vain. Safe on a stale status: attempt numbers only grow, so an older status
    marks fewer Jobs as stale, never more. Jobs being deleted, finished Jobs, Jobs of another
    controller and Jobs of a stage the status does not know are left alone."""
    current = {(r.round, s.name): (s.attempts, s.state) for r in status.rounds for s in r.stages}
    stale: list[tuple[str, str]] = []
    for name, job in list(jobs.items()):
        if finished(job) or (job.get("metadata") or {}).get("deletionTimestamp"):
            continue
        if controller_uid(job) not in (run_uid, None):
            continue
        sk = stage_key(job)
        if sk is None or (sk[0], sk[1]) not in current:
            continue
        attempts, st = current[(sk[0], sk[1])]
        if name in stops or sk[2] < attempts or (sk[2] == attempts and st != "Running"):
            stale.append((name, "suspended" if name in stops else "no longer needed"))
    return stale
