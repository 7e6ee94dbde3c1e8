"""The `evaluate` stage: greedy accuracy of the base model, or base + this round's adapter.

Every example of `inputs.evaluation` (the first `evaluation.limit`) and, for LLM2LLM, every
example of the seed set `inputs.seed` is rendered in `evaluation.format` (a few-shot format
without exemplars becomes its zero-shot variant) and decoded greedily by one engine in one
batched call. The answer is extracted from each output with the task's answer rule and compared
with the gold final answer, normalized by the same rule.

With `inputs.validation` (the run's `data.validation`), its examples (the first
`evaluation.limit`) are answered in the same call and scored apart (`validationAccuracy`): the
planner picks the best round and stops early on that split, never on the reported test set.

Round 0 runs it with `model.adapter` unset: the base model's accuracy, the point every later
round is compared with.

Outputs: `predictions.jsonl` (and `seed_predictions.jsonl`), one row per example:
`{"id", "question", "output", "prediction", "gold", "correct"}` — the augment stage reads the
seed predictions to find the examples the student got wrong. The accuracy also goes to the run's
`tensorboard/evaluate/` as a TensorBoard event (step = round; `training/events.py`). Summary metrics: accuracy, correct,
total (and seedAccuracy, seedCorrect, seedTotal; validationAccuracy, validationCorrect,
validationTotal with `validation_predictions.jsonl`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..answers import answers_equal, extract_answer
from ..contract import OutputName
from ..data import Example, load_examples, parse_example
from ..engines.base import Engine, GenerationOutput, GenerationParams
from ..errors import BadInput, DataError
from ..prompts import STOP_SEQUENCES, answer_stop_ids, render_prompt
from ..runtime import StageContext, StageOutcome
from ..spec import AnswerSpec
from ..storage import display_name, read_jsonl
from ..training.data import load_exemplars, resolve_format

PREDICTIONS, SEED_PREDICTIONS = OutputName.PREDICTIONS, OutputName.SEED_PREDICTIONS
VALIDATION_PREDICTIONS = OutputName.VALIDATION_PREDICTIONS


def run(ctx: StageContext) -> StageOutcome:
    return evaluate(ctx)


def evaluate(ctx: StageContext, engine: Engine | None = None) -> StageOutcome:
    """The stage; `engine` replaces the one built from the task (tests pass a stub)."""
    task = ctx.task
    spec = task.evaluation
    assert spec is not None and task.inputs.evaluation
    answer = task.prompting.answer

    eval_uri = task.inputs.evaluation
    # A shard scores its contiguous slice of each set; the merge concatenates them in order.
    eval_set = ctx.shard_rows(_labeled(ctx, eval_uri, spec.limit, "inputs.evaluation"))
    eval_gold = gold_answers(ctx, eval_uri, eval_set, answer)
    seed_uri = task.inputs.seed
    seed_set = ctx.shard_rows(_labeled(ctx, seed_uri, None, "inputs.seed")) if seed_uri else []
    seed_gold = gold_answers(ctx, seed_uri, seed_set, answer) if seed_uri else []
    val_uri = task.inputs.validation
    val_set = ctx.shard_rows(_labeled(ctx, val_uri, spec.limit, "inputs.validation")) if val_uri else []
    val_gold = gold_answers(ctx, val_uri, val_set, answer) if val_uri else []

    exemplars = load_exemplars(ctx.storage_for, task.prompting)
    fmt = resolve_format(spec.format, bool(exemplars))
    if fmt != spec.format:
        ctx.log.info(f"no few-shot exemplars: evaluating in {fmt} instead of {spec.format}")

    adapter = str(ctx.local_dir(task.model.adapter)) if task.model.adapter else None
    own = engine is None
    served_adapter = adapter
    if engine is None:
        from ..engines import open_model

        engine, served_adapter = open_model(task.engine, ctx.local_dir(task.model.base), adapter,
                                            gpus=task.gpus, seed=0, workdir=ctx.workdir)
    try:
        questions = [ex.question for ex in (*eval_set, *seed_set, *val_set)]
        prompts = [render_prompt(task.prompting, q, fmt, engine.tokenizer, exemplars) for q in questions]
        params = GenerationParams(n=1, temperature=0.0, max_tokens=spec.max_tokens, stop=STOP_SEQUENCES,
                                  stop_token_ids=answer_stop_ids(task.prompting, engine.tokenizer))
        ctx.log.info(f"generating {len(prompts)} greedy answers ({fmt}, "
                     f"{'adapter ' + adapter if adapter else 'base model'})")
        t0 = time.perf_counter()
        outputs = engine.generate(prompts, params, adapter=served_adapter,
                                  progress=lambda done, total: ctx.progress(done, total, "answers"))
        seconds = time.perf_counter() - t0
    finally:
        if own:
            engine.close()
    if len(outputs) != len(prompts):
        raise RuntimeError(f"engine returned {len(outputs)} outputs for {len(prompts)} prompts")

    rows, _ = score(eval_set, eval_gold, outputs[: len(eval_set)], answer)
    ctx.writer.write_jsonl(PREDICTIONS, rows)
    seed_rows = val_rows = None
    if seed_uri:
        seed_rows, _ = score(seed_set, seed_gold, outputs[len(eval_set): len(eval_set) + len(seed_set)], answer)
        ctx.writer.write_jsonl(SEED_PREDICTIONS, seed_rows)
    if val_uri:
        val_rows, _ = score(val_set, val_gold, outputs[len(eval_set) + len(seed_set):], answer)
        ctx.writer.write_jsonl(VALIDATION_PREDICTIONS, val_rows)
    metrics, outs = _metrics(ctx, rows, seed_rows, val_rows)
    generated = sum(c.tokens for o in outputs for c in o.completions)
    unanswered = sum(r["prediction"] is None for r in rows)
    details = {
        "format": fmt,
        "adapter": task.model.adapter,
        "engine": getattr(engine, "kind", None),
        "unanswered": unanswered,
        "generatedTokens": generated,
        "generationSeconds": round(seconds, 3),
        "outputTokensPerSecond": round(generated / seconds, 2) if seconds > 0 else None,
    }
    if ctx.shard is None:  # a shard's accuracy is not the round's: the merge writes the event
        _eval_events(ctx, metrics)
    return StageOutcome(metrics=metrics, outputs=outs, details=details)


def _metrics(ctx: StageContext, rows: list[dict[str, Any]], seed_rows: list[dict[str, Any]] | None,
             val_rows: list[dict[str, Any]] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Accuracies from the prediction rows (an empty shard slice scores 0 of 0)."""
    def acc(rs: list[dict[str, Any]]) -> tuple[float, int]:
        correct = sum(bool(r["correct"]) for r in rs)
        return (round(correct / len(rs), 6) if rs else 0.0), correct

    a, correct = acc(rows)
    metrics: dict[str, Any] = {"accuracy": a, "correct": correct, "total": len(rows)}
    outs = {"predictions": PREDICTIONS}
    if seed_rows is not None:
        sa, sc = acc(seed_rows)
        metrics.update(seedAccuracy=sa, seedCorrect=sc, seedTotal=len(seed_rows))
        outs["seedPredictions"] = SEED_PREDICTIONS
    if val_rows is not None:
        va, vc = acc(val_rows)
        metrics.update(validationAccuracy=va, validationCorrect=vc, validationTotal=len(val_rows))
        outs["validationPredictions"] = VALIDATION_PREDICTIONS
    unanswered = sum(r["prediction"] is None for r in rows)
    ctx.log.info(f"accuracy {a:.4f} ({correct}/{len(rows)}, {unanswered} without an answer)")
    return metrics, outs


def merge(ctx: StageContext, shard_dirs: list[str]) -> StageOutcome:
    """The round's evaluation from its shards: predictions concatenated in shard order, the
    accuracies recomputed from them, the TensorBoard event written once."""
    from ..runtime import concat_outputs, shard_details

    task = ctx.task
    rows = concat_outputs(ctx, shard_dirs, PREDICTIONS)
    seed_rows = concat_outputs(ctx, shard_dirs, SEED_PREDICTIONS) if task.inputs.seed else None
    val_rows = concat_outputs(ctx, shard_dirs, VALIDATION_PREDICTIONS) if task.inputs.validation else None
    metrics, outs = _metrics(ctx, rows, seed_rows, val_rows)
    parts = shard_details(ctx, shard_dirs)
    seconds = max((float(d.get("generationSeconds", 0.0)) for d in parts), default=0.0)
    generated = sum(int(d.get("generatedTokens", 0)) for d in parts)
    first = parts[0] if parts else {}
    details = {"format": first.get("format"), "adapter": task.model.adapter, "engine": first.get("engine"),
               "unanswered": sum(r["prediction"] is None for r in rows), "generatedTokens": generated,
               "generationSeconds": round(seconds, 3), "shards": len(shard_dirs),
               "outputTokensPerSecond": round(generated / seconds, 2) if seconds > 0 else None}
    _eval_events(ctx, metrics)
    return StageOutcome(metrics=metrics, outputs=outs, details=details)


def _eval_events(ctx: StageContext, metrics: dict[str, Any]) -> None:
    """This round's accuracy as a TensorBoard event file in the run's `tensorboard/evaluate/`
    (`training/events.py`): one curve across rounds under `tensorboard --logdir <run>`."""
    from ..training import events

    run = events.run_prefix_of(ctx.task.output, ctx.task.round)
    if run is None:
        ctx.log.info(f"{ctx.task.output} is not a round's prefix: no TensorBoard event file")
        return
    local = events.write_eval_events(ctx.workdir, ctx.task.round, metrics)
    ctx.storage.upload_file(local, f"{run.rstrip('/')}/{events.EVAL_DIR}/{events.eval_event_name(ctx.task.round)}")


def _labeled(ctx: StageContext, uri: str, limit: int | None, field: str) -> list[Example]:
    examples = load_examples(ctx.storage_for(uri), uri, require_answer=True, limit=limit)
    if not examples:
        raise BadInput(f"{field}: {display_name(uri)} holds no examples")
    return examples


def gold_answers(ctx: StageContext, uri: str, examples: Sequence[Example], spec: AnswerSpec) -> list[str]:
    """Gold final answers normalized by the answer rule, so that `1,000`, `1000.0` and the
    model's `1000` compare the way the extractor makes them. A gold answer the rule cannot read
    is a data error (it could never be matched), except for `regex` rules, which describe model
    output and need not match a bare label: there the label is used as written."""
    golds: list[str] = []
    for ex in examples:
        assert ex.final is not None  # require_answer
        gold = extract_answer(ex.final, spec)
        if gold is None:
            if spec.type != "regex":
                raise DataError(f"{_where(ctx, uri, ex.id)}: answer {ex.final!r} is not a valid {spec.type} answer")
            gold = ex.final.strip()
        golds.append(gold)
    return golds


def _where(ctx: StageContext, uri: str, example_id: str) -> str:
    """`file:line` of an example (looked up again only when reporting an error)."""
    shown = display_name(uri)
    for lineno, obj in read_jsonl(ctx.storage_for(uri), uri):
        if parse_example(obj, f"{shown}:{lineno}").id == example_id:
            return f"{shown}:{lineno}"
    return f"{shown}: example {example_id!r}"


def score(
    examples: Sequence[Example], golds: Sequence[str], outputs: Sequence[GenerationOutput], spec: AnswerSpec
) -> tuple[list[dict[str, Any]], int]:
    """Prediction rows and the number correct. An output without an extractable answer is
    wrong (prediction null)."""
    rows: list[dict[str, Any]] = []
    correct = 0
    for ex, gold, out in zip(examples, golds, outputs, strict=True):
        text = out.completions[0].text if out.completions else ""
        prediction = extract_answer(text, spec)
        ok = prediction is not None and answers_equal(prediction, gold)
        correct += ok
        rows.append({"id": ex.id, "question": ex.question, "output": text, "prediction": prediction,
                     "gold": gold, "correct": ok})
    return rows, correct
