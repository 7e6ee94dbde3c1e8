"""The SelfImproveRun API (selfimprove.dev/v1alpha1): spec and status as pydantic models.

These models are the single source of truth: the CRD's schema is generated from them
(`selfimprove crd`), the validator and both executors load manifests through them. The parameter
sections a stage receives (task, sampling, filters, training, …) are the workers' own models,
imported here, so what a user writes is exactly what a stage validates.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import Field, create_model, field_validator, model_validator
from selfimprove_workers.contract import MAX_NODES, MULTI_NODE_STAGE
from selfimprove_workers.endpoints import Endpoint
from selfimprove_workers.exemplars import ExemplarsSpec
from selfimprove_workers.model_refs import ModelRef
from selfimprove_workers.spec import (
    AugmentSpec,
    EngineSpec,
    EvaluationSpec,
    FilterSpec,
    Probability,
    SamplingSpec,
    TaskSpec,
    TrainingSpec,
    Uri,
    WireModel,
)
from selfimprove_workers.stage_registry import STAGES, phases, stage_names

from .strategies import spec_rules, strategy_names

GROUP = "selfimprove.dev"
_SHARDABLE: Final = ", ".join(n for n, k in STAGES.items() if k.shardable)
VERSION = "v1alpha1"
API_VERSION: Final = "selfimprove.dev/v1alpha1"  # f"{GROUP}/{VERSION}", spelt out for the type checker
KIND: Final = "SelfImproveRun"
assert API_VERSION == f"{GROUP}/{VERSION}"
PLURAL = "selfimproveruns"
SHORT_NAME = "sir"

# Job names are `<run>-r<round>-<stage>[-a<attempt>]` and must stay a DNS label (≤ 63): a run
# name of at most 40 leaves room for round 999, "evaluate" and attempt 99.
MAX_RUN_NAME = 40
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

# Strategies, stages and their phases are the registries' (strategies/, stage_registry.py):
# these Literals are built from them, so the CRD's enums follow a registration.
if TYPE_CHECKING:  # the type checker sees names; pydantic (and the CRD) see the Literals
    Strategy = str
    Phase = str
    StageNameLiteral = str
else:
    Strategy = Literal[strategy_names()]
    Phase = Literal[("Pending", *phases(), "Succeeded", "Failed", "Suspended")]
    StageNameLiteral = Literal[stage_names()]
STAGE_PHASE: dict[str, str] = {name: kind.phase for name, kind in STAGES.items()}
CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "Succeeded", "Failed", "Suspended", "ValidationSelection")


# =========================================================================== spec
class SecretKeySelector(WireModel):
    name: str = Field(..., min_length=1, max_length=253, description="A Secret in the run's namespace.")
    key: str = Field(..., min_length=1, max_length=253, description="The Secret's key holding the API key.")


class EndpointSpec(Endpoint):
    """A served model (endpoints.py); the stage gets its key as an environment variable."""

    api_key_secret: SecretKeySelector | None = Field(
        None, description="Where the API key is: the Job sets the stage's SELFIMPROVE_TEACHER_API_KEY or "
        "SELFIMPROVE_JUDGE_API_KEY from this Secret key (the operator never reads it, the task never carries "
        "it); a local run reads that variable from its environment. Unset: requests carry no key.")

    def task_form(self) -> Endpoint:
        """What the stage task carries: everything but where the key is."""
        return Endpoint.model_validate(self.model_dump(exclude={"api_key_secret"}))


class ModelSpec(WireModel):
    base: ModelRef = Field(
        ...,
        description="Base model weights: an s3:// or file:// URI of a Hugging Face model folder, a path "
        "(e.g. on the model-cache volume), or a Hugging Face Hub repo, hf://ORG/NAME or hf://ORG/NAME@REVISION "
        "(downloaded once into the model cache, with HF_TOKEN from the storage secret when set).",
    )
    teacher: ModelRef | None = Field(
        None, description="Teacher model: LLM2LLM's augmentation and the judge (defaults to base); "
        "with strategy lmsi-teacher it samples and votes, and `base` is the student it teaches."
    )
    teacher_endpoint: EndpointSpec | None = Field(
        None, description="The teacher as a served model (vllm serve, a hosted OpenAI-compatible API) instead of "
        "weights loaded in the stage pod: LLM2LLM's augmentation and, by default, the judge ask it. Set this or "
        "`teacher`. Not for strategy lmsi-teacher, whose teacher samples in the sample stage."
    )
    judge_endpoint: EndpointSpec | None = Field(
        None, description="The judge filter's model as a served model; a judge filter without `model` uses it "
        "(else the teacher, else base). Set this or filters[].judge.model."
    )


class DataSpec(WireModel):
    questions: Uri | None = Field(
        None, description="Unlabeled questions (JSONL with `question`) that LMSI / IWSI sample."
    )
    seed: Uri | None = Field(None, description="Labeled seed set (JSONL with `question`, `answer`) for LLM2LLM.")
    validation: Uri | None = Field(
        None, description="Small labeled validation split (JSONL): the best round, rounds.patience and "
        "rounds.targetAccuracy are judged on it, never on `evaluation`; IWSI also measures distribution "
        "shift against it. Without it they fall back to `evaluation` and the status says so "
        "(condition ValidationSelection False).",
    )
    evaluation: Uri = Field(
        ..., description="Labeled held-out set (JSONL) every round is evaluated on."
    )


class RoundsSpec(WireModel):
    max: int | None = Field(
        None, ge=1, le=999,
        description="Rounds after round 0 (the base model's evaluation). Raising it on a finished "
        "run continues the run. Preset: lmsi 3, iwsi 3, llm2llm 10.",
    )
    patience: int = Field(
        1, ge=0, le=999,
        description="Stop after this many rounds without improving the best validation accuracy "
        "(`evaluation` accuracy without data.validation; 0: never stop early).",
    )
    min_improvement: float = Field(
        0.0, ge=0.0, le=1.0, description="Accuracy gain that counts as an improvement."
    )
    target_accuracy: Probability | None = Field(
        None, description="Stop as soon as a round reaches this validation accuracy (`evaluation` "
        "accuracy without data.validation)."
    )


class RetrySpec(WireModel):
    limit: int = Field(2, ge=0, le=100, description="Retries of a stage that failed transiently (exit code not 2).")
    backoff_seconds: int = Field(30, ge=0, le=86400, description="Delay before the first retry; doubles each time.")
    max_backoff_seconds: int = Field(900, ge=0, le=86400, description="Longest delay between retries.")


class Toleration(WireModel):
    key: str | None = Field(None, description="Taint key the toleration applies to.")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect matched; empty matches all."
    )
    toleration_seconds: int | None = Field(None, description="How long a NoExecute taint is tolerated.")


class ModelCacheSpec(WireModel):
    claim_name: str = Field(..., min_length=1, description="PersistentVolumeClaim holding downloaded models.")
    mount_path: str = Field("/cache", description="Where the cache is mounted in worker pods.")


class StageResourcesSpec(WireModel):
    """One stage's overrides of `spec.resources`: every field left out is the run's."""

    gpus: int | None = Field(None, ge=0, le=64, description="Accelerators of this stage's Jobs; default: the run's.")
    gpu_resource_name: str | None = Field(None, description="Extended resource requested for them; default: the run's.")
    cpu: str | None = Field(None, description="CPU request of this stage's pods; default: the run's.")
    memory: str | None = Field(None, description="Memory request and limit of this stage's pods; default: the run's.")
    image: str | None = Field(None, description="Worker image of this stage; default: the run's.")
    node_selector: dict[str, str] | None = Field(
        None, description="Node labels this stage's pods require; replaces (does not merge with) the run's.")
    tolerations: list[Toleration] | None = Field(
        None, description="Taints this stage's pods tolerate; replaces (does not extend) the run's.")
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity of this stage; replaces the run's.")
    priority_class_name: str | None = Field(None, description="PriorityClass of this stage's pods; default: the run's.")
    active_deadline_seconds: int | None = Field(None, ge=1, description="Deadline of this stage's Jobs; default: the run's.")
    shards: int | None = Field(
        None, ge=1, le=1000, description=f"Parallel pods splitting this stage's work ({_SHARDABLE}; filter shards "
        "its scoring, the selection runs once over the union); default: the run's. Only a shardable stage "
        "may have more than 1.")
    nodes: int | None = Field(
        None, ge=1, le=1, description=f"Always 1: only the {MULTI_NODE_STAGE} stage runs on several nodes.")

    @field_validator("nodes", mode="before")
    @classmethod
    def _one_node(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and v > 1:
            raise ValueError(f"is {v}, but only the {MULTI_NODE_STAGE} stage runs on several nodes")
        return v


class UnshardedStageResourcesSpec(StageResourcesSpec):
    """A stage that cannot be sharded (its rows are not independent: train): `shards`
    stays 1, in the model and, through the schema's maximum, in `kubectl apply`."""

    shards: int | None = Field(None, ge=1, le=1, description="Always 1: this stage cannot be sharded.")

    @field_validator("shards", mode="before")
    @classmethod
    def _one(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and v > 1:
            shardable = ", ".join(n for n, k in STAGES.items() if k.shardable)
            raise ValueError(f"is {v}, but this stage cannot be sharded (only {shardable} can)")
        return v


class TrainStageResourcesSpec(UnshardedStageResourcesSpec):
    """The train stage: not shardable, but data parallel over several nodes."""

    nodes: int | None = Field(
        None, ge=1, le=MAX_NODES,
        description="Nodes (pods of one Indexed Job, each with this stage's gpus) training one adapter "
        "data parallel over a torchrun c10d rendezvous; the global batch is batchSize × gpus × nodes. "
        "One node failing fails the attempt, and the retry resumes from the last checkpoint. Default 1.")

    @field_validator("nodes", mode="before")
    @classmethod
    def _one_node(cls, v: Any) -> Any:
        return v


def _overrides_of(name: str) -> Any:
    if name == MULTI_NODE_STAGE:
        return TrainStageResourcesSpec
    return StageResourcesSpec if STAGES[name].shardable else UnshardedStageResourcesSpec


# One optional entry per registered stage kind: an unknown stage name is an unknown field, which
# the model (and `kubectl apply`, the CRD being structural) rejects with its path.
_STAGE_OVERRIDES: dict[str, Any] = {
    name: (_overrides_of(name) | None,
           Field(None, description=f"Overrides for the {name} stage's Jobs."))
    for name in stage_names()
}
StageResourcesByStage = create_model("StageResourcesByStage", __base__=WireModel, **_STAGE_OVERRIDES)


class ResourcesSpec(WireModel):
    gpus: int | None = Field(
        None, ge=0, le=64,
        description="Accelerators per stage Job; default: the operator's setting (1). 0 runs stages on CPU.",
    )
    gpu_resource_name: str | None = Field(
        None, description="Extended resource requested for them; defaults to the operator's setting (nvidia.com/gpu)."
    )
    cpu: str | None = Field(None, description="CPU request of a stage pod (Kubernetes quantity).")
    memory: str | None = Field(None, description="Memory request and limit of a stage pod (Kubernetes quantity).")
    image: str | None = Field(None, description="Worker image for this run; defaults to the operator's.")
    service_account_name: str | None = Field(None, description="Service account of the stage pods.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels stage pods require.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints stage pods tolerate.")
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity, as in a PodSpec.")
    priority_class_name: str | None = Field(None, description="PriorityClass of the stage pods.")
    queue_name: str | None = Field(
        None, description="Kueue LocalQueue; Jobs are created suspended and Kueue admits them."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Longest a stage Job may run before it fails with DeadlineExceeded."
    )
    backoff_limit: int = Field(0, ge=0, le=100, description="Pod retries inside one Job (disruptions never count).")
    ttl_seconds_after_finished: int | None = Field(
        3600, ge=0, description="Finished Jobs are deleted after this long (their results are in status)."
    )
    model_cache: ModelCacheSpec | None = Field(None, description="Optional volume caching model weights.")
    shards: int | None = Field(
        None, ge=1, le=1000, description=f"Parallel pods (one Indexed Job) each shardable stage ({_SHARDABLE}) "
        "splits its input rows over; their outputs are merged into exactly a one-pod run's. Default 1.")
    stages: StageResourcesByStage | None = Field(  # type: ignore[valid-type]
        None,
        description="Per-stage overrides (sample, filter, train, evaluate, augment) of gpus, gpuResourceName, cpu, "
        "memory, image, nodeSelector, tolerations, affinity, priorityClassName and activeDeadlineSeconds, each "
        "defaulting to the run's value above, and train's nodes (multi-node data-parallel training): "
        "e.g. a large teacher's sample stage on 8 GPUs, the student's "
        "train and evaluate on 1.",
    )

    def for_stage(self, stage: str) -> "ResourcesSpec":
        """The resources of `stage`'s Jobs: the run's, with the stage's overrides field by field
        (`stages` itself dropped). Pure; the planner and the Job builder both call it."""
        override = getattr(self.stages, stage, None) if self.stages is not None else None
        changes: dict[str, Any] = {"stages": None}
        if override is not None:
            # `nodes` is the train stage's alone (planner.nodes_of), not a field of the run's resources.
            changes.update({k: getattr(override, k) for k in override.model_fields_set
                            if k != "nodes" and getattr(override, k) is not None})
        return self.model_copy(update=changes)


class StorageSpec(WireModel):
    uri: Uri = Field(
        ...,
        description="Where artifacts go: s3://bucket/prefix/ or file:///path/ (local runs).",
    )
    endpoint: str | None = Field(None, description="S3 endpoint URL (MinIO, Ceph RGW, …); empty for AWS.")
    region: str | None = Field(None, description="S3 region.")
    secret_ref: str | None = Field(
        None,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally "
        "AWS_SESSION_TOKEN) given to stage pods as environment; the operator never reads it.",
    )

    @model_validator(mode="after")
    def _scheme(self) -> "StorageSpec":
        if not re.match(r"^(s3://[^/]+|file://|/|\.)", self.uri):
            raise ValueError("uri: must start with s3://bucket, file:// or a path")
        return self


class SelfImproveRunSpec(WireModel):
    strategy: Strategy = Field(
        ..., description="Method preset: lmsi (self-consistency), iwsi (plus distribution-shift filter) or llm2llm (teacher augmentation)."
    )
    model: ModelSpec = Field(..., description="Models. Immutable after creation.")
    data: DataSpec = Field(..., description="Datasets. Immutable after creation.")
    task: TaskSpec = Field(default_factory=TaskSpec, description="Prompts and answer extraction.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="Inference engine of the stages.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Sampling of reasoning paths.")
    filters: list[FilterSpec] | None = Field(
        None, max_length=16,
        description="Selection filters applied in order. Preset: lmsi [consistency 0.9]; "
        "iwsi [consistency 0.9, distributionShift 0.8]; llm2llm none.",
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="LoRA training.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Evaluation.")
    augment: AugmentSpec = Field(default_factory=AugmentSpec, description="LLM2LLM augmentation.")
    exemplars: ExemplarsSpec = Field(
        default_factory=ExemplarsSpec,
        description="lmsi-teacher: how the student's confident, agreed answers become the teacher's next few-shot exemplars.")
    rounds: RoundsSpec = Field(default_factory=RoundsSpec, description="How many rounds and when to stop.")
    retry: RetrySpec = Field(default_factory=RetrySpec, description="Stage retries.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Where and how stage Jobs run.")
    storage: StorageSpec = Field(..., description="Artifact storage.")
    suspend: bool = Field(False, description="Start nothing new and suspend running stage Jobs.")

    @model_validator(mode="after")
    def _cross_field(self) -> "SelfImproveRunSpec":
        # The strategies' and filters' rules, the same ones the CRD carries as CEL.
        wire = self.wire()
        errors: list[str] = [e for rule in spec_rules() if (e := rule.violated(wire))]
        # Only here, not in CEL: it compares against engine.maxLoraRank's *default*, which the
        # API server does not store when `engine` is left out; the operator reports it instead.
        if self.engine.kind == "vllm" and self.training.lora.r and self.training.lora.r > self.engine.max_lora_rank:
            errors.append(
                f"training.lora.r: {self.training.lora.r} exceeds engine.maxLoraRank "
                f"{self.engine.max_lora_rank} (vLLM could not load the adapter)"
            )
        if errors:
            # One line per problem; the validator splits them back into field-named errors.
            raise ValueError("\n".join(errors))
        return self


# =========================================================================== status
class Condition(WireModel):
    """metav1.Condition."""

    type: str = Field(..., description="Ready, Progressing, Degraded, Succeeded, Failed or Suspended.")
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field(..., description="CamelCase reason for machines.")
    message: str = Field("", description="Message for humans.")
    last_transition_time: str = Field(..., description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="Spec generation the condition reflects.")


StageState = Literal["Pending", "Running", "Succeeded", "Failed", "Skipped"]


class StageStatus(WireModel):
    name: StageNameLiteral = Field(..., description="Stage.")
    state: StageState = Field("Pending", description="Pending, Running, Succeeded, Failed or Skipped.")
    attempts: int = Field(0, ge=0, description="Attempts started.")
    failures: int = Field(0, ge=0, description="Attempts that failed (suspensions do not count).")
    job: str | None = Field(None, description="Job (or local process) of the latest attempt.")
    output: str | None = Field(None, description="Storage prefix of the stage's artifacts.")
    start_time: str | None = Field(None, description="Start of the latest attempt.")
    completion_time: str | None = Field(None, description="End of the stage.")
    retry_after: str | None = Field(None, description="Earliest time of the next attempt (backoff).")
    reason: str | None = Field(None, description="Why the latest attempt failed: BadInput, OOMKilled, DeadlineExceeded, ImagePullBackOff, …")
    message: str | None = Field(None, description="Details of the failure or progress.")
    exit_code: int | None = Field(None, description="Exit code of the latest failed attempt.")
    progress: str | None = Field(None, description="Progress of the running attempt, as N/M.")
    shards: str | None = Field(None, description="A sharded stage's finished shards, as done/total (3/4).")
    completed_shards: list[int] | None = Field(
        None, description="A sharded stage's finished shards, over all attempts: a retry runs only the others.")
    metrics: dict[str, float | int | str | bool] = Field(
        default_factory=dict, description="Headline metrics of the stage's result."
    )


class RoundStatus(WireModel):
    round: int = Field(..., ge=0, description="Round number (0: the base model).")
    stages: list[StageStatus] = Field(default_factory=list, description="The round's stages in order.")
    samples: int | None = Field(None, description="Reasoning paths sampled.")
    questions: int | None = Field(None, description="Questions sampled.")
    kept: int | None = Field(None, description="Paths kept by the filters.")
    mean_confidence: float | None = Field(None, description="Mean self-consistency confidence.")
    augmented: int | None = Field(None, description="New examples written by the teacher.")
    train_loss: float | None = Field(None, description="Final training loss.")
    accuracy: float | None = Field(None, description="Accuracy on the evaluation set.")
    validation_accuracy: float | None = Field(None, description="Accuracy on the validation split (selects the best round).")
    seed_accuracy: float | None = Field(None, description="Accuracy on the seed set (LLM2LLM).")
    adapter: str | None = Field(None, description="URI of the round's LoRA adapter.")
    start_time: str | None = Field(None, description="When the round started.")
    completion_time: str | None = Field(None, description="When the round finished.")


class StageProgress(WireModel):
    """The running stage's latest progress record (its pod log's last `progress` line)."""

    round: int = Field(..., ge=0, description="Round of the running stage.")
    stage: StageNameLiteral = Field(..., description="The running stage.")
    attempt: int = Field(..., ge=1, description="Its attempt.")
    unit: str = Field(..., description="What is counted: paths, steps, examples, filters, …")
    done: int = Field(..., ge=0, description="Units done.")
    total: int = Field(..., ge=0, description="Units in all.")
    percent: int = Field(..., ge=0, le=100, description="done / total, in percent.")
    estimated_remaining_seconds: int | None = Field(
        None, ge=0, description="Estimated seconds until the stage is done, from its rate so far.")
    last_update: str = Field(..., description="When the stage wrote the record (RFC 3339).")
    summary: str = Field(..., description="One line for `kubectl get`: stage, percent, done/total, time left.")


class InputDigest(WireModel):
    field: str = Field(..., description="The spec field naming the file (data.questions, …).")
    uri: str = Field(..., description="The file.")
    digest: str = Field(..., description="sha256:… of a local file, etag:…[@version] of an S3 object.")


class SelfImproveRunStatus(WireModel):
    phase: Phase = Field("Pending", description="Summary for humans.")
    round: int = Field(0, ge=0, description="Current round.")
    rounds: list[RoundStatus] = Field(default_factory=list, description="Every round's stages and metrics.")
    best_round: int | None = Field(
        None, description="Round with the highest accuracy on the selection split (`selectedOn`).")
    best_accuracy: float | None = Field(None, description="The best round's accuracy on the evaluation set.")
    best_validation_accuracy: float | None = Field(None, description="The best round's validation accuracy.")
    selected_on: Literal["validation", "evaluation"] | None = Field(
        None, description="The split the best round, patience and target are judged on: validation "
        "(data.validation), or evaluation when the run has no validation split (its reported accuracy "
        "is then optimistically biased).")
    inputs: list[InputDigest] = Field(
        default_factory=list, description="The run's input files and their digests when it started "
        "(recorded by its first stage; every later stage fails with InputChanged when one differs).")
    best_adapter: str | None = Field(None, description="Adapter of the best round (none when round 0 is best).")
    artifacts: str | None = Field(None, description="Storage prefix of this run's artifacts.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready, Progressing, Degraded, Succeeded, Failed, Suspended.")
    observed_generation: int | None = Field(None, description="Last spec generation acted on.")
    applied_spec: str | None = Field(
        None, description="Digest of the immutable spec fields the run started with."
    )
    start_time: str | None = Field(None, description="When the run started.")
    completion_time: str | None = Field(None, description="When the run finished.")
    message: str | None = Field(None, description="Latest notable event.")
    progress: StageProgress | None = Field(None, description="Progress of the running stage, while one runs.")


# =========================================================================== the object
class ObjectMeta(WireModel):
    """The parts of metav1.ObjectMeta selfimprove reads; everything else passes through."""

    model_config = WireModel.model_config | {"extra": "allow"}

    name: str = Field(..., description="Run name (DNS label, at most 40 characters).")
    namespace: str | None = Field(None, description="Namespace.")
    uid: str | None = Field(None, description="Set by the API server.")
    generation: int | None = Field(None, description="Set by the API server.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")

    @model_validator(mode="after")
    def _dns_label(self) -> "ObjectMeta":
        if len(self.name) > MAX_RUN_NAME:
            raise ValueError(f"name: must be at most {MAX_RUN_NAME} characters (stage Job names derive from it)")
        if not re.match(DNS_LABEL, self.name):
            raise ValueError("name: must be a DNS label (lowercase letters, digits, '-')")
        return self


class SelfImproveRun(WireModel):
    api_version: Literal["selfimprove.dev/v1alpha1"] = Field(API_VERSION, description="selfimprove.dev/v1alpha1")
    kind: Literal["SelfImproveRun"] = Field(KIND, description="SelfImproveRun")
    metadata: ObjectMeta = Field(..., description="Standard object metadata.")
    spec: SelfImproveRunSpec = Field(..., description="What to run.")
    status: SelfImproveRunStatus | None = Field(None, description="What happened (written by the controller).")
