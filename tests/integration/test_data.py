"""Question data: parsing, GSM8K answers, and file:line errors, on local files and on S3."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from selfimprove_workers.data import (
    Example,
    example_id,
    load_examples,
    parse_example,
    split_final_answer,
)
from selfimprove_workers.errors import DataError, NotFoundError
from selfimprove_workers.storage import FileStorage, S3Storage, storage_for


def gsm8k_dir() -> Path:
    """shared/ sits beside the repository (here and in CI's fresh clone); env var overrides."""
    env = os.environ.get("SELFIMPROVE_GSM8K_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared/data/gsm8k"


needs_gsm8k = pytest.mark.skipif(
    not (gsm8k_dir() / "test.jsonl").is_file(), reason="GSM8K data not found (SELFIMPROVE_GSM8K_DIR)"
)
NUMBER = re.compile(r"-?\d+(\.\d+)?")


# ------------------------------------------------------------------------------------------
# Answers


@pytest.mark.parametrize(
    ("text", "rationale", "final"),
    [
        ("She has 3 + 4 = 7.\n#### 7", "She has 3 + 4 = 7.", "7"),
        ("Total is 1,000 + 234 = 1,234\n####  1,234 ", "Total is 1,000 + 234 = 1,234", "1234"),
        ("#### 12,345,678", None, "12345678"),
        ("  42  ", None, "42"),
        ("-3,500.25", None, "-3500.25"),
        ("Paris, France", None, "Paris, France"),
        ("1,5", None, "1,5"),  # not a thousands separator
        ("a #### b\n#### 9", "a #### b", "9"),  # the last marker wins
    ],
)
def test_split_final_answer(text: str, rationale: str | None, final: str) -> None:
    assert split_final_answer(text) == (rationale, final)


def test_example_ids_are_stable_and_explicit_ids_win() -> None:
    q = "How many eggs?"
    a = parse_example({"question": q}, "f:1")
    b = parse_example({"question": q, "answer": "3"}, "g:9")
    assert a.id == b.id == example_id(q)
    assert re.fullmatch(r"q-[0-9a-f]{12}", a.id)
    assert parse_example({"question": "Other?"}, "f:1").id != a.id
    assert parse_example({"question": q, "id": 17}, "f:1").id == "17"
    assert parse_example({"question": q, "id": "gsm-1"}, "f:1").id == "gsm-1"


def test_parse_example_values() -> None:
    ex = parse_example({"question": "Q?", "answer": "Because.\n#### 1,200", "extra": [1]}, "f:1")
    assert ex == Example(
        id=example_id("Q?"), question="Q?", answer="Because.\n#### 1,200", rationale="Because.", final="1200"
    )
    assert parse_example({"question": "Q?", "answer": 12}, "f:1").final == "12"
    assert parse_example({"question": "Q?", "answer": 2.5}, "f:1").final == "2.5"
    no_answer = parse_example({"question": "Q?", "answer": None}, "f:1")
    assert (no_answer.answer, no_answer.rationale, no_answer.final) == (None, None, None)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"answer": "1"}, 'f.jsonl:3: missing "question"'),
        ({"question": None}, 'f.jsonl:3: missing "question"'),
        ({"question": 5}, 'f.jsonl:3: "question" must be a string, got number'),
        ({"question": ["a"]}, 'f.jsonl:3: "question" must be a string, got array'),
        ({"question": "  \n"}, 'f.jsonl:3: "question" is empty'),
        ({"question": "Q", "answer": True}, 'f.jsonl:3: "answer" must be a string or number, got boolean'),
        ({"question": "Q", "answer": {"x": 1}}, 'f.jsonl:3: "answer" must be a string or number, got dict'),
        ({"question": "Q", "answer": [1]}, 'f.jsonl:3: "answer" must be a string or number, got array'),
        ({"question": "Q", "answer": " "}, 'f.jsonl:3: "answer" is empty'),
        ({"question": "Q", "answer": "work ####  "}, 'f.jsonl:3: "answer" has nothing after "####"'),
        ({"question": "Q", "answer": float("nan")}, 'f.jsonl:3: "answer" must be a finite number'),
        ({"question": "Q", "id": 1.5}, 'f.jsonl:3: "id" must be a string or integer, got number'),
        ({"question": "Q", "id": False}, 'f.jsonl:3: "id" must be a string or integer, got boolean'),
        ({"question": "Q", "id": ""}, 'f.jsonl:3: "id" is empty'),
        (["question"], "f.jsonl:3: expected a JSON object, got array"),
    ],
)
def test_parse_example_errors(obj: Any, message: str) -> None:
    with pytest.raises(DataError) as ei:
        parse_example(obj, "f.jsonl:3")
    assert str(ei.value).startswith(message)


# ------------------------------------------------------------------------------------------
# GSM8K, the real files


@needs_gsm8k
def test_gsm8k_test_set_loads_with_numeric_finals() -> None:
    path = gsm8k_dir() / "test.jsonl"
    examples = load_examples(FileStorage(), str(path), require_answer=True)
    assert len(examples) == 1319
    assert len({e.id for e in examples}) == 1319
    for ex in examples:
        assert ex.final is not None and NUMBER.fullmatch(ex.final), (ex.id, ex.final)
        assert ex.rationale and "####" not in ex.rationale
    first = examples[0]
    assert first.question.startswith("Janet")
    assert first.final == "18"
    # file:// URIs load the same examples.
    assert load_examples(FileStorage(), f"file://{path}", limit=5) == examples[:5]


@needs_gsm8k
def test_gsm8k_train_set_loads() -> None:
    examples = load_examples(storage_for(str(gsm8k_dir() / "train.jsonl")), str(gsm8k_dir() / "train.jsonl"))
    assert len(examples) == 7473
    assert all(e.final is not None and NUMBER.fullmatch(e.final) for e in examples)
    # Thousands separators are gone from finals (the raw answers have some).
    assert any("," in e.answer.rpartition("####")[2] for e in examples if e.answer)


# ------------------------------------------------------------------------------------------
# Malformed files, local and S3


GOOD = {"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}


def _lines(*items: Any) -> bytes:
    out = []
    for item in items:
        out.append(item if isinstance(item, str) else json.dumps(item))
    return ("\n".join(out) + "\n").encode()


MALFORMED = [
    pytest.param(_lines(GOOD, '{"question": "x" "answer": 1}'), ":2: invalid JSON: Expecting ',' delimiter at column 18", id="bad-json"),
    pytest.param(_lines(GOOD, "", {"answer": "3"}), ':3: missing "question"', id="missing-question"),
    pytest.param(_lines(GOOD, GOOD | {"id": "x"}, [1, 2]), ":3: expected a JSON object, got array", id="not-object"),
    pytest.param(_lines({"question": ""}), ':1: "question" is empty', id="empty-question"),
    pytest.param(_lines(GOOD, {"question": "Q", "id": 7}, GOOD), ":3: duplicate id ", id="duplicate-auto-id"),
    pytest.param(_lines({"question": "A", "id": 7}, {"question": "B", "id": "7"}), ":2: duplicate id '7' (first on line 1)", id="duplicate-id"),
]


@pytest.mark.parametrize(("content", "suffix"), MALFORMED)
def test_malformed_local_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, suffix: str) -> None:
    # Relative path, as a user would write it in a manifest: the message shows it as given.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/x.jsonl").write_bytes(content)
    with pytest.raises(DataError) as ei:
        load_examples(FileStorage(), "data/x.jsonl")
    assert str(ei.value).startswith("data/x.jsonl" + suffix)
    # file:// URIs are shown as their plain path.
    with pytest.raises(DataError) as ei:
        load_examples(FileStorage(), f"file://{tmp_path}/data/x.jsonl")
    assert str(ei.value).startswith(f"{tmp_path}/data/x.jsonl" + suffix)


@pytest.mark.s3
@pytest.mark.parametrize(("content", "suffix"), MALFORMED)
def test_malformed_s3_object(s3_server: Any, s3_bucket: str, content: bytes, suffix: str) -> None:
    s = S3Storage(endpoint=s3_server.endpoint)
    uri = f"{s3_bucket}/data/x.jsonl"
    s.write_bytes(uri, content)
    with pytest.raises(DataError) as ei:
        load_examples(s, uri)
    assert str(ei.value).startswith(uri + suffix)


def test_require_answer_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_bytes(_lines(GOOD, {"question": "Unlabeled?"}, "not even json"))
    with pytest.raises(DataError, match=re.escape(f'{path}:2: missing "answer"')):
        load_examples(FileStorage(), str(path), require_answer=True)
    # limit stops before the broken third line is read.
    assert [e.question for e in load_examples(FileStorage(), str(path), limit=2)] == [
        "What is 2 + 2?",
        "Unlabeled?",
    ]
    assert load_examples(FileStorage(), str(path), limit=0) == []
    with pytest.raises(ValueError):
        load_examples(FileStorage(), str(path), limit=-1)
    with pytest.raises(NotFoundError):
        load_examples(FileStorage(), str(tmp_path / "missing.jsonl"))


@needs_gsm8k
@pytest.mark.s3
def test_gsm8k_from_s3(s3_server: Any, s3_bucket: str) -> None:
    s = S3Storage(endpoint=s3_server.endpoint)
    uri = f"{s3_bucket}/gsm8k/test.jsonl"
    s.upload_file(gsm8k_dir() / "test.jsonl", uri)
    from_s3 = load_examples(s, uri, require_answer=True)
    local = load_examples(FileStorage(), str(gsm8k_dir() / "test.jsonl"))
    assert from_s3 == local
    assert len(from_s3) == 1319
