"""The filter registry: one entry per filter kind — its parameter model, its implementation and
the spec rules it brings — from which the manifest's `filters[]` schema, the CRD's
"exactly one kind" CEL rule, the cross-field checks and the filter stage's dispatch derive.

Adding a filter is one module plus one registration:

    class KeepLongest(WireModel):
        keep: Fraction = Field(0.5, description="Fraction kept, longest reasoning first.")

    def keep_longest(fr, cands, spec):          # (FilterRun, candidates, params) → (kept, info)
        ...

    register_filter("keepLongest", KeepLongest, "my_package.my_module:keep_longest",
                    "Keeps the longest reasoning paths.")

The implementation is a dotted name resolved when the filter stage runs, so registering imports
nothing heavy. A filter kind that needs a spec field names it (`requires=("data.validation",)`):
the models and the CRD then both refuse a run that lists the filter without it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .rules import AnyItemHas, Has, Rule

if TYPE_CHECKING:
    from .spec import WireModel


@dataclass(frozen=True)
class FilterKind:
    kind: str                       # the key in a manifest: `- consistency: {...}`
    params: "type[WireModel]"
    implementation: str             # "module:function", (FilterRun, candidates, params) → (kept, info)
    description: str
    requires: tuple[str, ...] = ()  # spec fields (wire paths) a run listing this filter must set
    uses_model: bool = False        # loads an engine (for the stage's engine pool and for docs)
    labels: bool = False            # reads gold answers: the filter stage gets `inputs.questions`

    def load(self) -> Callable[..., Any]:
        module, _, name = self.implementation.partition(":")
        return getattr(importlib.import_module(module), name)

    def rules(self) -> tuple[Rule, ...]:
        return tuple(Rule(require=Has(path), field=path, message=f"is required by the {self.kind} filter",
                          when=AnyItemHas("filters", self.kind)) for path in self.requires)


_FILTERS: dict[str, FilterKind] = {}
FILTERS: Mapping[str, FilterKind] = MappingProxyType(_FILTERS)


def register_filter(kind: str, params: "type[WireModel]", implementation: str, description: str,
                    requires: tuple[str, ...] = (), uses_model: bool = False, labels: bool = False) -> FilterKind:
    entry = FilterKind(kind, params, implementation, description, tuple(requires), uses_model, labels)
    if kind in _FILTERS and _FILTERS[kind] != entry:
        raise ValueError(f"filter {kind!r} is already registered")
    _FILTERS[kind] = entry
    return entry


def unregister_filter(kind: str) -> None:
    """For tests that register a filter of their own."""
    _FILTERS.pop(kind, None)


def filter_kinds() -> tuple[str, ...]:
    return tuple(_FILTERS)


def filter_rules() -> tuple[Rule, ...]:
    return tuple(rule for entry in _FILTERS.values() for rule in entry.rules())
