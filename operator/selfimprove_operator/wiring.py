"""How each stage's inputs are wired (pure): one small function per stage kind, from the run's
spec and status to the stage's `StageInputs` and the adapter it runs with. A strategy replaces
the function of a stage whose wiring differs (`Strategy.wiring`); the planner looks up the
strategy's first, then the default here.

Adding a stage: register its kind (selfimprove_workers/stage_registry.py) and add `@wires(name)`
here; `test_every_stage_has_wiring` fails until both exist.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from selfimprove_workers.constants import OutputName
from selfimprove_workers.contract import StageInputs, StageTask

if TYPE_CHECKING:
    from .api import SelfImproveRunSpec, SelfImproveRunStatus


@dataclass(frozen=True)
class WiringContext:
    spec: "SelfImproveRunSpec"        # preset-resolved
    status: "SelfImproveRunStatus"
    round: int
    prefix: str                       # the run's storage prefix

    def out(self, round_no: int, stage: str, name: str) -> str:
        """URI of file `name` of `stage` in round `round_no`."""
        from .planner import stage_prefix

        return stage_prefix(self.prefix, round_no, stage) + name

    @property
    def previous_adapter(self) -> str | None:
        """The latest adapter of an earlier round (LMSI: that model samples the next round)."""
        for past in reversed(self.status.rounds):
            if past.round < self.round and past.adapter:
                return past.adapter
        return None

    @property
    def this_round_adapter(self) -> str | None:
        this = next((r for r in self.status.rounds if r.round == self.round), None)
        return this.adapter if this else None

    def succeeded_before(self, stage: str) -> list[int]:
        """Earlier rounds (≥ 1) in which `stage` succeeded."""
        return [r.round for r in self.status.rounds if 0 < r.round < self.round
                and any(s.name == stage and s.state == "Succeeded" for s in r.stages)]


Wiring = Callable[[WiringContext], tuple[StageInputs, "str | None"]]
TaskAdjust = Callable[[WiringContext, StageTask], StageTask]
DEFAULT_WIRING: dict[str, Wiring] = {}


def wires(stage: str) -> Callable[[Wiring], Wiring]:
    def register(fn: Wiring) -> Wiring:
        DEFAULT_WIRING[stage] = fn
        return fn
    return register


def augmented_so_far(ctx: WiringContext) -> list[str]:
    return [ctx.out(r, "augment", OutputName.AUGMENTED) for r in ctx.succeeded_before("augment")]


@wires("sample")
def sample(ctx: WiringContext) -> tuple[StageInputs, str | None]:
    return StageInputs(questions=ctx.spec.data.questions), ctx.previous_adapter


@wires("filter")
def filter_(ctx: WiringContext) -> tuple[StageInputs, str | None]:
    from selfimprove_workers.filter_registry import FILTERS

    filters = list(ctx.spec.filters or [])
    # A label-aware filter reads the gold answers of the questions sampled; STaR's rationalization
    # re-prompts the model that sampled them (the previous round's adapter).
    labels = any(FILTERS[f.kind].labels for f in filters)
    rationalize = any(getattr(f.get("correct"), "rationalize", False) for f in filters)
    return StageInputs(
        samples=ctx.out(ctx.round, "sample", OutputName.SAMPLES),
        votes=ctx.out(ctx.round, "sample", OutputName.VOTES),
        validation=ctx.spec.data.validation,
        questions=ctx.spec.data.questions if labels else None,
    ), ctx.previous_adapter if rationalize else None


@wires("train")
def train(ctx: WiringContext) -> tuple[StageInputs, str | None]:
    inputs = StageInputs(train=[ctx.out(ctx.round, "filter", OutputName.KEPT)])
    return inputs, ctx.previous_adapter if ctx.spec.training.from_ == "previous" else None


@wires("evaluate")
def evaluate(ctx: WiringContext) -> tuple[StageInputs, str | None]:
    # Also the validation split, when there is one: the best round is picked on it.
    return (StageInputs(evaluation=ctx.spec.data.evaluation, validation=ctx.spec.data.validation),
            ctx.this_round_adapter if ctx.round > 0 else None)


@wires("augment")
def augment(ctx: WiringContext) -> tuple[StageInputs, str | None]:
    # LLM2LLM: the seed questions the student got wrong, new ones unlike every earlier one.
    return StageInputs(
        predictions=ctx.out(ctx.round, "evaluate", OutputName.SEED_PREDICTIONS),
        seed=ctx.spec.data.seed,
        existing=[ctx.spec.data.seed, *augmented_so_far(ctx)],
    ), None


@wires("exemplars")
def exemplars(ctx: WiringContext) -> tuple[StageInputs, str | None]:
    # The student (base + this round's adapter) answers the questions its teacher voted on.
    return StageInputs(questions=ctx.spec.data.questions, votes=ctx.out(ctx.round, "sample", OutputName.VOTES)), \
        ctx.this_round_adapter


def wiring_for(strategy: Any, stage: str) -> Wiring:
    fn = strategy.wiring.get(stage) or DEFAULT_WIRING.get(stage)
    if fn is None:
        raise KeyError(f"stage {stage!r} has no wiring (add @wires({stage!r}) in wiring.py)")
    return fn
