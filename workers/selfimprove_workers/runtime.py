"""Runs one stage: `python -m selfimprove_workers TASK_JSON`.

The conventions every stage shares live here so that stages contain only their method:
- the task is parsed and checked before anything heavy is imported;
- a stage whose output already carries a `_SUCCESS` for the same task is skipped;
- outputs are committed by writing `result.json` and then `_SUCCESS` last;
- the result summary goes to `$TERMINATION_LOG` (or `/dev/termination-log` when it exists);
- exit code 0 on success, 2 on bad input (permanent), 1 on anything else (transient).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import log
from .constants import EXIT_BAD_INPUT, EXIT_OK, EXIT_TRANSIENT, MARKER_NAME
from .contract import RESULT_FILE, StageName, StageResult, StageTask, full_result, now_rfc3339
from .errors import BadInput, CorruptObjectError, InputChanged, StorageError
from .model_refs import fetch_hf, is_hf_ref
from .redaction import redact
from .stage_registry import STAGES
from .validation import describe

DEFAULT_TERMINATION_LOG = "/dev/termination-log"
MODEL_CACHE_ENV = "SELFIMPROVE_CACHE"

logger = logging.getLogger("selfimprove.stage")

# Imported lazily: a stage's module pulls in torch / vllm. Derived from the stage registry.
STAGE_MODULES: dict[StageName, str] = {StageName(name): kind.module for name, kind in STAGES.items()}


@dataclass
class StageOutcome:
    """What a stage function returns: headline metrics (→ summary and status), named outputs
    (file names under the output prefix, or full URIs) and details (→ result.json only)."""

    metrics: dict[str, float | int | str | bool] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class StageContext:
    """Everything a stage function needs besides its task."""

    def __init__(self, task: StageTask, workdir: Path):
        from .storage import StageWriter, storage_for

        self.task = task
        self.workdir = workdir
        self.storage = storage_for(task.output, endpoint=task.storage.endpoint, region=task.storage.region)
        self.writer = StageWriter(self.storage, task.output)
        self.log = logging.getLogger(f"selfimprove.{task.stage.value}")

    def storage_for(self, uri: str):
        from .storage import storage_for

        return storage_for(uri, endpoint=self.task.storage.endpoint, region=self.task.storage.region)

    def progress(self, done: int, total: int, unit: str, msg: str | None = None) -> None:
        log.progress(self.log, done, total, unit, msg)

    def local_dir(self, uri: str) -> Path:
        """A local directory holding the model or adapter at `uri` (downloaded once into the
        cache when it is remote; a download is only used after it finished)."""
        if uri.startswith("file://"):
            return Path(uri[len("file://"):])
        if "://" not in uri:
            return Path(uri)
        cache = Path(os.environ.get(MODEL_CACHE_ENV, Path.home() / ".cache" / "selfimprove"))
        if is_hf_ref(uri):
            return fetch_hf(uri, cache)
        from .storage import download_dir

        target = cache / "models" / hashlib.sha256(uri.encode()).hexdigest()[:24]
        done = target / ".selfimprove-complete"
        if not done.exists():
            partial = target.with_name(target.name + f".partial-{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            self.log.info(f"downloading {uri}")
            download_dir(self.storage_for(uri), uri, partial)
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
            done.write_text(uri)
        return target


StageFn = Callable[[StageContext], StageOutcome]


def load_task(arg: str) -> StageTask:
    """The task from inline JSON or a file path; a bad one raises BadInput naming the field."""
    text = arg
    if not arg.lstrip().startswith("{"):
        path = Path(arg)
        if not path.is_file():
            raise BadInput(f"task: {arg!r} is neither inline JSON nor a readable file")
        text = path.read_text()
    try:
        return StageTask.model_validate_json(text)
    except ValidationError as exc:
        raise BadInput("task: " + describe(exc)) from None


def termination_log_path() -> Path | None:
    explicit = os.environ.get("TERMINATION_LOG")
    if explicit:
        return Path(explicit)
    default = Path(DEFAULT_TERMINATION_LOG)
    return default if default.exists() else None


def write_summary(result: StageResult) -> None:
    text = result.summary_json()
    path = termination_log_path()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    logger.info("result", extra={"metrics": result.metrics})


def _already_done(ctx: StageContext) -> StageResult | None:
    from .storage import is_complete, read_committed, read_marker

    marker = read_marker(ctx.storage, ctx.task.output)
    if marker is None:
        return None
    if marker.get("task") != ctx.task.digest():
        raise BadInput(
            f"output: {ctx.task.output} already holds the committed output of a different task; "
            "a changed task needs a new output directory"
        )
    try:
        if not is_complete(ctx.storage, ctx.task.output):
            return None
        body = json.loads(read_committed(ctx.storage, ctx.task.output, RESULT_FILE))
    except CorruptObjectError as exc:
        # Finished once, damaged since: run it again rather than hand out bad data.
        ctx.log.warning(f"committed output is corrupt ({exc}); running the stage again")
        ctx.storage.delete(ctx.task.uri(MARKER_NAME))
        return None
    summary = StageResult.model_validate(body["summary"])
    return summary.model_copy(update={"skipped": True})


def check_pinned(ctx: StageContext) -> dict[str, str]:
    """Digests of the task's pinned inputs (by spec field); InputChanged, naming the field and
    the file, when one is not the version the run started with. Checked before the stage reads
    anything, so a run never mixes two versions of its data."""
    from .storage import display_name

    digests: dict[str, str] = {}
    for pin in ctx.task.pinned:
        digest = ctx.storage_for(pin.uri).fingerprint(pin.uri)
        if pin.digest is not None and digest != pin.digest:
            raise InputChanged(
                f"{pin.field}: {display_name(pin.uri)} changed since the run started ({pin.digest} → {digest}); "
                "a run never mixes two versions of its data: restore the file or start a new run")
        digests[pin.field] = digest
    if digests and not any(p.digest for p in ctx.task.pinned):
        ctx.log.info("pinned inputs: " + ", ".join(f"{k} {v}" for k, v in digests.items()))
    return digests


def run_task(task: StageTask, stage_fn: StageFn | None = None) -> StageResult:
    started = now_rfc3339()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"selfimprove-{task.stage.value}-") as tmp:
        ctx = StageContext(task, Path(tmp))
        pinned = check_pinned(ctx)
        done = _already_done(ctx)
        if done is not None:
            ctx.log.info(f"{task.stage.value}: output already complete at {task.output}; skipping")
            return done.model_copy(update={"inputs": pinned})
        if stage_fn is None:
            stage_fn = importlib.import_module(STAGE_MODULES[task.stage]).run
        ctx.log.info(f"{task.stage.value} round {task.round} attempt {task.attempt} → {task.output}")
        outcome = stage_fn(ctx)
        outputs = {k: (v if "://" in v or v.startswith("/") else task.uri(v)) for k, v in outcome.outputs.items()}
        metrics = dict(outcome.metrics)
        metrics.setdefault("seconds", round(time.monotonic() - t0, 3))
        result = StageResult(
            stage=task.stage, round=task.round, status="Succeeded", metrics=metrics,
            outputs=outputs, inputs=pinned, started_at=started, finished_at=now_rfc3339(),
        )
        ctx.writer.write_json(RESULT_FILE, full_result(result, outcome.details))
        ctx.writer.commit(task.digest())
        return result


def _failure(task: StageTask | None, reason: str, message: str) -> StageResult | None:
    if task is None:
        return None
    return StageResult(
        stage=task.stage, round=task.round, status="Failed", reason=reason,
        message=redact(message), finished_at=now_rfc3339(),
    )


def main(argv: list[str] | None = None, stage_fn: StageFn | None = None) -> int:
    """The process entrypoint. `stage_fn` replaces the stage's own module (embedding, tests)."""
    argv = sys.argv[1:] if argv is None else argv
    log.setup()
    if len(argv) != 1:
        print("usage: python -m selfimprove_workers TASK_JSON (inline JSON or a file)", file=sys.stderr)
        return EXIT_BAD_INPUT
    task: StageTask | None = None
    try:
        task = load_task(argv[0])
        result = run_task(task, stage_fn)
        write_summary(result)
        return EXIT_OK
    except BadInput as exc:
        code, reason, message = EXIT_BAD_INPUT, InputChanged.reason if isinstance(exc, InputChanged) else "BadInput", str(exc)
    except StorageError as exc:
        code, reason, message = EXIT_TRANSIENT, "StorageError", str(exc)
    except Exception as exc:  # noqa: BLE001 — the process boundary: everything else is transient
        logger.exception("stage failed")
        code, reason, message = EXIT_TRANSIENT, "Error", f"{type(exc).__name__}: {exc}"
    logger.error(message)
    failed = _failure(task, reason, message)
    if failed is not None:
        write_summary(failed)
    elif (path := termination_log_path()) is not None:
        path.write_text(json.dumps({"status": "Failed", "reason": reason, "message": redact(message)[:3000]}))
    return code
