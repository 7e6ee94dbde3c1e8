"""Strategies as objects: each method (LMSI, IWSI, LLM2LLM, …) is one module here declaring its
preset, the stages of its rounds, how its stages' inputs are wired where that differs from the
default (`..wiring`), and the spec rules it needs — from which the pydantic checks and the CRD's
CEL rules are both generated (`workers/selfimprove_workers/rules.py`).

Adding a strategy: a module `strategies/<name>.py` calling `register_strategy(Strategy(...))`,
imported below; `selfimprove crd` then puts its name in the CRD's enum and its rules in CEL.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from selfimprove_workers.rules import Equals, Rule

if TYPE_CHECKING:
    from ..wiring import TaskAdjust, Wiring

BASE_ROUND_STAGES: tuple[str, ...] = ("evaluate",)  # round 0 evaluates the base model, always


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    preset: Mapping[str, Any]                   # defaults merged under what the manifest gives
    round_stages: tuple[str, ...]               # the stages of rounds 1..max, in order
    rules: tuple[Rule, ...] = ()                # spec rules while this strategy is chosen
    wiring: "Mapping[str, Wiring]" = field(default_factory=dict)   # stage → inputs, where not the default
    # stage → (context, built task) → task: changes beyond inputs and adapter (the model a stage
    # runs, its prompts), pure like the wiring
    tasks: "Mapping[str, TaskAdjust]" = field(default_factory=dict)
    # stages skipped in the round that is rounds.max: their output only feeds a next round (LLM2LLM's
    # augment). Raising rounds.max after such a round reopens them before the next round starts.
    last_round_skips: tuple[str, ...] = ()

    def stages_of_round(self, round_no: int) -> tuple[str, ...]:
        return BASE_ROUND_STAGES if round_no == 0 else self.round_stages

    def spec_rules(self) -> tuple[Rule, ...]:
        """Its rules, each scoped to `spec.strategy == name`."""
        when = Equals("strategy", self.name)
        return tuple(Rule(require=r.require, field=r.field, message=r.message, when=when if r.when is None else r.when)
                     for r in self.rules)


_STRATEGIES: dict[str, Strategy] = {}
STRATEGIES: Mapping[str, Strategy] = MappingProxyType(_STRATEGIES)


def register_strategy(strategy: Strategy) -> Strategy:
    from selfimprove_workers.stage_registry import STAGES

    unknown = [s for s in strategy.round_stages if s not in STAGES]
    if unknown:
        raise ValueError(f"strategy {strategy.name!r}: unknown stage(s) {', '.join(unknown)}")
    if strategy.name in _STRATEGIES and _STRATEGIES[strategy.name] is not strategy:
        raise ValueError(f"strategy {strategy.name!r} is already registered")
    _STRATEGIES[strategy.name] = strategy
    return strategy


def strategy(name: str) -> Strategy:
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(_STRATEGIES)}") from None


def strategy_names() -> tuple[str, ...]:
    return tuple(_STRATEGIES)


def spec_rules() -> tuple[Rule, ...]:
    """Every strategy's rules, every filter's, the served models' (endpoints.py) and augment.filters'
    kinds, in a stable order."""
    from selfimprove_workers.endpoints import ENDPOINT_RULES
    from selfimprove_workers.filter_registry import filter_rules
    from selfimprove_workers.spec import augment_rules

    return (tuple(r for s in _STRATEGIES.values() for r in s.spec_rules()) + filter_rules() + ENDPOINT_RULES
            + augment_rules())


# The built-in strategies, in the order of the CRD's enum (registration order, so imported by
# name in this order rather than by an import statement a formatter may sort).
for _module in ("lmsi", "iwsi", "llm2llm", "lmsi_teacher"):
    importlib.import_module(f"{__name__}.{_module}")
