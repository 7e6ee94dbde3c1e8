"""Every benchmark under bench/ still runs: each one's `--smoke` mode, as a subprocess.

A benchmark is run by hand, rarely, so nothing else notices when a refactor breaks it. Smoke
mode runs the same code paths at toy sizes in seconds (vLLM's engine starts included) and prints
the same table; its figures mean nothing, so only the exit status and the table's lines are
checked. A new bench/*.py cannot be added without an entry here (the last test).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from k8s_fixtures import need_kmock
from model_fixtures import require_vllm

REPO = Path(__file__).resolve().parents[2]

# script → (what it needs, lines its output must contain, seconds it may take). Smoke runs take
# ~1 s (extraction), ~6 s (train, operator), ~12 s (sample) and ~60 s (demo: three vLLM stage processes) on 2 cores;
# ~5 min for methods (ten runs, two at a time, and a toy teacher: 287 s in CI at bede2d6).
BENCHES = {
    "bench_demo.py": ("vllm", ["seed  round  0  round  1   gain", "smallest gain:", "smoke run"], 900),
    "bench_lmsi_teacher.py": ("vllm", ["| round | student held-out acc |", "control (round 2's teacher sampling",
                                       "smoke run"], 1500),
    # every method of the table through `selfimprove run`; judge and self fail as the demo's 256-position
    # model cannot hold their prompts, and say which setting to change
    "bench_methods.py": ("vllm", ["methods on the demo task", *(f"| {m} | 1 |" for m in (
        "sft", "lmsi", "lmsi-4formats", "iwsi", "entropy", "diversity", "seed-sft", "llm2llm")),
        "filters[1].judge: prompt 0", "filters[1].self: prompt 0", "seed 0 teacher:", "smoke run"], 1200),
    "bench_extraction.py": (None, ["extraction accuracy by style", "overall", "smoke run"], 60),
    "bench_operator.py": ("kmock", ["stage hand-off (Job complete → next Job created): median", "operator RSS:",
                                    "smoke run"], 300),
    "bench_sample.py": ("vllm", ["medians over 1 repeats", "× bare   (target ≥ 0.95)", "naive transformers loop",
                                 "smoke run"], 600),
    "bench_train.py": (None, ["stage loop:", "ratio stage / Trainer:", "smoke run"], 300),
    "bench_selection.py": (None, ["LTD diversity selection", "old k_center_greedy (float64, no clusters)",
                               "smoke run"], 300),
    "bench_limits.py": (None, ["stage task (the Job's argument)", "÷128 KiB arg", "smoke run"], 120),
    "bench_memory.py": (None, ["peak RSS MiB", "the stage's own memory", "smoke run"], 120),
    "bench_shards.py": ("vllm", ["1 shard", "merged samples.jsonl == 1-shard samples.jsonl: yes", "N GPUs estimate",
                                 "smoke run"], 300),
}
MARKS = {"vllm": [pytest.mark.vllm], "kmock": [pytest.mark.k8s], None: []}


@pytest.mark.slow
@pytest.mark.parametrize("script", [pytest.param(name, marks=MARKS[needs], id=name)
                                    for name, (needs, _, _) in BENCHES.items()])
def test_bench_smoke_runs_and_prints_its_table(script):
    needs, expected, timeout = BENCHES[script]
    if needs == "vllm":
        require_vllm()
    elif needs == "kmock":
        need_kmock()
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    tail = f"\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"bench/{script} --smoke exited {proc.returncode}{tail}"
    missing = [line for line in expected if line not in proc.stdout]
    assert not missing, f"bench/{script} --smoke printed none of {missing}{tail}"


def test_every_bench_script_has_a_smoke_test():
    scripts = {p.name for p in (REPO / "bench").glob("*.py")}
    assert scripts == set(BENCHES), (
        f"bench/ scripts without a smoke test: {sorted(scripts - set(BENCHES))}; entries for scripts "
        f"that are gone: {sorted(set(BENCHES) - scripts)} (tests/e2e/test_bench_smoke.py, BENCHES)")
    for name in scripts:  # each takes --smoke (the test above runs it)
        assert '"--smoke"' in (REPO / "bench" / name).read_text(), f"bench/{name} has no --smoke flag"
