"""IWSI (Jiang et al. 2024, importance-weighted self-improvement; rubickkcibur/IWSI): LMSI's
loop with a distribution-shift filter against a small labeled validation set."""

from selfimprove_workers.rules import AnyItemHas, AnyOf, Has, Not, Rule

from . import Strategy, register_strategy

# 15 candidates at T = 1.1, DS filter k = 0.8, LoRA r 64 / alpha 16 on q, v, gate, up, down;
# lr 3e-4 for 4 epochs.
PRESET = {
    "sampling": {"paths": 15, "temperature": 1.1},
    "filters": [
        {"consistency": {"minConfidence": 0.9}},
        {"distributionShift": {"keep": 0.8}},
    ],
    "training": {
        "lora": {"r": 64, "alpha": 16, "targetModules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]},
        "epochs": 4,
        "learningRate": 3e-4,
    },
    "rounds": {"max": 3},
}

IWSI = register_strategy(Strategy(
    name="iwsi",
    description="plus distribution-shift filter",
    preset=PRESET,
    round_stages=("sample", "filter", "train", "evaluate"),
    rules=(
        Rule(require=Has("data.questions"), field="data.questions", message="is required for strategy iwsi"),
        Rule(require=Has("data.validation"), field="data.validation", message="is required for strategy iwsi"),
        # Filters left out take the preset (which has one); filters given must include one.
        Rule(require=AnyOf((Not(Has("filters")), AnyItemHas("filters", "distributionShift"))),
             field="filters", message="iwsi needs a distributionShift filter"),
    ),
))
