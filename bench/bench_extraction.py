"""Answer extraction on realistic model outputs: today's extractor vs the one before issue 12.

Every vote, kept sample and accuracy figure goes through `answers.extract_answer`, so an extractor
that reads the wrong number on a common output shape corrupts all of them silently. This bench
measures it on a corpus of completions built from GSM8K's *test* answers: each row's rationale and
gold number are rewritten, deterministically (seeded), into the output conventions that instruct
and math-tuned models actually use (see STYLES): GSM8K ``####``, LMSI's "The answer is X.",
Llama-3.1's "The final answer is X", Minerva's "Final Answer: The final answer is $X$. I hope it
is correct.", Qwen2.5's ``\\(\\boxed{X}\\)``, Llama's "## Step k" with a boxed answer, markdown
bold and headings, ``Answer:`` labels, units / currency / percent / thousands separators, and
answers followed by run-on text (an invented next question, an explanation with more numbers).

For each style it prints the accuracy of the extractor *before* this issue (a frozen copy of its
logic below, `old_extract_number`, clearly separated and never edited) and of the current one
(`selfimprove_workers.answers.extract_answer`), both scored against the gold number with the
current `answers_equal`.

`--smoke`: 3 rows per style, to check that the script runs; the figures mean nothing. Without
/work/shared/data/gsm8k (or $GSM8K_DIR) a few built-in rows stand in.

    .venv/bin/python bench/bench_extraction.py [--per-style 250] [--seed 0] [--show 3] [--json F]
    .venv/bin/python bench/bench_extraction.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = Path(os.environ.get("GSM8K_DIR", ROOT.parent / "shared" / "data" / "gsm8k"))
sys.path.insert(0, str(ROOT / "workers"))

from selfimprove_workers.answers import answers_equal, extract_answer, normalize_number  # noqa: E402
from selfimprove_workers.spec import AnswerSpec  # noqa: E402

NUMBER = AnswerSpec()

# Stand-ins when the shared data is not on this machine (GSM8K test rows, abridged).
BUILTIN_ROWS = [
    {"question": "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for "
                 "her friends every day with four. She sells the remainder at the farmers' market daily for $2 per "
                 "fresh duck egg. How much in dollars does she make every day at the farmers' market?",
     "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at "
               "the farmer’s market.\n#### 18"},
    {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does it take?",
     "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 bolts of "
               "fabric\n#### 3"},
    {"question": "Josh decides to try flipping a house.  He buys a house for $80,000 and then puts in $50,000 in repairs.  "
                 "This increased the value of the house by 150%.  How much profit did he make?",
     "answer": "The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\nHe increased "
               "the value of the house by 80,000*1.5=<<80000*1.5=120000>>120,000\nSo the new value of the house is "
               "120,000+80,000=$<<120000+80000=200000>>200,000\nSo he made a profit of "
               "200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000"},
    {"question": "James decides to run 3 sprints 3 times a week.  He runs 60 meters each sprint.  How many total meters "
                 "does he run a week?",
     "answer": "He sprints 3*3=<<3*3=9>>9 times\nSo he runs 9*60=<<9*60=540>>540 meters\n#### 540"},
    {"question": "A class of 20 students took a test; 5 of them failed. What percent of the students passed?",
     "answer": "20 - 5 = <<20-5=15>>15 students passed.\n15 / 20 * 100 = <<15/20*100=75>>75 percent passed.\n#### 75"},
    {"question": "The temperature was 4 degrees and fell by 7 degrees overnight. What was the temperature in the morning?",
     "answer": "4 - 7 = <<4-7=-3>>-3 degrees\n#### -3"},
]


# ============================================================================================
# FROZEN COPY: the number extractor as it was before issue 12 (answers.py as of 3c4da93), kept
# verbatim for the before/after comparison. Do not edit or "fix" it.
# ============================================================================================
_OLD_NUMBER = (
    r"(?P<num>[-+\u2212]?\$?\s?[-+\u2212]?"
    r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?:\.\d+)?"
    r"(?:\s?/\s?\d+)?)"
)
_OLD_NUMBER_RE = re.compile(_OLD_NUMBER)
_OLD_ANY_NUMBER_RE = re.compile(
    r"(?<![\w.])[-+\u2212]?\$?[-+\u2212]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?"
    r"|(?<![\w.])[-+\u2212]?\.\d+"
)
_OLD_PLAIN_NUMBER_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:/(\d+))?")
_OLD_MARKERS = (
    re.compile(r"####\s*"),
    re.compile(r"[Tt]he (?:final )?answer is[:\s]*"),
    re.compile(r"(?:^|\n)[ \t]*A:[ \t]*"),
)


def old_normalize_number(text: str) -> str | None:
    s = text.strip().replace("\u2212", "-").replace("$", "").replace(",", "").replace(" ", "")
    sign = 1
    while s[:1] in ("-", "+"):
        if s[0] == "-":
            sign = -sign
        s = s[1:]
    m = _OLD_PLAIN_NUMBER_RE.fullmatch(s)
    if not m:
        return None
    value = Fraction(Decimal(m.group(1)))
    if m.group(2) is not None:
        if int(m.group(2)) == 0:
            return None
        value /= int(m.group(2))
    return _old_format_fraction(sign * value)


def _old_format_fraction(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    digits = 0
    scaled = value
    while scaled.denominator != 1:
        scaled *= 10
        digits += 1
    text = str(abs(scaled.numerator)).rjust(digits + 1, "0")
    body = f"{text[:-digits]}.{text[-digits:]}".rstrip("0").rstrip(".")
    return ("-" if value < 0 else "") + body


def _old_number_after(text: str, start: int) -> str | None:
    m = _OLD_NUMBER_RE.match(text, start)
    if not m or not re.search(r"\d", m.group("num")):
        return None
    return old_normalize_number(m.group("num"))


def old_extract_number(text: str) -> str | None:
    if not text:
        return None
    for marker in _OLD_MARKERS:
        for m in marker.finditer(text):
            value = _old_number_after(text, m.end())
            if value is not None:
                return value
    last = None
    for m in _OLD_ANY_NUMBER_RE.finditer(text):
        value = old_normalize_number(m.group(0))
        if value is not None:
            last = value
    return last
# ============================================================================================
# end of the frozen copy
# ============================================================================================


# --------------------------------------------------------------------------- corpus
@dataclass(frozen=True)
class Sample:
    style: str
    text: str
    gold: str      # normalized gold number
    row: int       # index of the GSM8K test row


@dataclass(frozen=True)
class Row:
    index: int
    question: str
    raw: str        # GSM8K rationale as written (with <<calculator>> annotations)
    lines: list[str]  # the rationale's lines, annotations removed
    gold: str       # normalized
    gold_text: str  # as GSM8K writes it after ####


def parse_rows(rows: list[dict]) -> list[Row]:
    out = []
    for i, r in enumerate(rows):
        before, _, after = r["answer"].rpartition("####")
        gold = normalize_number(after)
        if gold is None:
            continue
        clean = re.sub(r"<<[^>]*>>", "", before)
        lines = [line.strip() for line in clean.splitlines() if line.strip()]
        out.append(Row(i, r["question"].strip(), before.strip(), lines or ["We compute it directly."], gold, after.strip()))
    return out


def load_rows() -> tuple[list[Row], str]:
    path = GSM8K / "test.jsonl"
    if path.is_file():
        with open(path) as f:
            return parse_rows([json.loads(line) for line in f if line.strip()]), str(path)
    return parse_rows(BUILTIN_ROWS), "built-in rows (GSM8K test not found)"


def _kind(question: str) -> tuple[str, str]:
    """What the question asks for: ("money", ""), ("percent", ""), ("count", noun) or ("plain", "")."""
    q = question.lower()
    if re.search(r"what (?:percent|percentage)", q):
        return "percent", ""
    if "$" in question or "dollars" in q or "how much money" in q:
        return "money", ""
    m = re.search(r"how many (?:more |total |fewer |less )?([a-z]+)", q)
    if m and m.group(1) not in {"of", "did", "does", "do", "is", "are", "was", "were", "will", "can", "times", "has",
                                "have", "more", "in", "total", "would", "should", "must", "could", "red", "blue",
                                "green", "white", "black", "yellow", "new", "other", "different", "full", "extra"}:
        return "count", m.group(1)
    return "plain", ""


def _plain(gold: str, rng: random.Random, thousands: float = 0.6, minus: float = 0.5) -> str:
    """The gold as a model would write it: thousands commas (sometimes), Unicode minus (sometimes)."""
    neg = gold.startswith("-")
    body = gold.lstrip("-")
    if "/" not in body and "." not in body and len(body) > 3 and rng.random() < thousands:
        body = f"{int(body):,}"
    if neg:
        return ("\u2212" if rng.random() < minus else "-") + body
    return body


def _dressed(row: Row, rng: random.Random) -> str:
    """The gold with the unit, currency or percent sign the question suggests."""
    kind, noun = _kind(row.question)
    v = _plain(row.gold, rng)
    neg = v[:1] in "-\u2212"
    if kind == "money":
        body = v.lstrip("-\u2212")
        cents = f"{body}.00" if "." not in body and rng.random() < 0.35 else body
        form = rng.choice(["${}", "${}", "{} dollars", "USD {}", "€{}", "${} per day"])
        out = form.format(cents)
        return ("-" + out) if neg else out
    if kind == "percent":
        return rng.choice(["{}%", "{}%", "{} percent"]).format(v)
    if kind == "count":
        return f"{v} {noun}"
    return v


def _latex(row: Row, rng: random.Random) -> str:
    """The gold inside LaTeX math, as Qwen / DeepSeek write it in a box."""
    kind, noun = _kind(row.question)
    body = row.gold
    neg = body.startswith("-")
    body = body.lstrip("-")
    if "/" not in body and "." not in body and len(body) > 3:
        grouped = f"{int(body):,}"
        body = rng.choice([grouped, grouped.replace(",", "{,}"), grouped.replace(",", ",\\!"), body])
    if neg:
        body = "-" + body
    if kind == "money":
        return rng.choice(["\\${}", "{}", "{} \\text{{ dollars}}", "\\${}.00" if "." not in body else "\\${}"]).format(body)
    if kind == "percent":
        return rng.choice(["{}\\%", "{}"]).format(body)
    if kind == "count" and rng.random() < 0.4:
        return f"{body} \\text{{ {noun}}}"
    return body


def _latexify(line: str) -> str:
    """A rationale line with its arithmetic in \\( … \\), the way Qwen2.5-Instruct writes steps."""
    def wrap(m: re.Match) -> str:
        expr = m.group(0).strip().replace("*", " \\times ").replace("$", "\\$")
        return f"\\( {re.sub(r' +', ' ', expr)} \\)"
    num = r"\$?\d(?:[\d,.]*\d)?"
    return re.sub(rf"{num}(?:\s*[-+*/x]\s*{num})+\s*=\s*{num}", wrap, line)


def _steps(lines: list[str]) -> str:
    return "\n".join(f"{k}. {line}" for k, line in enumerate(lines, 1))


def _subject(row: Row) -> str:
    kind, noun = _kind(row.question)
    return {"money": "the amount", "percent": "the percentage", "count": f"the number of {noun}"}.get(kind, "the result")


Style = Callable[[Row, random.Random, Row], str]


def s_gsm8k(row: Row, rng: random.Random, other: Row) -> str:
    return f"{row.raw}\n#### {row.gold_text}"


def s_answer_is(row: Row, rng: random.Random, other: Row) -> str:
    lead = rng.choice(["The answer is", "So the answer is", "Therefore, the answer is", "Thus the answer is"])
    return "\n".join(row.lines) + f"\n{lead} {_plain(row.gold, rng)}."


def s_final_answer_is(row: Row, rng: random.Random, other: Row) -> str:
    end = rng.choice(["The final answer is {}", "The final answer is {}.", "Therefore, the final answer is: {}.",
                      "So, the final answer is {}."])
    return "\n".join(row.lines) + "\n" + end.format(_plain(row.gold, rng))


def s_minerva(row: Row, rng: random.Random, other: Row) -> str:
    return "\n".join(row.lines) + f"\nFinal Answer: The final answer is ${_latex(row, rng)}$. I hope it is correct."


def s_boxed_qwen(row: Row, rng: random.Random, other: Row) -> str:
    intro = rng.choice(["To solve this problem, we need to follow these steps:", "Let's break down the problem step by step.",
                        "To determine the answer, we calculate as follows:"])
    body = "\n".join(f"{k}. {_latexify(line)}" for k, line in enumerate(row.lines, 1))
    value = _latex(row, rng)
    end = rng.choice([f"Therefore, {_subject(row)} is \\(\\boxed{{{value}}}\\).",
                      f"Thus, the final answer is \\(\\boxed{{{value}}}\\).",
                      f"So, {_subject(row)} is:\n\\[\n\\boxed{{{value}}}\n\\]",
                      f"The answer is $\\boxed{{{value}}}$."])
    return f"{intro}\n\n{body}\n\n{end}"


def s_boxed_units(row: Row, rng: random.Random, other: Row) -> str:
    """DeepSeek-Math / Qwen-Math: a box holding units, currency, percent or LaTeX thousands."""
    kind, noun = _kind(row.question)
    body = row.gold
    neg = body.startswith("-")
    body = body.lstrip("-")
    if len(body) > 3 and "." not in body and "/" not in body:
        body = rng.choice([f"{int(body):,}", f"{int(body):,}".replace(",", "{,}"), f"{int(body):,}".replace(",", ",\\!")])
    body = ("-" if neg else "") + body
    if kind == "money":
        boxed = rng.choice([f"\\${body}", f"{body} \\text{{ dollars}}", f"\\${body}.00" if "." not in body else f"\\${body}"])
    elif kind == "percent":
        boxed = f"{body}\\%"
    elif kind == "count":
        boxed = rng.choice([f"{body} \\text{{ {noun}}}", f"{body}\\ \\text{{{noun}}}", f"\\text{{{body} {noun}}}"])
    else:
        boxed = rng.choice([body, f"{body}.0" if "." not in body else body])
    tail = rng.choice(["", f" {noun or 'in total'}.", "."])
    return "\n".join(_latexify(line) for line in row.lines) + f"\n\nThe final result is $\\boxed{{{boxed}}}${tail}"


def s_llama_steps(row: Row, rng: random.Random, other: Row) -> str:
    """Llama-3.1-Instruct's math format: '## Step k: …' sections, then a boxed final answer."""
    parts = []
    for k, line in enumerate(row.lines, 1):
        title = " ".join(re.sub(r"[^A-Za-z ]", " ", line).split()[:5]).lower() or "compute"
        parts.append(f"## Step {k}: Calculate {title}\n{line}")
    end = rng.choice(["The final answer is: $\\boxed{{{}}}$", "The final answer is $\\boxed{{{}}}$."])
    return "\n\n".join(parts) + "\n\n" + end.format(_latex(row, rng))


def s_md_bold(row: Row, rng: random.Random, other: Row) -> str:
    """Chat models bold intermediate results and the final one, then add a courteous line."""
    lines = []
    for line in row.lines:
        if rng.random() < 0.5:
            line = re.sub(r"(=\s*\$?)(\d[\d,.]*\d|\d)", r"\1**\2**", line, count=1)
        lines.append(line)
    end = rng.choice([f"So, {_subject(row)} is **{_dressed(row, rng)}**.", f"**{_plain(row.gold, rng)}**",
                      f"Therefore, the total is **{_dressed(row, rng)}**."])
    tail = rng.choice(["", "", "\n\nLet me know if you have any other questions!", "\n\nI hope this helps!"])
    return "Let's solve this step by step:\n\n" + "\n".join(f"- {line}" for line in lines) + f"\n\n{end}{tail}"


def s_md_heading(row: Row, rng: random.Random, other: Row) -> str:
    end = rng.choice([f"### Answer\n{_plain(row.gold, rng)}", f"### Final Answer\n{_dressed(row, rng)}",
                      f"### Final Answer\n\\[\n\\boxed{{{_latex(row, rng)}}}\n\\]", f"**Final Answer**\n\n{_dressed(row, rng)}",
                      f"## Answer\n\n**{_dressed(row, rng)}**"])
    return f"### Solution\n{_steps(row.lines)}\n\n{end}"


def s_answer_label(row: Row, rng: random.Random, other: Row) -> str:
    end = rng.choice([f"Answer: {_plain(row.gold, rng)}", f"Answer: {_dressed(row, rng)}", f"**Answer:** {_dressed(row, rng)}",
                      f"**Answer: {_plain(row.gold, rng)}**", f"Final answer: {_plain(row.gold, rng)}",
                      f"**Final Answer:** {_dressed(row, rng)}"])
    return "\n".join(row.lines) + "\n\n" + end


def s_units_currency(row: Row, rng: random.Random, other: Row) -> str:
    end = rng.choice(["The answer is {}.", "So the answer is {} in total.", "The final answer is {}."])
    return "\n".join(row.lines) + "\n" + end.format(_dressed(row, rng))


def _ending(row: Row, rng: random.Random, which: int) -> str:
    """One of the common answer endings (for the run-on styles)."""
    return [
        f"The answer is {_plain(row.gold, rng)}.",
        f"#### {row.gold_text}",
        f"Final Answer: The final answer is ${_latex(row, rng)}$. I hope it is correct.",
        f"Therefore, {_subject(row)} is \\(\\boxed{{{_latex(row, rng)}}}\\).",
        f"**Final Answer:** {_dressed(row, rng)}",
        f"So, {_subject(row)} is **{_dressed(row, rng)}**.",
        f"Answer: {_dressed(row, rng)}",
    ][which]


def s_runon_question(row: Row, rng: random.Random, other: Row) -> str:
    """The answer, then an invented next turn with its own question and answer."""
    which = rng.randrange(7)
    boundary = rng.choice(["\n\nQuestion: ", "\n\nQ: ", "\n\nHuman: ", "\n\n### Instruction:\n", "\n\nUser: ",
                           "\n\nQuestion 2: ", "\n\n**Question:** ", "\n\nProblem: "])
    answer_label = {"\n\nQ: ": "A: ", "\n\nHuman: ": "Assistant: ", "\n\n### Instruction:\n": "### Response:\n",
                    "\n\nUser: ": "Assistant: "}.get(boundary, "Answer: ")
    invented = f"{boundary}{other.question}\n{answer_label}" + "\n".join(other.lines) + "\n" + _ending(other, rng, which)
    return "\n".join(row.lines) + "\n" + _ending(row, rng, which) + invented


def s_runon_explanation(row: Row, rng: random.Random, other: Row) -> str:
    """The answer, then more text with numbers in it: a check, an explanation, a note."""
    which = rng.randrange(7)
    first = row.lines[0]
    tail = rng.choice([f"\n\nThis is because {first[0].lower()}{first[1:]}",
                       f"\n\nExplanation: {' '.join(row.lines)}",
                       f"\n\nLet me double-check: {row.lines[-1]} Yes, that is {len(row.lines)} steps and it is correct.",
                       f"\n\nNote: we used {len(row.lines)} steps; the intermediate values were computed in step 1 ({first}).",
                       " I hope it is correct. If you have 2 or 3 more questions, feel free to ask!"])
    return "\n".join(row.lines) + "\n" + _ending(row, rng, which) + tail


def s_no_marker(row: Row, rng: random.Random, other: Row) -> str:
    """No marker at all: the result closes the last sentence (the last-number fallback)."""
    end = rng.choice(["In total, that is {}.", "So altogether it comes to {}.", "That gives {}."])
    return "\n".join(row.lines) + "\n" + end.format(_dressed(row, rng))


STYLES: dict[str, Style] = {
    "gsm8k ####": s_gsm8k,
    "the answer is": s_answer_is,
    "the final answer is": s_final_answer_is,
    "minerva Final Answer": s_minerva,
    "boxed (qwen)": s_boxed_qwen,
    "boxed + units/latex": s_boxed_units,
    "llama ## Step + boxed": s_llama_steps,
    "markdown bold": s_md_bold,
    "markdown heading": s_md_heading,
    "Answer: label": s_answer_label,
    "units/currency/%": s_units_currency,
    "run-on next question": s_runon_question,
    "run-on explanation": s_runon_explanation,
    "no marker (last number)": s_no_marker,
}


def build_corpus(rows: list[Row], per_style: int, seed: int = 0) -> list[Sample]:
    """`per_style` completions per style (all rows when 0 or more than there are), seeded."""
    out = []
    position = {row.index: i for i, row in enumerate(rows)}
    for name, make in STYLES.items():
        pick = random.Random(f"{seed}:{name}:rows")
        chosen = list(rows) if per_style <= 0 or per_style >= len(rows) else pick.sample(rows, per_style)
        for k, row in enumerate(chosen):
            rng = random.Random(f"{seed}:{name}:{row.index}:{k}")
            other = rows[(position[row.index] + 1 + rng.randrange(max(len(rows) - 1, 1))) % len(rows)]
            out.append(Sample(name, make(row, rng, other), row.gold, row.index))
    return out


def score(corpus: list[Sample], extract: Callable[[str], str | None]) -> dict[str, tuple[int, int]]:
    """style → (correct, total)."""
    out: dict[str, tuple[int, int]] = {}
    for s in corpus:
        ok, n = out.get(s.style, (0, 0))
        out[s.style] = (ok + answers_equal(extract(s.text), s.gold), n + 1)
    return out


def new_extract_number(text: str) -> str | None:
    return extract_answer(text, NUMBER)


# --------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-style", type=int, default=250, help="completions per style (0: every GSM8K test row)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=0, help="print this many misreadings of the current extractor per style")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--smoke", action="store_true", help="3 rows per style, to check that the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.per_style = 3
        print("smoke run: toy sizes, to check that the bench runs; the figures mean nothing", flush=True)
    rows, source = load_rows()
    corpus = build_corpus(rows, args.per_style, args.seed)
    old, new = score(corpus, old_extract_number), score(corpus, new_extract_number)
    print(f"corpus: {len(corpus)} completions, {len(STYLES)} styles, from {source} (seed {args.seed})")
    print("extraction accuracy by style")
    width = max(len(name) for name in STYLES)
    print(f"  {'style':<{width}}  {'n':>5}  {'before':>15}  {'now':>15}")

    def cell(ok: int, n: int) -> str:
        return f"{ok:>5}/{n:<5} {100 * ok / n:5.1f}%" if n else "-"

    for name in STYLES:
        (o, n), (w, _) = old[name], new[name]
        print(f"  {name:<{width}}  {n:>5}  {cell(o, n):>15}  {cell(w, n):>15}")
    to, tn = sum(v[0] for v in old.values()), sum(v[1] for v in old.values())
    tw = sum(v[0] for v in new.values())
    print(f"  {'overall':<{width}}  {tn:>5}  {cell(to, tn):>15}  {cell(tw, tn):>15}")
    if args.show:
        for name in STYLES:
            bad = [s for s in corpus if s.style == name and not answers_equal(new_extract_number(s.text), s.gold)]
            for s in bad[: args.show]:
                print(f"\n--- {name} (row {s.row}): gold {s.gold}, read {new_extract_number(s.text)}\n{s.text}")
    if args.smoke:
        print("(smoke run: not a measurement)")
    if args.json:
        figures = {"source": source, "seed": args.seed, "perStyle": args.per_style,
                   "styles": {name: {"n": old[name][1], "before": old[name][0], "now": new[name][0]} for name in STYLES},
                   "overall": {"n": tn, "before": to, "now": tw}}
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
