"""The transformers engine: plain `model.generate` for machines without vLLM.

Slower than vLLM (no paged attention, no continuous batching) but the same interface and the
same token ids, so every stage runs anywhere torch does. Generation is batched: prompts are
sorted by length and cut into micro-batches of at most `MAX_BATCH_SEQUENCES` sequences
(prompts × n), left-padded so every row's next token sits in the last column.

Sampling is seeded with `torch.manual_seed` inside a forked RNG state: the same prompts, params
and seed give the same completions, without disturbing the caller's random state. (Streams are
per batch, not per prompt as in vLLM: transformers draws one tensor of random numbers per step
for the whole batch, so the two engines' samples differ even with equal seeds. For the same
reason `GenerationParams.seed_keys` cannot make a sharded `sample` stage equal an unsharded one
here; with vLLM it does.)
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ..spec import EngineSpec
from . import hf
from .base import (
    Completion,
    GenerationOutput,
    GenerationParams,
    ProgressFn,
    completion_budget,
    cut_at_stop,
    encode_prompt,
)

log = logging.getLogger("selfimprove.engine")

# Sequences per generate call. Bounded so the KV cache of a batch (sequences × length × layers
# × hidden) stays within memory for 7B-class models on one GPU and for tiny ones on CPU.
MAX_BATCH_SEQUENCES = 256
PROGRESS_EVERY_S = 10.0


class TransformersEngine:
    kind = "transformers"

    def __init__(self, spec: EngineSpec, model_dir: Path, *, gpus: int, seed: int, enable_lora: bool):
        self.device = hf.pick_device(gpus)
        self.dtype = hf.resolve_dtype(spec.dtype, self.device)
        self.seed = seed
        self.tokenizer = hf.load_tokenizer(model_dir)
        self.eos_ids = hf.eos_token_ids(model_dir, self.tokenizer)
        self.model = hf.load_causal_lm(model_dir, self.dtype, self.device)
        self.max_model_len = hf.context_length(self.model, spec.max_model_len)
        self._peft: Any = None                   # the PeftModel once an adapter is loaded
        self._adapters: dict[str, str] = {}      # adapter dir → adapter name
        log.info(f"transformers engine: {model_dir} on {self.device} ({self.dtype}), "
                 f"context {self.max_model_len}")

    # ------------------------------------------------------------------ adapters
    def _activate(self, adapter: str | None) -> contextlib.AbstractContextManager:
        """A context in which `self._runner()` is the base model or base + `adapter`."""
        if adapter is None:
            return self._peft.disable_adapter() if self._peft is not None else contextlib.nullcontext()
        key = str(Path(adapter).resolve())
        if key not in self._adapters:
            name = f"a{len(self._adapters)}"
            if self._peft is None:
                from peft import PeftModel

                self._peft = PeftModel.from_pretrained(self.model, key, adapter_name=name).eval()
            else:
                self._peft.load_adapter(key, adapter_name=name)
            self._adapters[key] = name
        self._peft.set_adapter(self._adapters[key])
        return contextlib.nullcontext()

    def _runner(self) -> Any:
        return self._peft if self._peft is not None else self.model

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[str],
        params: GenerationParams,
        adapter: str | None = None,
        progress: ProgressFn | None = None,
    ) -> list[GenerationOutput]:
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        budgets = [completion_budget(len(e), params.max_tokens, self.max_model_len, f"prompt {i}")
                   for i, e in enumerate(encoded)]
        outputs = [GenerationOutput(prompt=p, prompt_tokens=len(e)) for p, e in zip(prompts, encoded)]
        per_batch = max(1, MAX_BATCH_SEQUENCES // params.n)
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        total = len(prompts) * params.n
        done, last_report = 0, time.monotonic()
        devices = [torch.cuda.current_device()] if self.device.startswith("cuda") else []
        with self._activate(adapter), torch.random.fork_rng(devices=devices):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(order), per_batch):
                batch = order[start : start + per_batch]
                rows = self._generate_batch([encoded[i] for i in batch], params,
                                            max(budgets[i] for i in batch))
                for j, i in enumerate(batch):
                    for c in rows[j * params.n : (j + 1) * params.n]:
                        if c.tokens > budgets[i]:  # this prompt's context is shorter than the batch's
                            c = self._truncate(c, budgets[i], params.stop)
                        outputs[i].completions.append(c)
                done += len(batch) * params.n
                if progress and (done == total or time.monotonic() - last_report > PROGRESS_EVERY_S):
                    progress(done, total)
                    last_report = time.monotonic()
        return outputs

    def _generate_batch(self, encoded: list[list[int]], params: GenerationParams, max_new: int) -> list[Completion]:
        tok = self.tokenizer
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for r, e in enumerate(encoded):  # left padding: every row continues in the last column
            ids[r, width - len(e):] = torch.tensor(e, dtype=torch.long)
            mask[r, width - len(e):] = 1
        sample = params.temperature > 0
        eos_ids = list(dict.fromkeys([*self.eos_ids, *params.stop_token_ids]))
        recorder = _FinishRecorder(tok, width, params.stop, eos_ids)
        # A fresh GenerationConfig: the model's own may carry defaults (top_k=50, max_length)
        # that vLLM does not apply; these are exactly the engine-independent parameters.
        # max_length (prompt width + new tokens), not max_new_tokens: the model's config may set
        # a max_length, and transformers warns when both are set.
        config = GenerationConfig(
            max_length=width + max_new,
            pad_token_id=tok.pad_token_id,
            eos_token_id=eos_ids or None,
            bos_token_id=tok.bos_token_id,
            do_sample=sample,
            num_return_sequences=params.n if sample else 1,
            **(dict(temperature=params.temperature, top_p=params.top_p, top_k=0) if sample else {}),
        )
        with torch.inference_mode():
            out = self._runner().generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          generation_config=config,
                                          stopping_criteria=StoppingCriteriaList([recorder]))
        gen = out[:, width:].cpu()
        rows: list[Completion] = []
        for r in range(gen.shape[0]):
            length, reason = recorder.finish(r, gen.shape[1])
            text = tok.decode(gen[r, :length].tolist(), skip_special_tokens=True)
            text, stopped = cut_at_stop(text, params.stop)
            rows.append(Completion(text=text, tokens=length, finish_reason="stop" if stopped else reason))
        if not sample:  # greedy: the n completions are the same; decode once, copy n times
            rows = [Completion(c.text, c.tokens, c.finish_reason) for c in rows for _ in range(params.n)]
        return rows

    def _truncate(self, c: Completion, budget: int, stop: Sequence[str]) -> Completion:
        ids = self.tokenizer(c.text, add_special_tokens=False)["input_ids"][:budget]
        text, stopped = cut_at_stop(self.tokenizer.decode(ids), stop)
        return Completion(text=text, tokens=budget, finish_reason="stop" if stopped else "length")

    # ------------------------------------------------------------------ scoring
    def completion_losses(
        self, prompts: Sequence[str], completions: Sequence[str], *, add_eos: bool = False
    ) -> list[float]:
        with self._activate(None):
            return hf.completion_losses(self._runner(), self.tokenizer, prompts, completions,
                                        add_eos=add_eos, max_model_len=self.max_model_len)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        with self._activate(None):
            return hf.embed(self.model, self.tokenizer, texts, max_model_len=self.max_model_len)

    def close(self) -> None:
        import gc

        self._peft = None
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _FinishRecorder(StoppingCriteria):
    """A stopping criterion that records where each sequence ended.

    transformers pads a finished row with the pad token, which a model may also generate; the
    step at which a row produced EOS or completed a stop string is the only exact length.
    """

    def __init__(self, tokenizer: Any, prompt_width: int, stop: Sequence[str], eos_ids: Sequence[int]):
        self.tok = tokenizer
        self.width = prompt_width
        self.stop = tuple(stop)
        self.eos = torch.tensor(list(eos_ids), dtype=torch.long)
        # Enough trailing tokens to contain any stop string: a byte-level BPE token is at least
        # one byte, so a string's UTF-8 length bounds its tokens (+2 for the tokens it starts or
        # ends inside).
        self.window = max((len(s.encode()) for s in self.stop), default=0) + 2
        self.ended: dict[int, tuple[int, str]] = {}

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        gen = input_ids[:, self.width:]
        step = gen.shape[1]
        done = torch.zeros(gen.shape[0], dtype=torch.bool, device=input_ids.device)
        if step == 0:
            return done
        last = gen[:, -1].cpu()
        is_eos = torch.isin(last, self.eos) if self.eos.numel() else torch.zeros_like(last, dtype=torch.bool)
        for r in range(gen.shape[0]):
            if r in self.ended:
                done[r] = True
            elif is_eos[r]:
                self.ended[r] = (step, "stop")
                done[r] = True
            elif self.stop:
                tail = self.tok.decode(gen[r, -self.window:].tolist(), skip_special_tokens=True)
                if any(s in tail for s in self.stop):
                    self.ended[r] = (step, "stop")
                    done[r] = True
        return done

    def finish(self, row: int, generated: int) -> tuple[int, str]:
        return self.ended.get(row, (generated, "length"))
