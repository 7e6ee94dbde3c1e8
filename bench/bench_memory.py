"""Peak memory of the filter and sample stages as their input grows 10×: flat, or linear?

Each size runs the real stage (`python -m selfimprove_workers TASK`, the Job's entrypoint) in
its own process on a synthetic sample output (samples.jsonl + votes.jsonl: `--paths` paths of
`--text-bytes` each per question) with the consistency filter (no model), and reads the
process's peak RSS from its own rusage (wait4) when it exits. The inputs' sizes on disk
are printed beside it, so RSS growing with them shows what the stage holds in memory.

`--filter distributionShift` adds a scoring filter after consistency: the tiny random Llama
(built here, transformers engine, CPU) computes every candidate's loss, chunk by chunk
(`--chunk` candidates, committed as they finish); the baseline is then a process that imports
torch and loads that model. Keep `--text-bytes` small there: the CPU scores every token.

    .venv/bin/python bench/bench_memory.py [--questions 200 2000 20000] [--paths 16] [--text-bytes 400]
    .venv/bin/python bench/bench_memory.py --filter distributionShift --questions 200 2000 --text-bytes 40

`--stage sample` runs the sample stage instead, on `--questions` synthetic questions with the
tiny random Llama through the transformers engine (CPU; vLLM's CPU build would add its own
start-up memory, not the stage's), `--paths` paths of `--max-tokens` tokens each, chunked by
`--chunk` questions; the size column is then the samples.jsonl it wrote. The baseline is a process
that imports the stage and loads the model.

    .venv/bin/python bench/bench_memory.py --stage sample --questions 40 400 --paths 4 --max-tokens 24 --chunk 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


def filter_task(root: Path, kind: str = "consistency", model: Path | None = None) -> dict:
    filters: list[dict] = [{"consistency": {"minConfidence": 0.5}}]
    body: dict = {"strategy": "lmsi", "model": {"base": f"file://{model or root / 'model'}/"},
                  "data": {"questions": f"file://{root}/q.jsonl", "evaluation": f"file://{root}/e.jsonl"},
                  "rounds": {"max": 1, "patience": 0}, "storage": {"uri": f"file://{root}/runs"}, "filters": filters}
    if kind == "distributionShift":
        filters.append({"distributionShift": {"keep": 0.5}})
        body["data"]["validation"] = f"file://{root}/v.jsonl"
        body["engine"] = {"kind": "transformers"}
        (root / "v.jsonl").write_text(json.dumps({"question": "What is 1 + 1?", "answer": "1 + 1 = 2.\n#### 2"}) + "\n")
    spec = SelfImproveRunSpec.model_validate(body)
    ident = RunIdentity("mem", "default", "bench")
    status = plan(spec, None, {}, datetime(2026, 1, 1, tzinfo=UTC), ident).status
    return build_task(resolve(spec), status, ident, 1, "filter", 1).wire()


def sample_task(root: Path, questions: int, paths: int, max_tokens: int, model: Path) -> dict:
    with (root / "q.jsonl").open("w") as f:
        for q in range(questions):
            f.write(json.dumps({"id": f"q{q}", "question": f"What is {q} plus {q % 7}?"}) + "\n")
    (root / "e.jsonl").write_text(json.dumps({"id": "e0", "question": "What is 0?", "answer": "0"}) + "\n")
    body: dict = {"strategy": "lmsi", "model": {"base": f"file://{model}/"}, "engine": {"kind": "transformers"},
                  "data": {"questions": f"file://{root}/q.jsonl", "evaluation": f"file://{root}/e.jsonl"},
                  "sampling": {"paths": paths, "maxTokens": max_tokens, "temperature": 1.0},
                  "rounds": {"max": 1, "patience": 0}, "storage": {"uri": f"file://{root}/runs"},
                  "filters": [{"consistency": {"minConfidence": 0.5}}]}
    spec = SelfImproveRunSpec.model_validate(body)
    ident = RunIdentity("mem", "default", "bench")
    status = plan(spec, None, {}, datetime(2026, 1, 1, tzinfo=UTC), ident).status
    return build_task(resolve(spec), status, ident, 1, "sample", 1).wire()


def peak_rss_of(command: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Peak RSS (MiB) of one child, its wall seconds and exit code: the rusage of that child
    alone (wait4), so an earlier, bigger child cannot mask it as RUSAGE_CHILDREN's maximum would."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            print(err.read()[-2000:], file=sys.stderr)
    return usage.ru_maxrss / 1024, time.monotonic() - t0, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=["filter", "sample"], default="filter")
    ap.add_argument("--questions", type=int, nargs="+", default=[200, 2000, 20000])
    ap.add_argument("--max-tokens", type=int, default=24, help="--stage sample: tokens per path")
    ap.add_argument("--paths", type=int, default=16)
    ap.add_argument("--text-bytes", type=int, default=400)
    ap.add_argument("--filter", choices=["consistency", "distributionShift"], default="consistency",
                    help="distributionShift: consistency, then losses from the tiny Llama (transformers, CPU)")
    ap.add_argument("--chunk", type=int, default=None,
                    help="rows per chunk (SELFIMPROVE_CHUNK_ROWS): candidates for filter, questions for sample")
    ap.add_argument("--smoke", action="store_true", help="20 and 200 questions: checks that the bench runs")
    args = ap.parse_args()
    if args.smoke:
        args.questions = [20, 200]
        print("smoke run: toy sizes, to check that the bench runs; the figures mean nothing")
    env0 = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.chunk:
        env0["SELFIMPROVE_CHUNK_ROWS"] = str(args.chunk)
    model_tmp = tempfile.TemporaryDirectory(prefix="bench-memory-model-")
    model = None
    if args.stage == "sample":
        return bench_sample(args, env0, Path(model_tmp.name))
    if args.filter == "distributionShift":
        from selfimprove_workers.demo.tinymodel import build_tiny_llama

        model = build_tiny_llama(Path(model_tmp.name) / "tiny", seed=0, max_positions=2048)
        load = ("from selfimprove_workers.engines.hf import load_causal_lm; import selfimprove_workers.stages.filter; "
                f"load_causal_lm({str(model)!r}, 'float32', 'cpu')")
        baseline, _, _ = peak_rss_of([sys.executable, "-c", load], env0)
        what = "importing torch and loading the tiny Llama"
    else:
        baseline, _, _ = peak_rss_of([sys.executable, "-c", "import selfimprove_workers.runtime, selfimprove_workers.stages.filter"],
                                     env0)
        what = "importing the worker alone"
    print(f"filter stage, {' + '.join(['consistency'] + ([args.filter] if model else []))} filter, "
          f"{args.paths} paths × ~{args.text_bytes} B per question; {what} peaks at {baseline:.0f} MiB")
    print(f"{'questions':>9} {'candidates':>10} {'input MiB':>9} {'peak RSS MiB':>12} {'over import':>11} {'wall s':>7}")
    rows = []
    for n in sorted(args.questions):
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            task = filter_task(Path(tmp), args.filter, model)
            size = write_inputs(task, n, args.paths, args.text_bytes)
            task_file = Path(tmp) / "task.json"
            task_file.write_text(json.dumps(task))
            env = {**env0, "TERMINATION_LOG": str(Path(tmp) / "termination-log")}
            peak, wall, rc = peak_rss_of([sys.executable, "-m", "selfimprove_workers", str(task_file)], env)
            if rc != 0:
                print(f"the filter stage exited with {rc} at {n} questions", file=sys.stderr)
                return 1
            rows.append((n, peak))
            print(f"{n:>9,} {n * args.paths:>10,} {size / 2**20:>9.1f} {peak:>12.1f} {peak - baseline:>11.1f} {wall:>7.1f}")
    (n0, p0), (n1, p1) = rows[0], rows[-1]
    print(f"{n1 / n0:.0f}× the questions: {(p1 - baseline) / max(p0 - baseline, 1e-9):.1f}× the stage's own memory "
          f"(+{p1 - p0:.1f} MiB)")
    model_tmp.cleanup()
    return 0


def bench_sample(args: argparse.Namespace, env0: dict[str, str], scratch: Path) -> int:
    from selfimprove_workers.demo.tinymodel import build_tiny_llama

    model = build_tiny_llama(scratch / "tiny", seed=0, max_positions=2048)
    load = ("from selfimprove_workers.engines.hf import load_causal_lm; import selfimprove_workers.stages.sample; "
            f"load_causal_lm({str(model)!r}, 'float32', 'cpu')")
    baseline, _, _ = peak_rss_of([sys.executable, "-c", load], env0)
    print(f"sample stage, transformers engine, tiny Llama, {args.paths} paths × {args.max_tokens} tokens per question, "
          f"chunks of {env0.get('SELFIMPROVE_CHUNK_ROWS', 'the default')} questions; importing torch and loading "
          f"the model peaks at {baseline:.0f} MiB")
    print(f"{'questions':>9} {'paths':>10} {'output MiB':>10} {'peak RSS MiB':>12} {'over load':>9} {'wall s':>7}")
    rows = []
    for n in sorted(args.questions):
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            task = sample_task(Path(tmp), n, args.paths, args.max_tokens, model)
            task_file = Path(tmp) / "task.json"
            task_file.write_text(json.dumps(task))
            env = {**env0, "TERMINATION_LOG": str(Path(tmp) / "termination-log")}
            peak, wall, rc = peak_rss_of([sys.executable, "-m", "selfimprove_workers", str(task_file)], env)
            if rc != 0:
                print(f"the sample stage exited with {rc} at {n} questions", file=sys.stderr)
                return 1
            size = sum(p.stat().st_size for p in Path(tmp, "runs").rglob("samples.jsonl") if "chunks" not in p.parts)
            rows.append((n, peak))
            print(f"{n:>9,} {n * args.paths:>10,} {size / 2**20:>10.2f} {peak:>12.1f} {peak - baseline:>9.1f} {wall:>7.1f}")
    (n0, p0), (n1, p1) = rows[0], rows[-1]
    print(f"{n1 / n0:.0f}× the questions: {(p1 - baseline) / max(p0 - baseline, 1e-9):.1f}× the stage's own memory "
          f"(+{p1 - p0:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
