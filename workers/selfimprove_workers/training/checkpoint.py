"""Epoch checkpoints of the `train` stage, kept in storage next to (not inside) its outputs.

Layout: `<output>/_checkpoints/epoch-<N>/` holds `adapter/` (peft format), `optimizer.pt`,
`scheduler.pt`, `rng-<rank>.pt` (each process's torch RNG: LoRA dropout continues exactly) and
`state.json` (completed epochs, optimizer steps, data-order seed, world size, the per-step
history so far), and `_COMPLETE`, written last. A directory without `_COMPLETE` is a checkpoint
that was being written when the Job died, and is ignored.

Checkpoints are written with plain storage calls, never through the stage's `StageWriter`, so
they are not listed in `_SUCCESS` and a commit neither needs nor checks them. Only the newest
complete checkpoint is kept: once epoch N's `_COMPLETE` exists, epoch N-1's is deleted (its
marker first, so a half-deleted checkpoint never looks complete).

A SIGTERM (eviction, preemption) mid-epoch writes a *step* checkpoint, `epoch-<N>-step-<S>/`
(N epochs complete, S optimizer steps in all), with the same files; `state.json` adds the steps
done in the unfinished epoch and that epoch's per-step records so far. It is newer than
`epoch-<N>` and older than `epoch-<N+1>`.

A checkpoint records the digest of the task that wrote it: a restart of the same task resumes
from it; a different task writing to the same output ignores it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import NotFoundError
from ..storage import Storage, download_dir, join_uri, normalize_prefix, upload_dir

__all__ = ["CHECKPOINTS_DIR", "COMPLETE_MARKER", "Checkpoint", "checkpoint_name", "checkpoint_uri", "find_latest",
           "download", "upload", "delete"]

CHECKPOINTS_DIR = "_checkpoints"
COMPLETE_MARKER = "_COMPLETE"
STATE_FILE = "state.json"
_EPOCH_DIR = re.compile(r"epoch-(\d+)(?:-step-(\d+))?/" + re.escape(COMPLETE_MARKER) + r"$")

log = logging.getLogger("selfimprove.train")


@dataclass(frozen=True)
class Checkpoint:
    epoch: int      # epochs completed when it was written (1-based)
    uri: str        # its prefix, with a trailing slash
    step: int | None = None  # a step checkpoint (SIGTERM mid-epoch): optimizer steps done in all

    @property
    def order(self) -> tuple[int, int]:
        return (self.epoch, 0 if self.step is None else 1 + self.step)


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    return f"epoch-{epoch}" if step is None else f"epoch-{epoch}-step-{step}"


def checkpoint_uri(output: str, epoch: int, step: int | None = None) -> str:
    return join_uri(output, f"{CHECKPOINTS_DIR}/{checkpoint_name(epoch, step)}/")


def find_latest(storage: Storage, output: str, task_digest: str) -> Checkpoint | None:
    """The newest complete checkpoint of this task under `output`, or None."""
    root = join_uri(output, CHECKPOINTS_DIR + "/")
    found: list[Checkpoint] = []
    for obj in storage.list(root):
        m = _EPOCH_DIR.search(obj.uri[len(root):])
        if not m:
            continue
        try:
            marker = json.loads(storage.read_bytes(obj.uri))
        except (NotFoundError, ValueError):
            continue  # deleted meanwhile, or garbage: not a usable checkpoint
        if marker.get("task") != task_digest:
            log.warning(f"ignoring checkpoint {obj.uri}: written by a different task")
            continue
        step = int(m.group(2)) if m.group(2) else None
        found.append(Checkpoint(int(m.group(1)), obj.uri[: -len(COMPLETE_MARKER)], step))
    return max(found, key=lambda c: c.order, default=None)


def download(storage: Storage, ckpt: Checkpoint, local_dir: Path) -> Path:
    download_dir(storage, ckpt.uri, local_dir)
    return local_dir


def upload(storage: Storage, local_dir: Path, output: str, epoch: int, task_digest: str,
           step: int | None = None) -> Checkpoint:
    """Upload a checkpoint directory, then its `_COMPLETE` marker."""
    uri = checkpoint_uri(output, epoch, step)
    upload_dir(storage, local_dir, uri)
    marker = {"task": task_digest, "epoch": epoch, **({"step": step} if step is not None else {})}
    storage.write_bytes(join_uri(uri, COMPLETE_MARKER), (json.dumps(marker) + "\n").encode())
    return Checkpoint(epoch, uri, step)


def delete(storage: Storage, ckpt: Checkpoint) -> None:
    """Delete a checkpoint: the marker first, so a crash half-way leaves no 'complete' checkpoint."""
    prefix = normalize_prefix(ckpt.uri)
    storage.delete(join_uri(prefix, COMPLETE_MARKER))
    for obj in storage.list(prefix):
        storage.delete(obj.uri)
