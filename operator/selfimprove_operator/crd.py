"""Generate the SelfImproveRun CustomResourceDefinition from the pydantic models.

Kubernetes accepts only a *structural* OpenAPI v3.0 schema: every node typed, no `$ref`, no
free `anyOf`/`oneOf`, `nullable` instead of `type: null`, boolean `exclusiveMinimum`. Pydantic
emits JSON Schema 2020-12, so this module inlines references and rewrites those constructs. The
output is deterministic; a test fails when the committed file differs from a fresh generation.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from selfimprove_workers.filter_registry import filter_kinds

from .api import GROUP, KIND, MAX_RUN_NAME, PLURAL, SHORT_NAME, VERSION, SelfImproveRun
from .strategies import spec_rules

CRD_PATH = Path("crds") / f"{GROUP}_{PLURAL}.yaml"
CHART_CRD_PATH = Path("charts") / "selfimprove" / CRD_PATH

# Keywords of apiextensions.k8s.io/v1 JSONSchemaProps that the generated schema may use.
_KEEP = {
    "type", "format", "description", "default", "enum", "pattern", "nullable",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
    "properties", "required", "items", "additionalProperties",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-validations",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline every `$ref` (pydantic may also wrap a ref in a one-element allOf)."""
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = node.pop("allOf")[0]
        node = {**inner, **node}
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        # The referencing property's own description is more specific than the model's docstring.
        node = {**target, **node}
    return {k: _resolve(v, defs) for k, v in node.items()}


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    node = dict(node)
    if "anyOf" in node:
        options = node.pop("anyOf")
        non_null = [o for o in options if o.get("type") != "null"]
        if len(non_null) == 1:
            merged = {**non_null[0], **{k: v for k, v in node.items()}}
            if len(options) > 1:
                merged["nullable"] = True
            node = merged
        else:
            # A scalar of several types (a metric may be a number or a string): structural
            # schemas cannot say "one of"; let the value through untyped.
            node = {"x-kubernetes-preserve-unknown-fields": True, **{k: v for k, v in node.items() if k == "description"}}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node[plain] = node.pop(bound)
            node[bound] = True
    if node.get("default", 0) is None:
        del node["default"]
    if node.get("type") == "object":
        extra = node.get("additionalProperties")
        if "properties" not in node and (extra is True or extra is None or extra == {}):
            # dict[str, Any]: free-form, as Kubernetes' own affinity would be written.
            node.pop("additionalProperties", None)
            node["x-kubernetes-preserve-unknown-fields"] = True
        elif extra is False:
            node.pop("additionalProperties")  # unknown fields are pruned by the API server
    out: dict[str, Any] = {}
    # type and description first: the file is read by people too.
    for key, value in sorted(node.items(), key=lambda kv: (kv[0] != "type", kv[0] != "description")):
        if key not in _KEEP:
            continue
        if key == "properties":
            out[key] = {name: _structural(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _structural(value)
        else:
            out[key] = value
    return out


def _schema_of(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(_resolve(raw, defs))


def _has_any(*fields: str) -> str:
    return " + ".join(f"(has(self.{f}) ? 1 : 0)" for f in fields)


# Immutable fields carry their own `self == oldSelf` rule, so the error names the field on every
# supported version: the rule fields `reason` and `fieldPath` would say the same on a rule of the
# parent, but Kubernetes 1.27 does not know them (they are 1.28+).
IMMUTABLE = ("strategy", "model", "data")


def _add_rules(spec: dict[str, Any], status: dict[str, Any]) -> None:
    for name in IMMUTABLE:
        spec["properties"][name]["x-kubernetes-validations"] = [
            {"rule": "self == oldSelf", "message": f"spec.{name} is immutable"},
        ]
    # The strategies' and filters' cross-field rules: the same Rule objects the models check.
    spec["x-kubernetes-validations"] = [rule.cel_rule() for rule in spec_rules()]
    filters = spec["properties"]["filters"]["items"]
    kinds = filter_kinds()
    filters["x-kubernetes-validations"] = [{
        "rule": _has_any(*kinds) + " == 1",
        "message": f"set exactly one of {', '.join(kinds)}",
    }]
    conditions = status["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]


def build_crd() -> dict[str, Any]:
    root = _schema_of(SelfImproveRun)
    spec = root["properties"]["spec"]
    status = root["properties"]["status"]
    status.pop("nullable", None)
    _add_rules(spec, status)
    schema = {
        "type": "object",
        "description": "A self-improvement run: rounds of sampling, selection, LoRA training and evaluation.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "selfimprove.dev/v1alpha1"},
            "kind": {"type": "string", "description": "SelfImproveRun"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [{
            "rule": f"size(self.metadata.name) <= {MAX_RUN_NAME}",
            "message": f"metadata.name must be at most {MAX_RUN_NAME} characters (stage Job names derive from it)",
        }],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": [SHORT_NAME],
                "categories": ["selfimprove"],
            },
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Strategy", "type": "string", "jsonPath": ".spec.strategy", "priority": 1},
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Round", "type": "integer", "jsonPath": ".status.round"},
                    {"name": "Best", "type": "number", "format": "float", "jsonPath": ".status.bestAccuracy", "description": "Best accuracy"},
                    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary",
                     "description": "The running stage: percent, done/total, estimated time left"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": schema},
            }],
        },
    }


def render_crd() -> str:
    header = "# Generated by `selfimprove crd` from operator/selfimprove_operator/api.py. Do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100, allow_unicode=True)


def write_crd(path: Path = CRD_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_crd())
    return path
