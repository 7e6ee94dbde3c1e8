"""The augment stage's merge (step 6 of stages/augment.py): the shards' candidates are deduplicated
across seed examples in the seed examples' order — an item that repeats one kept for an earlier
example is the one dropped — and the merged files equal what one unsharded process writes from the
same candidates. Runs the real runtime (shard markers, the last shard merging) and the real
`augment.merge` on file:// storage; the candidates stand for what each shard's teacher loop
accepted (the teacher itself is exercised in tests/e2e/test_augment_shards.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from selfimprove_workers.contract import StageTask
from selfimprove_workers.runtime import StageContext, StageOutcome, run_task
from selfimprove_workers.stages import augment

A = "Tom has 5 apples and buys 3 more. How many apples does he have now?"
B = "A train travels 60 miles per hour for 3 hours. How far does it go?"
C = "Mia reads 12 pages a day for a week. How many pages does she read?"
D = "A box holds 6 pens. How many pens are in 9 boxes?"
WRONG = ["s1", "s2", "s3", "s4"]
# What each seed example's own loop accepted (steps 2-5): s2 and s4 each repeat an item of an
# earlier example, s3 got nothing.
CANDIDATES: dict[str, list[augment.Item]] = {
    "s1": [augment.Item(A, "5 + 3 = 8", "8"), augment.Item(B, "60 * 3 = 180", "180")],
    "s2": [augment.Item(A, "5 + 3 = 8", "8"), augment.Item(C, "12 * 7 = 84", "84")],
    "s3": [],
    "s4": [augment.Item(B, "60 * 3 = 180", "180"), augment.Item(D, "6 * 9 = 54", "54")],
}
# The per-shard counts a shard's teacher loop reports (here: made up, summed by the merge).
COUNTS = {"s1": (1, 2, 0, 1, 3), "s2": (1, 0, 1, 0, 3), "s3": (2, 3, 0, 0, 0), "s4": (1, 1, 0, 0, 2)}


def _task(out: Path, shards: int) -> StageTask:
    return StageTask.model_validate({
        "run": {"name": "m"}, "round": 2, "stage": "augment", "output": str(out), "shards": shards,
        "model": {"base": str(out / "no-model")}, "inputs": {"predictions": str(out / "unused.jsonl")},
        "augment": {"perExample": 2, "rougeThreshold": 0.95}})


def _part(ids: list[str]) -> dict[str, Any]:
    sums = [sum(COUNTS[i][j] for i in ids) for j in range(5)]
    return {"wrong": len(ids), "predictions": 6, "teacher": "t" if ids else None, "existingQuestions": 3,
            "labels": None, **{f"{key}Count": n for key, n in zip(augment.STAT_KEYS, sums, strict=True)}}


def _shard(ctx: StageContext) -> StageOutcome:
    """What `augment.run` commits for a shard: its slice's candidates and counts."""
    mine = ctx.shard_rows(WRONG)
    ctx.writer.write_jsonl(augment.CANDIDATES, [augment._candidate_row(i, it) for i in mine for it in CANDIDATES[i]])
    return StageOutcome(metrics={"wrong": len(mine)}, outputs={"candidates": augment.CANDIDATES}, details=_part(mine))


def _whole(ctx: StageContext) -> StageOutcome:
    """What `augment.run` does unsharded after its teacher loop."""
    return augment._finish(ctx, [(i, CANDIDATES[i]) for i in WRONG], [_part(WRONG)])


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_the_merge_drops_the_later_repeat_and_equals_one_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = run_task(_task(tmp_path / "one", 1), stage_fn=_whole)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")  # either order: the last to commit merges
    first = run_task(_task(tmp_path / "two", 2), stage_fn=_shard)
    assert first.shard == 1 and not (tmp_path / "two" / augment.AUGMENTED).exists()
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    merged = run_task(_task(tmp_path / "two", 2), stage_fn=_shard)  # merge_fn: the module's own
    assert merged.shard is None and merged.shards == 2

    data = (tmp_path / "one" / augment.AUGMENTED).read_bytes()
    assert (tmp_path / "two" / augment.AUGMENTED).read_bytes() == data
    rows = _rows(tmp_path / "one" / augment.AUGMENTED)
    # s1 keeps both; s2 loses its copy of s1's A (not the other way round) and its C is renumbered 0;
    # s4 loses the copy of B.
    assert [(r["id"], r["question"]) for r in rows] == [
        ("aug-r2-s1-0", A), ("aug-r2-s1-1", B), ("aug-r2-s2-0", C), ("aug-r2-s4-0", D)]
    assert rows[2]["answer"] == "12 * 7 = 84\n#### 84" and {r["source"] for r in rows} == {"s1", "s2", "s4"}

    strip = {k: v for k, v in one.metrics.items() if k != "seconds"}
    assert {k: v for k, v in merged.metrics.items() if k != "seconds"} == strip
    # the shards' counts summed; duplicates: theirs (1) and the two dropped across examples
    assert strip == {"wrong": 4, "requested": 8, "augmented": 4, "malformed": 6, "invalidAnswers": 1,
                     "duplicates": 3}
    details = json.loads((tmp_path / "two" / "result.json").read_text())["details"]
    assert details["crossDuplicates"] == 2 and details["shortExamples"] == 3  # s2, s3, s4 short of 2
    assert details["teacherRequests"] == 5 and details["parsedItems"] == 8 and details["shards"] == 2
    single = json.loads((tmp_path / "one" / "result.json").read_text())["details"]
    assert {k: v for k, v in details.items() if k != "shards"} == single


def test_dedup_across_keeps_input_order() -> None:
    groups = [("x", [augment.Item(A, "s", "1")]), ("y", [augment.Item(A, "s", "2"), augment.Item(B, "s", "3")])]
    kept, dropped = augment.dedup_across(groups, 0.95)
    assert [(s, [i.final for i in items]) for s, items in kept] == [("x", ["1"]), ("y", ["3"])] and dropped == 1
    kept, dropped = augment.dedup_across(list(reversed(groups)), 0.95)
    assert [(s, [i.final for i in items]) for s, items in kept] == [("y", ["2", "3"]), ("x", [])] and dropped == 1
