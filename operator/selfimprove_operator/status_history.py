"""Keeps a run's status bounded however many rounds it runs (pure; the planner calls it when
it opens a round).

etcd refuses an object over its request limit (1.5 MiB by default), and the status is part of
the object: at ~1.9 KiB per round of stage detail (messages of every retry, metrics, times,
`completedShards` of sharded stages: up to ~4 KiB each) a long run would stop being able to write
its status near round 800, or round ~150 with 1,000 shards (docs/scaling.md). Only the last
rounds' stage detail is needed to act — the planner and the Job reconciler look at the current
round, the wiring asks which earlier rounds' stages succeeded — so older rounds keep their
headline figures (accuracy, kept, adapter, …) and, per stage, only what those questions need:
name, state, attempts, failures and reason. Everything dropped is still in storage, next to the
round's artifacts (each stage's `result.json`), where `selfimprove report` reads it.
"""

from __future__ import annotations

from .api import SelfImproveRunStatus, StageStatus

# Rounds whose stages keep every field: enough for `kubectl get -o yaml` to show the recent
# history of retries and shards, small enough that a 1,000-shard round (~10 KiB) times this fits.
FULL_ROUNDS = 10
KEPT_STAGE_FIELDS = ("name", "state", "attempts", "failures", "reason")


def compact_stage(stage: StageStatus) -> StageStatus:
    return StageStatus(**{k: getattr(stage, k) for k in KEPT_STAGE_FIELDS})


def compact_rounds(status: SelfImproveRunStatus, keep: int = FULL_ROUNDS) -> int:
    """Strip all but the last `keep` rounds to their summary; returns how many rounds it
    changed (0 when they already were). Idempotent."""
    changed = 0
    for rnd in status.rounds[:-keep] if keep > 0 else status.rounds:
        stages = [compact_stage(s) for s in rnd.stages]
        if stages != rnd.stages:
            rnd.stages = stages
            changed += 1
    return changed
