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
from .constants import EXIT_BAD_INPUT, EXIT_OK, EXIT_TERMINATED, EXIT_TRANSIENT, MARKER_NAME, TERMINATED_REASON
from .contract import RESULT_FILE, StageName, StageResult, StageTask, full_result, now_rfc3339
from .errors import BadInput, CorruptObjectError, EndpointError, InputChanged, StorageError, Terminated
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
    # A node of a multi-node stage that did not hold global rank 0: that node commits, this one
    # writes nothing and reports the committed summary (`_follow`).
    follower: bool = False


class StageContext:
    """Everything a stage function needs besides its task."""

    def __init__(self, task: StageTask, workdir: Path, shard: int | None = None):
        from .storage import StageWriter, storage_for

        self.task = task
        self.workdir = workdir
        # A shard of a sharded stage writes under `<output>/shards/<i>/`; the merge (shard None)
        # and a one-shard stage under the output itself.
        self.shard = shard
        self.prefix = shard_prefix(task, shard) if shard is not None else task.output
        self.storage = storage_for(task.output, endpoint=task.storage.endpoint, region=task.storage.region)
        self.writer = StageWriter(self.storage, self.prefix)
        self.log = logging.getLogger(f"selfimprove.{task.stage.value}")

    def shard_rows(self, rows: list[Any]) -> list[Any]:
        """This shard's deterministic contiguous slice of a stage's input rows (all of them
        when the stage is not sharded): rows[i·n//N : (i+1)·n//N]."""
        if self.shard is None:
            return rows
        n, total = len(rows), self.task.shards
        return rows[self.shard * n // total:(self.shard + 1) * n // total]

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
# Builds the whole stage's outcome from its committed shard directories (index order), exactly
# as one unsharded run would have: concatenated outputs, metrics recomputed from them.
MergeFn = Callable[[StageContext, list[str]], StageOutcome]
SHARD_INDEX_ENV = "JOB_COMPLETION_INDEX"


def shard_prefix(task: StageTask, shard: int) -> str:
    return task.uri(f"shards/{shard:05d}/")


def shard_of(task: StageTask) -> int:
    """The shard this process runs: pod k of an Indexed Job (JOB_COMPLETION_INDEX=k) runs
    `shardIndexes[k]`, or shard k when the task runs every shard."""
    text = os.environ.get(SHARD_INDEX_ENV, "0")
    try:
        k = int(text)
    except ValueError:
        raise BadInput(f"{SHARD_INDEX_ENV}: {text!r} is not an integer") from None
    runs = task.shard_indexes if task.shard_indexes is not None else list(range(task.shards))
    if not 0 <= k < len(runs):
        raise BadInput(f"{SHARD_INDEX_ENV}: {k} is out of range; this task runs {len(runs)} shard(s)")
    return runs[k]


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
    from .storage import is_complete, join_uri, read_committed, read_marker

    marker = read_marker(ctx.storage, ctx.prefix)
    if marker is None:
        return None
    if marker.get("task") != ctx.task.digest():
        raise BadInput(
            f"output: {ctx.prefix} already holds the committed output of a different task; "
            "a changed task needs a new output directory"
        )
    try:
        if not is_complete(ctx.storage, ctx.prefix):
            return None
        body = json.loads(read_committed(ctx.storage, ctx.prefix, RESULT_FILE))
    except CorruptObjectError as exc:
        # Finished once, damaged since: run it again rather than hand out bad data.
        ctx.log.warning(f"committed output is corrupt ({exc}); running the stage again")
        ctx.storage.delete(join_uri(ctx.prefix, MARKER_NAME))
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


def run_task(task: StageTask, stage_fn: StageFn | None = None, merge_fn: MergeFn | None = None) -> StageResult:
    """Run the task, or this process's shard of it. With shards > 1: run the shard (unless its
    own `_SUCCESS` says it is done), commit it, then list every shard's marker; the shard that
    sees all N merges (docs/architecture.md, "Sharded stages")."""
    started = now_rfc3339()
    t0 = time.monotonic()
    shard = shard_of(task) if task.shards > 1 else None
    with tempfile.TemporaryDirectory(prefix=f"selfimprove-{task.stage.value}-") as tmp:
        top = StageContext(task, Path(tmp))
        pinned = check_pinned(top)
        done = _already_done(top)
        if done is not None:
            top.log.info(f"{task.stage.value}: output already complete at {task.output}; skipping")
            return done.model_copy(update={"inputs": pinned})
        module = None
        if stage_fn is None or (shard is not None and merge_fn is None):
            module = importlib.import_module(STAGE_MODULES[task.stage])
        run = stage_fn or module.run  # type: ignore[union-attr]
        ctx = StageContext(task, Path(tmp), shard) if shard is not None else top
        result = _already_done(ctx) if shard is not None else None
        if result is None:
            where = f"shard {shard}/{task.shards} " if shard is not None else ""
            ctx.log.info(f"{task.stage.value} round {task.round} attempt {task.attempt} {where}→ {ctx.prefix}")
            outcome = run(ctx)
            result = _follow(top, pinned) if outcome.follower else _commit(ctx, outcome, pinned, started, t0)
        else:
            ctx.log.info(f"{task.stage.value}: shard {shard} already complete; merging if it is the last")
        if shard is None:
            return result
        # Our marker is written: whichever shard lists all N last (storage is list-after-write
        # consistent) merges; two merging at once write identical bytes.
        if not all(_shard_committed(top, i) for i in range(task.shards)):
            return result.model_copy(update={"inputs": pinned})
        merge = merge_fn or getattr(module, "merge", None)
        if merge is None:
            raise BadInput(f"shards: the {task.stage.value} stage has no merge; run it with shards 1")
        dirs = [shard_prefix(task, i) for i in range(task.shards)]
        top.log.info(f"{task.stage.value}: all {task.shards} shards committed; merging")
        return _commit(top, merge(top, dirs), pinned, started, t0)


FOLLOW_TIMEOUT_ENV = "SELFIMPROVE_FOLLOW_TIMEOUT"


def _follow(top: StageContext, pinned: dict[str, str]) -> StageResult:
    """A follower node's result: the leader's committed summary, waited for (it uploads after
    the training processes of every node have exited). Reporting the same summary, not one of
    its own, means whichever pod's termination message the control plane reads is the stage's
    result; a leader that never commits fails this node too, as the attempt has failed."""
    timeout = float(os.environ.get(FOLLOW_TIMEOUT_ENV, "900"))
    deadline = time.monotonic() + timeout
    while (done := _already_done(top)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node of global rank 0 did not commit {top.task.output} within {timeout:.0f}s")
        time.sleep(1.0)
    return done.model_copy(update={"skipped": False, "inputs": pinned})


def _shard_committed(top: StageContext, shard: int) -> bool:
    from .storage import is_complete, read_marker

    prefix = shard_prefix(top.task, shard)
    marker = read_marker(top.storage, prefix)
    return marker is not None and marker.get("task") == top.task.digest() and is_complete(top.storage, prefix)


def _commit(ctx: StageContext, outcome: StageOutcome, pinned: dict[str, str], started: str, t0: float) -> StageResult:
    task = ctx.task
    outputs = {k: (v if "://" in v or v.startswith("/") else ctx.prefix.rstrip("/") + "/" + v) for k, v in outcome.outputs.items()}
    metrics = dict(outcome.metrics)
    metrics.setdefault("seconds", round(time.monotonic() - t0, 3))
    result = StageResult(
        stage=task.stage, round=task.round, status="Succeeded", metrics=metrics,
        outputs=outputs, inputs=pinned, started_at=started, finished_at=now_rfc3339(),
        shard=ctx.shard, shards=task.shards,
    )
    ctx.writer.write_json(RESULT_FILE, full_result(result, outcome.details))
    ctx.writer.commit(task.digest())
    return result


def concat_outputs(ctx: StageContext, shard_dirs: list[str], name: str) -> list[dict[str, Any]]:
    """Concatenate output `name` of every shard, in shard order, into the stage's own output
    (byte for byte what one process writes) and return its rows for the metrics."""
    from .storage import read_committed

    rows: list[dict[str, Any]] = []
    for d in shard_dirs:
        data = read_committed(ctx.storage, d, name)
        rows.extend(json.loads(line) for line in data.decode().splitlines() if line.strip())
    ctx.writer.write_jsonl(name, rows)
    return rows


def shard_details(ctx: StageContext, shard_dirs: list[str]) -> list[dict[str, Any]]:
    """Each shard's result.json details, in shard order."""
    from .storage import read_committed

    return [json.loads(read_committed(ctx.storage, d, RESULT_FILE)).get("details", {}) for d in shard_dirs]


def _failure(task: StageTask | None, reason: str, message: str) -> StageResult | None:
    if task is None:
        return None
    return StageResult(
        stage=task.stage, round=task.round, status="Failed", reason=reason,
        message=redact(message), finished_at=now_rfc3339(),
    )


def main(argv: list[str] | None = None, stage_fn: StageFn | None = None, merge_fn: MergeFn | None = None) -> int:
    """The process entrypoint. `stage_fn` (and `merge_fn`) replace the stage's own module
    (embedding, tests)."""
    argv = sys.argv[1:] if argv is None else argv
    log.setup()
    if len(argv) != 1:
        print("usage: python -m selfimprove_workers TASK_JSON (inline JSON or a file)", file=sys.stderr)
        return EXIT_BAD_INPUT
    task: StageTask | None = None
    try:
        task = load_task(argv[0])
        result = run_task(task, stage_fn, merge_fn)
        write_summary(result)
        return EXIT_OK
    except BadInput as exc:
        code, reason, message = EXIT_BAD_INPUT, InputChanged.reason if isinstance(exc, InputChanged) else "BadInput", str(exc)
    except StorageError as exc:
        code, reason, message = EXIT_TRANSIENT, "StorageError", str(exc)
    except EndpointError as exc:
        code, reason, message = EXIT_TRANSIENT, EndpointError.reason, str(exc)
    except Terminated as exc:
        code, reason, message = EXIT_TERMINATED, TERMINATED_REASON, str(exc)
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
