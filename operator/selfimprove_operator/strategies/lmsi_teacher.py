"""Teacher→student LMSI (seed 000's use case; methods.md §1 with a separate labeler): a large
teacher (`model.teacher`) samples N paths per unlabeled question and votes, the filters keep its
confident majorities, and a small student (`model.base`) is fine-tuned on them and evaluated.
Each round then ends with the `exemplars` stage: the student answers the questions the teacher
was most confident about, and its confident answers that agree with the teacher's become the
few-shot exemplars of the teacher's prompts in the next round (`spec.exemplars`: how many, how
chosen; `exemplars.jsonl` / `chosen.jsonl` in the round's artifacts).

The teacher always samples with its own weights (no adapter: only the student trains); round 1
uses the run's `task.fewShot` / `task.fewShotFile`, round r > 1 the exemplars of round r - 1.
"""

from selfimprove_workers.constants import OutputName
from selfimprove_workers.contract import StageInputs, StageTask
from selfimprove_workers.rules import Has, Not, Rule

from ..wiring import WiringContext
from . import Strategy, register_strategy
from .lmsi import PRESET as LMSI_PRESET

PRESET = {**LMSI_PRESET}


def latest_exemplars(ctx: WiringContext) -> str | None:
    """The exemplars file of the latest earlier round whose exemplars stage succeeded."""
    done = ctx.succeeded_before("exemplars")
    return ctx.out(done[-1], "exemplars", OutputName.EXEMPLARS) if done else None


def sample(ctx: WiringContext) -> tuple[StageInputs, str | None]:
    return StageInputs(questions=ctx.spec.data.questions), None   # the teacher's own weights


def teacher_prompts(ctx: WiringContext, task: StageTask) -> StageTask:
    """The round's exemplars replace the run's (kept when no refresh exists yet)."""
    uri = latest_exemplars(ctx)
    if uri is None:
        return task
    return task.model_copy(update={"prompting": task.prompting.model_copy(update={"few_shot": [], "few_shot_file": uri})})


def teacher_samples(ctx: WiringContext, task: StageTask) -> StageTask:
    assert ctx.spec.model.teacher  # a rule of the strategy
    task = teacher_prompts(ctx, task)
    return task.model_copy(update={"model": task.model.model_copy(update={"base": ctx.spec.model.teacher, "adapter": None})})


LMSI_TEACHER = register_strategy(Strategy(
    name="lmsi-teacher",
    description="teacher→student self-consistency with exemplar refresh",
    preset=PRESET,
    round_stages=("sample", "filter", "train", "evaluate", "exemplars"),
    rules=(
        Rule(require=Has("data.questions"), field="data.questions", message="is required for strategy lmsi-teacher"),
        Rule(require=Has("model.teacher"), field="model.teacher", message="is required for strategy lmsi-teacher"),
        # Its teacher samples N paths per question in the sample stage's engine, with the
        # prompt-level batching and prefix caching only local weights give.
        Rule(require=Not(Has("model.teacherEndpoint")), field="model.teacherEndpoint",
             message="is not supported by strategy lmsi-teacher (its teacher samples in the sample stage: give model.teacher)"),
    ),
    wiring={"sample": sample},
    tasks={"sample": teacher_samples, "exemplars": teacher_prompts},
))
