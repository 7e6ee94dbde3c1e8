"""Sharded sampling: the `sample` stage's wall time with N shards ÷ with 1, in one run.

Each shard is a real worker process (`python -m selfimprove_workers TASK`, JOB_COMPLETION_INDEX
=k), all N started at once as an Indexed Job's pods are; the last to commit merges. Printed side
by side: wall time of 1 shard, of N shards, their ratio, and the parts a GPU estimate needs —
per process the model/engine load time (wall − generation) and the generation time. On N GPUs
each pod loads the model once and generates 1/N of the rows, so

    T_N ≈ load + gen_1 / N + merge,   speedup(N) = (load + gen_1) / (load + gen_1 / N + merge)

On this project's shared 2-core CPU machine the N processes compete for the same cores (and
vLLM's CPU backend already uses them all), so the measured ratio here says little about GPUs;
the formula with the measured load and generation times is the figure to read.

    .venv/bin/python bench/bench_shards.py [--shards 2] [--questions 16] [--paths 4] [--max-tokens 32]
    .venv/bin/python bench/bench_shards.py --smoke   # 4 questions, 2 paths, 8 tokens: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--paths", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--engine", default="vllm")
    ap.add_argument("--smoke", action="store_true", help="a tiny run that checks the script works; figures mean nothing")
    args = ap.parse_args()
    if args.smoke:
        args.questions, args.paths, args.max_tokens = 4, 2, 8
    tmp = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    try:
        _bench(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.smoke:
        print("smoke run: the figures above mean nothing")


def _bench(args: argparse.Namespace, tmp: Path) -> None:
    from selfimprove_workers.demo.tinymodel import build_tiny_llama

    model = build_tiny_llama(tmp / "model", seed=0)
    qfile = tmp / "q.jsonl"
    qfile.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} plus {i + 3}?"}) + "\n"
                             for i in range(args.questions)))

    def run(shards: int) -> tuple[float, list[dict]]:
        out = tmp / f"out-{shards}"
        task = {"run": {"name": "bench"}, "round": 1, "stage": "sample", "output": str(out),
                "model": {"base": str(model)}, "engine": {"kind": args.engine}, "shards": shards,
                "inputs": {"questions": str(qfile)},
                "sampling": {"paths": args.paths, "temperature": 1.0, "maxTokens": args.max_tokens, "seed": 1}}
        tfile = tmp / f"task-{shards}.json"
        tfile.write_text(json.dumps(task))
        t0 = time.perf_counter()
        procs = []
        for k in range(shards):
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TERMINATION_LOG": str(tmp / f"term-{shards}-{k}")}
            if shards > 1:
                env["JOB_COMPLETION_INDEX"] = str(k)
            procs.append(subprocess.Popen([sys.executable, "-m", "selfimprove_workers", str(tfile)], env=env,
                                          stderr=subprocess.DEVNULL))
            # wall time per process, for load = wall - generation
        # Each process's wall time is taken when it ends, in whatever order they end.
        walls: list[float | None] = [None] * shards
        while any(w is None for w in walls):
            for k, p in enumerate(procs):
                if walls[k] is None and p.poll() is not None:
                    if p.returncode != 0:
                        raise SystemExit(f"shard {k} failed (exit {p.returncode})")
                    walls[k] = time.perf_counter() - t0
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        dirs = [out] if shards == 1 else [out / "shards" / f"{i:05d}" for i in range(shards)]
        parts = []
        for d, w in zip(dirs, walls, strict=True):
            details = json.loads((d / "result.json").read_text())["details"]
            assert w is not None
            parts.append({"wall": w, "generation": float(details["generationSeconds"])})
        if shards > 1:
            assert (out / "samples.jsonl").read_bytes() == (tmp / "out-1" / "samples.jsonl").read_bytes()
        return wall, parts

    w1, p1 = run(1)
    wn, pn = run(args.shards)
    load = p1[0]["wall"] - p1[0]["generation"]
    gen = p1[0]["generation"]
    n = args.shards
    print(f"{args.questions} questions × {args.paths} paths, {args.max_tokens} tokens, engine {args.engine}, "
          f"{os.cpu_count()} CPU cores (shared)")
    print(f"{'':28}{'1 shard':>10}{f'{n} shards':>12}{'ratio':>8}")
    print(f"{'wall s':28}{w1:10.1f}{wn:12.1f}{wn / w1:8.2f}")
    print(f"{'generation s (max shard)':28}{gen:10.1f}{max(p['generation'] for p in pn):12.1f}"
          f"{max(p['generation'] for p in pn) / gen:8.2f}")
    print(f"{'load+rest s (per process)':28}{load:10.1f}"
          f"{max(p['wall'] - p['generation'] for p in pn):12.1f}")
    print("merged samples.jsonl == 1-shard samples.jsonl: yes")
    est = (load + gen) / (load + gen / n)
    print(f"N GPUs estimate: T_N = load + gen/N = {load:.1f} + {gen:.1f}/{n} = {load + gen / n:.1f} s; "
          f"speedup {est:.2f}× of the ideal {n}× (load is paid once per pod)")


if __name__ == "__main__":
    main()
