"""The `exemplars` stage (teacher→student LMSI): the student's confident answers that agree with
its teacher become the few-shot exemplars of the teacher's next prompts.

Inputs: `inputs.questions` (the unlabeled questions), `inputs.votes` (this round's teacher votes);
the model is the student (`model.base` + this round's adapter). The `exemplars.questions`
questions the teacher was most confident about are answered by the student with
`exemplars.paths` sampled paths each (`exemplars.format`); selection as in
`selfimprove_workers.exemplars`. The current exemplars (the task's `prompting`, those the teacher
sampled with this round) fill any place left.

Outputs
    exemplars.jsonl   the next exemplars (`question`, `rationale`, `answer`): the next round's
                      sample stage reads it as `task.fewShotFile`
    chosen.jsonl      one row per exemplar: rank, id, question, answer, source (student|carried),
                      studentConfidence, teacherConfidence
    candidates.jsonl  every question the student answered: its vote, the teacher's, agreed
Metrics: answered, candidates, refreshed (new exemplars), carried, meanStudentConfidence.
"""

from __future__ import annotations

from typing import Any

from ..answers import extract_answer
from ..data import load_examples
from ..engines.base import GenerationParams
from ..errors import BadInput
from ..exemplars import Candidate, fill, rationale_of, select
from ..prompts import STOP_SEQUENCES, render_prompt
from ..runtime import StageContext, StageOutcome
from ..storage import display_name, read_jsonl
from ..training.data import load_exemplars, resolve_format
from ..voting import vote

EXEMPLARS, CHOSEN, CANDIDATES = "exemplars.jsonl", "chosen.jsonl", "candidates.jsonl"


def run(ctx: StageContext) -> StageOutcome:
    task = ctx.task
    spec = task.exemplars
    assert spec is not None and task.inputs.questions and task.inputs.votes
    uri = task.inputs.questions
    questions = {q.id: q for q in load_examples(ctx.storage_for(uri), uri)}
    teacher: dict[str, dict[str, Any]] = {}
    for lineno, row in read_jsonl(ctx.storage_for(task.inputs.votes), task.inputs.votes):
        if row.get("id") not in questions:
            raise BadInput(f"{display_name(task.inputs.votes)}:{lineno}: question {row.get('id')!r} is not in {display_name(uri)}")
        if row.get("majority") is not None:
            teacher[row["id"]] = row
    asked = sorted(teacher.values(), key=lambda v: (-float(v["confidence"]), v["id"]))[: spec.questions]
    current = load_exemplars(ctx.storage_for, task.prompting)
    if not asked:
        ctx.log.warning("the teacher answered no question: the current exemplars are kept")
        return _write(ctx, [], fill([], current, spec.count), [], answered=0)

    fmt = resolve_format(spec.format, bool(current))
    adapter = str(ctx.local_dir(task.model.adapter)) if task.model.adapter else None
    seed = (task.sampling.seed if task.sampling else 0) + task.round
    from ..engines import open_model

    engine, served = open_model(task.engine, ctx.local_dir(task.model.base), adapter, gpus=task.gpus, seed=seed,
                                workdir=ctx.workdir)
    try:
        prompts = [render_prompt(task.prompting, questions[v["id"]].question, fmt, engine.tokenizer, current) for v in asked]
        params = GenerationParams(n=spec.paths, temperature=spec.temperature, max_tokens=spec.max_tokens, seed=seed,
                                  stop=STOP_SEQUENCES)
        ctx.log.info(f"the student answers {len(prompts)} questions, {spec.paths} paths each ({fmt})")
        outputs = engine.generate(prompts, params, adapter=served,
                                  progress=lambda done, total: ctx.progress(done, total, "paths"))
    finally:
        engine.close()

    answer_spec, template = task.prompting.answer, task.prompting.answer_template
    candidates: list[Candidate] = []
    rows: list[dict[str, Any]] = []
    for v, out in zip(asked, outputs, strict=True):
        texts = [c.text for c in out.completions]
        answers = [extract_answer(t, answer_spec) for t in texts]
        own = vote(answers)
        agreed = own.majority is not None and own.majority == v["majority"]
        rows.append({"id": v["id"], "question": questions[v["id"]].question, "studentMajority": own.majority,
                     "studentConfidence": own.confidence, "teacherMajority": v["majority"],
                     "teacherConfidence": v["confidence"], "agreed": agreed})
        if agreed and own.confidence >= spec.min_confidence:
            assert own.majority is not None
            text = texts[answers.index(own.majority)]
            candidates.append(Candidate(id=v["id"], question=questions[v["id"]].question, answer=own.majority,
                                        rationale=rationale_of(text, own.majority, template),
                                        student_confidence=own.confidence, teacher_confidence=float(v["confidence"])))
    chosen = select(candidates, spec.count, spec.selection)
    return _write(ctx, chosen, fill(chosen, current, spec.count), rows, answered=len(asked), candidates=candidates)


def _write(ctx: StageContext, chosen: list[Candidate], nxt, rows, *, answered: int,
           candidates: list[Candidate] | None = None) -> StageOutcome:
    if not nxt:
        raise BadInput("exemplars: no exemplar chosen and none to carry over (give task.fewShot, or lower "
                       "exemplars.minConfidence)")
    ctx.writer.write_jsonl(EXEMPLARS, [ex.wire() for ex in nxt])
    by_question = {c.question: c for c in chosen}
    chosen_rows = []
    for rank, ex in enumerate(nxt, 1):
        c = by_question.get(ex.question)
        chosen_rows.append({"rank": rank, "id": c.id if c else None, "question": ex.question, "answer": ex.answer,
                            "source": "student" if c else "carried",
                            "studentConfidence": c.student_confidence if c else None,
                            "teacherConfidence": c.teacher_confidence if c else None})
    ctx.writer.write_jsonl(CHOSEN, chosen_rows)
    ctx.writer.write_jsonl(CANDIDATES, rows)
    spec = ctx.task.exemplars
    assert spec is not None
    ctx.log.info(f"{len(chosen)} new exemplar(s) from {len(candidates or [])} candidate(s), {len(nxt) - len(chosen)} carried")
    mean = sum(r["studentConfidence"] for r in rows) / len(rows) if rows else 0.0
    return StageOutcome(
        metrics={"answered": answered, "candidates": len(candidates or []), "refreshed": len(chosen),
                 "carried": len(nxt) - len(chosen), "meanStudentConfidence": round(mean, 6)},
        outputs={"exemplars": EXEMPLARS, "chosen": CHOSEN},
        details={"selection": spec.selection, "chosen": chosen_rows},
    )
