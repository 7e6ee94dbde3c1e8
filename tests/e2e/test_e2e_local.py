"""End to end: `selfimprove run` with the real stages (vLLM CPU build, peft, transformers).

A shortened demo — round 0 plus one LMSI round on a few arithmetic questions — run through the
CLI exactly as a user would, killed while it trains, and run again. The model is the tiny
random-weight fixture: this test is about the machinery (tasks, artifacts, markers, status,
resume); whether self-training improves a model is the demo's job (bench/bench_demo.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from model_fixtures import require_vllm
from selfimprove_workers.demo.arithmetic import write_splits

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MANIFEST = """\
apiVersion: selfimprove.dev/v1alpha1
kind: SelfImproveRun
metadata: {{name: e2e}}
spec:
  strategy: lmsi
  model: {{base: {model}}}
  data: {{questions: {data}/unlabeled.jsonl, evaluation: {data}/eval.jsonl}}
  task: {{answer: {{type: number}}, chatTemplate: false}}
  engine: {{kind: vllm, enforceEager: true, maxModelLen: 256, maxLoraRank: 8}}
  sampling: {{paths: 4, temperature: 1.0, maxTokens: 24}}
  filters: [{{consistency: {{minConfidence: 0.0}}}}]
  training:
    lora: {{r: 8, alpha: 16, targetModules: [q_proj, v_proj]}}
    epochs: 2
    learningRate: 1.0e-3
    batchSize: 8
    maxLength: 256
    formats: [zeroShotCot]
  evaluation: {{format: zeroShotCot, maxTokens: 24}}
  rounds: {{max: 1, patience: 0}}
  retry: {{limit: 1, backoffSeconds: 0}}
  resources: {{gpus: 0}}
  storage: {{uri: s3://unused/}}
"""


def cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "selfimprove_operator.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def markers(run_dir: Path) -> dict[str, str]:
    return {str(p.parent.relative_to(run_dir)): p.read_text() for p in sorted(run_dir.glob("round-*/*/_SUCCESS"))}


def test_shortened_demo_killed_during_training_resumes(tmp_path, tiny_model_dir, s3_server, s3_bucket):
    require_vllm()
    data = tmp_path / "data"
    write_splits(data, seed=0, n_warm=4, n_unlabeled=6, n_eval=6)
    manifest = tmp_path / "run.yaml"
    manifest.write_text(MANIFEST.format(model=tiny_model_dir, data=data))
    storage, work = tmp_path / "runs", tmp_path / "work"
    run_dir = storage / "local" / "e2e"
    status_file = run_dir / "status.json"

    # First run: kill the runner (SIGKILL, no chance to clean up) as soon as training starts.
    runner = cli("run", str(manifest), "--storage", str(storage), "--workdir", str(work))
    deadline = time.time() + 600
    progress_seen = []
    while True:
        assert runner.poll() is None, runner.stdout.read()
        assert time.time() < deadline, "training never started"
        if status_file.exists():
            try:
                status = json.loads(status_file.read_text())
            except ValueError:  # caught mid-write
                continue
            if status.get("progress"):
                progress_seen.append(status["progress"])
            stages = {(r["round"], s["name"]): s for r in status["rounds"] for s in r["stages"]}
            if stages.get((1, "train"), {}).get("state") == "Running":
                break
        time.sleep(0.2)
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=60)
    # The running stages' progress reached the saved status (what the live view shows, too).
    assert progress_seen, "no status.progress while stages ran"
    assert all(p["total"] > 0 and 0 <= p["percent"] <= 100 and p["unit"] and p["lastUpdate"] for p in progress_seen)
    assert {p["stage"] for p in progress_seen} & {"evaluate", "sample", "filter"}
    before = markers(run_dir)
    assert set(before) == {"round-000/evaluate", "round-001/sample", "round-001/filter"}

    # Second run: resumes; no completed stage runs again, the interrupted one runs as attempt 2.
    again = cli("run", str(manifest), "--storage", str(storage), "--workdir", str(work))
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out
    after = markers(run_dir)
    assert {k: after[k] for k in before} == before  # the same commits, byte for byte
    assert set(after) == set(before) | {"round-001/train", "round-001/evaluate"}
    tasks = sorted(p.name for p in work.glob("*.json") if not p.name.endswith(".result.json"))
    assert tasks == ["e2e-r0-evaluate.json", "e2e-r1-evaluate.json", "e2e-r1-filter.json",
                     "e2e-r1-sample.json", "e2e-r1-train-a2.json", "e2e-r1-train.json"]

    # Artifacts of every stage, committed with checksums.
    for stage, files in {"round-001/sample": ["samples.jsonl", "votes.jsonl"], "round-001/filter": ["kept.jsonl"],
                         "round-001/train": ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"],
                         "round-001/evaluate": ["predictions.jsonl"], "round-000/evaluate": ["predictions.jsonl"]}.items():
        listed = json.loads(after[stage])["files"]
        for name in files:
            assert name in listed and (run_dir / stage / name).stat().st_size == listed[name]["size"]
    votes = [json.loads(line_) for line_ in (run_dir / "round-001/sample/votes.jsonl").read_text().splitlines()]
    assert len(votes) == 6 and all(v["paths"] == 4 for v in votes)

    status = json.loads(status_file.read_text())
    assert status["phase"] == "Succeeded"
    r1 = status["rounds"][1]
    assert r1["samples"] == 24 and r1["kept"] >= 1 and r1["accuracy"] is not None
    assert r1["adapter"].endswith("round-001/train/adapter/")
    train = next(s for s in r1["stages"] if s["name"] == "train")
    assert train["attempts"] == 2 and train["failures"] == 0

    table = subprocess.run([sys.executable, "-m", "selfimprove_operator.cli", "status", str(manifest), "--storage", str(storage)],
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0
    for header in ("samples", "kept", "mean conf", "train loss", "accuracy", "★ best"):
        assert header in table.stdout

    # TensorBoard's own reader: the training curves next to the adapter, and one accuracy curve
    # across rounds (tensorboard --logdir <run directory> shows both).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = json.loads((run_dir / "round-001/train/metrics.json").read_text())["history"]
    train_events = EventAccumulator(str(run_dir / "round-001/train/tensorboard"))
    train_events.Reload()
    assert [e.step for e in train_events.Scalars("train/loss")] == [h["step"] for h in history]
    assert {"train/learning_rate", "train/grad_norm", "train/tokens_per_s"} <= set(train_events.Tags()["scalars"])
    eval_events = EventAccumulator(str(run_dir / "tensorboard/evaluate"))
    eval_events.Reload()
    assert [(e.step, round(e.value, 6)) for e in eval_events.Scalars("eval/accuracy")] == \
        [(r["round"], round(r["accuracy"], 6)) for r in status["rounds"]]

    # The report of this run, from its manifest: one self-contained page.
    report_file = tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-m", "selfimprove_operator.cli", "report", str(manifest), "--storage", str(storage),
                           "-o", str(report_file)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "calibration from" in done.stdout and "unlabeled.answers.jsonl" in done.stdout  # the demo data's answer key
    check_report(report_file.read_text(), status)

    # The same run's artifacts in S3, as a cluster run leaves them: the report from the s3:// prefix.
    client = s3_server.client()
    bucket = s3_bucket[len("s3://"):]
    for path in run_dir.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"runs/ml/e2e-0123abcd/{path.relative_to(run_dir)}")
    from_s3 = tmp_path / "report-s3.html"
    done = subprocess.run([sys.executable, "-m", "selfimprove_operator.cli", "report", f"{s3_bucket}/runs/ml/e2e-0123abcd/",
                           "--endpoint", s3_server.endpoint, "--labels", str(data / "unlabeled.answers.jsonl"), "-o", str(from_s3)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **s3_server.env})
    assert done.returncode == 0, done.stderr
    check_report(from_s3.read_text(), status)


def check_report(page: str, status: dict) -> None:
    """What `selfimprove report` must show of a finished run (also used on the demo's report)."""
    import base64
    import re

    # Self-contained: no script, stylesheet or image fetched from anywhere.
    assert not re.search(r"""(src|href)=["'](?!data:)""", page), "the report must load nothing"
    assert "<script" not in page
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [alt for alt, _ in images] == ["held-out accuracy per round", "kept samples and mean confidence", "calibration",
                                          "training loss per step"]
    assert all(base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n" for _, b64 in images)
    # The rounds table: every round's accuracy and kept count as the status has them; the best marked.
    rounds = re.search(r'<table id="rounds">(.*?)</table>', page, re.S).group(1)
    for r in status["rounds"]:
        assert f'<td class="num">{r["accuracy"]:.1%}</td>' in rounds
        if r.get("kept") is not None:
            assert f'<td class="num">{r["kept"]}</td>' in rounds
    best_row = re.search(r'<tr class="best">(.*?)</tr>', rounds).group(1)
    assert best_row.startswith(f'<td class="num">{status["bestRound"]}</td>') and "★ best" in best_row
    # Calibration: every sampled question of every round counted in one confidence bin.
    cal = re.search(r'<table id="calibration">(.*?)</table>', page, re.S).group(1)
    counts = [int(n) for n in re.findall(r'<td class="num">(\d+)', cal)]
    sampled = sum(r.get("questions") or 0 for r in status["rounds"])
    assert sum(counts) == sampled > 0
    # Examples: kept paths of the last round's filter.
    assert '<td class="kept">kept</td>' in page
