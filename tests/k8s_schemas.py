"""Kubernetes' official OpenAPI schemas, as a real API server of a given minor version reads them.

The schemas are those `kubernetes-validate` ships (generated from each release's OpenAPI spec),
in their strict variant: a field the schema does not declare is an error, not a silent drop —
a field the operator sets and the server throws away is always a bug. Errors are reported as the
API server reports them: a `field` path (`spec.template.spec.containers[0].image`), a machine
`reason` (`FieldValueRequired`, `FieldValueNotSupported`, …) and a message.

`SUPPORTED` is every minor version the project claims (README: "Kubernetes ≥ 1.27"): the oldest
and the newest of it are the versions the strict test API server runs as.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

MINIMUM = "1.27"  # the README's stated minimum; keep them in agreement (tests check it)


def _available() -> list[str]:
    import kubernetes_validate.utils as kv

    return sorted({kv.major_minor(v) for v in kv.all_versions()}, key=lambda v: tuple(map(int, v.split("."))))


def supported_versions() -> list[str]:
    """Every minor version from MINIMUM to the newest schema the package ships."""
    low = tuple(map(int, MINIMUM.split(".")))
    return [v for v in _available() if tuple(map(int, v.split("."))) >= low]


@dataclass(frozen=True)
class Cause:
    """One entry of a Status's `details.causes`."""

    field: str
    reason: str
    message: str

    def wire(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message, "field": self.field}

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def field_path(parts: Any) -> str:
    """jsonschema's path (deque of keys and indexes) as a Kubernetes field path."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, (dict, list)):
        return '"object"' if isinstance(value, dict) else '"array"'
    return text if len(text) <= 80 else text[:77] + '..."'


def causes_of(errors: Any) -> list[Cause]:
    """jsonschema errors → Kubernetes causes (one per error, innermost first for anyOf/oneOf)."""
    from jsonschema.exceptions import best_match

    out: list[Cause] = []
    for error in errors:
        while error.validator in ("anyOf", "oneOf") and error.context:
            error = best_match(error.context)
        path = field_path(error.absolute_path)
        v = error.validator
        if v == "required":
            missing = re.match(r"'([^']+)'", error.message)
            name = missing.group(1) if missing else "?"
            out.append(Cause(f"{path}.{name}" if path else name, "FieldValueRequired", "Required value"))
        elif v == "additionalProperties":
            for name in re.findall(r"'([^']+)'", error.message.split("(")[-1]):
                full = f"{path}.{name}" if path else name
                out.append(Cause(full, "FieldValueInvalid", f'unknown field "{full}"'))
        elif v == "enum":
            allowed = ", ".join(json.dumps(a) for a in error.validator_value if a is not None)
            out.append(Cause(path, "FieldValueNotSupported",
                             f"Unsupported value: {_short(error.instance)}: supported values: {allowed}"))
        elif v == "type":
            wanted = error.validator_value
            wanted = [w for w in wanted if w != "null"][0] if isinstance(wanted, list) else wanted
            out.append(Cause(path, "FieldValueTypeInvalid",
                             f"Invalid value: {_short(error.instance)}: {path} in body must be of type {wanted}: "
                             f"{_short(type(error.instance).__name__)}"))
        elif v in ("maxItems", "maxLength", "maxProperties"):
            out.append(Cause(path, "FieldValueTooMany" if v != "maxLength" else "FieldValueTooLong",
                             f"Too {'long' if v == 'maxLength' else 'many'}: must have at most {error.validator_value}"
                             f" {'characters' if v == 'maxLength' else 'items'}"))
        elif v in ("minimum", "exclusiveMinimum"):
            op = "greater than or equal to" if v == "minimum" else "greater than"
            out.append(Cause(path, "FieldValueInvalid",
                             f"Invalid value: {_short(error.instance)}: {path} in body should be {op} {error.validator_value}"))
        elif v in ("maximum", "exclusiveMaximum"):
            op = "less than or equal to" if v == "maximum" else "less than"
            out.append(Cause(path, "FieldValueInvalid",
                             f"Invalid value: {_short(error.instance)}: {path} in body should be {op} {error.validator_value}"))
        elif v == "pattern":
            out.append(Cause(path, "FieldValueInvalid",
                             f"Invalid value: {_short(error.instance)}: {path} in body should match '{error.validator_value}'"))
        else:
            out.append(Cause(path, "FieldValueInvalid", f"Invalid value: {_short(error.instance)}: {error.message}"))
    return out


class OfficialSchemas:
    """The strict official schemas of one minor version; validators are built once per kind."""

    def __init__(self, version: str):
        import importlib.resources

        import kubernetes_validate.utils as kv

        if version not in _available():
            raise ValueError(f"no official schemas for Kubernetes {version}; have {', '.join(_available())}")
        self.version = version
        full = [v for v in kv.all_versions() if kv.major_minor(v) == version][-1]
        self._dir = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{full}-local-strict"
        self._validators: dict[str, Any] = {}

    @functools.cached_property
    def _registry(self) -> Any:
        from referencing import Registry, Resource

        definitions = json.loads((self._dir / "_definitions.json").read_text())
        return Resource.from_contents(definitions) @ Registry()

    @staticmethod
    def file_name(api_version: str, kind: str) -> str:
        group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
        return f"{kind.lower()}-{group_version}.json"

    def knows(self, api_version: str, kind: str) -> bool:
        return (self._dir / self.file_name(api_version, kind)).is_file()

    def validator(self, api_version: str, kind: str) -> Any:
        import jsonschema

        name = self.file_name(api_version, kind)
        if name not in self._validators:
            path = self._dir / name
            if not path.is_file():
                raise KeyError(f"Kubernetes {self.version} has no {kind} in {api_version}")
            schema = json.loads(path.read_text())
            self._validators[name] = jsonschema.Draft202012Validator(schema, registry=self._registry)
        return self._validators[name]

    def causes(self, obj: dict[str, Any]) -> list[Cause]:
        """Every schema error of `obj` (empty: the object is valid)."""
        validator = self.validator(obj.get("apiVersion", ""), obj.get("kind", ""))
        return causes_of(sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))))


@functools.cache
def schemas(version: str) -> OfficialSchemas:
    return OfficialSchemas(version)


def problems(obj: dict[str, Any], version: str) -> list[str]:
    """`field: message` for every schema error of `obj` under Kubernetes `version`."""
    return [str(c) for c in schemas(version).causes(obj)]
