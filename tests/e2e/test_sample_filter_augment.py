"""The sample, filter and augment stages end to end, as Jobs run them:
`python -m selfimprove_workers TASK.json` in a subprocess, with the real exit code and the
termination log, on the tiny random Llama — once with vLLM (CPU build), once with transformers.

A random model writes gibberish, so these tests check the pipeline's mechanics (files, counts,
metrics, idempotency, errors), not the quality of what it writes; the methods' arithmetic is
tested with hand-computed numbers in test_selection.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from model_fixtures import require_vllm, run_worker, write_jsonl
from selfimprove_workers.prompts import training_row

QUESTIONS = [
    {"id": "q1", "question": "What is 2 plus 3?"},
    {"id": "q2", "question": "Tom has 4 apples and eats 1. How many are left?"},
    {"id": "q3", "question": "What is 6 times 7?"},
    {"id": "q4", "question": "A pen costs $2. How much do 5 pens cost?"},
]
VALIDATION = [
    {"question": "What is 1 plus 4?", "answer": "1 + 4 = 5.\n#### 5"},
    {"question": "What is 9 minus 3?", "answer": "9 - 3 = 6.\n#### 6"},
]
SEED = [
    {"id": "s1", "question": "Ann has 3 cats and gets 2 more. How many cats?", "answer": "3 + 2 = 5\n#### 5"},
    {"id": "s2", "question": "What is 10 divided by 2?", "answer": "10 / 2 = 5\n#### 5"},
    {"id": "s3", "question": "Bo walks 2 km a day for 4 days. How far?", "answer": "2 * 4 = 8\n#### 8"},
]
PREDICTIONS = [  # the evaluate stage's seed_predictions.jsonl shape
    {"id": "s1", "question": SEED[0]["question"], "output": "7", "prediction": "7", "gold": "5", "correct": False},
    {"id": "s2", "question": SEED[1]["question"], "output": "5", "prediction": "5", "gold": "5", "correct": True},
    {"id": "s3", "question": SEED[2]["question"], "output": "", "prediction": None, "gold": "8", "correct": False},
]
FEW_SHOT = [{"question": "What is 1 plus 1?", "rationale": "1 + 1 = 2.", "answer": "2"}]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("stage-data")
    return {
        "questions": str(write_jsonl(d / "questions.jsonl", QUESTIONS)),
        "validation": str(write_jsonl(d / "validation.jsonl", VALIDATION)),
        "seed": str(write_jsonl(d / "seed.jsonl", SEED)),
        "predictions": str(write_jsonl(d / "seed_predictions.jsonl", PREDICTIONS)),
        "existing": str(write_jsonl(d / "augmented-r1.jsonl", [
            {"id": "a1", "question": "Cy has 4 dogs and gets 3 more. How many dogs?", "answer": "4 + 3 = 7\n#### 7"}])),
    }


def task(stage: str, output: Path, base: Path, engine: str, model: dict[str, str] | None = None,
         **body: Any) -> dict[str, Any]:
    return {
        "run": {"name": "e2e"}, "round": 1, "stage": stage, "output": str(output),
        "model": {"base": str(base), **(model or {})},
        "engine": {"kind": engine, "maxLoraRank": 8},
        **body,
    }


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_ok(rc: int, summary: dict | None, stderr: str) -> dict[str, Any]:
    assert rc == 0, stderr[-4000:]
    assert summary is not None and summary["status"] == "Succeeded", summary
    return summary


def check_sample(out: Path, summary: dict[str, Any], paths: int) -> None:
    m = summary["metrics"]
    assert (m["questions"], m["paths"]) == (len(QUESTIONS), len(QUESTIONS) * paths)
    assert m["generatedTokens"] > 0 and m["tokensPerSecond"] > 0 and 0 <= m["meanConfidence"] <= 1
    samples, votes = read_jsonl(out / "samples.jsonl"), read_jsonl(out / "votes.jsonl")
    assert len(samples) == len(QUESTIONS) * paths and len(votes) == len(QUESTIONS)
    assert {tuple(sorted(r)) for r in samples} == {("answer", "finish", "id", "path", "question", "text", "tokens")}
    for v in votes:
        mine = [s for s in samples if s["id"] == v["id"]]
        assert [s["path"] for s in mine] == list(range(paths))
        answered = [s["answer"] for s in mine if s["answer"] is not None]
        assert sum(v["distribution"].values()) == len(answered) and v["paths"] == paths
        if answered:
            assert v["confidence"] == pytest.approx(v["distribution"][v["majority"]] / paths)
    assert (out / "_SUCCESS").exists() and json.loads((out / "result.json").read_text())["summary"]["metrics"] == m


def check_filter(out: Path, summary: dict[str, Any], kinds: list[str]) -> list[dict[str, Any]]:
    kept = read_jsonl(out / "kept.jsonl")
    m = summary["metrics"]
    assert m["kept"] == len(kept) and m["keptQuestions"] == len({r["questionId"] for r in kept})
    steps = json.loads((out / "result.json").read_text())["details"]["filters"]
    assert [s["kind"] for s in steps] == kinds
    assert steps[0]["in"] == m["candidates"] and steps[-1]["out"] == m["kept"]
    assert all(a["out"] == b["in"] and b["out"] <= b["in"] for a, b in zip(steps, steps[1:]))
    for row in kept:  # the train stage reads every row
        training_row(row, "kept.jsonl")
    # Examples of what each filter dropped (for `selfimprove report`): that filter's, never a kept path.
    from selfimprove_workers.stages.filter import REJECTED_EXAMPLES

    rejected = read_jsonl(out / "rejected.jsonl")
    for i, step in enumerate(steps):
        mine = [r for r in rejected if r["filterIndex"] == i]
        assert len(mine) == min(step["in"] - step["out"], REJECTED_EXAMPLES) and {r["rejectedBy"] for r in mine} <= {step["kind"]}
    assert not {r["id"] for r in rejected} & {r["id"] for r in kept}
    return steps


def check_augment(out: Path, summary: dict[str, Any], k: int) -> list[dict[str, Any]]:
    rows = read_jsonl(out / "augmented.jsonl")
    m = summary["metrics"]
    assert (m["wrong"], m["requested"], m["augmented"]) == (2, 2 * k, len(rows))
    # A random model writes no "Question: … Answer: … #### N": every reply is malformed.
    assert m["malformed"] >= 2 and m["augmented"] + m["duplicates"] <= 2 * k * 2
    assert all(r["source"] in ("s1", "s3") for r in rows)
    return rows


# --------------------------------------------------------------------------- vLLM
@pytest.mark.vllm
@pytest.mark.slow
def test_stages_end_to_end_with_vllm(tiny_model_dir: Path, tiny_adapter_dir: Path, data: dict[str, str],
                                     tmp_path: Path) -> None:
    require_vllm()
    # sample: few-shot CoT, the previous round's adapter served through LoRA
    out = tmp_path / "sample"
    sample_task = task("sample", out, tiny_model_dir, "vllm", model={"adapter": str(tiny_adapter_dir)},
                       inputs={"questions": data["questions"]}, prompting={"fewShot": FEW_SHOT},
                       sampling={"paths": 4, "temperature": 1.0, "maxTokens": 24, "seed": 3})
    summary = check_ok(*run_worker(sample_task, tmp_path))
    check_sample(out, summary, paths=4)
    details = json.loads((out / "result.json").read_text())["details"]
    assert details["format"] == "fewShotCot" and details["engine"] == "vllm"
    # A second run of the same task finds the committed output and skips (no model load).
    again = check_ok(*run_worker(sample_task, tmp_path))
    assert again["skipped"] is True and again["metrics"] == summary["metrics"]

    # filter: vLLM's prompt logprobs for IWSI's losses, the base model as judge, embeddings
    fout = tmp_path / "filter"
    kinds = ["consistency", "distributionShift", "judge", "diversity"]
    filter_task = task("filter", fout, tiny_model_dir, "vllm",
                       inputs={"samples": str(out / "samples.jsonl"), "votes": str(out / "votes.jsonl"),
                               "validation": data["validation"]},
                       filters=[{"consistency": {"minConfidence": 0.0}}, {"distributionShift": {"keep": 0.8}},
                                {"judge": {"minScore": 0.0, "maxTokens": 8}}, {"diversity": {"keep": 0.5}}])
    summary = check_ok(*run_worker(filter_task, tmp_path))
    steps = check_filter(fout, summary, kinds)
    assert steps[0]["in"] > 0 and steps[1]["validLoss"] > 0
    assert steps[2]["out"] == steps[2]["in"]  # minScore 0 keeps every rating, readable or not
    kept = read_jsonl(fout / "kept.jsonl")
    assert kept and all({"ds", "dsWeight", "loss", "judgeScore", "coresetRank"} <= r.keys() for r in kept)
    # exactly ⌊k·n⌋ (issue 13), none above IWSI's threshold (ties at it may be kept)
    assert steps[1]["out"] == math.floor(0.8 * steps[1]["in"]) and steps[1]["n"] == steps[1]["in"]
    assert all(r["ds"] <= steps[1]["threshold"] for r in kept if steps[1]["threshold"] is not None)

    # augment: the base model as teacher; its replies cannot be parsed
    aout = tmp_path / "augment"
    augment_task = task("augment", aout, tiny_model_dir, "vllm",
                        inputs={"predictions": data["predictions"], "seed": data["seed"],
                                "existing": [data["existing"]]},
                        augment={"perExample": 2, "maxTokens": 48, "retries": 1})
    summary = check_ok(*run_worker(augment_task, tmp_path))
    check_augment(aout, summary, k=2)
    assert json.loads((aout / "result.json").read_text())["details"]["teacherRequests"] == 4  # 2 + 2 retries


# --------------------------------------------------------------------------- transformers
@pytest.mark.slow
def test_stages_end_to_end_with_transformers(tiny_model_dir: Path, tiny_adapter_dir: Path,
                                             data: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "sample"
    sample_task = task("sample", out, tiny_model_dir, "transformers",
                       inputs={"questions": data["questions"]},
                       sampling={"paths": 3, "temperature": 1.0, "maxTokens": 24})
    summary = check_ok(*run_worker(sample_task, tmp_path))
    check_sample(out, summary, paths=3)
    assert json.loads((out / "result.json").read_text())["details"]["format"] == "zeroShotCot"  # no exemplars

    fout = tmp_path / "filter"
    kinds = ["entropy", "consistency", "self", "diversity"]
    filter_task = task("filter", fout, tiny_model_dir, "transformers", model={"adapter": str(tiny_adapter_dir)},
                       inputs={"samples": str(out / "samples.jsonl"), "votes": str(out / "votes.jsonl")},
                       filters=[{"entropy": {"max": 1.0}}, {"consistency": {"minConfidence": 0.0}},
                                {"self": {"keep": 0.5, "maxTokens": 6}}, {"diversity": {"keep": 0.5}}])
    summary = check_ok(*run_worker(filter_task, tmp_path))
    steps = check_filter(fout, summary, kinds)
    assert steps[2]["out"] == math.ceil(0.5 * steps[2]["in"])
    assert steps[3]["out"] == math.ceil(0.5 * steps[3]["in"])

    aout = tmp_path / "augment"
    augment_task = task("augment", aout, tiny_model_dir, "transformers",
                        inputs={"predictions": data["predictions"], "seed": data["seed"]},
                        augment={"perExample": 1, "maxTokens": 32, "retries": 0})
    summary = check_ok(*run_worker(augment_task, tmp_path))
    check_augment(aout, summary, k=1)


# --------------------------------------------------------------------------- bad input
def _bad(tmp_path: Path, name: str, lines: list[str]) -> str:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def check_bad_input(rc: int, summary: dict | None, stderr: str, where: str) -> None:
    assert rc == 2, stderr[-3000:]
    assert summary is not None and summary["status"] == "Failed" and summary["reason"] == "BadInput"
    assert where in summary["message"], summary["message"]


def test_bad_input_lines_exit_2_naming_file_and_line(tiny_model_dir: Path, data: dict[str, str],
                                                     tmp_path: Path) -> None:
    # Data is checked before any model loads: these runs never start an engine.
    questions = _bad(tmp_path, "questions.jsonl", [json.dumps(QUESTIONS[0]), '{"question": "unterminated'])
    check_bad_input(*run_worker(task("sample", tmp_path / "s", tiny_model_dir, "vllm", inputs={"questions": questions},
                                     sampling={"paths": 2, "temperature": 0.7}), tmp_path),
                    f"{questions}:2")

    votes = _bad(tmp_path, "votes.jsonl", [json.dumps({"id": "q1", "majority": "5", "confidence": 1.0, "entropy": 0.0})])
    samples = _bad(tmp_path, "samples.jsonl", [
        json.dumps({"id": "q1", "question": "q?", "path": 0, "text": "5", "answer": "5"}),
        json.dumps({"id": "q9", "question": "q?", "path": 0, "text": "5", "answer": "5"}),
    ])
    check_bad_input(*run_worker(task("filter", tmp_path / "f", tiny_model_dir, "vllm",
                                     inputs={"samples": samples, "votes": votes},
                                     filters=[{"consistency": {}}]), tmp_path),
                    f"{samples}:2: id 'q9' has no row in the votes file")

    predictions = _bad(tmp_path, "predictions.jsonl", [json.dumps(PREDICTIONS[0]),
                                                       json.dumps({**PREDICTIONS[1], "correct": "yes"})])
    check_bad_input(*run_worker(task("augment", tmp_path / "a", tiny_model_dir, "vllm",
                                     inputs={"predictions": predictions}, augment={}), tmp_path),
                    f'{predictions}:2: "correct" must be true or false')

    few_shot = _bad(tmp_path, "fewshot.jsonl", [json.dumps(FEW_SHOT[0]), json.dumps({"question": "no answer"})])
    check_bad_input(*run_worker(task("sample", tmp_path / "s2", tiny_model_dir, "vllm",
                                     inputs={"questions": data["questions"]}, prompting={"fewShotFile": few_shot},
                                     sampling={"paths": 2, "temperature": 0.7}), tmp_path),
                    f"{few_shot}:2")
    # The distribution-shift filter without its labeled set names the missing input.
    good = _bad(tmp_path, "good-samples.jsonl", [json.dumps({"id": "q1", "question": "q?", "path": 0, "text": "5",
                                                             "answer": "5"})])
    check_bad_input(*run_worker(task("filter", tmp_path / "f2", tiny_model_dir, "vllm",
                                     inputs={"samples": good, "votes": votes},
                                     filters=[{"distributionShift": {}}]), tmp_path),
                    "inputs.validation")
