"""The filter stage sharded: two shards score their chunks of the candidates with the tiny
Llama (distribution-shift losses, judge and self ratings, embeddings; a reward model), the last
to commit replays the filter chain over every score, and `kept.jsonl`, `rejected.jsonl` and the
metrics are byte for byte those of a one-shard run. Then a one-shard run killed by SIGKILL after
its first committed chunks is resumed and ends with the same bytes, scoring only what was left.
Real worker processes (`python -m selfimprove_workers TASK`), as the Job runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from model_fixtures import REPO, require_vllm, run_worker, write_jsonl
from selfimprove_workers.stage_registry import STAGES

pytestmark = pytest.mark.slow

# 7 questions × 3 paths, majorities and confidences varied so consistency drops some; chunks of
# 4 candidates: 6 chunks (the last short), shard 0 scores chunks 0-2, shard 1 chunks 3-5.
PATHS = 3


def _inputs(tmp: Path) -> dict[str, str]:
    samples, votes = [], []
    for q in range(7):
        answers = [str(q), str(q + 1), str(q)] if q % 3 else [str(q)] * PATHS
        for p, a in enumerate(answers):
            samples.append({"id": f"q{q}", "question": f"What is {q} plus {q}? é",
                            "path": p, "text": f"{q} + {q} = {2 * q}, so {'ü' * p}the answer is {a}.", "answer": a})
        majority = str(q)
        votes.append({"id": f"q{q}", "majority": majority, "confidence": answers.count(majority) / PATHS,
                      "entropy": 0.0 if answers.count(majority) == PATHS else 0.9})
    labeled = [{"question": f"What is {i} times 2?", "answer": f"{i} * 2 = {2 * i}.\n#### {2 * i}"} for i in range(3)]
    return {"samples": str(write_jsonl(tmp / "samples.jsonl", samples)),
            "votes": str(write_jsonl(tmp / "votes.jsonl", votes)),
            "validation": str(write_jsonl(tmp / "validation.jsonl", labeled))}


FILTERS: list[dict[str, Any]] = [
    {"consistency": {"minConfidence": 0.5}},
    {"distributionShift": {"keep": 0.9}},
    {"judge": {"minScore": 0.0, "maxTokens": 6}},
    {"self": {"keep": 0.9, "maxTokens": 6}},
    {"diversity": {"keep": 0.6, "clusters": 2}},
]


def _task(tmp: Path, out: str, model: Path, inputs: dict[str, str], shards: int, filters: list[dict[str, Any]],
          engine: str = "transformers") -> dict[str, Any]:
    return {"run": {"name": "fs"}, "round": 1, "stage": "filter", "output": str(tmp / out),
            "model": {"base": str(model)}, "engine": {"kind": engine, "enforceEager": True},
            "shards": shards, "inputs": inputs, "filters": filters}


def _run(task: dict, tmp: Path, monkeypatch: pytest.MonkeyPatch, index: int | None = None) -> dict:
    if index is None:
        monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    else:
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))
    rc, summary, err = run_worker(task, tmp)
    assert rc == 0 and summary is not None, err[-3000:]
    return summary


def _without_seconds(result: Path) -> dict:
    body = json.loads(result.read_text())
    metrics = {k: v for k, v in body["summary"]["metrics"].items() if k != "seconds"}
    steps = [{k: v for k, v in s.items() if k != "seconds"} for s in body["details"]["filters"]]
    return {"metrics": metrics, "filters": steps}


def _same_outputs(one: Path, two: Path) -> None:
    for name in ("kept.jsonl", "rejected.jsonl"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert _without_seconds(one / "result.json") == _without_seconds(two / "result.json")


@pytest.mark.skipif(not STAGES["filter"].shardable, reason="stage_registry.py does not mark filter shardable")
def test_two_shards_filter_exactly_what_one_does(tiny_model_dir: Path, tiny_reward_model_dir: Path,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFIMPROVE_CHUNK_ROWS", "4")
    inputs = _inputs(tmp_path)
    filters = FILTERS + [{"rewardModel": {"model": str(tiny_reward_model_dir), "keep": 0.8}}]
    one = _run(_task(tmp_path, "one", tiny_model_dir, inputs, 1, filters), tmp_path, monkeypatch)
    first = _run(_task(tmp_path, "two", tiny_model_dir, inputs, 2, filters), tmp_path, monkeypatch, index=1)
    assert first["shard"] == 1 and first["metrics"]["candidates"] == 21 - 12  # chunks 3-5 of 6
    merged = _run(_task(tmp_path, "two", tiny_model_dir, inputs, 2, filters), tmp_path, monkeypatch, index=0)
    assert merged.get("shard") is None and merged["shards"] == 2
    _same_outputs(tmp_path / "one", tmp_path / "two")
    assert {k: v for k, v in merged["metrics"].items() if k != "seconds"} == \
        {k: v for k, v in one["metrics"].items() if k != "seconds"}

    steps = json.loads((tmp_path / "one" / "result.json").read_text())["details"]["filters"]
    assert [(s["kind"], s["in"]) for s in steps][:2] == [("consistency", 21), ("distributionShift", 17)]
    assert all(s["out"] < s["in"] for s in steps if s["kind"] in ("consistency", "diversity", "rewardModel"))
    kept = [json.loads(x) for x in (tmp_path / "one" / "kept.jsonl").read_text().splitlines()]
    assert kept and all({"loss", "ds", "judgeScore", "selfScore", "coresetRank", "reward"} <= r.keys() for r in kept)
    assert len({r["loss"] for r in kept}) > 1  # real, varying losses, not a constant
    sample_rows = {(r["id"], r["path"]): r for r in map(json.loads, Path(inputs["samples"]).read_text().splitlines())}
    assert all(r["cot"] == sample_rows[(r["questionId"], r["path"])]["text"] for r in kept)  # texts read back
    # Each shard scored its own chunks only: 6 chunks per scoring filter in all.
    details = [json.loads((tmp_path / "two" / "shards" / f"{i:05d}" / "result.json").read_text())["details"]
               for i in (0, 1)]
    assert [d["scoring"]["chunks"] for d in details] == [3 * 5, 3 * 5]


def _scoring_log_count(err: str) -> int:
    return err.count(" committed (rows ")


@pytest.mark.vllm
def test_a_killed_filter_resumes_from_its_committed_chunks(tiny_model_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL (what a node loss is) after the first chunks of distribution-shift losses are
    committed, on vLLM (prompt logprobs); the rerun reuses them and scores only the rest, and
    its outputs equal an uninterrupted run's."""
    require_vllm()
    inputs = _inputs(tmp_path)
    filters = [{"consistency": {"minConfidence": 0.5}}, {"distributionShift": {"keep": 0.8}}]
    env = {**os.environ, "SELFIMPROVE_CHUNK_ROWS": "4", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.pop("JOB_COMPLETION_INDEX", None)
    monkeypatch.setenv("SELFIMPROVE_CHUNK_ROWS", "4")
    whole = _run(_task(tmp_path, "whole", tiny_model_dir, inputs, 1, filters, engine="vllm"), tmp_path, monkeypatch)

    task = _task(tmp_path, "killed", tiny_model_dir, inputs, 1, filters, engine="vllm")
    task_file = tmp_path / "killed.json"
    task_file.write_text(json.dumps(task))
    chunks = tmp_path / "killed" / "filters" / "1" / "chunks"
    # A child of its own session, so the kill takes vLLM's engine process with it.
    proc = subprocess.Popen([sys.executable, "-m", "selfimprove_workers", str(task_file)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not (chunks / "00001" / "_SUCCESS").exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.time() < deadline, "no chunk was committed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.stderr is not None
    proc.stderr.close()
    done_before = sorted(p.parent.name for p in chunks.glob("*/_SUCCESS"))
    assert not (tmp_path / "killed" / "_SUCCESS").exists() and len(done_before) < 6, done_before

    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    rc, summary, err = run_worker(task, tmp_path)
    assert rc == 0 and summary is not None, err[-3000:]
    # Only the chunks the killed run had not committed were scored again.
    assert _scoring_log_count(err) == 6 - len(done_before), err[-3000:]
    assert f"{len(done_before)} of 6 chunks were committed by an earlier attempt; reused" in err
    _same_outputs(tmp_path / "whole", tmp_path / "killed")
    assert {k: v for k, v in summary["metrics"].items() if k != "seconds"} == \
        {k: v for k, v in whole["metrics"].items() if k != "seconds"}
