"""The `filter` stage: select training data from the sampled paths.

The candidates are the paths of `samples.jsonl`, each joined with its question's vote from
`votes.jsonl`; a question none of whose paths gave an answer has no label to train on and is
left out. The filters of `task.filters` then run in the order given, each on what the previous
one kept:

    consistency        LMSI: questions with confidence ≥ minConfidence; every path agreeing with
                       the majority.
    entropy            MoT / IWSI's baseline: questions with normalized answer entropy ≤ max; the
                       paths agreeing with the majority (as the IWSI code does).
    distributionShift  IWSI: the DS weight of each candidate from SFT losses under the base model
                       (see `selection`); keeps the ⌊k·n⌋ smallest DS, ties broken
                       deterministically; reports how many weights sit at the clip bounds.
    judge              AlpaGasus: an LLM judge rates each (question, reasoning) 0-5; keeps
                       ≥ minScore. A reply without a readable score rates 0 and is counted.
                       A served judge (model.judgeEndpoint, else a served teacher) gets the
                       same messages over HTTP; its tokens and retries become metrics.
    self               IWSI's self filter: the sampling model rates its own reasoning 0-10;
                       keeps the top fraction.
    diversity          LTD: k-center greedy over embeddings of question + reasoning; keeps
                       ⌈keep·n⌉.

Output `kept.jsonl` is in the training shape: `{"id", "question", "cot", "answer", ...}` with
cot = the path's text and answer = its question's majority answer, plus the path's provenance
and every score a filter computed. `rejected.jsonl` holds examples of the candidates each filter dropped
(the first REJECTED_EXAMPLES per filter), in the same shape plus `rejectedBy` (the filter's kind)
and `filterIndex`, for `selfimprove report`.
Metrics: candidates, kept, keptQuestions; details list each filter's count in and out.

Engines load only for the filters that need one, one model at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..answers import extract_answer
from ..chat import render_messages
from ..constants import JUDGE_API_KEY_ENV, TEACHER_API_KEY_ENV, OutputName
from ..contract import ModelRef
from ..data import load_examples
from ..endpoints import Endpoint
from ..engines.base import Engine, GenerationParams
from ..errors import BadInput, DataError
from ..filter_registry import FILTERS
from ..prompts import cot_completion, render_prompt, render_target, uses_chat_template
from ..runtime import StageContext, StageOutcome
from ..selection import DS_MAX, W_MAX, ds_keep, ds_value, importance_weight, parse_score, raw_ds, top_fraction
from ..spec import (
    ConsistencyFilter,
    DistributionShiftFilter,
    DiversityFilter,
    EntropyFilter,
    JudgeFilter,
    PromptFormat,
    SelfFilter,
)
from ..storage import display_name, json_type_name, read_jsonl

KEPT = OutputName.KEPT
REJECTED = OutputName.REJECTED
# Examples of what each filter dropped, for a person to look at (`selfimprove report`): the first
# this many per filter, not all (samples.jsonl already holds every path).
REJECTED_EXAMPLES = 200
# The format IWSI's losses are computed in: the zero-shot CoT training format, i.e. exactly the
# (prompt, target) pair the train stage optimizes, with no exemplars in the context.
DS_FORMAT: PromptFormat = "zeroShotCot"


# --------------------------------------------------------------------------- candidates
@dataclass
class Candidate:
    id: str                     # the question's id
    question: str
    path: int
    text: str                   # the sampled reasoning (→ cot)
    answer: str | None          # the path's own answer
    majority: str               # the question's voted answer (→ answer)
    confidence: float
    entropy: float
    scores: dict[str, Any] = field(default_factory=dict)
    label: str | None = None    # the gold answer, set by a label-aware filter (→ answer)

    def row(self) -> dict[str, Any]:
        return {"id": f"{self.id}#{self.path}", "question": self.question, "cot": self.text,
                "answer": self.majority if self.label is None else self.label, "questionId": self.id,
                "path": self.path, "pathAnswer": self.answer, "confidence": self.confidence,
                "entropy": self.entropy, **({"label": self.label} if self.label is not None else {}),
                **self.scores}


def _field(obj: dict, key: str, types: tuple[type, ...], where: str, nullable: bool = False) -> Any:
    if key not in obj or (obj[key] is None and not nullable):
        raise DataError(f'{where}: missing "{key}"')
    value = obj[key]
    if value is None:
        return None
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise DataError(f'{where}: "{key}" must be {"/".join(t.__name__ for t in types)}, '
                        f"got {json_type_name(value)}")
    return value


def load_votes(ctx: StageContext, uri: str) -> dict[str, dict[str, Any]]:
    shown = display_name(uri)
    votes: dict[str, dict[str, Any]] = {}
    for lineno, obj in read_jsonl(ctx.storage_for(uri), uri):
        where = f"{shown}:{lineno}"
        qid = str(_field(obj, "id", (str, int), where))
        majority = _field(obj, "majority", (str,), where, nullable=True)
        confidence = float(_field(obj, "confidence", (int, float), where))
        entropy = float(_field(obj, "entropy", (int, float), where))
        if not (0 <= confidence <= 1 and 0 <= entropy <= 1):
            raise DataError(f'{where}: "confidence" and "entropy" must lie in [0, 1]')
        if qid in votes:
            raise DataError(f"{where}: duplicate id {qid!r}")
        votes[qid] = {"majority": majority, "confidence": confidence, "entropy": entropy}
    return votes


def load_candidates(ctx: StageContext, samples_uri: str, votes: dict[str, dict[str, Any]]) -> tuple[list[Candidate], int]:
    """Candidates in file order, and the number of paths left out for want of a majority."""
    shown = display_name(samples_uri)
    out: list[Candidate] = []
    no_majority = 0
    for lineno, obj in read_jsonl(ctx.storage_for(samples_uri), samples_uri):
        where = f"{shown}:{lineno}"
        qid = str(_field(obj, "id", (str, int), where))
        question = _field(obj, "question", (str,), where)
        path = _field(obj, "path", (int,), where)
        text = _field(obj, "text", (str,), where)
        answer = _field(obj, "answer", (str,), where, nullable=True)
        v = votes.get(qid)
        if v is None:
            raise DataError(f"{where}: id {qid!r} has no row in the votes file")
        if v["majority"] is None:
            no_majority += 1
            continue
        out.append(Candidate(qid, question, path, text, answer, v["majority"], v["confidence"], v["entropy"]))
    return out, no_majority


# --------------------------------------------------------------------------- engines
class EnginePool:
    """At most one engine alive at a time, loaded when a filter first needs its model.

    The sampling model (base + `model.adapter`) and the base model are one engine: vLLM serves
    the adapter per request, so the engine starts with LoRA enabled when a self filter will ask
    for it.
    """

    def __init__(self, ctx: StageContext, lora_for_base: bool):
        self.ctx = ctx
        self.lora_for_base = lora_for_base
        self.current: tuple[str, Engine] | None = None
        self.loads = 0

    def get(self, model_uri: str) -> Engine:
        if self.current and self.current[0] == model_uri:
            return self.current[1]
        self.close()
        from ..engines import load_engine

        task = self.ctx.task
        lora = self.lora_for_base and model_uri == task.model.base
        engine = load_engine(task.engine, self.ctx.local_dir(model_uri), gpus=task.gpus, seed=task.round,
                             enable_lora=lora)
        self.current = (model_uri, engine)
        self.loads += 1
        return engine

    def close(self) -> None:
        if self.current:
            self.current[1].close()
            self.current = None


@dataclass
class FilterRun:
    ctx: StageContext
    pool: EnginePool
    validation: list[tuple[str, str, str]]   # (question, cot, answer) of inputs.validation
    labels: dict[str, Any] = field(default_factory=dict)  # question id → data.Example, for label-aware filters
    metrics: dict[str, Any] = field(default_factory=dict)  # headline metrics a filter adds (a served judge's tokens)


FilterFn = Callable[[FilterRun, list[Candidate], Any], tuple[list[Candidate], dict[str, Any]]]


# --------------------------------------------------------------------------- the filters
def consistency(fr: FilterRun, cands: list[Candidate], spec: ConsistencyFilter) -> tuple[list[Candidate], dict]:
    kept = [c for c in cands if c.confidence >= spec.min_confidence and c.answer == c.majority]
    return kept, {"minConfidence": spec.min_confidence}


def entropy(fr: FilterRun, cands: list[Candidate], spec: EntropyFilter) -> tuple[list[Candidate], dict]:
    kept = [c for c in cands if c.entropy <= spec.max + 1e-12 and c.answer == c.majority]
    return kept, {"max": spec.max}


def _sft_pairs(fr: FilterRun, engine: Engine, items: Sequence[tuple[str, str, str]]) -> tuple[list[str], list[str]]:
    """(prompt, target) in the zero-shot CoT training format, rendered as the train stage does."""
    task = fr.ctx.task.prompting
    chat = uses_chat_template(task, engine.tokenizer)
    prompts = [render_prompt(task, q, DS_FORMAT, engine.tokenizer) for q, _, _ in items]
    return prompts, [render_target(DS_FORMAT, cot, answer, chat, task.answer_template) for _, cot, answer in items]


def distribution_shift(fr: FilterRun, cands: list[Candidate], spec: DistributionShiftFilter) -> tuple[list[Candidate], dict]:
    if not cands:
        return [], {"keep": spec.keep}
    engine = fr.pool.get(fr.ctx.task.model.base)
    # The validation losses and the candidates' in one batched call; EOS is scored as in training.
    items = fr.validation + [(c.question, c.text, c.majority) for c in cands]
    prompts, targets = _sft_pairs(fr, engine, items)
    losses = engine.completion_losses(prompts, targets, add_eos=True)
    valid_losses, cand_losses = losses[: len(fr.validation)], losses[len(fr.validation):]
    # L̄v: the mean of the per-example mean token losses, as IWSI's record_weights.py averages.
    valid_mean = sum(valid_losses) / len(valid_losses)
    ds, weights = [], []
    for c, loss in zip(cands, cand_losses):
        w = importance_weight(valid_mean, loss)
        d = ds_value(w)
        c.scores.update(loss=round(loss, 6), dsWeight=round(w, 6), ds=round(d, 6))
        ds.append(d)
        weights.append(w)
    # Exactly ⌊k·n⌋, ties (e.g. every weight at a clip bound) by the unclipped DS, question, path.
    tiebreak = [(raw_ds(valid_mean, loss), c.id, c.path) for c, loss in zip(cands, cand_losses)]
    mask, threshold = ds_keep(ds, spec.keep, tiebreak)
    kept = [c for c, k in zip(cands, mask) if k]
    at_lower = sum(1 for w in weights if w <= 0.0)
    at_upper = sum(1 for w in weights if w >= W_MAX)
    at_cap = sum(1 for d in ds if d >= DS_MAX)
    if max(at_lower, at_upper) == len(cands) or at_cap == len(cands):
        fr.ctx.log.warning(f"distributionShift: every one of the {len(cands)} weights sits at a clip bound "
                           f"(validation loss {valid_mean:.4g}; {at_lower} at w'=0, {at_upper} at w'={W_MAX:g}, {at_cap} at DS={DS_MAX:g}): "
                           "the DS values do not rank these candidates; the unclipped ratio does")
    return kept, {
        "keep": spec.keep, "n": len(cands), "kept": len(kept), "validLoss": round(valid_mean, 6),
        "threshold": threshold, "validationExamples": len(valid_losses),
        "weightsAtLowerBound": at_lower, "weightsAtUpperBound": at_upper, "dsAtMax": at_cap,
        "meanCandidateLoss": round(sum(cand_losses) / len(cand_losses), 6),
    }


JUDGE_SYSTEM = ("We would like to request your feedback on the performance of AI assistant in "
                "response to the instruction and the given input displayed following.")
JUDGE_INSTRUCTION = (
    "Please rate according to the accuracy of the response to the instruction and the input. "
    "Each assistant receives a score on a scale of 0 to 5, where a higher score indicates a higher "
    "level of accuracy. Please first output a single line containing the value of the score. In the "
    "subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any "
    "potential bias."
)
JUDGE_MAX = 5.0


def judge_messages(question: str, response: str) -> list[dict[str, str]]:
    """AlpaGasus's accuracy-rating prompt; the instruction is the question, there is no input."""
    triplet = f"### Instruction:\n{question.strip()}\n\n### Input:\n\n### Response:\n{response.strip()}\n\n"
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": triplet + JUDGE_INSTRUCTION}]


def _read_scores(texts: Sequence[str], max_score: float) -> tuple[list[float], int]:
    """Ratings read by `parse_score`; unreadable ones score 0 (and count)."""
    scores, unparsed = [], 0
    for text in texts:
        s = parse_score(text, max_score)
        if s is None:
            unparsed += 1
            s = 0.0
        scores.append(s)
    return scores, unparsed


def _rate(fr: FilterRun, engine: Engine, prompts: list[str], max_tokens: int, max_score: float,
          adapter: str | None = None) -> tuple[list[float], int]:
    """Greedy replies to `prompts`, read by `parse_score`; unreadable ones score 0 (and count)."""
    outs = engine.generate(prompts, GenerationParams(n=1, temperature=0.0, max_tokens=max_tokens), adapter=adapter)
    return _read_scores([o.completions[0].text for o in outs], max_score)


def judge_model(spec: JudgeFilter, m: ModelRef) -> tuple[str, tuple[Endpoint, str, str] | None]:
    """Who judges: the filter's own `model`, else `model.judge`, else the served judge, else the
    teacher (weights or served), else base. Returns (its name, (endpoint, field, key variable)
    when it is served)."""
    if spec.model or m.judge:
        return str(spec.model or m.judge), None
    for endpoint, name, key_env in ((m.judge_endpoint, "model.judgeEndpoint", JUDGE_API_KEY_ENV),
                                    (None if m.teacher else m.teacher_endpoint, "model.teacherEndpoint",
                                     TEACHER_API_KEY_ENV)):
        if endpoint is not None:
            return f"{endpoint.url} ({endpoint.model})", (endpoint, name, key_env)
    return m.teacher or m.base, None


def judge(fr: FilterRun, cands: list[Candidate], spec: JudgeFilter) -> tuple[list[Candidate], dict]:
    model, served = judge_model(spec, fr.ctx.task.model)
    if not cands:
        return [], {"minScore": spec.min_score, "model": model}
    requests = [judge_messages(c.question, c.text) for c in cands]
    extra: dict[str, Any] = {}
    if served is not None:
        from ..endpoint_client import EndpointClient

        endpoint, field_name, key_env = served
        with EndpointClient(endpoint, field=field_name, api_key_env=key_env) as client:
            replies = client.chat(requests, temperature=0.0, max_tokens=spec.max_tokens,
                                  progress=lambda d, t: fr.ctx.progress(d, t, "judge requests"))
        scores, unparsed = _read_scores([r.text for r in replies], JUDGE_MAX)
        extra["endpoint"] = client.stats.details(endpoint)
        for key, value in client.stats.metrics("judge").items():
            fr.metrics[key] = fr.metrics.get(key, 0) + value
    else:
        engine = fr.pool.get(model)
        use_template = fr.ctx.task.prompting.chat_template
        prompts = [render_messages(engine.tokenizer, r, use_template=use_template) for r in requests]
        scores, unparsed = _rate(fr, engine, prompts, spec.max_tokens, JUDGE_MAX)
    for c, s in zip(cands, scores):
        c.scores["judgeScore"] = s
    if unparsed:
        fr.ctx.log.warning(f"judge: {unparsed} of {len(cands)} replies had no readable score (rated 0)")
    return [c for c, s in zip(cands, scores) if s >= spec.min_score], {
        "minScore": spec.min_score, "model": model, "unparsed": unparsed,
        "meanScore": round(sum(scores) / len(scores), 4), **extra,
    }


SELF_MAX = 10.0
SELF_INSTRUCTION = ("Here is a question and an answer with its reasoning. Rate how likely the answer is "
                    "to be correct on a scale of 0 to 10, and reply in the form \"Score: <n>\".")


def self_messages(question: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user",
             "content": f"{SELF_INSTRUCTION}\n\nQuestion: {question.strip()}\nAnswer: {response.strip()}"}]


def self_rating(fr: FilterRun, cands: list[Candidate], spec: SelfFilter) -> tuple[list[Candidate], dict]:
    if not cands:
        return [], {"keep": spec.keep}
    task = fr.ctx.task
    engine = fr.pool.get(task.model.base)
    adapter = str(fr.ctx.local_dir(task.model.adapter)) if task.model.adapter else None
    prompts = [render_messages(engine.tokenizer, self_messages(c.question, c.text),
                               use_template=task.prompting.chat_template, reply_prefix="Score:") for c in cands]
    scores, unparsed = _rate(fr, engine, prompts, spec.max_tokens, SELF_MAX, adapter=adapter)
    for c, s in zip(cands, scores):
        c.scores["selfScore"] = s
    mask = top_fraction(scores, spec.keep)
    return [c for c, k in zip(cands, mask) if k], {
        "keep": spec.keep, "unparsed": unparsed, "meanScore": round(sum(scores) / len(scores), 4),
    }


def diversity(fr: FilterRun, cands: list[Candidate], spec: DiversityFilter) -> tuple[list[Candidate], dict]:
    import numpy as np

    if not cands:
        return [], {"keep": spec.keep}
    from ..coreset import ltd_coreset

    engine = fr.pool.get(fr.ctx.task.model.base)
    vectors = np.asarray(engine.embed([f"{c.question}\n{c.text}" for c in cands]), dtype=np.float32)
    k = math.ceil(spec.keep * len(cands))
    core = ltd_coreset(vectors, k=k, clusters=spec.clusters, seed=spec.seed + fr.ctx.task.round)
    for rank, i in enumerate(core.chosen):
        cands[i].scores["coresetRank"] = rank
    for i, c in enumerate(cands):
        c.scores["cluster"] = int(core.labels[i])
    keep = set(core.chosen)
    return [c for i, c in enumerate(cands) if i in keep], {
        "keep": spec.keep, "target": k, "clusters": core.clusters,
        "nonEmptyClusters": int(len(set(core.labels.tolist()))),
    }


# --------------------------------------------------------------------------- the stage
def load_validation(ctx: StageContext, answer_spec: Any) -> list[tuple[str, str, str]]:
    uri = ctx.task.inputs.validation
    if not uri:
        raise BadInput("inputs.validation: is required by the distributionShift filter (IWSI's labeled set)")
    examples = load_examples(ctx.storage_for(uri), uri, require_answer=True)
    if not examples:
        raise BadInput(f"inputs.validation: {display_name(uri)} holds no examples")
    out = []
    for ex in examples:
        assert ex.final is not None
        # The final answer as the extractor would read it, so targets read like sampled paths.
        final = extract_answer(ex.final, answer_spec) or ex.final.strip()
        out.append((ex.question, cot_completion(ex.rationale, final, ctx.task.prompting.answer_template), final))
    return out


# What to change when a filter keeps nothing, by kind: (setting, advice).
_EMPTY_HINTS: dict[str, tuple[str, str]] = {
    "consistency": ("minConfidence", "lower"),
    "entropy": ("max", "raise"),
    "distributionShift": ("keep", "raise"),
    "judge": ("minScore", "lower"),
    "self": ("keep", "raise"),
    "diversity": ("keep", "raise"),
    "rewardModel": ("minScore", "lower (or set keep instead of)"),
}


def kept_nothing(index: int, kind: str, params: Any, given: int, info: dict[str, Any]) -> str:
    """The stage's message when filter `index` keeps none of the `given` candidates: the training
    set would be empty, so the stage fails here, naming the filter and the setting to change."""
    where = f"filters[{index}].{kind}"
    settings = params.model_dump(by_alias=True, exclude_none=True) if hasattr(params, "model_dump") else {}
    why = ""
    if kind == "distributionShift":
        k = settings.get("keep")
        why = (f" (⌊keep·n⌋ = ⌊{k}·{given}⌋ = 0)" if k is not None and math.floor(k * given + 1e-9) == 0 else "")
    hint = _EMPTY_HINTS.get(kind)
    advice = (f"{hint[1]} {where}.{hint[0]} (now {settings.get(hint[0])})" if hint and hint[0] in settings
              else f"loosen {where} (settings {settings})")
    if kind == "distributionShift":
        advice += " or sample more paths (sampling.paths) or loosen the filters before it"
    report = {k: v for k, v in info.items() if k not in settings}
    return (f"{where}: kept none of the {given} candidates it was given{why}, so there is nothing to train on; "
            f"{advice}" + (f" (filter report: {report})" if report else ""))


def run(ctx: StageContext) -> StageOutcome:
    task = ctx.task
    assert task.inputs.samples and task.inputs.votes and task.filters
    kinds = [f.kind for f in task.filters]
    votes = load_votes(ctx, task.inputs.votes)
    cands, no_majority = load_candidates(ctx, task.inputs.samples, votes)
    validation = load_validation(ctx, task.prompting.answer) if "distributionShift" in kinds else []
    if "self" in kinds and task.model.adapter:
        ctx.local_dir(task.model.adapter)  # fetch (and fail on a bad URI) before any model loads
    labels = None
    if any(FILTERS[k].labels for k in kinds):
        from .filter_extra import load_labels

        labels = load_labels(ctx, [i for i, f in enumerate(task.filters) if FILTERS[f.kind].labels][0])
    n_candidates = len(cands)
    ctx.log.info(f"{n_candidates} candidates from {len(votes)} questions "
                 f"({no_majority} paths of questions without an answer left out); filters: {', '.join(kinds)}")

    if not cands:
        raise BadInput(f"filters: no candidates to filter: none of the {len(votes)} questions got an answer from its sampled "
                       f"paths ({no_majority} paths without one), so there is nothing to train on; check prompting.answer "
                       "(how answers are read) and sampling.maxTokens (paths cut short)")

    rationalize = any(getattr(f.get("correct"), "rationalize", False) for f in task.filters)
    pool = EnginePool(ctx, lora_for_base=("self" in kinds or rationalize) and task.model.adapter is not None)
    fr = FilterRun(ctx, pool, validation, labels or {})
    steps: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    try:
        for i, f in enumerate(task.filters):
            t0 = time.perf_counter()
            before = len(cands)
            given = cands
            cands, info = FILTERS[f.kind].load()(fr, cands, f.params)
            kept_now = {id(c) for c in cands}
            dropped = [c for c in given if id(c) not in kept_now]
            rejected.extend({**c.row(), "rejectedBy": f.kind, "filterIndex": i} for c in dropped[:REJECTED_EXAMPLES])
            steps.append({"kind": f.kind, "in": before, "out": len(cands),
                          "seconds": round(time.perf_counter() - t0, 3), **info})
            ctx.log.info(f"filter {f.kind}: {before} → {len(cands)}")
            if not cands:
                raise BadInput(kept_nothing(i, f.kind, f.params, before, info))
            ctx.progress(i + 1, len(task.filters), "filters")
    finally:
        pool.close()

    ctx.writer.write_jsonl(KEPT, (c.row() for c in cands))
    ctx.writer.write_jsonl(REJECTED, rejected)
    kept_questions = len({c.id for c in cands})
    metrics: dict[str, Any] = {"candidates": n_candidates, "kept": len(cands), "keptQuestions": kept_questions}
    if cands:
        metrics["meanConfidence"] = round(sum(c.confidence for c in cands) / len(cands), 6)
    metrics.update(fr.metrics)
    return StageOutcome(
        metrics=metrics,
        outputs={"kept": KEPT, "rejected": REJECTED},
        details={"filters": steps, "questions": len(votes), "pathsWithoutMajority": no_majority,
                 "engineLoads": pool.loads},
    )
