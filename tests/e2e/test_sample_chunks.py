"""The sample stage survives preemption: its process is SIGKILLed (as a preempted pod's is) once
chunk 1 is committed, and the rerun of the same task reuses the committed chunks, generates only
the rest, and writes byte for byte what an uninterrupted one-chunk run writes. Then two shards of
two-question chunks merge to the same bytes (shards × chunks compose). Real stage processes,
real vLLM, the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from model_fixtures import REPO, require_vllm, run_worker, write_jsonl
from selfimprove_workers.chunks import CHUNK_ROWS_ENV

QUESTIONS = [{"id": f"q{i}", "question": f"What is {i} plus {2 * i + 1}?"} for i in range(12)]
FILES = ["samples.jsonl", "votes.jsonl"]
SAME = ("questions", "paths", "meanConfidence", "answered", "generatedTokens")


def _task(tmp: Path, out: str, model: Path, shards: int = 1) -> dict:
    return {"run": {"name": "c"}, "round": 1, "stage": "sample", "output": str(tmp / out),
            "model": {"base": str(model)}, "engine": {"kind": "vllm"}, "shards": shards,
            "inputs": {"questions": str(tmp / "q.jsonl")},
            "sampling": {"paths": 3, "temperature": 1.0, "maxTokens": 48, "seed": 7}}


def _ok(task: dict, tmp: Path) -> tuple[dict, str]:
    rc, summary, err = run_worker(task, tmp)
    assert rc == 0 and summary is not None, err[-3000:]
    return summary, err


def _details(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())["details"]


def _kill_after_chunk(task: dict, tmp: Path, chunk: int, timeout: float = 300) -> dict[str, bytes]:
    """Start the stage, SIGKILL it (and its process group: vLLM may start an engine process)
    as soon as chunk `chunk`'s marker exists; the chunk markers there were then, by path."""
    out = Path(task["output"])
    task_file = tmp / "killed-task.json"
    task_file.write_text(json.dumps(task))
    env = {**os.environ, "TERMINATION_LOG": str(tmp / "killed.termination-log"), "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.Popen([sys.executable, "-m", "selfimprove_workers", str(task_file)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    marker = out / "chunks" / f"{chunk:05d}" / "_SUCCESS"
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            assert proc.poll() is None, f"the stage exited ({proc.returncode}) before chunk {chunk} was committed"
            assert time.monotonic() < deadline, f"chunk {chunk} was not committed within {timeout} s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.stderr is not None
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "chunks").glob("*/_SUCCESS"))}


@pytest.mark.slow
@pytest.mark.vllm
def test_a_killed_sample_stage_resumes_from_its_chunks_byte_for_byte(tiny_model_dir, tmp_path, monkeypatch):
    require_vllm()
    write_jsonl(tmp_path / "q.jsonl", QUESTIONS)

    # The reference: the whole stage in one chunk (what the stage did before chunks existed).
    monkeypatch.setenv(CHUNK_ROWS_ENV, "1000")
    one, _ = _ok(_task(tmp_path, "one", tiny_model_dir), tmp_path)
    assert _details(tmp_path / "one")["chunks"] == {"total": 1, "reused": 0, "questionsPerChunk": 1000}

    monkeypatch.setenv(CHUNK_ROWS_ENV, "2")  # 6 chunks of 2 questions
    task = _task(tmp_path, "killed", tiny_model_dir)
    at_kill = _kill_after_chunk(task, tmp_path, chunk=1)
    out = tmp_path / "killed"
    assert not (out / "_SUCCESS").exists(), "the stage finished before it was killed: the test proves nothing"
    assert {"chunks/00000/_SUCCESS", "chunks/00001/_SUCCESS"} <= at_kill.keys() and len(at_kill) < 6
    assert not (out / "samples.jsonl").exists()

    resumed, log = _ok(task, tmp_path)
    for name in FILES:
        assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert {k: resumed["metrics"][k] for k in SAME} == {k: one["metrics"][k] for k in SAME}
    details = _details(out)
    assert details["chunks"] == {"total": 6, "reused": len(at_kill), "questionsPerChunk": 2}
    # The committed chunks were not generated again: their markers are the very same bytes (a
    # regenerated chunk's marker records its own time and generation seconds).
    for path, data in at_kill.items():
        assert (out / path).read_bytes() == data, path
    assert f"{len(at_kill)} of 6 chunks were committed by an earlier attempt; reused" in log
    assert details["generationSecondsThisAttempt"] < details["generationSeconds"]

    # Shards × chunks: each shard chunks its own slice under shards/<i>/chunks/.
    sharded = _task(tmp_path, "sharded", tiny_model_dir, shards=2)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    _ok(sharded, tmp_path)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    merged, _ = _ok(sharded, tmp_path)
    assert merged.get("shard") is None
    for name in FILES:
        assert (tmp_path / "sharded" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert sorted(p.relative_to(tmp_path / "sharded").parent.as_posix()
                  for p in (tmp_path / "sharded").glob("shards/*/chunks/*/_SUCCESS")) == \
        [f"shards/0000{s}/chunks/0000{k}" for s in (0, 1) for k in (0, 1, 2)]
    assert _details(tmp_path / "sharded")["chunks"] == {"total": 6, "reused": 0}
    assert {k: merged["metrics"][k] for k in SAME} == {k: one["metrics"][k] for k in SAME}
