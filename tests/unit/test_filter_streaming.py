"""The filter stage's light candidates and chunked scoring, without a model: a candidate holds
its line's offset, not its text, and reads it back exactly (BOM, multi-byte UTF-8); the scoring
pass commits chunk by chunk, and a run that dies after some chunks is resumed without scoring
them again, ending with the bytes of an uninterrupted run; a chain whose per-question filters
come before a scoring filter scores only what passes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from selfimprove_workers.contract import StageTask
from selfimprove_workers.runtime import StageContext
from selfimprove_workers.stage_registry import STAGES
from selfimprove_workers.stages import filter as filter_stage

# The sharded runs need the registry to let a filter task have shards > 1.
needs_shardable_filter = pytest.mark.skipif(not STAGES["filter"].shardable,
                                            reason="stage_registry.py does not mark filter shardable")


class _Losses:
    """A stand-in for the engine's `completion_losses` (the model is not what is tested here):
    a loss from the target's text, the same whatever it is batched with; raises once `fail_after`
    calls were answered, as a preempted pod stops."""

    tokenizer = None

    def __init__(self, fail_after: int | None = None):
        self.calls: list[int] = []
        self.fail_after = fail_after

    def completion_losses(self, prompts: list[str], targets: list[str], add_eos: bool = False) -> list[float]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("preempted")
        self.calls.append(len(prompts))
        return [1.0 + (sum(map(ord, t)) % 97) / 50 for t in targets]


def _inputs(tmp: Path, questions: int = 6, paths: int = 3) -> dict[str, str]:
    lines, votes = [], []
    for q in range(questions):
        for p in range(paths):
            answer = "1" if p != 2 or q % 2 else "2"
            lines.append(json.dumps({"id": f"q{q}", "question": f"Wie viel ist {q}? ß", "path": p,
                                     "text": f"Schritt {'ü' * (p + q)}: die Antwort ist {answer}.", "answer": answer},
                                    ensure_ascii=False))
        votes.append(json.dumps({"id": f"q{q}", "majority": "1", "confidence": 1.0 if q % 2 else 2 / 3,
                                 "entropy": 0.5}))
    samples = tmp / "samples.jsonl"
    samples.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n\n").encode())  # a BOM and a blank line
    (tmp / "votes.jsonl").write_text("\n".join(votes) + "\n")
    (tmp / "validation.jsonl").write_text(json.dumps({"question": "v?", "answer": "1 + 1 = 2.\n#### 2"}) + "\n")
    return {"samples": str(samples), "votes": str(tmp / "votes.jsonl"), "validation": str(tmp / "validation.jsonl")}


def _task(out: Path, inputs: dict[str, str], filters: list[dict[str, Any]]) -> StageTask:
    return StageTask.model_validate({"run": {"name": "r"}, "round": 1, "stage": "filter", "output": str(out),
                                     "model": {"base": "/models/base"}, "inputs": inputs, "filters": filters})


FILTERS = [{"consistency": {"minConfidence": 0.9}}, {"distributionShift": {"keep": 0.5}}]


def test_candidates_hold_offsets_and_read_their_text_back(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    ctx = StageContext(_task(tmp_path / "out", inputs, FILTERS), tmp_path / "w")
    votes = filter_stage.load_votes(ctx, inputs["votes"])
    cands, no_majority = filter_stage.load_candidates(ctx, inputs["samples"], votes)
    rows = [json.loads(x) for x in Path(inputs["samples"]).read_text(encoding="utf-8-sig").splitlines() if x]
    assert no_majority == 0 and len(cands) == len(rows) == 18
    assert all(c._text is None and c._question is None for c in cands)  # nothing of the text is held
    assert [(c.question, c.text, c.answer) for c in cands] == [(r["question"], r["text"], r["answer"]) for r in rows]
    assert cands[5].row()["cot"] == rows[5]["text"]


def test_a_run_that_dies_resumes_from_its_committed_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFIMPROVE_CHUNK_ROWS", "4")  # 18 candidates: 5 chunks
    inputs = _inputs(tmp_path)

    def run(out: str, engine: _Losses) -> Any:
        monkeypatch.setattr(filter_stage.EnginePool, "get", lambda self, uri: engine)
        return filter_stage.run(StageContext(_task(tmp_path / out, inputs, FILTERS), tmp_path / f"w-{out}"))

    whole_engine = _Losses()
    whole = run("whole", whole_engine)
    # One call for the validation set per process, one per chunk that has a candidate to score
    # (consistency 0.9 leaves the odd questions: chunk k holds candidates 4k..4k+3).
    assert whole_engine.calls == [1, 1, 2, 3, 1, 2]
    assert whole.details["scoring"] == {"scored": {"1": 9}, "chunks": 5, "reusedChunks": 0, "chunkCandidates": 4,
                                        "engineLoads": 0}

    dying = _Losses(fail_after=3)  # validation + 2 chunks answered, then preempted
    with pytest.raises(RuntimeError, match="preempted"):
        run("resumed", dying)
    chunks = tmp_path / "resumed" / "filters" / "1" / "chunks"
    assert sorted(p.parent.name for p in chunks.glob("*/_SUCCESS")) == ["00000", "00001"]
    assert not (tmp_path / "resumed" / "kept.jsonl").exists()

    retry = _Losses()
    resumed = run("resumed", retry)
    assert retry.calls == [1, 3, 1, 2]  # chunks 0 and 1 are not scored again
    assert resumed.details["scoring"]["reusedChunks"] == 2
    for name in ("kept.jsonl", "rejected.jsonl"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert resumed.metrics == whole.metrics
    assert [{k: v for k, v in s.items() if k != "seconds"} for s in resumed.details["filters"]] == \
        [{k: v for k, v in s.items() if k != "seconds"} for s in whole.details["filters"]]

    # Another chunk size is other chunks: nothing is reused, the scores are recomputed.
    monkeypatch.setenv("SELFIMPROVE_CHUNK_ROWS", "5")
    again = _Losses()
    run("resumed-other-size", again)
    assert sum(again.calls) == 1 + 9


def test_only_what_passes_the_per_question_filters_before_a_scoring_filter_is_scored(tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """consistency, then distributionShift (global), then entropy, then distributionShift again:
    the second DS scores what passes consistency and entropy, a superset of what DS #1 keeps."""
    inputs = _inputs(tmp_path)
    engine = _Losses()
    monkeypatch.setattr(filter_stage.EnginePool, "get", lambda self, uri: engine)
    filters = [{"consistency": {"minConfidence": 0.5}}, {"distributionShift": {"keep": 0.8}},
               {"entropy": {"max": 0.6}}, {"distributionShift": {"keep": 0.5}}]
    outcome = filter_stage.run(StageContext(_task(tmp_path / "out", inputs, filters), tmp_path / "w"))
    # consistency 0.5 keeps the paths agreeing with the majority: 18 - 3 (path 2 of the even questions).
    assert outcome.details["scoring"]["scored"] == {"1": 15, "3": 15}
    steps = outcome.details["filters"]
    assert [(s["in"], s["out"]) for s in steps] == [(18, 15), (15, 12), (12, 12), (12, 6)]
    kept = [json.loads(x) for x in (tmp_path / "out" / "kept.jsonl").read_text().splitlines()]
    assert len(kept) == 6 and all("ü" in r["cot"] or r["cot"].startswith("Schritt :") for r in kept)


@needs_shardable_filter
def test_two_shards_one_with_nothing_to_score_merge_into_the_one_shard_bytes(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Shard 0's chunks hold no candidate that passes consistency (it still commits its empty
    chunks); the merge reads both shards' chunks and writes what one process writes."""
    from selfimprove_workers.runtime import run_task

    monkeypatch.setenv("SELFIMPROVE_CHUNK_ROWS", "3")  # 18 candidates: 6 chunks, one question each
    inputs = _inputs(tmp_path)
    # Only q5 has confidence 1 and its paths in the last chunk; two scoring filters.
    path = Path(inputs["votes"])
    path.write_text(path.read_text().replace('"confidence": 1.0', '"confidence": 0.6', 2))
    filters = [{"consistency": {"minConfidence": 0.9}}, {"distributionShift": {"keep": 0.7}},
               {"distributionShift": {"keep": 1.0}}]
    engine = _Losses()
    monkeypatch.setattr(filter_stage.EnginePool, "get", lambda self, uri: engine)

    def task(out: str, shards: int) -> StageTask:
        return StageTask.model_validate({**_task(tmp_path / out, inputs, filters).wire(), "shards": shards})

    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    one = run_task(task("one", 1))
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    first = run_task(task("two", 2))
    assert first.shard == 0 and first.metrics["scored"] == 0
    assert len(list((tmp_path / "two" / "shards" / "00000").glob("filters/*/chunks/*/_SUCCESS"))) == 2 * 3
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    merged = run_task(task("two", 2))
    assert merged.shard is None and merged.shards == 2
    for name in ("kept.jsonl", "rejected.jsonl"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert {k: v for k, v in merged.metrics.items() if k != "seconds"} == \
        {k: v for k, v in one.metrics.items() if k != "seconds"}
    assert one.metrics["kept"] == 2  # ⌊0.7·3⌋ of q5's paths


class _ShortContext:
    """An engine with a 16-token context that measures prompts as the real engines do
    (`completion_budget`): every judge or self-rating prompt is too long for it."""

    tokenizer = None

    def generate(self, prompts: list[str], params: Any, adapter: str | None = None) -> list[Any]:
        from selfimprove_workers.engines.base import completion_budget

        for i, p in enumerate(prompts):
            completion_budget(len(p), params.max_tokens, 16, f"prompt {i}")
        raise AssertionError("unreachable: every prompt is longer than 16")


@pytest.mark.parametrize("kind, setting", [("judge", "filters[1].judge.model, model.judge or model.judgeEndpoint"),
                                           ("self", "raise engine.maxModelLen")])
def test_a_rating_prompt_the_model_cannot_hold_names_the_filter_and_what_to_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, setting: str) -> None:
    from selfimprove_workers.errors import BadInput

    inputs = _inputs(tmp_path)
    monkeypatch.setattr(filter_stage.EnginePool, "get", lambda self, uri: _ShortContext())
    filters = [{"consistency": {"minConfidence": 0.5}}, {kind: {}}]
    with pytest.raises(BadInput) as err:
        filter_stage.run(StageContext(_task(tmp_path / "out", inputs, filters), tmp_path / "w"))
    message = str(err.value)
    assert message.startswith(f"filters[1].{kind}: prompt 0: the prompt is ") and setting in message, message
    assert "few-shot" not in message  # the engine's advice is for prompts the user writes
