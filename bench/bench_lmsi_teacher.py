"""Teacher→student LMSI (strategy `lmsi-teacher`) on the demo task, end to end on CPU.

The student is the demo's warm-started tiny Llama (`python -m selfimprove_workers.demo prepare`,
greedy dev accuracy ≈ 50%). The teacher is the same model warm-started further on the same
labeled warm-start set, half of it in the one-shot layout the sample stage renders (an exemplar
block before the question), until its greedy dev accuracy reaches `--teacher-target` (at most
`--teacher-steps` steps; the dev accuracy it reached is printed): a labeler that can read
exemplars. (In the run measured for the README, 250 steps left its zero-shot greedy dev accuracy
at 49% against the student's 57%: it is the better labeler only through its one-shot vote. The
demo model itself as teacher does not work: never trained on a one-shot layout, it answers such
prompts with garbage its vote agrees on, and a student trained on that collapsed to 1%.) The run (local executor, real vLLM / transformers / peft stage
processes) then has the teacher sample and vote, the student train and be evaluated, and the
student's confident agreed answers become the teacher's exemplar for the next round.

Printed: per round the student's held-out (and validation) accuracy, the teacher's kept set
(size, label accuracy against the demo's answer key) and the exemplars chosen. Then a control:
round 2's sample task again, same seed, but with round 1's exemplars — the difference between
the two kept sets is what the refresh changed.

    .venv/bin/python bench/bench_lmsi_teacher.py [--rounds 2] [--storage DIR]
    .venv/bin/python bench/bench_lmsi_teacher.py --smoke      # tiny models, seconds-long stages
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SMOKE_PARAMS = {"n_warm": 64, "n_unlabeled": 8, "n_eval": 8, "n_dev": 8, "steps": 20, "eval_every": 10,
                "target_accuracy": 1.0,
                "model": {"hidden": 64, "layers": 1, "heads": 2, "intermediate": 64, "max_positions": 256}}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare_student(cache: Path, smoke: bool) -> dict:
    cmd = [sys.executable, "-m", "selfimprove_workers.demo", "prepare", "--seed", "0", "--out", str(cache / "seed-0")]
    if smoke:
        cmd += ["--params", json.dumps(SMOKE_PARAMS)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def one_shot_rows(rows: list[dict], seed: int) -> list[dict]:
    """Every warm-start row, and again with another row as a one-shot exemplar placed exactly as
    the sample stage renders it (`Question: q'\\nAnswer: rationale\\n#### a'\\n\\nQuestion: q\\nAnswer:`)."""
    from selfimprove_workers.demo.arithmetic import parse_answer

    rng = random.Random(seed)
    out = list(rows)
    for r in rows:
        ex = rng.choice(rows)
        rationale = ex["answer"].rsplit("####", 1)[0].strip()
        out.append({"question": f"{ex['question']}\nAnswer: {rationale}\n#### {parse_answer(ex['answer'])}\n\nQuestion: {r['question']}",
                    "answer": r["answer"]})
    rng.shuffle(out)
    return out


def prepare_teacher(student: dict, cache: Path, target: float, steps: int, smoke: bool) -> dict:
    from selfimprove_workers.demo.warmstart import warm_start

    data = Path(student["data"]["warmstart"])
    rows = one_shot_rows(read_jsonl(data), seed=0)
    return warm_start(cache / "teacher-seed-0", rows, base_model_dir=student["model"], steps=20 if smoke else steps,
                      lr=3e-3, batch_size=16, seed=1, dev_data=student["data"]["dev"],
                      target_accuracy=None if smoke else target, eval_every=50, log_every=0 if smoke else 50)


MANIFEST = """\
apiVersion: selfimprove.dev/v1alpha1
kind: SelfImproveRun
metadata: {{name: teacher-student}}
spec:
  strategy: lmsi-teacher
  model: {{base: {student}, teacher: {teacher}}}
  data: {{questions: {unlabeled}, validation: {dev}, evaluation: {eval}}}
  task:
    answer: {{type: number}}
    cotTrigger: ""
    answerTemplate: "#### {{answer}}"
    chatTemplate: false
    fewShot: [{exemplar}]
  engine: {{kind: {engine}, enforceEager: true, maxModelLen: 256, maxLoraRank: 32, mergeAdapter: true}}
  sampling: {{paths: {paths}, temperature: 1.0, maxTokens: 80}}
  filters: [{{consistency: {{minConfidence: {keep}}}}}]
  training:
    formats: [zeroShotCot]
    lora: {{r: 32, alpha: 64, dropout: 0.0, targetModules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}
    epochs: 2
    learningRate: 3.0e-3
    batchSize: 16
    maxLength: 256
    from: base
  evaluation: {{format: zeroShotCot, maxTokens: 80}}
  exemplars: {{count: 1, selection: {selection}, questions: {questions}, paths: 8, temperature: 1.0, maxTokens: 80, minConfidence: {keep}}}
  rounds: {{max: {rounds}, patience: 0}}
  resources: {{gpus: 0}}
  storage: {{uri: ./runs}}
"""


def local_dir(uri: str) -> Path:
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(uri).path)) if uri.startswith("file://") else Path(uri)


def kept_set(votes: Path, threshold: float) -> dict[str, str]:
    return {v["id"]: v["majority"] for v in read_jsonl(votes) if v["majority"] is not None and v["confidence"] >= threshold}


def label_accuracy(kept: dict[str, str], key: dict[str, str]) -> float:
    return sum(key.get(i) == a for i, a in kept.items()) / len(kept) if kept else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "demo-teacher")
    ap.add_argument("--storage", type=Path, default=None)
    ap.add_argument("--teacher-target", type=float, default=0.65)
    ap.add_argument("--teacher-steps", type=int, default=250, help="most further warm-start steps of the teacher")
    ap.add_argument("--selection", choices=("confidence", "diverse"), default="confidence")
    ap.add_argument("--engine", choices=("vllm", "transformers"), default="vllm")
    ap.add_argument("--smoke", action="store_true", help="tiny models, 2 paths: checks that the script runs")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-lmsi-teacher-"))
    cache = tmp / "cache" if args.smoke else args.cache
    storage = args.storage or tmp / "runs"
    rounds = args.rounds
    keep = 0.0 if args.smoke else 0.6   # the consistency filter's bar (and the exemplars' minConfidence)
    t0 = time.monotonic()

    from selfimprove_workers.demo.arithmetic import parse_answer

    student = prepare_student(cache, args.smoke)
    teacher = prepare_teacher(student, cache, args.teacher_target, args.teacher_steps, args.smoke)
    print(f"student: {student['model']} (dev greedy {student['warmStart'].get('dev_accuracy')}); "
          f"teacher: {cache / 'teacher-seed-0'} (dev greedy {teacher.get('dev_accuracy')}, {teacher.get('steps')} more steps)",
          flush=True)
    student_model, teacher_model = student["model"], str(cache / "teacher-seed-0")
    warm = read_jsonl(Path(student["data"]["warmstart"]))
    seed_ex = warm[0]
    exemplar = json.dumps({"question": seed_ex["question"], "rationale": seed_ex["answer"].rsplit("####", 1)[0].strip(),
                           "answer": parse_answer(seed_ex["answer"])})
    manifest = tmp / "run.yaml"
    manifest.write_text(MANIFEST.format(
        student=student_model, teacher=teacher_model, unlabeled=student["data"]["unlabeled"],
        dev=student["data"]["dev"], eval=student["data"]["eval"], exemplar=exemplar, engine=args.engine,
        paths=2 if args.smoke else 16, selection=args.selection, questions=4 if args.smoke else 64, rounds=rounds,
        keep=keep))
    proc = subprocess.run([sys.executable, "-m", "selfimprove_operator.cli", "run", str(manifest), "--storage", str(storage)],
                          capture_output=True, text=True)
    status_file = next(storage.glob("*/teacher-student/status.json"), None)
    if proc.returncode != 0 or status_file is None:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
        return 1
    status = json.loads(status_file.read_text())
    run_dir = status_file.parent
    key = {r["id"]: parse_answer(r["answer"]) for r in read_jsonl(Path(student["data"]["unlabeled"]).with_name("unlabeled.answers.jsonl"))}

    print(f"\nstrategy lmsi-teacher, {rounds} round(s), selection on {status.get('selectedOn')}; best round "
          f"{status.get('bestRound')} (held-out {status.get('bestAccuracy')})")
    print("| round | student held-out acc | student validation acc | teacher kept questions | their label acc | exemplar(s) for the next round |")
    print("|---|---|---|---|---|---|")
    for r in status["rounds"]:
        n = r["round"]
        kept = "—"
        if n > 0:
            k = kept_set(run_dir / f"round-{n:03d}" / "sample" / "votes.jsonl", keep)
            kept = f"{len(k)} | {label_accuracy(k, key):.1%}"
        else:
            kept = "— | —"
        chosen_file = run_dir / f"round-{n:03d}" / "exemplars" / "chosen.jsonl"
        chosen = "; ".join(f"{c['source']}: {c['question']} → {c['answer']} (student conf {c['studentConfidence']})"
                           for c in read_jsonl(chosen_file)) if chosen_file.exists() else "—"
        va = r.get("validationAccuracy")
        print(f"| {n} | {r.get('accuracy', 0):.1%} | {va:.1%} | {kept} | {chosen} |" if va is not None else
              f"| {n} | {r.get('accuracy', 0):.1%} | — | {kept} | {chosen} |")

    if rounds >= 2:
        control(status, run_dir, manifest, key, tmp, keep)
    print(f"\n{time.monotonic() - t0:.0f}s in all; artifacts under {run_dir}")
    if args.smoke:
        print("smoke run: tiny models and 2 paths; the figures mean nothing")
    return 0


def control(status: dict, run_dir: Path, manifest: Path, key: dict[str, str], tmp: Path, keep: float) -> None:
    """Round 2's sample task again (same seed, same teacher), with round 1's exemplars instead of
    the refreshed ones: the kept-set difference is the refresh's doing alone."""
    from selfimprove_operator.api import SelfImproveRunStatus
    from selfimprove_operator.manifest import load_runs
    from selfimprove_operator.planner import RunIdentity, build_task
    from selfimprove_operator.presets import resolve

    [run] = load_runs(manifest)
    st = SelfImproveRunStatus.model_validate(status)
    prefix = status["artifacts"]
    spec = resolve(run.spec.model_copy(update={"storage": run.spec.storage.model_copy(update={"uri": prefix.rsplit("/", 3)[0]})}))
    real = build_task(spec, st, RunIdentity(name=run.metadata.name, namespace=prefix.rstrip("/").split("/")[-2]), 2, "sample", 1)
    assert real.output.rstrip("/") == f"{prefix.rstrip('/')}/round-002/sample", (real.output, prefix)
    before = build_task(spec, st, RunIdentity(name=run.metadata.name, namespace="x"), 1, "sample", 1).prompting
    ctl = real.model_copy(update={"prompting": before, "output": (tmp / "control" / "sample").as_uri() + "/"})
    task_file = tmp / "control.json"
    task_file.write_text(json.dumps(ctl.wire()))
    subprocess.run([sys.executable, "-m", "selfimprove_workers", str(task_file)], check=True, capture_output=True)
    refreshed = kept_set(run_dir / "round-002" / "sample" / "votes.jsonl", keep)
    old = kept_set(tmp / "control" / "sample" / "votes.jsonl", keep)
    changed = sum(old.get(i) != a for i, a in refreshed.items() if i in old)
    print(f"\ncontrol (round 2's teacher sampling, same seed, round 1's exemplars): kept {len(old)} "
          f"(label acc {label_accuracy(old, key):.1%}) vs refreshed {len(refreshed)} (label acc {label_accuracy(refreshed, key):.1%}); "
          f"only with the refresh {len(set(refreshed) - set(old))}, only without {len(set(old) - set(refreshed))}, "
          f"same question another label {changed}")


if __name__ == "__main__":
    sys.exit(main())
