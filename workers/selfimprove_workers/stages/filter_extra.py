"""Two filters of the filter stage that need more than the sampled paths (registered in spec.py):

    rewardModel   IWSI's RM baseline: a sequence-classification reward model (one output) scores
                  each candidate, question + path, rendered with the reward model's chat template
                  (user: question, assistant: path) when it has one, else "question\\n\\npath";
                  keeps the top fraction (`keep`) or every candidate scoring ≥ `minScore`.
                  Batched by length with right padding and attention masks: a candidate's score
                  does not depend on what it is batched with.
    correct       STaR / RFT / ReST-EM, when labels exist: the paths whose extracted answer equals
                  the question's gold answer (`data.questions`' "answer", read as data.py reads
                  it; `answers.answers_equal`), one per distinct equation list (RFT, `equation_list`),
                  at most `maxPerQuestion` per question (ReST-EM), earlier paths first. With
                  `rationalize` (STaR), a question none of whose paths is correct is re-prompted
                  with its gold answer as a hint; a rationale reaching the answer is kept with the
                  original question (the prompt it is trained on carries no hint).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..answers import answers_equal, extract_answer
from ..chat import uses_template
from ..data import Example, parse_example
from ..engines.base import GenerationParams
from ..errors import BadInput
from ..storage import display_name, read_jsonl

if TYPE_CHECKING:
    from ..runtime import StageContext
    from ..spec import CorrectFilter, RewardModelFilter
    from .filter import Candidate, FilterRun

# --------------------------------------------------------------------------- equation lists (RFT)
# GSM8K's calculator annotations: "48/2 = <<48/2=24>>24".
_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_NUM = r"\$?\d(?:[\d,]*\d)?(?:\.\d+)?%?"
_OPERAND = rf"\(?\s*{_NUM}\s*\)?"
# `operand (op operand)+ = number`: an arithmetic expression with at least one operator, then
# its result. Operators: + - * / × ÷ x (x only between spaces or digits: "3 x 4", "3x4").
_OP = r"(?:[-+*/×÷]|(?<=[\d\s)])x(?=[\s\d($]))"
_PLAIN_EQUATION = re.compile(rf"(?<![\w.]){_OPERAND}(?:\s*{_OP}\s*{_OPERAND})+\s*=\s*-?{_NUM}")


def _normalize_equation(text: str) -> str:
    out = re.sub(r"\s+", "", text)
    out = re.sub(r"(?<=\d),(?=\d{3})", "", out).replace("$", "")
    return out.replace("×", "*").replace("÷", "/").replace("x", "*")


def equation_list(text: str) -> tuple[str, ...]:
    """The equations of a reasoning path, in order, normalized — RFT's de-duplication key.

    When the path has GSM8K calculator annotations (`<<48/2=24>>`), the list is their contents
    (RFT's own rule: `re.findall(r"<<([^>]*)>>")`, spaces removed). Otherwise it is every plain-text
    `expression = number` in the path, where the expression is numbers joined by at least one of
    + - * / × ÷ x (parentheses allowed): "48 / 2 = 24", "$1,200 × 3 = $3,600". Normalized:
    whitespace, `$` and thousands commas removed, × and x → *, ÷ → /. A chained "2 + 3 = 5 * 2 = 10"
    yields "2+3=5" and "5*2=10". A path with no equation has the empty list (so all such paths of a
    question count as one, as in RFT).
    """
    notes = _ANNOTATION.findall(text)
    if notes:
        return tuple(_normalize_equation(n) for n in notes)
    found: list[str] = []
    pos = 0
    while (m := _PLAIN_EQUATION.search(text, pos)) is not None:
        found.append(_normalize_equation(m.group(0)))
        # The result may open the next equation of a chain ("= 5 * 2 = 10").
        result_start = m.group(0).rfind("=") + m.start() + 1
        pos = result_start if result_start > m.start() else m.end()
    return tuple(found)


def select_correct(cands: list["Candidate"], labels: dict[str, Example], max_per_question: int | None,
                   dedup: str) -> tuple[list["Candidate"], dict[str, int]]:
    """The correct, de-duplicated, capped candidates (in input order), and counts of why others went."""
    kept: list[Candidate] = []
    per_q: dict[str, int] = {}
    seen: dict[str, set[tuple[str, ...]]] = {}
    wrong = duplicate = capped = 0
    for c in cands:
        gold = labels[c.id].final
        if not answers_equal(c.answer, gold):
            wrong += 1
            continue
        if dedup == "equations":
            key = equation_list(c.text)
            if key in seen.setdefault(c.id, set()):
                duplicate += 1
                continue
            seen[c.id].add(key)
        if max_per_question is not None and per_q.get(c.id, 0) >= max_per_question:
            capped += 1
            continue
        per_q[c.id] = per_q.get(c.id, 0) + 1
        c.label = gold
        kept.append(c)
    return kept, {"wrong": wrong, "duplicates": duplicate, "overCap": capped}


def load_labels(ctx: "StageContext", filter_index: int) -> dict[str, Example]:
    """Every question of `inputs.questions` (the run's data.questions), each with its gold answer."""
    task = ctx.task
    kind = task.filters[filter_index].kind
    setting = f"filters[{filter_index}].{kind}"
    uri = task.inputs.questions
    if not uri:
        raise BadInput(f"inputs.questions: {setting} needs the questions file with gold answers (data.questions)")
    shown = display_name(uri)
    out: dict[str, Example] = {}
    for lineno, obj in read_jsonl(ctx.storage_for(uri), uri):
        ex = parse_example(obj, f"{shown}:{lineno}")
        if ex.final is None:
            raise BadInput(f'{shown}:{lineno}: no "answer"; {setting} keeps paths matching the gold answer, so every '
                           f"question of data.questions needs one (or remove the {kind} filter)")
        out[ex.id] = ex
    return out


def correct(fr: "FilterRun", cands: list["Candidate"], spec: "CorrectFilter") -> tuple[list["Candidate"], dict]:
    labels = fr.labels
    for c in cands:
        if c.id not in labels:
            raise BadInput(f"inputs.samples: question {c.id!r} is not in data.questions "
                           f"({display_name(fr.ctx.task.inputs.questions or '')}); the correct filter has no gold answer for it")
    kept, counts = select_correct(cands, labels, spec.max_per_question, spec.dedup)
    info: dict[str, Any] = {"maxPerQuestion": spec.max_per_question, "dedup": spec.dedup, **counts}
    if spec.rationalize:
        solved = {c.id for c in kept}
        # Every labeled question without a correct path, in the questions file's order; its
        # candidates' vote (when it had any) is carried over for the row's provenance.
        missing = [ex for qid, ex in labels.items() if qid not in solved]
        rationales = rationalize(fr, missing, {c.id: c for c in cands}, spec)
        extra, _ = select_correct(rationales, labels, spec.max_per_question, spec.dedup)
        info.update(rationalized=len(missing), rationalizedKept=len(extra))
        kept.extend(extra)
    return kept, info


HINT = "(Hint: the correct answer is {answer}.)"


def hinted_question(question: str, answer: str) -> str:
    """STaR's rationalization prompt: the question with its answer as a hint."""
    return f"{question.rstrip()}\n{HINT.format(answer=answer)}"


def rationalize(fr: "FilterRun", questions: list[Example], like: dict[str, "Candidate"],
                spec: "CorrectFilter") -> list["Candidate"]:
    """Rationales for `questions`, sampled with the gold answer as a hint, as candidates whose
    question is the original one (path numbers from 10000 on, so they never collide)."""
    from ..prompts import STOP_SEQUENCES, answer_stop_ids, render_prompt
    from ..training.data import load_exemplars, resolve_format
    from .filter import Candidate

    if not questions:
        return []
    task = fr.ctx.task
    exemplars = load_exemplars(fr.ctx.storage_for, task.prompting)
    fmt = resolve_format("fewShotCot", bool(exemplars))
    engine = fr.pool.get(task.model.base)
    adapter = str(fr.ctx.local_dir(task.model.adapter)) if task.model.adapter else None
    assert all(q.final is not None for q in questions)
    prompts = [render_prompt(task.prompting, hinted_question(q.question, q.final or ""), fmt, engine.tokenizer, exemplars)
               for q in questions]
    params = GenerationParams(n=spec.rationalize_paths, temperature=spec.temperature, max_tokens=spec.max_tokens,
                              seed=task.round, stop=STOP_SEQUENCES,
                              stop_token_ids=answer_stop_ids(task.prompting, engine.tokenizer))  # as the sample stage
    outs = engine.generate(prompts, params, adapter=adapter)
    out: list[Candidate] = []
    for q, o in zip(questions, outs, strict=True):
        ref = like.get(q.id)
        for j, comp in enumerate(o.completions):
            answer = extract_answer(comp.text, task.prompting.answer)
            out.append(Candidate(q.id, q.question, RATIONALE_PATH + j, comp.text, answer,
                                 ref.majority if ref else (q.final or ""), ref.confidence if ref else 0.0,
                                 ref.entropy if ref else 1.0, scores={"rationalized": True}))
    return out


RATIONALE_PATH = 10000


# --------------------------------------------------------------------------- reward model
def reward_texts(tokenizer: Any, question: str, path: str, use_template: bool = True) -> str:
    """What the reward model reads: the (question, path) exchange under its chat template."""
    if uses_template(tokenizer, use_template):
        msgs = [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": path.strip()}]
        return tokenizer.apply_chat_template(msgs, tokenize=False)
    return f"{question.strip()}\n\n{path.strip()}"


def load_reward_model(path: str, dtype_name: str = "auto", gpus: int = 0) -> tuple[Any, Any, str]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(
        dtype_name, torch.bfloat16 if device == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, torch_dtype=dtype).to(device).eval()
    if model.config.num_labels != 1:
        raise BadInput(f"{path}: a reward model has one output (num_labels 1), this one has {model.config.num_labels}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        # The classifier reads the last non-pad token: it must know which id pads.
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    return model, tokenizer, device


def score_texts(model: Any, tokenizer: Any, texts: list[str], batch_size: int, max_length: int,
                device: str = "cpu") -> tuple[list[float], int]:
    """The reward of each text (batched by length, right-padded, masked), and how many were truncated."""
    scores, truncated = score_each(model, tokenizer, texts, batch_size, max_length, device)
    return scores, sum(truncated)


def score_each(model: Any, tokenizer: Any, texts: list[str], batch_size: int, max_length: int,
               device: str = "cpu") -> tuple[list[float], list[bool]]:
    """The reward of each text and whether it was truncated to `max_length` tokens."""
    import torch

    lengths = [len(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    scores = [0.0] * len(texts)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt").to(device)
            logits = model(**enc).logits.float()[:, 0]
            for i, v in zip(idx, logits.tolist()):
                scores[i] = float(v)
    return scores, [n > max_length for n in lengths]


def reward_scores(fr: "FilterRun", cands: list["Candidate"], spec: "RewardModelFilter") -> tuple[list[dict], dict]:
    """Each candidate's reward; the reward model takes the stage's one model slot (the engine
    pool closes what it held) and stays loaded for the next chunk."""
    task = fr.ctx.task
    path = str(fr.ctx.local_dir(spec.model))
    model, tokenizer, device = fr.pool.get_other(
        f"reward:{path}", lambda: load_reward_model(path, task.engine.dtype, task.gpus), lambda loaded: None)
    texts = [reward_texts(tokenizer, c.question, c.text, task.prompting.chat_template) for c in cands]
    scores, truncated = score_each(model, tokenizer, texts, spec.batch_size, spec.max_length, device)
    return [{"reward": s, **({"truncated": True} if t else {})} for s, t in zip(scores, truncated)], {}


def reward_model(fr: "FilterRun", cands: list["Candidate"], spec: "RewardModelFilter") -> tuple[list["Candidate"], dict]:
    from ..selection import top_fraction
    from .filter import scores_of

    rule = {"keep": spec.keep} if spec.keep is not None else {"minScore": spec.min_score}
    if not cands:
        return [], {**rule, "model": spec.model}
    records = scores_of(fr, "rewardModel", cands, spec)
    scores = [r["reward"] for r in records]
    truncated = sum(1 for r in records if r.get("truncated"))
    for c, s in zip(cands, scores):
        c.scores["reward"] = s  # unrounded: minScore compares exactly what is recorded
    if truncated:
        fr.ctx.log.warning(f"rewardModel: {truncated} of {len(cands)} candidates longer than maxLength "
                           f"{spec.max_length} tokens were truncated")
    mask = top_fraction(scores, spec.keep) if spec.keep is not None else [s >= (spec.min_score or 0.0) for s in scores]
    return [c for c, k in zip(cands, mask) if k], {
        **rule, "model": spec.model, "truncated": truncated, "meanScore": round(sum(scores) / len(scores), 6),
    }
