"""Tiny real models for tests: a random-weight Llama that transformers, peft and vLLM (CPU) load,
plus a LoRA adapter for it. Built offline, once per session.

Loaded as a pytest plugin by `tests/conftest.py`; helpers that are not fixtures (`require_vllm`,
`run_worker`, `write_jsonl`) are imported by name where they are used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

__all__ = ["tiny_model_dir", "tiny_adapter_dir", "tiny_reward_model_dir"]

REPO = Path(__file__).resolve().parents[1]
# Long enough for the judge and teacher prompts (character-level tokens); the KV cache of a
# 2-layer, 128-wide model stays a few MB per sequence.
TINY_CONTEXT = 4096


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 128-wide random Llama (seed 0) with a character-level tokenizer."""
    from selfimprove_workers.demo.tinymodel import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0, max_positions=TINY_CONTEXT)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-8 LoRA adapter on q/v projections with random (non-zero) B matrices, so that it
    visibly changes the model's outputs; vLLM serves it with max_lora_rank 8."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-adapter")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
        peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama as a reward model: `LlamaForSequenceClassification`, num_labels 1, its score
    head random (seed 2), with the tiny model's tokenizer (character-level, no chat template)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-reward")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
        torch.nn.init.normal_(model.score.weight, std=1.0)  # scores that differ visibly between inputs
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(out))
    return out


def require_vllm() -> None:
    """Skip when vLLM is not importable — except in CI (`CI` set), where that is a failure."""
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI"):
            pytest.fail("vllm is not importable, and CI must run the vLLM tests")
        pytest.skip("vllm is not importable")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_worker(task: dict[str, Any], tmp: Path, timeout: float = 600) -> tuple[int, dict[str, Any] | None, str]:
    """Run a stage as its Job does: `python -m selfimprove_workers TASK.json`, with the
    termination log in a file. Returns (exit code, parsed summary, stderr)."""
    name = f"{task['stage']}-{os.urandom(3).hex()}"
    task_file = tmp / f"{name}.json"
    task_file.write_text(json.dumps(task))
    term = tmp / f"{name}.termination-log"
    env = {**os.environ, "TERMINATION_LOG": str(term), "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.run([sys.executable, "-m", "selfimprove_workers", str(task_file)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    text = term.read_text() if term.exists() else ""
    return proc.returncode, (json.loads(text) if text else None), proc.stderr
