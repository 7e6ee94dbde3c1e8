"""`selfimprove report`: what it refuses and the calibration numbers. The report of a real run is
checked end to end in tests/e2e/test_e2e_local.py (and the demo's is in docs/report.png)."""

from __future__ import annotations

import json

import pytest
from selfimprove_operator.cli import main
from selfimprove_operator.report import ReportError, build_report, calibration, load_labels
from selfimprove_workers.spec import AnswerSpec


def test_calibration_bins_majority_accuracy_by_confidence():
    votes = [
        {"id": "a", "question": "qa", "majority": "3", "confidence": 0.95},
        {"id": "b", "question": "qb", "majority": "4", "confidence": 0.92},
        {"id": "c", "question": "qc", "majority": None, "confidence": 0.0},
        {"id": "d", "question": "qd", "majority": "1,000", "confidence": 0.35},
        {"id": "x", "question": "unknown", "majority": "1", "confidence": 0.5},   # no label: not counted
        {"id": "e", "question": "qe", "majority": "7", "confidence": 1.0},       # 1.0 falls in the top bin
    ]
    labels = {"id:a": "3", "id:b": "5", "q:qc": "2", "id:d": "1000", "id:e": "7"}
    table = calibration(votes, labels, bins=10)
    assert [(t["n"], t["correct"]) for t in table if t["n"]] == [(1, 0), (1, 1), (3, 2)]
    assert table[0]["lo"] == 0.0 and table[9]["hi"] == 1.0 and table[9]["accuracy"] == pytest.approx(2 / 3)
    assert table[5]["accuracy"] is None


def test_labels_by_id_and_question_with_the_answer_rule(tmp_path):
    f = tmp_path / "labels.jsonl"
    f.write_text(json.dumps({"id": "q1", "question": "What is 1+1? ", "answer": "1 + 1 = 2 #### 2"}) + "\n")
    labels = load_labels(f.as_uri(), AnswerSpec())
    assert labels == {"id:q1": "2", "q:What is 1+1?": "2"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "q1", "question": "no answer"}) + "\n")
    with pytest.raises(ReportError, match=r"--labels: .*bad.jsonl:1"):
        load_labels(bad.as_uri(), AnswerSpec())


def test_bad_run_arguments_are_named(tmp_path, capsys):
    with pytest.raises(ReportError, match="no such directory or manifest"):
        build_report(str(tmp_path / "missing"))
    with pytest.raises(ReportError, match=r"no round-NNN/ folders: not a run's artifacts"):
        build_report(str(tmp_path))
    with pytest.raises(ReportError, match=r"--labels: .*nope.jsonl: no such file"):
        build_report(str(tmp_path), labels=str(tmp_path / "nope.jsonl"))
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such directory or manifest" in capsys.readouterr().err
