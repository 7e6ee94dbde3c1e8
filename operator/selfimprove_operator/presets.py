"""Strategy presets: the defaults and the stage sequence of LMSI, IWSI and LLM2LLM.

Values come from shared/research/methods.md (papers and the authors' code). A user's explicit
value always wins; `resolve` fills only what the manifest leaves out, so the stored spec stays
what the user wrote and the expansion is recomputed, never persisted.
"""

from __future__ import annotations

from typing import Any

from .api import SelfImproveRunSpec

_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

PRESETS: dict[str, dict[str, Any]] = {
    # LMSI (Huang et al. 2022): N = 32 at T = 0.7, keep confident majority paths.
    "lmsi": {
        "sampling": {"paths": 32, "temperature": 0.7},
        "filters": [{"consistency": {"minConfidence": 0.9}}],
        "training": {
            "lora": {"r": 16, "alpha": 32, "targetModules": _ATTENTION},
            "epochs": 3,
            "learningRate": 2e-4,
        },
        "rounds": {"max": 3},
    },
    # IWSI (Jiang et al. 2024; rubickkcibur/IWSI): 15 candidates at T = 1.1, DS filter k = 0.8,
    # LoRA r 64 / alpha 16 on q, v, gate, up, down; lr 3e-4 for 4 epochs.
    "iwsi": {
        "sampling": {"paths": 15, "temperature": 1.1},
        "filters": [
            {"consistency": {"minConfidence": 0.9}},
            {"distributionShift": {"keep": 0.8}},
        ],
        "training": {
            "lora": {
                "r": 64,
                "alpha": 16,
                "targetModules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
            },
            "epochs": 4,
            "learningRate": 3e-4,
        },
        "rounds": {"max": 3},
    },
    # LLM2LLM (Lee et al. 2024; SqueezeAILab/LLM2LLM GSM8K config): 10 iterations, 3 epochs at
    # lr 2e-5 (the paper fine-tunes fully; raise it for LoRA), teacher T = 1.0, k = 1.
    "llm2llm": {
        "filters": [],
        "training": {
            "lora": {"r": 16, "alpha": 32, "targetModules": _ATTENTION},
            "epochs": 3,
            "learningRate": 2e-5,
        },
        "rounds": {"max": 10},
    },
}

# The stages of rounds 1..max; round 0 is always a single `evaluate` of the base model.
ROUND_STAGES: dict[str, tuple[str, ...]] = {
    "lmsi": ("sample", "filter", "train", "evaluate"),
    "iwsi": ("sample", "filter", "train", "evaluate"),
    "llm2llm": ("train", "evaluate", "augment"),
}
BASE_ROUND_STAGES: tuple[str, ...] = ("evaluate",)


def stages_of_round(strategy: str, round_no: int) -> tuple[str, ...]:
    return BASE_ROUND_STAGES if round_no == 0 else ROUND_STAGES[strategy]


def _merge(defaults: Any, given: Any) -> Any:
    """Deep merge for dicts; a list or scalar the user gave replaces the default whole."""
    if isinstance(defaults, dict) and isinstance(given, dict):
        out = dict(defaults)
        for key, value in given.items():
            out[key] = _merge(defaults.get(key), value) if key in defaults else value
        return out
    return defaults if given is None else given


def resolve(spec: SelfImproveRunSpec) -> SelfImproveRunSpec:
    """The spec with every preset-dependent field filled in."""
    given = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    return SelfImproveRunSpec.model_validate(_merge(PRESETS[spec.strategy], given))
