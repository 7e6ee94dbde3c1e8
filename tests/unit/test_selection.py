"""Voting, the filters' arithmetic and LLM2LLM's parsing and dedup, with hand-computed numbers."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import pytest
from selfimprove_workers.contract import StageTask
from selfimprove_workers.selection import (
    DS_MAX,
    ds_keep,
    ds_value,
    importance_weight,
    k_center_greedy,
    parse_score,
    raw_ds,
    top_fraction,
)
from selfimprove_workers.spec import ConsistencyFilter, DistributionShiftFilter, EntropyFilter
from selfimprove_workers.stages import augment
from selfimprove_workers.stages import filter as filter_stage
from selfimprove_workers.voting import normalized_entropy, vote


# --------------------------------------------------------------------------- voting
def test_vote_tie_goes_to_first_seen_and_unanswered_count() -> None:
    v = vote(["5", "7", None, "7", "5", "9"])
    assert v.distribution == {"5": 2, "7": 2, "9": 1}
    assert list(v.distribution) == ["5", "7", "9"]
    assert (v.majority, v.count, v.paths, v.unanswered) == ("5", 2, 6, 1)
    assert v.confidence == pytest.approx(2 / 6)
    # Outcomes 2, 2, 1 and 1 unanswered over N = 6:
    # H = -(2·(1/3)ln(1/3) + 2·(1/6)ln(1/6)) = 1.32966, / ln 6 = 0.742098
    assert v.entropy == pytest.approx(0.742098, abs=1e-6)


def test_vote_edge_cases() -> None:
    unanimous = vote(["4"] * 4)
    assert (unanimous.majority, unanimous.confidence, unanimous.entropy) == ("4", 1.0, 0.0)
    single = vote(["3"])
    assert (single.confidence, single.entropy) == (1.0, 0.0)  # N = 1: entropy defined as 0
    nothing = vote([None, None])
    assert (nothing.majority, nothing.confidence, nothing.entropy) == (None, 0.0, 0.0)
    spread = vote(["1", "2", "3", "4"])
    assert spread.entropy == pytest.approx(1.0)
    assert spread.majority == "1"  # four-way tie → first seen
    assert vote(["2", "3", "3"]).majority == "3"  # a later answer with more votes wins


def test_normalized_entropy_two_outcomes() -> None:
    # 3 vs 1 of 4: H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335; / ln 4 = 0.405639
    assert normalized_entropy([3, 1], 4) == pytest.approx(0.405639, abs=1e-6)
    assert normalized_entropy([1], 1) == 0.0


# --------------------------------------------------------------------------- distribution shift
def test_ds_worked_example() -> None:
    """L̄v = mean(2.0, 3.0) = 2.5 against six candidate losses:

    loss  w' = clip(2.5/L, 0, 2)   DS
    2.5   1.0                      min(1/1, 5)   = 1.0
    1.25  2.0                      2.0 (w' > 1)
    5.0   0.5                      min(1/0.5, 5) = 2.0
    0.0   0 (L = 0)                min(1/0, 5)   = 5.0
    1.0   2.5 → 2.0                2.0
    2.0   1.25                     1.25
    10.0  0.25                     4.0
    """
    valid_mean = (2.0 + 3.0) / 2
    losses = [2.5, 1.25, 5.0, 0.0, 1.0, 2.0, 10.0]
    w = [importance_weight(valid_mean, x) for x in losses]
    assert w == pytest.approx([1.0, 2.0, 0.5, 0.0, 2.0, 1.25, 0.25])
    ds = [ds_value(x) for x in w]
    assert ds == pytest.approx([1.0, 2.0, 2.0, 5.0, 2.0, 1.25, 4.0])
    # sorted: [1.0, 1.25, 2.0, 2.0, 2.0, 4.0, 5.0]; n = 7
    # ⌊3.5⌋ = 3 kept: 1.0, 1.25 and, of the three tied at the threshold 2.0, the first (the
    # authors' strict `DS < 2.0` would keep 2 and, were all tied, none: issue 13).
    keep, th = ds_keep(ds, 0.5)
    assert th == 2.0 and keep == [True, True, False, False, False, True, False]
    keep, _ = ds_keep(ds, 0.5, tiebreak=[0, 3, 1, 0, 2, 0, 0])  # the tie goes to the lowest key: index 2
    assert keep == [True, False, True, False, False, True, False]
    keep, th = ds_keep(ds, 0.8)  # index ⌊5.6⌋ = 5 → 4.0
    assert th == 4.0 and keep == [True, True, True, False, True, True, False]
    keep, th = ds_keep(ds, 0.9)  # index ⌊6.3⌋ = 6 → 5.0: everything but DS = 5
    assert th == 5.0 and keep == [True, True, True, False, True, True, True]
    keep, th = ds_keep(ds, 1.0)  # index 7 ≥ n: no threshold, all kept
    assert th is None and all(keep)
    assert ds_keep([], 0.8) == ([], None)


@pytest.mark.parametrize("n, k", [(10, 0.8), (7, 0.5), (100, 0.29), (3, 0.34), (1, 1.0), (5, 0.999)])
def test_ds_keep_keeps_floor_k_n_when_every_weight_is_tied(n: int, k: float) -> None:
    """All at a clip bound (every w' = 2 → DS = 2, or every w' = 0 → DS = 5): still ⌊k·n⌋."""
    for value in (2.0, DS_MAX):
        keep, th = ds_keep([value] * n, k)
        want = n if k == 1.0 else {0.29: 29, 0.34: 1, 0.999: 4}.get(k, int(k * n))
        assert sum(keep) == want
        assert keep == [True] * want + [False] * (n - want)  # ties without a key: by position
        assert th == (None if want == n else value)


def test_ds_keep_small_n_can_keep_nothing() -> None:
    assert ds_keep([1.0], 0.8) == ([False], 1.0)   # ⌊0.8⌋ = 0: the stage then fails (see below)
    assert ds_keep([1.0, 1.5], 0.5) == ([True, False], 1.5)


def test_raw_ds_orders_what_the_clip_made_equal() -> None:
    # L̄v = 3: losses 1.0 and 0.5 both clip to w' = 2 (DS 2); unclipped 3 and 6, so 1.0 goes first.
    assert ds_value(importance_weight(3.0, 1.0)) == ds_value(importance_weight(3.0, 0.5)) == 2.0
    assert raw_ds(3.0, 1.0) == 3.0 and raw_ds(3.0, 0.5) == 6.0
    assert raw_ds(1.0, 4.0) == 4.0 and raw_ds(1.0, 10.0) == 10.0  # below the cap the same shape as DS
    assert raw_ds(1.0, 0.0) == float("inf")


def test_ds_weight_edges() -> None:
    assert importance_weight(2.0, 0.0) == 0.0
    assert importance_weight(0.0, 1.0) == 0.0
    assert ds_value(0.0) == 5.0
    assert ds_value(0.1) == 5.0  # 1/0.1 = 10 → capped at 5
    assert ds_value(1.0) == 1.0


class _StubEngine:
    """Returns the given losses in order, call after call (the filter scores the validation set
    in a call of its own, then the candidates), and records what it was asked."""

    tokenizer = None

    def __init__(self, losses: Sequence[float]):
        self.losses = list(losses)
        self.calls: list[tuple[list[str], list[str], bool]] = []

    def completion_losses(self, prompts: Sequence[str], completions: Sequence[str], *, add_eos: bool = False) -> list[float]:
        self.calls.append((list(prompts), list(completions), add_eos))
        out, self.losses = self.losses[:len(prompts)], self.losses[len(prompts):]
        assert len(out) == len(prompts), "the stub ran out of losses"
        return out


def _candidate(qid: str, path: int, answer: str | None, majority: str, conf: float = 1.0, ent: float = 0.0):
    return filter_stage.Candidate(qid, f"question {qid}?", path, f"{qid} path {path}. The answer is {answer}.",
                                  answer, majority, conf, ent)


def test_distribution_shift_filter_wires_losses_to_candidates() -> None:
    task = StageTask.model_validate({
        "run": {"name": "r"}, "round": 1, "stage": "filter", "output": "/tmp/unused",
        "model": {"base": "/models/base"}, "inputs": {"samples": "s", "votes": "v"},
        "filters": [{"distributionShift": {"keep": 0.5}}],
    })
    engine = _StubEngine([2.0, 3.0, 2.5, 1.25, 5.0, 2.0])  # 2 validation + 4 candidates
    pool = SimpleNamespace(get=lambda uri: engine)
    fr = filter_stage.FilterRun(SimpleNamespace(task=task), pool, [("v1?", "1 + 1 = 2.\nThe answer is 2.", "2"),
                                                                   ("v2?", "The answer is 3.", "3")])
    cands = [_candidate("a", i, "1", "1") for i in range(4)]
    kept, info = filter_stage.distribution_shift(fr, cands, DistributionShiftFilter(keep=0.5))
    # DS = [1.0, 2.0, 2.0, 1.25]; sorted [1.0, 1.25, 2.0, 2.0]; index 2 → 2.0; keep < 2.0
    assert [c.path for c in kept] == [0, 3]
    assert info["validLoss"] == 2.5 and info["threshold"] == 2.0
    assert [c.scores["ds"] for c in cands] == [1.0, 2.0, 2.0, 1.25]
    (prompts, targets, add_eos), (cand_prompts, cand_targets, cand_eos) = engine.calls
    assert add_eos and cand_eos  # scored like the train stage: EOS included
    assert all("Let's think step by step." in p for p in prompts + cand_prompts)  # the zero-shot CoT format
    assert targets[0] == " 1 + 1 = 2.\nThe answer is 2." and cand_targets[0] == " " + cands[0].text


def _ds_task(filters: list, tmp: str = "/tmp/unused", **inputs: str) -> StageTask:
    return StageTask.model_validate({
        "run": {"name": "r"}, "round": 1, "stage": "filter", "output": tmp,
        "model": {"base": "/models/base"}, "inputs": {"samples": "s", "votes": "v", **inputs}, "filters": filters,
    })


def test_distribution_shift_every_weight_at_the_upper_bound_keeps_floor_k_n() -> None:
    """The demo's case (issue 13): own samples' losses far below the validation loss, so every
    w' = 2 and DS = 2. ⌊0.8·5⌋ = 4 are kept, the lowest unclipped ratio first, then by question
    id and path whatever the input order; the report counts the weights at each bound."""
    task = _ds_task([{"distributionShift": {"keep": 0.8}}])
    losses = {("b", 0): 0.5, ("a", 1): 0.5, ("a", 0): 0.5, ("c", 0): 0.1, ("b", 1): 1.0}  # L̄v = 4 → all r ≥ 4
    cands = [_candidate(q, p, "1", "1") for q, p in losses]
    engine = _StubEngine([4.0, 4.0] + list(losses.values()))
    log = SimpleNamespace(warnings=[])
    ctx = SimpleNamespace(task=task, log=SimpleNamespace(warning=log.warnings.append))
    fr = filter_stage.FilterRun(ctx, SimpleNamespace(get=lambda uri: engine), [("v1?", "c", "1"), ("v2?", "c", "2")])
    kept, info = filter_stage.distribution_shift(fr, cands, DistributionShiftFilter(keep=0.8))
    assert all(c.scores["ds"] == 2.0 and c.scores["dsWeight"] == 2.0 for c in cands)
    # unclipped ratio: b1 4, a0 a1 b0 8, c0 40 → b1, then a0, a1, b0 by (id, path); c0 dropped
    assert sorted((c.id, c.path) for c in kept) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert info["n"] == 5 and info["kept"] == 4 and info["threshold"] == 2.0
    assert (info["weightsAtLowerBound"], info["weightsAtUpperBound"], info["dsAtMax"]) == (0, 5, 0)
    assert len(log.warnings) == 1 and "every one of the 5 weights sits at a clip bound" in log.warnings[0]
    # Identical losses: the tie goes by (question id, path), not by file order.
    same = [_candidate(q, p, "1", "1") for q, p in [("b", 0), ("a", 1), ("a", 0)]]
    engine.losses = [0.5, 0.5, 0.5]  # the validation losses were computed once, by the first call
    kept, info = filter_stage.distribution_shift(fr, same, DistributionShiftFilter(keep=0.5))
    assert [(c.id, c.path) for c in kept] == [("a", 0)]


def test_distribution_shift_counts_weights_at_the_lower_bound() -> None:
    task = _ds_task([{"distributionShift": {"keep": 0.5}}])
    engine = _StubEngine([1.0, 0.0, 10.0, 1.0, 0.9])  # L̄v = 1: w' = 0 (L = 0), 0.1 (DS capped 5), 1, 1.11
    ctx = SimpleNamespace(task=task, log=SimpleNamespace(warning=lambda m: None))
    fr = filter_stage.FilterRun(ctx, SimpleNamespace(get=lambda uri: engine), [("v?", "c", "1")])
    cands = [_candidate("a", i, "1", "1") for i in range(4)]
    kept, info = filter_stage.distribution_shift(fr, cands, DistributionShiftFilter(keep=0.5))
    assert [c.path for c in kept] == [2, 3]
    assert (info["weightsAtLowerBound"], info["weightsAtUpperBound"], info["dsAtMax"]) == (1, 0, 2)


def _write_stage_inputs(tmp_path, confidences: dict[str, float], paths: int = 1):
    import json

    samples, votes = tmp_path / "samples.jsonl", tmp_path / "votes.jsonl"
    samples.write_text("".join(json.dumps({"id": q, "question": f"{q}?", "path": p, "text": f"{q} {p}. The answer is 1.",
                                           "answer": "1"}) + "\n" for q in confidences for p in range(paths)))
    votes.write_text("".join(json.dumps({"id": q, "majority": "1", "confidence": c, "entropy": 0.0}) + "\n"
                             for q, c in confidences.items()))
    validation = tmp_path / "validation.jsonl"
    validation.write_text(json.dumps({"question": "v?", "answer": "1 + 1 = 2.\n#### 2"}) + "\n")
    return {"samples": str(samples), "votes": str(votes), "validation": str(validation)}


def test_filter_stage_fails_naming_the_filter_that_keeps_nothing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selfimprove_workers.errors import BadInput
    from selfimprove_workers.runtime import StageContext

    inputs = _write_stage_inputs(tmp_path, {"a": 0.5, "b": 0.5})
    out = tmp_path / "out"
    task = _ds_task([{"consistency": {"minConfidence": 0.9}}], str(out), **inputs)
    with pytest.raises(BadInput, match=r"filters\[0\]\.consistency: kept none of the 2 candidates .*"
                                       r"lower filters\[0\]\.consistency\.minConfidence \(now 0\.9\)"):
        filter_stage.run(StageContext(task, tmp_path / "w"))
    assert not (out / "kept.jsonl").exists()  # no empty file handed to training

    # distributionShift on one candidate: ⌊0.8·1⌋ = 0.
    engine = _StubEngine([3.0, 1.0])  # 1 validation + 1 candidate
    monkeypatch.setattr(filter_stage.EnginePool, "get", lambda self, uri: engine)
    task = _ds_task([{"consistency": {"minConfidence": 0.9}}, {"distributionShift": {"keep": 0.8}}], str(out),
                    **_write_stage_inputs(tmp_path, {"a": 1.0, "b": 0.5}))
    with pytest.raises(BadInput, match=r"filters\[1\]\.distributionShift: kept none of the 1 candidates it was given "
                                       r"\(⌊keep·n⌋ = ⌊0\.8·1⌋ = 0\).*raise filters\[1\]\.distributionShift\.keep \(now 0\.8\)"):
        filter_stage.run(StageContext(task, tmp_path / "w"))
    assert not (out / "kept.jsonl").exists()


def test_filter_stage_distribution_shift_all_tied_keeps_floor_k_n(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selfimprove_workers.runtime import StageContext
    from selfimprove_workers.storage import read_jsonl

    inputs = _write_stage_inputs(tmp_path, {"a": 1.0, "b": 1.0, "c": 0.4}, paths=4)
    engine = _StubEngine([])
    # L̄v = 5 on the one validation example; every candidate 0.5 → w' = 2
    engine.completion_losses = lambda prompts, targets, add_eos=False: [  # type: ignore[method-assign]
        5.0 if t.startswith(" 1 + 1 = 2.") else 0.5 for t in targets]
    monkeypatch.setattr(filter_stage.EnginePool, "get", lambda self, uri: engine)
    out = tmp_path / "out"
    task = _ds_task([{"consistency": {"minConfidence": 0.6}}, {"distributionShift": {"keep": 0.8}}], str(out), **inputs)
    ctx = StageContext(task, tmp_path / "w")
    outcome = filter_stage.run(ctx)
    steps = outcome.details["filters"]
    assert [(s["in"], s["out"]) for s in steps] == [(12, 8), (8, 6)]  # ⌊0.8·8⌋ = 6, not 0
    assert steps[1]["weightsAtUpperBound"] == 8 and steps[1]["threshold"] == 2.0
    kept = [row for _, row in read_jsonl(ctx.storage_for(str(out / "kept.jsonl")), str(out / "kept.jsonl"))]
    assert [r["id"] for r in kept] == ["a#0", "a#1", "a#2", "a#3", "b#0", "b#1"]


def test_consistency_and_entropy_filters() -> None:
    cands = [
        _candidate("a", 0, "5", "5", conf=0.75, ent=0.4), _candidate("a", 1, "6", "5", conf=0.75, ent=0.4),
        _candidate("b", 0, "2", "2", conf=1.0, ent=0.0), _candidate("c", 0, None, "3", conf=0.5, ent=0.8),
    ]
    kept, _ = filter_stage.consistency(None, cands, ConsistencyFilter(min_confidence=0.7))
    assert [(c.id, c.path) for c in kept] == [("a", 0), ("b", 0)]
    kept, _ = filter_stage.entropy(None, cands, EntropyFilter(max=0.3))
    assert [(c.id, c.path) for c in kept] == [("b", 0)]


# --------------------------------------------------------------------------- judge / self / diversity
@pytest.mark.parametrize(
    "text, max_score, expected",
    [
        ("4", 5, 4.0),
        ("Score: 4.5\nThe response is accurate.", 5, 4.5),
        ("**5**/5", 5, 5.0),
        ("Rating - 3 out of 5", 5, 3.0),
        ("The response is mostly right.\nScore: 4", 5, 4.0),
        ("\n\n  2\nexplanation", 5, 2.0),
        ("I give it 7", 5, None),          # out of range
        ("Great answer, no number", 5, None),
        ("", 5, None),
        (" 7\nQuestion: next", 10, 7.0),   # a base model continuing "Score:"
        ("Score: 10/10", 10, 10.0),
        ("line one\nline two\nline three\nScore: 4", 5, None),  # only the first lines count
    ],
)
def test_parse_score(text: str, max_score: float, expected: float | None) -> None:
    assert parse_score(text, max_score) == expected


def test_top_fraction_is_exact_and_deterministic() -> None:
    assert top_fraction([3, 9, 9, 1], 0.5) == [False, True, True, False]
    assert top_fraction([3, 9, 9, 1], 0.6) == [True, True, True, False]  # ⌈2.4⌉ = 3
    assert top_fraction([5, 5, 5], 0.34) == [True, True, False]  # ties → earlier first
    assert top_fraction([], 0.5) == []


def test_k_center_greedy_worked_example() -> None:
    """Points 0, 1, 2, 10, 11 on a line: the mean is 4.8, nearest is 2 (index 2); the farthest
    from {2} is 11 (index 4); then distances to {2, 11} are 2, 1, -, 1, - → index 0."""
    pts = np.array([[0.0, 0], [1, 0], [2, 0], [10, 0], [11, 0]])
    assert k_center_greedy(pts, 3) == [2, 4, 0]
    assert k_center_greedy(pts, 0) == []
    assert sorted(k_center_greedy(pts, 10)) == [0, 1, 2, 3, 4]
    # Duplicates: every distinct point is chosen before a copy.
    dup = np.array([[1.0, 0], [1.0, 0], [0, 1.0]])
    assert sorted(k_center_greedy(dup, 2)) in ([0, 2], [1, 2])


# --------------------------------------------------------------------------- LLM2LLM
TEACHER_REPLY = """Sure! Here are new problems:
1. Question: Tom has 5 apples and buys 3 more. How many apples does he have?
Answer: 5 + 3 = 8 apples.
#### 8

2) Question: Ann has $1,200 and spends half. How much money is left?
Answer: 1200 / 2 = 600
#### $600 dollars
3. Question: A problem without an answer line
#### 5
Question: No number at the end
Answer: It is many.
#### many
**Question:** Sue reads 10 pages a day for 3 days. How many pages?
**Answer:** 10 * 3 = 30
#### 30.
4. Question: Cut off by the token limit
Answer: 3 +"""


def test_parse_teacher_output() -> None:
    items, malformed = augment.parse_teacher_output(TEACHER_REPLY, truncated=True)
    assert [(i.question.split()[0], i.final) for i in items] == [("Tom", "8"), ("Ann", "600"), ("Sue", "30")]
    assert items[0].answer == "5 + 3 = 8 apples.\n#### 8"
    assert malformed == 3  # no "Answer:", a non-number after ####, the truncated last item
    items, malformed = augment.parse_teacher_output(TEACHER_REPLY, truncated=False)
    assert malformed == 3 and len(items) == 3  # untruncated, "3 +" still has no ####
    assert augment.parse_teacher_output("I cannot help with that.") == ([], 1)


def test_rouge_dedup_matches_rouge_score() -> None:
    from rouge_score import rouge_scorer

    known = ["Tom has 5 apples and buys 3 more. How many apples does he have?",
             "A train travels 60 miles per hour for 3 hours. How far does it go?"]
    d = augment.RougeDeduper(0.95, known)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for q in ["Tom has 6 apples and buys 3 more. How many apples does he have?",
              "A train travels 60 miles per hour for 3 hours. How far does it go?",
              "Completely unrelated text about cats."]:
        exact = max(scorer.score(k, q)["rougeL"].fmeasure for k in known)
        assert d.max_score(q) == pytest.approx(exact)
        assert d.is_duplicate(q) == (exact > 0.95)
    # One changed word in 14: F = 2·13/28 = 0.9286 ≤ 0.95 → kept; the identical one is dropped.
    assert d.max_score(known[0].replace("5", "6")) == pytest.approx(13 / 14)
    assert d.is_duplicate(known[1]) and not d.is_duplicate(known[0].replace("5", "6"))


def test_augment_loop_dedups_counts_and_asks_for_more() -> None:
    seed_q = "Tom has 5 apples and buys 3 more. How many apples does he have?"
    wrong = [augment.WrongExample("s1", seed_q, "5 + 3 = 8\n#### 8"),
             augment.WrongExample("s2", "How far does a car go at 50 mph in 2 hours?", "#### 100")]
    d = augment.RougeDeduper(0.95, [seed_q, wrong[1].question])
    seen: list[list[list[dict[str, str]]]] = []

    def teacher(requests: list[list[dict[str, str]]], attempt: int) -> list[tuple[str, str | None]]:
        seen.append(requests)
        if attempt == 0:
            return [
                # s1: a copy of the seed question (duplicate) and one new item
                (f"1. Question: {seed_q}\nAnswer: 8\n#### 8\n2. Question: Mia has 2 pens and buys 4 more. "
                 "How many pens?\nAnswer: 2 + 4 = 6\n#### 6", "stop"),
                ("I don't know.", "stop"),  # s2: malformed
            ]
        return [
            ("1. Question: Joe runs 3 km a day for 5 days. How far in total?\nAnswer: 3 * 5 = 15\n#### 15", "stop"),
            ("1. Question: A bus goes 40 km/h for 3 hours. How far?\nAnswer: 40 * 3 = 120\n#### 120", "stop"),
        ]

    stats = augment.augment_examples(wrong, k=2, retries=1, dedup=d, teacher=teacher)
    assert stats == {"requests": 4, "malformed": 1, "invalid": 0, "duplicates": 1, "parsed": 4}
    assert [i.final for i in wrong[0].accepted] == ["6", "15"]
    assert [i.final for i in wrong[1].accepted] == ["120"]
    # The retry for s1 shows its accepted item and asks for the one missing; s2 is asked afresh.
    retry_s1, retry_s2 = seen[1]
    assert "Mia has 2 pens" in retry_s1[-2]["content"] and "1 more question," in retry_s1[-1]["content"]
    assert retry_s2 == seen[0][1]
    assert "2 similar questions" in seen[0][0][-1]["content"]


# --------------------------------------------------------------------------- chat rendering
def test_render_messages_with_and_without_a_chat_template() -> None:
    from selfimprove_workers.chat import render_messages
    from selfimprove_workers.demo.tinymodel import build_tokenizer

    tok = build_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Rate this."}]
    plain = render_messages(tok, messages, reply_prefix="Score:")
    assert plain == "Be brief.\n\nUser: Rate this.\n\nAssistant: Score:"
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert render_messages(tok, messages) == "<system>Be brief.<user>Rate this.<assistant>"
    assert render_messages(tok, messages, use_template=False).startswith("Be brief.\n\nUser:")
    # A template without a system role: the system text joins the first user turn.
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                         "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>")
    assert render_messages(tok, messages) == "<user>Be brief.\n\nRate this.<assistant>"
