"""The `augment` stage (LLM2LLM, shared/research/methods.md §2): new examples for the seed
examples the student got wrong.

1. Read the evaluation's seed predictions (`inputs.predictions`: rows with `id`, `question`,
   `correct`, and `gold`) and keep the wrong ones. The answer key shown to the teacher is the
   seed example's full solution (`inputs.seed`, by id), else the row's `reference`/`answer`,
   else just the gold answer.
2. Ask the teacher (`model.teacher`, else the base model; never an adapter) for
   `augment.perExample` new examples per wrong one, with LLM2LLM's educational-assistant prompt
   — all requests in one batched call. With `model.teacherEndpoint` the same messages go to the
   served model (`endpoint_client`, at most maxConcurrency at a time) and no weights load.
3. Parse `Question: … Answer: … #### N` items (numbered or not); count and drop malformed ones
   (and a last item cut off by the token limit).
4. Drop an item whose question has ROUGE-L F > `augment.rougeThreshold` against any existing
   question: the seed set, every earlier augmented file (`inputs.existing`) and the items
   accepted so far in this stage.
5. For seed examples still short of k, ask again up to `augment.retries` times, showing the
   accepted items and asking for "n more, different ones" (as the LLM2LLM code does).

Output `augmented.jsonl`: `{"id", "question", "answer": "<solution>\\n#### N", "source": <seed id>}`
— GSM8K's labeled shape, so the train stage reads it like the seed. Metrics: wrong, requested,
augmented, malformed, duplicates; through an endpoint also teacherPromptTokens,
teacherCompletionTokens, teacherHttpRequests, teacherRetries (result.json: `teacherEndpoint`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..answers import normalize_number
from ..chat import Message, render_messages
from ..constants import TEACHER_API_KEY_ENV
from ..data import load_examples
from ..endpoints import Endpoint
from ..engines.base import GenerationParams
from ..errors import DataError
from ..runtime import StageContext, StageOutcome
from ..storage import display_name, json_type_name, read_jsonl

AUGMENTED = "augmented.jsonl"

# LLM2LLM's teacher instructions (SqueezeAILab/LLM2LLM GSM8K/prompt_gsm.txt), in our words.
TEACHER_SYSTEM = """\
You are an educational assistant. You take math problems that students got wrong and write new \
practice problems that train the same skills and techniques as the original.

Requirements:
1. A language model must be able to solve the problem in text alone: no drawings, audio, or \
actions in the world.
2. Write the problem in English.
3. Keep each problem with its solution under 100 words.
4. The final answer is a single number: a decimal rather than a fraction (0.5, not 1/2), and \
without units (6, not 6 cups).
5. Always show the calculation that leads to the answer.
6. Make no mathematical mistakes.
7. Do not copy the original problem: change the names, the numbers and the story, keeping the \
kind of reasoning it needs, so that the student's understanding is tested, not their memory.

Always write each problem in this form:
1. Question: [QUESTION]
Answer: [CALCULATION]
#### [ANSWER]"""

USER_TEMPLATE = """\
The student was given this question:

{question}

The answer key gives this reasoning and answer:

{answer}

Please write {k} similar question{s}, each with its worked calculation and final answer."""

# A one-shot demonstration of the exchange (our own problem), so the format is shown, not only told.
DEMO_QUESTION = ("A baker makes 24 muffins. She sells half of them in the morning and 5 more in the "
                 "afternoon. How many muffins are left?")
DEMO_ANSWER = ("In the morning she sells 24 / 2 = 12 muffins.\nIn all she sells 12 + 5 = 17 muffins.\n"
               "24 - 17 = 7 muffins are left.\n#### 7")
DEMO_REPLY = ("1. Question: A florist has 36 roses. He sells a third of them before noon and 8 more "
              "after noon. How many roses does he have left?\nAnswer: Before noon he sells 36 / 3 = 12 "
              "roses. In all he sells 12 + 8 = 20 roses. He has 36 - 20 = 16 roses left.\n#### 16")
MORE_TEMPLATE = ("Now write {m} more question{s}, different from the ones above, each with its worked "
                 "calculation and final answer.")


def _plural(k: int) -> str:
    return "" if k == 1 else "s"


def teacher_messages(question: str, answer_key: str, k: int) -> list[Message]:
    return [
        {"role": "system", "content": TEACHER_SYSTEM},
        {"role": "user", "content": USER_TEMPLATE.format(question=DEMO_QUESTION, answer=DEMO_ANSWER, k=1, s="")},
        {"role": "assistant", "content": DEMO_REPLY},
        {"role": "user", "content": USER_TEMPLATE.format(question=question.strip(), answer=answer_key.strip(),
                                                         k=k, s=_plural(k))},
    ]


def more_messages(first: list[Message], accepted: Sequence["Item"], missing: int) -> list[Message]:
    """The follow-up request: the accepted items as the teacher's reply, then "m more"."""
    if not accepted:
        return list(first)  # nothing survived: ask the same again (a fresh sample)
    reply = "\n\n".join(f"{i}. Question: {it.question}\nAnswer: {it.solution}\n#### {it.final}"
                        for i, it in enumerate(accepted, 1))
    return list(first) + [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": MORE_TEMPLATE.format(m=missing, s=_plural(missing))},
    ]


# --------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class Item:
    question: str
    solution: str
    final: str                  # normalized number

    @property
    def answer(self) -> str:
        return f"{self.solution}\n#### {self.final}"


_ITEM_START = re.compile(r"(?:^|\n)[ \t]*(?:\d{1,3}[ \t]*[.)][ \t]*)?(?:\*\*)?Question(?:\*\*)?[ \t]*:(?:\*\*)?",
                         re.IGNORECASE)
# The final answer right after "####": "42", "$1,200", "-3.5", "3/4" (trailing words allowed).
_FINAL_NUMBER = re.compile(r"\s*([-+]?\$?[-+]?(?:\d[\d,]*)?\.?\d+(?:/\d+)?)")
_ANSWER = re.compile(r"(?:\*\*)?Answer(?:\*\*)?[ \t]*:(?:\*\*)?", re.IGNORECASE)


def parse_teacher_output(text: str, truncated: bool = False) -> tuple[list[Item], int]:
    """Items in a teacher reply and the number of malformed ones.

    An item is `Question: … Answer: … #### N` (optionally numbered "1." / "2)"): a non-empty
    question, a non-empty worked solution, and a number after `####`. Text before the first
    "Question:" (a preamble) is ignored. A reply with no item at all counts as one malformed
    item; when the reply was cut off by the token limit (`truncated`), its last item is likely
    incomplete and is dropped as malformed (as the LLM2LLM code does).
    """
    starts = list(_ITEM_START.finditer(text))
    if not starts:
        return [], 1
    chunks = [text[m.end(): (starts[i + 1].start() if i + 1 < len(starts) else len(text))]
              for i, m in enumerate(starts)]
    items: list[Item] = []
    malformed = 0
    for i, chunk in enumerate(chunks):
        if truncated and i == len(chunks) - 1:
            malformed += 1
            continue
        item = _parse_item(chunk)
        if item is None:
            malformed += 1
        else:
            items.append(item)
    return items, malformed


def _parse_item(chunk: str) -> Item | None:
    m = _ANSWER.search(chunk)
    if not m:
        return None
    question = chunk[: m.start()].strip()
    rest = chunk[m.end():]
    mark = rest.find("####")
    if mark < 0:
        return None
    solution = rest[:mark].strip()
    final_line = rest[mark + 4:].strip().split("\n", 1)[0]
    number = _FINAL_NUMBER.match(final_line)
    final = normalize_number(number.group(1)) if number else None
    if not question or not solution or final is None:
        return None
    return Item(question, solution, final)


# --------------------------------------------------------------------------- ROUGE-L dedup
class RougeDeduper:
    """Rejects a question whose ROUGE-L F-measure against any known question exceeds `threshold`.

    ROUGE-L F = 2·LCS / (|a| + |b|) (tokens as rouge-score tokenizes them). Two exact upper bounds
    skip most pairs before the LCS: LCS ≤ min(|a|, |b|), and LCS ≤ the multiset overlap of the
    tokens. Only a pair whose bound exceeds the threshold is scored with `RougeScorer`, so the
    result is exactly rouge-score's, at a fraction of the cost.
    """

    def __init__(self, threshold: float, questions: Iterable[str] = ()):
        from rouge_score import rouge_scorer, tokenizers

        self.threshold = threshold
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self.tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
        self.known: list[tuple[str, int, Counter]] = []
        for q in questions:
            self.add(q)

    def _tokens(self, text: str) -> tuple[int, Counter]:
        toks = self.tokenizer.tokenize(text)
        return len(toks), Counter(toks)

    def add(self, question: str) -> None:
        n, bag = self._tokens(question)
        self.known.append((question, n, bag))

    def max_score(self, question: str, floor: float = 0.0) -> float:
        """The highest ROUGE-L F of `question` against the known questions when it exceeds
        `floor`; otherwise some value ≤ `floor` (pairs that provably cannot beat it are skipped)."""
        n, bag = self._tokens(question)
        best = 0.0
        for text, m, other in self.known:
            bar = max(best, floor)
            if n + m == 0 or 2 * min(n, m) / (n + m) <= bar:
                continue
            if 2 * sum((bag & other).values()) / (n + m) <= bar:
                continue
            best = max(best, self.scorer.score(text, question)["rougeL"].fmeasure)
        return best

    def is_duplicate(self, question: str) -> bool:
        return self.max_score(question, floor=self.threshold) > self.threshold


# --------------------------------------------------------------------------- the loop
@dataclass
class WrongExample:
    id: str
    question: str
    answer_key: str
    accepted: list[Item] = field(default_factory=list)


# messages of each request → (reply text, finish reason) of each, in order
Teacher = Callable[[list[list[Message]], int], list[tuple[str, str | None]]]


def augment_examples(wrong: Sequence[WrongExample], k: int, retries: int, dedup: RougeDeduper,
                     teacher: Teacher) -> dict[str, int]:
    """Fill each example's `accepted` with up to k new items; returns the counts.

    `teacher(requests, attempt)` answers a batch of requests (one batched generate call).
    """
    stats = Counter(requests=0, malformed=0, duplicates=0, parsed=0)
    first = {ex.id: teacher_messages(ex.question, ex.answer_key, k) for ex in wrong}
    pending = list(wrong)
    for attempt in range(retries + 1):
        if not pending:
            break
        requests = [first[ex.id] if attempt == 0 else more_messages(first[ex.id], ex.accepted, k - len(ex.accepted))
                    for ex in pending]
        replies = teacher(requests, attempt)
        stats["requests"] += len(requests)
        for ex, (text, finish) in zip(pending, replies, strict=True):
            items, bad = parse_teacher_output(text, truncated=finish == "length")
            stats["malformed"] += bad
            stats["parsed"] += len(items)
            for item in items:
                if len(ex.accepted) >= k:
                    break
                if dedup.is_duplicate(item.question):
                    stats["duplicates"] += 1
                    continue
                dedup.add(item.question)
                ex.accepted.append(item)
        pending = [ex for ex in pending if len(ex.accepted) < k]
    return dict(stats)


# --------------------------------------------------------------------------- inputs
def load_wrong(ctx: StageContext) -> tuple[list[WrongExample], list[str], int]:
    """The wrong seed predictions with their answer keys, the seed questions, and the number of
    prediction rows."""
    task = ctx.task
    uri = task.inputs.predictions
    assert uri
    seed: dict[str, Any] = {}
    if task.inputs.seed:
        seed = {ex.id: ex for ex in load_examples(ctx.storage_for(task.inputs.seed), task.inputs.seed,
                                                  require_answer=True)}
    shown = display_name(uri)
    wrong: list[WrongExample] = []
    rows = 0
    for lineno, obj in read_jsonl(ctx.storage_for(uri), uri):
        where = f"{shown}:{lineno}"
        rows += 1
        raw_id = obj.get("id")
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
            raise DataError(f'{where}: "id" must be a string or integer, got {json_type_name(raw_id)}')
        question = obj.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f'{where}: missing "question"')
        correct = obj.get("correct")
        if not isinstance(correct, bool):
            raise DataError(f'{where}: "correct" must be true or false, got {json_type_name(correct)}')
        if correct:
            continue
        sid = str(raw_id)
        if sid in seed:
            key = seed[sid].answer
        else:
            key = next((obj[f] for f in ("reference", "answer") if isinstance(obj.get(f), str) and obj[f].strip()), None)
            if key is None:
                gold = obj.get("gold")
                if gold is None or isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
                    raise DataError(f'{where}: a wrong prediction needs "gold" (or its seed example) '
                                    "to show the teacher the answer")
                key = f"#### {gold}"
        wrong.append(WrongExample(sid, question, key))
    return wrong, [ex.question for ex in seed.values()], rows


def load_existing_questions(ctx: StageContext) -> list[str]:
    out: list[str] = []
    for uri in ctx.task.inputs.existing:
        shown = display_name(uri)
        for lineno, obj in read_jsonl(ctx.storage_for(uri), uri):
            q = obj.get("question")
            if not isinstance(q, str) or not q.strip():
                raise DataError(f'{shown}:{lineno}: missing "question"')
            out.append(q)
    return out


# --------------------------------------------------------------------------- the stage
def run(ctx: StageContext) -> StageOutcome:
    task = ctx.task
    spec = task.augment
    assert spec is not None
    wrong, seed_questions, n_predictions = load_wrong(ctx)
    existing = load_existing_questions(ctx)
    k = spec.per_example
    ctx.log.info(f"{len(wrong)} of {n_predictions} seed predictions are wrong; asking for {k} new example(s) each")

    dedup = RougeDeduper(spec.rouge_threshold,
                         [*seed_questions, *existing, *(ex.question for ex in wrong)])
    stats: dict[str, int] = {"requests": 0, "malformed": 0, "duplicates": 0, "parsed": 0}
    endpoint = task.model.teacher_endpoint
    teacher_uri = task.model.teacher or task.model.base
    served: dict[str, Any] = {}
    if wrong and endpoint is not None:
        stats, served = _augment_through(ctx, endpoint, wrong, k, dedup)
    elif wrong:
        from ..engines import load_engine

        engine = load_engine(task.engine, ctx.local_dir(teacher_uri), gpus=task.gpus, seed=task.round,
                             enable_lora=False)
        try:
            def teacher(requests: list[list[Message]], attempt: int) -> list[tuple[str, str | None]]:
                prompts = [render_messages(engine.tokenizer, r, use_template=task.prompting.chat_template)
                           for r in requests]
                params = GenerationParams(n=1, temperature=spec.temperature, max_tokens=spec.max_tokens,
                                          seed=task.round * 1000 + attempt)
                ctx.log.info(f"teacher: {len(prompts)} requests (attempt {attempt + 1})")
                outs = engine.generate(prompts, params,
                                       progress=lambda d, t: ctx.progress(d, t, "teacher requests"))
                return [(o.completions[0].text, o.completions[0].finish_reason) for o in outs]

            stats = augment_examples(wrong, k, spec.retries, dedup, teacher)
        finally:
            engine.close()

    rows = [{"id": f"aug-r{task.round}-{ex.id}-{j}", "question": it.question, "answer": it.answer, "source": ex.id}
            for ex in wrong for j, it in enumerate(ex.accepted)]
    ctx.writer.write_jsonl(AUGMENTED, rows)
    short = sum(1 for ex in wrong if len(ex.accepted) < k)
    ctx.log.info(f"{len(rows)} new examples; {stats['malformed']} malformed, {stats['duplicates']} duplicates, "
                 f"{short} seed examples short of {k}")
    teacher_name = (f"{endpoint.url} ({endpoint.model})" if endpoint is not None else teacher_uri) if wrong else None
    return StageOutcome(
        metrics={"wrong": len(wrong), "requested": len(wrong) * k, "augmented": len(rows),
                 "malformed": stats["malformed"], "duplicates": stats["duplicates"], **served.get("metrics", {})},
        outputs={"augmented": AUGMENTED},
        details={"predictions": n_predictions, "teacher": teacher_name,
                 "teacherRequests": stats["requests"], "parsedItems": stats["parsed"],
                 "shortExamples": short, "existingQuestions": len(existing) + len(seed_questions),
                 **({"teacherEndpoint": served["details"]} if served else {})},
    )


def _augment_through(ctx: StageContext, endpoint: Endpoint, wrong: list[WrongExample], k: int,
                     dedup: RougeDeduper) -> tuple[dict[str, int], dict[str, Any]]:
    """The teacher loop against `model.teacherEndpoint`: the same messages the local teacher's
    chat template renders, the same per-attempt seeds; no weights load."""
    from ..endpoint_client import EndpointClient

    task = ctx.task
    spec = task.augment
    assert spec is not None
    with EndpointClient(endpoint, field="model.teacherEndpoint", api_key_env=TEACHER_API_KEY_ENV) as client:
        def teacher(requests: list[list[Message]], attempt: int) -> list[tuple[str, str | None]]:
            ctx.log.info(f"teacher: {len(requests)} requests to {endpoint.url} (attempt {attempt + 1})")
            replies = client.chat(requests, temperature=spec.temperature, max_tokens=spec.max_tokens,
                                  seed=task.round * 1000 + attempt,
                                  progress=lambda d, t: ctx.progress(d, t, "teacher requests"))
            return [(r.text, r.finish_reason) for r in replies]

        stats = augment_examples(wrong, k, spec.retries, dedup, teacher)
    return stats, {"metrics": client.stats.metrics("teacher"), "details": client.stats.details(endpoint)}
