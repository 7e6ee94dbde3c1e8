"""The two hard size limits a run meets on a cluster, checked through the real planner: the status
of a 999-round run still fits etcd, and a task too big for one container argument is refused with
the field to change, before any Job exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from planner_sim import RunIdentity, Sim, run_spec
from selfimprove_operator.api import SelfImproveRunStatus
from selfimprove_operator.status_history import FULL_ROUNDS, compact_rounds
from selfimprove_operator.task_limits import MAX_TASK_BYTES, oversize, task_arg

IDENT = RunIdentity("run-name-of-typical-length", "team-namespace", "0b0e8f8c-6d0b-4d6b-9a3e-1f2e3d4c5b6a")
ETCD_LIMIT = 1536 * 1024
# Room left for metadata, managedFields and the spec in the same object.
OBJECT_ROOM = 64 * 1024


def _size(status: SelfImproveRunStatus) -> int:
    return len(json.dumps(status.wire(), separators=(",", ":")).encode())


def _sim(strategy: str, rounds: int, **changes) -> Sim:
    s = run_spec(strategy, {}, {}, rounds={"max": rounds, "patience": 0}, **changes)
    return Sim(s, IDENT)


ROUNDS = 3 * FULL_ROUNDS


@pytest.mark.parametrize("strategy", ["lmsi", "llm2llm"])
def test_a_999_round_run_keeps_its_status_under_etcds_limit(strategy):
    """Every round's stages retried once with a long message (the largest stage detail the
    planner keeps). A real run of ROUNDS rounds, extrapolated to 999 from its own round sizes:
    the last FULL_ROUNDS rounds at the largest full size, every other at the largest compact one
    (the planner's cost grows with the status, so 999 real rounds would take minutes)."""
    sim = _sim(strategy, ROUNDS)
    for _ in range(ROUNDS * 20):
        sim.step(advance=60)                  # past every retry's backoff
        if sim.status.phase in ("Succeeded", "Failed"):
            break
        for key in sim.running():
            if sim.observed[key].attempt == 1:
                sim.fail_all(message="CUDA out of memory. " * 20)
            else:
                sim.succeed_all()
    status = sim.status
    assert status.phase == "Succeeded", status.message
    assert [r.round for r in status.rounds] == list(range(ROUNDS + 1))
    recent, old = status.rounds[-FULL_ROUNDS:], status.rounds[:-FULL_ROUNDS]
    # The recent rounds keep every field; the older ones what the planner and wiring still ask.
    assert all(s.job and s.start_time for r in recent for s in r.stages if s.state == "Succeeded")
    assert all(s.failures == 1 for r in status.rounds[1:] for s in r.stages if s.state == "Succeeded")
    assert all(s.message is None and s.metrics == {} and s.job is None for r in old for s in r.stages)
    assert all(r.accuracy is not None for r in old)            # the headline figures stay
    sizes = [_size(SelfImproveRunStatus(rounds=[r])) for r in status.rounds[1:]]
    full, compact = max(sizes[-FULL_ROUNDS:]), max(sizes[:-FULL_ROUNDS])
    rest = _size(status.model_copy(update={"rounds": []}))
    at_999 = rest + FULL_ROUNDS * full + (999 + 1 - FULL_ROUNDS) * compact
    print(f"rest {rest} B, full round {full} B, compact round {compact} B, 999 rounds {at_999} B")
    assert at_999 < ETCD_LIMIT - OBJECT_ROOM, (rest, full, compact, at_999)
    assert full > 2 * compact   # a real stage's metrics are larger still (bench/bench_limits.py)
    if strategy == "llm2llm":
        # The wiring asks which earlier rounds' augment succeeded: the compact stages still say.
        train = [a for a in sim.starts if a.stage == "train"][-1]
        assert len(train.task.inputs.train) == 1 + (ROUNDS - 1)   # the seed set + each earlier round's


def test_compaction_is_idempotent_and_keeps_the_last_rounds():
    sim = _sim("lmsi", 15)
    sim.run_to_end(limit=200)
    status = sim.status.model_copy(deep=True)
    assert compact_rounds(status) == 0            # the planner already did it
    assert len(status.rounds) == 16
    assert compact_rounds(status, keep=3) == FULL_ROUNDS - 3   # only the full ones change
    assert all(s.output is None for r in status.rounds[:-3] for s in r.stages)
    assert all(s.output for r in status.rounds[-3:] for s in r.stages if s.state == "Succeeded")


def test_a_task_over_one_container_argument_fails_the_stage_naming_the_field():
    big = [{"question": "q" * 1000, "rationale": "r" * 1100, "answer": "42"}] * 64
    sim = _sim("lmsi", 1, task={"fewShot": big})
    sim.step()
    assert sim.starts == []                         # no Job: its container could not start
    assert sim.status.phase == "Failed"
    [stage] = sim.status.rounds[0].stages
    assert stage.state == "Failed" and stage.reason == "BadInput"
    assert "task.fewShot" in stage.message and "task.fewShotFile" in stage.message
    assert "131,071 B" in stage.message


def test_the_limit_is_the_kernels():
    """MAX_TASK_BYTES is what execve really takes in one argument here: one byte more is E2BIG."""
    ok = "x" * MAX_TASK_BYTES
    subprocess.run([sys.executable, "-c", "pass", ok], check=True, env={"PATH": os.environ.get("PATH", "")})
    with pytest.raises(OSError) as exc:
        subprocess.run([sys.executable, "-c", "pass", ok + "x"], env={"PATH": os.environ.get("PATH", "")})
    assert exc.value.errno == 7  # E2BIG


def test_a_task_under_the_limit_passes_and_is_what_the_job_carries():
    sim = _sim("lmsi", 1, task={"fewShot": [{"question": "q" * 300, "rationale": "r" * 600, "answer": "4"}] * 64})
    sim.step()
    [start] = sim.starts
    assert oversize(start.task) is None
    from selfimprove_operator.k8s.config import OperatorConfig
    from selfimprove_operator.k8s.jobs import build_job

    run = {"metadata": {"name": IDENT.name, "namespace": IDENT.namespace, "uid": IDENT.uid}}
    job = build_job(run, sim.spec, start, OperatorConfig())
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == [task_arg(start.task)]
