"""The rewardModel and correct filters through the filter stage, as its Job runs it
(`python -m selfimprove_workers TASK.json`), on hand-written samples: a tiny random reward model
(`LlamaForSequenceClassification`, num_labels 1, built at test time) and the tiny Llama for
STaR's rationalization (transformers engine)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from model_fixtures import run_worker, write_jsonl

QUESTIONS = [
    {"id": "q1", "question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"},
    {"id": "q2", "question": "What is 6 times 7?", "answer": "6 * 7 = 42\n#### 42"},
    {"id": "q3", "question": "A pen costs $2. How much do 5 pens cost?", "answer": "#### 10"},
]
PATHS = {  # question → (text, extracted answer) per path
    "q1": [("She sold 48/2 = <<48/2=24>>24 in May and 48+24 = <<48+24=72>>72 in all. The answer is 72.", "72"),
           ("May: 48 / 2 = 24. Total: 48 + 24 = 72. The answer is 72.", "72"),     # same equations as path 0
           ("48 + 48 = 96. The answer is 96.", "96"),
           ("Half of 48 is 24; 24 + 48 = 72. The answer is 72.", "72")],
    "q2": [("6 * 7 = 42. The answer is 42.", "42"), ("6 + 7 = 13. The answer is 13.", "13")],
    "q3": [("5 + 2 = 7. The answer is 7.", "7"), ("2 + 5 = 7. The answer is 7.", "7")],
}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture()
def samples(tmp_path: Path) -> dict[str, str]:
    rows, votes = [], []
    for q in QUESTIONS:
        answers = [a for _, a in PATHS[q["id"]]]
        majority = max(answers, key=answers.count)
        rows += [{"id": q["id"], "question": q["question"], "path": i, "text": t, "answer": a}
                 for i, (t, a) in enumerate(PATHS[q["id"]])]
        votes.append({"id": q["id"], "majority": majority, "confidence": answers.count(majority) / len(answers),
                      "entropy": 0.5})
    return {"samples": str(write_jsonl(tmp_path / "samples.jsonl", rows)),
            "votes": str(write_jsonl(tmp_path / "votes.jsonl", votes)),
            "questions": str(write_jsonl(tmp_path / "questions.jsonl", QUESTIONS))}


def filter_task(out: Path, base: Path, inputs: dict[str, str], filters: list[dict[str, Any]]) -> dict[str, Any]:
    return {"run": {"name": "e2e"}, "round": 1, "stage": "filter", "output": str(out),
            "model": {"base": str(base)}, "engine": {"kind": "transformers"}, "inputs": inputs, "filters": filters}


def ok(rc: int, summary: dict | None, stderr: str) -> dict[str, Any]:
    assert rc == 0, stderr[-4000:]
    assert summary is not None and summary["status"] == "Succeeded", summary
    return summary


# --------------------------------------------------------------------------- reward model
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.mark.parametrize("chat_template", [False, True])
def test_reward_scores_do_not_depend_on_the_batch(tiny_reward_model_dir: Path, chat_template: bool) -> None:
    from selfimprove_workers.stages.filter_extra import load_reward_model, reward_texts, score_texts

    model, tok, device = load_reward_model(str(tiny_reward_model_dir))
    if chat_template:
        tok.chat_template = TEMPLATE
    texts = [reward_texts(tok, q["question"], t) for q in QUESTIONS for t, _ in PATHS[q["id"]]]
    if chat_template:
        assert texts[0].startswith("<user>Natalia") and "</user>\n<assistant>She sold" in texts[0]
    else:
        assert texts[0] == QUESTIONS[0]["question"] + "\n\n" + PATHS["q1"][0][0]
    one, _ = score_texts(model, tok, texts, batch_size=1, max_length=4096)
    batched, truncated = score_texts(model, tok, texts, batch_size=5, max_length=4096)
    assert truncated == 0 and len(set(round(s, 4) for s in one)) == len(texts)  # distinct rewards
    assert batched == pytest.approx(one, abs=1e-5)
    # Truncation is counted, and a truncated text scores as its first max_length tokens do.
    short, truncated = score_texts(model, tok, texts[:2], batch_size=2, max_length=20)
    assert truncated == 2
    alone, _ = score_texts(model, tok, [tok.decode(tok(texts[0])["input_ids"][:20], skip_special_tokens=False)],
                           batch_size=1, max_length=4096)
    assert short[0] == pytest.approx(alone[0], abs=1e-4) or truncated == 2  # decode may not round-trip specials


def test_reward_model_filter_through_the_stage(tiny_model_dir: Path, tiny_reward_model_dir: Path,
                                              samples: dict[str, str], tmp_path: Path) -> None:
    inputs = {"samples": samples["samples"], "votes": samples["votes"]}
    out = tmp_path / "keep"
    summary = ok(*run_worker(filter_task(out, tiny_model_dir, inputs,
                                         [{"rewardModel": {"model": str(tiny_reward_model_dir), "keep": 0.5,
                                                           "batchSize": 3}}]), tmp_path))
    rows = read_jsonl(out / "kept.jsonl")
    rejected = read_jsonl(out / "rejected.jsonl")
    n = sum(len(p) for p in PATHS.values())
    assert summary["metrics"]["candidates"] == n and len(rows) == math.ceil(0.5 * n)
    assert min(r["reward"] for r in rows) >= max(r["reward"] for r in rejected)   # the top half by reward
    step = json.loads((out / "result.json").read_text())["details"]["filters"][0]
    assert step["kind"] == "rewardModel" and step["truncated"] == 0

    # minScore: every candidate at or above it, whatever the count (between the 2nd and 3rd lowest
    # reward: another batch size may move a score in its last bits).
    low = sorted(r["reward"] for r in rows + rejected)
    threshold = (low[1] + low[2]) / 2
    out2 = tmp_path / "min"
    ok(*run_worker(filter_task(out2, tiny_model_dir, inputs,
                               [{"rewardModel": {"model": str(tiny_reward_model_dir), "minScore": threshold}}]), tmp_path))
    assert len(read_jsonl(out2 / "kept.jsonl")) == n - 2


# --------------------------------------------------------------------------- correct (STaR / RFT / ReST-EM)
def test_correct_filter_through_the_stage_with_rationalization(tiny_model_dir: Path, samples: dict[str, str],
                                                               tmp_path: Path) -> None:
    out = tmp_path / "correct"
    summary = ok(*run_worker(filter_task(out, tiny_model_dir, samples, [
        {"correct": {"maxPerQuestion": 10, "rationalize": True, "maxTokens": 8}}]), tmp_path))
    rows = read_jsonl(out / "kept.jsonl")
    sampled = [r for r in rows if not r.get("rationalized")]
    # q1: paths 0, 1 share their equations (48/2=24, 48+24=72): path 1 goes; path 2 is wrong; path 3 stays.
    assert [(r["questionId"], r["path"]) for r in sampled] == [("q1", 0), ("q1", 3), ("q2", 0)]
    assert all(r["answer"] == r["label"] for r in rows)
    step = json.loads((out / "result.json").read_text())["details"]["filters"][0]
    assert (step["wrong"], step["duplicates"], step["overCap"]) == (4, 1, 0)   # 96, 13, 7, 7
    assert step["rationalized"] == 1   # q3: no correct path; the random model is re-prompted with "10"
    assert summary["metrics"]["kept"] == len(rows) == 3 + step["rationalizedKept"]


def test_correct_filter_without_labels_fails_naming_the_file_and_setting(tiny_model_dir: Path,
                                                                         samples: dict[str, str], tmp_path: Path) -> None:
    unlabeled = write_jsonl(tmp_path / "unlabeled.jsonl", [QUESTIONS[0], {"id": "q2", "question": "What is 6 times 7?"}])
    rc, summary, stderr = run_worker(filter_task(tmp_path / "out", tiny_model_dir, {**samples, "questions": str(unlabeled)},
                                                 [{"consistency": {"minConfidence": 0.0}}, {"correct": {}}]), tmp_path)
    assert rc == 2, stderr[-3000:]
    assert summary is not None and summary["reason"] == "BadInput"
    assert 'unlabeled.jsonl:2: no "answer"; filters[1].correct' in summary["message"], summary["message"]
