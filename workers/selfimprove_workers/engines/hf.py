"""transformers pieces both engines share: loading, teacher-forced scoring, embeddings.

The transformers engine uses these for everything it does besides generation. The vLLM engine
uses them for `embed` — vLLM serves a generative model's tokens and logprobs, not its hidden
states (an embedding needs a second engine instance started in pooling mode, which costs as much
memory as the first) — and for `completion_losses` when LoRA is enabled (vLLM's prompt logprobs
crash with LoRA enabled, vllm-project/vllm#29955).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import scoring_ids

log = logging.getLogger("selfimprove.engine")

# Tokens per forward pass when scoring or embedding: big enough to keep a GPU busy, small enough
# that a 150k-vocabulary logit tensor (tokens × vocab × 4 bytes) stays a few GB.
SCORE_TOKENS_PER_BATCH = 8192


def resolve_dtype(name: str, device: str) -> str:
    """`auto` is bf16 on an accelerator and fp32 on CPU (bf16 matmuls are slow there)."""
    if name != "auto":
        return name
    return "bfloat16" if device.startswith("cuda") else "float32"


def pick_device(gpus: int) -> str:
    import torch

    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        # Padding positions are masked out everywhere; any id will do, EOS is always there.
        tok.pad_token = tok.eos_token
    return tok


def eos_token_ids(model_dir: Path, tokenizer: Any) -> list[int]:
    """Every token that ends a generation: the tokenizer's EOS and each `eos_token_id` of the
    model's generation_config.json (an int or a list).

    Instruct checkpoints often list several: Llama-3.1 ends a turn with `<|eot_id|>` and a text
    with `<|end_of_text|>`, Qwen2.5 with `<|im_end|>` and `<|endoftext|>`, and some releases
    shipped a tokenizer whose own EOS is not the one their chat turns end with. vLLM stops on the
    union (SamplingParams.update_from_generation_config); the transformers engine must too, or
    the two engines disagree on where an answer ends.
    """
    import json

    ids: list[int] = []
    if isinstance(tokenizer.eos_token_id, int):
        ids.append(tokenizer.eos_token_id)
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        extra = json.loads(path.read_text()).get("eos_token_id")
        for i in [extra] if isinstance(extra, int) else (extra or []):
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def load_causal_lm(model_dir: Path, dtype: str, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    return model.to(device).eval()  # type: ignore[arg-type]


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Write base + LoRA adapter, merged into plain weights (the base's dtype), to `out_dir`.

    Written beside and renamed into place, so a crash never leaves a half model to be served.
    """
    import shutil
    import time

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t0 = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto")
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    work = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    model.save_pretrained(str(work), safe_serialization=True)
    load_tokenizer(base_dir).save_pretrained(str(work))
    shutil.rmtree(out_dir, ignore_errors=True)
    work.rename(out_dir)
    log.info(f"merged adapter {adapter_dir} into {out_dir} in {time.monotonic() - t0:.1f}s")
    return out_dir


def context_length(model: Any, limit: int | None) -> int:
    cfg_len = getattr(model.config, "max_position_embeddings", None) or 2048
    return min(limit, cfg_len) if limit else cfg_len


def _batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped longest-first into batches of at most `budget` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * lengths[cur[0]] > budget:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device: str) -> tuple[Any, Any]:
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids.to(device), mask.to(device)


def completion_losses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    add_eos: bool,
    max_model_len: int,
) -> list[float]:
    """Mean NLL per completion token, teacher-forced, in batched forward passes (fp32 softmax)."""
    import torch

    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    encoded = [
        scoring_ids(tokenizer, p, c, add_eos, max_model_len, f"completion {i}")
        for i, (p, c) in enumerate(zip(prompts, completions))
    ]
    device = next(model.parameters()).device
    losses = [0.0] * len(encoded)
    with torch.inference_mode():
        for batch in _batches([len(e[0]) for e in encoded], SCORE_TOKENS_PER_BATCH):
            ids, mask = _pad_right([encoded[i][0] for i in batch], tokenizer.pad_token_id, str(device))
            logits = model(input_ids=ids, attention_mask=mask).logits
            # Position t predicts token t+1.
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            token_lp = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            for r, i in enumerate(batch):
                seq, plen = encoded[i]
                # Completion tokens sit at positions plen..len-1, predicted from plen-1..len-2.
                lp = token_lp[r, plen - 1 : len(seq) - 1]
                losses[i] = float(-lp.double().mean())
    return losses


def embed(model: Any, tokenizer: Any, texts: Sequence[str], *, max_model_len: int) -> list[list[float]]:
    """Mean-pooled (over the attention mask), L2-normalized last hidden states.

    The decoder alone runs (`get_decoder()`): the LM head's logits would be computed and thrown
    away. Texts longer than the context keep their beginning.
    """
    import torch

    from .base import encode_prompt

    encoded = [encode_prompt(tokenizer, t)[:max_model_len] for t in texts]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    device = next(model.parameters()).device
    out: list[list[float]] = [[] for _ in texts]
    with torch.inference_mode():
        for batch in _batches([len(e) for e in encoded], SCORE_TOKENS_PER_BATCH):
            ids, mask = _pad_right([encoded[i] for i in batch], tokenizer.pad_token_id, str(device))
            hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            for r, i in enumerate(batch):
                out[i] = pooled[r].cpu().tolist()
    return out
