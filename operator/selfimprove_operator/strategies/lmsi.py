"""LMSI (Huang et al. 2022, "Large Language Models Can Self-Improve"): sample N paths per
unlabeled question, keep the confident majority (self-consistency), fine-tune on them; the
next round samples from the fine-tuned model."""

from selfimprove_workers.constants import LORA_ATTENTION_MODULES
from selfimprove_workers.rules import Has, Rule

from . import Strategy, register_strategy

# N = 32 at T = 0.7, keep confident majority paths (shared/research/methods.md §1).
PRESET = {
    "sampling": {"paths": 32, "temperature": 0.7},
    "filters": [{"consistency": {"minConfidence": 0.9}}],
    "training": {
        "lora": {"r": 16, "alpha": 32, "targetModules": list(LORA_ATTENTION_MODULES)},
        "epochs": 3,
        "learningRate": 2e-4,
    },
    "rounds": {"max": 3},
}

LMSI = register_strategy(Strategy(
    name="lmsi",
    description="self-consistency",
    preset=PRESET,
    round_stages=("sample", "filter", "train", "evaluate"),
    rules=(Rule(require=Has("data.questions"), field="data.questions", message="is required for strategy lmsi"),),
))
