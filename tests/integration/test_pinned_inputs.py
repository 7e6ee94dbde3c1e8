"""Pinned inputs in the stage runtime (issue 16, item 6): the first stage records the digest of
every run input it is given, a later stage whose input differs fails with InputChanged naming the
spec field and the file, before it reads anything; and the local executor end to end: a run whose
question file is replaced mid-run fails with that file named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from selfimprove_workers.contract import StageTask
from selfimprove_workers.errors import InputChanged
from selfimprove_workers.runtime import EXIT_BAD_INPUT, StageOutcome, main, run_task
from selfimprove_workers.storage import storage_for

HERE = Path(__file__).resolve().parents[1]


def body(ctx) -> StageOutcome:
    ctx.writer.write_jsonl("samples.jsonl", [{"id": "a"}])
    return StageOutcome(metrics={"questions": 1})


def task(tmp_path: Path, out: str, pinned: list[dict], endpoint: str | None = None) -> StageTask:
    return StageTask.model_validate({
        "run": {"name": "r"}, "round": 1, "stage": "sample", "output": out,
        "storage": {"endpoint": endpoint} if endpoint else {},
        "model": {"base": str(tmp_path / "model")}, "inputs": {"questions": pinned[0]["uri"]},
        "sampling": {"paths": 2}, "pinned": pinned})


def test_local_files_are_pinned_by_sha256_and_a_change_is_refused(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "1+1?"}\n')
    first = run_task(task(tmp_path, (tmp_path / "o1").as_uri() + "/", [{"field": "data.questions", "uri": str(q)}]), body)
    digest = first.inputs["data.questions"]
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    pinned = [{"field": "data.questions", "uri": str(q), "digest": digest}]
    assert run_task(task(tmp_path, (tmp_path / "o2").as_uri() + "/", pinned), body).inputs == first.inputs
    q.write_text('{"question": "2+2?"}\n')
    with pytest.raises(InputChanged, match=r"data\.questions: .*q\.jsonl changed since the run started \(sha256:"):
        run_task(task(tmp_path, (tmp_path / "o3").as_uri() + "/", pinned), body)
    assert not (tmp_path / "o3").exists()  # refused before the stage wrote anything


def test_the_process_exits_2_with_reason_input_changed(tmp_path, monkeypatch):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "1+1?"}\n')
    pinned = [{"field": "data.questions", "uri": str(q), "digest": "sha256:" + "0" * 64}]
    t = tmp_path / "task.json"
    t.write_text(json.dumps(task(tmp_path, (tmp_path / "o").as_uri() + "/", pinned).wire()))
    log = tmp_path / "termination-log"
    monkeypatch.setenv("TERMINATION_LOG", str(log))
    assert main([str(t)], stage_fn=body) == EXIT_BAD_INPUT
    summary = json.loads(log.read_text())
    assert summary["reason"] == "InputChanged" and "data.questions" in summary["message"] and "q.jsonl" in summary["message"]


def test_s3_objects_are_pinned_by_etag(s3_server, s3_bucket, tmp_path):
    uri = f"{s3_bucket}/data/q.jsonl"
    store = storage_for(uri, endpoint=s3_server.endpoint)
    store.write_bytes(uri, b'{"question": "1+1?"}\n')
    first = run_task(task(tmp_path, f"{s3_bucket}/out1/", [{"field": "data.questions", "uri": uri}], s3_server.endpoint), body)
    digest = first.inputs["data.questions"]
    assert digest.startswith("etag:") and digest == store.fingerprint(uri)
    store.write_bytes(uri, b'{"question": "1+1?"}\n')      # same bytes again: same ETag
    pinned = [{"field": "data.questions", "uri": uri, "digest": digest}]
    run_task(task(tmp_path, f"{s3_bucket}/out2/", pinned, s3_server.endpoint), body)
    store.write_bytes(uri, b'{"question": "3+3?"}\n')
    with pytest.raises(InputChanged, match=r"data\.questions: .*q\.jsonl changed since the run started \(etag:"):
        run_task(task(tmp_path, f"{s3_bucket}/out3/", pinned, s3_server.endpoint), body)


MANIFEST = """\
apiVersion: selfimprove.dev/v1alpha1
kind: SelfImproveRun
metadata: {{name: pinned}}
spec:
  strategy: lmsi
  model: {{base: /nonexistent/model}}
  data: {{questions: {q}, evaluation: {e}}}
  rounds: {{max: 2, patience: 0}}
  retry: {{limit: 2, backoffSeconds: 0}}
  resources: {{gpus: 0}}
  storage: {{uri: s3://ignored-when-running-locally/}}
"""

REPLACER = """\
import os, sys
sys.path.insert(0, {here!r})
import fake_stage
from selfimprove_workers import runtime

def body(ctx):
    out = fake_stage.body(ctx)
    if (ctx.task.round, ctx.task.stage.value) == (1, "filter"):   # someone replaces the file mid-run
        with open({q!r}, "w") as f:
            f.write('{{"question": "a different question"}}\\n')
    return out

sys.exit(runtime.main([sys.argv[1]], stage_fn=body))
"""


def test_a_run_whose_question_file_is_replaced_mid_run_fails_naming_it(tmp_path):
    q, e = tmp_path / "questions.jsonl", tmp_path / "test.jsonl"
    q.write_text('{"question": "1+1?"}\n')
    e.write_text('{"question": "1+1?", "answer": "2"}\n')
    manifest = tmp_path / "run.yaml"
    manifest.write_text(MANIFEST.format(q=q, e=e))
    stage = tmp_path / "stage.py"
    stage.write_text(REPLACER.format(here=str(HERE), q=str(q)))
    storage = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "selfimprove_operator.cli", "run", str(manifest), "--storage", str(storage),
                           "--stage-command", f"{sys.executable} {stage}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    status = json.loads((storage / "local" / "pinned" / "status.json").read_text())
    assert status["phase"] == "Failed"
    assert {d["field"]: d["uri"] for d in status["inputs"]} == {"data.questions": str(q), "data.evaluation": str(e)}
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InputChanged"
    assert f"data.questions: {q.name} changed since the run started" in failed["message"] or \
        f"data.questions: {q} changed since the run started" in failed["message"], failed["message"]
    # Round 1's train (the stage after the replacement) failed at once, without a retry; nothing ran after it.
    r1 = {s["name"]: s for s in status["rounds"][1]["stages"]}
    assert r1["filter"]["state"] == "Succeeded" and r1["train"]["state"] == "Failed" and r1["train"]["attempts"] == 1
    assert "questions.jsonl" in proc.stdout
    print(failed["message"])
