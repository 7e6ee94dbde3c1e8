"""The JSON patch (RFC 6902) that turns the stored `.status` into the planner's (pure).

Why a JSON patch rather than a merge patch: a merge patch replaces whole lists, so two writers
of `status.conditions` silently drop each other's entries. Here each condition is replaced at
its index behind a `test` of its type, new ones are appended, and the whole patch is guarded by
a `test` of `metadata.resourceVersion`: a status computed from a stale copy of the run is
rejected (422) instead of overwriting newer state, and the controller re-reads and re-plans.
The patch goes to the `status` subresource, so the operator cannot touch the spec (GitOps tools
own it) even by mistake.
"""

from __future__ import annotations

from typing import Any

Op = dict[str, Any]


def pointer(*parts: str | int) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def status_patch(old: dict[str, Any] | None, new: dict[str, Any], resource_version: str | None) -> list[Op]:
    """Ops from `old` (the stored status, raw) to `new` (the wire form); [] when equal."""
    ops: list[Op] = []
    if not old:
        if new:
            ops.append({"op": "add", "path": "/status", "value": new})
    else:
        for key in sorted(set(old) | set(new)):
            if key == "conditions" and key in old and key in new and isinstance(old[key], list):
                ops.extend(_condition_ops(old[key], new[key]))
            elif key not in new:
                ops.append({"op": "remove", "path": pointer("status", key)})
            elif key not in old:
                ops.append({"op": "add", "path": pointer("status", key), "value": new[key]})
            elif old[key] != new[key]:
                ops.append({"op": "replace", "path": pointer("status", key), "value": new[key]})
    if ops and resource_version:
        ops.insert(0, {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version})
    return ops


def _condition_ops(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[Op]:
    ops: list[Op] = []
    index = {c.get("type"): i for i, c in enumerate(old)}
    wanted = {c.get("type") for c in new}
    for cond in new:
        i = index.get(cond.get("type"))
        if i is None:
            ops.append({"op": "add", "path": pointer("status", "conditions", "-"), "value": cond})
        elif old[i] != cond:
            ops.append({"op": "test", "path": pointer("status", "conditions", i, "type"), "value": cond.get("type")})
            ops.append({"op": "replace", "path": pointer("status", "conditions", i), "value": cond})
    # Removals last and from the highest index down, so earlier indexes stay valid.
    for i in sorted((i for t, i in index.items() if t not in wanted), reverse=True):
        ops.append({"op": "test", "path": pointer("status", "conditions", i, "type"), "value": old[i].get("type")})
        ops.append({"op": "remove", "path": pointer("status", "conditions", i)})
    return ops
