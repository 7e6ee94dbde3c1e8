"""Training throughput: the `train` stage's loop vs a plain `transformers.Trainer` + peft.

Both sides train the same LoRA adapter (r, alpha, target modules) on the same random-weight
Llama, on the same token sequences (GSM8K train rows rendered in LMSI's four mixed formats with
one exemplar, tokenized and masked once by `training.data.encode_examples`), with the same
batch size, length-grouped batches, optimizer (AdamW), schedule (cosine, 3% warmup), gradient
clipping and precision (fp32 on CPU, bf16 on GPU), for one epoch:

1. stage   — `training.loop.train`, the function the `train` stage runs in each process
             (answer-only LM head, vectorized collation, per-epoch checkpoint excluded from
             its timing as from its own `tokensPerSecond`).
2. Trainer — `transformers.Trainer` with `DataCollatorForSeq2Seq` (dynamic padding),
             `train_sampling_strategy="group_by_length"`, the model's own loss; timed from
             `on_train_begin` to `on_train_end`.

Tokens per second counts the (unpadded) sequence tokens of the epoch; both sides see the same
tokens, so the ratio is a ratio of wall times. The sides alternate `--trials` times; reported are
the best of each side (the least disturbed run on a shared machine) and the median of the
per-trial ratios (neighbouring runs see similar load).

CPU mode (default): a small Llama whose LM head is ~30% of its weights, as in Qwen2.5-0.5B — the
share that decides how much the answer-only head saves; the tokenizer is a byte-level BPE
trained on GSM8K in-process (no downloads) with a vocabulary as large as the model's.

`--gpu`: a Llama-3-8B-shaped model (hidden 4096, 32 layers, GQA 32/8, MLP 14336, vocabulary
128256) with random bf16 weights; reports tokens/s, peak GPU memory and MFU for both sides.
MFU = (FLOPs per token × tokens/s) / peak bf16 FLOP/s, with the FLOPs of LoRA training:
    per token ≈ 4·N_frozen + 6·N_lora + 4·N_head·f_answer + 6·L·s̄·d
- 2 FLOPs per weight forward, 2 backward for the input gradient; frozen weights need no weight
  gradient (so 4·N rather than full fine-tuning's 6·N); LoRA weights get all three (6·N_lora);
- the LM head is only needed at answer positions (a fraction f_answer of the tokens);
- attention scores and values: 4·s·d per layer forward for context length s, halved by the
  causal mask, ×3 with the backward pass, with s̄ the token-weighted mean sequence length.
The same FLOP count is used for both sides (the work the loss requires), so the MFU ratio
equals the throughput ratio.

`--smoke`: 2 rows, one trial per side, batch size 4 — every step in seconds, to check that the
script still runs (on CPU, or with `--gpu` the GPU path at that size); the figures mean nothing.

    .venv/bin/python bench/bench_train.py [--rows 24] [--batch-size 8] [--trials 5] [--threads 1] [--json F]
    .venv/bin/python bench/bench_train.py --smoke
    python bench/bench_train.py --gpu [--rows 512] [--batch-size 8] [--gradient-checkpointing]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GSM8K = Path(os.environ.get("GSM8K_DIR", ROOT.parent / "shared" / "data" / "gsm8k"))
sys.path.insert(0, str(ROOT / "workers"))

PRESETS: dict[str, dict[str, int]] = {
    # 4.7M weights, the head 1.6M of them: ~1/3, as in Qwen2.5-0.5B (136M of 494M).
    "cpu": dict(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=688, vocab=6144),
    "llama3-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
SMOKE = dict(rows=2, trials=1, batch_size=4)
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


# --------------------------------------------------------------------------- data and model
def gsm8k_rows(n: int) -> list[dict[str, Any]]:
    path = GSM8K / "train.jsonl"
    if path.is_file():
        with open(path) as f:
            return [json.loads(line) for _, line in zip(range(n), f)]
    # The worker image has no shared data: the demo's arithmetic problems stand in.
    from selfimprove_workers.demo.arithmetic import make_problem

    print(f"note: {path} not found; using synthetic arithmetic problems", file=sys.stderr)
    rng = random.Random(0)
    return [make_problem(rng) for _ in range(n)]


def build_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE trained on the benchmark's own text: real subword lengths, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=min(vocab, 16000), special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_model_dir(out: Path, shape: dict[str, int], tokenizer, cuda: bool) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------- the two sides
def run_stage(model_dir: Path, examples, args, work: Path, pad_id: int) -> dict[str, Any]:
    from selfimprove_workers.contract import StageTask
    from selfimprove_workers.training.loop import TrainJob, train

    task = StageTask.model_validate({
        "run": {"name": "bench"}, "round": 1, "stage": "train", "output": str(work / "output"),
        "model": {"base": str(model_dir)}, "inputs": {"train": ["unused.jsonl"]},
        "training": {"lora": LORA, "epochs": 1, "learningRate": 2e-4, "batchSize": args.batch_size,
                     "maxLength": args.max_length, "gradientCheckpointing": args.gradient_checkpointing},
    })
    job = TrainJob(task=task.wire(), model_dir=str(model_dir), init_adapter=None, resume_dir=None,
                   out_dir=str(work / "out"), work_dir=str(work / "scratch"), pad_id=pad_id)
    outcome = train(job, examples)
    assert outcome is not None
    d = outcome["details"]
    return {"tokens": d["tokens"], "seconds": d["trainSeconds"], "loss": d["perEpoch"][0]["loss"]}


def run_trainer(model_dir: Path, examples, args, work: Path, tokenizer) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available()

    # Per-example lists, built before the clock starts: what a datasets.Dataset would hand over.
    items = []
    for i in range(len(examples)):
        b = examples.collate([i], tokenizer.pad_token_id)
        items.append({k: b[k][0].tolist() for k in ("input_ids", "attention_mask", "labels")})

    class Sequences(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(items)

        def __getitem__(self, i: int) -> dict[str, list[int]]:
            return items[i]

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_train_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.t0

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16 if cuda else torch.float32,
                                                 device_map={"": 0} if cuda else None)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=LORA["targetModules"], task_type="CAUSAL_LM"))
    steps = math.ceil(len(examples) / args.batch_size)
    targs = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=math.ceil(0.03 * steps),
        weight_decay=0.0, max_grad_norm=1.0, train_sampling_strategy="group_by_length",
        bf16=cuda, use_cpu=not cuda, gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        logging_steps=max(1, steps), save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, seed=42,
    )
    clock = Clock()
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100,
                                      pad_to_multiple_of=8 if cuda else None)
    trainer = Trainer(model=model, args=targs, train_dataset=Sequences(), data_collator=collator, callbacks=[clock])
    out = trainer.train()
    tokens = int(examples.lengths.sum())
    return {"tokens": tokens, "seconds": clock.seconds, "loss": out.training_loss}


# --------------------------------------------------------------------------- accounting
def flops_per_token(shape: dict[str, int], examples, n_lora: int) -> float:
    d, L, v = shape["hidden"], shape["layers"], shape["vocab"]
    kv = d * shape["kv_heads"] // shape["heads"]
    n_frozen = L * (2 * d * d + 2 * d * kv + 3 * d * shape["intermediate"])
    lengths = examples.lengths.astype("float64")
    answer_frac = float(examples.answer_lengths.sum() / lengths.sum())
    mean_context = float((lengths ** 2).sum() / lengths.sum())  # token-weighted
    return 4 * n_frozen + 6 * n_lora + 4 * v * d * answer_frac + 6 * L * mean_context * d


def peak_memory_gib(cuda: bool) -> float:
    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB, process peak


def peak_flops(override: float | None) -> float | None:
    import torch

    if override:
        return override * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="Llama-3-8B-shaped model in bf16 on the GPU")
    ap.add_argument("--rows", type=int, help="GSM8K rows (× 4 formats); default 24 on CPU, 512 on GPU")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--trials", type=int, help="alternating trials per side; default 5 on CPU, 1 on GPU")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--no-baseline", action="store_true", help="measure the stage's loop only")
    ap.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s for MFU when the GPU is not known")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU intra-op threads (default 1: on a shared machine, OpenMP threads spin at "
                         "every barrier while a sibling is descheduled, and timings swing tenfold)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--smoke", action="store_true",
                    help=f"toy sizes ({', '.join(f'{k}={v}' for k, v in SMOKE.items())}): checks that the "
                         "bench runs, in seconds; the figures mean nothing")
    args = ap.parse_args()
    if args.smoke:  # smoke sizes as defaults: flags given explicitly still win
        ap.set_defaults(**SMOKE)
        args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)

    from selfimprove_workers.prompts import training_row
    from selfimprove_workers.spec import LMSI_FORMATS, FewShotExample, TaskSpec
    from selfimprove_workers.training.data import encode_examples

    cuda = torch.cuda.is_available()
    if args.gpu and not cuda:
        print("--gpu needs a CUDA device", file=sys.stderr)
        return 2
    shape = PRESETS["llama3-8b" if args.gpu else "cpu"]
    rows_n = args.rows or (512 if args.gpu else 24)
    trials = args.trials or (1 if args.gpu else 5)

    if args.smoke:
        print("smoke run: toy sizes, to check that the bench runs; the figures mean nothing", flush=True)
    raw = gsm8k_rows(rows_n + 1)
    shot, raw = raw[0], raw[1:]
    tokenizer = build_tokenizer([r["question"] + "\n" + r["answer"] for r in gsm8k_rows(2000)], shape["vocab"])
    task = TaskSpec(few_shot=[FewShotExample(question=shot["question"],
                                             rationale=shot["answer"].split("####")[0].strip(),
                                             answer=shot["answer"].split("####")[-1].strip())])
    rows = [training_row(r, f"gsm8k:{i + 1}") for i, r in enumerate(raw)]
    examples = encode_examples(rows, list(LMSI_FORMATS), task, tokenizer, args.max_length, task.few_shot)
    st = examples.stats
    print(f"data: {st['rows']} rows × 4 formats = {st['sequences']} sequences, {st['tokens']:,} tokens "
          f"({st['answerTokens'] / st['tokens']:.0%} answer), longest {st['maxSequence']}", flush=True)

    import logging

    logging.basicConfig(level=logging.WARNING)
    results: dict[str, list[dict[str, Any]]] = {"stage": [], "trainer": []}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        t0 = time.perf_counter()
        model_dir = build_model_dir(Path(tmp) / "model", shape, tokenizer, cuda)
        print(f"model: {shape} built in {time.perf_counter() - t0:.1f}s", flush=True)
        sides = ["stage"] + ([] if args.no_baseline else ["trainer"])
        for trial in range(trials):
            for side in sides:
                work = Path(tmp) / f"{side}-{trial}"
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                cpu0 = time.process_time()
                if side == "stage":
                    r = run_stage(model_dir, examples, args, work, tokenizer.pad_token_id)
                else:
                    r = run_trainer(model_dir, examples, args, work, tokenizer)
                # CPU time of the whole call (loading, training, saving: the stage side also
                # writes a checkpoint and the adapter): steadier than wall time on a shared CPU.
                r["cpuSeconds"] = time.process_time() - cpu0
                r["tokensPerSecond"] = r["tokens"] / r["seconds"]
                r["tokensPerCpuSecond"] = r["tokens"] / r["cpuSeconds"]
                r["peakMemoryGiB"] = round(peak_memory_gib(cuda), 2)
                results[side].append(r)
                print(f"trial {trial + 1} {side:8s} {r['tokensPerSecond']:10,.0f} tokens/s  "
                      f"({r['seconds']:.1f}s, {r['tokensPerCpuSecond']:,.0f} tokens/CPU-s, loss {r['loss']:.3f}, "
                      f"peak {r['peakMemoryGiB']} GiB)", flush=True)

    r = LORA["r"]
    kv = shape["hidden"] * shape["kv_heads"] // shape["heads"]
    d = shape["hidden"]
    n_lora = shape["layers"] * r * ((d + d) + 2 * (d + kv) + (d + d))  # A and B of q, k, v, o
    fpt = flops_per_token(shape, examples, n_lora)
    peak = peak_flops(args.peak_tflops)
    figures: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else f"cpu, {args.threads} thread(s)",
                               "shape": shape,
                               "sequences": len(examples), "tokens": st["tokens"], "batchSize": args.batch_size,
                               "flopsPerToken": fpt}
    for side in sides:
        best = max(results[side], key=lambda x: x["tokensPerSecond"])
        figures[side] = {"tokensPerSecond": round(best["tokensPerSecond"], 1), "peakMemoryGiB": best["peakMemoryGiB"],
                         "trials": [round(x["tokensPerSecond"], 1) for x in results[side]],
                         "tokensPerCpuSecond": round(max(x["tokensPerCpuSecond"] for x in results[side]), 1)}
        if peak:
            figures[side]["mfu"] = round(fpt * best["tokensPerSecond"] / peak, 4)
    print(f"\nstage loop: {figures['stage']['tokensPerSecond']:,.0f} tokens/s"
          + (f", MFU {figures['stage']['mfu']:.1%}" if peak else ""))
    if not args.no_baseline:
        ratio = figures["stage"]["tokensPerSecond"] / figures["trainer"]["tokensPerSecond"]
        paired = statistics.median(a["tokensPerSecond"] / b["tokensPerSecond"]
                                   for a, b in zip(results["stage"], results["trainer"]))
        cpu_ratio = figures["stage"]["tokensPerCpuSecond"] / figures["trainer"]["tokensPerCpuSecond"]
        figures["ratio"] = round(ratio, 3)
        figures["cpuTimeRatio"] = round(cpu_ratio, 3)
        figures["pairedRatioMedian"] = round(paired, 3)
        print(f"Trainer:    {figures['trainer']['tokensPerSecond']:,.0f} tokens/s"
              + (f", MFU {figures['trainer']['mfu']:.1%}" if peak else ""))
        print(f"ratio stage / Trainer: {ratio:.2f}x best-of, {paired:.2f}x median of paired trials, "
              f"{cpu_ratio:.2f}x in tokens per CPU-second (target >= 1.0x)")
    if args.smoke:
        print("(smoke run: not a measurement)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
