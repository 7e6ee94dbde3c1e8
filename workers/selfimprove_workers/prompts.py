"""Prompt formats shared by sampling, training and evaluation.

One module renders every prompt so that what the model is trained on in round r is exactly what
it is asked in round r+1. LMSI's four mixed formats:

    fewShotCot      exemplars with reasoning, then the question → reasoning + "The answer is X."
    fewShotDirect   exemplars without reasoning, then the question → "The answer is X."
    zeroShotCot     the question + "Let's think step by step." → reasoning + "The answer is X."
    zeroShotDirect  the question alone → "The answer is X."

Plain text layout (`Question: …\\nAnswer:`); with `chatTemplate` and a tokenizer that has a chat
template, the same text becomes the user turn and the answer the assistant turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .spec import FewShotExample, PromptFormat, TaskSpec

COT_TRIGGER = "Let's think step by step."
ANSWER_TEMPLATE = "The answer is {answer}."
# A model that starts the next "Question:" has finished its answer (sampling and evaluation).
STOP_SEQUENCES = ("\nQuestion:",)
# Passed to every chat template. Llama-3.x templates put "Today Date: …" in their system
# header, from `strftime_now` when the renderer offers it (transformers does) unless
# `date_string` is given: a run crossing midnight would sample, train and evaluate on different
# prompts. The date Llama-3.1's own template defaults to pins it; templates ignore unknown names.
CHAT_KWARGS: dict[str, Any] = {"date_string": "26 Jul 2024"}


def answer_sentence(answer: str, template: str = ANSWER_TEMPLATE) -> str:
    return template.replace("{answer}", str(answer))


def cot_completion(rationale: str | None, answer: str, template: str = ANSWER_TEMPLATE) -> str:
    """The canonical reasoning completion: rationale, then the answer sentence on its own line."""
    rationale = (rationale or "").strip()
    sentence = answer_sentence(answer, template)
    return f"{rationale}\n{sentence}" if rationale else sentence


def _is_cot(fmt: PromptFormat) -> bool:
    return fmt.endswith("Cot")


def _is_few_shot(fmt: PromptFormat) -> bool:
    return fmt.startswith("fewShot")


def _block(question: str, fmt: PromptFormat, trigger: str = COT_TRIGGER) -> str:
    lead = f" {trigger.strip()}" if fmt == "zeroShotCot" and trigger.strip() else ""
    return f"Question: {question.strip()}\nAnswer:{lead}"


def render_user_text(task: TaskSpec, question: str, fmt: PromptFormat, exemplars: Sequence[FewShotExample] = ()) -> str:
    """The prompt text before any chat template."""
    parts: list[str] = []
    if task.instruction:
        parts.append(task.instruction.strip())
    if _is_few_shot(fmt):
        shots = list(exemplars) or list(task.few_shot)
        for ex in shots:
            template = task.answer_template
            body = cot_completion(ex.rationale, ex.answer, template) if _is_cot(fmt) else answer_sentence(ex.answer, template)
            parts.append(f"{_block(ex.question, 'fewShotCot' if _is_cot(fmt) else 'fewShotDirect')} {body}")
    parts.append(_block(question, fmt, task.cot_trigger))
    return "\n\n".join(parts)


def uses_chat_template(task: TaskSpec, tokenizer: Any) -> bool:
    return bool(task.chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None))


def render_prompt(
    task: TaskSpec,
    question: str,
    fmt: PromptFormat = "fewShotCot",
    tokenizer: Any = None,
    exemplars: Sequence[FewShotExample] = (),
) -> str:
    """The full prompt a model sees. Completions are generated (or trained) right after it."""
    text = render_user_text(task, question, fmt, exemplars)
    if uses_chat_template(task, tokenizer):
        messages = [{"role": "system", "content": task.system.strip()}] if task.system else []
        messages.append({"role": "user", "content": text})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **CHAT_KWARGS)
    return text


def answer_end_id(task: TaskSpec, tokenizer: Any) -> int | None:
    """The token an answer ends with: what training appends and where generation stops.

    Under a chat template, the special token the template writes right after the assistant's
    content — Llama-3's `<|eot_id|>`, Qwen's `<|im_end|>`, Mistral's `</s>` — which need not
    be the tokenizer's EOS (early Llama-3-Instruct tokenizers had `<|end_of_text|>` there, and
    a model taught that would not end its turns the way its template does). Otherwise, and when
    the template writes no special token there, the tokenizer's EOS.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if not uses_chat_template(task, tokenizer):
        return eos
    mark = "\u2063ANSWER\u2063"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": mark}],
            tokenize=False, **CHAT_KWARGS)
    except Exception:  # a template that refuses this conversation says nothing about its ends
        return eos
    if mark not in text:
        return eos
    rest = tokenizer(text.split(mark, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return rest[0] if rest and rest[0] in special else eos


def answer_stop_ids(task: TaskSpec, tokenizer: Any) -> tuple[int, ...]:
    """`GenerationParams.stop_token_ids` for prompts of `render_prompt`: generation ends where
    training taught answers to end, whatever the model's own EOS list says."""
    end = answer_end_id(task, tokenizer)
    return () if end is None else (end,)


def render_target(fmt: PromptFormat, cot: str | None, answer: str, chat: bool = False,
                  template: str = ANSWER_TEMPLATE) -> str:
    """The training completion for a prompt of format `fmt`.

    `cot` is a full reasoning completion (a sampled path, or `cot_completion` of a labeled
    rationale); direct formats use the answer sentence alone. In plain text the completion
    continues `Answer:` after a space; a chat template's assistant turn starts on a fresh line,
    where the model writes none (`chat=True`).
    """
    if _is_cot(fmt):
        body = cot.strip() if cot else answer_sentence(answer, template)
    else:
        body = answer_sentence(answer, template)
    return body if chat else " " + body


@dataclass(frozen=True)
class TrainingRow:
    """A training example in the pipeline's one shape, whatever file it came from."""

    id: str
    question: str
    cot: str
    answer: str


def training_row(obj: dict[str, Any], where: str, template: str = ANSWER_TEMPLATE) -> TrainingRow:
    """Read a row of `kept.jsonl` (`question`, `cot`, `answer`) or of a labeled set (`question`,
    `answer` with GSM8K's `rationale #### N`). Raises DataError naming `where` (file:line)."""
    from .data import parse_example
    from .errors import DataError

    if isinstance(obj.get("cot"), str):
        question, answer = obj.get("question"), obj.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: missing \"question\"")
        if answer is None or str(answer).strip() == "":
            raise DataError(f"{where}: missing \"answer\"")
        ex = parse_example({"question": question, "id": obj.get("id")} if obj.get("id") is not None else {"question": question}, where)
        return TrainingRow(ex.id, question, obj["cot"], str(answer).strip())
    ex = parse_example(obj, where)
    if ex.final is None:
        raise DataError(f"{where}: missing \"answer\" (training needs labeled examples)")
    return TrainingRow(ex.id, ex.question, cot_completion(ex.rationale, ex.final, template), ex.final)
