"""LLM2LLM (Lee et al. 2024; SqueezeAILab/LLM2LLM): train the student on a labeled seed set,
evaluate it on the seed, and let a teacher write new examples like the ones it got wrong; each
round trains from the base model on the seed plus everything augmented so far."""

from selfimprove_workers.constants import LORA_ATTENTION_MODULES
from selfimprove_workers.contract import StageInputs
from selfimprove_workers.rules import Has, NonEmpty, Not, Rule

from ..wiring import WiringContext, augmented_so_far
from . import Strategy, register_strategy

# GSM8K config: 10 iterations, 3 epochs at lr 2e-5 (the paper fine-tunes fully; raise it for
# LoRA), teacher T = 1.0, k = 1.
PRESET = {
    "filters": [],
    "training": {
        "lora": {"r": 16, "alpha": 32, "targetModules": list(LORA_ATTENTION_MODULES)},
        "epochs": 3,
        "learningRate": 2e-5,
    },
    "rounds": {"max": 10},
}


def train(ctx: WiringContext) -> tuple[StageInputs, str | None]:
    # Seed ∪ everything augmented so far, always from the base model (unless training.from).
    inputs = StageInputs(train=[ctx.spec.data.seed, *augmented_so_far(ctx)])
    return inputs, ctx.previous_adapter if ctx.spec.training.from_ == "previous" else None


def evaluate(ctx: WiringContext) -> tuple[StageInputs, str | None]:
    # Also on the seed set: its wrong answers are what the teacher augments.
    inputs = StageInputs(evaluation=ctx.spec.data.evaluation, seed=ctx.spec.data.seed, validation=ctx.spec.data.validation)
    return inputs, ctx.this_round_adapter if ctx.round > 0 else None


LLM2LLM = register_strategy(Strategy(
    name="llm2llm",
    description="teacher augmentation",
    preset=PRESET,
    round_stages=("train", "evaluate", "augment"),
    rules=(
        Rule(require=Has("data.seed"), field="data.seed", message="is required for strategy llm2llm"),
        Rule(require=Not(NonEmpty("filters")), field="filters",
             message="llm2llm has no sample/filter stages; remove filters"),
    ),
    wiring={"train": train, "evaluate": evaluate},
    # As the paper runs it: the last iteration's augmentation would train nothing.
    last_round_skips=("augment",),
))
