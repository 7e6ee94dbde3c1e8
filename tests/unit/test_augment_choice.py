"""Augmentation for choice-type (classification) tasks: the teacher is asked for an option letter
of `prompting.answer.choices`, an item whose `####` holds anything else is dropped and counted as
an invalid answer, and a wrong example's answer key is its gold letter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from selfimprove_workers.contract import StageTask
from selfimprove_workers.errors import DataError
from selfimprove_workers.runtime import StageContext
from selfimprove_workers.spec import AnswerSpec, AugmentSpec
from selfimprove_workers.stages import augment

AB = augment.AnswerFormat.of(AnswerSpec(type="choice", choices="AB"))
SST = 'Which sentiment does this review express? "{text}" (A) positive (B) negative'

REPLY = f"""Here are three.
1. Question: {SST.format(text="Loved every minute.")}
Answer: It praises the film.
#### A

2. Question: {SST.format(text="Dull and far too long.")}
Answer: It complains.
#### (B) negative
3. Question: {SST.format(text="Fine, I guess.")}
Answer: Neither really.
#### C
4) Question: {SST.format(text="What a waste of money.")}
Answer: It regrets the price.
#### negative
5. Question: {SST.format(text="A joy.")}
Answer: Praise.
#### b.
6. Question: no answer line here
#### A"""


def test_the_answer_format_reads_only_the_task_letters() -> None:
    assert AB.labels == "AB" and augment.AnswerFormat.of(AnswerSpec()).labels == ""
    assert augment.AnswerFormat.of(AnswerSpec(type="regex", pattern=r"(\d+)")) == augment.NUMBER
    for text, want in [("A", "A"), ("(B)", "B"), ("B.", "B"), ("B) negative", "B"), ("a", "A"), (" b ", "B"),
                       ("C", None), ("Blue", None), ("negative", None), ("", None), ("AB", None), ("1", None)]:
        assert AB.read(text) == want, text
    assert augment.NUMBER.read("$1,200 dollars") == "1200" and augment.NUMBER.read("A") is None


def test_a_choice_reply_drops_and_counts_items_outside_the_labels() -> None:
    parsed = augment.parse_teacher_reply(REPLY, fmt=AB)
    assert [(i.final, i.question.split('"')[1]) for i in parsed.items] == [
        ("A", "Loved every minute."), ("B", "Dull and far too long."), ("B", "A joy.")]
    assert parsed.items[1].answer == "It complains.\n#### B"
    assert (parsed.malformed, parsed.invalid) == (1, 2)  # no "Answer:"; "C" and "negative"
    # The same reply read as a numeric task: no item has a number after ####.
    numeric = augment.parse_teacher_reply(REPLY)
    assert (numeric.items, numeric.malformed, numeric.invalid) == ([], 1, 5)
    # Cut off by the token limit: the last item is dropped as malformed, whatever it holds.
    assert augment.parse_teacher_reply(REPLY, truncated=True, fmt=AB).malformed == 1


def test_the_choice_prompt_names_the_labels_and_shows_them() -> None:
    fmt = augment.AnswerFormat.of(AnswerSpec(type="choice", choices="xyz"))
    messages = augment.teacher_messages(SST.format(text="Meh."), "It is lukewarm.\n#### Y", 2, fmt)
    system, demo_q, demo_a, ask = (m["content"] for m in messages)
    assert "one of X, Y, Z" in system and "#### [LETTER]" in system and "single number" not in system
    assert "(X) positive (Y) negative" in demo_q and demo_a.endswith("#### X")
    assert "#### Y" in ask and "2 similar questions" in ask
    assert "single number" in augment.teacher_messages("q", "#### 1", 1)[0]["content"]


def test_the_users_instructions_replace_the_system_message_and_the_exemplar_can_go() -> None:
    """`augment.instructions` / `augment.exemplar` (a short-context teacher, another kind of task)."""
    spec = AugmentSpec.model_validate({"instructions": "  Write new sums like the one the student missed. ",
                                       "exemplar": False})
    messages = augment.teacher_messages("What is 1 + 2?", "1 + 2 = 3 #### 3", 2, prompt=augment.TeacherPrompt.of(spec))
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == "Write new sums like the one the student missed."
    assert "What is 1 + 2?" in messages[1]["content"] and "2 similar questions" in messages[1]["content"]
    # the defaults are LLM2LLM's prompt with its worked exchange, as before
    default = augment.teacher_messages("q", "#### 1", 1, prompt=augment.TeacherPrompt.of(AugmentSpec()))
    assert default == augment.teacher_messages("q", "#### 1", 1)
    assert [m["role"] for m in default] == ["system", "user", "assistant", "user"]
    with pytest.raises(ValidationError, match="instructions"):
        AugmentSpec.model_validate({"instructions": ""})
    # the loop asks with it, first requests and retries alike
    seen: list[augment.TeacherBatch] = []

    def teacher(requests: augment.TeacherBatch, attempt: int) -> list[tuple[str, str | None]]:
        seen.append(requests)
        return [("no item here", "stop")] * len(requests)

    wrong = [augment.WrongExample("s1", "What is 1 + 2?", "#### 3")]
    augment.augment_examples(wrong, k=1, retries=1, dedup=augment.RougeDeduper(0.95, []), teacher=teacher,
                             prompt=augment.TeacherPrompt.of(spec))
    asked = augment.teacher_messages("What is 1 + 2?", "#### 3", 1, prompt=augment.TeacherPrompt.of(spec))
    assert asked[0] == messages[0] and [batch[0] for batch in seen] == [asked, asked]  # nothing accepted: asked again


def test_the_loop_counts_invalid_answers_and_accepts_only_labels() -> None:
    """The accounting, with a scripted teacher (the real one: tests/e2e/test_augment_shards.py)."""
    wrong = [augment.WrongExample("s1", SST.format(text="So bad."), "#### B"),
             augment.WrongExample("s2", SST.format(text="So good."), "#### A")]
    dedup = augment.RougeDeduper(0.95, [ex.question for ex in wrong])
    seen: list[augment.TeacherBatch] = []

    def teacher(requests: augment.TeacherBatch, attempt: int) -> list[tuple[str, str | None]]:
        seen.append(requests)
        if attempt == 0:
            return [(REPLY, "stop"), (f"1. Question: {SST.format(text='Great.')}\nAnswer: Praise.\n#### D", "stop")]
        return [(f"1. Question: {SST.format(text='Superb acting.')}\nAnswer: Praise.\n#### A", "stop")]

    stats = augment.augment_examples(wrong, k=2, retries=1, dedup=dedup, teacher=teacher, fmt=AB)
    assert stats == {"requests": 3, "malformed": 1, "invalid": 3, "duplicates": 0, "parsed": 4}
    assert [i.final for i in wrong[0].accepted] == ["A", "B"] and [i.final for i in wrong[1].accepted] == ["A"]
    assert seen[0].ids == ["s1", "s2"] and seen[1].ids == ["s2"]  # s1 had its two; s2 is asked afresh
    assert seen[1][0] == seen[0][1]


def _ctx(tmp_path: Path, rows: list[dict], choices: str = "AB") -> StageContext:
    predictions = tmp_path / "seed_predictions.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = StageTask.model_validate({
        "run": {"name": "c"}, "round": 1, "stage": "augment", "output": str(tmp_path / "out"),
        "model": {"base": str(tmp_path / "no-model")}, "inputs": {"predictions": str(predictions)},
        "prompting": {"answer": {"type": "choice", "choices": choices}}, "augment": {}})
    return StageContext(task, tmp_path / "work")


def test_a_wrong_example_is_keyed_by_its_gold_letter(tmp_path: Path) -> None:
    fmt = augment.AnswerFormat.of(AnswerSpec(type="choice", choices="AB"))
    ctx = _ctx(tmp_path, [{"id": 1, "question": SST.format(text="Bad."), "correct": False, "gold": "b"},
                          {"id": 2, "question": SST.format(text="Good."), "correct": True, "gold": "A"}])
    wrong, _, rows = augment.load_wrong(ctx, fmt)
    assert rows == 2 and [(ex.id, ex.answer_key) for ex in wrong] == [("1", "#### B")]


def test_a_gold_answer_outside_the_labels_is_refused_naming_the_line(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, [{"id": 1, "question": "q", "correct": False, "gold": "A"},
                          {"id": 2, "question": "q", "correct": False, "gold": "positive"}])
    with pytest.raises(DataError, match=r"seed_predictions.jsonl:2: \"gold\" 'positive' is not one of the options "
                                        r"A, B \(prompting.answer.choices\)"):
        augment.load_wrong(ctx, augment.AnswerFormat.of(ctx.task.prompting.answer))


def test_a_repeated_wrong_id_is_refused(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, [{"id": "s1", "question": "q", "correct": False, "gold": "A"},
                          {"id": "s1", "question": "q2", "correct": False, "gold": "B"}])
    with pytest.raises(DataError, match=r"seed_predictions.jsonl:2: \"id\" 's1' repeats line 1"):
        augment.load_wrong(ctx, augment.AnswerFormat.of(ctx.task.prompting.answer))
