"""`selfimprove data gsm8k`: the files the GSM8K examples name, written from ../shared/data/gsm8k
to a directory and to a real S3 server; and the evaluation's accuracy on them is GSM8K's
standard one (the number after `####` is gold, numeric equality with the final answer)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from selfimprove_operator.cli import main
from selfimprove_operator.datasets import FILES, prepare_gsm8k
from selfimprove_workers.answers import answers_equal, extract_answer
from selfimprove_workers.data import load_examples
from selfimprove_workers.engines.base import Completion, GenerationOutput
from selfimprove_workers.spec import AnswerSpec
from selfimprove_workers.stages.evaluate import score
from selfimprove_workers.storage import storage_for

SOURCE = Path("/work/shared/data/gsm8k")
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not (SOURCE / "train.jsonl").is_file(), reason="GSM8K is not on this machine")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line]  # not splitlines: U+2028 sits inside strings


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gsm8k")
    assert main(["data", "gsm8k", "--source", str(SOURCE), "--out", str(out)]) == 0
    return out


def test_the_files_the_examples_name_are_written(written):
    named = set()
    for manifest in sorted((REPO / "examples").glob("*-gsm8k.yaml")):
        data = yaml.safe_load(manifest.read_text())["spec"]["data"]
        named |= {uri.removeprefix("s3://datasets/gsm8k/") for uri in data.values()}
    assert named == set(FILES) == {p.name for p in written.iterdir()}


def test_splits_are_disjoint_complete_and_unlabeled_where_they_must_be(written):
    train = rows(SOURCE / "train.jsonl")
    questions, valid, seed = (rows(written / f) for f in ("train-questions.jsonl", "valid-100.jsonl", "seed-100.jsonl"))
    assert (len(questions), len(valid), len(seed)) == (len(train) - 200, 100, 100)
    assert all(set(r) == {"id", "question"} for r in questions)  # LMSI never sees a label
    ids = [r["id"] for r in questions + valid + seed]
    assert len(set(ids)) == len(ids) == len(train)
    for r in valid + seed:  # labels as GSM8K wrote them, at the row's own position
        assert train[int(r["id"].rsplit("-", 1)[1])] == {"question": r["question"], "answer": r["answer"]}
    assert rows(written / "test.jsonl")[0]["id"] == "gsm8k-test-0000" and len(rows(written / "test.jsonl")) == 1319


def test_the_same_seed_writes_the_same_bytes_and_another_seed_other_held_out_rows(written, tmp_path):
    prepare_gsm8k(SOURCE, str(tmp_path / "again"))
    prepare_gsm8k(SOURCE, str(tmp_path / "other"), seed=1)
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (written / name).read_bytes()
    assert (tmp_path / "other" / "valid-100.jsonl").read_bytes() != (written / "valid-100.jsonl").read_bytes()


def test_written_to_s3(s3_server, s3_bucket, written):
    prefix = f"{s3_bucket}/datasets/gsm8k/"
    done = prepare_gsm8k(SOURCE, prefix, endpoint=s3_server.endpoint)
    storage = storage_for(prefix, endpoint=s3_server.endpoint)
    assert done.counts["test.jsonl"] == 1319
    for name in FILES:
        assert storage.read_bytes(prefix + name) == (written / name).read_bytes()


def test_a_bad_source_names_the_file_and_line(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "answer": "2"}\n')
    assert main(["data", "gsm8k", "--source", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'train.jsonl'}:2: expected GSM8K's" in capsys.readouterr().err


# --------------------------------------------------------------------------- standard accuracy
# The reference: lm-evaluation-harness's gsm8k "strict-match" — the number after `####`, commas
# removed, compared as numbers.
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")


def reference_correct(completion: str, gold_answer: str) -> bool:
    m, g = _STRICT.search(completion), _STRICT.search(gold_answer)
    assert g is not None
    if m is None:
        return False
    try:
        return float(m.group(1).replace(",", "").rstrip(".")) == float(g.group(1).replace(",", ""))
    except ValueError:
        return False


def accuracy(examples, completions: list[str]) -> float:
    spec = AnswerSpec(type="number")
    golds = [extract_answer(ex.final, spec) for ex in examples]
    assert None not in golds  # every GSM8K gold answer is a number the extractor reads
    outputs = [GenerationOutput(prompt="", completions=[Completion(text=c, tokens=1)]) for c in completions]
    return score(examples, golds, outputs, spec)[1] / len(examples)


def test_gsm8k_accuracy_is_the_standard_one(written):
    uri = (written / "test.jsonl").as_uri()
    examples = load_examples(storage_for(uri), uri, require_answer=True)
    raw = rows(written / "test.jsonl")
    golds = [r["answer"] for r in raw]
    # GSM8K's own solutions as completions: every one right, as the reference says.
    assert accuracy(examples, golds) == 1.0 == sum(map(reference_correct, golds, golds)) / len(golds)

    # Off by one in the final line, a few thousands separators, a trailing period, and half the
    # answers restated as an instruct model would: the two metrics agree row for row.
    def variant(i: int, text: str) -> str:
        body, _, final = text.rpartition("#### ")
        n = int(final.replace(",", ""))
        if i % 4 == 0:
            return f"{body}#### {n + 1}"
        if i % 4 == 1:
            return f"{body}#### {n:,}."
        return f"{body}#### {n}"

    varied = [variant(i, g) for i, g in enumerate(golds)]
    ours = [answers_equal(extract_answer(c, AnswerSpec(type="number")), extract_answer(ex.final, AnswerSpec(type="number")))
            for c, ex in zip(varied, examples)]
    assert ours == [reference_correct(c, g) for c, g in zip(varied, golds)]
    assert accuracy(examples, varied) == pytest.approx(0.75, abs=0.001)
