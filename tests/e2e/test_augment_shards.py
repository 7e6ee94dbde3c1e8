"""The augment stage sharded (issue 14 item 1): two shards' merged augmented.jsonl and metrics are
byte for byte one shard's, through the real stage processes and a real vLLM teacher — served
(`served_tiny`, vLLM's OpenAI server on the tiny Llama, with structured outputs so the random model
writes parseable items) and local (the vLLM CPU engine, whose random replies parse to nothing).

The served runs use a question vocabulary of four sentences, so the teacher repeats itself: the
per-example dedup (in the shards) and the dedup across seed examples (in the merge) both drop
items, and the merge must drop the same ones in the same order as one process does. A choice task
(answers A/B, the teacher allowed to write C/D) shows the invalid-answer accounting on what vLLM
really generated. Shards run one after the other (2 cores); the last to commit merges.

Cost on the shared 2-core machine: the server's start (once per session, shared with
test_endpoint.py) plus ~10 s per served stage process; the local test loads vLLM three times
(~20 s each).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from model_fixtures import require_vllm, run_worker, write_jsonl

pytestmark = pytest.mark.slow

WORD = "[a-z]{2,6}"
# Four possible questions: "Tom has 2 cats?" … ; two distinct ones score ROUGE-L F 0.75 ≤ 0.8
# (kept), a repeat 1.0 (dropped).
NUMERIC_ITEM = rf"Question: (Tom|Ann) has (2|3) cats\?\nAnswer: {WORD}( {WORD}){{1,3}}\.\n#### [1-9]"
CHOICE_ITEM = (rf"Question: Review: (good|bad) (film|food)\. \(A\) positive \(B\) negative\n"
               rf"Answer: {WORD}( {WORD}){{1,3}}\.\n#### [A-D]")
PREDICTIONS = [
    {"id": "s1", "question": "Bo walks 2 km a day for 4 days. How far does he walk?", "correct": False, "gold": "8"},
    {"id": "s2", "question": "What is 10 divided by 2?", "correct": True, "gold": "5"},
    {"id": "s3", "question": "A shop sells 7 pens a day. How many pens in 5 days?", "correct": False, "gold": "35"},
    {"id": "s4", "question": "Lia saves 3 dollars a week for 6 weeks. How much is saved?", "correct": False,
     "gold": "18"},
    {"id": "s5", "question": "A bus has 40 seats and 12 are empty. How many are taken?", "correct": False,
     "gold": "28"},
]
CHOICE_PREDICTIONS = [
    {"id": "c1", "question": "Review: The plot was silly and slow. (A) positive (B) negative", "correct": False,
     "gold": "B"},
    {"id": "c2", "question": "Review: A warm and funny story. (A) positive (B) negative", "correct": False,
     "gold": "A"},
    {"id": "c3", "question": "Review: I want my money back. (A) positive (B) negative", "correct": False,
     "gold": "B"},
]


def _run(task: dict[str, Any], tmp: Path, monkeypatch: pytest.MonkeyPatch, index: int | None = None) -> dict[str, Any]:
    if index is None:
        monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    else:
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))
    rc, summary, err = run_worker(task, tmp)
    assert rc == 0 and summary is not None and summary["status"] == "Succeeded", err[-3000:]
    return summary


def _one_and_two(make: Any, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, list[dict], dict]:
    """The one-shard summary, the two shards' summaries (the second merged), and the merged result.json."""
    one = _run(make("one", 1), tmp, monkeypatch)
    first = _run(make("two", 2), tmp, monkeypatch, index=1)
    assert first["shard"] == 1 and not (tmp / "two" / "augmented.jsonl").exists()
    merged = _run(make("two", 2), tmp, monkeypatch, index=0)
    assert merged.get("shard") is None and merged["shards"] == 2
    assert (tmp / "two" / "augmented.jsonl").read_bytes() == (tmp / "one" / "augmented.jsonl").read_bytes()
    assert _without(merged["metrics"], "seconds") == _without(one["metrics"], "seconds")
    shard0 = json.loads((tmp / "two" / "shards" / "00000" / "result.json").read_text())["summary"]
    details = json.loads((tmp / "two" / "result.json").read_text())["details"]
    single = json.loads((tmp / "one" / "result.json").read_text())["details"]
    timing = ("seconds", "waitSeconds")
    assert _without(details, "shards", "teacherEndpoint") == _without(single, "teacherEndpoint")
    if "teacherEndpoint" in single:
        assert _without(details["teacherEndpoint"], *timing) == _without(single["teacherEndpoint"], *timing)
    return one, [shard0, first], details


def _without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _served_task(tmp: Path, served: Any, regex: str, predictions: Path, threshold: float = 0.8, **body: Any):
    def make(out: str, shards: int) -> dict[str, Any]:
        endpoint = {"url": served.url, "model": served.model, "maxConcurrency": 2,
                    "extraBody": {"structured_outputs": {"regex": rf"1\. {regex}\n\n2\. {regex}"}}}
        return {"run": {"name": "aug"}, "round": 1, "stage": "augment", "output": str(tmp / out), "shards": shards,
                "model": {"base": str(tmp / "no-such-model"), "teacherEndpoint": endpoint},
                "inputs": {"predictions": str(predictions)},
                "augment": {"perExample": 2, "maxTokens": 200, "retries": 1, "rougeThreshold": threshold}, **body}
    return make


def test_two_shards_augment_through_the_served_teacher_exactly_as_one(served_tiny, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    predictions = write_jsonl(tmp_path / "seed_predictions.jsonl", PREDICTIONS)
    one, shards, details = _one_and_two(_served_task(tmp_path, served_tiny, NUMERIC_ITEM, predictions),
                                        tmp_path, monkeypatch)
    m = one["metrics"]
    assert [s["metrics"]["wrong"] for s in shards] == [2, 2]  # 4 wrong examples: s1, s3 | s4, s5
    rows = _rows(tmp_path / "one" / "augmented.jsonl")
    assert (m["wrong"], m["requested"], m["augmented"], m["malformed"], m["invalidAnswers"]) == (4, 8, len(rows), 0, 0)
    # Every reply is two well-formed items (the regex): all parsed, none invalid.
    assert details["parsedItems"] == 2 * details["teacherRequests"] and m["teacherHttpRequests"] == details["teacherRequests"]
    # Four possible questions in all: at most four survive the merge, and what the shards accepted
    # beyond them is dropped there, in order.
    candidates = sum(s["metrics"]["candidates"] for s in shards)
    assert 0 < len(rows) <= 4 and len({r["question"] for r in rows}) == len(rows)
    assert details["crossDuplicates"] == candidates - len(rows) >= candidates - 4
    assert m["duplicates"] >= details["crossDuplicates"] > 0
    assert [r["source"] for r in rows] == sorted(r["source"] for r in rows)  # seed examples' order
    for source in {r["source"] for r in rows}:  # numbered after the merge's drops: 0, 1, …
        mine = [r["id"] for r in rows if r["source"] == source]
        assert mine == [f"aug-r1-{source}-{j}" for j in range(len(mine))]


def test_two_shards_filter_the_teachers_examples_in_the_merge_exactly_as_one(served_tiny, tiny_reward_model_dir: Path,
                                                                            tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """augment.filters (a reward model keeping half, local weights) run once, over the merged
    items: the kept and rejected files of two shards are one shard's, byte for byte."""
    import math

    predictions = write_jsonl(tmp_path / "seed_predictions.jsonl", PREDICTIONS)
    served = _served_task(tmp_path, served_tiny, NUMERIC_ITEM, predictions, threshold=0.99)

    def make(out: str, shards: int) -> dict[str, Any]:
        task = served(out, shards)
        task["augment"]["filters"] = [{"rewardModel": {"model": str(tiny_reward_model_dir), "keep": 0.5}}]
        return task

    one, _, details = _one_and_two(make, tmp_path, monkeypatch)
    assert (tmp_path / "two" / "rejected.jsonl").read_bytes() == (tmp_path / "one" / "rejected.jsonl").read_bytes()
    [step] = details["filters"]
    rows, rejected = _rows(tmp_path / "one" / "augmented.jsonl"), _rows(tmp_path / "one" / "rejected.jsonl")
    assert step["kind"] == "rewardModel" and step["out"] == len(rows) == math.ceil(0.5 * step["in"]) > 0
    assert len(rejected) == step["in"] - len(rows) == one["metrics"]["filteredOut"]
    assert min(r["reward"] for r in rows) >= max((r["reward"] for r in rejected), default=-math.inf)


def test_a_choice_task_augments_with_labels_and_counts_the_rest(served_tiny, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    predictions = write_jsonl(tmp_path / "seed_predictions.jsonl", CHOICE_PREDICTIONS)
    # two distinct reviews share 6 of 7 tokens (ROUGE-L F 0.86): a threshold above that keeps both
    make = _served_task(tmp_path, served_tiny, CHOICE_ITEM, predictions, threshold=0.9,
                        prompting={"answer": {"type": "choice", "choices": "AB"}})
    one, _, details = _one_and_two(make, tmp_path, monkeypatch)
    m = one["metrics"]
    rows = _rows(tmp_path / "one" / "augmented.jsonl")
    assert details["labels"] == "AB" and m["malformed"] == 0
    # Two items per reply: each is either parsed (a letter A/B) or an invalid answer (C/D).
    assert details["parsedItems"] + m["invalidAnswers"] == 2 * details["teacherRequests"]
    assert m["invalidAnswers"] > 0 and details["parsedItems"] > 0
    assert rows and all(r["answer"].rsplit("\n#### ", 1)[1] in ("A", "B") for r in rows)
    assert all(r["question"].endswith("(A) positive (B) negative") for r in rows)


@pytest.mark.vllm
def test_two_shards_augment_with_the_local_vllm_teacher_exactly_as_one(tiny_model_dir: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    require_vllm()
    predictions = write_jsonl(tmp_path / "seed_predictions.jsonl", PREDICTIONS)

    def make(out: str, shards: int) -> dict[str, Any]:
        return {"run": {"name": "aug"}, "round": 1, "stage": "augment", "output": str(tmp_path / out),
                "shards": shards, "model": {"base": str(tiny_model_dir)}, "engine": {"kind": "vllm"},
                "inputs": {"predictions": str(predictions)},
                "augment": {"perExample": 1, "maxTokens": 24, "retries": 1}}

    one, shards, details = _one_and_two(make, tmp_path, monkeypatch)
    # A random model writes no items: every request is retried once, every reply is malformed.
    assert details["teacherRequests"] == 8 and one["metrics"]["malformed"] >= 8 and one["metrics"]["augmented"] == 0
    assert details["teacher"] == str(tiny_model_dir)
