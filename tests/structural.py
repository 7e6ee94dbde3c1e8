"""A checker for Kubernetes' structural-schema rules (apiextensions.k8s.io/v1).

Mirrors what the API server enforces on a CRD's openAPIV3Schema (k8s.io/apiextensions-apiserver
pkg/apiserver/schema, validation.go), so a bad schema fails here instead of at `kubectl apply`:
1. every node specifies a non-empty `type` (unless x-kubernetes-int-or-string or
   x-kubernetes-preserve-unknown-fields is set);
2. no `$ref`, `definitions`, `$schema`, `id`, `dependencies`, `patternProperties`, `additionalItems`,
   `uniqueItems: true`; `anyOf`/`allOf`/`oneOf`/`not` only as pure value validations (we use none);
3. `properties` only on objects, `items` only (and required) on arrays;
4. `additionalProperties` and `properties` are mutually exclusive; `additionalProperties: false`
   is not allowed;
5. `nullable` and `x-kubernetes-*` flags are booleans / of the right shape; list-map keys are
   required properties of the items;
6. `metadata` at the root may only restrict `name` and `generateName`;
7. defaults validate against their own node and contain no unknown fields;
8. `exclusiveMinimum`/`exclusiveMaximum` are booleans (OpenAPI v3.0), `minimum`/`maximum` numbers.
"""

from __future__ import annotations

from typing import Any

ALLOWED = {
    "type", "format", "title", "description", "default", "enum", "pattern", "nullable",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
    "properties", "required", "items", "additionalProperties", "example", "externalDocs",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-validations", "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
}
FORBIDDEN = {"$ref", "definitions", "$defs", "$schema", "id", "dependencies", "patternProperties",
             "additionalItems", "anyOf", "allOf", "oneOf", "not", "const"}
TYPES = {"object", "array", "string", "integer", "number", "boolean"}


def check(schema: dict[str, Any]) -> list[str]:
    errors: list[str] = []
    _node(schema, "openAPIV3Schema", errors, root=True)
    return errors


def _node(node: Any, path: str, errors: list[str], root: bool = False) -> None:
    if not isinstance(node, dict):
        errors.append(f"{path}: not a schema object")
        return
    for key in node:
        if key in FORBIDDEN:
            errors.append(f"{path}: `{key}` is not allowed in a structural schema")
        elif key not in ALLOWED:
            errors.append(f"{path}: unknown keyword `{key}`")
    untyped_ok = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    typ = node.get("type")
    if typ is None and not untyped_ok:
        errors.append(f"{path}: must specify a type")
    if typ is not None and typ not in TYPES:
        errors.append(f"{path}: unknown type {typ!r}")
    if "properties" in node and typ not in (None, "object"):
        errors.append(f"{path}: properties on a non-object")
    if typ == "array" and "items" not in node:
        errors.append(f"{path}: an array must specify items")
    if "items" in node and typ != "array":
        errors.append(f"{path}: items on a non-array")
    if "items" in node and not isinstance(node["items"], dict):
        errors.append(f"{path}: items must be a single schema")
    extra = node.get("additionalProperties")
    if extra is not None:
        if "properties" in node:
            errors.append(f"{path}: additionalProperties and properties are mutually exclusive")
        if extra is False:
            errors.append(f"{path}: additionalProperties: false is not allowed")
    for flag in ("nullable", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "exclusiveMinimum", "exclusiveMaximum"):
        if flag in node and not isinstance(node[flag], bool):
            errors.append(f"{path}: {flag} must be a boolean")
    for bound in ("minimum", "maximum"):
        if bound in node and (isinstance(node[bound], bool) or not isinstance(node[bound], (int, float))):
            errors.append(f"{path}: {bound} must be a number")
    if "enum" in node and not isinstance(node["enum"], list):
        errors.append(f"{path}: enum must be a list")
    for required in node.get("required", []):
        if required not in node.get("properties", {}):
            errors.append(f"{path}: required property {required!r} is not declared")
    if "x-kubernetes-list-map-keys" in node:
        if node.get("x-kubernetes-list-type") != "map":
            errors.append(f"{path}: list-map-keys need x-kubernetes-list-type: map")
        item_required = set(node.get("items", {}).get("required", []))
        for key in node["x-kubernetes-list-map-keys"]:
            if key not in item_required:
                errors.append(f"{path}: list-map key {key!r} must be a required property of the items")
    for rule in node.get("x-kubernetes-validations", []):
        if not isinstance(rule, dict) or not isinstance(rule.get("rule"), str):
            errors.append(f"{path}: x-kubernetes-validations entries need a `rule` string")
    if root:
        meta = node.get("properties", {}).get("metadata")
        if meta is not None:
            allowed_meta = set(meta.get("properties", {})) - {"name", "generateName"}
            if allowed_meta or set(meta) - {"type", "properties", "description"}:
                errors.append(f"{path}.metadata: may only restrict name and generateName")
    for name, sub in node.get("properties", {}).items():
        _node(sub, f"{path}.{name}", errors)
    if isinstance(node.get("items"), dict):
        _node(node["items"], f"{path}[]", errors)
    if isinstance(extra, dict):
        _node(extra, f"{path}{{}}", errors)


def to_jsonschema(node: Any) -> Any:
    """OpenAPI v3.0 (as Kubernetes reads it) → JSON Schema draft 2020-12, for jsonschema.

    Kubernetes does not reject unknown fields of a typed object: it prunes them. The strict
    direction is better for our tests (a manifest field the CRD lacks would be silently dropped),
    so objects with declared properties get additionalProperties: false.
    """
    if isinstance(node, list):
        return [to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if out.get(bound) is True:
            out[bound] = out.pop(plain)
        elif out.get(bound) is False:
            out.pop(bound)
    if "properties" in node:
        out["properties"] = {k: to_jsonschema(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = out["enum"] + [None]
    return out
