"""`selfimprove demo`: prepare the arithmetic task and its warm-started model, then run LMSI.

The preparation runs as a worker process (`python -m selfimprove_workers.demo prepare`), so the
control plane still never imports torch; both the data and the model are cached by their
parameters, so a second demo goes straight to the rounds (which themselves resume).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .manifest import ManifestInvalid, load_runs

SEED0 = ".cache/demo/seed-0"


def _for_seed(run, seed: int, cache: Path):
    """The manifest's run with its seed-0 paths moved to `cache/seed-N` and the seed applied."""
    base = (cache / f"seed-{seed}").resolve()
    spec = run.spec.model_copy(deep=True)
    spec.model.base = str(base / "model")
    spec.data.questions = str(base / "data" / "unlabeled.jsonl")
    spec.data.evaluation = str(base / "data" / "eval.jsonl")
    spec.sampling.seed = seed
    spec.training.seed = seed
    meta = run.metadata.model_copy(update={"name": f"arithmetic-seed{seed}"})
    return run.model_copy(update={"spec": spec, "metadata": meta})


def prepare(seed: int, cache: Path) -> dict:
    out = cache / f"seed-{seed}"
    print(f"preparing the demo (seed {seed}): data and warm-started model under {out}/ "
          "(kept there: the next demo skips this)", flush=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "selfimprove_workers.demo", "prepare", "--seed", str(seed), "--out", str(out)],
        stdout=subprocess.PIPE, text=True, bufsize=1,
    )
    result = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # warm-start progress as it comes; the last line is the result
            if line.startswith("{"):
                result = json.loads(line)
            else:
                print(line, end="", flush=True)
    except KeyboardInterrupt:  # the worker got the same SIGINT; let it clean up and go
        proc.wait()
        raise
    if proc.wait() != 0 or result is None:
        raise SystemExit(f"demo preparation failed (exit {proc.returncode})")
    return result


def run_demo(seed: int, *, storage: str, cache: Path, manifest: Path) -> int:
    from .live import run_with_view

    t0 = time.monotonic()
    try:
        [run] = load_runs(manifest)
    except ManifestInvalid as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        prepared = prepare(seed, cache)
    except KeyboardInterrupt:
        print("\ninterrupted during the preparation; the next demo starts the warm-start again", file=sys.stderr)
        return 130
    ws = prepared["warmStart"]
    dev = f", dev greedy accuracy {ws['dev_accuracy']:.1%}" if ws.get("dev_accuracy") is not None else ""
    print(f"warm-start: {ws['steps']} steps on {ws['examples']} labeled examples, loss {ws['final_loss']:.3f}{dev}"
          + (" (cached)" if ws.get("cached") else f" in {ws['train_seconds']:.0f}s"), flush=True)
    status, interrupted = run_with_view(_for_seed(run, seed, cache), storage)
    if interrupted:
        return 130
    if status.phase != "Succeeded":
        return 1
    scored = [r for r in status.rounds if r.accuracy is not None]
    first, last = scored[0], scored[-1]
    print(f"held-out greedy accuracy: round 0 {first.accuracy:.1%} → round {last.round} {last.accuracy:.1%} "
          f"({(last.accuracy - first.accuracy) * 100:+.1f} points), no labels used after the warm-start; "
          f"{time.monotonic() - t0:.0f}s in all")
    write_report(status.artifacts, cache / f"seed-{seed}" / "data" / "unlabeled.answers.jsonl")
    return 0


def write_report(artifacts: str | None, labels: Path) -> Path | None:
    """The run's HTML report (`selfimprove report`) beside its artifacts, with the calibration
    plot from the demo's answer key; skipped (with a hint) without the `report` extra."""
    if not artifacts or not artifacts.startswith("file://"):
        return None
    try:
        import matplotlib  # noqa: F401

        from .report import build_report
    except ImportError:
        print("for the HTML report: pip install 'selfimprove[report]', then `selfimprove report <run directory>`")
        return None
    from urllib.parse import unquote, urlparse

    page, _ = build_report(artifacts, labels=str(labels) if labels.is_file() else None)
    out = Path(unquote(urlparse(artifacts).path)) / "report.html"
    out.write_text(page, encoding="utf-8")
    print(f"report: {out}")
    return out
