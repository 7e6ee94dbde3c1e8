"""Sharded stages on the local executor, through the real runtime (stand-in stage bodies,
tests/fake_stage.py): shards run as parallel processes, the last one merges, and a failed
shard is retried alone. The real sample/evaluate bodies are in tests/e2e/test_shards.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from selfimprove_operator.local import LocalExecutor, local_run
from selfimprove_operator.manifest import load_runs

HERE = Path(__file__).resolve().parents[1]
FAKE = f"{sys.executable} {HERE / 'fake_stage.py'}"

MANIFEST = """\
apiVersion: selfimprove.dev/v1alpha1
kind: SelfImproveRun
metadata: {{name: shards}}
spec:
  strategy: lmsi
  model: {{base: /nonexistent/model}}
  data: {{questions: {data}/q.jsonl, evaluation: {data}/e.jsonl}}
  rounds: {{max: 1, patience: 0}}
  retry: {{limit: 2, backoffSeconds: 0}}
  resources: {{gpus: 0, shards: 2}}
  storage: {{uri: s3://ignored-when-running-locally/}}
"""


def write_manifest(tmp_path: Path) -> Path:
    (tmp_path / "q.jsonl").write_text('{"question": "1+1?"}\n')
    (tmp_path / "e.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n')
    path = tmp_path / "run.yaml"
    path.write_text(MANIFEST.format(data=tmp_path))
    return path


def test_selfimprove_run_with_two_shards_finishes(tmp_path):
    ledger, storage = tmp_path / "ledger", tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "selfimprove_operator.cli", "run", str(write_manifest(tmp_path)),
                           "--storage", str(storage), "--stage-command", FAKE], capture_output=True, text=True,
                          env={**os.environ, "FAKE_STAGE_LEDGER": str(ledger)}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = ledger.read_text().split()
    # sample, filter and evaluate ran as two shards each; train whole.
    assert sorted(lines) == sorted(["0:evaluate:1:shard0", "0:evaluate:1:shard1", "1:sample:1:shard0",
                                    "1:sample:1:shard1", "1:filter:1:shard0", "1:filter:1:shard1", "1:train:1",
                                    "1:evaluate:1:shard0", "1:evaluate:1:shard1"])
    sample = storage / "local" / "shards" / "round-001" / "sample"
    rows = [json.loads(x)["row"] for x in (sample / "out.jsonl").read_text().splitlines()]
    assert rows == list(range(10))
    status = json.loads((storage / "local" / "shards" / "status.json").read_text())
    st = status["rounds"][1]["stages"][0]
    assert (st["name"], st["state"], st["shards"]) == ("sample", "Succeeded", "2/2")


def test_a_failed_shard_is_retried_alone(tmp_path):
    ledger, storage = tmp_path / "ledger", tmp_path / "runs"
    run = local_run(load_runs(write_manifest(tmp_path))[0], str(storage))
    starts = []
    ex = LocalExecutor(run, stage_command=FAKE.split(), poll_seconds=0.05, workdir=tmp_path / "work")
    original = ex._start
    ex._start = lambda s: (starts.append(s), original(s))[1]  # type: ignore[method-assign]
    os.environ["FAKE_STAGE_FAIL_SHARD"], os.environ["FAKE_STAGE_LEDGER"] = "1:sample:shard1", str(ledger)
    try:
        status = ex.run_to_end()
    finally:
        del os.environ["FAKE_STAGE_FAIL_SHARD"], os.environ["FAKE_STAGE_LEDGER"]
    assert status.phase == "Succeeded", status.message
    samples = [s for s in starts if s.stage == "sample"]
    assert [(s.attempt, s.task.shard_indexes) for s in samples] == [(1, None), (2, [1])]
    lines = ledger.read_text().split()
    # Shard 0 ran once; shard 1 failed on attempt 1 and ran again on attempt 2.
    assert [x for x in lines if x.startswith("1:sample")] == sorted(
        ["1:sample:1:shard0", "1:sample:1:shard1", "1:sample:2:shard1"], key=lines.index)
    stage = status.rounds[1].stages[0]
    assert (stage.attempts, stage.failures, stage.shards, stage.completed_shards) == (2, 1, "2/2", [0, 1])
    sample = storage / "local" / "shards" / "round-001" / "sample"
    rows = [json.loads(x)["row"] for x in (sample / "out.jsonl").read_text().splitlines()]
    assert rows == list(range(10)) and (sample / "_SUCCESS").exists()
    assert json.loads((sample / "result.json").read_text())["summary"]["shards"] == 2


def test_the_live_progress_of_a_sharded_stage_counts_both_shards(tmp_path, monkeypatch):
    """Each shard process logs 3 steps: the stage's progress is out of 2 × 3, not one shard's 3."""
    run = local_run(load_runs(write_manifest(tmp_path))[0], str(tmp_path / "runs"))
    seen: list[tuple[int, int]] = []

    def watch(ex: LocalExecutor) -> None:
        if (prog := ex.status.progress) is not None and prog.stage == "sample":
            seen.append((prog.done, prog.total))

    monkeypatch.setenv("FAKE_STAGE_SLEEP_SAMPLE", "1.5")
    ex = LocalExecutor(run, stage_command=FAKE.split(), poll_seconds=0.05, workdir=tmp_path / "work", on_update=watch)
    assert ex.run_to_end().phase == "Succeeded"
    assert seen and all(total == 6 for _, total in seen), seen
    assert max(done for done, _ in seen) >= 4, seen   # both shards' steps add up
