"""TensorBoard event files of a run: training curves per step, held-out accuracy per round.

Where they go, so that `tensorboard --logdir <run prefix>` (s3:// or a local ./runs/… folder)
shows the whole run:

    round-NNN/train/tensorboard/events.out.tfevents.*      one run per round: train/loss,
                                                           train/learning_rate, train/grad_norm,
                                                           train/tokens_per_s, by optimizer step
    tensorboard/evaluate/events.out.tfevents.round-NNN     one run for the whole SelfImproveRun:
                                                           eval/accuracy (and eval/seed_accuracy)
                                                           with the round as the step

The train stage's files are part of its committed outputs, next to its adapter. The evaluate
stage's go to one folder of the run (one file per round, named by the round, so a retried round
replaces its file and TensorBoard draws one accuracy curve across rounds), outside the stage's
own outputs: nothing reads them but TensorBoard and `selfimprove report`.

Written with `torch.utils.tensorboard` (the `tensorboard` package of the workers' extra).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TRAIN_DIR = "tensorboard"
EVAL_DIR = "tensorboard/evaluate"


def eval_event_name(round_no: int) -> str:
    return f"events.out.tfevents.round-{round_no:03d}.evaluate"


def write_train_events(log_dir: Path, history: Sequence[dict[str, Any]], end_time: float | None = None) -> list[Path]:
    """Per-step scalars of a training run (metrics.json's `history`) as one event file."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir.mkdir(parents=True, exist_ok=True)
    total = sum(float(h.get("seconds") or 0.0) for h in history)
    wall = (end_time or time.time()) - total  # reconstructed: the run's end minus its step times
    writer = SummaryWriter(str(log_dir), flush_secs=3600)
    try:
        for h in history:
            seconds = float(h.get("seconds") or 0.0)
            wall += seconds
            step = int(h["step"])
            writer.add_scalar("train/loss", float(h["loss"]), step, walltime=wall)
            writer.add_scalar("train/learning_rate", float(h["lr"]), step, walltime=wall)
            if h.get("gradNorm") is not None:
                writer.add_scalar("train/grad_norm", float(h["gradNorm"]), step, walltime=wall)
            if seconds > 0:
                writer.add_scalar("train/tokens_per_s", float(h["tokens"]) / seconds, step, walltime=wall)
            writer.add_scalar("train/epoch", float(h["epoch"]), step, walltime=wall)
    finally:
        writer.close()
    return sorted(log_dir.glob("events.out.tfevents.*"))


def write_eval_events(work_dir: Path, round_no: int, metrics: dict[str, Any]) -> Path:
    """This round's held-out accuracy as one event file (step = round); returns the file."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = work_dir / f"tensorboard-eval-{round_no}"
    log_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(log_dir), flush_secs=3600)
    try:
        writer.add_scalar("eval/accuracy", float(metrics["accuracy"]), round_no)
        if metrics.get("seedAccuracy") is not None:
            writer.add_scalar("eval/seed_accuracy", float(metrics["seedAccuracy"]), round_no)
    finally:
        writer.close()
    [path] = sorted(log_dir.glob("events.out.tfevents.*"))
    return path


def run_prefix_of(stage_output: str, round_no: int) -> str | None:
    """The run's prefix from a stage's output prefix (`<run>/round-NNN/<stage>/`)."""
    marker = f"round-{round_no:03d}/"
    head, sep, _ = stage_output.rpartition(marker)
    return head if sep else None
