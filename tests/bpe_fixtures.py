"""A byte-level BPE tokenizer of the Llama-3 family, trained at test time on GSM8K text.

Llama-3's convention: ByteLevel pre-tokenizer and decoder behind Llama-3's split regex (digits
in runs of at most three, a letter run takes one leading non-letter), BOS
`<|begin_of_text|>` prepended, EOS = the end-of-turn `<|eot_id|>`, no pad token of its own (the
engines pad with EOS, as for real Llama-3 checkpoints), and Llama-3's chat template with a
system turn and `add_generation_prompt`.

`bpe_model_dir` puts it on a tiny random Llama configured like Llama-3.1: grouped-query
attention (4 query heads, 2 KV heads), RoPE theta 500000, untied input/output embeddings, no
pad id, `eos_token_id` listing `<|eot_id|>` and `<|end_of_text|>`. Its final norm is scaled
like `train_fixtures.train_model_dir`'s so that LoRA can make its logits confident.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

__all__ = ["bpe_tokenizer", "bpe_model_dir"]

GSM8K = Path("/work/shared/data/gsm8k/train.jsonl")
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BOS, EOT, EOTEXT = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
SPECIAL = [BOS, EOT, EOTEXT, "<|start_header_id|>", "<|end_header_id|>"]
# Llama-3.2's template in miniature: the system header carries a date, from `strftime_now`
# unless `date_string` is passed (prompts.CHAT_KWARGS pins it).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if date_string is not defined %}{% if strftime_now is defined %}{% set date_string = strftime_now('%d %b %Y') %}"
    "{% else %}{% set date_string = '26 Jul 2024' %}{% endif %}{% endif %}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nToday Date: ' + date_string + '\n\n' + system + '<|eot_id|>' }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SAMPLE = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May?\n"
          "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"] * 50


def _texts() -> list[str]:
    if GSM8K.is_file():
        rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:3000] if line.strip()]
        return [f"Question: {r['question']}\nAnswer: {r['answer']}\nThe answer is." for r in rows]
    return SAMPLE


def build_bpe_tokenizer(vocab_size: int = 3000) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT,
                                   clean_up_tokenization_spaces=False,
                                   model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def bpe_tokenizer() -> Any:
    return build_bpe_tokenizer()


@pytest.fixture(scope="session")
def bpe_model_dir(bpe_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from selfimprove_workers.demo.tinymodel import build_tiny_llama
    from train_fixtures import LOGIT_SCALE
    from transformers import AutoModelForCausalLM

    path = build_tiny_llama(tmp_path_factory.mktemp("bpe-llama"), tokenizer=bpe_tokenizer, hidden=128, heads=4,
                            kv_heads=2, rope_theta=500000.0, tie_embeddings=False, max_positions=2048,
                            extra_eos_ids=[bpe_tokenizer.convert_tokens_to_ids(EOTEXT)])
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(LOGIT_SCALE)
    model.save_pretrained(str(path), safe_serialization=True)
    return path
