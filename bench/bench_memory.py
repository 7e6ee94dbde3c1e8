"""Peak memory of the filter stage as its input grows 10×: is it flat, or linear in the input?

Each size runs the real stage (`python -m selfimprove_workers TASK`, the Job's entrypoint) in
its own process on a synthetic sample output (samples.jsonl + votes.jsonl: `--paths` paths of
`--text-bytes` each per question) with the consistency filter (no model), and reads the
process's peak RSS from getrusage(RUSAGE_CHILDREN) after it exits. The inputs' sizes on disk
are printed beside it, so RSS growing with them shows what the stage holds in memory.

    .venv/bin/python bench/bench_memory.py [--questions 200 2000 20000] [--paths 16] [--text-bytes 400]

Not measured here: the sample stage (needs vLLM and a model; it holds every completion of the
run until it writes, see docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from selfimprove_operator.api import SelfImproveRunSpec
from selfimprove_operator.planner import RunIdentity, build_task, plan
from selfimprove_operator.presets import resolve


def write_inputs(task: dict, questions: int, paths: int, text_bytes: int, seed: int = 0) -> int:
    rnd = random.Random(seed)
    samples = Path(task["inputs"]["samples"].removeprefix("file://"))
    votes = Path(task["inputs"]["votes"].removeprefix("file://"))
    samples.parent.mkdir(parents=True, exist_ok=True)
    for pinned in task["pinned"]:  # the run's data files: the stage checks they still exist
        Path(pinned["uri"].removeprefix("file://")).write_text('{"id": "q0", "question": "What is 0?", "answer": "0"}\n')
    filler = "x" * text_bytes
    with samples.open("w") as s, votes.open("w") as v:
        for q in range(questions):
            majority = str(rnd.randrange(10))
            answers = [majority if rnd.random() < 0.8 else str(rnd.randrange(10)) for _ in range(paths)]
            confidence = answers.count(majority) / paths
            for p, a in enumerate(answers):
                s.write(json.dumps({"id": f"q{q}", "question": f"What is {q}?", "path": p,
                                    "text": f"{filler} The answer is {a}.", "answer": a}) + "\n")
            v.write(json.dumps({"id": f"q{q}", "majority": majority, "confidence": confidence,
                                "entropy": round(1 - confidence, 6)}) + "\n")
    return samples.stat().st_size + votes.stat().st_size


def filter_task(root: Path) -> dict:
    body = {"strategy": "lmsi", "model": {"base": f"file://{root}/model/"},
            "data": {"questions": f"file://{root}/q.jsonl", "evaluation": f"file://{root}/e.jsonl"},
            "rounds": {"max": 1, "patience": 0}, "storage": {"uri": f"file://{root}/runs"},
            "filters": [{"consistency": {"minConfidence": 0.5}}]}
    spec = SelfImproveRunSpec.model_validate(body)
    ident = RunIdentity("mem", "default", "bench")
    status = plan(spec, None, {}, datetime(2026, 1, 1, tzinfo=UTC), ident).status
    return build_task(resolve(spec), status, ident, 1, "filter", 1).wire()


def peak_rss_of(command: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Peak RSS (MiB) of one child, its wall seconds and exit code (each call forks a fresh
    process, so RUSAGE_CHILDREN's maximum is this child's: a bigger earlier child would mask it,
    hence the sizes run in increasing order)."""
    t0 = time.monotonic()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.monotonic() - t0, done.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, nargs="+", default=[200, 2000, 20000])
    ap.add_argument("--paths", type=int, default=16)
    ap.add_argument("--text-bytes", type=int, default=400)
    ap.add_argument("--smoke", action="store_true", help="20 and 200 questions: checks that the bench runs")
    args = ap.parse_args()
    if args.smoke:
        args.questions = [20, 200]
        print("smoke run: toy sizes, to check that the bench runs; the figures mean nothing")
    baseline, _, _ = peak_rss_of([sys.executable, "-c", "import selfimprove_workers.runtime, selfimprove_workers.stages.filter"],
                                 dict(os.environ))
    print(f"filter stage, consistency filter, {args.paths} paths × ~{args.text_bytes} B per question; "
          f"importing the worker alone peaks at {baseline:.0f} MiB")
    print(f"{'questions':>9} {'candidates':>10} {'input MiB':>9} {'peak RSS MiB':>12} {'over import':>11} {'wall s':>7}")
    rows = []
    for n in sorted(args.questions):
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            task = filter_task(Path(tmp))
            size = write_inputs(task, n, args.paths, args.text_bytes)
            task_file = Path(tmp) / "task.json"
            task_file.write_text(json.dumps(task))
            env = {**os.environ, "TERMINATION_LOG": str(Path(tmp) / "termination-log")}
            peak, wall, rc = peak_rss_of([sys.executable, "-m", "selfimprove_workers", str(task_file)], env)
            if rc != 0:
                print(f"the filter stage exited with {rc} at {n} questions", file=sys.stderr)
                return 1
            rows.append((n, peak))
            print(f"{n:>9,} {n * args.paths:>10,} {size / 2**20:>9.1f} {peak:>12.1f} {peak - baseline:>11.1f} {wall:>7.1f}")
    (n0, p0), (n1, p1) = rows[0], rows[-1]
    print(f"{n1 / n0:.0f}× the questions: {(p1 - baseline) / max(p0 - baseline, 1e-9):.1f}× the stage's own memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
