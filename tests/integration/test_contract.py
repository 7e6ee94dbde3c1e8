"""The stage contract: task and result models, the 4 KiB summary, the stage runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from selfimprove_workers.contract import SUMMARY_LIMIT, StageResult, StageTask
from selfimprove_workers.errors import BadInput
from selfimprove_workers.runtime import EXIT_BAD_INPUT, StageOutcome, load_task, run_task
from selfimprove_workers.storage import is_complete, read_marker

ROOT = Path(__file__).resolve().parents[2]


def task_dict(tmp_path: Path, **changes) -> dict:
    body = {
        "run": {"name": "r", "namespace": "ns", "uid": "u-1"},
        "round": 1,
        "stage": "sample",
        "output": (tmp_path / "out" / "round-001" / "sample").as_uri() + "/",
        "model": {"base": str(tmp_path / "model")},
        "inputs": {"questions": str(tmp_path / "q.jsonl")},
        "sampling": {"paths": 4, "temperature": 0.7},
    }
    body.update(changes)
    return body


def test_task_round_trip_and_digest(tmp_path):
    task = StageTask.model_validate(task_dict(tmp_path))
    again = StageTask.model_validate_json(json.dumps(task.wire()))
    assert again == task
    assert task.digest() == again.model_copy(update={"attempt": 3}).digest()
    other = StageTask.model_validate(task_dict(tmp_path, sampling={"paths": 8}))
    assert other.digest() != task.digest()


def test_task_requires_what_the_stage_needs(tmp_path):
    with pytest.raises(ValueError, match="inputs.questions: is required for the sample stage"):
        StageTask.model_validate(task_dict(tmp_path, inputs={}))
    with pytest.raises(ValueError, match="training: is required for the train stage"):
        StageTask.model_validate(task_dict(tmp_path, stage="train", inputs={"train": ["x"]}, sampling=None))


def test_summary_limit_enforced():
    ok = StageResult(stage="sample", round=1, status="Succeeded", metrics={"paths": 32})
    assert len(ok.summary_json().encode()) < SUMMARY_LIMIT
    long_message = StageResult(stage="train", round=1, status="Failed", message="x" * 10_000)
    text = long_message.summary_json()
    assert len(text.encode()) <= SUMMARY_LIMIT and "[truncated]" in text
    with pytest.raises(ValueError, match="limit is 4096"):
        StageResult(stage="sample", round=1, status="Succeeded", metrics={f"m{i}": i for i in range(600)})


def fake_stage(ctx) -> StageOutcome:
    ctx.writer.write_jsonl("samples.jsonl", [{"id": "a", "text": "t"}])
    ctx.progress(1, 1, "questions")
    return StageOutcome(metrics={"questions": 1}, outputs={"samples": "samples.jsonl"}, details={"big": list(range(1000))})


def test_run_task_commits_and_then_skips(tmp_path):
    task = StageTask.model_validate(task_dict(tmp_path))
    first = run_task(task, fake_stage)
    assert first.status == "Succeeded" and not first.skipped
    assert first.outputs["samples"] == task.uri("samples.jsonl")
    from selfimprove_workers.storage import storage_for

    storage = storage_for(task.output)
    assert is_complete(storage, task.output)
    marker = read_marker(storage, task.output)
    assert marker["task"] == task.digest()
    assert set(marker["files"]) == {"samples.jsonl", "result.json"}
    body = json.loads(storage.read_bytes(task.uri("result.json")))
    assert body["details"]["big"][-1] == 999 and body["summary"]["metrics"]["questions"] == 1

    def must_not_run(ctx):
        raise AssertionError("a completed stage ran again")

    again = run_task(task.model_copy(update={"attempt": 2}), must_not_run)
    assert again.skipped and again.metrics == first.metrics

    changed = StageTask.model_validate(task_dict(tmp_path, sampling={"paths": 8}))
    with pytest.raises(BadInput, match="different task"):
        run_task(changed, must_not_run)


def test_crash_before_marker_reruns(tmp_path):
    task = StageTask.model_validate(task_dict(tmp_path))

    def crashing(ctx):
        ctx.writer.write_jsonl("samples.jsonl", [{"id": "a"}])
        raise RuntimeError("preempted")

    with pytest.raises(RuntimeError):
        run_task(task, crashing)
    assert run_task(task, fake_stage).skipped is False


def test_load_task_errors(tmp_path):
    with pytest.raises(BadInput, match="neither inline JSON nor a readable file"):
        load_task(str(tmp_path / "nope.json"))
    with pytest.raises(BadInput, match=r"task: sampling.paths: must be ≥ 1"):
        load_task(json.dumps(task_dict(tmp_path, sampling={"paths": 0})))


def run_cli(arg: str, tmp_path: Path, env_extra: dict | None = None) -> tuple[int, str, str]:
    log = tmp_path / "termination-log"
    env = {**os.environ, "TERMINATION_LOG": str(log), **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "selfimprove_workers", arg], capture_output=True, text=True, env=env, timeout=120)
    return proc.returncode, proc.stderr, log.read_text() if log.exists() else ""


def test_entrypoint_bad_task_exits_2_naming_the_field(tmp_path):
    code, stderr, summary = run_cli(json.dumps(task_dict(tmp_path, round=-1)), tmp_path)
    assert code == EXIT_BAD_INPUT
    assert "round: must be ≥ 0" in stderr
    assert json.loads(summary)["reason"] == "BadInput"


def test_entrypoint_bad_data_line_exits_2_with_file_line(tmp_path, monkeypatch):
    # The stage module is replaced by one that reads its questions: the runtime must map the
    # DataError to exit 2 and put file:line into the termination message.
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "ok"}\n{"question": \n')
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(task_dict(tmp_path)))
    code_ = (
        "import sys, selfimprove_workers.runtime as rt\n"
        "from selfimprove_workers.data import load_examples\n"
        "def run(ctx):\n"
        "    load_examples(ctx.storage_for(ctx.task.inputs.questions), ctx.task.inputs.questions)\n"
        "import types; m = types.ModuleType('fake'); m.run = run; sys.modules['fake_stage'] = m\n"
        "rt.STAGE_MODULES[rt.StageName.sample] = 'fake_stage'\n"
        "sys.exit(rt.main([sys.argv[1]]))\n"
    )
    log = tmp_path / "termination-log"
    proc = subprocess.run([sys.executable, "-c", code_, str(task_file)], capture_output=True, text=True,
                          env={**os.environ, "TERMINATION_LOG": str(log)}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    summary = json.loads(log.read_text())
    assert summary["status"] == "Failed" and summary["reason"] == "BadInput"
    assert f"{questions}:2:" in summary["message"]


def test_failure_messages_never_carry_credentials(tmp_path, monkeypatch):
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    code_ = (
        "import sys, os, selfimprove_workers.runtime as rt, types\n"
        "def run(ctx): raise RuntimeError('boom ' + os.environ['AWS_SECRET_ACCESS_KEY'])\n"
        "m = types.ModuleType('fake'); m.run = run; sys.modules['fake_stage'] = m\n"
        "rt.STAGE_MODULES[rt.StageName.sample] = 'fake_stage'\n"
        "sys.exit(rt.main([sys.argv[1]]))\n"
    )
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(task_dict(tmp_path)))
    log = tmp_path / "termination-log"
    proc = subprocess.run([sys.executable, "-c", code_, str(task_file)], capture_output=True, text=True,
                          env={**os.environ, "TERMINATION_LOG": str(log)}, timeout=120)
    assert proc.returncode == 1
    assert secret not in proc.stderr and secret not in proc.stdout and secret not in log.read_text()
    assert "boom ***" in log.read_text()
