"""Parameter models shared by the API (`SelfImproveRun.spec`) and the stage tasks.

They live on the workers' side of the contract because a stage validates exactly what it is
given; the control plane imports them to build its CRD schema and the tasks it hands out, so the
two can never drift apart. Field names are camelCase on the wire (Kubernetes convention) and
snake_case in Python.

A field left as `None` here is filled from the strategy preset (see
`selfimprove_operator.presets`); the description says so, and the generated CRD carries no default
for it, because an API-server default would hide the preset.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .filter_registry import FILTERS, filter_kinds, register_filter
from .model_refs import ModelRef
from .rules import AnyItemHas, AnyOf, Not, Rule


class WireModel(BaseModel):
    """Base of every contract model: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def wire(self) -> dict:
        """The JSON-ready form used in manifests, task files and status."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]
# Bounded so the CRD's CEL rules (immutability compares these) stay within the cost budget.
Uri = Annotated[str, Field(min_length=1, max_length=2048)]


# --------------------------------------------------------------------------- the task itself
class AnswerSpec(WireModel):
    type: Literal["number", "choice", "regex"] = Field(
        "number",
        description="How the final answer is extracted from a reasoning path, read up to any "
        "invented next question: `number` (a `Final Answer:` line, else the last `\\boxed{}`, "
        "else `The answer is 42`, else GSM8K `#### 42`, else an `Answer:` label, else the last "
        "number; units, currency, %, thousands separators and fractions normalized), `choice` "
        "(a letter A-E) or `regex` (the first capture group of `pattern`).",
    )
    pattern: str | None = Field(
        None, description="Regular expression for `type: regex`; its first group is the answer."
    )
    choices: str = Field(
        "ABCDE", min_length=2, max_length=26, description="Letters allowed for `type: choice`."
    )

    @model_validator(mode="after")
    def _pattern_matches_type(self) -> "AnswerSpec":
        if self.type == "regex":
            if not self.pattern:
                raise ValueError("pattern: is required when type is regex")
            try:
                compiled = re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern: not a valid regular expression: {exc}") from None
            if compiled.groups < 1:
                raise ValueError("pattern: needs one capture group holding the answer")
        return self


class FewShotExample(WireModel):
    question: str = Field(..., min_length=1, description="The exemplar's question.")
    rationale: str = Field(
        "", description="Worked reasoning shown in chain-of-thought prompts (empty for direct)."
    )
    answer: str = Field(..., min_length=1, description="The exemplar's final answer.")


class TaskSpec(WireModel):
    """How questions become prompts and completions become answers."""

    answer: AnswerSpec = Field(
        default_factory=AnswerSpec, description="Answer type and extraction rule."
    )
    few_shot: list[FewShotExample] = Field(
        default_factory=list,
        max_length=64,
        description="Chain-of-thought exemplars placed before each question in few-shot prompts.",
    )
    few_shot_file: Uri | None = Field(
        None,
        description="JSONL of exemplars (`question`, `rationale`, `answer`) used in addition to "
        "`fewShot`; a URI (s3://, file://) or a path.",
    )
    instruction: str | None = Field(
        None, description="Optional instruction placed before the exemplars and the question."
    )
    cot_trigger: str = Field(
        "Let's think step by step.", max_length=500,
        description="Sentence after `Answer:` in zero-shot chain-of-thought prompts (empty: none).",
    )
    answer_template: str = Field(
        "The answer is {answer}.", min_length=8, max_length=500,
        description="How a completion states its final answer, after the reasoning; must contain "
        "{answer}. GSM8K's own style is `#### {answer}`.",
    )
    chat_template: bool = Field(
        True,
        description="Wrap prompts in the tokenizer's chat template when the tokenizer has one.",
    )
    system: str | None = Field(
        None, max_length=4000,
        description="System message placed before the user turn under the chat template (ignored "
        "without one). Unset: the template's own default, if it has one (Qwen2.5 writes its "
        "own system turn).",
    )

    @field_validator("answer_template")
    @classmethod
    def _has_slot(cls, v: str) -> str:
        if "{answer}" not in v:
            raise ValueError("must contain {answer}")
        return v


# --------------------------------------------------------------------------- sampling
class SamplingSpec(WireModel):
    paths: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Reasoning paths sampled per question (N). Preset: lmsi 32, iwsi 15.",
    )
    temperature: float | None = Field(
        None,
        ge=0.0,
        le=5.0,
        description="Sampling temperature (T > 0 for diverse paths). Preset: lmsi 0.7, iwsi 1.1.",
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling probability mass.")
    max_tokens: int = Field(512, ge=1, le=32768, description="Generated tokens per path, at most.")
    seed: int = Field(0, ge=0, description="Sampling seed; a round's seed is this plus the round.")


# --------------------------------------------------------------------------- filters
class ConsistencyFilter(WireModel):
    min_confidence: Probability = Field(
        0.9,
        description="Keep a question when count(majority answer) / N is at least this; every "
        "path agreeing with the majority is kept (LMSI).",
    )


class EntropyFilter(WireModel):
    max: Probability = Field(
        0.3,
        description="Keep a question when its answer entropy, normalized by ln(N), is at most "
        "this (MoT, IWSI's baseline).",
    )


class DistributionShiftFilter(WireModel):
    keep: Fraction = Field(
        0.8,
        description="Fraction k of candidates kept by IWSI's distribution-shift weight: exactly "
        "floor(k*n), lowest DS first, ties broken deterministically (the stage fails when that is 0).",
    )


class JudgeFilter(WireModel):
    min_score: float = Field(
        4.5, ge=0.0, le=5.0, description="Keep samples an LLM judge rates at least this (0-5)."
    )
    model: ModelRef | None = Field(
        None, description="Judge model (a URI, a path or hf://ORG/NAME[@REVISION]); defaults to "
        "`model.teacher`, then to `model.base`."
    )
    max_tokens: int = Field(64, ge=1, le=4096, description="Tokens the judge may write.")


class SelfFilter(WireModel):
    keep: Fraction = Field(
        0.5, description="Fraction of samples kept, ranked by the model's own 0-10 rating."
    )
    max_tokens: int = Field(32, ge=1, le=4096, description="Tokens the model may write.")


class DiversityFilter(WireModel):
    keep: Fraction = Field(
        0.5,
        description="Fraction kept (LTD): mean-pooled, L2-normalized last hidden states of the base "
        "model, clustered by mini-batch K-means, then k-center greedy inside each cluster with the "
        "budget shared by cluster size.",
    )
    clusters: int | None = Field(
        None, ge=1, le=1_000_000,
        description="K-means clusters; unset: ceil(sqrt(n/2)) for n candidates; 1: plain k-center greedy "
        "over all candidates (quadratic in n).",
    )
    seed: int = Field(0, ge=0, description="Seed of K-means (sampling and k-means++ init); the round is added.")


class RewardModelFilter(WireModel):
    model: ModelRef = Field(
        ..., description="Sequence-classification reward model (one output, e.g. a `...ForSequenceClassification` "
        "with num_labels 1): an s3:// or file:// URI of a Hugging Face model folder, a path, or hf://ORG/NAME[@REVISION].",
    )
    keep: Fraction | None = Field(None, description="Keep this fraction of candidates, highest reward first (set this or minScore).")
    min_score: float | None = Field(None, description="Keep candidates whose reward is at least this (set this or keep).")
    batch_size: int = Field(16, ge=1, le=4096, description="Candidates scored per forward pass (padded, masked).")
    max_length: int = Field(2048, ge=16, le=131072, description="Tokens of question + path scored, at most (longer: truncated, counted).")

    @model_validator(mode="after")
    def _one_rule(self) -> "RewardModelFilter":
        if (self.keep is None) == (self.min_score is None):
            raise ValueError("keep: set exactly one of keep, minScore")
        return self


class CorrectFilter(WireModel):
    max_per_question: int | None = Field(
        None, ge=1, le=1024,
        description="Correct paths kept per question, at most (ReST-EM keeps 10); unset: all. Earlier paths first.",
    )
    dedup: Literal["none", "equations"] = Field(
        "equations",
        description="`equations` (RFT): keep one path per distinct equation list, the `<<a*b=c>>` calculator "
        "annotations when a path has any, else its plain-text `expression = number` equations; `none`: keep duplicates.",
    )
    rationalize: bool = Field(
        False,
        description="STaR rationalization: a question with no correct path is re-prompted with its gold answer as a "
        "hint; a rationale reaching that answer is kept, trained on the original prompt (the hint is never kept).",
    )
    rationalize_paths: int = Field(1, ge=1, le=64, description="Rationales sampled per question without a correct path.")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="Rationalization sampling temperature (0: greedy).")
    max_tokens: int = Field(512, ge=1, le=32768, description="Tokens a rationale may take.")

    @model_validator(mode="after")
    def _sampled(self) -> "CorrectFilter":
        if self.rationalize_paths > 1 and self.temperature == 0:
            raise ValueError("temperature: must be > 0 when rationalizePaths > 1 (greedy rationales are identical)")
        return self


# The built-in filters (filter_registry.py explains how to add one). Order: the order of the
# manifest schema's properties and of error messages.
register_filter("consistency", ConsistencyFilter, "selfimprove_workers.stages.filter:consistency",
                "Self-consistency filter (LMSI).")
register_filter("entropy", EntropyFilter, "selfimprove_workers.stages.filter:entropy",
                "Answer-entropy filter (MoT).")
register_filter("distributionShift", DistributionShiftFilter, "selfimprove_workers.stages.filter:distribution_shift",
                "Distribution-shift filter (IWSI); needs `data.validation`.",
                requires=("data.validation",), uses_model=True)
register_filter("judge", JudgeFilter, "selfimprove_workers.stages.filter:judge",
                "LLM-judge filter (AlpaGasus).", uses_model=True)
register_filter("self", SelfFilter, "selfimprove_workers.stages.filter:self_rating",
                "Self-evaluation filter (the model rates itself).", uses_model=True)
register_filter("diversity", DiversityFilter, "selfimprove_workers.stages.filter:diversity",
                "Coreset filter (LTD): K-means, then k-center greedy per cluster.", uses_model=True)
register_filter("rewardModel", RewardModelFilter, "selfimprove_workers.stages.filter_extra:reward_model",
                "Reward-model filter (IWSI's RM baseline): a sequence-classification model scores question + path.",
                uses_model=True)
register_filter("correct", CorrectFilter, "selfimprove_workers.stages.filter_extra:correct",
                "Label-aware filter (STaR / RFT / ReST-EM): paths whose answer matches the gold answer in "
                "`data.questions`.", requires=("data.questions",), uses_model=True, labels=True)


def _known_filters() -> str:
    return ", ".join(filter_kinds())


class FilterSpec(WireModel):
    """Exactly one of the fields is set: `- consistency: {minConfidence: 0.9}`."""

    # The kinds are the filter registry's, not fields declared here: a registered filter is
    # accepted, documented in the CRD and dispatched without editing this model.
    model_config = WireModel.model_config | {"extra": "allow"}

    @model_validator(mode="wrap")
    @classmethod
    def _exactly_one(cls, data: Any, handler: Any) -> "FilterSpec":
        from pydantic_core import InitErrorDetails

        if isinstance(data, FilterSpec):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"a filter is a mapping with one of {_known_filters()}")
        given = {k: v for k, v in data.items() if v is not None}
        unknown = [k for k in given if k not in FILTERS]
        if unknown:
            raise ValueError(f"unknown filter {unknown[0]!r}; set exactly one of {_known_filters()}")
        if len(given) != 1:
            raise ValueError(f"set exactly one of {_known_filters()}")
        [(kind, raw)] = given.items()
        try:
            params = FILTERS[kind].params.model_validate(raw)
        except ValidationError as exc:
            raise ValidationError.from_exception_data(cls.__name__, [
                InitErrorDetails(type=e["type"], loc=(kind, *e["loc"]), input=e["input"], ctx=e.get("ctx", {}))
                for e in exc.errors()]) from None
        return handler({kind: params})

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        properties = {}
        for kind, entry in FILTERS.items():
            sub = entry.params.model_json_schema(by_alias=True, mode="validation")
            if "$defs" in sub:
                raise ValueError(f"filter {kind!r}: parameter models must be flat (no nested models)")
            sub.pop("title", None)
            properties[kind] = {"anyOf": [sub, {"type": "null"}], "default": None, "description": entry.description}
        return {"type": "object", "description": cls.__doc__, "properties": properties}

    def kinds(self) -> list[str]:
        return [k for k, v in (self.__pydantic_extra__ or {}).items() if v is not None]

    @property
    def kind(self) -> str:
        return self.kinds()[0]

    @property
    def params(self) -> WireModel:
        return (self.__pydantic_extra__ or {})[self.kind]

    def get(self, kind: str) -> WireModel | None:
        """The parameters when this filter is of `kind`, else None."""
        return (self.__pydantic_extra__ or {}).get(kind)

    def __getattr__(self, item: str) -> Any:
        # `f.consistency`, `f.distribution_shift`, `f.self_`: the parameters of a registered
        # kind (None when this filter is of another kind), as if each kind were a field.
        kind = "self" if item == "self_" else to_camel(item)
        if kind in FILTERS:
            return (self.__pydantic_extra__ or {}).get(kind)
        return super().__getattr__(item)  # type: ignore[misc]


# --------------------------------------------------------------------------- training
PromptFormat = Literal["fewShotCot", "fewShotDirect", "zeroShotCot", "zeroShotDirect"]
LMSI_FORMATS: tuple[PromptFormat, ...] = ("fewShotCot", "fewShotDirect", "zeroShotCot", "zeroShotDirect")


class LoraSpec(WireModel):
    r: int | None = Field(None, ge=1, le=1024, description="LoRA rank. Preset: lmsi 16, iwsi 64, llm2llm 16.")
    alpha: int | None = Field(None, ge=1, le=4096, description="LoRA alpha. Preset: lmsi 32, iwsi 16, llm2llm 32.")
    dropout: Probability = Field(0.05, description="LoRA dropout.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Module names adapted. Preset: lmsi/llm2llm q,k,v,o projections; "
        "iwsi q_proj, v_proj, gate_proj, up_proj, down_proj.",
    )


class TrainingSpec(WireModel):
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapter shape.")
    epochs: int | None = Field(None, ge=1, le=100, description="Epochs per round. Preset: lmsi 3, iwsi 4, llm2llm 3.")
    learning_rate: float | None = Field(
        None, gt=0.0, le=1.0, description="Peak learning rate. Preset: lmsi 2e-4, iwsi 3e-4, llm2llm 2e-5."
    )
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule."
    )
    warmup_ratio: Probability = Field(0.03, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    batch_size: int = Field(8, ge=1, le=4096, description="Sequences per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Steps accumulated per update.")
    max_length: int = Field(1024, ge=16, le=131072, description="Tokens per training sequence, at most.")
    formats: list[PromptFormat] = Field(
        default_factory=lambda: list(LMSI_FORMATS),
        min_length=1,
        description="Prompt formats each example is rendered in (LMSI's mixed formats): "
        "fewShotCot, fewShotDirect, zeroShotCot, zeroShotDirect.",
    )
    from_: Literal["base", "previous"] = Field(
        "base",
        alias="from",
        description="Start each round's adapter fresh from the base model (LLM2LLM found this "
        "better) or continue the previous round's adapter.",
    )
    group_by_length: bool = Field(True, description="Batch sequences of similar length together.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    seed: int = Field(42, ge=0, description="Training seed (data order, adapter init).")


# --------------------------------------------------------------------------- evaluation, augmentation
class EvaluationSpec(WireModel):
    max_tokens: int = Field(512, ge=1, le=32768, description="Tokens generated per evaluation answer.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N examples.")
    format: PromptFormat = Field("fewShotCot", description="Prompt format used for evaluation.")


class AugmentSpec(WireModel):
    per_example: int = Field(
        1, ge=1, le=64, description="New examples the teacher writes per wrong seed example (k)."
    )
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="Teacher sampling temperature.")
    max_tokens: int = Field(1024, ge=1, le=32768, description="Tokens the teacher may write per request.")
    rouge_threshold: Probability = Field(
        0.95, description="Drop a new question whose ROUGE-L against an existing one exceeds this."
    )
    retries: int = Field(1, ge=0, le=10, description="Extra requests for examples lost to filtering.")
    instructions: str | None = Field(
        None, min_length=1, max_length=20000,
        description="The teacher's system message, in place of LLM2LLM's GSM8K instructions (or its "
        "classification ones for a choice task): LLM2LLM writes one per dataset. The request after it "
        "is unchanged: the wrong question, its answer key and how many new ones to write, each as "
        "`Question: … Answer: … #### X`; say so in the instructions.")
    exemplar: bool = Field(
        True, description="Show the teacher one worked exchange (a made-up problem and its new problem) "
        "before the request. Its math word problem suits GSM8K-like tasks; turn it off with your own "
        "instructions for another kind of question, or for a teacher whose context cannot hold it.")
    filters: list[FilterSpec] = Field(
        default_factory=list, max_length=8,
        description="Filters the teacher's new examples pass before anything trains on them, in order, each "
        "example rated as its question and worked solution: e.g. `- judge: {minScore: 4.5}` (AlpaGasus; the "
        "judge is model.judge, model.judgeEndpoint or the teacher), rewardModel, diversity. Filters that need "
        "sampled votes (consistency, entropy), the student (self), gold answers (correct) or validation "
        "losses (distributionShift) cannot rate a new question and are refused.")

    @field_validator("filters")
    @classmethod
    def _rateable(cls, v: list[FilterSpec]) -> list[FilterSpec]:
        for i, f in enumerate(v):
            if f.kind not in AUGMENT_FILTERS:
                raise ValueError(f"[{i}]: a {f.kind} filter cannot rate the teacher's new examples (they have no "
                                 f"sampled votes, student ratings, gold answers or validation losses); use one of "
                                 f"{', '.join(AUGMENT_FILTERS)}")
        return v


# The filters that rate one (question, worked solution) on its own or among its peers: what a
# teacher's new example is (augment.filters).
AUGMENT_FILTERS: tuple[str, ...] = ("judge", "rewardModel", "diversity")


def augment_rules() -> tuple[Rule, ...]:
    """The same refusal as CEL, so `kubectl apply` says it too."""
    others = tuple(AnyItemHas("augment.filters", k) for k in filter_kinds() if k not in AUGMENT_FILTERS)
    return (Rule(require=Not(AnyOf(others)), field="augment.filters",
                 message=f"only {', '.join(AUGMENT_FILTERS)} filters can rate the teacher's new examples"),)


# --------------------------------------------------------------------------- engine
class EngineSpec(WireModel):
    kind: Literal["vllm", "transformers"] = Field(
        "vllm", description="Inference engine: vLLM, or plain transformers where vLLM is absent."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights and activations dtype (auto: bf16 on GPU, fp32 on CPU)."
    )
    max_model_len: int | None = Field(None, ge=16, description="Context length the engine reserves.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="vLLM: fraction of accelerator memory it may take."
    )
    enforce_eager: bool = Field(False, description="vLLM: skip graph capture / compilation.")
    max_lora_rank: int = Field(64, ge=1, le=1024, description="vLLM: largest LoRA rank it serves.")
    merge_adapter: bool = Field(
        False,
        description="Merge the input adapter into a local copy of the base weights before serving: "
        "no LoRA work at decode time (on CPU, vLLM decodes several times slower through LoRA), at the "
        "cost of one merge and a model-sized copy on local disk.",
    )

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, v: int) -> int:
        # vLLM only accepts these ranks for max_lora_rank.
        allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)
        if v not in allowed:
            raise ValueError(f"must be one of {', '.join(map(str, allowed))}")
        return v
