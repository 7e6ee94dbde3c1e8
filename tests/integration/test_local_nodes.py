"""Multi-node training on the local executor (`selfimprove run`), through the real runtime with a
stand-in stage body (tests/fake_node_stage.py): a train stage with `nodes: 2` runs as two node
processes with JOB_COMPLETION_INDEX 0 and 1 and one rendezvous on 127.0.0.1, node 0 commits and
both report its summary; one node failing stops the other and fails the attempt, and the retry
rendezvouses under a new id. Real training on two nodes: tests/e2e/test_train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from selfimprove_operator.local import LocalExecutor, local_run
from selfimprove_operator.manifest import load_runs

HERE = Path(__file__).resolve().parents[1]
FAKE = f"{sys.executable} {HERE / 'fake_node_stage.py'}"

MANIFEST = """\
apiVersion: selfimprove.dev/v1alpha1
kind: SelfImproveRun
metadata: {{name: duo}}
spec:
  strategy: lmsi
  model: {{base: /nonexistent/model}}
  data: {{questions: {data}/q.jsonl, evaluation: {data}/e.jsonl}}
  rounds: {{max: 1, patience: 0}}
  retry: {{limit: 2, backoffSeconds: 0}}
  resources: {{gpus: 0, stages: {{train: {{nodes: 2}}}}}}
  storage: {{uri: s3://ignored-when-running-locally/}}
"""


def write_manifest(tmp_path: Path) -> Path:
    (tmp_path / "q.jsonl").write_text('{"question": "1+1?"}\n')
    (tmp_path / "e.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n')
    path = tmp_path / "run.yaml"
    path.write_text(MANIFEST.format(data=tmp_path))
    return path


def test_selfimprove_run_trains_on_two_node_processes(tmp_path):
    ledger, storage = tmp_path / "ledger", tmp_path / "runs"
    env = {**os.environ, "FAKE_NODE_LEDGER": str(ledger), "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "selfimprove_operator.cli", "run", str(write_manifest(tmp_path)),
                           "--storage", str(storage), "--stage-command", FAKE], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = sorted(ledger.read_text().split())
    assert [line.split(":")[:4] for line in lines] == [["1", "train", "1", "node0"], ["1", "train", "1", "node1"]]
    # Both nodes got the same rendezvous: the attempt's Job name as id, one port on 127.0.0.1.
    assert len({tuple(line.split(":")[4:]) for line in lines}) == 1
    assert lines[0].split(":")[4] == "duo-r1-train" and lines[0].split(":")[5] == "127.0.0.1"
    train = storage / "local" / "duo" / "round-001" / "train"
    assert json.loads((train / "result.json").read_text())["summary"]["metrics"]["trainLoss"] == 0.5
    status = json.loads((storage / "local" / "duo" / "status.json").read_text())
    st = next(s for s in status["rounds"][1]["stages"] if s["name"] == "train")
    assert (st["state"], st["attempts"]) == ("Succeeded", 1)
    assert status["rounds"][1]["trainLoss"] == 0.5


def test_one_failed_node_stops_the_other_and_the_retry_rendezvouses_anew(tmp_path):
    ledger, storage = tmp_path / "ledger", tmp_path / "runs"
    run = local_run(load_runs(write_manifest(tmp_path))[0], str(storage))
    ex = LocalExecutor(run, stage_command=FAKE.split(), poll_seconds=0.05, workdir=tmp_path / "work")
    saved = dict(os.environ)
    os.environ.update(FAKE_NODE_LEDGER=str(ledger), FAKE_NODE_FAIL="1:node1",
                      PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    try:
        status = ex.run_to_end()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert status.phase == "Succeeded", status.message
    st = next(s for s in status.rounds[1].stages if s.name == "train")
    assert (st.attempts, st.failures) == (2, 1)
    lines = ledger.read_text().split()
    first = [x for x in lines if x.startswith("1:train:1:")]
    retry = [x for x in lines if x.startswith("1:train:2:")]
    assert len(first) == len(retry) == 2
    assert {x.split(":")[4] for x in first} == {"duo-r1-train"} and {x.split(":")[4] for x in retry} == {"duo-r1-train-a2"}
    # Node 0 of attempt 1 waited on its lost peer and was stopped (not left running for 600 s).
    log = (tmp_path / "work" / "duo-r1-train.node-1.log").read_text()
    assert "lost the connection to a peer" in log
