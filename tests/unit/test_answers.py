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
        ("1e5", "100000"),
        ("1.5e-3", "0.0015"),
        ("1e999", None),  # exponents are bounded
        ("18.00", "18"),
        ("2.50", "2.5"),
        ("25%", "25"),
        ("\u22125", "-5"),
        ("€5", "5"),
        ("1,5", None),  # a comma only separates thousands
        ("1, 2, 3", None),
        ("12,34", None),
        ("1,234.50", "1234.5"),
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


RUNON = "Tom has 5 apples and buys 3 more. How many apples does he have?"


@pytest.mark.parametrize(
    "text, expected",
    [
        # GSM8K and the plain answer sentences
        ("9 * 2 = 18\n#### 42", "42"),
        ("16 - 3 - 4 = 9. The answer is 42.", "42"),
        ("9 * 2 = 18 so the final answer is 42", "42"),
        ("9 * 2 = 18\nFinal Answer: The final answer is $42$. I hope it is correct.", "42"),
        ("9 * 2 = 18\n\n**Final Answer:** 42", "42"),
        ("9 * 2 = 18\nAnswer: 42", "42"),
        ("9 * 2 = 18\nFinal answer: 42", "42"),
        ("The answer would be 42.", "42"),
        # LaTeX boxes
        ("so 9 * 2 = 18 and \\boxed{42} is it; 7 left", "42"),
        ("\\boxed{\\$1,234.50}", "1234.5"),
        ("Therefore $\\boxed{18}$. She sold 9 eggs.", "18"),
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("\\boxed{\\dfrac{1}{3}}", "1/3"),
        ("\\boxed{2\\frac{1}{2}}", "2.5"),
        ("\\boxed{-\\frac{3}{4}}", "-0.75"),
        ("Janet makes \\(\\boxed{7}\\) dollars, from 9 eggs.", "7"),
        ("\\boxed{15 \\text{ apples}}", "15"),
        ("\\boxed{\\text{15 apples}}", "15"),
        ("\\boxed{1{,}600}", "1600"),
        ("\\boxed{1,\\!600}", "1600"),
        ("\\boxed{25\\%}", "25"),
        ("\\boxed{x = 5}", "5"),
        ("\\boxed 5", "5"),
        ("\\fbox{5}", "5"),
        ("\\boxed{{18}}", "18"),  # nested braces
        ("First \\boxed{20}. Wait, that is wrong: \\boxed{18}.", "18"),  # the last box
        ("The final answer is: $\\boxed{18}$", "18"),
        ("### Final Answer\n\n\\[\n\\boxed{18}\n\\]", "18"),
        ("The answer is $3 \\times 10^{4}$.", "30000"),
        # markdown
        ("She has **9** eggs, so she makes **42**. 5 friends.", "42"),
        ("She makes __42__. 5 friends.", "42"),
        ("### Answer\n42\n\nThat took 3 steps.", "42"),
        ("**Answer**\n\n42 eggs (3 boxes)", "42"),
        ("**Answer:** Janet makes **$18** a day, from 9 eggs.", "18"),
        ("**Step 1:** 16 - 3 = 13\n**Step 2:** 13 - 4 = 9", "9"),  # "Step 1" is no bold number
        # run-on text after the answer
        (f"9 * 2 = 18. The answer is 18.\n\nQuestion: {RUNON}\nAnswer: 5 + 3 = 8. The answer is 8.", "18"),
        (f"9 * 2 = 18\n\\boxed{{18}}\n\nQuestion: {RUNON}\nAnswer: \\boxed{{8}}", "18"),
        (f"**Final Answer:** 18\n\nHuman: {RUNON}", "18"),
        (f"She makes 9 * 2 = 18 dollars.\n\n### Instruction:\n{RUNON}", "18"),
        (f"She makes 9 * 2 = 18 dollars.\n\nQ: {RUNON}\nA: 5 + 3 = 8", "18"),
        (f"She makes 9 * 2 = 18 dollars. Question: {RUNON}", "18"),
        (f"She makes **18** dollars.\n\nUser: {RUNON}\nAssistant: **8**", "18"),
        (f"She makes 18 dollars.<|im_end|>\n<|im_start|>user\n{RUNON}", "18"),
        (f"She makes 18 dollars.<|eot_id|>{RUNON} 8", "18"),
        ("\\boxed{18}\n\nThis is because 16 - 3 - 4 = 9 eggs sell at $2 each.", "18"),
        ("Final Answer: The final answer is $18$. I hope it is correct. 2 or 3 more?", "18"),
        # a restated question before the solution is not a run-on: nothing is answered before it
        (f"Sure!\n\n**Question:** {RUNON}\n\n5 + 3 = 8, so he has 8 apples.", "8"),
        ("<think>The answer is 20? No: 9 * 2 = 18.</think>\n\nThe final answer is 18.", "18"),
        # units, percentages, currency, separators, signs, decimals, fractions
        ("The answer is 18 dollars.", "18"),
        ("The answer is 5 km/h.", "5"),
        ("The answer is 3 hours.", "3"),
        ("The answer is 25%.", "25"),
        ("The answer is 12.5 percent.", "12.5"),
        ("The answer is $1,234.50.", "1234.5"),
        ("The answer is €5.", "5"),
        ("The answer is USD 20.", "20"),
        ("The answer is US$20.", "20"),
        ("The answer is 20 USD.", "20"),
        ("The answer is 1,234,567.", "1234567"),
        ("We pick 1, 2, 3", "3"),  # a list, not 123
        ("The answer is 1, 2, 3.", "1"),
        ("The answer is -5.", "-5"),
        ("The answer is \u22125.", "-5"),
        ("The answer is -$5.", "-5"),
        ("The answer is .5", "0.5"),
        ("The answer is 2.50", "2.5"),
        ("The answer is $18.00.", "18"),
        ("The answer is 3/4 of a cup.", "0.75"),
        ("The answer is 1.5e3.", "1500"),
        ("The answer is approximately 3.14.", "3.14"),
        ("Answer: $x = 5$", "5"),
        # an equation after the marker: its result
        ("The answer is 2 * 9 = $18.", "18"),
        ("The answer is $18 - $3 = $15 in all.", "15"),
        # a marker without a number gives nothing; the next rule is tried
        ("Before the final answer, let's check: 3 + 4 = 7", "7"),
        ("Answer: Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n9 * 2 = 18\n#### 18", "18"),  # LLM2LLM's format
    ],
)
def test_extract_number_from_model_output(text: str, expected: str | None) -> None:
    assert extract_answer(text, NUMBER) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        # explicit final-answer markers > boxed > "the answer is" > #### > "Answer:" > bold > last number
        ("\\boxed{5}\nFinal Answer: 7", "7"),
        ("The answer is 5. \\boxed{7}", "7"),
        ("#### 5\nThe answer is 7.", "7"),
        ("Answer: 5\n#### 7", "7"),
        ("**5**\nAnswer: 7", "7"),
        ("**5** and then 7", "5"),
        # first of the phrase markers, last of the boxes
        ("The answer is 5. The answer is 7.", "5"),
        ("\\boxed{5} \\boxed{7}", "7"),
    ],
)
def test_extract_number_precedence(text: str, expected: str) -> None:
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


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Reasoning...\n(B)", "B"),
        ("Reasoning...\n**B**", "B"),
        ("Reasoning...\n**B) 42**", "B"),
        ("Reasoning...\nAnswer: B", "B"),
        ("Reasoning...\n**Answer:** (B) 42", "B"),
        ("Reasoning...\n\\boxed{B}", "B"),
        ("Reasoning...\nThe final answer is $\\boxed{\\text{(D)}}$", "D"),
        ("Reasoning...\nFinal Answer: The final answer is C. I hope it is correct.", "C"),
        ("The correct option is C.", "C"),
        ("The correct answer is option (C).", "C"),
        ("Option C is correct.", "C"),
        ("(b) is the right answer.", "B"),
        ("I would choose B.", "B"),
        ("Correct option: D", "D"),
        ("The answer is A.", "A"),
        ("The answer is (a).", "A"),
        ("The answer is a bit tricky; (C) fits.", "C"),  # the article is no choice
        ("Answer: I think it is B.", "B"),
        ("The answer is B.\n\nQuestion: Which is larger?\n(A) 1 (C) 2\nThe answer is C.", "B"),
        ("The answer is B.\n\nHuman: And the next one?", "B"),
    ],
)
def test_extract_choice_from_model_output(text: str, expected: str | None) -> None:
    assert extract_answer(text, CHOICE) == expected


def test_extract_regex() -> None:
    spec = AnswerSpec(type="regex", pattern=r"Label: (\w+)")
    assert extract_answer("reasoning...\nLabel: positive\n", spec) == "positive"
    assert extract_answer("no label", spec) is None


def test_extract_regex_reads_the_answer_region() -> None:
    """The first match before the first run-on boundary that has one before it; the region
    itself as for numbers, so an invented next exemplar's label is never read."""
    spec = AnswerSpec(type="regex", pattern=r"(?s)Label:\s*(.*)")
    assert extract_answer("Label: positive\n\nQuestion: next?\nLabel: negative", spec) == "positive"
    assert extract_answer("Label: positive<|im_end|>Label: negative", spec) == "positive"
    first = AnswerSpec(type="regex", pattern=r"Label: (\w+)")
    assert extract_answer("Question: restated?\nLabel: positive", first) == "positive"
    assert extract_answer("thinking\n\nQuestion: restated?\nLabel: positive", first) == "positive"


def test_answers_equal() -> None:
    assert answers_equal("1,000", "1000.0")
    assert answers_equal("0.75", "3/4")
    assert answers_equal("Positive ", "positive")
    assert not answers_equal("5", "6")
    assert not answers_equal(None, None)
    assert not answers_equal("5", None)
    assert answers_equal("18.00", "18")
    assert answers_equal("1,000", "1000")
    assert answers_equal("$1,234.50", "1234.5")
    assert answers_equal("25%", "25")
    assert answers_equal("\u22125", "-5")
    assert not answers_equal("1/3", "0.333")


@pytest.mark.parametrize(
    "completion",
    ["The answer is 1,600.", "\\boxed{1{,}600}", "**$1,600.00**", "Final Answer: The final answer is $1600$.", "#### 1,600"],
)
def test_extracted_answers_equal_gold_and_vote_as_strings(completion: str) -> None:
    """Votes compare extracted strings (voting.py); accuracy uses answers_equal on the gold read
    by the same rule (evaluate.gold_answers): both agree for every shape of the same number."""
    gold = extract_answer("1,600", NUMBER)
    got = extract_answer(completion, NUMBER)
    assert got == gold == "1600"
    assert answers_equal(got, gold)
    assert normalize_number(got) == got  # canonical strings are fixed points


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
