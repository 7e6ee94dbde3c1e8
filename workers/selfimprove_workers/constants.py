"""Constants that cross the contract: both the control plane and the workers read them, so each
has exactly one definition here (stdlib only; the operator image imports this without torch).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

API_VERSION: Final = "selfimprove.dev/v1alpha1"

# ---------------------------------------------------------------------------- exit codes
# A stage process exits 0 on success, 2 when its input is wrong (permanent: no retry can fix it;
# the Job's pod failure policy fails the Job at once) and 1 on anything else (transient, retried).
EXIT_OK = 0
EXIT_TRANSIENT = 1
EXIT_BAD_INPUT = 2
EXIT_KILLED = 137  # 128 + SIGKILL: what an OOM kill or a forced stop looks like
# 128 + SIGTERM: a stage asked to stop (eviction, preemption, a drain) that saved its progress
# first. It is the code a process dying of an unhandled SIGTERM reports, so every observer already
# reads it as an interruption: transient, retried, never permanent; on Kubernetes the evicted
# pod's DisruptionTarget condition also keeps it out of the Job's backoffLimit.
EXIT_TERMINATED = 143
TERMINATED_REASON = "Terminated"

# ---------------------------------------------------------------------------- files
RESULT_FILE = "result.json"
MARKER_NAME = "_SUCCESS"  # written last: its presence means the stage's output is complete
SUMMARY_LIMIT = 4096      # bytes of a Kubernetes termination message


class OutputName:
    """File names a stage writes under its output prefix; the planner wires the next stage's
    inputs from them, so both sides use these constants."""

    SAMPLES = "samples.jsonl"
    VOTES = "votes.jsonl"
    KEPT = "kept.jsonl"
    REJECTED = "rejected.jsonl"
    ADAPTER = "adapter/"
    PREDICTIONS = "predictions.jsonl"
    SEED_PREDICTIONS = "seed_predictions.jsonl"
    VALIDATION_PREDICTIONS = "validation_predictions.jsonl"
    EXEMPLARS = "exemplars.jsonl"
    AUGMENTED = "augmented.jsonl"


# ---------------------------------------------------------------------------- metric keys
class MetricKey:
    """Headline metrics of a stage's result that the planner records on the round."""

    PATHS = "paths"
    QUESTIONS = "questions"
    MEAN_CONFIDENCE = "meanConfidence"
    KEPT = "kept"
    TRAIN_LOSS = "trainLoss"
    ACCURACY = "accuracy"
    SEED_ACCURACY = "seedAccuracy"
    VALIDATION_ACCURACY = "validationAccuracy"
    AUGMENTED = "augmented"


# ---------------------------------------------------------------------------- failure reasons
BAD_INPUT_REASON = "BadInput"
INPUT_CHANGED_REASON = "InputChanged"  # a pinned input file differs from the run's start (permanent)
# A pod that cannot start its container because of the image: waiting reasons of the kubelet.
IMAGE_ERROR_REASONS = frozenset({
    "ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull",
})
# Reasons no retry can fix: the user has to change something.
PERMANENT_REASONS = frozenset({BAD_INPUT_REASON, INPUT_CHANGED_REASON, "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                               "CreateContainerConfigError"})

# ---------------------------------------------------------------------------- served models
# The API keys of `model.teacherEndpoint` / `model.judgeEndpoint` (endpoints.py): the Job fills
# them from the Secret the spec names (k8s/jobs.py), the client reads them, the redactor masks them.
TEACHER_API_KEY_ENV = "SELFIMPROVE_TEACHER_API_KEY"
JUDGE_API_KEY_ENV = "SELFIMPROVE_JUDGE_API_KEY"
# A served model that failed after its retries (endpoint_client.py): transient, the stage is retried.
ENDPOINT_ERROR_REASON = "EndpointError"

# ---------------------------------------------------------------------------- training
# LoRA on the attention projections: the modules every Llama / Qwen / Mistral-style model names
# alike, and what LMSI and LLM2LLM adapt.
LORA_ATTENTION_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


# ---------------------------------------------------------------------------- time
def rfc3339(t: datetime) -> str:
    """`2026-01-01T00:00:00Z`: UTC, whole seconds, as Kubernetes writes timestamps."""
    return t.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def now_rfc3339() -> str:
    return rfc3339(datetime.now(UTC))
