"""The `evaluate` stage: scoring against hand-labeled outputs (a stub engine), prompt format and
decoding settings, bad data, and real end-to-end runs on the tiny model (round 0: the base
model; later rounds: base + adapter)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pytest
from selfimprove_workers.contract import StageTask
from selfimprove_workers.engines.base import Completion, GenerationOutput, GenerationParams
from selfimprove_workers.runtime import EXIT_BAD_INPUT, main, run_task
from selfimprove_workers.stages.evaluate import evaluate
from train_fixtures import require_vllm, run_worker, write_jsonl

EVAL_ROWS = [
    {"id": "thousand", "question": "How many grams in a kilogram?", "answer": "A kilogram is 1000 grams.\n#### 1,000"},
    {"id": "wrong", "question": "What is 2 plus 3?", "answer": "#### 5"},
    {"id": "silent", "question": "What is 3 plus 4?", "answer": "7"},
    {"id": "decimal", "question": "What is 6 times 2?", "answer": 12},
    {"id": "runs-on", "question": "What is 1 minus 4?", "answer": "1 - 4 = -3\n#### -3"},
    {"id": "beyond-limit", "question": "Never asked?", "answer": "#### 0"},
]
# What the model "said" for each question, and whether that is right (hand-labeled).
OUTPUTS = {
    "How many grams in a kilogram?": ("1 kg = 1000 g.\nThe answer is 1000.", "1000", True),
    "What is 2 plus 3?": ("2 + 3 = 6.\nThe answer is 6.", "6", False),
    "What is 3 plus 4?": ("I am not sure.", None, False),
    "What is 6 times 2?": ("6 * 2 = 12.\n#### 12.00", "12", True),
    "What is 1 minus 4?": ("The answer is -3.\n\nSomething else: the answer is 9.", "-3", True),
    "What is 10 plus 1?": ("The answer is 11.", "11", True),
    "What is 9 minus 9?": ("The answer is 1.", "1", False),
}
SEED_ROWS = [{"question": "What is 10 plus 1?", "answer": "#### 11"},
             {"question": "What is 9 minus 9?", "answer": "#### 0"}]


class StubEngine:
    """The `Engine` protocol with hand-written outputs, recording every call."""

    kind = "stub"
    tokenizer = None
    max_model_len = 4096

    def __init__(self, outputs: dict[str, str]):
        self.outputs = outputs
        self.calls: list[tuple[list[str], GenerationParams, str | None]] = []

    def generate(self, prompts: Sequence[str], params: GenerationParams, adapter: str | None = None,
                 progress=None) -> list[GenerationOutput]:
        self.calls.append((list(prompts), params, adapter))
        questions = [re.findall(r"Question: (.*)\nAnswer:", p)[-1] for p in prompts]
        return [GenerationOutput(prompt=p, completions=[Completion(self.outputs[q], tokens=len(self.outputs[q]))])
                for p, q in zip(prompts, questions)]

    def completion_losses(self, prompts, completions, *, add_eos=False):  # pragma: no cover
        raise AssertionError("evaluate never scores completions")

    def embed(self, texts):  # pragma: no cover
        raise AssertionError("evaluate never embeds")

    def close(self) -> None:
        pass


def eval_task(tmp: Path, *, model: str = "/models/base", adapter: str | None = None, seed: bool = True,
              limit: int | None = 5, round_: int = 1, task: dict | None = None, engine: dict | None = None,
              max_tokens: int = 64, evaluation_rows: list[dict] = EVAL_ROWS) -> StageTask:
    inputs = {"evaluation": str(write_jsonl(tmp / "test.jsonl", evaluation_rows))}
    if seed:
        inputs["seed"] = str(write_jsonl(tmp / "seed.jsonl", SEED_ROWS))
    return StageTask.model_validate({
        "run": {"name": "t"}, "round": round_, "stage": "evaluate", "output": str(tmp / "evaluate"),
        "model": {"base": model, **({"adapter": adapter} if adapter else {})},
        "inputs": inputs, "prompting": task or {}, "engine": engine or {},
        "evaluation": {"maxTokens": max_tokens, **({"limit": limit} if limit else {})},
    })


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- scoring
def test_accuracy_against_hand_labeled_outputs(tmp_path):
    engine = StubEngine({q: out for q, (out, _, _) in OUTPUTS.items()})
    task = eval_task(tmp_path, adapter="/runs/round-001/train/adapter/")
    result = run_task(task, stage_fn=partial(evaluate, engine=engine))

    assert result.metrics | {"seconds": 0} == {
        "accuracy": 0.6, "correct": 3, "total": 5,               # `limit: 5` leaves the sixth out
        "seedAccuracy": 0.5, "seedCorrect": 1, "seedTotal": 2, "seconds": 0,
    }
    out = tmp_path / "evaluate"
    assert result.outputs == {"predictions": f"{out}/predictions.jsonl",
                              "seedPredictions": f"{out}/seed_predictions.jsonl"}
    rows = read_jsonl(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == ["thousand", "wrong", "silent", "decimal", "runs-on"]
    for row, src in zip(rows, EVAL_ROWS):
        output, prediction, correct = OUTPUTS[src["question"]]
        assert row == {"id": src["id"], "question": src["question"], "output": output,
                       "prediction": prediction, "gold": row["gold"], "correct": correct}
    assert [r["gold"] for r in rows] == ["1000", "5", "7", "12", "-3"]  # normalized gold answers
    seed_rows = read_jsonl(out / "seed_predictions.jsonl")
    assert [(r["gold"], r["prediction"], r["correct"]) for r in seed_rows] == [("11", "11", True), ("0", "1", False)]
    assert seed_rows[0]["id"].startswith("q-")  # ids derived from the question when absent
    assert (out / "_SUCCESS").exists()

    # One greedy, batched call for both sets, with the round's adapter.
    [(prompts, params, adapter)] = engine.calls
    assert len(prompts) == 7 and adapter == "/runs/round-001/train/adapter"
    assert (params.n, params.temperature, params.max_tokens) == (1, 0.0, 64)
    assert "\nQuestion:" in params.stop
    # fewShotCot without exemplars is evaluated zero-shot with the CoT trigger.
    assert prompts[0] == "Question: How many grams in a kilogram?\nAnswer: Let's think step by step."
    details = json.loads((out / "result.json").read_text())["details"]
    assert details["format"] == "zeroShotCot" and details["unanswered"] == 1


def test_the_validation_split_is_scored_apart_in_the_same_call(tmp_path):
    """`inputs.validation` (data.validation): scored on its own, the split the planner selects on."""
    engine = StubEngine({q: out for q, (out, _, _) in OUTPUTS.items()})
    task = eval_task(tmp_path, seed=True, limit=None, evaluation_rows=EVAL_ROWS[:2])
    validation = write_jsonl(tmp_path / "validation.jsonl", [
        {"id": "v1", "question": "What is 6 times 2?", "answer": "#### 12"},
        {"id": "v2", "question": "What is 9 minus 9?", "answer": "#### 0"},
        {"id": "v3", "question": "What is 1 minus 4?", "answer": "#### -3"}])
    task = task.model_copy(update={"inputs": task.inputs.model_copy(update={"validation": str(validation)})})
    result = run_task(task, stage_fn=partial(evaluate, engine=engine))
    m = result.metrics
    assert (m["accuracy"], m["seedAccuracy"]) == (0.5, 0.5)               # unchanged by the validation split
    assert (m["validationAccuracy"], m["validationCorrect"], m["validationTotal"]) == (0.666667, 2, 3)
    rows = read_jsonl(tmp_path / "evaluate" / "validation_predictions.jsonl")
    assert [(r["id"], r["correct"]) for r in rows] == [("v1", True), ("v2", False), ("v3", True)]
    assert result.outputs["validationPredictions"].endswith("validation_predictions.jsonl")
    [(prompts, _, _)] = engine.calls
    assert len(prompts) == 2 + 2 + 3


def test_round_0_evaluates_the_base_model_with_few_shot_exemplars(tmp_path):
    engine = StubEngine({q: out for q, (out, _, _) in OUTPUTS.items()})
    shots = [{"question": "What is 1 plus 1?", "rationale": "1 + 1 = 2.", "answer": "2"}]
    task = eval_task(tmp_path, seed=False, limit=None, round_=0, task={"fewShot": shots},
                     evaluation_rows=EVAL_ROWS[:5])
    result = run_task(task, stage_fn=partial(evaluate, engine=engine))
    assert (result.metrics["accuracy"], result.metrics["total"]) == (0.6, 5)
    assert "seedAccuracy" not in result.metrics and set(result.outputs) == {"predictions"}
    [(prompts, _, adapter)] = engine.calls
    assert adapter is None
    assert prompts[0] == ("Question: What is 1 plus 1?\nAnswer: 1 + 1 = 2.\nThe answer is 2.\n\n"
                          "Question: How many grams in a kilogram?\nAnswer:")


# --------------------------------------------------------------------------- bad data
@pytest.mark.parametrize("bad_line, message", [
    ({"question": "What is 5 plus 5?"}, 'missing "answer"'),
    ({"question": "What is 5 plus 5?", "answer": "#### ten"}, "not a valid number answer"),
])
def test_a_bad_evaluation_line_fails_with_exit_2_naming_file_and_line(tmp_path, monkeypatch, bad_line, message):
    rows = [EVAL_ROWS[0], EVAL_ROWS[1], bad_line]
    task = eval_task(tmp_path, seed=False, limit=None, evaluation_rows=rows)
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(task.wire()))
    term = tmp_path / "termination.log"
    monkeypatch.setenv("TERMINATION_LOG", str(term))
    assert main([str(task_file)]) == EXIT_BAD_INPUT
    summary = json.loads(term.read_text())
    assert summary["reason"] == "BadInput"
    assert f"{tmp_path / 'test.jsonl'}:3" in summary["message"] and message in summary["message"]


# --------------------------------------------------------------------------- end to end
def _check_consistent(out: Path, summary: dict, total: int) -> None:
    from selfimprove_workers.answers import answers_equal, extract_answer
    from selfimprove_workers.spec import AnswerSpec

    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == total == summary["metrics"]["total"]
    for r in rows:
        assert r["prediction"] == extract_answer(r["output"], AnswerSpec())
        assert r["correct"] == (r["prediction"] is not None and answers_equal(r["prediction"], r["gold"]))
    correct = sum(r["correct"] for r in rows)
    assert summary["metrics"]["correct"] == correct
    assert summary["metrics"]["accuracy"] == pytest.approx(correct / total)


def test_end_to_end_round_0_with_the_transformers_engine(tiny_model_dir, tmp_path):
    """The real stage on the tiny model, no adapter (round 0), engine `transformers`."""
    task = eval_task(tmp_path, model=str(tiny_model_dir), seed=False, limit=4, round_=0,
                     engine={"kind": "transformers"}, max_tokens=12)
    result = run_task(task)
    _check_consistent(tmp_path / "evaluate", {"metrics": result.metrics}, 4)
    rows = read_jsonl(tmp_path / "evaluate" / "predictions.jsonl")
    assert all(isinstance(r["output"], str) for r in rows)


@pytest.mark.slow
@pytest.mark.vllm
def test_end_to_end_with_an_adapter_and_a_seed_set_on_vllm(tiny_model_dir, tiny_adapter_dir, tmp_path):
    """As a Job runs it (`python -m selfimprove_workers`), vLLM serving base + adapter."""
    require_vllm()
    task = eval_task(tmp_path, model=str(tiny_model_dir), adapter=str(tiny_adapter_dir), limit=None,
                     max_tokens=12, evaluation_rows=EVAL_ROWS)
    rc, summary, err = run_worker(task.wire(), tmp_path)
    assert rc == 0, err[-3000:]
    assert summary["status"] == "Succeeded" and summary["metrics"]["seedTotal"] == 2
    _check_consistent(tmp_path / "evaluate", summary, len(EVAL_ROWS))
    assert len(read_jsonl(tmp_path / "evaluate" / "seed_predictions.jsonl")) == 2


def test_accuracy_per_round_is_one_tensorboard_curve_of_the_run(tmp_path):
    """Each round's evaluate writes its accuracy to the run's tensorboard/evaluate/ (step = round;
    a retried round replaces its file): TensorBoard's own reader sees one curve across rounds."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    engine = StubEngine({q: out for q, (out, _, _) in OUTPUTS.items()})
    run = tmp_path / "runs" / "local" / "t"
    for round_ in (0, 1, 1, 2):  # round 1 twice: a retry
        task = eval_task(tmp_path, round_=round_).model_copy(update={"output": str(run / f"round-{round_:03d}" / "evaluate")})
        assert run_task(task, stage_fn=partial(evaluate, engine=engine)).status == "Succeeded"
    folder = run / "tensorboard" / "evaluate"
    assert sorted(p.name for p in folder.iterdir()) == [f"events.out.tfevents.round-{r:03d}.evaluate" for r in (0, 1, 2)]
    acc = EventAccumulator(str(folder))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/accuracy")] == [(r, pytest.approx(0.6)) for r in (0, 1, 2)]
    assert [e.step for e in acc.Scalars("eval/seed_accuracy")] == [0, 1, 2]


def test_tensorboard_reads_the_accuracy_curve_straight_from_s3(tmp_path, s3_server, s3_bucket):
    """`tensorboard --logdir s3://…/runs/<run>/` for a cluster run: TensorBoard's own reader (its
    boto3 file system; S3_ENDPOINT for MinIO-like endpoints) finds what the stages wrote."""
    import os
    import subprocess
    import sys

    from selfimprove_workers.contract import StorageRef

    engine = StubEngine({q: out for q, (out, _, _) in OUTPUTS.items()})
    run = f"{s3_bucket}/runs/default/t-0123abcd"
    for round_ in (0, 1):
        task = eval_task(tmp_path, round_=round_).model_copy(update={
            "output": f"{run}/round-{round_:03d}/evaluate/", "storage": StorageRef(endpoint=s3_server.endpoint)})
        assert run_task(task, stage_fn=partial(evaluate, engine=engine)).status == "Succeeded"
    # In a fresh process, as `tensorboard` runs: its S3 file system reads S3_ENDPOINT when imported.
    reader = (
        "import json, sys\n"
        "from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n"
        "acc = EventAccumulator(sys.argv[1]); acc.Reload()\n"
        "print(json.dumps([[e.step, e.value] for e in acc.Scalars('eval/accuracy')]))\n"
    )
    env = {**os.environ, **s3_server.env, "S3_ENDPOINT": s3_server.endpoint}
    env.pop("AWS_ENDPOINT_URL_S3")  # S3_ENDPOINT alone, as a TensorBoard user would set it
    done = subprocess.run([sys.executable, "-c", reader, f"{run}/tensorboard/evaluate"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(step, round(value, 6)) for step, value in json.loads(done.stdout)] == [(0, 0.6), (1, 0.6)]
