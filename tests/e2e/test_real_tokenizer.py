"""A Llama-3-like model end to end: byte-level BPE, a chat template with a system turn, GQA, RoPE
theta 500000, untied embeddings, no pad id and two EOS ids (tests/bpe_fixtures.py).

The model is taught (by the real train stage, all four LMSI formats) a handful of answers, so
that generation has something exact to reproduce: what it was trained on after a prompt is what
it must generate after that prompt, token for token, ending where training ended it — in vLLM
and in transformers alike. Then the same model goes through `selfimprove run` (sample → filter
→ train → evaluate) with and without the chat template.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bpe_fixtures import EOT, EOTEXT
from hf_cache import populate_hf_cache
from model_fixtures import require_vllm, write_jsonl
from selfimprove_workers.contract import StageTask
from selfimprove_workers.engines.base import GenerationParams, encode_completion, encode_prompt
from selfimprove_workers.prompts import (
    STOP_SEQUENCES,
    TrainingRow,
    answer_end_id,
    answer_stop_ids,
    render_prompt,
    render_target,
)
from selfimprove_workers.runtime import run_task
from selfimprove_workers.spec import LMSI_FORMATS, EngineSpec, FewShotExample, LoraSpec, TaskSpec
from selfimprove_workers.training.data import encode_examples
from train_fixtures import train_task

pytestmark = [pytest.mark.slow]

SHOTS = [{"question": "What is 1 plus 1?", "rationale": "1 + 1 = 2.", "answer": "2"}]
# Numbers whose digits BPE groups in threes, `$`, `%` and an apostrophe: seams that merge.
ROWS = [
    {"question": "Tom has 1234 apples and eats 1. How many are left?", "cot": "1234 - 1 = 1233.\nThe answer is 1233.",
     "answer": "1233"},
    {"question": "A box holds 12 eggs. How many eggs are in 30 boxes?", "cot": "12 * 30 = 360.\nThe answer is 360.",
     "answer": "360"},
    {"question": "Sara's class reads 45 pages a day for 7 days. How many pages?", "cot": "45 * 7 = 315.\nThe answer is 315.",
     "answer": "315"},
    {"question": "A shirt costs $25 and is 20% off. What is the price?",
     "cot": "20% of 25 is 5, so 25 - 5 = 20.\nThe answer is 20.", "answer": "20"},
]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYSTEM = "You are a careful math tutor."


def task_spec(chat: bool) -> TaskSpec:
    return TaskSpec(chat_template=chat, system=SYSTEM, few_shot=[FewShotExample(**s) for s in SHOTS])


def teach(model: Path, out: Path, chat: bool, rows: list[dict[str, Any]] = ROWS) -> Path:
    """Train the stage's own way until the answers are memorized; return the adapter."""
    data = write_jsonl(out.parent / f"{out.name}.jsonl", rows)
    wire = train_task(out, model, [data], epochs=100, learningRate=5e-3,
                      formats=list(LMSI_FORMATS),
                      lora={"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ALL_LINEAR}).wire()
    wire["prompting"] = task_spec(chat).wire()
    result = run_task(StageTask.model_validate(wire))
    assert result.status == "Succeeded" and result.metrics["trainLoss"] < 0.3, result.metrics
    assert result.metrics["examples"] == len(rows) * 4
    return out / "adapter"


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "chat"])
def taught(request, bpe_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[bool, Path]:
    chat = request.param
    return chat, teach(bpe_model_dir, tmp_path_factory.mktemp("taught") / "train", chat)


def generate_all(kind: str, model: Path, adapter: Path, task: TaskSpec) -> dict[tuple[str, str], Any]:
    from selfimprove_workers.engines import load_engine

    if kind == "vllm":
        require_vllm()
    engine = load_engine(EngineSpec(kind=kind, enforceEager=True, maxModelLen=1024, maxLoraRank=16), model,
                         gpus=0, seed=0, enable_lora=True)
    try:
        params = GenerationParams(n=1, temperature=0.0, max_tokens=48, stop=STOP_SEQUENCES,
                                  stop_token_ids=answer_stop_ids(task, engine.tokenizer))
        out = {}
        for fmt in LMSI_FORMATS:
            prompts = [render_prompt(task, r["question"], fmt, engine.tokenizer) for r in ROWS]
            for r, o in zip(ROWS, engine.generate(prompts, params, adapter=str(adapter))):
                out[(r["question"], fmt)] = o.completions[0]
        # A stop string inside the answer: the text ends right before it, in both engines.
        prompts = [render_prompt(task, r["question"], "zeroShotCot", engine.tokenizer) for r in ROWS]
        cut = GenerationParams(n=1, temperature=0.0, max_tokens=48, stop=("The answer is",))
        for r, o in zip(ROWS, engine.generate(prompts, cut, adapter=str(adapter))):
            out[(r["question"], "stop string")] = o.completions[0]
        return out
    finally:
        engine.close()


@pytest.mark.vllm
def test_generation_after_each_prompt_is_the_trained_answer_and_stops_where_training_ended_it(taught, bpe_model_dir):
    """Every format, both engines: the greedy completion is the training target exactly (a seam
    token lost or doubled in training would show here), ended by the answer's end token — not by
    running out of tokens — after exactly the target's tokens plus that token."""
    chat, adapter = taught
    task = task_spec(chat)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bpe_model_dir))
    assert answer_end_id(task, tok) == tok.convert_tokens_to_ids(EOT)
    runs = {kind: generate_all(kind, bpe_model_dir, adapter, task) for kind in ("transformers", "vllm")}
    for (question, fmt), c in runs["vllm"].items():
        row = next(r for r in ROWS if r["question"] == question)
        if fmt == "stop string":
            full = render_target("zeroShotCot", row["cot"], row["answer"], chat)
            for kind in runs:
                got = runs[kind][(question, fmt)]
                assert (got.text, got.finish_reason) == (full[:full.index("The answer is")], "stop"), (kind, got)
            continue
        target = render_target(fmt, row["cot"], row["answer"], chat)
        for kind in runs:
            got = runs[kind][(question, fmt)]
            assert (got.text, got.finish_reason) == (target, "stop"), (kind, fmt, got)
            assert got.tokens == len(encode_completion(tok, target)) + 1, (kind, fmt, got)


@pytest.mark.vllm
def test_both_engines_stop_on_the_turns_end_when_the_tokenizers_eos_is_another_token(taught, bpe_model_dir, tmp_path):
    """Early Llama-3-Instruct releases: the tokenizer's EOS is `<|end_of_text|>`, while chat turns
    end with `<|eot_id|>`. Training under the template ends answers with the template's token,
    and both engines stop there — rather than running on to max_tokens."""
    chat, adapter = taught
    if not chat:
        pytest.skip("a plain-text prompt has no turn end; the tokenizer's EOS is the end")
    variant = tmp_path / "eos-variant"
    shutil.copytree(bpe_model_dir, variant)
    cfg = variant / "tokenizer_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "eos_token": EOTEXT}))
    gen = variant / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "eos_token_id": None}))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(variant))
    assert tok.eos_token == EOTEXT and answer_end_id(task_spec(True), tok) == tok.convert_tokens_to_ids(EOT)
    runs = {kind: generate_all(kind, variant, adapter, task_spec(True)) for kind in ("transformers", "vllm")}
    assert runs["transformers"] == runs["vllm"]
    assert all(c.finish_reason == "stop" and c.text.endswith(".") for k, c in runs["vllm"].items() if k[1] != "stop string")


def test_both_engines_stop_on_every_eos_the_generation_config_lists(bpe_model_dir):
    from selfimprove_workers.engines import hf

    tok = hf.load_tokenizer(bpe_model_dir)
    assert hf.eos_token_ids(bpe_model_dir, tok) == [tok.convert_tokens_to_ids(EOT), tok.convert_tokens_to_ids(EOTEXT)]
    assert tok.pad_token_id == tok.eos_token_id  # no pad of its own: padding uses EOS, masked out


def test_padding_gives_the_same_losses_batched_and_unbatched(bpe_model_dir):
    """Right padding in training (with EOS as pad, as this tokenizer has none) and the engines'
    scoring batches: each example's loss is the same alone and in a batch of mixed lengths."""
    import torch
    from selfimprove_workers.engines import hf
    from selfimprove_workers.training.loop import AnswerLoss, build_model

    tok = hf.load_tokenizer(bpe_model_dir)
    model = build_model(str(bpe_model_dir), LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    loss = AnswerLoss(model).eval()
    task = task_spec(True)
    rows = [TrainingRow(str(i), r["question"], r["cot"], r["answer"]) for i, r in enumerate(ROWS)]
    enc = encode_examples(rows, list(LMSI_FORMATS), task, tok, 1024, task.few_shot)
    assert len(set(enc.lengths.tolist())) > 4  # really mixed lengths: padding is exercised

    def run(idx: list[int]) -> float:
        batch = {k: torch.from_numpy(v) for k, v in enc.collate(np.asarray(idx), tok.pad_token_id).items()}
        with torch.no_grad():
            return float(loss(**batch))

    together = run(list(range(len(enc))))
    alone = [run([i]) for i in range(len(enc))]
    assert together == pytest.approx(sum(alone), rel=1e-5)

    # The engines' teacher-forced scoring (IWSI's losses), batched vs one at a time.
    base = hf.load_causal_lm(bpe_model_dir, "float32", "cpu")
    prompts = [render_prompt(task, r["question"], "zeroShotCot", tok) for r in ROWS]
    targets = [render_target("zeroShotCot", r["cot"], r["answer"], True) for r in ROWS]
    batched = hf.completion_losses(base, tok, prompts, targets, add_eos=True, max_model_len=1024)
    single = [hf.completion_losses(base, tok, [p], [t], add_eos=True, max_model_len=1024)[0] for p, t in zip(prompts, targets)]
    assert batched == pytest.approx(single, rel=1e-5)


def test_the_chat_template_renders_one_prompt_whatever_the_day(bpe_model_dir, monkeypatch):
    """The template dates its system header from `strftime_now`: without the pinned date, a run
    crossing midnight would train on prompts it never samples with."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bpe_model_dir))
    unpinned = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    assert datetime.now().strftime("%d %b %Y") in unpinned
    prompt = render_prompt(task_spec(True), "What is 2 plus 3?", "zeroShotCot", tok)
    assert "Today Date: 26 Jul 2024" in prompt and SYSTEM in prompt
    assert prompt.startswith("<|begin_of_text|>") and prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert encode_prompt(tok, prompt).count(tok.bos_token_id) == 1


MANIFEST = """\
apiVersion: selfimprove.dev/v1alpha1
kind: SelfImproveRun
metadata: {{name: bpe-{name}}}
spec:
  strategy: lmsi
  model: {{base: {model}}}
  data: {{questions: {data}/questions.jsonl, evaluation: {data}/eval.jsonl}}
  task:
    answer: {{type: number}}
    chatTemplate: {chat}
    system: "{system}"
    fewShot: {shots}
  engine: {{kind: vllm, enforceEager: true, maxModelLen: 1024, maxLoraRank: 16}}
  sampling: {{paths: 4, temperature: 0.7, maxTokens: 48}}
  filters: [{{consistency: {{minConfidence: 0.5}}}}]
  training:
    lora: {{r: 8, alpha: 16, targetModules: [q_proj, v_proj]}}
    epochs: 1
    learningRate: 1.0e-4
    batchSize: 8
    maxLength: 1024
    formats: [fewShotCot, fewShotDirect, zeroShotCot, zeroShotDirect]
  evaluation: {{format: fewShotCot, maxTokens: 48}}
  rounds: {{max: 1, patience: 0}}
  retry: {{limit: 0, backoffSeconds: 0}}
  resources: {{gpus: 0}}
  storage: {{uri: s3://unused/}}
"""


@pytest.mark.vllm
def test_selfimprove_run_with_the_bpe_model_in_every_format(taught, bpe_model_dir, tmp_path):
    """sample → filter → train (all four formats) → evaluate through the CLI, with the taught
    model merged into plain weights (a model that answers these questions in the task's format),
    with and without the chat template: it keeps its voted answers, trains on them in every
    format and scores them right — which needs every stage to render the same prompt.

    With the chat template, `model.base` is a Hub id at a pinned commit that every stage resolves
    from a populated Hugging Face cache with the network off (HF_HUB_OFFLINE)."""
    require_vllm()
    from selfimprove_workers.engines.hf import merge_adapter

    chat, adapter = taught
    merged = merge_adapter(bpe_model_dir, adapter, tmp_path / "model")
    env = {**os.environ, "SELFIMPROVE_CACHE": str(tmp_path / "model-cache")}
    model: Any = merged
    if chat:
        commit = populate_hf_cache(tmp_path / "hf-cache", "selfimprove-tests/bpe-llama", merged)
        model = f"hf://selfimprove-tests/bpe-llama@{commit}"
        env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hf-cache"))
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "questions.jsonl", [{"id": f"q{i}", "question": r["question"]} for i, r in enumerate(ROWS)])
    write_jsonl(data / "eval.jsonl", [{"id": f"e{i}", "question": r["question"], "answer": r["answer"]}
                                      for i, r in enumerate(ROWS)])
    manifest = tmp_path / "run.yaml"
    manifest.write_text(MANIFEST.format(name="chat" if chat else "plain", model=model, data=data, chat=str(chat).lower(),
                                        system=SYSTEM, shots=json.dumps(SHOTS)))
    proc = subprocess.run([sys.executable, "-m", "selfimprove_operator.cli", "run", str(manifest),
                           "--storage", str(tmp_path / "runs")], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [status_file] = (tmp_path / "runs").rglob("status.json")
    run_dir = status_file.parent
    status = json.loads(status_file.read_text())
    assert status["phase"] == "Succeeded", status
    rounds = {r["round"]: r for r in status["rounds"]}
    assert rounds[0]["accuracy"] == 1.0  # the taught model, asked as it was taught
    # Every question's vote is the taught answer, with at least 3 of its 4 paths at T 0.7 (a
    # prompt rendered differently from training would scatter them); one stray path is sampling.
    votes = [json.loads(line) for line in (run_dir / "round-001" / "sample" / "votes.jsonl").read_text().splitlines()]
    assert [(v["id"], v["majority"]) for v in votes] == [(f"q{i}", r["answer"]) for i, r in enumerate(ROWS)]
    assert all(v["count"] >= 3 for v in votes), votes
    assert rounds[1]["kept"] == sum(v["count"] for v in votes)
    train = json.loads((run_dir / "round-001" / "train" / "metrics.json").read_text())
    assert train["data"]["formats"] == list(LMSI_FORMATS) and train["data"]["truncated"] == 0
    assert rounds[1]["accuracy"] >= 0.75
    if chat:  # read where it is, not copied into the model cache
        assert not (tmp_path / "model-cache").exists() or not any((tmp_path / "model-cache").rglob("*.safetensors"))
