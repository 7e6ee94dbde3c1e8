"""Tiny random-weight Llama models with a character-level tokenizer, built offline.

Used twice: the CPU demo warm-starts one of these on arithmetic, and tests use one as a fixture
wherever a real model directory (loadable by transformers, peft and vLLM) is needed.

Why character level: one vocabulary then encodes digits, arithmetic and arbitrary English-ish
test text with no training step and no download, and it stays around 100 tokens, which keeps
the embedding and LM head (the bulk of a tiny model's parameters) small.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "SPECIAL_TOKENS",
    "default_vocab",
    "build_tokenizer",
    "build_tiny_llama",
]

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


def default_vocab() -> list[str]:
    """Printable ASCII plus newline and tab: every character of the task and of English text."""
    return list(string.printable[:95]) + ["\n", "\t"]


def build_tokenizer(vocab: Iterable[str] | None = None):
    """A character-level `PreTrainedTokenizerFast`.

    Every character is one token (anything outside `vocab` becomes `<unk>`); ids 0-3 are
    `<pad> <s> </s> <unk>`. Encoding prepends `<s>` (add_special_tokens=True), the way vLLM
    encodes a prompt, so training and serving see the same ids. The `Fuse` decoder joins
    characters without the spaces a WordLevel decoder would insert.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(default_vocab() if vocab is None else vocab))
    for c in chars:
        if c in SPECIAL_TOKENS:
            raise ValueError(f"vocabulary entry {c!r} collides with a special token")
    ids = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token=UNK))
    # [\s\S] rather than ".": the latter skips newlines (Oniguruma has no (?s) flag).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, ids[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )


def build_tiny_llama(
    out_dir: str | Path,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab: Iterable[str] | None = None,
    tokenizer=None,
    seed: int = 0,
    max_positions: int = 256,
    tie_embeddings: bool = True,
    rope_theta: float = 10000.0,
    extra_eos_ids: Iterable[int] = (),
) -> Path:
    """Save a random-weight `LlamaForCausalLM` and its tokenizer to `out_dir`; return the path.

    head_dim = hidden / heads must be 32 or 64 or more (a multiple of 16): vLLM's CPU attention
    only ships kernels for such sizes. The config carries everything vLLM reads:
    `max_position_embeddings`, bos/eos/pad ids, and a generation_config with `eos_token_id`,
    without which generation would never stop at `</s>`. `extra_eos_ids` adds end tokens to
    the config and generation_config the way Llama-3.1 lists `<|end_of_text|>` and `<|eot_id|>`.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden % heads:
        raise ValueError("hidden must be a multiple of heads")
    head_dim = hidden // heads
    if head_dim % 16 or head_dim < 32:
        raise ValueError(f"head_dim {head_dim}: vLLM's CPU attention needs 32, 64, ... (multiple of 16)")
    tok = tokenizer if tokenizer is not None else build_tokenizer(vocab)
    eos: int | list[int] = tok.eos_token_id
    if extra := [i for i in extra_eos_ids if i != tok.eos_token_id]:
        eos = [tok.eos_token_id, *extra]
    config = LlamaConfig(  # type: ignore[call-arg]  # transformers' stubs list only some kwargs
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    # Weights depend on the seed only, not on whatever ran in this process before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "tiny_model.json").write_text(
        json.dumps(dict(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads or heads,
                        intermediate=intermediate or 4 * hidden, seed=seed,
                        max_positions=max_positions, tie_embeddings=tie_embeddings, rope_theta=rope_theta,
                        vocab_size=len(tok)), indent=1) + "\n"
    )
    return out
