"""The stage registry: one declarative entry per stage kind, from which every table about stages
is derived — the contract's `StageName` and its required inputs and sections, the runtime's
module lookup, the status's phase names, the metrics the planner records on a round.

Registering a stage imports nothing heavy: the module that runs it is a dotted name, imported
only when a stage process starts (the operator image has no torch).

Adding a stage: one `register_stage(...)` here (or in the module that defines it, imported
before the contract is used), its module with `run(ctx) -> StageOutcome`, and the planner's
wiring function (`operator/selfimprove_operator/wiring.py`); docs/architecture.md walks
through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from .constants import MetricKey, OutputName

Cast = Literal["int", "float"]


@dataclass(frozen=True)
class StageKind:
    name: str
    phase: str                                   # the run's `status.phase` while it runs
    module: str                                  # its `run(ctx)`: imported by the stage process only
    inputs: tuple[str, ...] = ()                 # StageInputs fields it cannot run without
    sections: tuple[str, ...] = ()               # StageTask parameter sections it cannot run without
    outputs: Mapping[str, str] = field(default_factory=dict)   # logical name → file under its output
    # result metric key → (RoundStatus field, cast): what the planner copies onto the round
    round_metrics: Mapping[str, tuple[str, Cast]] = field(default_factory=dict)
    # result output key → RoundStatus field (a URI the next rounds use, e.g. the adapter)
    round_outputs: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    # Its rows are independent (one question in, its rows out), so `resources.shards` may split
    # it into parallel pods whose outputs concatenate (docs/architecture.md, "Sharded stages").
    shardable: bool = False


_STAGES: dict[str, StageKind] = {}
STAGES: Mapping[str, StageKind] = MappingProxyType(_STAGES)


def register_stage(kind: StageKind) -> StageKind:
    if kind.name in _STAGES and _STAGES[kind.name] != kind:
        raise ValueError(f"stage {kind.name!r} is already registered")
    _STAGES[kind.name] = kind
    return kind


def stage(name: str) -> StageKind:
    try:
        return _STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(_STAGES)}") from None


def stage_names() -> tuple[str, ...]:
    return tuple(_STAGES)


def phases() -> tuple[str, ...]:
    return tuple(dict.fromkeys(k.phase for k in _STAGES.values()))


# ---------------------------------------------------------------------------- the built-in stages
register_stage(StageKind(
    name="sample", shardable=True, phase="Sampling", module="selfimprove_workers.stages.sample",
    inputs=("questions",), sections=("sampling",),
    outputs={"samples": OutputName.SAMPLES, "votes": OutputName.VOTES},
    round_metrics={MetricKey.PATHS: ("samples", "int"), MetricKey.QUESTIONS: ("questions", "int"),
                   MetricKey.MEAN_CONFIDENCE: ("mean_confidence", "float")},
    description="vLLM samples N reasoning paths per question; votes on their answers.",
))
register_stage(StageKind(
    name="filter", shardable=True, phase="Filtering", module="selfimprove_workers.stages.filter",
    inputs=("samples", "votes"), sections=("filters",),
    outputs={"kept": OutputName.KEPT, "rejected": OutputName.REJECTED},
    round_metrics={MetricKey.KEPT: ("kept", "int")},
    description="The run's filters, in order, select the training data.",
))
register_stage(StageKind(
    name="augment", shardable=True, phase="Augmenting", module="selfimprove_workers.stages.augment",
    inputs=("predictions",), sections=("augment",),
    outputs={"augmented": OutputName.AUGMENTED},
    round_metrics={MetricKey.AUGMENTED: ("augmented", "int")},
    description="The teacher writes new examples like those the student got wrong (LLM2LLM).",
))
register_stage(StageKind(
    name="train", phase="Training", module="selfimprove_workers.stages.train",
    inputs=("train",), sections=("training",),
    outputs={"adapter": OutputName.ADAPTER},
    round_metrics={MetricKey.TRAIN_LOSS: ("train_loss", "float")},
    round_outputs={"adapter": "adapter"},
    description="A LoRA adapter is trained (transformers + peft + accelerate).",
))
register_stage(StageKind(
    name="exemplars", phase="Refreshing", module="selfimprove_workers.stages.exemplars",
    inputs=("questions", "votes"), sections=("exemplars",),
    outputs={"exemplars": OutputName.EXEMPLARS},
    description="The student's confident answers that agree with the teacher become the teacher's next exemplars.",
))
register_stage(StageKind(
    name="evaluate", shardable=True, phase="Evaluating", module="selfimprove_workers.stages.evaluate",
    inputs=("evaluation",), sections=("evaluation",),
    outputs={"predictions": OutputName.PREDICTIONS, "seedPredictions": OutputName.SEED_PREDICTIONS,
             "validationPredictions": OutputName.VALIDATION_PREDICTIONS},
    round_metrics={MetricKey.ACCURACY: ("accuracy", "float"), MetricKey.SEED_ACCURACY: ("seed_accuracy", "float"),
                   MetricKey.VALIDATION_ACCURACY: ("validation_accuracy", "float")},
    description="Greedy accuracy on the held-out set (and the seed set for LLM2LLM).",
))
