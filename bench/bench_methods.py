"""The methods side by side on the demo task: one table of held-out accuracy per method.

Every method starts from the same warm-started model of a seed (`python -m
selfimprove_workers.demo prepare`, the demo's own cache) and gets the same data: the demo's
400 unlabeled questions, its 150 labeled dev questions as `data.validation` (which picks each
run's best round and which IWSI's distribution-shift weights are computed on) and its 300
held-out questions as `data.evaluation`. Each method is one `selfimprove run` of a manifest
derived from the demo's (`examples/local-arithmetic.yaml`: 16 paths at T 1.0, LoRA r 32 from the
base each round, `rounds.max` rounds), changed only where the method differs:

    sft            plain supervised fine-tuning on the labeled warm-start rows (strategy llm2llm
                   with one round: train on `data.seed`, evaluate), 2 epochs over as many rows as
                   give the seed's LMSI run's total training steps (the same extra steps), at most
                   all 2,000 of them (then fewer steps than LMSI: the table shows both)
    lmsi           consistency >= 0.6 (the demo)
    lmsi-4formats  the same, trained on all four LMSI formats (few-shot with one exemplar)
    iwsi           consistency >= 0.6, then distributionShift keep 0.8 (on the dev split)
    entropy        answer entropy <= 0.5 instead of consistency (MoT, IWSI's baseline)
    self           consistency >= 0.6, then the model's own 0-10 rating, keep 0.5
    judge          consistency >= 0.6, then an LLM judge (the model itself) at AlpaGasus's 4.5
    diversity      consistency >= 0.6, then LTD's coreset, keep 0.5

    seed-sft       plain fine-tuning on a small labeled seed set (`SEED_SET` new labeled questions,
                   none in any other split), one round
    llm2llm        LLM2LLM on the same seed set: each round the student trains from the base on the
                   seed set plus everything the teacher wrote so far, is evaluated on the seed set,
                   and the teacher writes `augment.perExample` new sums for each seed question it got
                   wrong (not in the last round). The teacher is the seed's warm-started model trained
                   further (`selfimprove_workers.demo.teacher`: to 85% dev accuracy, then on the
                   augment stage's own requests), asked with its short instructions
                   (`augment.instructions`, no exemplar); its quality on the dev split is printed

A method whose run fails is a row with the run's message: the demo's 256-position model cannot
read the judge's or the self-rating's prompt, and the stage says so.

Printed per method, over the seeds: held-out accuracy of round 0, of the best round (picked on
validation) and of the last round (mean ± std), the candidates the filters kept per round (for
llm2llm: the teacher's new examples per augmenting round), the
training steps of the whole run, and the wall time.

    .venv/bin/python bench/bench_methods.py [--seeds 0 1 2] [--rounds 3] [--methods lmsi iwsi ...]
    .venv/bin/python bench/bench_methods.py --smoke   # every method, tiny sizes, one round
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from selfimprove_workers.demo.arithmetic import make_problem
from selfimprove_workers.demo.teacher import INSTRUCTIONS as TEACHER_INSTRUCTIONS

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "examples" / "local-arithmetic.yaml"
CONSISTENCY = {"consistency": {"minConfidence": 0.6}}
BATCH = 16  # the demo manifest's training.batchSize
METHODS = ("sft", "lmsi", "lmsi-4formats", "iwsi", "entropy", "self", "judge", "diversity", "seed-sft", "llm2llm")
SEED_SET = 300      # LLM2LLM's labeled seed set (its GSM8K runs: 74 to 747 examples)
PER_EXAMPLE = 1     # new sums the teacher writes per wrong seed question (LLM2LLM's preset; the teacher learned k = 1)
# the teacher's two training steps at toy sizes for --smoke (it writes nothing usable)
SMOKE_TEACHER = {"steps": 20, "target_accuracy": 1.0, "eval_every": 10, "exchanges": 32, "exchange_steps": 10}

# `python -m selfimprove_workers.demo prepare --params` for --smoke (bench_demo.py's small setup).
SMOKE_PARAMS = {"n_warm": 64, "n_unlabeled": 8, "n_eval": 8, "n_dev": 8, "steps": 20, "eval_every": 10,
                "target_accuracy": 1.0,
                "model": {"hidden": 64, "layers": 1, "heads": 2, "intermediate": 64, "max_positions": 256}}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare(seed: int, cache: Path, smoke: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "selfimprove_workers.demo", "prepare", "--seed", str(seed),
           "--out", str(cache / f"seed-{seed}")]
    if smoke:
        cmd += ["--params", json.dumps(SMOKE_PARAMS)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def seed_set(seed: int, prepared: dict[str, Any], n: int, work: Path) -> Path:
    """`n` new labeled questions of the demo task, none in any of the seed's splits."""
    seen = {r["question"] for name in ("warmstart", "unlabeled", "eval", "dev")
            for r in read_jsonl(Path(prepared["data"][name]))}
    rng = random.Random(f"bench-methods-seed-set-{seed}")
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        p = make_problem(rng)
        if p["question"] not in seen:
            seen.add(p["question"])
            rows.append({"id": f"seed-{len(rows):05d}", "question": p["question"], "answer": p["answer"]})
    path = work / f"seed-set-{seed}.jsonl"
    # seed-sft and llm2llm may run at once (--jobs): same content, replaced atomically
    tmp = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


def teacher(seed: int, prepared: dict[str, Any], cache: Path, smoke: bool) -> dict[str, Any]:
    """The seed's LLM2LLM teacher (cached beside its warm-start) and what it writes for the dev split."""
    code = ("import json, sys; from pathlib import Path\n"
            "from selfimprove_workers.demo.arithmetic import read_jsonl\n"
            "from selfimprove_workers.demo.teacher import build_teacher, teacher_quality\n"
            "a = json.loads(sys.argv[1]); warm, dev = read_jsonl(a['warm']), read_jsonl(a['dev'])\n"
            "m = build_teacher(a['model'], a['out'], warm, dev, seed=a['seed'], params=a['params'])\n"
            "q = teacher_quality(m['model'], dev[:a['n']], max_new_tokens=a['tokens'])\n"
            "print(json.dumps({'model': m['model'], 'quality': q, 'steps': [m['arithmetic']['steps'], "
            "m['exchange']['steps']], 'devAccuracy': m['arithmetic']['dev_accuracy']}))\n")
    args = {"warm": prepared["data"]["warmstart"], "dev": prepared["data"]["dev"], "model": prepared["model"],
            "out": str(cache / f"seed-{seed}" / "teacher"), "seed": seed, "params": SMOKE_TEACHER if smoke else {},
            "n": 8 if smoke else 150, "tokens": 40 if smoke else 160}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], stdout=subprocess.PIPE, text=True,
                          check=True, cwd=ROOT)
    return json.loads(proc.stdout.splitlines()[-1])


def manifest(method: str, seed: int, prepared: dict[str, Any], rounds: int, work: Path, storage: Path,
             sft_rows: int, smoke: bool, teacher_dir: str | None = None) -> dict[str, Any]:
    """The demo's manifest for this seed, changed where `method` differs (module docstring)."""
    doc = yaml.safe_load(MANIFEST.read_text())
    spec = doc["spec"]
    data = prepared["data"]
    doc["metadata"]["name"] = f"{method}-seed{seed}"
    spec["model"]["base"] = prepared["model"]
    spec["data"] = {"questions": data["unlabeled"], "validation": data["dev"], "evaluation": data["eval"]}
    spec["rounds"] = {"max": rounds, "patience": 0}
    spec["sampling"]["seed"] = spec["training"]["seed"] = seed  # as `selfimprove demo --seed` applies it
    spec["storage"] = {"uri": str(storage)}
    if smoke:  # every stage once, quickly
        spec["sampling"] = {**spec["sampling"], "paths": 4, "maxTokens": 24}
        spec["training"]["epochs"] = 1
        spec["evaluation"]["maxTokens"] = 24
    if method == "sft":
        rows = read_jsonl(Path(data["warmstart"]))[:sft_rows]
        seed_file = work / f"sft-seed{seed}.jsonl"
        seed_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec["strategy"] = "llm2llm"
        spec["data"] = {"seed": str(seed_file), "validation": data["dev"], "evaluation": data["eval"]}
        spec["rounds"] = {"max": 1, "patience": 0}
        for key in ("sampling", "filters"):
            spec.pop(key, None)
        spec["training"]["epochs"] = 1 if smoke else 2
    elif method in ("seed-sft", "llm2llm"):
        spec["strategy"] = "llm2llm"
        spec["data"] = {"seed": str(seed_set(seed, prepared, 16 if smoke else SEED_SET, work)),
                        "validation": data["dev"], "evaluation": data["eval"]}
        for key in ("sampling", "filters"):
            spec.pop(key, None)
        if method == "seed-sft":
            spec["rounds"] = {"max": 1, "patience": 0}
        else:
            assert teacher_dir is not None
            spec["model"]["teacher"] = teacher_dir
            if smoke:  # the last round does not augment: two, so that the teacher's path runs
                spec["rounds"] = {"max": 2, "patience": 0}
            # the student's and the teacher's contexts differ (256, 1024): each engine takes its model's
            spec["engine"].pop("maxModelLen", None)
            spec["augment"] = {"perExample": PER_EXAMPLE, "temperature": 1.0, "maxTokens": 40 if smoke else 160,
                               "instructions": TEACHER_INSTRUCTIONS, "exemplar": False}
    elif method == "lmsi":
        spec["filters"] = [CONSISTENCY]
    elif method == "lmsi-4formats":
        spec["filters"] = [CONSISTENCY]
        ex = read_jsonl(Path(data["warmstart"]))[0]
        rationale, _, answer = ex["answer"].rpartition("####")
        spec["task"]["fewShot"] = [{"question": ex["question"], "rationale": rationale.strip(),
                                    "answer": answer.strip()}]
        spec["training"]["formats"] = ["fewShotCot", "fewShotDirect", "zeroShotCot", "zeroShotDirect"]
    elif method == "iwsi":
        spec["strategy"] = "iwsi"
        spec["filters"] = [CONSISTENCY, {"distributionShift": {"keep": 0.8}}]
    elif method == "entropy":
        spec["filters"] = [{"entropy": {"max": 0.5}}]
    elif method == "self":
        spec["filters"] = [CONSISTENCY, {"self": {"keep": 0.5}}]
    elif method == "judge":
        spec["filters"] = [CONSISTENCY, {"judge": {"minScore": 4.5}}]
    elif method == "diversity":
        spec["filters"] = [CONSISTENCY, {"diversity": {"keep": 0.5}}]
    else:
        raise SystemExit(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    if smoke:  # a 20-step model agrees with itself on nothing: let every candidate through to the next filter
        spec["filters"] = [{"consistency": {"minConfidence": 0.0}} if "consistency" in f else
                           {"entropy": {"max": 1.0}} if "entropy" in f else f for f in spec.get("filters", [])]
    # the manifest sets sampling, LoRA and epochs itself, so a strategy's preset changes none of them
    return doc


def run(doc: dict[str, Any], work: Path, storage: Path) -> dict[str, Any]:
    name = doc["metadata"]["name"]
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "selfimprove_operator.cli", "run", str(path),
                           "--storage", str(storage), "--workdir", str(work / name)],
                          capture_output=True, text=True, cwd=ROOT)
    seconds = time.monotonic() - t0
    status_file = storage / "local" / name / "status.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    rounds = status.get("rounds") or []
    accs = [r.get("accuracy") for r in rounds]
    out: dict[str, Any] = {"name": name, "seconds": seconds, "phase": status.get("phase"), "accs": accs,
                           "best": status.get("bestAccuracy"), "kept": [], "steps": 0}
    for r in rounds:
        for st in r.get("stages", []):
            m = st.get("metrics") or {}
            if st["name"] == "filter" and "kept" in m:
                out["kept"].append(m["kept"])
            if st["name"] == "augment" and "augmented" in m:  # llm2llm: the teacher's new examples
                out["kept"].append(m["augmented"])
            if st["name"] == "train":
                out["steps"] += int(m.get("steps") or 0)
    if proc.returncode != 0 or status.get("phase") != "Succeeded":
        out["error"] = (status.get("message") or proc.stderr.strip().splitlines()[-1:] or ["no status"])
        if isinstance(out["error"], list):
            out["error"] = " ".join(out["error"])
    return out


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.1%}"
    return f"{statistics.mean(xs):.1%} ± {statistics.stdev(xs) * 100:.1f}"


def table(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| method | seeds | round 0 | best (on validation) | last | kept per round | train steps | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for method, rs in results.items():
        ok = [r for r in rs if "error" not in r]
        failed = [r for r in rs if "error" in r]
        if ok:
            kept = [k for r in ok for k in r["kept"]]
            lines.append(
                f"| {method} | {len(ok)} | {mean_std([r['accs'][0] for r in ok])} | "
                f"{mean_std([r['best'] for r in ok if r['best'] is not None])} | "
                f"{mean_std([r['accs'][-1] for r in ok])} | "
                f"{statistics.mean(kept) if kept else 0:.0f} | {statistics.mean(r['steps'] for r in ok):.0f} | "
                f"{statistics.mean(r['seconds'] for r in ok):.0f} |")
        for r in failed:
            lines.append(f"| {method} | {r['name']} failed | {r['error'][:300]} | | | | | {r['seconds']:.0f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (0 with --smoke)")
    ap.add_argument("--rounds", type=int, default=None, help="LMSI-style rounds per run (default 3; 1 with --smoke)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--cache", type=Path, default=None, help="default: .cache/demo (a temp dir with --smoke)")
    ap.add_argument("--storage", type=Path, default=None, help="default: a fresh temp dir")
    ap.add_argument("--smoke", action="store_true", help="every method at toy sizes, one round (figures mean nothing)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="runs at once (default 1, so that wall times compare; 2 with --smoke, whose toy runs "
                         "wait on process start-up more than on the cores)")
    args = ap.parse_args(argv)
    jobs = args.jobs or (2 if args.smoke else 1)
    seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    rounds = args.rounds or (1 if args.smoke else 3)
    tmp = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    cache = args.cache or (tmp / "cache" if args.smoke else ROOT / ".cache" / "demo")
    storage = args.storage or tmp / "runs"
    if args.smoke:
        print("smoke run: tiny warm-start, 8 questions, one round; the figures mean nothing", flush=True)
    # lmsi first: sft gets its total training steps
    methods = sorted(args.methods, key=lambda m: m != "lmsi")
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS if m in methods}
    for seed in seeds:
        prepared = prepare(seed, cache, args.smoke)
        lmsi_steps = 0
        teacher_dir = None
        if "llm2llm" in methods:
            t = teacher(seed, prepared, cache, args.smoke)
            teacher_dir = t["model"]
            q = t["quality"]
            print(f"seed {seed} teacher: {t['steps'][0]} + {t['steps'][1]} steps, dev greedy {q['taskAccuracy']:.1%}; "
                  f"for the dev questions as wrong ones, {q['parsed']:.1%} of its replies parse, {q['sameTerms']:.1%} "
                  f"keep the number of terms, {q['rightAnswer']:.1%} have the right sum", flush=True)
        def one(method: str) -> tuple[str, dict[str, Any]]:
            sft_rows = max(16, lmsi_steps * BATCH // 2) if lmsi_steps else 500
            return method, run(manifest(method, seed, prepared, rounds, tmp, storage, sft_rows, args.smoke,
                                        teacher_dir), tmp, storage)

        def record(method: str, r: dict[str, Any]) -> None:
            results[method].append(r)
            print(f"seed {seed} {method}: {r['phase']}, accuracy by round "
                  f"{[round(a, 3) for a in r['accs'] if a is not None]}, kept {r['kept']}, {r['steps']} steps, "
                  f"{r['seconds']:.0f}s" + (f" — {r['error']}" if "error" in r else ""), flush=True)

        if "lmsi" in methods:  # first and alone: sft's row count comes from its steps
            record(*one("lmsi"))
            lmsi_steps = results["lmsi"][-1]["steps"]
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for method, r in pool.map(one, [m for m in methods if m != "lmsi"]):
                record(method, r)
    print(f"\nmethods on the demo task: seeds {seeds}, {rounds} round(s); held-out accuracy, mean ± std over seeds")
    print("\n".join(table(results)))
    if args.smoke:
        print("[smoke run: not a measurement]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
