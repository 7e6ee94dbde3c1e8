"""The `augment` stage (LLM2LLM, shared/research/methods.md §2): new examples for the seed
examples the student got wrong.

1. Read the evaluation's seed predictions (`inputs.predictions`: rows with `id`, `question`,
   `correct`, and `gold`) and keep the wrong ones. The answer key shown to the teacher is the
   seed example's full solution (`inputs.seed`, by id), else the row's `reference`/`answer`,
   else just the gold answer.
2. Ask the teacher (`model.teacher`, else the base model; never an adapter) for
   `augment.perExample` new examples per wrong one, with LLM2LLM's educational-assistant prompt
   (or the user's `augment.instructions`; `augment.exemplar: false` drops the one-shot exchange,
   for other kinds of question or a teacher with a short context) — all requests of an attempt
   in one batched call. With `model.teacherEndpoint` the same messages go to the served model
   (`endpoint_client`, at most maxConcurrency at a time) and no weights load. Each request is
   seeded by its seed example's id and the attempt (`prompt_seed(round·1000 + attempt, id)`), so
   a question gets the same replies in any batch.
3. Parse `Question: … Answer: … #### X` items (numbered or not); count and drop malformed ones
   (and a last item cut off by the token limit). X must be an answer of the task's type
   (`prompting.answer`): a number for `number` (and `regex`, as before), one of the option
   letters `choices` for `choice` — classification tasks (SNIPS, TREC, SST-2 in LLM2LLM) written
   as lettered options; there the teacher is told to keep the original's options and answer with
   a letter. An item whose X is not a valid answer is dropped and counted (`invalidAnswers`).
4. Drop an item whose question has ROUGE-L F > `augment.rougeThreshold` against an existing
   question (the seed set, every earlier augmented file `inputs.existing`, the wrong questions)
   or an item already accepted for the same seed example.
5. For seed examples still short of k, ask again up to `augment.retries` times, showing the
   accepted items and asking for "n more, different ones" (as the LLM2LLM code does).
6. Then, over all seed examples in input order, drop an item too similar to one accepted for an
   earlier seed example (`crossDuplicates`, also counted in `duplicates`).
7. With `augment.filters`, the surviving items pass those filters in order, as the filter stage
   runs them (`stages/filter.py`; each item a candidate whose text is its worked solution and
   whose answer is its own, vote-free): e.g. an AlpaGasus judge at `minScore: 4.5` keeps only the
   items the judge (model.judge, model.judgeEndpoint, else the teacher) rates that high. What a
   filter drops is in `rejected.jsonl` with the filter that dropped it and its scores; the
   kept items keep their scores in `augmented.jsonl`. A filter that keeps nothing leaves the
   round without new examples (a warning, not a failure: the seed set still trains).

Why steps 4-6 are split (sharding, docs/architecture.md "Sharded stages"): steps 1-5 of one seed
example depend only on that example and the existing questions, never on what the teacher wrote
for other examples, so `resources.shards` can split the wrong examples over pods (each takes its
`StageContext.shard_rows` slice of them and commits `candidates.jsonl`) and step 6, the only
global and order-dependent part, runs once in the merge, in the seed examples' order. A one-shard
run does the same two steps in one process, so N shards write byte for byte what one writes.
The price, compared with a dedup that is global from the start: a retry does not replace an item
that step 6 drops later (a seed example whose item repeats another example's is left short);
items so alike across seed examples (ROUGE-L > 0.95 by default) are rare.

Output `augmented.jsonl`: `{"id", "question", "answer": "<solution>\\n#### X", "source": <seed id>}`
— GSM8K's labeled shape, so the train stage reads it like the seed. Metrics: wrong, requested,
augmented, malformed, invalidAnswers, duplicates; through an endpoint also teacherPromptTokens,
teacherCompletionTokens, teacherHttpRequests, teacherRetries (result.json: `teacherEndpoint`).
"""

from __future__ import annotations

import json
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
from ..spec import AnswerSpec
from ..storage import display_name, json_type_name, read_jsonl

AUGMENTED = "augmented.jsonl"
REJECTED = "rejected.jsonl"  # what augment.filters dropped, with the filter and its scores
# A shard's accepted items before the cross-example dedup (step 6), in its seed examples' order.
CANDIDATES = "candidates.jsonl"

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

# The same instructions for a classification task whose answers are option letters (LLM2LLM's
# SNIPS / TREC / SST-2 prompts ask for a new text with its label; here the label is the letter of
# the original's option, which is what the student is evaluated on).
TEACHER_SYSTEM_CHOICE = """\
You are an educational assistant. You take classification questions that students got wrong and \
write new practice questions that test the same distinction as the original.

Requirements:
1. A language model must be able to answer the question from its text alone.
2. Write the question in English.
3. Keep each question with its explanation under 100 words.
4. Keep the original's options with their letters, in the same order, and write a new text to \
classify.
5. The final answer is the letter of the correct option, one of {labels}, and nothing else.
6. Always explain briefly why that option is correct.
7. Do not copy the original question: write a new text that needs the same kind of judgement, so \
that the student's understanding is tested, not their memory.

Always write each question in this form:
1. Question: [QUESTION WITH ITS OPTIONS]
Answer: [EXPLANATION]
#### [LETTER]"""

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
# The choice demonstration, with the task's first two option letters ({a}, {b}).
DEMO_CHOICE_QUESTION = ('Which sentiment does this review express? "The soup was cold and the waiter '
                        'ignored us all evening." ({a}) positive ({b}) negative')
DEMO_CHOICE_ANSWER = "The review complains about the food and the service, so it is negative.\n#### {b}"
DEMO_CHOICE_REPLY = ('1. Question: Which sentiment does this review express? "The staff were friendly '
                     'and the cake was the best we have had." ({a}) positive ({b}) negative\nAnswer: The '
                     "review praises the staff and the food, so it is positive.\n#### {a}")
MORE_TEMPLATE = ("Now write {m} more question{s}, different from the ones above, each with its worked "
                 "calculation and final answer.")


def _plural(k: int) -> str:
    return "" if k == 1 else "s"


# --------------------------------------------------------------------------- answer types
@dataclass(frozen=True)
class AnswerFormat:
    """What follows `####` in a teacher's item: a number, or one of the task's option letters."""

    labels: str = ""            # the option letters of a `choice` task; empty: a number

    @classmethod
    def of(cls, spec: AnswerSpec) -> "AnswerFormat":
        # `regex` tasks keep the numeric format they always had here
        return cls(labels=spec.choices.upper()) if spec.type == "choice" else cls()

    def read(self, final_line: str) -> str | None:
        """The answer in the text after `####` (its first line), normalized; None when it is
        not an answer of this type (a word, or a letter outside the labels)."""
        if not self.labels:
            number = _FINAL_NUMBER.match(final_line)
            return normalize_number(number.group(1)) if number else None
        # "B", "(B)", "B.", "B) negative"; not "Blue" (a word) nor "negative" (an option's text)
        m = re.fullmatch(r"\s*\(?([A-Za-z])\)?(?:[.):]\s.*|[.):])?\s*", final_line)
        letter = m.group(1).upper() if m else None
        return letter if letter is not None and letter in self.labels else None


NUMBER = AnswerFormat()


@dataclass(frozen=True)
class TeacherPrompt:
    """How the teacher is asked (`augment.instructions`, `augment.exemplar`)."""

    instructions: str | None = None   # the system message; None: LLM2LLM's for the answer type
    exemplar: bool = True             # the one-shot worked exchange before the request

    @classmethod
    def of(cls, spec: Any) -> "TeacherPrompt":
        return cls(instructions=spec.instructions, exemplar=spec.exemplar)


LLM2LLM_PROMPT = TeacherPrompt()


def teacher_messages(question: str, answer_key: str, k: int, fmt: AnswerFormat = NUMBER,
                     prompt: TeacherPrompt = LLM2LLM_PROMPT) -> list[Message]:
    if fmt.labels:
        a, b = fmt.labels[0], fmt.labels[1]
        system = TEACHER_SYSTEM_CHOICE.format(labels=", ".join(fmt.labels))
        demo_q, demo_a = DEMO_CHOICE_QUESTION.format(a=a, b=b), DEMO_CHOICE_ANSWER.format(a=a, b=b)
        demo_reply = DEMO_CHOICE_REPLY.format(a=a, b=b)
    else:
        system, demo_q, demo_a, demo_reply = TEACHER_SYSTEM, DEMO_QUESTION, DEMO_ANSWER, DEMO_REPLY
    demo: list[Message] = [
        {"role": "user", "content": USER_TEMPLATE.format(question=demo_q, answer=demo_a, k=1, s="")},
        {"role": "assistant", "content": demo_reply},
    ] if prompt.exemplar else []
    return [
        {"role": "system", "content": prompt.instructions.strip() if prompt.instructions else system},
        *demo,
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
    final: str                  # normalized number, or an option letter

    @property
    def answer(self) -> str:
        return f"{self.solution}\n#### {self.final}"


@dataclass(frozen=True)
class Parsed:
    items: list[Item]
    malformed: int              # not `Question: … Answer: … ####` (or cut off)
    invalid: int                # well formed, but `####` is not followed by an answer of the type


_ITEM_START = re.compile(r"(?:^|\n)[ \t]*(?:\d{1,3}[ \t]*[.)][ \t]*)?(?:\*\*)?Question(?:\*\*)?[ \t]*:(?:\*\*)?",
                         re.IGNORECASE)
# The final answer right after "####": "42", "$1,200", "-3.5", "3/4" (trailing words allowed).
_FINAL_NUMBER = re.compile(r"\s*([-+]?\$?[-+]?(?:\d[\d,]*)?\.?\d+(?:/\d+)?)")
_ANSWER = re.compile(r"(?:\*\*)?Answer(?:\*\*)?[ \t]*:(?:\*\*)?", re.IGNORECASE)


def parse_teacher_reply(text: str, truncated: bool = False, fmt: AnswerFormat = NUMBER) -> Parsed:
    """The items in a teacher reply, and the malformed and invalid ones.

    An item is `Question: … Answer: … #### X` (optionally numbered "1." / "2)"): a non-empty
    question, a non-empty worked solution, `####`; it is invalid when X is not an answer of
    `fmt` (`AnswerFormat.read`). Text before the first "Question:" (a preamble) is ignored. A
    reply with no item at all counts as one malformed item; when the reply was cut off by the
    token limit (`truncated`), its last item is likely incomplete and is dropped as malformed
    (as the LLM2LLM code does).
    """
    starts = list(_ITEM_START.finditer(text))
    if not starts:
        return Parsed([], 1, 0)
    chunks = [text[m.end(): (starts[i + 1].start() if i + 1 < len(starts) else len(text))]
              for i, m in enumerate(starts)]
    items: list[Item] = []
    malformed = invalid = 0
    for i, chunk in enumerate(chunks):
        if truncated and i == len(chunks) - 1:
            malformed += 1
            continue
        parts = _split_item(chunk)
        if parts is None:
            malformed += 1
            continue
        final = fmt.read(parts[2])
        if final is None:
            invalid += 1
        else:
            items.append(Item(parts[0], parts[1], final))
    return Parsed(items, malformed, invalid)


def parse_teacher_output(text: str, truncated: bool = False) -> tuple[list[Item], int]:
    """A numeric task's items and the number of dropped ones (malformed or without a number)."""
    parsed = parse_teacher_reply(text, truncated)
    return parsed.items, parsed.malformed + parsed.invalid


def _split_item(chunk: str) -> tuple[str, str, str] | None:
    """(question, solution, the first line after `####`), or None when one is missing."""
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
    if not question or not solution:
        return None
    return question, solution, final_line


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

    def fresh(self) -> "RougeDeduper":
        """An empty deduper with the same threshold (and scorer: building one is not free)."""
        other = object.__new__(RougeDeduper)
        other.threshold, other.scorer, other.tokenizer = self.threshold, self.scorer, self.tokenizer
        other.known = []
        return other

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


class TeacherBatch(list[list[Message]]):
    """One attempt's requests (each a conversation), with `ids`: the seed example of each, which
    keys its sampling seed, so a request samples the same in any batch or shard."""

    def __init__(self, requests: Iterable[list[Message]], ids: Iterable[str]):
        super().__init__(requests)
        self.ids = list(ids)


# a batch of requests and the attempt → (reply text, finish reason) of each, in order
Teacher = Callable[[TeacherBatch, int], list[tuple[str, str | None]]]
STAT_KEYS = ("requests", "malformed", "invalid", "duplicates", "parsed")


def augment_examples(wrong: Sequence[WrongExample], k: int, retries: int, dedup: RougeDeduper,
                     teacher: Teacher, fmt: AnswerFormat = NUMBER,
                     prompt: TeacherPrompt = LLM2LLM_PROMPT) -> dict[str, int]:
    """Fill each example's `accepted` with up to k new items (steps 2-5); returns the counts.

    `teacher(requests, attempt)` answers a batch of requests (one batched generate call).
    `dedup` holds the existing questions and is only read: an item is checked against it and
    against the items accepted for its own example, so what one example gets never depends on
    the others in the batch (or the shard).
    """
    stats = Counter(dict.fromkeys(STAT_KEYS, 0))
    first = {ex.id: teacher_messages(ex.question, ex.answer_key, k, fmt, prompt) for ex in wrong}
    own = {ex.id: dedup.fresh() for ex in wrong}
    pending = list(wrong)
    for attempt in range(retries + 1):
        if not pending:
            break
        requests = TeacherBatch((first[ex.id] if attempt == 0 else more_messages(first[ex.id], ex.accepted,
                                                                                   k - len(ex.accepted))
                                 for ex in pending), (ex.id for ex in pending))
        replies = teacher(requests, attempt)
        stats["requests"] += len(requests)
        for ex, (text, finish) in zip(pending, replies, strict=True):
            parsed = parse_teacher_reply(text, truncated=finish == "length", fmt=fmt)
            stats["malformed"] += parsed.malformed
            stats["invalid"] += parsed.invalid
            stats["parsed"] += len(parsed.items)
            for item in parsed.items:
                if len(ex.accepted) >= k:
                    break
                if dedup.is_duplicate(item.question) or own[ex.id].is_duplicate(item.question):
                    stats["duplicates"] += 1
                    continue
                own[ex.id].add(item.question)
                ex.accepted.append(item)
        pending = [ex for ex in pending if len(ex.accepted) < k]
    return dict(stats)


def dedup_across(groups: Sequence[tuple[str, Sequence[Item]]], threshold: float) -> tuple[list[tuple[str, list[Item]]], int]:
    """Step 6, in the given (input) order: an item whose question is too similar to one kept for an
    earlier seed example is dropped. Returns the kept items per example and the number dropped.

    The existing questions need no second look (every item was checked against them), and the
    items of one example not against each other: the deduper holds both, which only ever
    re-confirms what `augment_examples` found, because ROUGE-L F is symmetric.
    """
    seen = RougeDeduper(threshold)
    kept: list[tuple[str, list[Item]]] = []
    dropped = 0
    for source, items in groups:
        mine: list[Item] = []
        for item in items:
            if seen.is_duplicate(item.question):
                dropped += 1
                continue
            seen.add(item.question)
            mine.append(item)
        kept.append((source, mine))
    return kept, dropped


# --------------------------------------------------------------------------- inputs
def load_wrong(ctx: StageContext, fmt: AnswerFormat = NUMBER) -> tuple[list[WrongExample], list[str], int]:
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
    lines: dict[str, int] = {}      # wrong example id → its line
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
        if sid in lines:
            # its new rows' ids (and its seeds) would collide with the first one's
            raise DataError(f'{where}: "id" {sid!r} repeats line {lines[sid]}')
        lines[sid] = lineno
        if sid in seed:
            key = seed[sid].answer
        else:
            key = next((obj[f] for f in ("reference", "answer") if isinstance(obj.get(f), str) and obj[f].strip()), None)
            if key is None:
                gold = obj.get("gold")
                if gold is None or isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
                    raise DataError(f'{where}: a wrong prediction needs "gold" (or its seed example) '
                                    "to show the teacher the answer")
                label = fmt.read(str(gold)) if fmt.labels else str(gold)
                if label is None:
                    # the teacher would be shown (and copy) an answer the student can never give
                    raise DataError(f'{where}: "gold" {str(gold)[:40]!r} is not one of the options '
                                    f'{", ".join(fmt.labels)} (prompting.answer.choices)')
                key = f"#### {label}"
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
    """Steps 1-5 for this shard's wrong examples (all of them unsharded); unsharded also step 6,
    which a sharded stage leaves to `merge`."""
    task = ctx.task
    spec = task.augment
    assert spec is not None
    fmt = AnswerFormat.of(task.prompting.answer)
    all_wrong, seed_questions, n_predictions = load_wrong(ctx, fmt)
    existing = load_existing_questions(ctx)
    wrong = ctx.shard_rows(all_wrong)
    k = spec.per_example
    where = f" (shard {ctx.shard}: {len(wrong)} of them)" if ctx.shard is not None else ""
    ctx.log.info(f"{len(all_wrong)} of {n_predictions} seed predictions are wrong{where}; "
                 f"asking for {k} new example(s) each")

    # Every shard checks against all the wrong questions, not only its own: the same set one run uses.
    dedup = RougeDeduper(spec.rouge_threshold,
                         [*seed_questions, *existing, *(ex.question for ex in all_wrong)])
    stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
    endpoint = task.model.teacher_endpoint
    teacher_uri = task.model.teacher or task.model.base
    served: dict[str, Any] = {}
    if wrong and endpoint is not None:
        stats, served = _augment_through(ctx, endpoint, wrong, k, dedup, fmt)
    elif wrong:
        from ..engines import load_engine

        engine = load_engine(task.engine, ctx.local_dir(teacher_uri), gpus=task.gpus, seed=task.round,
                             enable_lora=False)
        try:
            def teacher(requests: TeacherBatch, attempt: int) -> list[tuple[str, str | None]]:
                prompts = [render_messages(engine.tokenizer, r, use_template=task.prompting.chat_template)
                           for r in requests]
                params = GenerationParams(n=1, temperature=spec.temperature, max_tokens=spec.max_tokens,
                                          seed=task.round * 1000 + attempt, seed_keys=tuple(requests.ids))
                ctx.log.info(f"teacher: {len(prompts)} requests (attempt {attempt + 1})")
                outs = engine.generate(prompts, params,
                                       progress=lambda d, t: ctx.progress(d, t, "teacher requests"))
                return [(o.completions[0].text, o.completions[0].finish_reason) for o in outs]

            stats = augment_examples(wrong, k, spec.retries, dedup, teacher, fmt, TeacherPrompt.of(spec))
        finally:
            engine.close()

    teacher_name = (f"{endpoint.url} ({endpoint.model})" if endpoint is not None else teacher_uri) if wrong else None
    part = {"wrong": len(wrong), "predictions": n_predictions, "teacher": teacher_name,
            "existingQuestions": len(existing) + len(seed_questions), "labels": fmt.labels or None,
            **{f"{key}Count": stats[key] for key in STAT_KEYS},
            **({"teacherEndpoint": served["details"]} if served else {})}
    if ctx.shard is not None:
        ctx.writer.write_jsonl(CANDIDATES, [_candidate_row(ex.id, it) for ex in wrong for it in ex.accepted])
        return StageOutcome(
            metrics={"wrong": len(wrong), "candidates": sum(len(ex.accepted) for ex in wrong),
                     **served.get("metrics", {})},
            outputs={"candidates": CANDIDATES}, details=part)
    return _finish(ctx, [(ex.id, ex.accepted) for ex in wrong], [part])


def merge(ctx: StageContext, shard_dirs: list[str]) -> StageOutcome:
    """Step 6 over the shards' candidates, in shard order (each shard holds a contiguous slice of
    the wrong examples, in input order): exactly what one run does after its step 5."""
    from ..runtime import shard_details
    from ..storage import read_committed

    groups: list[tuple[str, list[Item]]] = []
    for d in shard_dirs:
        where = display_name(d.rstrip("/") + "/" + CANDIDATES)
        for lineno, line in enumerate(read_committed(ctx.storage, d, CANDIDATES).decode().splitlines(), 1):
            if not line.strip():
                continue
            source, item = _read_candidate(json.loads(line), f"{where}:{lineno}")
            if not groups or groups[-1][0] != source:
                groups.append((source, []))
            groups[-1][1].append(item)
    return _finish(ctx, groups, shard_details(ctx, shard_dirs))


def _candidate_row(source: str, item: Item) -> dict[str, Any]:
    return {"source": source, "question": item.question, "solution": item.solution, "final": item.final}


def _read_candidate(obj: Any, where: str) -> tuple[str, Item]:
    if not isinstance(obj, dict) or not all(isinstance(obj.get(f), str) for f in ("source", "question", "solution", "final")):
        raise DataError(f"{where}: a candidate needs string source, question, solution and final")
    return obj["source"], Item(obj["question"], obj["solution"], obj["final"])


def _finish(ctx: StageContext, groups: list[tuple[str, list[Item]]], parts: list[dict[str, Any]]) -> StageOutcome:
    """The stage's outcome from the accepted items per wrong example (in input order) and the
    counts of the process (unsharded) or of each shard: one function for both, so they agree."""
    task = ctx.task
    spec = task.augment
    assert spec is not None
    k = spec.per_example
    kept, across = dedup_across(groups, spec.rouge_threshold)
    rows = [{"id": f"aug-r{task.round}-{source}-{j}", "question": it.question, "answer": it.answer, "source": source}
            for source, items in kept for j, it in enumerate(items)]
    steps: list[dict[str, Any]] = []
    filter_metrics: dict[str, Any] = {}
    if spec.filters:
        rows, steps, filter_metrics = _filter_items(ctx, rows)
    ctx.writer.write_jsonl(AUGMENTED, rows)
    total = {key: sum(int(p.get(f"{key}Count", 0)) for p in parts) for key in STAT_KEYS}
    wrong = sum(int(p.get("wrong", 0)) for p in parts)
    short = wrong - sum(1 for _, items in kept if len(items) >= k)
    duplicates = total["duplicates"] + across
    ctx.log.info(f"{len(rows)} new examples; {total['malformed']} malformed, {total['invalid']} invalid answers, "
                 f"{duplicates} duplicates ({across} across seed examples), {short} seed examples short of {k}")
    endpoints = [p["teacherEndpoint"] for p in parts if p.get("teacherEndpoint")]
    served = _sum_endpoint(endpoints) if endpoints else None
    first = parts[0] if parts else {}
    teacher = next((p["teacher"] for p in parts if p.get("teacher")), None)
    details: dict[str, Any] = {
        "predictions": first.get("predictions", 0), "teacher": teacher,
        "teacherRequests": total["requests"], "parsedItems": total["parsed"], "shortExamples": short,
        "existingQuestions": first.get("existingQuestions", 0), "crossDuplicates": across,
        "labels": first.get("labels"),
    }
    if served is not None:
        details["teacherEndpoint"] = served
    if steps:
        details["filters"] = steps
    if ctx.shard is None and task.shards > 1:
        details["shards"] = len(parts)
    metrics: dict[str, float | int | str | bool] = {
        "wrong": wrong, "requested": wrong * k, "augmented": len(rows), "malformed": total["malformed"],
        "invalidAnswers": total["invalid"], "duplicates": duplicates}
    if served is not None:
        metrics.update({"teacherPromptTokens": served["promptTokens"], "teacherCompletionTokens": served["completionTokens"],
                        "teacherHttpRequests": served["httpRequests"], "teacherRetries": served["retries"]})
    if steps:
        metrics["filteredOut"] = steps[0]["in"] - len(rows)
        metrics.update(filter_metrics)
    return StageOutcome(metrics=metrics, outputs={"augmented": AUGMENTED}, details=details)


def _filter_items(ctx: StageContext, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Step 7: `augment.filters` over the new examples, the filter stage's own filter functions on
    candidates made from them (one path each, its own answer as the majority, confidence 1);
    returns the kept rows (with their scores), each filter's report, and the metrics the filters
    add (a served judge's tokens). rejected.jsonl gets every dropped row."""
    from ..filter_registry import FILTERS
    from .filter import Candidate, EnginePool, FilterRun

    spec = ctx.task.augment
    assert spec is not None
    by_id = {r["id"]: r for r in rows}
    cands = [Candidate(r["id"], r["question"], 0, r["answer"], final, final, 1.0, 0.0)
             for r in rows for final in [r["answer"].rsplit("####", 1)[-1].strip()]]
    fr = FilterRun(ctx, EnginePool(ctx, lora_for_base=False), validation=[])
    steps: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    try:
        for i, f in enumerate(spec.filters):
            given = cands
            fr.current = i  # no scoring pass here: each filter scores what it is given and keeps its own reports
            if given:
                cands, info = FILTERS[f.kind].load()(fr, given, f.params)
            else:
                info = {}
            kept_ids = {c.id for c in cands}
            rejected.extend({**by_id[c.id], **c.scores, "rejectedBy": f.kind, "filterIndex": i}
                            for c in given if c.id not in kept_ids)
            steps.append({"kind": f.kind, "in": len(given), "out": len(cands), **info})
            ctx.log.info(f"augment filter {f.kind}: {len(given)} → {len(cands)} new examples")
            if given and not cands:
                ctx.log.warning(f"augment.filters[{i}] ({f.kind}) kept none of the {len(given)} new examples: this round "
                                "adds nothing to the training data; loosen the filter (e.g. judge.minScore) if that is "
                                "not what you want")
    finally:
        fr.pool.close()
    ctx.writer.write_jsonl(REJECTED, rejected)
    kept = [{**by_id[c.id], **c.scores} for c in cands]
    return kept, steps, dict(fr.metrics)


def _sum_endpoint(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The shards' `EndpointStats.details` as one: counts and waits summed, wall time the
    longest shard's (they ran in parallel)."""
    out = dict(parts[0])
    for key in ("requests", "httpRequests", "retries", "promptTokens", "completionTokens", "answersWithoutUsage"):
        out[key] = sum(int(p.get(key, 0)) for p in parts)
    retried: Counter = Counter()
    for p in parts:
        retried.update(p.get("retriedBy", {}))
    out["retriedBy"] = dict(sorted(retried.items()))
    out["waitSeconds"] = round(sum(float(p.get("waitSeconds", 0.0)) for p in parts), 3)
    out["seconds"] = round(max(float(p.get("seconds", 0.0)) for p in parts), 3)
    return out


def _augment_through(ctx: StageContext, endpoint: Endpoint, wrong: list[WrongExample], k: int,
                     dedup: RougeDeduper, fmt: AnswerFormat) -> tuple[dict[str, int], dict[str, Any]]:
    """The teacher loop against `model.teacherEndpoint`: the same messages the local teacher's
    chat template renders, the same per-example seeds; no weights load."""
    from ..endpoint_client import EndpointClient

    task = ctx.task
    spec = task.augment
    assert spec is not None
    with EndpointClient(endpoint, field="model.teacherEndpoint", api_key_env=TEACHER_API_KEY_ENV) as client:
        def teacher(requests: TeacherBatch, attempt: int) -> list[tuple[str, str | None]]:
            ctx.log.info(f"teacher: {len(requests)} requests to {endpoint.url} (attempt {attempt + 1})")
            replies = client.chat(requests, temperature=spec.temperature, max_tokens=spec.max_tokens,
                                  seed=task.round * 1000 + attempt, seed_keys=requests.ids,
                                  progress=lambda d, t: ctx.progress(d, t, "teacher requests"))
            return [(r.text, r.finish_reason) for r in replies]

        stats = augment_examples(wrong, k, spec.retries, dedup, teacher, fmt, TeacherPrompt.of(spec))
    return stats, {"metrics": client.stats.metrics("teacher"), "details": client.stats.details(endpoint)}
