"""The LoRA training loop: peft adapter on a frozen base model, data parallel through accelerate.

Runs in every process of the Job (one on CPU or one GPU; one per GPU under `accelerate launch`).
It imports torch at module level: import it only where training runs.

Why a hand-written loop rather than `transformers.Trainer`:
- the loss is computed on the answer tokens only, and the LM head is applied only to the
  positions that carry a label. Few-shot prompts are long and answers short, and the head is
  the widest matmul of a model (a 128k vocabulary on Llama 3), so skipping it on prompt
  positions saves compute and the largest activation of the step (bench/bench_train.py);
- the loss of an optimizer step is the mean over all its answer tokens, across gradient
  accumulation and across processes, rather than a mean of per-batch means that over-weights
  short answers;
- batches come from a plan that is a pure function of (seed, epoch) (`data.plan_epoch`), so a
  run resumed from an epoch checkpoint continues the exact data order;
- checkpoints go to object storage with a completion marker (`checkpoint`), not to local disk;
- a SIGTERM (what Kubernetes sends before an eviction or preemption, `terminationGracePeriodSeconds`
  ahead of the SIGKILL) is noted, not obeyed at once: at the next optimizer-step boundary every
  process agrees on it (a stop flag summed across processes each step, so all ranks stop after the
  same step even when the signal reached them at different times), a step checkpoint is written
  and the stage exits 143 (`Terminated`); the retry resumes from that step, not the epoch's start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import log as slog
from ..constants import EXIT_KILLED, LORA_ATTENTION_MODULES
from ..contract import StageTask
from ..errors import BadInput, Terminated
from ..spec import LoraSpec
from ..storage import join_uri
from . import checkpoint as ckpt
from .data import IGNORE_INDEX, EncodedExamples, batch_digest, plan_epoch

__all__ = ["TrainJob", "AnswerLoss", "build_model", "train", "EXIT_AFTER_EPOCH_ENV",
           "DEFAULT_TARGET_MODULES", "DEFAULT_R", "DEFAULT_ALPHA", "final_loss"]

# Test hook (documented in tests/e2e/test_train.py): exit the process hard, as a preemption would,
# right after the checkpoint of this epoch (1-based) is complete in storage.
EXIT_AFTER_EPOCH_ENV = "SELFIMPROVE_TEST_EXIT_AFTER_EPOCH"

# Used only when a task arrives without the preset's values filled in (LMSI's preset).
DEFAULT_TARGET_MODULES = list(LORA_ATTENTION_MODULES)
DEFAULT_R, DEFAULT_ALPHA, DEFAULT_LR = 16, 32, 2e-4

log = logging.getLogger("selfimprove.train")


@dataclass
class TrainJob:
    """Everything a training process needs, JSON-serializable so that `accelerate launch` can
    hand it to worker processes (`stages/train_worker.py`)."""

    task: dict[str, Any]            # the StageTask, wire form
    model_dir: str                  # local base model
    init_adapter: str | None        # local adapter to continue (`training.from: previous`)
    resume_dir: str | None          # local copy of the checkpoint to resume from
    out_dir: str                    # the main process writes adapter/, metrics.json, outcome.json
    work_dir: str                   # scratch space shared by the processes (checkpoints)
    pad_id: int

    def stage_task(self) -> StageTask:
        return StageTask.model_validate(self.task)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> "TrainJob":
        return cls(**json.loads(path.read_text()))


# --------------------------------------------------------------------------- model
def _hidden_head_ok(model: Any) -> bool:
    """Whether logits are exactly `lm_head(decoder(x))`, so the head can be applied to selected
    positions only. Models that transform their logits (Gemma 2's soft-capping, Cohere's
    logit scale) take the generic path."""
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return False
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return decoder is not None and decoder is not model and isinstance(head, nn.Linear)


class AnswerLoss(nn.Module):
    """Wraps the peft model; `forward` returns the *summed* cross-entropy of the answer tokens.

    Label t is predicted from position t-1. Only positions whose next token is an answer token
    go through the LM head; the sum (not mean) lets the loop normalize by the answer tokens of
    the whole optimizer step. Being one module, it is what accelerate wraps for data
    parallelism (DDP needs the forward pass to go through its wrapper).
    """

    def __init__(self, peft_model: Any):
        super().__init__()
        self.peft: Any = peft_model
        self.fast_head = _hidden_head_ok(peft_model.get_base_model())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        base = self.peft.get_base_model()
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if self.fast_head:
            hidden = base.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            logits = base.get_output_embeddings()(hidden[:, :-1][keep])
        else:
            logits = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][keep]
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def lora_settings(lora: LoraSpec) -> dict[str, Any]:
    return {
        "r": lora.r or DEFAULT_R,
        "lora_alpha": lora.alpha or DEFAULT_ALPHA,
        "lora_dropout": lora.dropout,
        "target_modules": list(lora.target_modules or DEFAULT_TARGET_MODULES),
    }


def build_model(
    model_dir: str,
    lora: LoraSpec,
    *,
    adapter: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    gradient_checkpointing: bool = False,
    seed: int = 0,
) -> nn.Module:
    """The base model (frozen) with a trainable LoRA adapter: a fresh one from `lora`, or the
    peft adapter in `adapter` (its own shape) loaded trainable."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    device_map = {"": str(device)} if device is not None and device.type == "cuda" else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device_map)
    model.config.use_cache = False
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no `enable_input_require_grads` trick for frozen
        # embeddings and works under DDP.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)  # LoRA A's initialization
    if adapter:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    try:
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", bias="none", **lora_settings(lora)))
    except ValueError as exc:  # e.g. target modules absent from this architecture
        raise BadInput(f"training.lora: {exc}") from None


def _optimizer(model: nn.Module, lr: float, weight_decay: float, fused: bool) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},  # biases, norms
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


def _rank_part(batch: np.ndarray, world: int, rank: int) -> tuple[np.ndarray, float]:
    """This process's share of a global batch (contiguous: the batch is length-sorted, so every
    share pads to a similar width). A share left empty by a short last batch runs one example
    with weight 0: DDP needs every process to take part in every backward pass."""
    if world == 1:
        return batch, 1.0
    part = np.array_split(batch, world)[rank]
    return (part, 1.0) if len(part) else (batch[:1], 0.0)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def final_loss(losses: list[float]) -> float:
    """The run's training loss: the mean of the last 10% of steps (1 to 10 steps), which is
    less noisy than the very last step alone."""
    k = max(1, min(10, math.ceil(len(losses) / 10)))
    tail = losses[-k:]
    return sum(tail) / len(tail)


# --------------------------------------------------------------------------- the loop
def train(job: TrainJob, examples: EncodedExamples) -> dict[str, Any] | None:
    """Train and save the adapter; the main process returns `{"metrics", "details"}` (also in
    `out_dir/outcome.json`), the others None."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    from ..storage import storage_for

    task = job.stage_task()
    spec = task.training
    assert spec is not None
    cuda = torch.cuda.is_available()
    acc = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    storage = storage_for(task.output, endpoint=task.storage.endpoint, region=task.storage.region)
    digest = task.digest()
    stop = _SigtermFlag()

    state: dict[str, Any] = {}
    if job.resume_dir:
        state = json.loads((Path(job.resume_dir) / ckpt.STATE_FILE).read_text())
        if state.get("worldSize") != world:
            log.warning(f"checkpoint was written by {state.get('worldSize')} processes, this run has "
                        f"{world}: the data order differs, starting over")
            state = {}
    resume = Path(job.resume_dir) if state and job.resume_dir else None

    n = len(examples)
    global_batch = spec.batch_size * world
    accum = spec.gradient_accumulation_steps
    batches_per_epoch = math.ceil(n / global_batch)
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = steps_per_epoch * spec.epochs
    warmup = math.ceil(spec.warmup_ratio * total_steps)

    adapter = str(resume / "adapter") if resume else job.init_adapter
    model = build_model(
        job.model_dir, spec.lora, adapter=adapter, dtype=torch.bfloat16 if cuda else torch.float32,
        device=acc.device, gradient_checkpointing=spec.gradient_checkpointing, seed=spec.seed,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    module = AnswerLoss(model)
    optimizer = _optimizer(model, spec.learning_rate or DEFAULT_LR, spec.weight_decay, fused=cuda)
    scheduler = get_scheduler(spec.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    wrapped = acc.prepare(module)
    wrapped.train()
    params = [p for p in wrapped.parameters() if p.requires_grad]

    if resume:
        # Accelerate names a CPU process's device `cpu:<local rank>` under torchrun, which
        # torch.load cannot map to: plain "cpu" on CPU.
        where = acc.device if acc.device.type != "cpu" else torch.device("cpu")
        optimizer.load_state_dict(torch.load(resume / "optimizer.pt", map_location=where, weights_only=True))
        scheduler.load_state_dict(torch.load(resume / "scheduler.pt", weights_only=True))
        rng_file = resume / f"rng-{rank}.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        if main:
            log.info(f"resuming after epoch {state['epoch']} (step {state['step']}) from the checkpoint"
                     + (f", {state['epochStep']} steps into epoch {state['epoch'] + 1}" if state.get("epochStep") else ""))
    else:
        torch.manual_seed(spec.seed + rank)  # a different dropout stream per process

    start_epoch = int(state.get("epoch", 0))
    step = int(state.get("step", 0))
    state_step0 = step
    history: list[dict[str, Any]] = list(state.get("history", []))
    epochs_log: list[dict[str, Any]] = list(state.get("epochs", []))
    train_seconds = float(state.get("trainSeconds", 0.0))
    tokens_seen = int(state.get("tokens", 0))
    # Resuming from a step checkpoint: the unfinished epoch's first steps are done, and their
    # records (loss, grad norm, …) are carried into that epoch's history.
    resumed_step = state.get("epochStep")
    skip_steps = int(resumed_step or 0)
    carried: dict[str, Any] = dict(state.get("partial") or {"records": [], "tokens": 0, "seconds": 0.0})
    last_ckpt = (ckpt.Checkpoint(start_epoch, ckpt.checkpoint_uri(task.output, start_epoch, step if resumed_step else None),
                                 step if resumed_step else None) if resume else None)
    pad_multiple = 8 if cuda else 1  # tensor-core friendly widths
    log_every = max(1, total_steps // 20)
    lengths, answer_lengths = examples.lengths, examples.answer_lengths
    if main:
        log.info(
            f"training {trainable:,} of {total_params:,} parameters on {n} sequences: {spec.epochs} epochs × "
            f"{steps_per_epoch} steps, batch {spec.batch_size} × {world} processes × {accum} accumulation"
        )

    assert spec.epochs is not None  # the preset fills it
    for epoch in range(start_epoch, spec.epochs):
        batches = plan_epoch(lengths, global_batch, spec.seed, epoch, spec.group_by_length)
        t0 = time.perf_counter()
        losses: list[torch.Tensor] = []
        norms: list[torch.Tensor] = []
        records: list[dict[str, Any]] = []
        epoch_tokens = 0
        step_start = t0
        if epoch != start_epoch:
            skip_steps, carried = 0, {"records": [], "tokens": 0, "seconds": 0.0}
        for first in range(skip_steps * accum, len(batches), accum):
            group = batches[first:first + accum]
            answer_tokens = int(sum(int(answer_lengths[b].sum()) for b in group))
            step_tokens = int(sum(int(lengths[b].sum()) for b in group))
            # Every process scales by the global answer-token count of the step, which it knows
            # from the plan; DDP then averages over `world`, hence the factor.
            scale = world / answer_tokens
            total = torch.zeros((), device=acc.device)
            for j, global_batch_idx in enumerate(group):
                part, weight = _rank_part(global_batch_idx, world, rank)
                host = examples.collate(part, job.pad_id, pad_multiple)
                # Pinned host memory makes the copy asynchronous: the GPU never waits on it.
                batch = {k: (torch.from_numpy(v).pin_memory() if cuda else torch.from_numpy(v))
                         .to(acc.device, non_blocking=True) for k, v in host.items()}
                sync = j == len(group) - 1
                with contextlib.nullcontext() if sync else acc.no_sync(wrapped):
                    loss_sum = wrapped(**batch)
                    acc.backward(loss_sum * (weight * scale))
                total += loss_sum.detach() * weight
            lr = scheduler.get_last_lr()[0]
            norms.append(acc.clip_grad_norm_(params, spec.max_grad_norm).detach().float())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch_tokens += step_tokens
            losses.append(total / answer_tokens)
            # Wall time between optimizer steps (on a GPU, queued kernels make one step's time
            # noisy; their sum is the epoch's): TensorBoard's tokens/s per step.
            now = time.perf_counter()
            records.append({"step": step, "epoch": epoch + 1, "lr": lr, "tokens": step_tokens,
                            "answerTokens": answer_tokens, "batch": batch_digest(group),
                            "seconds": round(now - step_start, 6)})
            step_start = now
            if step % log_every == 0 or step == total_steps:
                # Collective on every process at the same steps (the condition is global).
                shown = acc.reduce(losses[-1].clone(), reduction="sum").item()
                if main:
                    slog.progress(log, step, total_steps, "steps",
                                  f"step {step}/{total_steps} epoch {epoch + 1} loss {shown:.4f} lr {lr:.2e}")
            if stop.agreed(acc, world) and step < total_steps:
                done = skip_steps + len(records)
                part_losses = acc.reduce(torch.stack(losses), reduction="sum").cpu().tolist()
                part_norms = torch.stack(norms).cpu().tolist()
                for rec, loss, norm in zip(records, part_losses, part_norms):
                    rec["loss"], rec["gradNorm"] = loss, norm
                partial = {"records": carried["records"] + records, "tokens": carried["tokens"] + epoch_tokens,
                           "seconds": carried["seconds"] + time.perf_counter() - t0}
                state = {"task": digest, "epoch": epoch, "step": step, "epochStep": done, "dataSeed": spec.seed,
                         "worldSize": world, "history": history, "epochs": epochs_log,
                         "trainSeconds": train_seconds, "tokens": tokens_seen, "partial": partial}
                _checkpoint(acc, wrapped, optimizer, scheduler, state, Path(job.work_dir),
                            storage, task.output, digest, last_ckpt, step=step)
                raise Terminated(f"stopped on SIGTERM after step {step}/{total_steps} (epoch {epoch + 1}, "
                                 f"{done} of {steps_per_epoch} steps): the checkpoint of step {step} is saved")
        # One synchronization per epoch for the per-step numbers, not one per step.
        step_losses = acc.reduce(torch.stack(losses), reduction="sum").cpu().tolist() if losses else []
        step_norms = torch.stack(norms).cpu().tolist() if norms else []
        seconds = time.perf_counter() - t0 + carried["seconds"]
        for rec, loss, norm in zip(records, step_losses, step_norms):
            rec["loss"] = loss
            rec["gradNorm"] = norm
        records = carried["records"] + records
        step_losses = [r["loss"] for r in records]
        epoch_tokens += carried["tokens"]
        history.extend(records)
        train_seconds += seconds
        tokens_seen += epoch_tokens
        epochs_log.append({"epoch": epoch + 1, "loss": sum(step_losses) / len(step_losses),
                           "seconds": round(seconds, 3), "tokens": epoch_tokens,
                           "tokensPerSecond": epoch_tokens / seconds if seconds > 0 else None})
        if main:
            log.info(f"epoch {epoch + 1}/{spec.epochs}: loss {epochs_log[-1]['loss']:.4f}, "
                     f"{epoch_tokens / max(seconds, 1e-9):,.0f} tokens/s")
        state = {"task": digest, "epoch": epoch + 1, "step": step, "dataSeed": spec.seed,
                 "worldSize": world, "history": history, "epochs": epochs_log,
                 "trainSeconds": train_seconds, "tokens": tokens_seen}
        last_ckpt = _checkpoint(acc, wrapped, optimizer, scheduler, state, Path(job.work_dir),
                                storage, task.output, digest, last_ckpt)
        if os.environ.get(EXIT_AFTER_EPOCH_ENV) == str(epoch + 1):
            logging.shutdown()
            os._exit(EXIT_KILLED)

    if not main:
        acc.wait_for_everyone()
        return None
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc.unwrap_model(wrapped).peft.save_pretrained(out / "adapter", safe_serialization=True)
    lora = acc.unwrap_model(wrapped).peft.peft_config["default"]
    step_losses_all = [h["loss"] for h in history]
    metrics = {
        "trainLoss": round(final_loss(step_losses_all), 6),
        "initialLoss": round(step_losses_all[0], 6),
        "steps": step,
        "examples": n,
        "epochs": spec.epochs,
        "tokensPerSecond": round(tokens_seen / train_seconds, 2) if train_seconds > 0 else 0.0,
    }
    if start_epoch:
        metrics["resumedFromEpoch"] = start_epoch
    if resumed_step:
        metrics["resumedFromStep"] = int(state_step0)
    details = {
        "data": examples.stats,
        "lora": {"r": lora.r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout,
                 "targetModules": sorted(lora.target_modules)},
        "trainableParameters": trainable,
        "parameters": total_params,
        "worldSize": world,
        "stepsPerEpoch": steps_per_epoch,
        "warmupSteps": warmup,
        "trainSeconds": round(train_seconds, 3),
        "tokens": tokens_seen,
        "perEpoch": epochs_log,
        "device": str(acc.device),
        "precision": "bf16" if cuda else "fp32",
    }
    (out / "metrics.json").write_text(json.dumps({**metrics, **details, "history": history}, indent=1) + "\n")
    outcome = {"metrics": metrics, "details": details}
    (out / "outcome.json").write_text(json.dumps(outcome))
    acc.wait_for_everyone()
    return outcome


class _SigtermFlag:
    """Notes a SIGTERM instead of dying of it; the loop stops at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        # Signal handlers can only be set from the main thread (an embedded run is left alone).
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        if not self.requested:
            log.warning("SIGTERM: stopping after this optimizer step, with a checkpoint")
        self.requested = True

    def agreed(self, acc: Any, world: int) -> bool:
        """Whether any process was asked to stop: a collective on every process at every step,
        so all of them stop after the same step and the checkpoint is consistent."""
        if world == 1:
            return self.requested
        flag = torch.tensor(1.0 if self.requested else 0.0, device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)


def _checkpoint(acc, wrapped, optimizer, scheduler, state, work_dir: Path, storage, output: str,
                digest: str, previous: ckpt.Checkpoint | None, step: int | None = None) -> ckpt.Checkpoint:
    """Write the checkpoint to storage (marker last), then drop the previous one."""
    epoch = state["epoch"]
    local = work_dir / f"checkpoint-{ckpt.checkpoint_name(epoch, step)}"
    local.mkdir(parents=True, exist_ok=True)
    rng_name = f"rng-{acc.process_index}.pt"
    if acc.is_main_process:
        torch.save(_rng_state(), local / rng_name)
    else:
        # Every process uploads its own RNG state: on several nodes the others' work_dir is not
        # the main process's disk, so it could not upload them. Before the barrier, so all of
        # them are in storage before the main process writes the marker.
        mine = work_dir / f"{rng_name}.{ckpt.checkpoint_name(epoch, step)}"
        torch.save(_rng_state(), mine)
        storage.write_bytes(join_uri(ckpt.checkpoint_uri(output, epoch, step), rng_name), mine.read_bytes())
        mine.unlink()
    if acc.is_main_process:
        acc.unwrap_model(wrapped).peft.save_pretrained(local / "adapter", safe_serialization=True)
        torch.save(optimizer.state_dict(), local / "optimizer.pt")
        torch.save(scheduler.state_dict(), local / "scheduler.pt")
        (local / ckpt.STATE_FILE).write_text(json.dumps(state))
    acc.wait_for_everyone()
    written = ckpt.Checkpoint(epoch, ckpt.checkpoint_uri(output, epoch, step), step)
    if acc.is_main_process:
        t0 = time.perf_counter()
        written = ckpt.upload(storage, local, output, epoch, digest, step)
        if previous is not None and previous.uri != written.uri:
            ckpt.delete(storage, previous)
        shutil.rmtree(local, ignore_errors=True)
        what = f"epoch {epoch}" if step is None else f"step {step}"
        log.info(f"checkpoint of {what} written to {written.uri} in {time.perf_counter() - t0:.1f}s")
    acc.wait_for_everyone()
    return written
