"""The demo's LLM2LLM teacher learns the augment stage's exchange: its training rows must be the
stage's own request and a reply the stage's parser accepts (the real training run:
bench/bench_methods.py --smoke, in tests/e2e/test_bench_smoke.py)."""

from __future__ import annotations

from selfimprove_workers.chat import render_messages
from selfimprove_workers.demo.arithmetic import TaskConfig, make_problem, parse_answer
from selfimprove_workers.demo.teacher import INSTRUCTIONS, _terms, exchange_rows
from selfimprove_workers.demo.tinymodel import build_tokenizer
from selfimprove_workers.demo.warmstart import encode_row
from selfimprove_workers.spec import AugmentSpec
from selfimprove_workers.stages.augment import TeacherPrompt, parse_teacher_reply, teacher_messages


def test_each_exchange_is_the_stages_request_answered_with_a_new_sum_it_parses() -> None:
    import random

    tok = build_tokenizer()
    rng = random.Random(0)
    rows = [make_problem(rng, TaskConfig()) for _ in range(20)]
    # what the augment stage sends for the bench's manifest (augment.instructions, exemplar off)
    prompt = TeacherPrompt.of(AugmentSpec.model_validate({"instructions": INSTRUCTIONS, "exemplar": False}))
    by_prompt = {render_messages(tok, teacher_messages(r["question"], r["answer"], 1, prompt=prompt),
                                 use_template=False): r for r in rows}
    exchanges = exchange_rows(rows, 50, seed=3, tokenizer=tok)
    # other numbers than the wrong question's (a clash is a 1-in-6,561 chance per item at 4 terms)
    assert all(parse_teacher_reply(ex["completion"]).items[0].question != by_prompt[ex["prompt"]]["question"]
               for ex in exchanges)
    assert exchanges == exchange_rows(rows, 50, seed=3, tokenizer=tok)  # seeded
    for ex in exchanges:
        src = by_prompt[ex["prompt"]]
        items = parse_teacher_reply(ex["completion"]).items
        assert len(items) == 1, ex["completion"]
        new = _terms(items[0].question)
        assert new is not None and len(new) == len(_terms(src["question"]) or [])
        assert items[0].final == str(sum(new))
        # the steps are the task's own chain of thought: the student trains on them as written
        assert parse_answer(items[0].answer.replace("\n####", " ####")) == str(sum(new))
        ids, labels = encode_row(tok, ex)
        assert labels.count(-100) == len(tok(ex["prompt"]).input_ids) and ids[-1] == tok.eos_token_id
