"""Final-answer extraction and comparison.

Majority voting (LMSI), accuracy (evaluate) and the "wrong" set of LLM2LLM all hinge on reading
the same answer out of free text the same way, so one module does it for every stage.

`extract_answer(text, spec)` by `spec.type`:

- ``number``: the first GSM8K marker ``#### 42``, else the first ``The answer is 42``, else the
  first line starting ``A: 42``, else the last number in the text. The first marker wins because
  a model that has answered often runs on into an invented next exemplar with its own answer.
  Numbers are normalized to one canonical string (`normalize_number`), so ``1,000.00``,
  ``$1000`` and ``1000`` vote together.
- ``choice``: a letter from `spec.choices` (``The answer is (B)``, ``#### C``, a lone ``D``, …).
- ``regex``: the first capture group of `spec.pattern`'s first match, stripped.

`answers_equal(a, b)` compares two extracted (or gold) answers: numerically when both read as
numbers, else case-insensitively as text.
"""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction

from .spec import AnswerSpec

__all__ = ["extract_answer", "normalize_number", "answers_equal"]

# A number as people and models write it: optional sign and currency, thousands commas, a
# decimal part, or a simple fraction. The sign may sit before or after the `$` ("-$5", "$-5").
_NUMBER = (
    r"(?P<num>[-+\u2212]?\$?\s?[-+\u2212]?"
    r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?:\.\d+)?"
    r"(?:\s?/\s?\d+)?)"
)
_NUMBER_RE = re.compile(_NUMBER)
# Any number in running text, for the last-number fallback. Digits are required somewhere; a
# trailing sentence dot ("is 42.") is not a decimal point because a digit must follow it.
_ANY_NUMBER_RE = re.compile(
    r"(?<![\w.])[-+\u2212]?\$?[-+\u2212]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?"
    r"|(?<![\w.])[-+\u2212]?\.\d+"
)
# What is left of a number once sign, currency, commas and spaces are gone.
_PLAIN_NUMBER_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:/(\d+))?")
_MARKERS = (
    re.compile(r"####\s*"),
    re.compile(r"[Tt]he (?:final )?answer is[:\s]*"),
    re.compile(r"(?:^|\n)[ \t]*A:[ \t]*"),
)


def normalize_number(text: str) -> str | None:
    """The canonical string of a number, or None when `text` is not one.

    Integers print without a decimal point (``"1,000.00"`` → ``"1000"``), decimals without
    trailing zeros (``"-3.50"`` → ``"-3.5"``), currency signs and thousands commas go
    (``"$5"`` → ``"5"``), a fraction becomes its decimal when that terminates (``"3/4"`` →
    ``"0.75"``) and stays a reduced fraction otherwise (``"2/6"`` → ``"1/3"``), so equal values
    always give equal strings. Exact arithmetic (`Fraction`): no float rounding.
    """
    s = text.strip().replace("\u2212", "-").replace("$", "").replace(",", "").replace(" ", "")
    sign = 1
    while s[:1] in ("-", "+"):
        if s[0] == "-":
            sign = -sign
        s = s[1:]
    m = _PLAIN_NUMBER_RE.fullmatch(s)
    if not m:
        return None
    value = Fraction(Decimal(m.group(1)))
    if m.group(2) is not None:
        if int(m.group(2)) == 0:
            return None
        value /= int(m.group(2))
    return _format_fraction(sign * value)


def _format_fraction(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:  # a repeating decimal: the reduced fraction is the exact canonical form
        return f"{value.numerator}/{value.denominator}"
    digits = 0
    scaled = value
    while scaled.denominator != 1:
        scaled *= 10
        digits += 1
    text = str(abs(scaled.numerator)).rjust(digits + 1, "0")
    body = f"{text[:-digits]}.{text[-digits:]}".rstrip("0").rstrip(".")
    return ("-" if value < 0 else "") + body


def _number_after(text: str, start: int) -> str | None:
    m = _NUMBER_RE.match(text, start)
    if not m or not re.search(r"\d", m.group("num")):
        return None
    return normalize_number(m.group("num"))


def _extract_number(text: str) -> str | None:
    for marker in _MARKERS:
        for m in marker.finditer(text):
            value = _number_after(text, m.end())
            if value is not None:
                return value
    last = None
    for m in _ANY_NUMBER_RE.finditer(text):
        value = normalize_number(m.group(0))
        if value is not None:
            last = value
    return last


def _extract_choice(text: str, letters: str) -> str | None:
    cls = "[" + re.escape(letters.upper() + letters.lower()) + "]"
    patterns = (
        rf"####\s*\(?({cls})\b",
        rf"answer is[:\s]*\(?({cls})\b",
        rf"(?:^|\n)[ \t]*A:[ \t]*\(?({cls})\b",
    )
    for pattern in patterns:
        m = re.search(pattern, text)
        if m:
            return m.group(1).upper()
    stripped = text.strip().rstrip(".").strip("()")
    if len(stripped) == 1 and stripped.upper() in letters.upper():
        return stripped.upper()
    # Fallback: the last letter written as an option, "(C)" or "C)" / "C." at a word boundary,
    # upper-case only, so the article "a" and the word "I" are not read as choices.
    upper = "[" + re.escape(letters.upper()) + "]"
    found = re.findall(rf"\(({upper})\)|(?<![\w(])({upper})[).:](?!\w)", text)
    if found:
        a, b = found[-1]
        return a or b
    return None


def extract_answer(text: str | None, spec: AnswerSpec) -> str | None:
    """The final answer in `text` by the task's rule, normalized; None when there is none."""
    if not text:
        return None
    if spec.type == "number":
        return _extract_number(text)
    if spec.type == "choice":
        return _extract_choice(text, spec.choices)
    assert spec.pattern is not None  # AnswerSpec validates it
    m = re.search(spec.pattern, text)
    if not m or m.group(1) is None:
        return None
    value = m.group(1).strip()
    return value or None


def answers_equal(a: str | None, b: str | None) -> bool:
    """Whether two answers agree: numerically when both are numbers, else as case-folded text.
    A missing answer never equals anything (not even another missing one)."""
    if a is None or b is None:
        return False
    na, nb = normalize_number(a), normalize_number(b)
    if na is not None and nb is not None:
        return na == nb
    return a.strip().casefold() == b.strip().casefold()
