"""The `sample` stage (LMSI step 1-4): N reasoning paths per question, then a majority vote.

Every question of `inputs.questions` is rendered as a few-shot chain-of-thought prompt (the
exemplars of `task.fewShot` and `task.fewShotFile`; the zero-shot "Let's think step by step."
prompt when there are none) and the engine samples `sampling.paths` completions for each, all
questions of a chunk in one batched call. The model is the base model with this round's input adapter
(`model.adapter`, the previous round's) when set: LMSI's next round samples from the model the
last one trained.

Outputs
    samples.jsonl   one row per path: id, question, path, text, answer, tokens, finish
    votes.jsonl     one row per question: id, question, distribution, unanswered, majority,
                    count, paths, confidence, entropy (see `voting`)
Metrics: questions, paths, meanConfidence, answered (share of questions with a majority),
generatedTokens, tokensPerSecond (generated tokens over the generation seconds, below).

Chunks (`chunks`: preemption costs at most one chunk, memory stays flat). The questions (of this
shard) are cut into chunks of `SAMPLE_CHUNK_QUESTIONS` (`$SELFIMPROVE_CHUNK_ROWS` overrides it);
each chunk is generated, written and committed under `chunks/<k>/` before the next starts, and a
retry of the same task reuses the committed ones. The engine is opened only when a chunk is
missing. At the end the chunks' files are streamed into samples.jsonl / votes.jsonl and the
metrics accumulated on the way, so no step holds more than one chunk's completions. A question
samples from `prompt_seed(seed, id)` wherever it sits, so the files are byte for byte an
unchunked (and unsharded) run's.

Timing across a resumed run: each chunk records the seconds of its own generate call when it is
generated. `generationSeconds` (details) and `tokensPerSecond` (metric) are summed over *all*
chunks of the output, whichever attempt generated them: the engine time the output cost, and its
throughput, as an uninterrupted run reports them (the time of a chunk lost to a preemption is
in neither: nothing of it is in the output).
`generationSecondsThisAttempt` is what this process spent; `chunks` says how many chunks there
are, how many an earlier attempt had committed, and the chunk size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from ..answers import extract_answer
from ..chunks import Chunk, Chunks, chunk_size, concat_committed
from ..data import load_examples
from ..engines.base import GenerationParams
from ..errors import BadInput
from ..prompts import STOP_SEQUENCES, answer_stop_ids, render_prompt
from ..runtime import StageContext, StageOutcome
from ..storage import StageWriter, display_name
from ..training.data import load_exemplars, resolve_format
from ..voting import vote

# A base model prompted in the plain layout goes on to invent the next exemplar, which starts
# with "Question:": the path ends there. (The evaluate stage stops at the same string.)
SAMPLES, VOTES = "samples.jsonl", "votes.jsonl"
# Questions per chunk. At GSM8K scale on one GPU (7B model, 32 paths of ~200 tokens, a few
# thousand tokens/s) that is minutes of generation: a preemption loses minutes, not hours, and a
# chunk's 8,192 sequences still fill vLLM's scheduler (256 running) for ~30 waves, so the ragged
# tail of each chunk costs a few per cent. Chunks of seconds would spend more on the tail and the
# per-chunk commit than they save.
SAMPLE_CHUNK_QUESTIONS = 256


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
    paths = spec.paths
    params = GenerationParams(n=paths, temperature=spec.temperature, top_p=spec.top_p,
                              max_tokens=spec.max_tokens, seed=seed, stop=STOP_SEQUENCES)
    chunks = Chunks(ctx, [q.id for q in questions], chunk_size(SAMPLE_CHUNK_QUESTIONS))
    total = len(questions) * paths
    answer_spec = task.prompting.answer
    opened: list[Any] = []  # [engine, served adapter, params with the tokenizer's stop ids]

    def engine_for_chunks() -> tuple[Any, str | None, GenerationParams]:
        # Opened by the first chunk that is missing: a retry that finds every chunk committed
        # only concatenates, without loading the model.
        if not opened:
            from ..engines import open_model

            engine, served = open_model(task.engine, ctx.local_dir(task.model.base), adapter,
                                        gpus=task.gpus, seed=seed, workdir=ctx.workdir)
            opened.extend([engine, served, replace(params, stop_token_ids=answer_stop_ids(task.prompting, engine.tokenizer))])
            ctx.log.info(f"sampling {paths} paths for {len(questions)} questions in {len(chunks.chunks)} "
                         f"chunk(s) ({fmt}, T={spec.temperature}, {'adapter ' + adapter if adapter else 'base model'})")
        return opened[0], opened[1], opened[2]

    def generate(chunk: Chunk, writer: StageWriter) -> dict[str, Any]:
        engine, served, chunk_params = engine_for_chunks()
        qs = chunk.rows(questions)
        prompts = [render_prompt(task.prompting, q.question, fmt, engine.tokenizer, exemplars) for q in qs]
        before = chunk.start * paths
        t0 = time.perf_counter()
        # by question id, not position: a chunk (or a shard) samples what one whole run would
        outputs = engine.generate(prompts, replace(chunk_params, seed_keys=tuple(q.id for q in qs)), adapter=served,
                                  progress=lambda done, _all: ctx.progress(before + done, total, "paths"))
        seconds = time.perf_counter() - t0
        sample_rows: list[dict[str, Any]] = []
        vote_rows: list[dict[str, Any]] = []
        for q, out in zip(qs, outputs, strict=True):
            answers = []
            for i, c in enumerate(out.completions):
                a = extract_answer(c.text, answer_spec)
                answers.append(a)
                sample_rows.append({"id": q.id, "question": q.question, "path": i, "text": c.text,
                                    "answer": a, "tokens": c.tokens, "finish": c.finish_reason})
            vote_rows.append({"id": q.id, "question": q.question, **vote(answers).wire()})
        writer.write_jsonl(SAMPLES, sample_rows)
        writer.write_jsonl(VOTES, vote_rows)
        return {"generationSeconds": seconds, "promptTokens": sum(o.prompt_tokens for o in outputs),
                "engine": engine.kind}

    ctx.progress(0, total, "paths")
    try:
        results = chunks.run(generate)
    finally:
        if opened:
            opened[0].close()
    totals = _Totals()
    chunks.concat(SAMPLES, totals.sample)
    chunks.concat(VOTES, totals.vote)
    seconds = sum(float(r.stats.get("generationSeconds", 0.0)) for r in results)
    this_attempt = sum(float(r.stats.get("generationSeconds", 0.0)) for r in results if not r.reused)
    kinds = [str(r.stats["engine"]) for r in results if "engine" in r.stats]
    return StageOutcome(
        metrics=totals.metrics(ctx, seconds),
        outputs={"samples": SAMPLES, "votes": VOTES},
        details={
            "format": fmt,
            "exemplars": len(exemplars),
            "engine": kinds[0] if kinds else task.engine.kind,
            "adapter": task.model.adapter,
            "seed": seed,
            "generationSeconds": round(seconds, 3),
            "generationSecondsThisAttempt": round(this_attempt, 3),
            "promptTokens": sum(int(r.stats.get("promptTokens", 0)) for r in results),
            "truncatedPaths": totals.truncated,
            "chunks": {"total": len(results), "reused": sum(r.reused for r in results),
                       "questionsPerChunk": chunks.chunks[0].size if chunks.chunks else None},
        },
    )


@dataclass
class _Totals:
    """The metrics of samples.jsonl / votes.jsonl, accumulated row by row as they stream by
    (summed in file order, so the floats equal a sum over the whole list)."""

    paths: int = 0
    generated: int = 0
    truncated: int = 0
    questions: int = 0
    confidence: float = 0.0
    answered: int = 0

    def sample(self, row: dict[str, Any]) -> None:
        self.paths += 1
        self.generated += int(row["tokens"])
        self.truncated += row["finish"] == "length"

    def vote(self, row: dict[str, Any]) -> None:
        self.questions += 1
        self.confidence += row["confidence"]
        self.answered += row["majority"] is not None

    def metrics(self, ctx: StageContext, seconds: float) -> dict[str, Any]:
        n = self.questions
        mean_conf = self.confidence / n if n else 0.0
        answered = self.answered / n if n else 0.0
        tps = self.generated / seconds if seconds > 0 else 0.0
        ctx.log.info(f"{self.paths} paths, {self.generated} tokens in {seconds:.1f}s ({tps:.0f} tokens/s), "
                     f"mean confidence {mean_conf:.3f}")
        return {
            "questions": n,
            "paths": self.paths,
            "meanConfidence": round(mean_conf, 6),
            "answered": round(answered, 6),
            "generatedTokens": self.generated,
            "tokensPerSecond": round(tps, 2),
        }


def merge(ctx: StageContext, shard_dirs: list[str]) -> StageOutcome:
    """The whole stage from its shards: the files concatenated in shard order (each shard
    holds a contiguous slice of the questions), streamed, the metrics accumulated on the way.
    Throughput is the shards' tokens over the slowest shard's generation time (they ran in
    parallel; each shard's time is summed over its chunks, see the module docstring)."""
    from ..runtime import shard_details

    totals = _Totals()
    concat_committed(ctx.writer, shard_dirs, SAMPLES, totals.sample)
    concat_committed(ctx.writer, shard_dirs, VOTES, totals.vote)
    parts = shard_details(ctx, shard_dirs)
    seconds = max((float(d.get("generationSeconds", 0.0)) for d in parts), default=0.0)
    first = parts[0] if parts else {}
    details = {k: first.get(k) for k in ("format", "exemplars", "engine", "adapter", "seed")}
    details.update(generationSeconds=round(seconds, 3), shards=len(shard_dirs),
                   shardGenerationSeconds=[d.get("generationSeconds") for d in parts],
                   promptTokens=sum(int(d.get("promptTokens", 0)) for d in parts),
                   truncatedPaths=totals.truncated,
                   chunks={"total": sum(int((d.get("chunks") or {}).get("total", 0)) for d in parts),
                           "reused": sum(int((d.get("chunks") or {}).get("reused", 0)) for d in parts)})
    return StageOutcome(metrics=totals.metrics(ctx, seconds),
                        outputs={"samples": SAMPLES, "votes": VOTES}, details=details)
