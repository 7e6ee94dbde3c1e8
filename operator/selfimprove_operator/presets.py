"""Strategy presets: the defaults and the stage sequence of each strategy (strategies/<name>.py).

Values come from shared/research/methods.md (papers and the authors' code). A user's explicit
value always wins; `resolve` fills only what the manifest leaves out, so the stored spec stays
what the user wrote and the expansion is recomputed, never persisted.
"""

from __future__ import annotations

from typing import Any

from .api import SelfImproveRunSpec
from .strategies import BASE_ROUND_STAGES, STRATEGIES, strategy

__all__ = ["PRESETS", "ROUND_STAGES", "BASE_ROUND_STAGES", "stages_of_round", "resolve"]

# Views of the strategies' own declarations (strategies/<name>.py).
PRESETS: dict[str, dict[str, Any]] = {name: dict(s.preset) for name, s in STRATEGIES.items()}
ROUND_STAGES: dict[str, tuple[str, ...]] = {name: s.round_stages for name, s in STRATEGIES.items()}


def stages_of_round(strategy_name: str, round_no: int) -> tuple[str, ...]:
    return strategy(strategy_name).stages_of_round(round_no)


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
    return SelfImproveRunSpec.model_validate(_merge(dict(strategy(spec.strategy).preset), given))
