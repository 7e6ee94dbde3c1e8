"""Turning pydantic errors into `field.path: message` lines.

Shared by the manifest validator (control plane) and the stage entrypoint (workers), so a bad
field reads the same wherever it is caught.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

_SIMPLE = {
    "missing": "is required",
    "extra_forbidden": "unknown field",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "json_invalid": "invalid JSON",
}
_BOUNDS = {
    "greater_than_equal": ("≥", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("≤", "le"),
    "less_than": ("<", "lt"),
}


def message_of(err: Any) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _SIMPLE:
        return _SIMPLE[kind]
    if kind in _BOUNDS:
        sign, key = _BOUNDS[kind]
        return f"must be {sign} {ctx[key]}"
    if kind == "literal_error" or kind == "enum":
        return f"must be one of {ctx.get('expected', '')}"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} item(s)"
    if kind == "string_too_short":
        n = ctx.get("min_length")
        return "must not be empty" if n == 1 else f"must be at least {n} characters"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    return err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _split(loc: tuple, message: str) -> Iterable[tuple[tuple, str]]:
    """Model validators report `sub.path: message` lines relative to where they sit."""
    for line in message.splitlines():
        head, sep, rest = line.partition(": ")
        if sep and head and " " not in head:
            yield loc + tuple(int(p) if p.isdigit() else p for p in head.split(".")), rest
        else:
            yield loc, line


def dotted(path: tuple) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in path).replace(".[", "[")


def field_errors(exc: ValidationError, prefix: tuple = ()) -> list[tuple[tuple, str]]:
    """(path, message) for every problem, paths in wire (camelCase) names."""
    out: list[tuple[tuple, str]] = []
    for err in exc.errors():
        out.extend(_split(prefix + tuple(err["loc"]), message_of(err)))
    return out


def describe(exc: ValidationError, prefix: tuple = ()) -> str:
    return "; ".join(f"{dotted(p)}: {m}" if p else m for p, m in field_errors(exc, prefix))
