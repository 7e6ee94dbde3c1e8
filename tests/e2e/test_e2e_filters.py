"""`selfimprove run` with the issue-16 filters in a manifest: the rewardModel filter keeps the top
half by a tiny random reward model (the run is stopped once the filter stage committed), and the
correct filter on an unlabeled questions file fails the run with the file, line and setting named.
Real stages: vLLM (CPU build) samples with the tiny random Llama."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from model_fixtures import require_vllm
from selfimprove_workers.demo.arithmetic import write_splits

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

# test_e2e_local.py's shortened demo (round 0 and one LMSI round, tiny sizes).
MANIFEST = """\
apiVersion: selfimprove.dev/v1alpha1
kind: SelfImproveRun
metadata: {{name: e2e}}
spec:
  strategy: lmsi
  model: {{base: {model}}}
  data: {{questions: {data}/unlabeled.jsonl, evaluation: {data}/eval.jsonl}}
  task: {{answer: {{type: number}}, chatTemplate: false}}
  engine: {{kind: vllm, enforceEager: true, maxModelLen: 256, maxLoraRank: 8}}
  sampling: {{paths: 4, temperature: 1.0, maxTokens: 24}}
  filters: [{{consistency: {{minConfidence: 0.0}}}}]
  training:
    lora: {{r: 8, alpha: 16, targetModules: [q_proj, v_proj]}}
    epochs: 1
    batchSize: 8
    maxLength: 256
    formats: [zeroShotCot]
  evaluation: {{format: zeroShotCot, maxTokens: 24}}
  rounds: {{max: 1, patience: 0}}
  retry: {{limit: 1, backoffSeconds: 0}}
  resources: {{gpus: 0}}
  storage: {{uri: s3://unused/}}
"""


def cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "selfimprove_operator.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def manifest(tmp_path: Path, model: Path, data: Path, name: str, filters: str) -> Path:
    text = MANIFEST.format(model=model, data=data).replace("metadata: {name: e2e}", f"metadata: {{name: {name}}}")
    text = text.replace("  filters: [{consistency: {minConfidence: 0.0}}]", f"  filters: {filters}")
    assert f"filters: {filters}" in text and f"name: {name}" in text
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_reward_model_and_correct_filters_from_a_manifest(tmp_path: Path, tiny_model_dir: Path,
                                                         tiny_reward_model_dir: Path) -> None:
    require_vllm()
    data = tmp_path / "data"
    write_splits(data, seed=0, n_warm=2, n_unlabeled=4, n_eval=3)
    storage, work = tmp_path / "runs", tmp_path / "work"

    # rewardModel: run until round 1's filter stage has committed, then stop the runner.
    m = manifest(tmp_path, tiny_model_dir, data, "rm",
                 f"[{{consistency: {{minConfidence: 0.0}}}}, {{rewardModel: {{model: {tiny_reward_model_dir}, keep: 0.5}}}}]")
    runner = cli("run", str(m), "--storage", str(storage), "--workdir", str(work / "rm"))
    filter_dir = storage / "local" / "rm" / "round-001" / "filter"
    deadline = time.time() + 600
    while not (filter_dir / "_SUCCESS").exists():
        assert runner.poll() is None, runner.stdout.read()
        assert time.time() < deadline, "the filter stage never committed"
        time.sleep(0.5)
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=60)
    steps = json.loads((filter_dir / "result.json").read_text())["details"]["filters"]
    assert [s["kind"] for s in steps] == ["consistency", "rewardModel"]
    assert steps[1]["out"] == math.ceil(0.5 * steps[1]["in"]) and steps[1]["model"] == str(tiny_reward_model_dir)
    kept = read_jsonl(filter_dir / "kept.jsonl")
    assert len(kept) == steps[1]["out"] and all(isinstance(r["reward"], float) for r in kept)

    # correct on data.questions without answers: the run fails at the filter stage, naming the file.
    m = manifest(tmp_path, tiny_model_dir, data, "labels", "[{correct: {maxPerQuestion: 2}}]")
    runner = cli("run", str(m), "--storage", str(storage), "--workdir", str(work / "labels"))
    out, _ = runner.communicate(timeout=900)
    status = json.loads((storage / "local" / "labels" / "status.json").read_text())
    assert status["phase"] == "Failed", out
    text = json.dumps(status)
    assert 'unlabeled.jsonl:1: no \\"answer\\"; filters[0].correct' in text, text[-3000:]
    task = json.loads((work / "labels" / "labels-r1-filter.json").read_text())
    assert task["inputs"]["questions"] == f"{data}/unlabeled.jsonl"
