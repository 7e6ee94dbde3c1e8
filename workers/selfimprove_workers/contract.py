"""The contract between the control plane and a worker stage.

A stage receives one `StageTask` (as JSON: a Job's argument, or a file for the local runner) and
returns one `StageResult`. The result's compact JSON is the *summary* the control plane reads — a
Kubernetes termination message, which the kubelet truncates at 4096 bytes, so the summary is
capped at `SUMMARY_LIMIT` and a bigger one is an error rather than a silently cut message. The
full metrics go to `result.json` next to the stage's artifacts.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from typing import Any, Literal

from pydantic import Field, model_validator

from .constants import API_VERSION, RESULT_FILE, SUMMARY_LIMIT, OutputName, now_rfc3339
from .endpoints import Endpoint
from .exemplars import ExemplarsSpec
from .spec import (
    AugmentSpec,
    EngineSpec,
    EvaluationSpec,
    FilterSpec,
    SamplingSpec,
    TaskSpec,
    TrainingSpec,
    WireModel,
)
from .stage_registry import STAGES, stage

__all__ = [
    "API_VERSION", "RESULT_FILE", "SUMMARY_LIMIT", "OutputName", "now_rfc3339", "StageName", "RunRef",
    "StorageRef", "ModelRef", "StageInputs", "PinnedInput", "StageTask", "StageResult", "Metric", "full_result",
    "MULTI_NODE_STAGE", "MAX_NODES", "RDZV_ENDPOINT_ENV", "RDZV_ID_ENV", "RDZV_PORT",
]

# One member per registered stage kind (stage_registry.py), in registration order.
StageName = Enum("StageName", [(name, name) for name in STAGES], type=str)  # type: ignore[misc]

# The one stage that runs on several nodes: data-parallel training needs every rank at once
# (a rendezvous), which the other stages' independent rows do not (they shard instead).
MULTI_NODE_STAGE = "train"
MAX_NODES = 64
# Set on every node of a multi-node stage by its Job (operator k8s/jobs.py) or the local
# executor: where node 0 hosts the c10d rendezvous (`<job>-0.<service>:29400` on Kubernetes) and
# its id (the Job's name: one per attempt, so a retried Job never joins the one before it).
RDZV_ENDPOINT_ENV = "SELFIMPROVE_RDZV_ENDPOINT"
RDZV_ID_ENV = "SELFIMPROVE_RDZV_ID"
RDZV_PORT = 29400


class RunRef(WireModel):
    name: str = Field(..., min_length=1, description="The SelfImproveRun's name.")
    namespace: str = Field("default", description="The SelfImproveRun's namespace.")
    uid: str = Field("", description="The SelfImproveRun's uid (empty for local runs).")


class StorageRef(WireModel):
    """Where and how to reach storage. Credentials are never part of a task: they come from the
    standard AWS environment variables, which the Job fills from the run's secret."""

    endpoint: str | None = Field(None, description="S3 endpoint URL (MinIO, Ceph, …).")
    region: str | None = Field(None, description="S3 region.")


class ModelRef(WireModel):
    base: str = Field(..., min_length=1, description="Base model: a URI (s3://, file://) or a local path.")
    adapter: str | None = Field(
        None, description="LoRA adapter to apply (the previous round's), a URI of a peft directory."
    )
    teacher: str | None = Field(None, description="Teacher model for augmentation (defaults to base).")
    judge: str | None = Field(None, description="Judge model for the judge filter (defaults to teacher).")
    teacher_endpoint: Endpoint | None = Field(
        None, description="The teacher served over HTTP (OpenAI API) instead of `teacher` weights; its API key, "
        "if any, is the environment variable SELFIMPROVE_TEACHER_API_KEY, never part of the task.")
    judge_endpoint: Endpoint | None = Field(
        None, description="The judge served over HTTP (OpenAI API); its API key, if any, is the environment "
        "variable SELFIMPROVE_JUDGE_API_KEY. A judge filter without a `model` uses it before the teacher.")


class StageInputs(WireModel):
    """Named inputs; which ones a stage needs is checked in `StageTask`."""

    questions: str | None = Field(None, description="Unlabeled questions (JSONL) to sample.")
    samples: str | None = Field(None, description="`samples.jsonl` of this round's sample stage.")
    votes: str | None = Field(None, description="`votes.jsonl` of this round's sample stage.")
    validation: str | None = Field(None, description="Small labeled set (IWSI's distribution reference).")
    evaluation: str | None = Field(None, description="Labeled held-out set for accuracy.")
    seed: str | None = Field(None, description="Labeled seed set (LLM2LLM).")
    predictions: str | None = Field(
        None, description="An evaluation's `seed_predictions.jsonl` whose wrong answers get augmented."
    )
    train: list[str] = Field(default_factory=list, description="JSONL files the adapter is trained on.")
    existing: list[str] = Field(
        default_factory=list, description="Question files new augmented questions must not duplicate."
    )


class PinnedInput(WireModel):
    """One input file of the run, pinned to the version it had when the run started."""

    field: str = Field(..., min_length=1, description="The spec field naming it, e.g. data.questions.")
    uri: str = Field(..., min_length=1, description="The file.")
    digest: str | None = Field(
        None, description="Its digest when the run started (`storage.Storage.fingerprint`: sha256 of a "
        "local file, ETag and version of an S3 object); none: this stage records it.")


class StageTask(WireModel):
    api_version: Literal["selfimprove.dev/v1alpha1"] = Field(API_VERSION, description="Contract version.")
    kind: Literal["StageTask"] = Field("StageTask", description="Always StageTask.")
    run: RunRef = Field(..., description="The run this stage belongs to.")
    round: int = Field(..., ge=0, description="Round number; round 0 evaluates the base model.")
    stage: StageName = Field(..., description="Which stage to run.")
    attempt: int = Field(1, ge=1, description="Attempt number (1 for the first).")
    output: str = Field(..., min_length=1, description="Storage prefix the stage writes its files under.")
    storage: StorageRef = Field(default_factory=StorageRef, description="How to reach storage.")
    model: ModelRef = Field(..., description="Models and adapter the stage uses.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="Inference engine settings.")
    gpus: int = Field(0, ge=0, description="Accelerators of the Job (tensor / data parallel size).")
    inputs: StageInputs = Field(default_factory=StageInputs, description="Input URIs.")
    # `prompting`, not `task`: call sites read `ctx.task.prompting.answer`.
    prompting: TaskSpec = Field(default_factory=TaskSpec, description="Prompts and answer extraction (the run's spec.task).")
    sampling: SamplingSpec | None = Field(None, description="sample: how to sample.")
    filters: list[FilterSpec] = Field(default_factory=list, description="filter: filters in order.")
    training: TrainingSpec | None = Field(None, description="train: how to train.")
    evaluation: EvaluationSpec | None = Field(None, description="evaluate: how to evaluate.")
    augment: AugmentSpec | None = Field(None, description="augment: how to augment.")
    exemplars: ExemplarsSpec | None = Field(None, description="exemplars: how the teacher's next exemplars are chosen.")
    pinned: list[PinnedInput] = Field(
        default_factory=list,
        description="The run's input files: the runtime records the digest of those without one (the "
        "run's first stage) and fails with InputChanged, naming the file, when one differs.")
    shards: int = Field(1, ge=1, le=1000, description="Parallel pods splitting the stage's input rows "
                        "(a shardable stage's resources.shards); 1 runs it whole.")
    shard_indexes: list[int] | None = Field(
        None, description="The shards this Job or attempt runs: pod k (JOB_COMPLETION_INDEX=k) runs shard "
        "shardIndexes[k]; none: every shard, pod k runs shard k. A retry carries only the unfinished ones.")
    nodes: int = Field(1, ge=1, le=MAX_NODES, description="train: nodes (pods of one Indexed Job) training together, "
                       "data parallel over a c10d rendezvous; `gpus` processes on each. 1 trains on one pod.")

    @model_validator(mode="after")
    def _has_what_the_stage_needs(self) -> "StageTask":
        kind = stage(self.stage.value)
        inputs, sections = kind.inputs, kind.sections
        for name in inputs:
            if not getattr(self.inputs, name):
                raise ValueError(f"inputs.{name}: is required for the {self.stage.value} stage")
        for name in sections:
            if not getattr(self, name):
                raise ValueError(f"{name}: is required for the {self.stage.value} stage")
        if self.shards > 1 and not kind.shardable:
            raise ValueError(f"shards: the {self.stage.value} stage cannot be sharded (only "
                             f"{', '.join(n for n, k in STAGES.items() if k.shardable)})")
        if self.nodes > 1 and self.stage.value != MULTI_NODE_STAGE:
            raise ValueError(f"nodes: only the train stage runs on several nodes, not {self.stage.value}")
        if self.shard_indexes is not None:
            bad = [i for i in self.shard_indexes if not 0 <= i < self.shards]
            if bad or not self.shard_indexes or len(set(self.shard_indexes)) != len(self.shard_indexes):
                raise ValueError(f"shardIndexes: {self.shard_indexes} must be distinct shards in 0..{self.shards - 1}")
        return self

    def digest(self) -> str:
        """Identity of the work, recorded in `_SUCCESS`: the same task re-run is skipped, a
        different task must not reuse the directory. The attempt number and the shards this
        attempt runs are not part of it (a retry of shard 1 is the same work as the first try)."""
        body = self.wire()
        body.pop("attempt", None)
        body.pop("shardIndexes", None)
        if body.get("shards") == 1:
            body.pop("shards")  # a one-shard task keeps the digest it had before sharding existed
        if body.get("nodes") == 1:
            body.pop("nodes")   # likewise a one-node task, before multi-node training existed
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()

    def uri(self, name: str) -> str:
        """URI of an output file of this stage."""
        return self.output.rstrip("/") + "/" + name


Metric = float | int | str | bool


class StageResult(WireModel):
    api_version: Literal["selfimprove.dev/v1alpha1"] = Field(API_VERSION, description="Contract version.")
    kind: Literal["StageResult"] = Field("StageResult", description="Always StageResult.")
    stage: StageName = Field(..., description="The stage that ran.")
    round: int = Field(..., ge=0, description="Its round.")
    status: Literal["Succeeded", "Failed"] = Field(..., description="Outcome.")
    reason: str | None = Field(
        None, description="Machine-readable reason when it failed: BadInput, StorageError, Error."
    )
    message: str | None = Field(None, description="Human-readable message; names the field or file:line.")
    skipped: bool = Field(False, description="True when the output was already complete.")
    metrics: dict[str, Metric] = Field(default_factory=dict, description="Headline metrics.")
    outputs: dict[str, str] = Field(default_factory=dict, description="Named output URIs.")
    inputs: dict[str, str] = Field(
        default_factory=dict, description="Digests of the task's pinned inputs, by spec field (data.questions: sha256:…).")
    started_at: str | None = Field(None, description="RFC 3339 start time.")
    finished_at: str | None = Field(None, description="RFC 3339 end time.")
    shard: int | None = Field(None, ge=0, description="The shard this result is of; none: the whole stage's (merged) result.")
    shards: int = Field(1, ge=1, description="Shards of the stage.")

    def summary_json(self) -> str:
        """Compact JSON of at most SUMMARY_LIMIT bytes. A long message is shortened (it is the
        only free text); anything else that does not fit is a bug in the stage, so it raises."""
        text = self._compact(self)
        if len(text.encode()) <= SUMMARY_LIMIT:
            return text
        if self.message:
            overflow = len(text.encode()) - SUMMARY_LIMIT
            room = len(self.message.encode()) - overflow - 16
            if room > 0:
                short = self.message.encode()[:room].decode(errors="ignore") + " …[truncated]"
                text = self._compact(self.model_copy(update={"message": short}))
                if len(text.encode()) <= SUMMARY_LIMIT:
                    return text
        raise ValueError(
            f"result summary is {len(text.encode())} bytes; the limit is {SUMMARY_LIMIT}"
            " (move detail to result.json)"
        )

    @staticmethod
    def _compact(result: "StageResult") -> str:
        return json.dumps(result.wire(), separators=(",", ":"), ensure_ascii=False)

    @model_validator(mode="after")
    def _fits(self) -> "StageResult":
        # Fail where the result is built, not later in the control plane.
        self.summary_json()
        return self

    @classmethod
    def parse_summary(cls, text: str) -> "StageResult":
        return cls.model_validate_json(text)


def full_result(summary: StageResult, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Body of `result.json`: the summary plus everything too large for it."""
    return {"summary": summary.wire(), "details": details or {}}
