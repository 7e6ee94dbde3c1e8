"""What a real API server does with a custom resource, from its CRD's structural schema.

For every create and update of a custom resource, kube-apiserver (k8s.io/apiextensions-apiserver)
1. **prunes** every field the schema does not declare (unless `x-kubernetes-preserve-unknown-fields`)
   — in `spec` and, silently, in `status` too — and drops `null`s of non-nullable fields;
2. **defaults** missing fields from the schema's `default`s (a parent must exist for its
   children's defaults to apply);
3. **validates** the result against the schema (types, enums, bounds, patterns, lengths, list
   sizes, `x-kubernetes-list-type` uniqueness) and evaluates every `x-kubernetes-validations`
   CEL rule with `self` bound to the value at the rule's node — transition rules (those that
   name `oldSelf`) only on an update, and only where the old object has a correlated value
   (object properties, map values and `x-kubernetes-list-type: map` items correlate; plain list
   items do not);
4. answers a failed validation with `422 Invalid` whose `details.causes` name each field.

CEL runs in `cel-python`, a real CEL implementation; the root's `self.metadata` holds only
`name` and `generateName`, as in Kubernetes. Rules are compiled when the schema is loaded, as
the API server compiles them when the CRD is created, so a rule that does not compile (or uses a
Kubernetes CEL extension cel-python lacks) fails loudly here instead of passing untested.

Not modelled: CEL cost estimation (the server rejects a CRD whose rules could cost too much),
validation ratcheting (1.30+: unchanged invalid values are let through), `format` checks,
`messageExpression`, conversion webhooks.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from k8s_schemas import Cause, causes_of, field_path

MISSING = object()
_REASON_PREFIX = {
    "FieldValueInvalid": None,  # "Invalid value: <type>: <message>"
    "FieldValueForbidden": "Forbidden",
    "FieldValueRequired": "Required value",
    "FieldValueDuplicate": "Duplicate value",
}


def _type_name(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if value is None:
        return "null"
    return "string"


@dataclass
class _Rule:
    rule: str
    message: str
    reason: str
    field_path: str
    program: Any
    transition: bool


def _to_jsonschema(node: Any) -> Any:
    """OpenAPI v3.0 (structural) → JSON Schema 2020-12, keeping Kubernetes' meaning: unknown
    fields are already pruned, so objects stay open; `nullable` admits null."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "default", "description"):
            continue
        if key == "properties":
            out[key] = {k: _to_jsonschema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _to_jsonschema(value)
        else:
            out[key] = value
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if out.get(bound) is True:
            out[bound] = out.pop(plain)
        elif out.get(bound) is False:
            out.pop(bound)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


class CustomResourceSchema:
    """One served version of a CRD, as the API server enforces it."""

    def __init__(self, crd: dict[str, Any], version: str | None = None):
        import celpy
        import jsonschema

        spec = crd["spec"]
        versions = spec["versions"]
        served = next(v for v in versions if version is None or v["name"] == version)
        self.group, self.kind = spec["group"], spec["names"]["kind"]
        self.version = served["name"]
        self.schema: dict[str, Any] = served["schema"]["openAPIV3Schema"]
        self.status_subresource = "status" in (served.get("subresources") or {})
        self._validator = jsonschema.Draft202012Validator(_to_jsonschema(self.schema))
        self._cel = celpy.Environment()
        self._rules: dict[int, list[_Rule]] = {}
        self._compile(self.schema, "")

    # ------------------------------------------------------------------ loading
    def _compile(self, node: dict[str, Any], path: str) -> None:
        import celpy

        rules = []
        for entry in node.get("x-kubernetes-validations") or []:
            text = entry["rule"]
            try:
                program = self._cel.program(self._cel.compile(text))
            except celpy.CELParseError as exc:
                raise ValueError(f"{path or '<root>'}: CEL rule {text!r} does not compile: {exc}") from None
            rules.append(_Rule(
                rule=text, message=entry.get("message") or f"failed rule: {text}",
                reason=entry.get("reason") or "FieldValueInvalid", field_path=entry.get("fieldPath") or "",
                program=program, transition="oldSelf" in text,
            ))
        if rules:
            self._rules[id(node)] = rules
        for name, sub in (node.get("properties") or {}).items():
            self._compile(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            self._compile(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            self._compile(node["additionalProperties"], f"{path}{{}}")

    def rules(self) -> Iterator[str]:
        for rules in self._rules.values():
            for r in rules:
                yield r.rule

    # ------------------------------------------------------------------ pruning
    def prune(self, obj: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """(a pruned copy, the paths pruned). apiVersion, kind and metadata always stay."""
        pruned: list[str] = []
        out = {k: v for k, v in obj.items() if k in ("apiVersion", "kind", "metadata")}
        rest = {k: v for k, v in obj.items() if k not in out}
        body = self._prune(rest, self.schema, "", pruned, root=True)
        out.update(body)
        return out, pruned

    def _prune(self, value: Any, node: dict[str, Any], path: str, pruned: list[str], root: bool = False) -> Any:
        if isinstance(value, dict):
            props = node.get("properties")
            extra = node.get("additionalProperties")
            keep_unknown = node.get("x-kubernetes-preserve-unknown-fields")
            out = {}
            for key, sub in value.items():
                where = f"{path}.{key}" if path else key
                if props is not None and key in props:
                    child = props[key]
                elif isinstance(extra, dict):
                    child = extra
                elif keep_unknown:
                    out[key] = sub
                    continue
                elif root and key in ("apiVersion", "kind", "metadata"):
                    out[key] = sub
                    continue
                else:
                    pruned.append(where)
                    continue
                if sub is None and not child.get("nullable"):
                    if "default" not in child:
                        pruned.append(where)
                    continue  # a null that is not allowed is dropped; a default may replace it
                out[key] = self._prune(sub, child, where, pruned)
            return out
        if isinstance(value, list) and isinstance(node.get("items"), dict):
            return [self._prune(v, node["items"], f"{path}[{i}]", pruned) for i, v in enumerate(value)]
        return value

    # ------------------------------------------------------------------ defaulting
    def default(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self._default(obj, self.schema)

    def _default(self, value: Any, node: dict[str, Any]) -> Any:
        if isinstance(value, dict):
            out = dict(value)
            for key, child in (node.get("properties") or {}).items():
                if key not in out and "default" in child:
                    out[key] = copy.deepcopy(child["default"])
            for key, sub in list(out.items()):
                child = (node.get("properties") or {}).get(key)
                if child is None and isinstance(node.get("additionalProperties"), dict):
                    child = node["additionalProperties"]
                if child is not None:
                    out[key] = self._default(sub, child)
            return out
        if isinstance(value, list) and isinstance(node.get("items"), dict):
            return [self._default(v, node["items"]) for v in value]
        return value

    # ------------------------------------------------------------------ validation
    def validate(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[Cause]:
        body = {k: v for k, v in obj.items() if k != "metadata"}
        causes = causes_of(sorted(self._validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path))))
        causes += self._list_types(body, self.schema, [])
        # As in the API server, CEL rules run unless a value has the wrong type (a blocking error).
        if not any(c.reason == "FieldValueTypeInvalid" for c in causes):
            meta = obj.get("metadata") or {}
            root = {**body, "metadata": {k: meta[k] for k in ("name", "generateName") if k in meta}}
            old_root = MISSING
            if old is not None:
                old_meta = old.get("metadata") or {}
                old_root = {**{k: v for k, v in old.items() if k != "metadata"},
                            "metadata": {k: old_meta[k] for k in ("name", "generateName") if k in old_meta}}
            causes += self._cel_rules(root, old_root, self.schema, [])
        return causes

    def _list_types(self, value: Any, node: dict[str, Any], path: list[Any]) -> list[Cause]:
        out: list[Cause] = []
        if isinstance(value, dict):
            for key, sub in value.items():
                child = (node.get("properties") or {}).get(key)
                if child is None and isinstance(node.get("additionalProperties"), dict):
                    child = node["additionalProperties"]
                if child is not None:
                    out += self._list_types(sub, child, [*path, key])
        elif isinstance(value, list):
            kind = node.get("x-kubernetes-list-type")
            seen: set[str] = set()
            for i, item in enumerate(value):
                if kind == "map" and isinstance(item, dict):
                    key = json.dumps([item.get(k) for k in node.get("x-kubernetes-list-map-keys") or []])
                elif kind == "set":
                    key = json.dumps(item, sort_keys=True)
                else:
                    key = None
                if key is not None:
                    if key in seen:
                        shown = json.dumps({k: item.get(k) for k in node["x-kubernetes-list-map-keys"]}) if kind == "map" \
                            else json.dumps(item)
                        out.append(Cause(field_path([*path, i]), "FieldValueDuplicate", f"Duplicate value: {shown}"))
                    seen.add(key)
                if isinstance(node.get("items"), dict):
                    out += self._list_types(item, node["items"], [*path, i])
        return out

    def _cel_rules(self, value: Any, old: Any, node: dict[str, Any], path: list[Any]) -> list[Cause]:
        import celpy

        out: list[Cause] = []
        for rule in self._rules.get(id(node), []):
            if rule.transition and old is MISSING:
                continue  # transition rules need a correlated old value
            activation = {"self": celpy.json_to_cel(value)}
            if rule.transition:
                activation["oldSelf"] = celpy.json_to_cel(old)
            where = field_path(path) + rule.field_path if rule.field_path else field_path(path)
            try:
                result = rule.program.evaluate(activation)
            except Exception as exc:  # noqa: BLE001 - cel-python raises for runtime errors
                result = exc
            if isinstance(result, Exception):
                out.append(Cause(where, "FieldValueInvalid",
                                 f"Invalid value: {json.dumps(_type_name(value))}: rule {rule.rule!r} "
                                 f"could not be evaluated: {result}"))
            elif not bool(result):
                prefix = _REASON_PREFIX.get(rule.reason)
                message = (f"{prefix}: {rule.message}" if prefix else
                           f"Invalid value: {json.dumps(_type_name(value))}: {rule.message}")
                out.append(Cause(where, rule.reason, message))
        if isinstance(value, dict):
            props = node.get("properties") or {}
            extra = node.get("additionalProperties") if isinstance(node.get("additionalProperties"), dict) else None
            for key, sub in value.items():
                child = props.get(key, extra)
                if child is None:
                    continue
                old_sub = old.get(key, MISSING) if isinstance(old, dict) else MISSING
                out += self._cel_rules(sub, old_sub, child, [*path, key])
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            items = node["items"]
            keys = node.get("x-kubernetes-list-map-keys") if node.get("x-kubernetes-list-type") == "map" else None
            old_by_key = {}
            if keys and isinstance(old, list):
                old_by_key = {json.dumps([o.get(k) for k in keys]): o for o in old if isinstance(o, dict)}
            for i, item in enumerate(value):
                old_item = old_by_key.get(json.dumps([item.get(k) for k in keys]), MISSING) \
                    if keys and isinstance(item, dict) else MISSING
                out += self._cel_rules(item, old_item, items, [*path, i])
        return out

    # ------------------------------------------------------------------ all of it
    def admit(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str], list[Cause]]:
        """(the object as it would be stored, the paths pruned, the validation causes)."""
        pruned_obj, pruned = self.prune(obj)
        stored = self.default(pruned_obj)
        return stored, pruned, self.validate(stored, old)


def invalid_message(kind: str, group: str, name: str, causes: list[Cause]) -> str:
    """The Status message of a 422, as the API server words it."""
    qualified = f"{kind}.{group}" if group else kind
    errors = [f"{c.field}: {c.message}" for c in causes]
    body = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
    return f"{qualified} {json.dumps(name)} is invalid: {body}"
