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

Score, then select (docs/architecture.md, "The filter stage sharded and chunked"). The model
filters' selections are global, so the stage runs in two passes, sharded or not:
  1. scoring (`score_pass`): the candidates, in file order, are cut into chunks of
     CHUNK_CANDIDATES; for each model filter i, chunk by chunk, its model scores the candidates
     that pass the per-candidate tests of the filters before it (`_relaxed`: consistency,
     entropy, correct's answer check; a model filter lets everything through), a superset of
     what the chain will give it. Each chunk is committed on its own (`chunks.Chunks`, under
     `<prefix>/filters/<i>/chunks/<k>/scores.jsonl`), so a retry scores only the missing ones.
     With `shards: N` shard s scores whole chunks s·K//N … (s+1)·K//N - 1 (K chunks): every
     chunk is scored in one call with the same neighbours whatever N is, so the scores do not
     depend on the batch a shard would have formed.
  2. selection (`_select`): the chain runs once over every candidate with the committed scores
     (a candidate without one, a STaR rationale, is scored then), and writes kept.jsonl and
     rejected.jsonl. A one-shard run does it after its pass; a sharded run in `merge`.
Candidates are light (`Candidate`: ids, answers, scores, the line's byte offset); texts are read
back from samples.jsonl when a model or an output row needs them.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..answers import extract_answer
from ..chat import render_messages
from ..chunks import chunk_size
from ..constants import JUDGE_API_KEY_ENV, TEACHER_API_KEY_ENV, OutputName
from ..contract import ModelRef
from ..data import load_examples
from ..endpoints import Endpoint
from ..engines.base import Engine, GenerationParams, PromptTooLong
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
class SampleTexts:
    """The question and path text of each sample line, read back by byte offset from a local
    copy of `samples.jsonl` (the file itself when it is local): a candidate holds its offset,
    not its text, so the stage's memory does not grow with the paths' length."""

    def __init__(self, path: str):
        self.path = path
        self._f: Any = None

    def read(self, offset: int) -> tuple[str, str]:
        if self._f is None:
            self._f = open(self.path, "rb")  # noqa: SIM115 — held open for the stage's life
        self._f.seek(offset)
        obj = json.loads(self._f.readline())
        return obj["question"], obj["text"]

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class Candidate:
    """One sampled path: what the filters select on, light. The question and text are held only
    when the candidate was made in memory (a STaR rationale, a test); a sampled path reads them
    from `samples.jsonl` when a model or an output row needs them."""

    __slots__ = ("id", "path", "answer", "majority", "confidence", "entropy", "label",
                 "offset", "mark", "_question", "_text", "_texts", "_scores")

    def __init__(self, id: str, question: str | None, path: int, text: str | None, answer: str | None,
                 majority: str, confidence: float, entropy: float, scores: dict[str, Any] | None = None,
                 label: str | None = None, texts: SampleTexts | None = None, offset: int = -1):
        self.id = id                    # the question's id
        self.path = path
        self.answer = answer            # the path's own answer
        self.majority = majority        # the question's voted answer (→ answer)
        self.confidence = confidence
        self.entropy = entropy
        self.label = label              # the gold answer, set by a label-aware filter (→ answer)
        self.offset = offset
        self.mark = -1                  # the index of the last filter of the chain that kept it
        self._question, self._text, self._texts = question, text, texts
        self._scores = scores

    @property
    def key(self) -> tuple[str, int]:
        return self.id, self.path

    @property
    def question(self) -> str:
        if self._question is not None:
            return self._question
        assert self._texts is not None
        return self._texts.read(self.offset)[0]

    @property
    def text(self) -> str:
        """The sampled reasoning (→ cot)."""
        if self._text is not None:
            return self._text
        assert self._texts is not None
        return self._texts.read(self.offset)[1]

    @property
    def scores(self) -> dict[str, Any]:
        if self._scores is None:
            self._scores = {}
        return self._scores

    def row(self) -> dict[str, Any]:
        question, text = ((self._question, self._text) if self._text is not None and self._question is not None
                          else (self.question, self.text))
        return {"id": f"{self.id}#{self.path}", "question": question, "cot": text,
                "answer": self.majority if self.label is None else self.label, "questionId": self.id,
                "path": self.path, "pathAnswer": self.answer, "confidence": self.confidence,
                "entropy": self.entropy, **({"label": self.label} if self.label is not None else {}),
                **(self._scores or {})}


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
        qid = sys.intern(str(_field(obj, "id", (str, int), where)))
        majority = _field(obj, "majority", (str,), where, nullable=True)
        confidence = float(_field(obj, "confidence", (int, float), where))
        entropy = float(_field(obj, "entropy", (int, float), where))
        if not (0 <= confidence <= 1 and 0 <= entropy <= 1):
            raise DataError(f'{where}: "confidence" and "entropy" must lie in [0, 1]')
        if qid in votes:
            raise DataError(f"{where}: duplicate id {qid!r}")
        votes[qid] = {"majority": majority, "confidence": confidence, "entropy": entropy}
    return votes


def local_samples(ctx: StageContext, uri: str) -> str:
    """A local path holding `samples.jsonl`: the file itself, or a copy in the stage's workdir."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if "://" not in uri:
        return uri
    path = ctx.workdir / "samples.jsonl"
    if not path.exists():
        ctx.storage_for(uri).download_file(uri, path)
    return str(path)


def _lines(path: str, shown: str) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(line number, byte offset, object) of each non-blank line, with `read_jsonl`'s errors."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            at, offset = offset, offset + len(raw)
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{shown}:{lineno}: invalid UTF-8 at byte {e.start}") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{shown}:{lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{shown}:{lineno}: expected a JSON object, got {json_type_name(obj)}")
            yield lineno, at, obj


def load_candidates(ctx: StageContext, samples_uri: str, votes: dict[str, dict[str, Any]],
                    texts: SampleTexts | None = None) -> tuple[list[Candidate], int]:
    """Candidates in file order, and the number of paths left out for want of a majority. Each
    holds its line's offset into `texts` (opened on the local copy here when not given)."""
    shown = display_name(samples_uri)
    texts = texts or SampleTexts(local_samples(ctx, samples_uri))
    out: list[Candidate] = []
    no_majority = 0
    for lineno, offset, obj in _lines(texts.path, shown):
        where = f"{shown}:{lineno}"
        qid = str(_field(obj, "id", (str, int), where))
        _field(obj, "question", (str,), where)
        path = _field(obj, "path", (int,), where)
        _field(obj, "text", (str,), where)
        answer = _field(obj, "answer", (str,), where, nullable=True)
        v = votes.get(qid)
        if v is None:
            raise DataError(f"{where}: id {qid!r} has no row in the votes file")
        if v["majority"] is None:
            no_majority += 1
            continue
        # The vote's own id, majority and floats are shared by the question's paths (memory).
        out.append(Candidate(sys.intern(qid), None, path, None, None if answer is None else sys.intern(answer),
                             v["majority"], v["confidence"], v["entropy"], texts=texts, offset=offset))
    return out, no_majority


# --------------------------------------------------------------------------- engines
class EnginePool:
    """At most one model alive at a time, loaded when a filter first needs it.

    The sampling model (base + `model.adapter`) and the base model are one engine: vLLM serves
    the adapter per request, so the engine starts with LoRA enabled when a self filter will ask
    for it. Other models (a reward model) come through `get_other` and share the one slot, so a
    chunked filter loads its model once per process, not once per chunk.
    """

    def __init__(self, ctx: StageContext, lora_for_base: bool):
        self.ctx = ctx
        self.lora_for_base = lora_for_base
        self.current: tuple[str, Any, Callable[[Any], None]] | None = None
        self.loads = 0

    def get(self, model_uri: str) -> Engine:
        def load() -> Engine:
            from ..engines import load_engine

            task = self.ctx.task
            lora = self.lora_for_base and model_uri == task.model.base
            return load_engine(task.engine, self.ctx.local_dir(model_uri), gpus=task.gpus, seed=task.round,
                               enable_lora=lora)

        engine: Engine = self.get_other(model_uri, load, lambda e: e.close())
        return engine

    def get_other(self, key: str, load: Callable[[], Any], close: Callable[[Any], None]) -> Any:
        if self.current and self.current[0] == key:
            return self.current[1]
        self.close()
        obj = load()
        self.current = (key, obj, close)
        self.loads += 1
        return obj

    def close(self) -> None:
        if self.current:
            _, obj, close = self.current
            self.current = None
            close(obj)


@dataclass
class FilterRun:
    ctx: StageContext
    pool: EnginePool
    validation: list[tuple[str, str, str]]   # (question, cot, answer) of inputs.validation
    labels: dict[str, Any] = field(default_factory=dict)  # question id → data.Example, for label-aware filters
    metrics: dict[str, Any] = field(default_factory=dict)  # headline metrics a filter adds (a served judge's tokens)
    # The scoring pass's records, by filter index, then (question id, path): what a filter's
    # model said of each candidate it may see. A filter reads its scores from here and scores
    # only what is missing (a STaR rationale, made after the pass); a filter called on its own
    # (no index) scores everything.
    scored: dict[int, dict[tuple[str, int], dict[str, Any]]] = field(default_factory=dict)
    # What each scorer call reported besides the scores (a served judge's token counts), by index.
    extras: dict[int | None, list[dict[str, Any]]] = field(default_factory=dict)
    current: int | None = None               # the index of the filter running in the chain
    valid_losses: list[float] | None = None  # distributionShift's validation losses, once per run
    scorer_calls: int = 0


FilterFn = Callable[[FilterRun, list[Candidate], Any], tuple[list[Candidate], dict[str, Any]]]
# (FilterRun, candidates, params) → (one JSON record per candidate, extra report or {}).
ScoreFn = Callable[[FilterRun, list[Candidate], Any], tuple[list[dict[str, Any]], dict[str, Any]]]


# What to change when a filter's own prompt does not fit the model's context: the engine's
# message can only say "shorten the prompt", which the user does not write for these filters.
CONTEXT_HINTS = {
    "judge": "the judge reads AlpaGasus's rating prompt (question, response and instructions): judge with "
             "a model whose context holds it (filters[{i}].judge.model, model.judge or model.judgeEndpoint) "
             "or raise engine.maxModelLen if this model allows it",
    "self": "the model rates each answer through the self-rating prompt: raise engine.maxModelLen if the "
            "model allows it, or use a filter that needs no prompt (consistency, entropy, diversity)",
}


def call_scorer(fr: FilterRun, kind: str, index: int | None, cands: list[Candidate],
                spec: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """SCORERS[kind] on `cands`; a prompt that cannot fit fails naming the filter and the setting."""
    try:
        return SCORERS[kind](fr, cands, spec)
    except PromptTooLong as exc:
        hint = CONTEXT_HINTS.get(kind)
        if hint is None:
            raise
        where = f"filters[{index}].{kind}" if index is not None else kind
        raise PromptTooLong(f"{where}: {exc.fact}", hint.format(i=index)) from exc


def scores_of(fr: FilterRun, kind: str, cands: list[Candidate], spec: Any) -> list[dict[str, Any]]:
    """The score records of `cands` for the filter now running: the scoring pass's, and what it
    did not score computed now (in one call)."""
    table = fr.scored.get(fr.current) if fr.current is not None else None
    todo = cands if table is None else [c for c in cands if c.key not in table]
    fresh: list[dict[str, Any]] = []
    if todo:
        fresh, extra = call_scorer(fr, kind, fr.current, todo, spec)
        fr.scorer_calls += 1
        if extra:
            fr.extras.setdefault(fr.current, []).append(extra)
    if table is None:
        return fresh
    table.update(zip((c.key for c in todo), fresh))
    return [table[c.key] for c in cands]


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


def ds_scores(fr: FilterRun, cands: list[Candidate], spec: DistributionShiftFilter) -> tuple[list[dict], dict]:
    """Each candidate's SFT loss under the base model (EOS scored, as in training). The
    validation losses are computed once per process, in a call of their own, so they do not
    depend on which candidates share their batch."""
    engine = fr.pool.get(fr.ctx.task.model.base)
    if fr.valid_losses is None:
        prompts, targets = _sft_pairs(fr, engine, fr.validation)
        fr.valid_losses = [float(x) for x in engine.completion_losses(prompts, targets, add_eos=True)]
    prompts, targets = _sft_pairs(fr, engine, [(c.question, c.text, c.majority) for c in cands])
    return [{"loss": float(x)} for x in engine.completion_losses(prompts, targets, add_eos=True)], {}


def distribution_shift(fr: FilterRun, cands: list[Candidate], spec: DistributionShiftFilter) -> tuple[list[Candidate], dict]:
    if not cands:
        return [], {"keep": spec.keep}
    cand_losses = [r["loss"] for r in scores_of(fr, "distributionShift", cands, spec)]
    if fr.valid_losses is None:  # every candidate was scored by the pass, in chunks without one
        ds_scores(fr, [], spec)
    valid_losses = fr.valid_losses
    assert valid_losses is not None
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


def judge_scores(fr: FilterRun, cands: list[Candidate], spec: JudgeFilter) -> tuple[list[dict], dict]:
    model, served = judge_model(spec, fr.ctx.task.model)
    requests = [judge_messages(c.question, c.text) for c in cands]
    extra: dict[str, Any] = {}
    if served is not None:
        from ..endpoint_client import EndpointClient

        endpoint, field_name, key_env = served
        with EndpointClient(endpoint, field=field_name, api_key_env=key_env) as client:
            replies = client.chat(requests, temperature=0.0, max_tokens=spec.max_tokens,
                                  progress=lambda d, t: fr.ctx.progress(d, t, "judge requests"))
        texts = [r.text for r in replies]
        extra = {"endpoint": client.stats.details(endpoint), "metrics": client.stats.metrics("judge")}
    else:
        engine = fr.pool.get(model)
        use_template = fr.ctx.task.prompting.chat_template
        prompts = [render_messages(engine.tokenizer, r, use_template=use_template) for r in requests]
        texts = _greedy(engine, prompts, spec.max_tokens)
    return [_rating("judgeScore", t, JUDGE_MAX) for t in texts], extra


def _rating(key: str, text: str, max_score: float) -> dict[str, Any]:
    """A reply read by `parse_score`; an unreadable one rates 0 and says so."""
    s = parse_score(text, max_score)
    return {key: 0.0 if s is None else s, **({"unparsed": True} if s is None else {})}


def _greedy(engine: Engine, prompts: list[str], max_tokens: int, adapter: str | None = None) -> list[str]:
    outs = engine.generate(prompts, GenerationParams(n=1, temperature=0.0, max_tokens=max_tokens), adapter=adapter)
    return [o.completions[0].text for o in outs]


def _sum_endpoint(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One endpoint report from the scoring calls' reports (chunks, shards): counts add up."""
    out = dict(parts[0])
    for p in parts[1:]:
        for k, v in p.items():
            if k == "retriedBy":
                out[k] = {r: out[k].get(r, 0) + v.get(r, 0) for r in sorted({*out[k], *v})}
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "maxConcurrency":
                out[k] = out[k] + v
    for k in ("waitSeconds", "seconds"):
        if k in out:
            out[k] = round(out[k], 3)
    return out


def judge(fr: FilterRun, cands: list[Candidate], spec: JudgeFilter) -> tuple[list[Candidate], dict]:
    model, served = judge_model(spec, fr.ctx.task.model)
    if not cands:
        return [], {"minScore": spec.min_score, "model": model}
    records = scores_of(fr, "judge", cands, spec)
    scores = [r["judgeScore"] for r in records]
    unparsed = sum(1 for r in records if r.get("unparsed"))
    extra: dict[str, Any] = {}
    reports = fr.extras.get(fr.current, [])
    if served is not None and reports:
        extra["endpoint"] = _sum_endpoint([r["endpoint"] for r in reports])
        for r in reports:
            for key, value in r["metrics"].items():
                fr.metrics[key] = fr.metrics.get(key, 0) + value
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


def self_scores(fr: FilterRun, cands: list[Candidate], spec: SelfFilter) -> tuple[list[dict], dict]:
    task = fr.ctx.task
    engine = fr.pool.get(task.model.base)
    adapter = str(fr.ctx.local_dir(task.model.adapter)) if task.model.adapter else None
    prompts = [render_messages(engine.tokenizer, self_messages(c.question, c.text),
                               use_template=task.prompting.chat_template, reply_prefix="Score:") for c in cands]
    return [_rating("selfScore", t, SELF_MAX) for t in _greedy(engine, prompts, spec.max_tokens, adapter)], {}


def self_rating(fr: FilterRun, cands: list[Candidate], spec: SelfFilter) -> tuple[list[Candidate], dict]:
    if not cands:
        return [], {"keep": spec.keep}
    records = scores_of(fr, "self", cands, spec)
    scores = [r["selfScore"] for r in records]
    for c, s in zip(cands, scores):
        c.scores["selfScore"] = s
    mask = top_fraction(scores, spec.keep)
    return [c for c, k in zip(cands, mask) if k], {
        "keep": spec.keep, "unparsed": sum(1 for r in records if r.get("unparsed")),
        "meanScore": round(sum(scores) / len(scores), 4),
    }


def embedding_scores(fr: FilterRun, cands: list[Candidate], spec: DiversityFilter) -> tuple[list[dict], dict]:
    """Each candidate's embedding (question + reasoning), as base64 float32: exact and a third
    the size of a JSON list."""
    import numpy as np

    engine = fr.pool.get(fr.ctx.task.model.base)
    vectors = np.asarray(engine.embed([f"{c.question}\n{c.text}" for c in cands]), dtype="<f4")
    return [{"embedding": base64.b64encode(v.tobytes()).decode()} for v in vectors], {}


def diversity(fr: FilterRun, cands: list[Candidate], spec: DiversityFilter) -> tuple[list[Candidate], dict]:
    import numpy as np

    if not cands:
        return [], {"keep": spec.keep}
    from ..coreset import ltd_coreset

    records = scores_of(fr, "diversity", cands, spec)
    vectors = np.stack([np.frombuffer(base64.b64decode(r["embedding"]), dtype="<f4") for r in records]).astype(np.float32)
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


# --------------------------------------------------------------------------- scoring in chunks
# The filters whose model scores each candidate, and how (ScoreFn). Their selection is global
# (the ⌊k·n⌋ smallest DS, a top fraction, a coreset), so a shard cannot select; it scores, and
# the selection runs once over every score (`_select`).
SCORERS: dict[str, ScoreFn] = {}


def _relaxed(fr: FilterRun, kind: str, params: Any) -> Callable[[Candidate], bool] | None:
    """A per-candidate test that every candidate filter `kind` keeps passes, whatever the
    filters before it kept (None: no such test, everything may pass). The scoring pass scores,
    for each scoring filter, the candidates that pass the tests of the filters before it: a
    superset of what the chain gives that filter."""
    if kind == "consistency":
        return lambda c: c.confidence >= params.min_confidence and c.answer == c.majority
    if kind == "entropy":
        return lambda c: c.entropy <= params.max + 1e-12 and c.answer == c.majority
    if kind == "correct":
        from ..answers import answers_equal

        labels = fr.labels
        # A question without a label fails the filter itself later, naming it; let it through.
        return lambda c: c.id not in labels or answers_equal(c.answer, labels[c.id].final)
    return None


# Candidates per chunk: a chunk's scores are committed together, so a preempted pod loses at
# most one chunk's scoring. Chunks are also the unit of sharding: a shard scores whole chunks,
# so every chunk is scored in one call with the same neighbours however many shards there are.
CHUNK_CANDIDATES = 4096
SCORES = "scores.jsonl"


class _ChunkView:
    """What `chunks.Chunks` reads of a StageContext, with the prefix of one scoring filter's
    chunks: `<stage or shard prefix>/filters/<i>/`."""

    def __init__(self, ctx: StageContext, prefix: str, index: int):
        from ..storage import join_uri

        self.task, self.log, self.storage, self.writer = ctx.task, ctx.log, ctx.storage, ctx.writer
        self.prefix = join_uri(prefix, f"filters/{index}/")


def _shard_rows(n: int, size: int, shard: int | None, shards: int) -> tuple[int, int]:
    """Candidate rows [start, stop) scored by `shard`: whole chunks, chunk indexes cut as
    `StageContext.shard_rows` cuts rows (all of them when the stage is not sharded)."""
    if shard is None:
        return 0, n
    k = -(-n // size)
    first, last = shard * k // shards, (shard + 1) * k // shards
    return min(first * size, n), min(last * size, n)


def _chunks(ctx: StageContext, prefix: str, index: int, rows: list[Candidate], size: int) -> Any:
    from ..chunks import Chunks

    return Chunks(_ChunkView(ctx, prefix, index), [f"{c.id}#{c.path}" for c in rows], size)  # type: ignore[arg-type]


def score_pass(fr: FilterRun, cands: list[Candidate], size: int) -> dict[str, Any]:
    """Score this process's rows (its shard's, or all) for every scoring filter, chunk by chunk,
    each chunk committed on its own; chunks an earlier attempt committed are reused."""
    ctx = fr.ctx
    task = ctx.task
    start, stop = _shard_rows(len(cands), size, ctx.shard, task.shards)
    rows = cands[start:stop]
    # How far each row gets through the relaxed chain: filter i scores the rows with reach > i.
    reach = [len(task.filters)] * len(rows)
    scored: dict[str, int] = {}
    reused = total = 0
    for i, f in enumerate(task.filters):
        # Every chunk is committed, empty or not: the merge reads the whole plan.
        if f.kind in SCORERS:
            def work(chunk: Any, writer: Any, i: int = i, kind: str = f.kind, params: Any = f.params) -> dict:
                todo = [c for j, c in zip(range(chunk.start, chunk.stop), chunk.rows(rows)) if reach[j] > i]
                records: list[dict[str, Any]] = []
                extra: dict[str, Any] = {}
                if todo:
                    records, extra = call_scorer(fr, kind, i, todo, params)
                    fr.scorer_calls += 1
                writer.write_jsonl(SCORES, ({"id": c.id, "path": c.path, **r} for c, r in zip(todo, records)))
                stats: dict[str, Any] = {"scored": len(todo)}
                if extra:
                    stats["extra"] = extra
                if kind == "distributionShift" and todo:
                    stats["validLosses"] = fr.valid_losses
                ctx.progress(chunk.index + 1, len(chunks.chunks), f"chunks of filters[{i}].{kind}")
                return stats

            chunks = _chunks(ctx, ctx.prefix, i, rows, size)
            results = chunks.run(work)
            scored[str(i)] = sum(int(r.stats.get("scored", 0)) for r in results)
            reused += sum(r.reused for r in results)
            total += len(results)
        test = _relaxed(fr, f.kind, f.params)
        if test is not None:
            reach = [r if r <= i or test(c) else i + 1 for r, c in zip(reach, rows)]
    return {"rows": [start, stop], "scored": scored, "chunks": total, "reusedChunks": reused}


def load_scores(fr: FilterRun, cands: list[Candidate], size: int, prefixes: list[str]) -> None:
    """Read the committed scores of every chunk (each shard's, in shard order) into `fr.scored`
    and `fr.extras`; the first chunk's validation losses are the run's."""
    from ..storage import iter_committed

    task = fr.ctx.task
    for i, f in enumerate(task.filters):
        if f.kind not in SCORERS:
            continue
        table = fr.scored.setdefault(i, {})
        for shard, prefix in enumerate(prefixes):
            start, stop = _shard_rows(len(cands), size, shard if len(prefixes) > 1 else None, len(prefixes))
            chunks = _chunks(fr.ctx, prefix, i, cands[start:stop], size)
            for chunk in chunks.chunks:
                stats = chunks.committed(chunk)
                if stats is None:
                    raise RuntimeError(f"filters[{i}].{f.kind}: chunk {chunk.index} of the scores under "
                                       f"{chunks.prefix} is missing or damaged; a retry scores it again")
                if stats.get("extra"):
                    fr.extras.setdefault(i, []).append(stats["extra"])
                if stats.get("validLosses") is not None:
                    if fr.valid_losses is None:
                        fr.valid_losses = stats["validLosses"]
                    elif stats["validLosses"] != fr.valid_losses:
                        fr.ctx.log.warning(f"filters[{i}].distributionShift: chunk {chunk.index} under {prefix} "
                                           "computed other validation losses; the first chunk's are used")
                for line in iter_committed(fr.ctx.storage, chunks.prefix_of(chunk), SCORES):
                    rec = json.loads(line)
                    table[(rec.pop("id"), rec.pop("path"))] = rec


@dataclass
class _Inputs:
    votes: dict[str, dict[str, Any]]
    cands: list[Candidate]
    no_majority: int
    fr: FilterRun
    texts: SampleTexts


def _load(ctx: StageContext) -> _Inputs:
    """Everything the stage reads before any model loads; bad input fails here, in every shard."""
    task = ctx.task
    assert task.inputs.samples and task.inputs.votes and task.filters
    kinds = [f.kind for f in task.filters]
    votes = load_votes(ctx, task.inputs.votes)
    texts = SampleTexts(local_samples(ctx, task.inputs.samples))
    cands, no_majority = load_candidates(ctx, task.inputs.samples, votes, texts)
    validation = load_validation(ctx, task.prompting.answer) if "distributionShift" in kinds else []
    if "self" in kinds and task.model.adapter:
        ctx.local_dir(task.model.adapter)  # fetch (and fail on a bad URI) before any model loads
    labels = None
    if any(FILTERS[k].labels for k in kinds):
        from .filter_extra import load_labels

        labels = load_labels(ctx, [i for i, f in enumerate(task.filters) if FILTERS[f.kind].labels][0])
    ctx.log.info(f"{len(cands)} candidates from {len(votes)} questions "
                 f"({no_majority} paths of questions without an answer left out); filters: {', '.join(kinds)}")
    if not cands:
        raise BadInput(f"filters: no candidates to filter: none of the {len(votes)} questions got an answer from its sampled "
                       f"paths ({no_majority} paths without one), so there is nothing to train on; check prompting.answer "
                       "(how answers are read) and sampling.maxTokens (paths cut short)")
    rationalize = any(getattr(f.get("correct"), "rationalize", False) for f in task.filters)
    pool = EnginePool(ctx, lora_for_base=("self" in kinds or rationalize) and task.model.adapter is not None)
    return _Inputs(votes, cands, no_majority, FilterRun(ctx, pool, validation, labels or {}), texts)


def _select(ctx: StageContext, inp: _Inputs, scoring: dict[str, Any]) -> StageOutcome:
    """The filter chain over every candidate, with the scores the pass committed: the global
    selections, kept.jsonl and rejected.jsonl exactly as one process would write them."""
    task, fr = ctx.task, inp.fr
    cands = inp.cands
    n_candidates = len(cands)
    steps: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    try:
        for i, f in enumerate(task.filters):
            t0 = time.perf_counter()
            before = len(cands)
            given = cands
            fr.current = i
            cands, info = FILTERS[f.kind].load()(fr, cands, f.params)
            for c in cands:  # a stamp, not a set of every kept candidate: memory
                c.mark = i
            dropped = (c for c in given if c.mark != i)
            rejected.extend({**c.row(), "rejectedBy": f.kind, "filterIndex": i}
                            for c in itertools.islice(dropped, REJECTED_EXAMPLES))
            del given, dropped
            steps.append({"kind": f.kind, "in": before, "out": len(cands),
                          "seconds": round(time.perf_counter() - t0, 3), **info})
            ctx.log.info(f"filter {f.kind}: {before} → {len(cands)}")
            if not cands:
                raise BadInput(kept_nothing(i, f.kind, f.params, before, info))
            ctx.progress(i + 1, len(task.filters), "filters")
        fr.current = None
        ctx.writer.write_jsonl(KEPT, (c.row() for c in cands))
        ctx.writer.write_jsonl(REJECTED, rejected)
    finally:
        fr.pool.close()
        inp.texts.close()
    kept_questions = len({c.id for c in cands})
    metrics: dict[str, Any] = {"candidates": n_candidates, "kept": len(cands), "keptQuestions": kept_questions}
    if cands:
        metrics["meanConfidence"] = round(sum(c.confidence for c in cands) / len(cands), 6)
    metrics.update(fr.metrics)
    return StageOutcome(
        metrics=metrics,
        outputs={"kept": KEPT, "rejected": REJECTED},
        details={"filters": steps, "questions": len(inp.votes), "pathsWithoutMajority": inp.no_majority,
                 "scoring": scoring, "engineLoads": scoring.get("engineLoads", 0) + fr.pool.loads},
    )


def run(ctx: StageContext) -> StageOutcome:
    """One process: score every candidate (chunks committed as they finish), then select. One
    shard of several: score its chunks only; the last shard to commit merges (`merge`)."""
    inp = _load(ctx)
    size = chunk_size(CHUNK_CANDIDATES)
    try:
        scoring = score_pass(inp.fr, inp.cands, size)
    finally:
        inp.fr.pool.close()
    scoring.update(chunkCandidates=size, engineLoads=inp.fr.pool.loads)
    inp.fr.pool.loads = 0
    if ctx.shard is not None:
        inp.texts.close()
        return StageOutcome(metrics={"candidates": scoring["rows"][1] - scoring["rows"][0],
                                     "scored": sum(scoring["scored"].values())},
                            details={"scoring": scoring})
    load_scores(inp.fr, inp.cands, size, [ctx.prefix])
    return _select(ctx, inp, {k: v for k, v in scoring.items() if k != "rows"})


def merge(ctx: StageContext, shard_dirs: list[str]) -> StageOutcome:
    """The whole stage from its shards' committed scores: the chain runs once over all of them,
    so the files and metrics are those of a one-shard run."""
    from ..runtime import shard_details

    inp = _load(ctx)
    parts = [d.get("scoring", {}) for d in shard_details(ctx, shard_dirs)]
    sizes = {p.get("chunkCandidates") for p in parts}
    if len(sizes) != 1:
        raise RuntimeError(f"filter: the shards scored in chunks of different sizes ({sorted(map(str, sizes))})")
    size = int(sizes.pop())
    load_scores(inp.fr, inp.cands, size, shard_dirs)
    scored: dict[str, int] = {}
    for p in parts:
        for k, v in p.get("scored", {}).items():
            scored[k] = scored.get(k, 0) + v
    scoring = {"scored": scored, "chunks": sum(p.get("chunks", 0) for p in parts),
               "reusedChunks": sum(p.get("reusedChunks", 0) for p in parts), "chunkCandidates": size,
               "engineLoads": sum(p.get("engineLoads", 0) for p in parts), "shards": len(shard_dirs)}
    return _select(ctx, inp, scoring)


def _register_scorers() -> None:
    from .filter_extra import reward_scores

    SCORERS.update({"distributionShift": ds_scores, "judge": judge_scores, "self": self_scores,
                    "diversity": embedding_scores, "rewardModel": reward_scores})


_register_scorers()
