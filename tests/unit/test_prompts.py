"""Prompt rendering: the four LMSI formats and the configurable answer style."""

import pytest
from pydantic import ValidationError
from selfimprove_workers.prompts import cot_completion, render_prompt, render_target, training_row
from selfimprove_workers.spec import FewShotExample, TaskSpec

SHOT = FewShotExample(question="What is 1 + 2?", rationale="1 + 2 = 3", answer="3")


def test_four_formats():
    task = TaskSpec(few_shot=[SHOT])
    assert render_prompt(task, "What is 2 + 2?", "zeroShotDirect") == "Question: What is 2 + 2?\nAnswer:"
    assert render_prompt(task, "What is 2 + 2?", "zeroShotCot") == "Question: What is 2 + 2?\nAnswer: Let's think step by step."
    assert render_prompt(task, "Q?", "fewShotCot") == (
        "Question: What is 1 + 2?\nAnswer: 1 + 2 = 3\nThe answer is 3.\n\nQuestion: Q?\nAnswer:")
    assert render_prompt(task, "Q?", "fewShotDirect") == "Question: What is 1 + 2?\nAnswer: The answer is 3.\n\nQuestion: Q?\nAnswer:"
    assert render_target("fewShotDirect", "ignored", "4") == " The answer is 4."
    assert render_target("zeroShotCot", "2 + 2 = 4\nThe answer is 4.", "4") == " 2 + 2 = 4\nThe answer is 4."
    assert render_target("zeroShotCot", None, "4", chat=True) == "The answer is 4."


def test_gsm8k_answer_style_and_no_trigger():
    task = TaskSpec(few_shot=[SHOT], cot_trigger="", answer_template="#### {answer}")
    assert render_prompt(task, "Q?", "zeroShotCot") == "Question: Q?\nAnswer:"
    assert render_prompt(task, "Q?", "fewShotCot").startswith("Question: What is 1 + 2?\nAnswer: 1 + 2 = 3\n#### 3\n\n")
    assert cot_completion("a + b", "7", task.answer_template) == "a + b\n#### 7"
    row = training_row({"question": "Q?", "answer": "2 + 2 = 4 #### 4"}, "x.jsonl:1", task.answer_template)
    assert row.cot == "2 + 2 = 4\n#### 4" and row.answer == "4"
    assert render_target("zeroShotDirect", row.cot, row.answer, template=task.answer_template) == " #### 4"


def test_answer_template_needs_its_slot():
    with pytest.raises(ValidationError, match="must contain"):
        TaskSpec(answer_template="The result.")
