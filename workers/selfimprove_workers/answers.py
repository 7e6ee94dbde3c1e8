"""Final-answer extraction and comparison.

Majority voting (LMSI), accuracy (evaluate) and the "wrong" set of LLM2LLM all hinge on reading
the same answer out of free text the same way, so one module does it for every stage.

`extract_answer(text, spec)` reads the answer in two steps.

**1. The answer region.** A reasoning model's ``<think>…</think>`` scratchpad is skipped when
an answer follows it. Text after an end-of-turn token (``<|im_end|>``, ``<|eot_id|>``,
``</s>``, …) is never read. A *run-on boundary* is a line (or sentence) that starts an invented
next turn: ``Question:``, ``Q:``, ``Problem:``, ``Human:``, ``User:``, ``Instruction:``,
``### Instruction``, ``[INST]``, ``<|im_start|>``, …. The region ends at the first boundary that
has an answer before it; text past it is never read. Few-shot sampling (LMSI's prompts) and base
models do run on into a made-up exemplar with its own answer, and its "last number" or its
``\\boxed{}`` is the wrong answer. A boundary with nothing answerable before it does not cut (a
chat model that restates "**Question:** …" before solving it keeps its solution).

**2. Precedence inside the region** (``number``; ``choice`` follows the same order):

1. a *final-answer marker*: ``Final Answer: …``, ``the final answer is …``,
   ``**Final Answer:** …``, ``### Final Answer`` (first one that holds a number). The model
   says in words that this is the final answer; nothing it wrote is more explicit. Minerva /
   Llama-3.1 ("Final Answer: The final answer is $18$. I hope it is correct."), Qwen2.5
   ("Therefore, the final answer is $\\boxed{18}$").
2. ``\\boxed{…}`` / ``\\fbox{…}`` (the *last* one that holds a number): the answer convention
   math-tuned models are trained and prompted with (DeepSeek-Math, Qwen2.5-Math: "put your
   final answer within \\boxed{}"); a box is never scratch work. The last because a model that
   corrects itself boxes again, as MATH's own grader reads it (``last_boxed_only_string``).
3. ``the answer is …`` (``would be``, ``=``; first one): LMSI's own answer sentence, the
   few-shot CoT convention, Mistral's and most chat models' plain phrasing. The first because a
   model that ran on without a recognizable boundary repeats the pattern for a made-up question.
4. GSM8K's ``#### 42`` (first one): GSM8K-tuned models and the LLM2LLM teacher format
   (``Answer: <rationale> #### 18``), which is why it outranks rule 5.
5. an ``Answer: 42`` label (``**Answer:** 42``, ``### Answer`` on its own line, a line
   ``A: 42``): weaker, because ``Answer:`` also opens a whole rationale (prompts end in it).
6. a bold number, ``**42**`` / ``__42__`` (the last one): chat models bold the result.
7. the last number in the region.

A marker counts only when a number follows it (after ``:``, ``is``, ``$``, ``\\(``, ``**``,
currency codes, ``approximately``, ``x =``, …), so "the final answer, let's check: 3 + 4" or
"Answer: Janet sells 16 - 3 - 4 = 9 eggs" give nothing and the next rule is tried. A number
that opens an equation ("The answer is 2 * 9 = $18.") reads as the value after the last ``=``
of that sentence. Units, ``%`` and currency after or before the number are ignored.

``choice``: a letter of `spec.choices` by the same rules (``The correct option is C``,
``Option C is correct``, ``\\boxed{B}``, ``**Answer:** (B)``, ``**B**``; rule 3 also takes
``option is`` / ``choice is`` / ``I would choose``), then a reply that is only a letter (``(B)``),
then the last option written ``(C)`` / ``C)`` / ``C.`` (upper case, so the article "a" and
"I" are not read as choices). A lower-case letter after a marker counts only when it stands
alone ("the answer is (a)." but not "the answer is a bit more").

``regex``: the first capture group of `spec.pattern`'s first match (stripped) in the region,
with the same boundaries: a boundary cuts when the pattern matches before it.

**Normalization** (`normalize_number`, applied to every extracted number, so votes, kept
samples and gold answers compare as strings): one canonical string per value. Integers without
a decimal point (``18.00`` → ``18``), decimals without trailing zeros (``2.50`` → ``2.5``,
``.5`` → ``0.5``); currency signs (``$ € £ ¥ ₹``) and a trailing ``%`` dropped (``25%`` →
``25``: GSM8K's gold answers are written that way); commas only as thousands separators
(``1,234,567`` → ``1234567``; ``1,5`` is not a number); Unicode minus; a fraction becomes its
decimal when that terminates (``3/4`` → ``0.75``) and a reduced fraction otherwise (``2/6``
→ ``1/3``); scientific notation expands (``1.5e3`` → ``1500``). LaTeX in the text is read
first: ``\\frac{3}{4}`` / ``\\dfrac`` → ``3/4``, ``2\\frac{1}{2}`` → ``2.5``, ``1{,}234`` and
``1,\\!234`` → ``1,234``, ``\\text{ apples}`` / ``\\$`` / ``\\%`` dropped,
``3 \\times 10^{4}`` → ``3e4``. Exact arithmetic (`Fraction`): no float rounding. The gold
answers of the evaluate stage go through the same function, so ``1,000`` (gold) and ``1000.00``
(model) agree, and so do ``0.75`` and ``3/4``; ``0.333`` and ``1/3`` do not.

Not read: numbers in words ("eighteen"), European decimal commas (``1.234,50``), space-grouped
thousands (``1 234``), answers given only as an option's text in a choice task.

`answers_equal(a, b)` compares two extracted (or gold) answers: numerically when both read as
numbers, else case-insensitively as text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from .spec import AnswerSpec

__all__ = ["extract_answer", "normalize_number", "answers_equal"]

# --------------------------------------------------------------------------- normalization
# What is left of a number once sign, currency, thousands commas and spaces are gone.
_PLAIN_NUMBER_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:[eE]([-+]?\d{1,3}))?(?:/(\d+))?")
_THOUSANDS_RE = re.compile(r"\d{1,3}(?:,\d{3})+(?=[.eE/]|$)")
_CURRENCY_SIGNS = "$€£¥₹"
_MAX_EXPONENT = 100


def normalize_number(text: str) -> str | None:
    """The canonical string of a number, or None when `text` is not one.

    Integers print without a decimal point (``"1,000.00"`` → ``"1000"``), decimals without
    trailing zeros (``"-3.50"`` → ``"-3.5"``), currency signs, a trailing ``%`` and thousands
    commas go (``"$5"`` → ``"5"``, ``"25%"`` → ``"25"``), a fraction becomes its decimal when
    that terminates (``"3/4"`` → ``"0.75"``) and stays a reduced fraction otherwise (``"2/6"`` →
    ``"1/3"``), scientific notation expands (``"1e5"`` → ``"100000"``), so equal values always
    give equal strings. Exact arithmetic (`Fraction`): no float rounding.
    """
    s = re.sub(r"[\s" + _CURRENCY_SIGNS + "]", "", text.replace("\u2212", "-"))
    if s.endswith("%"):
        s = s[:-1]
    sign = 1
    while s[:1] in ("-", "+"):
        if s[0] == "-":
            sign = -sign
        s = s[1:]
    if "," in s:  # only as thousands separators of the integer part
        m = _THOUSANDS_RE.match(s)
        if not m or "," in s[m.end():]:
            return None
        s = m.group(0).replace(",", "") + s[m.end():]
    m = _PLAIN_NUMBER_RE.fullmatch(s)
    if not m:
        return None
    try:
        value = Fraction(Decimal(m.group(1)))
    except InvalidOperation:  # pragma: no cover - the pattern only admits valid decimals
        return None
    if m.group(2) is not None:
        exponent = int(m.group(2))
        if abs(exponent) > _MAX_EXPONENT:
            return None
        value *= Fraction(10) ** exponent
    if m.group(3) is not None:
        if int(m.group(3)) == 0:
            return None
        value /= int(m.group(3))
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


# --------------------------------------------------------------------------- LaTeX / markdown → text
_MAX_GROUP_CHARS = 1000


def _braced(s: str, i: int) -> tuple[str, int] | None:
    """The content of the brace group opening at ``s[i] == "{"`` and the index after it; None
    when it does not close within `_MAX_GROUP_CHARS` (no answer is that long)."""
    depth = 0
    for j in range(i, min(len(s), i + _MAX_GROUP_CHARS)):
        c = s[j]
        if c == "{" and (j == 0 or s[j - 1] != "\\"):
            depth += 1
        elif c == "}" and s[j - 1] != "\\":
            depth -= 1
            if depth == 0:
                return s[i + 1:j], j + 1
    return None


_UNWRAP_RE = re.compile(
    r"\\(?:boxed|fbox|text|textbf|textit|textrm|texttt|mathrm|mathbf|mathit|mbox|operatorname|emph|underline"
    r"|displaystyle)\s*(?=\{)"
)
_MAX_GROUPS = 2000
_FRAC_RE = re.compile(r"\\[dtc]?frac\s*")
_MIXED_LEFT_RE = re.compile(r"(\d+)[ \t]*$")
_SIMPLE_NUMBER_RE = re.compile(r"\s*[-+]?(?:\d+(?:\.\d+)?|\.\d+)\s*")
_REPLACEMENTS = (
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"\\!"), ""),
    (re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))"), ""),
    (re.compile(r"\\[$%]"), lambda m: m.group(0)[1]),
    (re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])"), ""),
    (re.compile(r"\\[()\[\]]"), " "),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°"), ""),
    (re.compile(r"\\times(?![a-zA-Z])"), "×"),
    (re.compile(r"\\cdot(?![a-zA-Z])"), "·"),
    (re.compile(r"\\div(?![a-zA-Z])"), "÷"),
    (re.compile(r"\\approx(?![a-zA-Z])"), "≈"),
    (re.compile(r"\\(?:q?quad|[,;: ])|~"), " "),
    (re.compile(r"[\u00a0\u2009\u202f\u2007]"), " "),
    (re.compile(r"\u2212"), "-"),
    # 3 × 10^{4} → 3e4 (after \times became ×)
    (re.compile(r"(\d(?:\.\d+)?)\s*[×x*·]\s*10\s*\^\s*\{?\s*([-+]?\d{1,3})\s*\}?"), r"\1e\2"),
    (re.compile(r"\*\*|__|`"), ""),
    (re.compile("[" + _CURRENCY_SIGNS + "]"), ""),
)


def _unwrap(s: str) -> str:
    """``\\boxed{x}``, ``\\text{x}`` … → ``x``; ``\\frac{a}{b}`` → ``a/b`` (``(a)/(b)`` when not plain
    numbers); ``2\\frac{1}{2}`` → ``2.5``."""
    pos = 0
    for _ in range(_MAX_GROUPS):  # outermost first; a nested one is found again at the same place
        m = _UNWRAP_RE.search(s, pos)
        if not m:
            break
        inner = _braced(s, m.end())
        if inner is None:
            s = s[:m.start()] + s[m.end():]
        else:
            s = s[:m.start()] + " " + inner[0] + " " + s[inner[1]:]
        pos = m.start()
    pos = 0
    for _ in range(_MAX_GROUPS):
        m = _FRAC_RE.search(s, pos)
        if not m:
            break
        args: list[str] = []
        j = m.end()
        for _arg in range(2):
            while j < len(s) and s[j] == " ":
                j += 1
            if j < len(s) and s[j] == "{":
                got = _braced(s, j)
                if got is None:
                    break
                args.append(_unwrap(got[0]))
                j = got[1]
            elif j < len(s) and s[j].isalnum():
                args.append(s[j])
                j += 1
            else:
                break
        if len(args) != 2:
            pos = m.end()
            continue
        num, den = args
        start = m.start()
        if _SIMPLE_NUMBER_RE.fullmatch(num) and _SIMPLE_NUMBER_RE.fullmatch(den):
            text = f"{num.strip()}/{den.strip()}"
            whole = _MIXED_LEFT_RE.search(s, 0, start)
            value = normalize_number(text)
            if whole and value is not None and "-" not in text and Fraction(value) < 1:
                text = _format_fraction(int(whole.group(1)) + Fraction(value))
                start = whole.start()
        else:
            text = f"({num})/({den})"
        s = s[:start] + text + s[j:]
        pos = start + len(text)
    return s


def _clean(s: str) -> str:
    """Model output with its LaTeX and markdown reduced to plain text that numbers can be read from."""
    s = _unwrap(s)
    for pattern, repl in _REPLACEMENTS:
        s = pattern.sub(repl, s)  # type: ignore[arg-type]  # str or callable, both accepted
    return s


# --------------------------------------------------------------------------- answer region
_HARD_STOP_RE = re.compile(
    r"<\|im_end\|>|<\|eot_id\|>|<\|end_of_text\|>|<\|endoftext\|>|<\|end\|>|</s>|<end_of_turn>"
    r"|<\uff5cend\u2581of\u2581sentence\uff5c>|<\|EOT\|>"
)
_RUNON_RE = re.compile(
    r"(?:\n|(?<=[.!?)])[ \t]+)[ \t]*(?:#{1,6}[ \t]*)?(?:\*\*|__)?[ \t]*"
    r"(?:Question|Q|Problem|Human|User|USER|Instruction|Input)[ \t]*\d*[ \t]*(?:\*\*|__)?[ \t]*[:：]"
    r"|\n[ \t]*#{1,6}[ \t]*(?:Instruction|Input|Question|Human|User|Problem)\b"
    r"|<\|im_start\|>|<\|start_header_id\|>|<\|user\|>|\[INST\]|<start_of_turn>"
)
_MAX_CUTS = 16


def _within_region(text: str, extract: Callable[[str], str | None]) -> str | None:
    """`extract` on the text up to the first run-on boundary that has an answer before it."""
    _, closed, after = text.rpartition("</think>")
    if closed and after.strip():  # a reasoning model's scratchpad is not its answer
        text = after
    piece = next((p for p in _HARD_STOP_RE.split(text) if p.strip()), "")
    cuts = 0
    for m in _RUNON_RE.finditer(piece):
        if not piece[:m.start()].strip():
            continue
        value = extract(piece[:m.start()])
        if value is not None:
            return value
        cuts += 1
        if cuts >= _MAX_CUTS:
            break
    return extract(piece)


# --------------------------------------------------------------------------- numbers
# A number in cleaned text: sign, thousands commas, decimals, exponent, a simple fraction.
_NUM = (
    r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:[eE][-+]?\d{1,3}(?![\w]))?"
)
_SPAN_NUM_RE = re.compile(_NUM + r"(?:[ \t]?/[ \t]?\d+(?![\d.]\d))?")
# Any number in running text, for the last-number fallback. A sign counts when it does not follow
# a word ("16-3" is not "-3"); a sentence dot ("is 42.") is no decimal point.
_ANY_NUMBER_RE = re.compile(r"(?<![\w.])" + _NUM + r"(?:/\d+(?![\d.]\d))?")
# What may stand between a marker and its number.
_LEAD_RE = re.compile(
    r"(?:[\s:：=*#>(\[{\"'_|]|≈|~"
    r"|\b(?:is|was|be|equals|of|approximately|about|around|roughly|exactly|a total of|total of)\b|\bapprox\.?"
    r"|\b(?:USD|US|EUR|GBP|INR|CAD|AUD|Rs\.?)(?=[\s\d.])|(?<![\w])[a-zA-Z]\s*=(?!=))*",
    re.IGNORECASE,
)
# After a number: the start of an equation ("2 * 9 = 18"), read past to its result.
_EQUATION_RE = re.compile(r"[ \t]*(?:[-+*/×x÷·^][ \t]*[\d(.]|=(?!=))")
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)|\n|;|,\s")


def _number_at(s: str, depth: int = 0) -> str | None:
    """The number that `s` (cleaned text right after a marker) opens with, normalized."""
    i = _LEAD_RE.match(s).end()  # type: ignore[union-attr]  # matches the empty string
    m = _SPAN_NUM_RE.match(s, i)
    if not m:
        return None
    rest = s[m.end():]
    if _EQUATION_RE.match(rest):
        end = _SENTENCE_END_RE.search(rest)
        sentence = rest[:end.start()] if end else rest
        if "=" not in sentence or depth > 4:
            return None
        return _number_at(sentence.rpartition("=")[2], depth + 1)
    return normalize_number(m.group(0))


_FINAL_RE = re.compile(r"\bfinal\s+(?:answer|result)\b", re.IGNORECASE)
_ANSWER_IS_RE = re.compile(
    r"\banswer\s+(?:is|would\s+be|will\s+be|should\s+be|must\s+be|equals)\b|\banswer\s*=", re.IGNORECASE
)
_HASHES_RE = re.compile(r"####")
_LABEL_RE = re.compile(
    r"\banswer[ \t]*[:：]|(?:^|\n)[ \t]*#{0,6}[ \t]*(?:final[ \t]+)?answer[ \t]*(?=\n)|(?:^|\n)[ \t]*A:",
    re.IGNORECASE,
)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*(?=\{)|\\boxed[ \t]+(?=[^\s{])")
_BOLD_RE = re.compile(r"\*\*([^*\n]{1,60}?)\*\*|(?<!\w)__([^_\n]{1,60}?)__(?!\w)")
_BOLD_NUMBER_RE = re.compile(
    r"[^\w\-+.]{0,3}(?:USD|US|EUR|GBP|about|approximately)?\s*(?P<num>" + _SPAN_NUM_RE.pattern + r")"
    r"\s*(?:%|percent|[a-zA-Z][a-zA-Z/ ]{0,24})?[.!)]?",
    re.IGNORECASE,
)


def _after_markers(cleaned: str, marker: re.Pattern[str], read: Callable[[str], str | None]) -> str | None:
    for m in marker.finditer(cleaned):
        value = read(cleaned[m.end():m.end() + 400])
        if value is not None:
            return value
    return None


def _boxed_contents(raw: str) -> list[str]:
    out = []
    for m in _BOXED_RE.finditer(raw):
        if raw[m.end():m.end() + 1] == "{":
            got = _braced(raw, m.end())
            if got is not None:
                out.append(got[0])
        else:
            out.append(re.match(r"\S+", raw[m.end():]).group(0))  # type: ignore[union-attr]
    return out


def _bold_contents(raw: str) -> list[str]:
    return [m.group(1) if m.group(1) is not None else m.group(2) for m in _BOLD_RE.finditer(raw)]


def _number_in_region(raw: str) -> str | None:
    cleaned = _clean(raw)
    value = _after_markers(cleaned, _FINAL_RE, _number_at)
    if value is not None:
        return value
    for content in reversed(_boxed_contents(raw)):
        value = _number_at(_clean(content))
        if value is not None:
            return value
    for marker in (_ANSWER_IS_RE, _HASHES_RE, _LABEL_RE):
        value = _after_markers(cleaned, marker, _number_at)
        if value is not None:
            return value
    for content in reversed(_bold_contents(raw)):
        m = _BOLD_NUMBER_RE.fullmatch(_clean(content).strip())
        if m:
            value = _number_at(m.group("num"))
            if value is not None:
                return value
    last = None
    for m in _ANY_NUMBER_RE.finditer(cleaned):
        value = normalize_number(m.group(0))
        if value is not None:
            last = value
    return last


# --------------------------------------------------------------------------- choices
_CHOICE_IS_RE = re.compile(
    r"\b(?:answer|option|choice)\s+(?:is|would\s+be|will\s+be|should\s+be|must\s+be)\b"
    r"|\b(?:I\s+(?:would\s+)?(?:choose|pick|select))\b",
    re.IGNORECASE,
)
_LETTER_RE = re.compile(r"([A-Za-z])(?![\w'’])")
# "Option C is correct", "(B) is the right answer"
_CHOICE_CORRECT_RE = re.compile(
    r"(?:\b(?:option|choice|answer)\s*)?\(?\b([A-Za-z])\b\)?\s+is\s+(?:the\s+)?(?:correct|right|best)\b", re.IGNORECASE
)
_CHOICE_LABEL_RE = re.compile(_LABEL_RE.pattern + r"|\b(?:option|choice)[ \t]*[:：]", re.IGNORECASE)
_CHOICE_LEAD_RE = re.compile(
    r"(?:[\s:：=*#>(\[{\"'_|]|\b(?:is|be|option|choice|letter)\b)*", re.IGNORECASE
)


def _letter_at(s: str, letters: str) -> str | None:
    """The option letter that `s` (cleaned text right after a marker) opens with."""
    i = _CHOICE_LEAD_RE.match(s).end()  # type: ignore[union-attr]  # matches the empty string
    m = _LETTER_RE.match(s, i)
    if not m:
        return None
    letter = m.group(1)
    if letter.upper() not in letters.upper():
        return None
    after = s[m.end():]
    in_parens = s[:i].rstrip(" \t").endswith("(")
    if letter.islower() and not in_parens and not re.match(r"[ \t]*(?:[.):,;\]]|\n|$)", after):
        return None  # "the answer is a bit more": an article, not a choice
    if letter == "I" and not in_parens and re.match(r"[ \t]+[a-z]", after):
        return None  # "Answer: I think …"
    return letter.upper()


def _choice_in_region(raw: str, letters: str) -> str | None:
    cleaned = _clean(raw)

    def read(s: str) -> str | None:
        return _letter_at(s, letters)

    value = _after_markers(cleaned, _FINAL_RE, read)
    if value is not None:
        return value
    for content in reversed(_boxed_contents(raw)):
        value = read(_clean(content))
        if value is not None:
            return value
    value = _after_markers(cleaned, _CHOICE_IS_RE, read)
    if value is not None:
        return value
    for m in _CHOICE_CORRECT_RE.finditer(cleaned):
        value = read(m.group(1) + cleaned[m.end(1):m.end(1) + 1])
        if value is not None and (m.group(1).isupper() or cleaned[m.start():m.start(1)].strip()):
            return value
    for marker in (_HASHES_RE, _CHOICE_LABEL_RE):
        value = _after_markers(cleaned, marker, read)
        if value is not None:
            return value
    upper = "[" + re.escape(letters.upper()) + "]"
    for content in reversed(_bold_contents(raw)):
        bold = re.fullmatch(rf"\s*\(?({upper})\)?(?:[.):]\s.*|[.):])?\s*", _clean(content))
        if bold:
            return bold.group(1)
    stripped = cleaned.strip().rstrip(".").strip("()[] ")
    if len(stripped) == 1 and stripped.upper() in letters.upper():
        return stripped.upper()
    # The last letter written as an option, "(C)" or "C)" / "C." at a word boundary, upper case
    # only, so the article "a" and the word "I" are not read as choices.
    found = re.findall(rf"\(({upper})\)|(?<![\w(])({upper})[).:](?!\w)", cleaned)
    if found:
        a, b = found[-1]
        return a or b
    return None


# --------------------------------------------------------------------------- entry points
def extract_answer(text: str | None, spec: AnswerSpec) -> str | None:
    """The final answer in `text` by the task's rule, normalized; None when there is none."""
    if not text:
        return None
    if spec.type == "number":
        return _within_region(text, _number_in_region)
    if spec.type == "choice":
        letters = spec.choices
        return _within_region(text, lambda region: _choice_in_region(region, letters))
    assert spec.pattern is not None  # AnswerSpec validates it
    pattern = re.compile(spec.pattern)

    def first_group(region: str) -> str | None:
        m = pattern.search(region)
        if not m or m.group(1) is None:
            return None
        return m.group(1).strip() or None

    return _within_region(text, first_group)


def answers_equal(a: str | None, b: str | None) -> bool:
    """Whether two answers agree: numerically when both are numbers, else as case-folded text.
    A missing answer never equals anything (not even another missing one)."""
    if a is None or b is None:
        return False
    na, nb = normalize_number(a), normalize_number(b)
    if na is not None and nb is not None:
        return na == nb
    return a.strip().casefold() == b.strip().casefold()
