"""Typed views of the raw Kubernetes bodies the controller reads: Jobs, Pods, SelfImproveRuns.

kopf and the API hand over plain dicts. These TypedDicts (`total=False`: any key may be missing,
as it may on the wire) name the fields the cache, the reconciler and `observe` read, so a
reader's signature says which parts of an object it depends on. They are types only: at run time
a body stays the dict it came as, and nothing is validated or copied.
"""

from __future__ import annotations

from typing import Any, TypedDict


class OwnerReference(TypedDict, total=False):
    apiVersion: str
    kind: str
    name: str
    uid: str
    controller: bool
    blockOwnerDeletion: bool


class ObjectMeta(TypedDict, total=False):
    name: str
    generateName: str
    namespace: str
    uid: str
    resourceVersion: str
    generation: int
    labels: dict[str, str]
    annotations: dict[str, str]
    ownerReferences: list[OwnerReference]
    creationTimestamp: str
    deletionTimestamp: str


class Condition(TypedDict, total=False):
    """A Job's or a Pod's status condition (`status` is the string "True", "False" or "Unknown")."""

    type: str
    status: str
    reason: str
    message: str
    lastTransitionTime: str


# ----------------------------------------------------------------------------------- Job
class JobSpec(TypedDict, total=False):
    suspend: bool


class JobStatus(TypedDict, total=False):
    conditions: list[Condition]
    completionTime: str
    startTime: str
    active: int
    ready: int
    completedIndexes: str   # an Indexed Job's succeeded completion indexes, compressed: "0-2,4"
    failedIndexes: str      # likewise, the indexes that used up their backoffLimitPerIndex


class JobBody(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: JobSpec
    status: JobStatus


# ----------------------------------------------------------------------------------- Pod
class ContainerStateRunning(TypedDict, total=False):
    startedAt: str


class ContainerStateWaiting(TypedDict, total=False):
    reason: str
    message: str


class ContainerStateTerminated(TypedDict, total=False):
    exitCode: int
    signal: int
    reason: str
    message: str    # the termination message: the worker's result summary, or its log tail
    startedAt: str
    finishedAt: str


class ContainerState(TypedDict, total=False):
    running: ContainerStateRunning
    waiting: ContainerStateWaiting
    terminated: ContainerStateTerminated


class ContainerStatus(TypedDict, total=False):
    name: str
    state: ContainerState
    lastState: ContainerState
    ready: bool
    restartCount: int


class PodStatus(TypedDict, total=False):
    phase: str
    reason: str
    message: str
    conditions: list[Condition]
    containerStatuses: list[ContainerStatus]
    initContainerStatuses: list[ContainerStatus]


class PodBody(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    status: PodStatus


# ----------------------------------------------------------------------------------- SelfImproveRun
class RunBody(TypedDict, total=False):
    """A SelfImproveRun as the watch delivers it; `spec` and `status` are parsed by the models
    (`SelfImproveRunSpec`, `SelfImproveRunStatus`), so they stay untyped here."""

    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: dict[str, Any]
    status: dict[str, Any]
