"""Cross-field rules of a run's spec, declared once and enforced twice: by the pydantic models
(`selfimprove validate`, both executors) and by the API server, as CEL rules in the CRD
(`x-kubernetes-validations`), so `kubectl apply` refuses what the operator would refuse.

A condition is evaluated on the spec's wire form (camelCase keys, unset fields absent), which is
exactly what CEL's `self` sees on the stored object: `Has` is CEL's `has()`, on both sides.
Stdlib only: strategies and filters declare their rules at import time.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

_MISSING = object()


def _get(body: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(body, dict) or body.get(part) is None:
            return _MISSING
        body = body[part]
    return body


def _has_chain(path: str, root: str = "self") -> str:
    parts = path.split(".")
    return " && ".join(f"has({root}.{'.'.join(parts[:i + 1])})" for i in range(len(parts)))


class Cond(ABC):
    @abstractmethod
    def holds(self, spec: dict[str, Any]) -> bool: ...

    @abstractmethod
    def cel(self) -> str: ...


@dataclass(frozen=True)
class Has(Cond):
    """The field is set."""

    path: str

    def holds(self, spec: dict[str, Any]) -> bool:
        return _get(spec, self.path) is not _MISSING

    def cel(self) -> str:
        return _has_chain(self.path)


@dataclass(frozen=True)
class Equals(Cond):
    path: str
    value: str | int | bool

    def holds(self, spec: dict[str, Any]) -> bool:
        return _get(spec, self.path) == self.value

    def cel(self) -> str:
        literal = json.dumps(self.value) if not isinstance(self.value, str) else "'" + self.value.replace("'", "\\'") + "'"
        return f"({_has_chain(self.path)} && self.{self.path} == {literal})"


@dataclass(frozen=True)
class NonEmpty(Cond):
    """A list field is set and has at least one item."""

    path: str

    def holds(self, spec: dict[str, Any]) -> bool:
        value = _get(spec, self.path)
        return isinstance(value, list) and len(value) > 0

    def cel(self) -> str:
        return f"({_has_chain(self.path)} && size(self.{self.path}) > 0)"


@dataclass(frozen=True)
class AnyItemHas(Cond):
    """Some item of a list field sets `key` (a filter of that kind is listed); a dotted key is a
    path inside the item (`judge.model`: a judge filter that names its model)."""

    path: str
    key: str

    def holds(self, spec: dict[str, Any]) -> bool:
        value = _get(spec, self.path)
        return isinstance(value, list) and any(_get(i, self.key) is not _MISSING for i in value)

    def cel(self) -> str:
        return f"({_has_chain(self.path)} && self.{self.path}.exists(i, {_has_chain(self.key, root='i')}))"


@dataclass(frozen=True)
class Not(Cond):
    inner: Cond

    def holds(self, spec: dict[str, Any]) -> bool:
        return not self.inner.holds(spec)

    def cel(self) -> str:
        return f"!({self.inner.cel()})"


@dataclass(frozen=True)
class AnyOf(Cond):
    options: tuple[Cond, ...]

    def holds(self, spec: dict[str, Any]) -> bool:
        return any(o.holds(spec) for o in self.options)

    def cel(self) -> str:
        return "(" + " || ".join(o.cel() for o in self.options) + ")"


@dataclass(frozen=True)
class Rule:
    """When `when` holds (always, if None), `require` must: otherwise `field: message`."""

    require: Cond
    field: str
    message: str
    when: Cond | None = None

    def violated(self, spec: dict[str, Any]) -> str | None:
        if self.when is not None and not self.when.holds(spec):
            return None
        return None if self.require.holds(spec) else f"{self.field}: {self.message}"

    def cel_rule(self) -> dict[str, str]:
        rule = self.require.cel() if self.when is None else f"!({self.when.cel()}) || ({self.require.cel()})"
        return {"rule": rule, "message": f"{self.field}: {self.message}"}
