"""The prompt/answer seam under a byte-level BPE tokenizer (tests/bpe_fixtures.py)."""

from __future__ import annotations

import pytest
from selfimprove_workers.engines.base import encode_completion, encode_prompt
from selfimprove_workers.prompts import TrainingRow, render_prompt, render_target, uses_chat_template
from selfimprove_workers.spec import LMSI_FORMATS, FewShotExample, TaskSpec
from selfimprove_workers.training.data import encode_examples

ROWS = [TrainingRow("a", "What is 12 plus 30?", "12 + 30 = 42.\nThe answer is 42.", "42"),
        TrainingRow("b", "Tom has 1234 apples and eats 1. How many are left?", "", "1233")]
SHOTS = [FewShotExample(question="What is 1 plus 1?", rationale="1 + 1 = 2.", answer="2")]


@pytest.mark.parametrize("chat", [False, True])
def test_trained_answer_tokens_are_what_generation_after_the_prompt_produces(bpe_tokenizer, chat):
    tok = bpe_tokenizer
    task = TaskSpec(few_shot=SHOTS, chat_template=chat)
    assert uses_chat_template(task, tok) is chat
    enc = encode_examples(ROWS, list(LMSI_FORMATS), task, tok, 2048, SHOTS)
    i = 0
    for row in ROWS:
        for fmt in LMSI_FORMATS:
            prompt = render_prompt(task, row.question, fmt, tok, SHOTS)
            target = render_target(fmt, row.cot, row.answer, chat)
            seq = enc.tokens[enc.offsets[i]: enc.offsets[i] + enc.lengths[i]].tolist()
            plen = int(enc.prompt_lengths[i])
            assert seq[:plen] == encode_prompt(tok, prompt)
            assert seq[:plen].count(tok.bos_token_id) == 1
            assert seq[plen:] == encode_completion(tok, target) + [tok.eos_token_id]
            assert tok.decode(seq[plen:-1]) == target  # no seam byte lost or doubled
            i += 1


def test_the_naive_joint_tokenization_breaks_at_a_merging_seam(bpe_tokenizer):
    tok = bpe_tokenizer
    prompt, target = "The answer is 12", "34."  # digits re-group in threes across the seam
    p = encode_prompt(tok, prompt)
    naive = tok(prompt + target)["input_ids"][len(p):]
    assert naive != encode_completion(tok, target)
    assert tok.decode(naive) != target
