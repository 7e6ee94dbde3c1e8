"""Fixtures and helpers shared by the train and evaluate tests (the generic ones — `require_vllm`,
`run_worker`, `write_jsonl` — come from `model_fixtures`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from model_fixtures import require_vllm, run_worker, write_jsonl  # noqa: F401 — re-exported
from selfimprove_workers.contract import StageTask

# The final RMSNorm's weight of the trainable fixture model. At random initialization (std 0.02,
# hidden 128) the logits of the tiny Llama are capped near ±2.6 whatever the hidden state, so no
# adapter could push the loss of a 100-token vocabulary much below ~2.2 — while a pretrained
# model's logits span tens. Scaling the final norm (frozen, outside LoRA's reach) gives the
# model that range back, so training tests measure the adapter rather than this cap.
LOGIT_SCALE = 4.0


@pytest.fixture(scope="session")
def train_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama (char-level tokenizer) whose logits LoRA can make confident."""
    import torch
    from selfimprove_workers.demo.tinymodel import build_tiny_llama
    from transformers import AutoModelForCausalLM

    path = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-trainable"))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(LOGIT_SCALE)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def addition_rows(pairs: Iterable[tuple[int, int]]) -> list[dict[str, Any]]:
    """Kept-path rows (`question`, `cot`, `answer`), as the filter stage writes them."""
    return [
        {"question": f"What is {a} plus {b}?", "cot": f"{a} + {b} = {a + b}.\nThe answer is {a + b}.",
         "answer": str(a + b)}
        for a, b in pairs
    ]


def train_task(output: Path, model: Path, train: list[Path], *, adapter: str | None = None,
               **training: Any) -> StageTask:
    spec = {"lora": {"r": 16, "alpha": 32, "dropout": 0.0,
                     "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "epochs": 2, "learningRate": 5e-3, "batchSize": 4, "warmupRatio": 0.0}
    spec.update(training)
    return StageTask.model_validate({
        "run": {"name": "t"}, "round": 1, "stage": "train", "output": str(output),
        "model": {"base": str(model), **({"adapter": adapter} if adapter else {})},
        "inputs": {"train": [str(p) for p in train]},
        "training": spec,
    })
