"""The `sample` stage (LMSI step 1-4): N reasoning paths per question, then a majority vote.

Every question of `inputs.questions` is rendered as a few-shot chain-of-thought prompt (the
exemplars of `task.fewShot` and `task.fewShotFile`; the zero-shot "Let's think step by step."
prompt when there are none) and the engine samples `sampling.paths` completions for each, all
questions in one batched call. The model is the base model with this round's input adapter
(`model.adapter`, the previous round's) when set: LMSI's next round samples from the model the
last one trained.

Outputs
    samples.jsonl   one row per path: id, question, path, text, answer, tokens, finish
    votes.jsonl     one row per question: id, question, distribution, unanswered, majority,
                    count, paths, confidence, entropy (see `voting`)
Metrics: questions, paths, meanConfidence, answered (share of questions with a majority),
generatedTokens, tokensPerSecond (generated tokens over the generate call's wall time).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from ..answers import extract_answer
from ..data import load_examples
from ..engines.base import GenerationParams
from ..errors import BadInput
from ..prompts import STOP_SEQUENCES, answer_stop_ids, render_prompt
from ..runtime import StageContext, StageOutcome
from ..storage import display_name
from ..training.data import load_exemplars, resolve_format
from ..voting import vote

# A base model prompted in the plain layout goes on to invent the next exemplar, which starts
# with "Question:": the path ends there. (The evaluate stage stops at the same string.)
SAMPLES, VOTES = "samples.jsonl", "votes.jsonl"


def run(ctx: StageContext) -> StageOutcome:
    task = ctx.task
    spec = task.sampling
    assert spec is not None and task.inputs.questions  # the contract checks both
    if spec.paths is None or spec.temperature is None:
        missing = "sampling.paths" if spec.paths is None else "sampling.temperature"
        raise BadInput(f"{missing}: is required (a strategy preset fills it in a run)")

    # Everything a user can get wrong is read and checked before the model loads.
    uri = task.inputs.questions
    questions = load_examples(ctx.storage_for(uri), uri)
    if not questions:
        raise BadInput(f"inputs.questions: {display_name(uri)} holds no questions")
    questions = ctx.shard_rows(questions)
    exemplars = load_exemplars(ctx.storage_for, task.prompting)
    fmt = resolve_format("fewShotCot", bool(exemplars))
    adapter = str(ctx.local_dir(task.model.adapter)) if task.model.adapter else None
    seed = spec.seed + task.round
    params = GenerationParams(n=spec.paths, temperature=spec.temperature, top_p=spec.top_p,
                              max_tokens=spec.max_tokens, seed=seed, stop=STOP_SEQUENCES,
                              # by question id, not position: a shard samples what one run would
                              seed_keys=tuple(q.id for q in questions))

    from ..engines import open_model

    engine, served_adapter = open_model(task.engine, ctx.local_dir(task.model.base), adapter,
                                        gpus=task.gpus, seed=seed, workdir=ctx.workdir)
    try:
        prompts = [render_prompt(task.prompting, q.question, fmt, engine.tokenizer, exemplars) for q in questions]
        params = replace(params, stop_token_ids=answer_stop_ids(task.prompting, engine.tokenizer))
        total = len(prompts) * spec.paths
        ctx.log.info(f"sampling {spec.paths} paths for {len(prompts)} questions ({fmt}, "
                     f"T={spec.temperature}, {'adapter ' + adapter if adapter else 'base model'})")
        ctx.progress(0, total, "paths")
        t0 = time.perf_counter()
        outputs = engine.generate(prompts, params, adapter=served_adapter,
                                  progress=lambda done, all_: ctx.progress(done, all_, "paths"))
        seconds = time.perf_counter() - t0
        engine_kind = engine.kind
    finally:
        engine.close()

    answer_spec = task.prompting.answer
    sample_rows: list[dict[str, Any]] = []
    vote_rows: list[dict[str, Any]] = []
    for q, out in zip(questions, outputs, strict=True):
        answers = []
        for i, c in enumerate(out.completions):
            a = extract_answer(c.text, answer_spec)
            answers.append(a)
            sample_rows.append({"id": q.id, "question": q.question, "path": i, "text": c.text,
                                "answer": a, "tokens": c.tokens, "finish": c.finish_reason})
        vote_rows.append({"id": q.id, "question": q.question, **vote(answers).wire()})
    ctx.writer.write_jsonl(SAMPLES, sample_rows)
    ctx.writer.write_jsonl(VOTES, vote_rows)
    return StageOutcome(
        metrics=_metrics(ctx, sample_rows, vote_rows, seconds),
        outputs={"samples": SAMPLES, "votes": VOTES},
        details={
            "format": fmt,
            "exemplars": len(exemplars),
            "engine": engine_kind,
            "adapter": task.model.adapter,
            "seed": seed,
            "generationSeconds": round(seconds, 3),
            "promptTokens": sum(o.prompt_tokens for o in outputs),
            "truncatedPaths": sum(r["finish"] == "length" for r in sample_rows),
        },
    )


def _metrics(ctx: StageContext, sample_rows: list[dict[str, Any]], vote_rows: list[dict[str, Any]],
             seconds: float) -> dict[str, Any]:
    generated = sum(r["tokens"] for r in sample_rows)
    mean_conf = sum(v["confidence"] for v in vote_rows) / len(vote_rows) if vote_rows else 0.0
    answered = sum(v["majority"] is not None for v in vote_rows) / len(vote_rows) if vote_rows else 0.0
    tps = generated / seconds if seconds > 0 else 0.0
    ctx.log.info(f"{len(sample_rows)} paths, {generated} tokens in {seconds:.1f}s ({tps:.0f} tokens/s), "
                 f"mean confidence {mean_conf:.3f}")
    return {
        "questions": len(vote_rows),
        "paths": len(sample_rows),
        "meanConfidence": round(mean_conf, 6),
        "answered": round(answered, 6),
        "generatedTokens": generated,
        "tokensPerSecond": round(tps, 2),
    }


def merge(ctx: StageContext, shard_dirs: list[str]) -> StageOutcome:
    """The whole stage from its shards: the files concatenated in shard order (each shard
    holds a contiguous slice of the questions), the metrics recomputed from them. Throughput
    is the shards' tokens over the slowest shard's generation time (they ran in parallel)."""
    from ..runtime import concat_outputs, shard_details

    sample_rows = concat_outputs(ctx, shard_dirs, SAMPLES)
    vote_rows = concat_outputs(ctx, shard_dirs, VOTES)
    parts = shard_details(ctx, shard_dirs)
    seconds = max((float(d.get("generationSeconds", 0.0)) for d in parts), default=0.0)
    first = parts[0] if parts else {}
    details = {k: first.get(k) for k in ("format", "exemplars", "engine", "adapter", "seed")}
    details.update(generationSeconds=round(seconds, 3), shards=len(shard_dirs),
                   shardGenerationSeconds=[d.get("generationSeconds") for d in parts],
                   promptTokens=sum(int(d.get("promptTokens", 0)) for d in parts),
                   truncatedPaths=sum(r["finish"] == "length" for r in sample_rows))
    return StageOutcome(metrics=_metrics(ctx, sample_rows, vote_rows, seconds),
                        outputs={"samples": SAMPLES, "votes": VOTES}, details=details)
