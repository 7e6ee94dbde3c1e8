"""A sharded stage's merged output is byte for byte the unsharded stage's (same seed), through
the real stage code on the tiny model: `sample` on vLLM (seeds keyed by question id) and
`evaluate` (greedy) on the transformers engine, whose model loads in a second. Shards run one after the other here (2 cores); the second one to commit
sees both markers and merges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from model_fixtures import require_vllm, run_worker, write_jsonl

QUESTIONS = [{"id": f"q{i}", "question": f"What is {i} plus {i + 1}?"} for i in range(5)]
LABELED = [{"id": f"e{i}", "question": f"What is {i} times 2?", "answer": f"#### {2 * i}"} for i in range(5)]


def _run(task: dict, tmp: Path, monkeypatch: pytest.MonkeyPatch, index: int | None = None) -> dict:
    if index is None:
        monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    else:
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))
    rc, summary, err = run_worker(task, tmp)
    assert rc == 0 and summary is not None, err[-3000:]
    return summary


def _same_files(one: Path, two: Path, names: list[str]) -> None:
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert (two / "_SUCCESS").exists() and (two / "shards" / "00001" / "_SUCCESS").exists()


@pytest.mark.slow
@pytest.mark.vllm
def test_two_shards_sample_and_evaluate_exactly_what_one_does(tiny_model_dir, tmp_path, monkeypatch):
    require_vllm()
    questions = str(write_jsonl(tmp_path / "q.jsonl", QUESTIONS))
    labeled = str(write_jsonl(tmp_path / "e.jsonl", LABELED))

    def sample(out: str, shards: int) -> dict:
        return {"run": {"name": "s"}, "round": 1, "stage": "sample", "output": str(tmp_path / out),
                "model": {"base": str(tiny_model_dir)}, "engine": {"kind": "vllm"}, "shards": shards,
                "inputs": {"questions": questions},
                "sampling": {"paths": 3, "temperature": 1.0, "maxTokens": 12, "seed": 7}}

    one = _run(sample("one", 1), tmp_path, monkeypatch)
    first = _run(sample("two", 2), tmp_path, monkeypatch, index=0)
    assert first["shard"] == 0 and first["metrics"]["questions"] == 2  # rows[0:5*1//2]
    merged = _run(sample("two", 2), tmp_path, monkeypatch, index=1)
    assert merged.get("shard") is None and merged["shards"] == 2
    _same_files(tmp_path / "one", tmp_path / "two", ["samples.jsonl", "votes.jsonl"])
    for key in ("questions", "paths", "meanConfidence", "answered", "generatedTokens"):
        assert merged["metrics"][key] == one["metrics"][key], key
    assert len({json.loads(x)["text"] for x in (tmp_path / "one" / "samples.jsonl").read_text().splitlines()}) > 1

    def evaluate(out: str, shards: int) -> dict:
        return {"run": {"name": "s"}, "round": 0, "stage": "evaluate", "output": str(tmp_path / out),
                "model": {"base": str(tiny_model_dir)}, "engine": {"kind": "transformers"}, "shards": shards,
                "inputs": {"evaluation": labeled, "validation": labeled}, "evaluation": {"maxTokens": 8}}

    one = _run(evaluate("eone", 1), tmp_path, monkeypatch)
    _run(evaluate("etwo", 2), tmp_path, monkeypatch, index=1)  # either order: the last merges
    merged = _run(evaluate("etwo", 2), tmp_path, monkeypatch, index=0)
    assert merged.get("shard") is None
    _same_files(tmp_path / "eone", tmp_path / "etwo", ["predictions.jsonl", "validation_predictions.jsonl"])
    assert {k: merged["metrics"][k] for k in ("accuracy", "total", "validationTotal")} == \
        {k: one["metrics"][k] for k in ("accuracy", "total", "validationTotal")}
