"""Sampling throughput: the `sample` stage vs a bare `LLM.generate`, and vs a naive loop.

One run, three measurements of generated tokens per second on the same machine, same model,
same prompts (GSM8K test questions in a 2-shot chain-of-thought prompt from GSM8K train) and
same sampling parameters (n paths, temperature, top-p, max tokens, per-prompt seeds):

1. stage   — the `sample` stage run in-process through `runtime.run_task` (reading questions,
             rendering prompts, the batched engine call, answer extraction, voting, writing
             samples.jsonl / votes.jsonl and committing). Reported twice: the stage's own
             `tokensPerSecond` metric (the engine call) and over the stage's whole wall time.
2. bare    — `vllm.LLM.generate` on the same `LLM` instance, called directly with the same
             prompts and `SamplingParams` (target: stage ≥ 0.95 × bare).
3. naive   — a per-question transformers loop (`model.generate(num_return_sequences=n)` for one
             prompt at a time), the way a first script would do it, on a subset of the questions.

The stage and the bare call share one warm engine (its `load_engine` is swapped for one that
returns it), and alternate, so neither gets a warmer cache; the median of `--repeats` is used.
The model is a random-weight Llama (no downloads), a little larger than the test fixture; it
writes gibberish, which costs the same to generate as text.

Without GSM8K (`GSM8K_DIR`, default ../shared/data/gsm8k) the demo's arithmetic problems stand
in. `--smoke` runs every step at toy sizes (4 questions × 2 paths, 8 tokens, a 1-layer model) in
seconds, vLLM's engine start included, to check that the script still runs; its figures mean
nothing.

    .venv/bin/python bench/bench_sample.py [--questions 64] [--paths 8] [--max-tokens 64]
    .venv/bin/python bench/bench_sample.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = Path(os.environ.get("GSM8K_DIR", ROOT.parent / "shared" / "data" / "gsm8k"))


SMOKE = dict(questions=4, paths=2, max_tokens=8, repeats=1, naive_questions=1, hidden=128, layers=1)


def gsm8k(split: str, n: int) -> list[dict]:
    path = GSM8K / f"{split}.jsonl"
    if not path.is_file():  # no shared data (a fresh clone, CI): the demo's problems stand in
        import random

        from selfimprove_workers.demo.arithmetic import make_problem

        print(f"note: {path} not found; using synthetic arithmetic problems", file=sys.stderr)
        rng = random.Random(split)
        return [make_problem(rng) for _ in range(n)]
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) >= n:
                break
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--paths", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-questions", type=int, default=2, help="the naive loop runs ~15 tok/s here")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--smoke", action="store_true",
                    help=f"toy sizes ({', '.join(f'{k}={v}' for k, v in SMOKE.items())}): checks that the "
                         "bench runs, in seconds; the figures mean nothing")
    args = ap.parse_args()
    if args.smoke:  # smoke sizes as defaults: flags given explicitly still win
        ap.set_defaults(**SMOKE)
        args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import selfimprove_workers.engines as engines
    from selfimprove_workers import log
    from selfimprove_workers.contract import StageTask
    from selfimprove_workers.demo.tinymodel import build_tiny_llama
    from selfimprove_workers.engines.base import encode_prompt, prompt_seed
    from selfimprove_workers.prompts import STOP_SEQUENCES, render_prompt
    from selfimprove_workers.runtime import run_task
    from selfimprove_workers.spec import EngineSpec, FewShotExample, TaskSpec
    from selfimprove_workers.stages import sample

    log.setup("WARNING")
    work = Path(tempfile.mkdtemp(prefix="bench-sample-"))
    model_dir = build_tiny_llama(work / "model", hidden=args.hidden, layers=args.layers, heads=args.hidden // 64,
                                 max_positions=2048, seed=0)
    questions = work / "questions.jsonl"
    questions.write_text("".join(json.dumps({"id": f"t{i}", "question": r["question"]}) + "\n"
                                 for i, r in enumerate(gsm8k("test", args.questions))))
    shots = []
    for r in gsm8k("train", 2):
        rationale, _, final = r["answer"].rpartition("####")
        shots.append(FewShotExample(question=r["question"], rationale=rationale.strip(), answer=final.strip()))
    task_spec = TaskSpec(few_shot=shots)
    sampling = {"paths": args.paths, "temperature": args.temperature, "maxTokens": args.max_tokens, "seed": 7}
    spec = EngineSpec(kind="vllm")

    if args.smoke:
        print("smoke run: toy sizes, to check that the bench runs; the figures mean nothing", flush=True)
    print(f"model: random Llama hidden {args.hidden}, {args.layers} layers; {args.questions} questions × "
          f"{args.paths} paths, ≤{args.max_tokens} tokens, T={args.temperature}, 2-shot CoT prompts", flush=True)
    t0 = time.perf_counter()
    engine = engines.load_engine(spec, model_dir, gpus=0, seed=7, enable_lora=False)
    print(f"vLLM engine started in {time.perf_counter() - t0:.1f}s", flush=True)
    real_close = engine.close
    engine.close = lambda: None  # the stage closes "its" engine; this one is shared
    engines.load_engine = lambda *a, **k: engine

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [render_prompt(task_spec, json.loads(line)["question"], "fewShotCot", engine.tokenizer, shots)
               for line in questions.read_text().splitlines()]
    token_prompts = [TokensPrompt(prompt_token_ids=encode_prompt(engine.tokenizer, p)) for p in prompts]
    bare_params = [SamplingParams(n=args.paths, temperature=args.temperature, top_p=1.0, max_tokens=args.max_tokens,
                                  seed=prompt_seed(7 + 1, f"t{i}"), stop=list(STOP_SEQUENCES)) for i in range(len(prompts))]  # keyed by id, as the stage
    print(f"prompt length: mean {statistics.mean(len(p['prompt_token_ids']) for p in token_prompts):.0f} tokens",
          flush=True)

    def run_bare() -> tuple[int, float]:
        t = time.perf_counter()
        outs = engine.llm.generate(token_prompts, bare_params, use_tqdm=False)
        seconds = time.perf_counter() - t
        return sum(len(c.token_ids) for o in outs for c in o.outputs), seconds

    def run_stage(i: int) -> tuple[int, float, float]:
        task = StageTask.model_validate({
            "run": {"name": "bench"}, "round": 1, "stage": "sample", "output": str(work / f"out-{i}"),
            "model": {"base": str(model_dir)}, "inputs": {"questions": str(questions)},
            "prompting": task_spec.wire(), "sampling": sampling, "engine": spec.wire(),
        })
        t = time.perf_counter()
        result = run_task(task, sample.run)
        wall = time.perf_counter() - t
        return int(result.metrics["generatedTokens"]), float(result.metrics["tokensPerSecond"]), wall

    run_bare()  # warm-up: the first call pays one-time costs neither measurement should carry
    bare_tps, stage_tps, stage_wall_tps = [], [], []
    for i in range(args.repeats):
        tokens, tps, wall = run_stage(i)
        stage_tps.append(tps)
        stage_wall_tps.append(tokens / wall)
        btokens, bseconds = run_bare()
        bare_tps.append(btokens / bseconds)
        print(f"  repeat {i + 1}: stage {tps:8.0f} tok/s (engine call), {tokens / wall:8.0f} tok/s (whole stage); "
              f"bare {btokens / bseconds:8.0f} tok/s  [{tokens} vs {btokens} tokens]", flush=True)
    real_close()

    # The naive loop: one generate call per question on a plain transformers model.
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = engine.tokenizer
    naive_tokens, t = 0, time.perf_counter()
    with torch.inference_mode():
        for i, p in enumerate(prompts[: args.naive_questions]):
            ids = torch.tensor([encode_prompt(tok, p)])
            torch.manual_seed(i)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=args.temperature, top_k=0, top_p=1.0, num_return_sequences=args.paths,
                                 max_length=ids.shape[1] + args.max_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
            gen = out[:, ids.shape[1]:]
            # Tokens up to and including EOS (the rest is padding).
            for row in gen.tolist():
                naive_tokens += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
    naive_tps = naive_tokens / (time.perf_counter() - t)

    bare, stage_m, stage_w = (statistics.median(x) for x in (bare_tps, stage_tps, stage_wall_tps))
    figures = {
        "bareTokensPerSecond": round(bare, 1),
        "stageTokensPerSecond": round(stage_m, 1),
        "stageWallTokensPerSecond": round(stage_w, 1),
        "naiveTokensPerSecond": round(naive_tps, 1),
        "stageVsBare": round(stage_m / bare, 3),
        "stageWallVsBare": round(stage_w / bare, 3),
        "stageVsNaive": round(stage_m / naive_tps, 1),
        "config": vars(args),
    }
    print(f"\nmedians over {args.repeats} repeats (generated tokens / second):")
    print(f"  bare LLM.generate          {bare:10.0f}")
    print(f"  sample stage (engine call) {stage_m:10.0f}   = {stage_m / bare:.3f} × bare   (target ≥ 0.95)")
    print(f"  sample stage (whole stage) {stage_w:10.0f}   = {stage_w / bare:.3f} × bare")
    print(f"  naive transformers loop    {naive_tps:10.0f}   → stage is {stage_m / naive_tps:.1f} × faster "
          f"({args.naive_questions} questions)")
    if args.smoke:
        print("(smoke run: not a measurement)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":  # vLLM starts its engine with `spawn`: the guard is required
    sys.exit(main())
