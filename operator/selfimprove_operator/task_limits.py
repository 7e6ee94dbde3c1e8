"""The stage task against the one hard limit on its size: a Job carries it as one container
argument (k8s/jobs.py), and Linux refuses an exec whose single argument string is longer than
MAX_ARG_STRLEN (32 pages = 128 KiB, terminating NUL included) with E2BIG, whatever ARG_MAX says.
The API server accepts such a Job (it is far below the ~1.5 MiB object limit) and the kubelet
then fails to start the container with a message that names neither the run nor the field, so
the planner refuses the task first, naming the spec fields that take the room (docs/scaling.md).

Pure: the planner calls it on every task it builds, for local runs too, so a manifest that
runs locally also starts on a cluster.
"""

from __future__ import annotations

import json
from typing import Any

from selfimprove_workers.contract import StageTask

MAX_ARG_STRLEN = 32 * 4096
# The compact JSON is what jobs.py passes; the NUL terminator counts against the limit.
MAX_TASK_BYTES = MAX_ARG_STRLEN - 1
# The task's sections under the run spec's own names (the task calls `spec.task` `prompting`).
SPEC_NAMES = {"prompting": "task"}
# How the biggest offenders are usually moved out of the argument.
REMEDIES = {
    "task.fewShot": "move the exemplars to task.fewShotFile (a JSONL the stage reads from storage)",
    "task.instruction": "shorten task.instruction",
    "task.system": "shorten task.system",
}


def task_arg(task: StageTask) -> str:
    """The task exactly as the Job passes it (and as this module measures it)."""
    return json.dumps(task.wire(), separators=(",", ":"), sort_keys=True)


def _size(obj: Any) -> int:
    return len(json.dumps(obj, separators=(",", ":"), sort_keys=True).encode())


def largest_fields(wire: dict[str, Any], top: int = 3) -> list[tuple[str, int]]:
    """The task's biggest fields, one level into each section, by spec path (task.fewShot, …)."""
    sizes: list[tuple[str, int]] = []
    for key, value in wire.items():
        name = SPEC_NAMES.get(key, key)
        if isinstance(value, dict) and value:
            sizes.extend((f"{name}.{k}", _size(v)) for k, v in value.items())
        else:
            sizes.append((name, _size(value)))
    return sorted(sizes, key=lambda kv: -kv[1])[:top]


def oversize(task: StageTask) -> str | None:
    """None when the task fits one container argument; else a message for the stage's status
    naming the size, the limit and the fields to shrink."""
    size = len(task_arg(task).encode())
    if size <= MAX_TASK_BYTES:
        return None
    fields = largest_fields(task.wire())
    where = ", ".join(f"{name} {n:,} B" for name, n in fields)
    fix = next((REMEDIES[name] for name, _ in fields if name in REMEDIES), f"shrink {fields[0][0]}")
    return (f"the {task.stage.value} stage's task is {size:,} B, over the {MAX_TASK_BYTES:,} B a container "
            f"argument may hold (Linux MAX_ARG_STRLEN; the pod could not start); largest: {where}: {fix}")
