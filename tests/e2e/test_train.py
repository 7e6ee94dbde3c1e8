"""The `train` stage: data encoding and masking, the loss, the loop, checkpoints and resume, the
adapter as vLLM and transformers load it. Everything runs on a tiny random-weight Llama on CPU.

Test hook: `SELFIMPROVE_TEST_EXIT_AFTER_EPOCH=N` makes the training process exit hard (code 137,
as a SIGKILL would) right after epoch N's checkpoint is complete in storage — a deterministic
stand-in for a preemption at that point.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from selfimprove_workers.errors import BadInput
from selfimprove_workers.prompts import TrainingRow, render_prompt, render_target
from selfimprove_workers.runtime import EXIT_BAD_INPUT, run_task
from selfimprove_workers.spec import LMSI_FORMATS, FewShotExample, LoraSpec, TaskSpec
from selfimprove_workers.training import checkpoint
from selfimprove_workers.training.data import (
    IGNORE_INDEX,
    encode_examples,
    plan_epoch,
    resolve_formats,
)
from train_fixtures import (
    addition_rows,
    require_vllm,
    run_worker,
    train_task,
    write_jsonl,
)

QUESTION = "What is 2 plus 3?"
COT = "2 + 3 = 5.\nThe answer is 5."


@pytest.fixture(scope="module")
def tokenizer(train_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(train_model_dir))


@pytest.fixture(scope="module")
def few_shot_task() -> TaskSpec:
    return TaskSpec(few_shot=[FewShotExample(question="What is 1 plus 1?", rationale="1 + 1 = 2.", answer="2")])


# --------------------------------------------------------------------------- data
def test_prompt_tokens_are_masked_and_answer_tokens_are_not(tokenizer, few_shot_task):
    rows = [TrainingRow("a", QUESTION, COT, "5"), TrainingRow("b", "What is 10 plus 20?", "", "30")]
    enc = encode_examples(rows, list(LMSI_FORMATS), few_shot_task, tokenizer, 1024, few_shot_task.few_shot)
    assert len(enc) == 8 and enc.stats["truncated"] == enc.stats["dropped"] == 0
    batch = enc.collate(np.arange(len(enc)), pad_id=tokenizer.pad_token_id)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[1] == enc.lengths.max()
    eos = tokenizer.eos_token_id
    for i, (row, fmt) in enumerate((r, f) for r in rows for f in LMSI_FORMATS):
        prompt = tokenizer(render_prompt(few_shot_task, row.question, fmt, tokenizer, few_shot_task.few_shot)).input_ids
        target = tokenizer(render_target(fmt, row.cot, row.answer), add_special_tokens=False).input_ids + [eos]
        n = len(prompt) + len(target)
        assert prompt[0] == tokenizer.bos_token_id
        assert ids[i, :n].tolist() == prompt + target
        # The boundary: the prompt ends with "Answer:" (or the CoT trigger), the labels start with
        # the target's leading space and end with EOS; padding carries no label.
        assert (labels[i, : len(prompt)] == IGNORE_INDEX).all()
        assert labels[i, len(prompt):n].tolist() == target
        assert tokenizer.decode(ids[i, len(prompt) - 1]) == ("." if fmt == "zeroShotCot" else ":")
        assert tokenizer.decode(labels[i, len(prompt):n]) == render_target(fmt, row.cot, row.answer) + "</s>"
        assert (labels[i, n:] == IGNORE_INDEX).all() and (ids[i, n:] == tokenizer.pad_token_id).all()
        assert mask[i, :n].all() and not mask[i, n:].any()
    # Direct formats train on the answer sentence alone; the row without reasoning falls back
    # to it in the CoT formats too.
    assert tokenizer.decode(labels[1][labels[1] != IGNORE_INDEX]) == " The answer is 5.</s>"
    assert tokenizer.decode(labels[4][labels[4] != IGNORE_INDEX]) == " The answer is 30.</s>"


def test_truncation_keeps_the_answer_and_drops_only_what_cannot_fit(tokenizer, few_shot_task):
    row = TrainingRow("a", QUESTION, COT, "5")
    prompt = tokenizer(render_prompt(few_shot_task, QUESTION, "fewShotCot", tokenizer)).input_ids
    target = tokenizer(render_target("fewShotCot", COT, "5"), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    limit = len(target) + 10
    enc = encode_examples([row], ["fewShotCot"], few_shot_task, tokenizer, limit)
    assert enc.stats["truncated"] == 1 and int(enc.lengths[0]) == limit and int(enc.prompt_lengths[0]) == 10
    seq = enc.tokens[: limit].tolist()
    # Cut from the left (the question stays, the exemplars go), the BOS kept, the answer whole.
    assert seq == [tokenizer.bos_token_id] + prompt[-9:] + target

    long_row = TrainingRow("b", QUESTION, COT + " " + "x" * 40, "5")
    enc = encode_examples([row, long_row], ["fewShotCot"], few_shot_task, tokenizer, len(target) + 1)
    assert enc.stats["dropped"] == 1 and len(enc) == 1 and int(enc.prompt_lengths[0]) == 1
    with pytest.raises(BadInput, match="maxLength"):
        encode_examples([row], ["fewShotCot"], few_shot_task, tokenizer, len(target))


def test_few_shot_formats_without_exemplars_become_zero_shot():
    assert resolve_formats(LMSI_FORMATS, has_exemplars=True) == list(LMSI_FORMATS)
    assert resolve_formats(LMSI_FORMATS, has_exemplars=False) == ["zeroShotCot", "zeroShotDirect"]


def test_prompts_are_encoded_as_the_engines_encode_them(tokenizer):
    from selfimprove_workers.engines.base import encode_prompt
    from selfimprove_workers.training.data import encode_prompts

    prompts = ["Question: a\nAnswer:", "<s>already has its BOS", "plain"]
    assert encode_prompts(tokenizer, prompts) == [encode_prompt(tokenizer, p) for p in prompts]
    assert encode_prompts(tokenizer, prompts)[1].count(tokenizer.bos_token_id) == 1


def test_epoch_plan_is_a_pure_function_of_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(5, 500, 1003).astype(np.int32)
    plan = plan_epoch(lengths, 8, seed=3, epoch=1)
    assert [b.tolist() for b in plan] == [b.tolist() for b in plan_epoch(lengths, 8, seed=3, epoch=1)]
    assert [b.tolist() for b in plan] != [b.tolist() for b in plan_epoch(lengths, 8, seed=3, epoch=2)]
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == list(range(1003)) and len(plan) == -(-1003 // 8)
    assert lengths[plan[0]].max() == lengths.max()  # the longest batch first: OOM shows at step 1

    def padded(batches):
        return sum(int(lengths[b].max()) * len(b) for b in batches)

    ungrouped = plan_epoch(lengths, 8, seed=3, epoch=1, group_by_length=False)
    assert sorted(np.concatenate(ungrouped).tolist()) == list(range(1003))
    assert padded(plan) < 0.8 * padded(ungrouped)


# --------------------------------------------------------------------------- the loss
def test_answer_loss_equals_the_models_own_loss(train_model_dir, tokenizer, few_shot_task):
    import torch
    from selfimprove_workers.training.loop import AnswerLoss, build_model

    model = build_model(str(train_model_dir), LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=0)
    with torch.no_grad():  # a non-zero B, so the adapter takes part in the forward pass
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    rows = [TrainingRow("a", QUESTION, COT, "5"), TrainingRow("b", "What is 7 plus 8?", "7 + 8 = 15.", "15")]
    enc = encode_examples(rows, list(LMSI_FORMATS), few_shot_task, tokenizer, 1024, few_shot_task.few_shot)
    batch = {k: torch.from_numpy(v) for k, v in enc.collate(np.arange(len(enc)), tokenizer.pad_token_id).items()}
    module = AnswerLoss(model).eval()
    assert module.fast_head
    answer_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        reference = model(**batch).loss  # transformers: mean over every labelled token
        fast = module(**batch) / answer_tokens
        module.fast_head = False
        generic = module(**batch) / answer_tokens
    assert torch.allclose(fast, reference, rtol=1e-5) and torch.allclose(generic, reference, rtol=1e-5)


# --------------------------------------------------------------------------- the stage
def test_training_lowers_the_loss_and_writes_a_peft_adapter(train_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "kept.jsonl", addition_rows([(1, 2), (3, 4), (5, 6), (7, 8)]))
    out = tmp_path / "round-001" / "train"
    task = train_task(out, train_model_dir, [data], epochs=16, scheduler="constant")
    result = run_task(task)
    m = result.metrics
    assert result.status == "Succeeded" and m["examples"] == 8 and m["epochs"] == 16 and m["steps"] == 32
    assert m["trainLoss"] < 0.5 * m["initialLoss"], m
    assert m["tokensPerSecond"] > 0
    assert result.outputs == {"adapter": f"{out}/adapter/", "metrics": f"{out}/metrics.json",
                              "tensorboard": f"{out}/tensorboard/"}

    marker = json.loads((out / "_SUCCESS").read_text())
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.json",
            "result.json"} <= set(marker["files"])
    assert not any(name.startswith(checkpoint.CHECKPOINTS_DIR) for name in marker["files"])
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (16, 32, ["k_proj", "o_proj", "q_proj", "v_proj"])
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert [h["step"] for h in history] == list(range(1, 33))
    assert all({"loss", "lr", "tokens", "answerTokens", "batch", "epoch", "gradNorm", "seconds"} <= h.keys() for h in history)
    assert history[0]["loss"] == pytest.approx(m["initialLoss"], rel=1e-5)

    # TensorBoard's own reader finds the same curves next to the adapter (committed with it).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert any(n.startswith("tensorboard/events.out.tfevents.") for n in marker["files"])
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s"} <= tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 33))
    assert [e.value for e in loss] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/grad_norm")] == pytest.approx([h["gradNorm"] for h in history], rel=1e-6)
    assert all(e.value > 0 for e in acc.Scalars("train/tokens_per_s"))
    assert acc.Scalars("train/learning_rate")[0].value == pytest.approx(history[0]["lr"])
    assert metrics["data"]["formats"] == ["zeroShotCot", "zeroShotDirect"]
    # Only the newest checkpoint is kept.
    complete = [o for o in (out / checkpoint.CHECKPOINTS_DIR).rglob(checkpoint.COMPLETE_MARKER)]
    assert [p.parent.name for p in complete] == ["epoch-16"]

    # `from: previous` continues that adapter: it starts where the first run ended.
    again = train_task(tmp_path / "round-002" / "train", train_model_dir, [data], epochs=1,
                       adapter=result.outputs["adapter"], **{"from": "previous"})
    cont = run_task(again).metrics
    assert cont["initialLoss"] < 0.6 * m["initialLoss"], (cont, m)
    # `from: base` (the default) ignores it and starts a fresh adapter: the same first step.
    fresh = train_task(tmp_path / "round-002b" / "train", train_model_dir, [data], epochs=1,
                       adapter=result.outputs["adapter"])
    assert run_task(fresh).metrics["initialLoss"] == pytest.approx(m["initialLoss"], rel=1e-6)


def test_a_bad_training_line_fails_with_exit_2_naming_file_and_line(train_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "kept.jsonl"
    data.write_text(json.dumps(addition_rows([(1, 2)])[0]) + "\n" + '{"question": "q", "cot": "c"}\n')
    from selfimprove_workers.runtime import main

    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(train_task(tmp_path / "out", train_model_dir, [data]).wire()))
    term = tmp_path / "termination.log"
    monkeypatch.setenv("TERMINATION_LOG", str(term))
    assert main([str(task_file)]) == EXIT_BAD_INPUT
    summary = json.loads(term.read_text())
    assert summary["reason"] == "BadInput" and f"{data}:2" in summary["message"] and "answer" in summary["message"]


def test_a_killed_run_resumes_from_its_last_checkpoint(train_model_dir, tmp_path, monkeypatch):
    """Preempted after epoch 1 (the process exits hard), the re-run continues at step 7 with
    the same data order — and, its RNG restored, the same dropout — as an uninterrupted run."""
    pairs = [(a, b) for a in (1, 4, 7, 12) for b in (2, 5, 9)]
    data = write_jsonl(tmp_path / "kept.jsonl", addition_rows(pairs))
    settings = dict(epochs=3, lora={"r": 8, "alpha": 16, "dropout": 0.1, "targetModules": ["q_proj", "v_proj"]})

    reference = run_task(train_task(tmp_path / "a", train_model_dir, [data], **settings))
    ref_history = json.loads((tmp_path / "a" / "metrics.json").read_text())["history"]
    assert len(ref_history) == 18  # 12 rows × 2 formats / batch 4 = 6 steps per epoch

    out = tmp_path / "b"
    task = train_task(out, train_model_dir, [data], **settings)
    monkeypatch.setenv("SELFIMPROVE_TEST_EXIT_AFTER_EPOCH", "1")
    rc, _, err = run_worker(task.wire(), tmp_path)
    assert rc == 137, err
    assert not (out / "_SUCCESS").exists()
    latest = checkpoint.find_latest(checkpoint_storage(out), str(out), task.digest())
    assert latest is not None and latest.epoch == 1
    state = json.loads((out / checkpoint.CHECKPOINTS_DIR / "epoch-1" / "state.json").read_text())
    assert state["step"] == 6 and state["dataSeed"] == 42

    monkeypatch.delenv("SELFIMPROVE_TEST_EXIT_AFTER_EPOCH")
    rc, summary, err = run_worker(task.wire(), tmp_path)
    assert rc == 0, err
    assert "resuming after epoch 1 (step 6)" in err
    assert summary["metrics"]["resumedFromEpoch"] == 1 and summary["metrics"]["steps"] == 18
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 19))
    assert [h["batch"] for h in history] == [h["batch"] for h in ref_history]
    assert [h["lr"] for h in history] == pytest.approx([h["lr"] for h in ref_history])
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in ref_history], rel=1e-4)
    assert summary["metrics"]["trainLoss"] == pytest.approx(reference.metrics["trainLoss"], rel=1e-4)


@pytest.mark.slow
def test_sigterm_checkpoints_at_a_step_boundary_and_the_retry_resumes_from_that_step(train_model_dir, tmp_path):
    """SIGTERM (an eviction) mid-epoch: the stage finishes the optimizer step it is in, writes a
    step checkpoint and exits 143; the re-run skips the steps done and ends where an
    uninterrupted run does (same batches, learning rates, losses, adapter)."""
    import os
    import signal
    import subprocess
    import sys

    from model_fixtures import REPO
    from safetensors.torch import load_file
    from selfimprove_workers.constants import EXIT_TERMINATED

    pairs = [(a, b) for a in (1, 4, 7, 12) for b in (2, 5, 9)]
    data = write_jsonl(tmp_path / "kept.jsonl", addition_rows(pairs))
    settings = dict(epochs=2, lora={"r": 8, "alpha": 16, "dropout": 0.1, "targetModules": ["q_proj", "v_proj"]})
    run_task(train_task(tmp_path / "a", train_model_dir, [data], **settings))
    ref_history = json.loads((tmp_path / "a" / "metrics.json").read_text())["history"]
    assert len(ref_history) == 12  # 6 steps per epoch

    out = tmp_path / "b"
    task = train_task(out, train_model_dir, [data], **settings)
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(task.wire()))
    env = {**os.environ, "TERMINATION_LOG": str(tmp_path / "term.log"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "selfimprove_workers", str(task_file)], env=env, cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:  # wait on the progress line of step 1 (epoch 1), then stop it
        lines.append(line)
        if "step 1/12" in line:
            proc.send_signal(signal.SIGTERM)
            break
    lines.extend(proc.stderr)
    rc = proc.wait(timeout=300)
    err = "".join(lines)
    assert rc == EXIT_TERMINATED, err
    assert not (out / "_SUCCESS").exists()
    summary = json.loads((tmp_path / "term.log").read_text())
    assert summary["reason"] == "Terminated" and "stopped on SIGTERM after step" in summary["message"]
    latest = checkpoint.find_latest(checkpoint_storage(out), str(out), task.digest())
    assert latest is not None and latest.epoch == 0 and latest.step is not None
    stopped = latest.step
    assert 1 <= stopped < 12, err  # the step boundary after the signal: never the end of the run
    state = json.loads((out / checkpoint.CHECKPOINTS_DIR / f"epoch-0-step-{stopped}" / "state.json").read_text())
    assert state["step"] == state["epochStep"] == stopped and len(state["partial"]["records"]) == stopped

    rc, summary, err = run_worker(task.wire(), tmp_path)
    assert rc == 0, err
    assert f"resuming after epoch 0 (step {stopped})" in err
    assert summary is not None and summary["metrics"]["resumedFromStep"] == stopped
    assert summary["metrics"]["steps"] == 12
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 13))
    assert [h["batch"] for h in history] == [h["batch"] for h in ref_history]
    assert [h["lr"] for h in history] == pytest.approx([h["lr"] for h in ref_history])
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in ref_history], rel=1e-4)
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    want = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert np.allclose(got[k].numpy(), want[k].numpy(), rtol=1e-4, atol=1e-6), k
    # Only the newest checkpoint is kept: the step checkpoint is gone once epochs complete.
    assert not (out / checkpoint.CHECKPOINTS_DIR / f"epoch-0-step-{stopped}" / checkpoint.COMPLETE_MARKER).exists()


def checkpoint_storage(out: Path):
    from selfimprove_workers.storage import storage_for

    return storage_for(str(out))


def test_a_checkpoint_counts_only_once_complete_and_only_for_its_own_task(tmp_path):
    from selfimprove_workers.storage import storage_for

    out, storage = str(tmp_path / "out"), storage_for(str(tmp_path))
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "state.json").write_text("{}")
    assert checkpoint.find_latest(storage, out, "sha256:a") is None
    first = checkpoint.upload(storage, local, out, 1, "sha256:a")
    checkpoint.upload(storage, local, out, 3, "sha256:b")                   # another task's
    (tmp_path / "out" / checkpoint.CHECKPOINTS_DIR / "epoch-2").mkdir()     # died while writing
    (tmp_path / "out" / checkpoint.CHECKPOINTS_DIR / "epoch-2" / "state.json").write_text("{}")
    assert checkpoint.find_latest(storage, out, "sha256:a") == first
    checkpoint.delete(storage, first)
    assert checkpoint.find_latest(storage, out, "sha256:a") is None
    assert not [p for p in (tmp_path / "out" / checkpoint.CHECKPOINTS_DIR / "epoch-1").rglob("*") if p.is_file()]


@pytest.mark.s3
def test_training_reads_and_writes_s3(train_model_dir, tmp_path, s3_bucket, s3_server):
    """Data on S3, adapter and checkpoints to S3, and a later run finds the checkpoint there."""
    from selfimprove_workers.storage import is_complete, storage_for

    data = write_jsonl(tmp_path / "kept.jsonl", addition_rows([(1, 2), (3, 4)]))
    s3 = storage_for(s3_bucket, endpoint=s3_server.endpoint)
    s3.upload_file(data, f"{s3_bucket}/round-001/filter/kept.jsonl")
    task = train_task("OUT", train_model_dir, [Path("IN")], epochs=1)
    task = task.model_copy(update={
        "output": f"{s3_bucket}/round-001/train",
        "storage": task.storage.model_copy(update={"endpoint": s3_server.endpoint}),
        "inputs": task.inputs.model_copy(update={"train": [f"{s3_bucket}/round-001/filter/kept.jsonl"]}),
    })
    result = run_task(task)
    assert result.outputs["adapter"] == f"{s3_bucket}/round-001/train/adapter/"
    assert is_complete(s3, task.output, verify_checksums=True)
    assert s3.exists(f"{s3_bucket}/round-001/train/adapter/adapter_model.safetensors")
    latest = checkpoint.find_latest(s3, task.output, task.digest())
    assert latest is not None and latest.epoch == 1


@pytest.mark.slow
def test_data_parallel_processes_train_like_one_process_with_the_global_batch(train_model_dir, tmp_path, monkeypatch):
    """Two processes with batch 2 (gloo on CPU, launched through `accelerate launch`) take the
    same steps as one process with batch 4: the loss is normalized by the global answer tokens."""
    pairs = [(a, b) for a in (1, 4, 7) for b in (2, 5, 9)]
    data = write_jsonl(tmp_path / "kept.jsonl", addition_rows(pairs))
    single = run_task(train_task(tmp_path / "one", train_model_dir, [data], batchSize=4, epochs=1))
    monkeypatch.setenv("SELFIMPROVE_TRAIN_PROCESSES", "2")
    double = run_task(train_task(tmp_path / "two", train_model_dir, [data], batchSize=2, epochs=1))
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["worldSize"] == 2 and double.metrics["steps"] == single.metrics["steps"] == 5
    assert [h["batch"] for h in two["history"]] == [h["batch"] for h in one["history"]]
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in one["history"]], rel=1e-4)


@pytest.mark.slow
def test_two_nodes_rendezvous_over_c10d_and_train_like_one_process(train_model_dir, tmp_path):
    """Two torchrun launches on 127.0.0.1, as two pods of an Indexed Job run them (c10d
    rendezvous hosted by node 0, gloo, one process each, batch 2) take the same steps with the
    same losses as one process with batch 4; only global rank 0 writes the outputs."""
    import socket
    import subprocess

    from model_fixtures import REPO
    from selfimprove_workers.stages.train import torchrun_command
    from selfimprove_workers.training.data import encode_examples
    from selfimprove_workers.training.loop import TrainJob
    from transformers import AutoTokenizer

    pairs = [(a, b) for a in (1, 4, 7) for b in (2, 5, 9)]
    data = write_jsonl(tmp_path / "kept.jsonl", addition_rows(pairs))
    task = train_task(tmp_path / "two", train_model_dir, [data], batchSize=2, epochs=1)
    ref_task = train_task(tmp_path / "one", train_model_dir, [data], batchSize=4, epochs=1)
    tok = AutoTokenizer.from_pretrained(str(train_model_dir))
    rows = [TrainingRow(str(i), f"What is {a} plus {b}?", f"{a} + {b} = {a + b}.", str(a + b))
            for i, (a, b) in enumerate(pairs)]
    assert task.training is not None
    examples = encode_examples(rows, resolve_formats(task.training.formats, False), task.prompting, tok,
                               task.training.max_length, [])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1, None):  # two nodes, then the reference: one process, batch 4
        job_dir = tmp_path / f"node-{rank}"
        job_dir.mkdir()
        TrainJob(task=(task if rank is not None else ref_task).wire(), model_dir=str(train_model_dir), init_adapter=None, resume_dir=None,
                 out_dir=str(job_dir / "out"), work_dir=str(job_dir / "scratch"), pad_id=int(tok.pad_token_id)
                 ).save(job_dir / "job.json")
        examples.save(job_dir / "examples.npz")
        if rank is None:
            errs = [p.communicate(timeout=300)[1] for p in procs]
            assert [p.returncode for p in procs] == [0, 0], errs
            ref = subprocess.run(torchrun_command(job_dir, 1), cwd=REPO, capture_output=True, text=True, timeout=300)
            assert ref.returncode == 0, ref.stderr
        else:
            cmd = torchrun_command(job_dir, 1, nodes=2, node_rank=rank, endpoint=f"127.0.0.1:{port}",
                                   rdzv_id="train-x")
            procs.append(subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True))
    one = json.loads((tmp_path / "node-None" / "out" / "metrics.json").read_text())
    two = json.loads((tmp_path / "node-0" / "out" / "metrics.json").read_text())
    assert not (tmp_path / "node-1" / "out" / "metrics.json").exists()  # not global rank 0
    assert two["worldSize"] == 2 and one["worldSize"] == 1 and two["steps"] == one["steps"] == 5
    assert [h["batch"] for h in two["history"]] == [h["batch"] for h in one["history"]]
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in one["history"]], rel=1e-4)


def _node_executor(tmp_path: Path):
    """A local executor (`selfimprove run`'s) over a throwaway run; the tests hand it one train
    attempt at a time, as its planner would."""
    from selfimprove_operator.local import LocalExecutor, local_run
    from selfimprove_operator.manifest import runs_from_text

    manifest = ("apiVersion: selfimprove.dev/v1alpha1\nkind: SelfImproveRun\nmetadata: {name: nodes}\n"
                "spec: {strategy: lmsi, model: {base: /m}, storage: {uri: s3://x/},\n"
                "       data: {questions: /q.jsonl, evaluation: /e.jsonl}}\n")
    run = local_run(runs_from_text(manifest, "run.yaml")[0], str(tmp_path / "runs"))
    return LocalExecutor(run, workdir=tmp_path / "work", poll_seconds=0.1)


def _run_attempt(ex, task, attempt: int, timeout: float = 600):
    """Start one attempt of `task` on the local executor; wait for its observation."""
    import time

    from selfimprove_operator.planner import StartStage

    ex._start(StartStage(task.round, "train", attempt, f"nodes-r1-train-a{attempt}", task))
    deadline = time.monotonic() + timeout
    while ex.running and time.monotonic() < deadline:
        ex._collect()
        time.sleep(0.1)
    assert not ex.running, "the attempt did not finish in time"
    return ex.observed[(task.round, "train")]


def _nodes_task(out: Path, model: Path, data: Path, nodes: int, **training):
    from selfimprove_workers.contract import StageTask

    return StageTask.model_validate({**train_task(out, model, [data], **training).wire(), "nodes": nodes})


def _node_logs(ex, attempt: int) -> str:
    return "".join(p.read_text() for p in sorted((ex.workdir).glob(f"nodes-r1-train-a{attempt}.node-*.log")))


@pytest.mark.slow
def test_a_two_node_train_stage_on_the_local_executor_trains_like_one_node_and_commits_once(train_model_dir, tmp_path):
    """`nodes: 2` on the local executor: two stage processes (JOB_COMPLETION_INDEX 0 and 1, a c10d
    rendezvous on 127.0.0.1), one process each with batch 2, take the steps of one process with
    batch 4, with the same losses; global rank 0's node commits and both report its summary."""
    pairs = [(a, b) for a in (1, 4, 7) for b in (2, 5, 9)]
    data = write_jsonl(tmp_path / "kept.jsonl", addition_rows(pairs))
    single = run_task(train_task(tmp_path / "one", train_model_dir, [data], batchSize=4, epochs=1))
    ex = _node_executor(tmp_path)
    task = _nodes_task(tmp_path / "two", train_model_dir, data, 2, batchSize=2, epochs=1)
    obs = _run_attempt(ex, task, 1)
    assert obs.state == "succeeded", (obs.message, _node_logs(ex, 1))
    assert obs.result is not None and obs.result.metrics["steps"] == single.metrics["steps"] == 5
    assert obs.result.metrics["trainLoss"] == pytest.approx(single.metrics["trainLoss"], rel=1e-4)
    summaries = [json.loads(p.read_text()) for p in sorted(ex.workdir.glob("nodes-r1-train-a1.node-*.result.json"))]
    assert len(summaries) == 2 and summaries[0] == summaries[1]   # the follower reports the leader's
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["worldSize"] == 2 and one["worldSize"] == 1
    assert [h["batch"] for h in two["history"]] == [h["batch"] for h in one["history"]]
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in one["history"]], rel=1e-4)
    marker = json.loads((tmp_path / "two" / "_SUCCESS").read_text())
    assert marker["task"] == task.digest()
    assert "global rank 0's node commits the outputs" in _node_logs(ex, 1)


@pytest.mark.slow
def test_a_killed_two_node_attempt_resumes_from_its_checkpoint_on_two_nodes(train_model_dir, tmp_path, monkeypatch):
    """Both nodes of attempt 1 die hard after epoch 1's checkpoint (the preemption stand-in,
    SELFIMPROVE_TEST_EXIT_AFTER_EPOCH); the checkpoint holds both ranks' RNG states, and attempt 2
    (a new rendezvous id) resumes from it and ends with the losses and adapter of an uninterrupted
    two-node run — dropout on, so each rank's restored RNG stream matters."""
    from safetensors.torch import load_file

    pairs = [(a, b) for a in (1, 4, 7) for b in (2, 5, 9)]
    data = write_jsonl(tmp_path / "kept.jsonl", addition_rows(pairs))
    settings = dict(batchSize=2, epochs=2, lora={"r": 8, "alpha": 16, "dropout": 0.1, "targetModules": ["q_proj", "v_proj"]})
    ex = _node_executor(tmp_path)
    ref = _run_attempt(ex, _nodes_task(tmp_path / "ref", train_model_dir, data, 2, **settings), 1)
    assert ref.state == "succeeded", (ref.message, _node_logs(ex, 1))

    task = _nodes_task(tmp_path / "two", train_model_dir, data, 2, **settings)
    monkeypatch.setenv("SELFIMPROVE_TEST_EXIT_AFTER_EPOCH", "1")
    failed = _run_attempt(ex, task, 2)
    assert failed.state == "failed" and failed.message and failed.message.startswith("node "), failed.message
    assert not (tmp_path / "two" / "_SUCCESS").exists()
    ckpt_dir = tmp_path / "two" / checkpoint.CHECKPOINTS_DIR / "epoch-1"
    assert (ckpt_dir / checkpoint.COMPLETE_MARKER).exists()
    assert (ckpt_dir / "rng-0.pt").exists() and (ckpt_dir / "rng-1.pt").exists()   # every rank's

    monkeypatch.delenv("SELFIMPROVE_TEST_EXIT_AFTER_EPOCH")
    done = _run_attempt(ex, task, 3)
    assert done.state == "succeeded", (done.message, _node_logs(ex, 3))
    assert done.result is not None and done.result.metrics["resumedFromEpoch"] == 1
    assert "resuming after epoch 1 (step 5)" in _node_logs(ex, 3)
    want = json.loads((tmp_path / "ref" / "metrics.json").read_text())["history"]
    got = json.loads((tmp_path / "two" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in got] == list(range(1, 11))
    assert [h["batch"] for h in got] == [h["batch"] for h in want]
    assert [h["loss"] for h in got] == pytest.approx([h["loss"] for h in want], rel=1e-4)
    a = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in b:
        assert np.allclose(a[k].numpy(), b[k].numpy(), rtol=1e-4, atol=1e-6), k


def _start_nodes(task, tmp_path: Path, rdzv_id: str) -> list:
    """The stage on two nodes as two pods run it: `python -m selfimprove_workers TASK`, each
    with its completion index and the attempt's rendezvous."""
    import os
    import socket
    import subprocess
    import sys

    from model_fixtures import REPO

    task_file = tmp_path / f"{rdzv_id}.json"
    task_file.write_text(json.dumps(task.wire()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for k in (0, 1):
        # Every step's progress line (not one per interval): the test stops a node at step 2.
        env = {**os.environ, "TERMINATION_LOG": str(tmp_path / f"{rdzv_id}.node-{k}.term"), "HF_HUB_OFFLINE": "1",
               "SELFIMPROVE_PROGRESS_LOG_SECONDS": "0",
               "JOB_COMPLETION_INDEX": str(k), "SELFIMPROVE_RDZV_ENDPOINT": f"127.0.0.1:{port}",
               "SELFIMPROVE_RDZV_ID": rdzv_id}
        procs.append(subprocess.Popen([sys.executable, "-m", "selfimprove_workers", str(task_file)], env=env, cwd=REPO,
                                      stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.slow
def test_sigterm_to_one_node_stops_both_at_one_step_and_the_retry_resumes_from_it(train_model_dir, tmp_path):
    """A preemption of one pod: SIGTERM to node 1's stage only. Both nodes stop after the same
    optimizer step (the stop flag is summed across all ranks), write one step checkpoint with
    both ranks' RNG, and exit 143; the retry (a new rendezvous id) resumes from that step and
    ends with the losses of one process with the same global batch."""
    import signal
    import threading

    from selfimprove_workers.constants import EXIT_TERMINATED

    pairs = [(a, b) for a in (1, 4, 7) for b in (2, 5, 9)]
    data = write_jsonl(tmp_path / "kept.jsonl", addition_rows(pairs))
    run_task(train_task(tmp_path / "one", train_model_dir, [data], batchSize=4, epochs=2))
    want = json.loads((tmp_path / "one" / "metrics.json").read_text())["history"]
    assert len(want) == 10
    task = _nodes_task(tmp_path / "two", train_model_dir, data, 2, batchSize=2, epochs=2)

    procs = _start_nodes(task, tmp_path, "two-r1-train")
    logs: list[list[str]] = [[], []]
    seen = threading.Event()

    def pump(k: int) -> None:
        for line in procs[k].stderr:
            logs[k].append(line)
            if "step 2/10" in line:
                seen.set()
        seen.set()   # ended without it: the asserts below say why

    pumps = [threading.Thread(target=pump, args=(k,), daemon=True) for k in (0, 1)]
    for t in pumps:
        t.start()
    assert seen.wait(300), "".join(logs[0] + logs[1])
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=300) for p in procs]
    for t in pumps:
        t.join(timeout=10)
    assert codes == [EXIT_TERMINATED, EXIT_TERMINATED], "".join(logs[0] + logs[1])
    summaries = [json.loads((tmp_path / f"two-r1-train.node-{k}.term").read_text()) for k in (0, 1)]
    assert all(s["reason"] == "Terminated" for s in summaries)
    latest = checkpoint.find_latest(checkpoint_storage(tmp_path / "two"), str(tmp_path / "two"), task.digest())
    assert latest is not None and latest.step is not None and 2 <= latest.step < 10
    # Both nodes stopped after that one step: the checkpoint is the agreed one, with both ranks' RNG.
    assert all(f"after step {latest.step}/10" in s["message"] for s in summaries), summaries
    ckpt_dir = tmp_path / "two" / checkpoint.CHECKPOINTS_DIR / f"epoch-{latest.epoch}-step-{latest.step}"
    assert (ckpt_dir / "rng-0.pt").exists() and (ckpt_dir / "rng-1.pt").exists()

    procs = _start_nodes(task, tmp_path, "two-r1-train-a2")
    outs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "".join(outs)
    summaries = [json.loads((tmp_path / f"two-r1-train-a2.node-{k}.term").read_text()) for k in (0, 1)]
    assert summaries[0] == summaries[1] and summaries[0]["metrics"]["resumedFromStep"] == latest.step
    got = json.loads((tmp_path / "two" / "metrics.json").read_text())["history"]
    assert [h["batch"] for h in got] == [h["batch"] for h in want]
    assert [h["loss"] for h in got] == pytest.approx([h["loss"] for h in want], rel=1e-4)


# --------------------------------------------------------------------------- serving the adapter
@pytest.mark.slow
@pytest.mark.vllm
def test_the_trained_adapter_generates_the_same_in_vllm_peft_and_merged(train_model_dir, tmp_path):
    """The adapter directory the stage commits, served by vLLM (LoRARequest) and by the
    transformers engine (peft), decodes exactly like the merged model (`merge_and_unload`)."""
    require_vllm()
    import torch
    from peft import PeftModel
    from selfimprove_workers.engines import load_engine, open_model
    from selfimprove_workers.engines.base import GenerationParams, encode_prompt
    from selfimprove_workers.spec import EngineSpec
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pairs = [(1, 2), (3, 4), (5, 6), (2, 7)]
    data = write_jsonl(tmp_path / "kept.jsonl", addition_rows(pairs))
    out = tmp_path / "train"
    run_task(train_task(out, train_model_dir, [data], epochs=40, batchSize=4, scheduler="constant",
                        formats=["zeroShotDirect"]))
    adapter = str(out / "adapter")
    tok = AutoTokenizer.from_pretrained(str(train_model_dir))
    prompts = [render_prompt(TaskSpec(), f"What is {a} plus {b}?", "zeroShotDirect", tok) for a, b in pairs]
    prompts.append(render_prompt(TaskSpec(), "What is 8 plus 1?", "zeroShotDirect", tok))  # unseen
    greedy = GenerationParams(n=1, temperature=0.0, max_tokens=24)

    base = AutoModelForCausalLM.from_pretrained(str(train_model_dir), dtype=torch.float32).eval()
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    merged_out = []
    for p in prompts:
        ids = torch.tensor([encode_prompt(tok, p)])
        with torch.no_grad():
            gen = merged.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        merged_out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))

    served = {}
    for kind in ("transformers", "vllm"):
        engine = load_engine(EngineSpec(kind=kind), train_model_dir, gpus=0, seed=0, enable_lora=True)
        try:
            with_adapter = engine.generate(prompts, greedy, adapter=adapter)
            without = engine.generate(prompts, greedy)
        finally:
            engine.close()
        served[kind] = [o.completions[0].text for o in with_adapter]
        served[kind + " base"] = [o.completions[0].text for o in without]

    # engine.mergeAdapter: the stages serve a merged copy instead of LoRA, with the same output.
    engine, left = open_model(EngineSpec(kind="vllm", mergeAdapter=True), train_model_dir, adapter, gpus=0, seed=0,
                              workdir=tmp_path / "stage-work")
    try:
        assert left is None and not engine.lora_enabled
        served["vllm merged"] = [o.completions[0].text for o in engine.generate(prompts, greedy)]
    finally:
        engine.close()
    assert (tmp_path / "stage-work" / "merged-model" / "config.json").exists()

    assert served["transformers"] == served["vllm"] == served["vllm merged"] == merged_out
    # It learned its targets' form (a tiny random model does not learn the sums themselves)…
    assert all(o.startswith(" The answer is ") for o in merged_out), merged_out
    assert served["vllm base"] != served["vllm"]  # …and it is the adapter that makes the difference
