"""The local executor and `selfimprove run` / `status`, with a stand-in stage body.

The stage processes are real (`python fake_stage.py TASK.json` through the real runtime); only
the model work is replaced, so these tests cover planning, persistence, resume, Ctrl-C and
failure handling in seconds. The real stages run in tests/e2e/test_e2e_local.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from selfimprove_operator.local import LocalExecutor, StatusStore, local_run
from selfimprove_operator.manifest import load_runs

HERE = Path(__file__).resolve().parents[1]  # the fixture modules' folder
FAKE = f"{sys.executable} {HERE / 'fake_stage.py'}"

MANIFEST = """\
apiVersion: selfimprove.dev/v1alpha1
kind: SelfImproveRun
metadata: {{name: local-test}}
spec:
  strategy: lmsi
  model: {{base: /nonexistent/model}}
  data: {{questions: {data}/q.jsonl, evaluation: {data}/e.jsonl}}
  rounds: {{max: {rounds}, patience: 0}}
  retry: {{limit: 2, backoffSeconds: 0}}
  resources: {{gpus: 0}}
  storage: {{uri: s3://ignored-when-running-locally/}}
"""


@pytest.fixture
def manifest(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    # The data files exist (every stage checks the run's pinned inputs); the stand-in never reads them.
    (tmp_path / "q.jsonl").write_text('{"question": "1+1?"}\n')
    (tmp_path / "e.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n')
    path.write_text(MANIFEST.format(rounds=2, data=tmp_path))
    return path


def cli(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selfimprove_operator.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300, **kw)


def ledger_lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_run_to_success_and_status_table(manifest, tmp_path):
    ledger = tmp_path / "ledger"
    storage = tmp_path / "runs"
    proc = cli(["run", str(manifest), "--storage", str(storage), "--stage-command", FAKE], env={"FAKE_STAGE_LEDGER": str(ledger)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "★ best" in proc.stdout and "Succeeded" in proc.stdout
    assert ledger_lines(ledger) == [
        "0:evaluate:1",
        "1:sample:1", "1:filter:1", "1:train:1", "1:evaluate:1",
        "2:sample:1", "2:filter:1", "2:train:1", "2:evaluate:1",
    ]
    status = json.loads((storage / "local" / "local-test" / "status.json").read_text())
    assert status["phase"] == "Succeeded" and status["bestRound"] == 2
    assert [r["accuracy"] for r in status["rounds"]] == [0.2, 0.3, 0.4]
    # Every stage committed its outputs with a marker.
    for stage in ("sample", "filter", "train", "evaluate"):
        assert (storage / "local" / "local-test" / "round-001" / stage / "_SUCCESS").exists()

    shown = cli(["status", str(manifest), "--storage", str(storage)])
    assert shown.returncode == 0 and "★ best" in shown.stdout and "40.0%" in shown.stdout

    # Running the same command again resumes a finished run: nothing runs again.
    again = cli(["run", str(manifest), "--storage", str(storage), "--stage-command", FAKE], env={"FAKE_STAGE_LEDGER": str(ledger)})
    assert again.returncode == 0
    assert len(ledger_lines(ledger)) == 9


def _kill_during(manifest, tmp_path, sig: int) -> tuple[Path, Path, subprocess.Popen]:
    ledger, storage = tmp_path / "ledger", tmp_path / "runs"
    env = {**os.environ, "FAKE_STAGE_LEDGER": str(ledger), "FAKE_STAGE_SLEEP_TRAIN": "30"}
    runner = subprocess.Popen([sys.executable, "-m", "selfimprove_operator.cli", "run", str(manifest), "--storage", str(storage),
                               "--stage-command", FAKE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while "1:train:1" not in ledger_lines(ledger):
        assert time.time() < deadline and runner.poll() is None, runner.communicate()
        time.sleep(0.1)
    runner.send_signal(sig)
    runner.wait(timeout=60)
    return ledger, storage, runner


def test_kill_during_training_then_resume_runs_no_completed_stage_twice(manifest, tmp_path):
    ledger, storage, runner = _kill_during(manifest, tmp_path, signal.SIGKILL)
    before = ledger_lines(ledger)
    assert before == ["0:evaluate:1", "1:sample:1", "1:filter:1", "1:train:1"]
    # The orphaned stage dies with its runner (PR_SET_PDEATHSIG), so it cannot commit later.
    time.sleep(1)
    assert not (storage / "local" / "local-test" / "round-001" / "train" / "_SUCCESS").exists()
    proc = cli(["run", str(manifest), "--storage", str(storage), "--stage-command", FAKE], env={"FAKE_STAGE_LEDGER": str(ledger)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = ledger_lines(ledger)
    ran = [line.rsplit(":", 1)[0] for line in after]
    assert ran.count("0:evaluate") == ran.count("1:sample") == ran.count("1:filter") == 1
    assert after[4] == "1:train:2"  # the interrupted stage restarted as a new attempt
    status = json.loads((storage / "local" / "local-test" / "status.json").read_text())
    assert status["phase"] == "Succeeded"
    train = status["rounds"][1]["stages"][2]
    assert train["attempts"] == 2 and train["failures"] == 0


def test_ctrl_c_stops_cleanly_and_resumes(manifest, tmp_path):
    ledger, storage, runner = _kill_during(manifest, tmp_path, signal.SIGINT)
    out, err = runner.communicate()
    assert runner.returncode == 130, out + err
    assert "run the same command again to resume" in out
    status = json.loads((storage / "local" / "local-test" / "status.json").read_text())
    assert status["rounds"][1]["stages"][2]["state"] == "Pending"
    proc = cli(["run", str(manifest), "--storage", str(storage), "--stage-command", FAKE], env={"FAKE_STAGE_LEDGER": str(ledger)})
    assert proc.returncode == 0
    assert [line_.rsplit(":", 1)[0] for line_ in ledger_lines(ledger)].count("1:filter") == 1


def test_permanent_failure_ends_run_and_keeps_artifacts(manifest, tmp_path):
    storage = tmp_path / "runs"
    proc = cli(["run", str(manifest), "--storage", str(storage), "--stage-command", FAKE], env={"FAKE_STAGE_BAD": "1:filter"})
    assert proc.returncode == 1
    assert "data/questions.jsonl:7" in proc.stdout  # the stage's message on screen
    status = json.loads((storage / "local" / "local-test" / "status.json").read_text())
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BadInput" and "questions.jsonl:7" in failed["message"]
    assert (storage / "local" / "local-test" / "round-001" / "sample" / "_SUCCESS").exists()


def test_transient_failure_is_retried(manifest, tmp_path):
    storage, ledger = tmp_path / "runs", tmp_path / "ledger"
    run = local_run(load_runs(manifest)[0], str(storage))
    os.environ["FAKE_STAGE_FAIL"], os.environ["FAKE_STAGE_LEDGER"] = "1:train", str(ledger)
    try:
        status = LocalExecutor(run, stage_command=FAKE.split(), poll_seconds=0.05).run_to_end()
    finally:
        del os.environ["FAKE_STAGE_FAIL"], os.environ["FAKE_STAGE_LEDGER"]
    assert status.phase == "Succeeded"
    train = status.rounds[1].stages[2]
    assert (train.attempts, train.failures) == (2, 1)
    assert "1:train:2" in ledger_lines(ledger)
    assert StatusStore(run).load() == status


def test_invalid_manifest_runs_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(MANIFEST.format(rounds=0, data=tmp_path))
    proc = cli(["run", str(bad), "--storage", str(tmp_path / "runs")])
    assert proc.returncode == 2
    assert "spec.rounds.max: must be ≥ 1" in proc.stderr
    assert not (tmp_path / "runs").exists()
