"""Sizes against the platform's fixed limits, for docs/scaling.md.

Measured on the real models and planner (no cluster needed):
- a stage task's JSON (the Job's single argument) against Linux's per-argument limit
  (MAX_ARG_STRLEN, 128 KiB: execve fails with E2BIG above it, whatever ARG_MAX says) and the
  ~1 MiB object limit, with an empty fewShot list and with 64 exemplars of a given size;
- a run's status per round (from a finished local run's status.json when given one) against
  etcd's 1.5 MiB request limit: how many rounds fit, with and without the planner's compaction
  of older rounds (status_history.py).

    .venv/bin/python bench/bench_limits.py [--status runs/local/<run>/status.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC
from pathlib import Path

from selfimprove_operator.api import SelfImproveRunSpec
from selfimprove_operator.planner import RunIdentity, build_task, plan
from selfimprove_operator.presets import resolve

MAX_ARG_STRLEN = 32 * 4096       # Linux: one argv string, at most (include/uapi/linux/binfmts.h)
OBJECT_LIMIT = 1024 * 1024       # Job object, roughly (etcd's request limit is 1.5 MiB)
ETCD_LIMIT = 1536 * 1024         # etcd --max-request-bytes default


def compact(obj: object) -> int:
    return len(json.dumps(obj, separators=(",", ":"), sort_keys=True).encode())


def task_bytes(examples: int, question: int, rationale: int) -> int:
    from datetime import datetime
    body = {
        "strategy": "lmsi", "model": {"base": "hf://meta-llama/Llama-3.2-1B-Instruct"},
        "data": {"questions": "s3://bucket/gsm8k/train.jsonl", "evaluation": "s3://bucket/gsm8k/test.jsonl"},
        "rounds": {"max": 3, "patience": 1}, "storage": {"uri": "s3://bucket/runs", "secretRef": "creds"},
        "task": {"fewShot": [{"question": "q" * question, "rationale": "r" * rationale, "answer": "42"}] * examples},
    }
    spec = SelfImproveRunSpec.model_validate(body)
    ident = RunIdentity("run-name-of-typical-length", "team-namespace", "0b0e8f8c-6d0b-4d6b-9a3e-1f2e3d4c5b6a")
    status = plan(spec, None, {}, datetime(2026, 1, 1, tzinfo=UTC), ident).status
    return max(compact(build_task(resolve(spec), status, ident, 1, stage, 1).wire())
               for stage in ("sample", "filter", "train", "evaluate"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--status", type=Path, help="a finished run's status.json (local runner)")
    ap.add_argument("--smoke", action="store_true", help="the same (it takes a second): checks that the bench runs")
    args = ap.parse_args()
    if args.smoke:
        print("smoke run: the task sizes are real; no status given")

    print("stage task (the Job's argument), largest of sample/filter/train/evaluate:")
    print(f"{'fewShot':>8} {'question B':>10} {'rationale B':>11} {'task bytes':>11} {'÷128 KiB arg':>13} {'÷1 MiB object':>14}")
    for n, q, r in [(0, 0, 0), (8, 300, 600), (64, 300, 600), (64, 1000, 1000), (64, 2000, 2000)]:
        size = task_bytes(n, max(q, 1), r) if n else task_bytes(0, 1, 0)
        print(f"{n:>8} {q:>10} {r:>11} {size:>11,} {size / MAX_ARG_STRLEN:>13.2f} {size / OBJECT_LIMIT:>14.3f}")
    overhead = (task_bytes(64, 1000, 1000) - task_bytes(0, 1, 0)) / 64 - 2000
    print(f"an exemplar costs its text plus ~{overhead:,.0f} B; with 64 exemplars the argument overflows at "
          f"~{(MAX_ARG_STRLEN - task_bytes(0, 1, 0)) / 64 - overhead:,.0f} B of text per exemplar")

    if args.status:
        from selfimprove_operator.api import SelfImproveRunStatus
        from selfimprove_operator.status_history import FULL_ROUNDS, compact_rounds

        raw = json.loads(args.status.read_text())
        status = SelfImproveRunStatus.model_validate(raw)
        rounds = [r.wire() for r in status.rounds]
        sizes = [compact(r) for r in rounds]
        rest = compact({k: v for k, v in status.wire().items() if k != "rounds"})
        per_round = max(sizes[1:]) if len(sizes) > 1 else sizes[0]
        small = status.model_copy(deep=True)
        compact_rounds(small, keep=0)
        per_compact = max(compact(r.wire()) for r in small.rounds)
        room = ETCD_LIMIT - rest - 16 * 1024  # 16 KiB: metadata, managedFields, spec
        print(f"\nstatus of {args.status}: {compact(status.wire()):,} B; rounds {sizes} B; everything else {rest:,} B")
        print(f"per round {per_round:,} B in full, {per_compact:,} B compacted (status_history.py)")
        print(f"without compaction {room // per_round:,} rounds fit under etcd's 1.5 MiB; with the last "
              f"{FULL_ROUNDS} in full {FULL_ROUNDS + (room - FULL_ROUNDS * per_round) // per_compact:,} "
              f"(spec.rounds.max allows 999)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
