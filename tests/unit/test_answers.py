"""Answer extraction and comparison: the rules majority voting and accuracy depend on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from selfimprove_workers.answers import answers_equal, extract_answer, normalize_number
from selfimprove_workers.spec import AnswerSpec

GSM8K_TEST = Path("/work/shared/data/gsm8k/test.jsonl")
NUMBER = AnswerSpec()
CHOICE = AnswerSpec(type="choice")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,000.00", "1000"),
        ("-3.50", "-3.5"),
        ("$5", "5"),
        ("-$5", "-5"),
        ("3/4", "0.75"),
        ("2/6", "1/3"),
        ("6/3", "2"),
        (".5", "0.5"),
        ("007", "7"),
        ("-0", "0"),
        ("5.", "5"),
        ("1,234,567", "1234567"),
        ("1/0", None),
        ("1e5", None),
        ("five", None),
        ("", None),
    ],
)
def test_normalize_number(text: str, expected: str | None) -> None:
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She pays 3 * 4 = 12 dollars.\n#### 12", "12"),
        ("Work... #### 1,600", "1600"),
        ("2 + 3 = 5. The answer is 5.", "5"),
        ("So the answer is $12.50.", "12.5"),
        ("The final answer is -3.", "-3"),
        ("The answer is 3/4.", "0.75"),
        ("Q: what?\nA: 42", "42"),
        # The first marker wins: after answering, a model may invent the next exemplar.
        ("The answer is 7.\n\nQuestion: 1+1?\nAnswer: The answer is 2.", "7"),
        # No marker: the last number in the text.
        ("I have 3 apples and 4 pears, 7 in all", "7"),
        # A marker without a number falls through to the last number.
        ("The answer is five; 6 remain", "6"),
        ("There are 1,5 and 2", "2"),
        ("no digits at all", None),
        ("", None),
    ],
)
def test_extract_number(text: str, expected: str | None) -> None:
    assert extract_answer(text, NUMBER) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is (B).", "B"),
        ("#### d", "D"),
        ("E", "E"),
        ("(C)", "C"),
        ("A man walks in. So C) is right", "C"),
        ("I think a is wrong", None),
        ("Either (A) or (D)", "D"),
        ("The answer is F", None),  # F is not a choice: falls through, finds nothing
    ],
)
def test_extract_choice(text: str, expected: str | None) -> None:
    assert extract_answer(text, CHOICE) == expected


def test_extract_regex() -> None:
    spec = AnswerSpec(type="regex", pattern=r"Label: (\w+)")
    assert extract_answer("reasoning...\nLabel: positive\n", spec) == "positive"
    assert extract_answer("no label", spec) is None


def test_answers_equal() -> None:
    assert answers_equal("1,000", "1000.0")
    assert answers_equal("0.75", "3/4")
    assert answers_equal("Positive ", "positive")
    assert not answers_equal("5", "6")
    assert not answers_equal(None, None)
    assert not answers_equal("5", None)


def test_every_gsm8k_test_answer_extracts_to_its_final_value() -> None:
    """All 1,319 GSM8K test solutions: the full answer text extracts to its `####` value."""
    if not GSM8K_TEST.exists():
        pytest.skip(f"{GSM8K_TEST} is not on this machine")
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines() if line.strip()]
    assert len(rows) == 1319
    wrong = []
    for row in rows:
        gold = normalize_number(row["answer"].rpartition("####")[2])
        got = extract_answer(row["answer"], NUMBER)
        if gold is None or got != gold:
            wrong.append((row["answer"][-60:], got, gold))
    assert wrong == []
