"""The local executor: the planner with stages as local processes.

Each stage runs as `python -m selfimprove_workers TASK.json` with exactly the task a Kubernetes
Job would get; its summary comes back through the file named by `$TERMINATION_LOG`. The run's
status is kept next to its artifacts (`<run prefix>/status.json`), so running the same command
again resumes: completed stages are skipped by the planner (and, should one be asked again, by
the stage's own `_SUCCESS` check). Ctrl-C stops the running stage and records it as interrupted
rather than failed, so the next run simply starts it again.

Whatever a stage prints passes :mod:`selfimprove_workers.redaction` on its way into the stage log
file, the live view and the status (a custom `--stage-command` need not use the workers' logging).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from selfimprove_workers.contract import RDZV_ENDPOINT_ENV, RDZV_ID_ENV, StageResult
from selfimprove_workers.log import PROGRESS_KEY, ProgressRecord, combine_shards, parse_progress
from selfimprove_workers.redaction import redact, redact_obj
from selfimprove_workers.runtime import SHARD_INDEX_ENV
from selfimprove_workers.storage import storage_for

from .api import SelfImproveRun, SelfImproveRunStatus
from .k8s.desired import running_stages
from .planner import Event, Observed, Plan, RunIdentity, StartStage, SuspendStage, is_terminal, plan, run_prefix
from .presets import resolve

STATUS_FILE = "status.json"
DEFAULT_STORAGE = "./runs"


def _die_with_parent() -> None:
    """Children get SIGTERM when the runner dies, even by SIGKILL: an orphaned stage must not
    keep writing into a directory the next run's attempt is about to use."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - not Linux
        pass


@dataclass
class StageProcess:
    start: StartStage
    proc: subprocess.Popen
    result_file: Path
    log_file: Path
    progress: str | None = None
    report: ProgressRecord | None = None    # the newest progress record of its log
    last_message: str | None = None
    metrics: dict = field(default_factory=dict)
    shard: int | None = None
    node: int | None = None   # a multi-node attempt's node index
    first_failed: int | None = None   # a multi-node attempt: the member that failed first
    stopping_since: float = 0.0
    # A sharded or multi-node attempt's processes, one per shard or node (this one first; empty otherwise).
    group: list["StageProcess"] = field(default_factory=list)


def local_run(run: SelfImproveRun, storage_uri: str | None) -> SelfImproveRun:
    """The manifest as the local executor runs it: storage redirected to `--storage` (default
    ./runs), so a manifest written for a cluster runs unchanged on a laptop."""
    uri = storage_uri or DEFAULT_STORAGE
    if "://" not in uri:
        uri = Path(uri).resolve().as_uri()
    storage = run.spec.storage.model_copy(update={"uri": uri})
    return run.model_copy(update={"spec": run.spec.model_copy(update={"storage": storage})})


def identity_of(run: SelfImproveRun) -> RunIdentity:
    return RunIdentity(name=run.metadata.name, namespace=run.metadata.namespace or "local", uid="", generation=1)


class StatusStore:
    """status.json beside the artifacts, through the same storage layer the workers use."""

    def __init__(self, run: SelfImproveRun):
        self.uri = run_prefix(resolve(run.spec), identity_of(run)) + STATUS_FILE
        self.storage = storage_for(self.uri, endpoint=run.spec.storage.endpoint, region=run.spec.storage.region)

    def load(self) -> SelfImproveRunStatus | None:
        if not self.storage.exists(self.uri):
            return None
        return SelfImproveRunStatus.model_validate_json(self.storage.read_bytes(self.uri))

    def save(self, status: SelfImproveRunStatus) -> None:
        self.storage.write_bytes(self.uri, json.dumps(status.wire(), indent=2).encode())


class LocalExecutor:
    def __init__(
        self,
        run: SelfImproveRun,
        *,
        workdir: Path | None = None,
        on_update: Callable[["LocalExecutor"], None] | None = None,
        on_event: Callable[[Event], None] | None = None,
        poll_seconds: float = 0.2,
        stage_command: list[str] | None = None,
    ):
        self.run = run
        self.identity = identity_of(run)
        self.store = StatusStore(run)
        self.status: SelfImproveRunStatus | None = self.store.load()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"selfimprove-{run.metadata.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.on_update = on_update or (lambda ex: None)
        self.on_event = on_event or (lambda ev: None)
        self.poll_seconds = poll_seconds
        # The command a task file is appended to; another venv or a container runtime fits here.
        self.stage_command = stage_command or [sys.executable, "-m", "selfimprove_workers"]
        self.running: dict[tuple[int, str], StageProcess] = {}
        self.observed: dict[tuple[int, str], Observed] = {}
        self.lock = threading.Lock()
        self._adopt_interrupted()

    def _adopt_interrupted(self) -> None:
        """A stage recorded as Running has no process any more: the previous runner died (kill,
        crash, power). That is an interruption of the runner, not a failure of the stage, so it
        is started again as a new attempt, without spending a retry or waiting for a backoff."""
        for _, s in running_stages(self.status):
            s.state, s.message = "Pending", "interrupted; resumed"

    # ------------------------------------------------------------------ one planning step
    def step(self) -> Plan:
        p = plan(self.run.spec, self.status, self.observed, datetime.now(UTC), self.identity)
        # Persist before acting: an attempt is recorded as started before its process exists,
        # so a crash between the two can never start the same attempt twice.
        self.status = p.status
        self.store.save(self.status)
        for action in p.actions:
            if isinstance(action, StartStage):
                self._start(action)
            elif isinstance(action, SuspendStage):
                self._stop((action.round, action.stage))
            elif isinstance(action, Event):
                self.on_event(action)
        self.on_update(self)
        return p

    def _start(self, start: StartStage) -> None:
        key = (start.round, start.stage)
        task_file = self.workdir / f"{start.job_name}.json"
        task_file.write_text(json.dumps(start.task.wire(), indent=2))
        task = start.task
        # A sharded attempt is what an Indexed Job is on Kubernetes: one process per shard it
        # runs, the same task file, process k with JOB_COMPLETION_INDEX=k.
        shards: list[int | None] = (
            list(task.shard_indexes if task.shard_indexes is not None else range(task.shards))
            if task.shards > 1 else [None])
        # A multi-node attempt likewise: node k is process k, all rendezvousing at 127.0.0.1 on a
        # free port, with the Job name as the rendezvous id, as the pods of its Job do.
        nodes: list[int | None] = list(range(task.nodes)) if task.nodes > 1 else [None]
        rendezvous = {RDZV_ENDPOINT_ENV: f"127.0.0.1:{_free_port()}", RDZV_ID_ENV: start.job_name} if task.nodes > 1 else {}
        members = [(k, shard, None) for k, shard in enumerate(shards)] if task.shards > 1 else \
            [(k, None, node) for k, node in enumerate(nodes)]
        group = []
        for k, shard, node in members:
            stem = (f"{start.job_name}.shard-{shard:05d}" if shard is not None
                    else f"{start.job_name}.node-{node}" if node is not None else start.job_name)
            result_file = self.workdir / f"{stem}.result.json"
            result_file.unlink(missing_ok=True)
            log_file = self.workdir / f"{stem}.log"
            env = {**os.environ, "TERMINATION_LOG": str(result_file), "PYTHONUNBUFFERED": "1", **rendezvous}
            if shard is not None or node is not None:
                env[SHARD_INDEX_ENV] = str(k)
            proc = subprocess.Popen(
                [*self.stage_command, str(task_file)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                preexec_fn=_die_with_parent, text=True, bufsize=1,
            )
            group.append(StageProcess(start, proc, result_file, log_file, shard=shard, node=node))
        sp = group[0]
        sp.group = group if len(group) > 1 else []
        self.running[key] = sp
        self.observed[key] = Observed(attempt=start.attempt, state="running")
        for member in group:
            threading.Thread(target=self._pump, args=(member,), daemon=True).start()

    def _pump(self, sp: StageProcess) -> None:
        """Copy the stage's JSON log to its file and pick out progress and metrics."""
        assert sp.proc.stderr is not None  # started with stderr=PIPE (`_start`)
        with open(sp.log_file, "a") as log:
            for line in sp.proc.stderr:
                try:
                    record = json.loads(line)
                except ValueError:
                    log.write(redact(line))
                    continue
                if not isinstance(record, dict):
                    log.write(redact(line))
                    continue
                clean = redact_obj(record)
                log.write(line if clean == record else json.dumps(clean, ensure_ascii=False) + "\n")
                record = clean
                with self.lock:
                    if PROGRESS_KEY in record:
                        prog = record[PROGRESS_KEY]
                        sp.progress = f"{prog['done']}/{prog['total']} {prog.get('unit', '')}".strip()
                        sp.report = parse_progress(line) or sp.report
                    if record.get("metrics"):
                        sp.metrics.update(record["metrics"])
                    if record.get("level") in ("warning", "error"):
                        sp.last_message = record.get("msg")
                self.on_update(self)

    def _stop(self, key: tuple[int, str]) -> None:
        sp = self.running.pop(key, None)
        if sp is None:
            return
        for member in sp.group or [sp]:
            member.proc.terminate()
        for member in sp.group or [sp]:
            try:
                member.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                member.proc.kill()
                member.proc.wait()

    def _collect_group(self, key: tuple[int, str], sp: StageProcess) -> bool:
        """A sharded attempt: running while any shard runs (its finished shards reported), then
        succeeded when every shard did and one of them merged; failed otherwise."""
        codes = [m.proc.poll() for m in sp.group]
        if sp.node is not None and any(c not in (None, 0) for c in codes) and any(c is None for c in codes):
            # One node failing fails a multi-node attempt (as its Job does on Kubernetes,
            # backoffLimit 0): the others would wait on a peer that is gone. SIGTERM first (they
            # may checkpoint), SIGKILL after 30 s; their codes are collected on a later poll.
            if sp.first_failed is None:
                sp.first_failed = next(i for i, c in enumerate(codes) if c not in (None, 0))
                sp.stopping_since = time.monotonic()
                for m, c in zip(sp.group, codes, strict=True):
                    if c is None:
                        m.proc.terminate()
            elif time.monotonic() - sp.stopping_since > 30:
                for m, c in zip(sp.group, codes, strict=True):
                    if c is None:
                        m.proc.kill()
            return False
        done = frozenset(m.shard for m, c in zip(sp.group, codes, strict=True) if c == 0 and m.shard is not None)
        before = self.observed.get(key)
        if any(c is None for c in codes):
            # The stage's progress is its running shards' combined; shards outside this attempt
            # finished in an earlier one.
            task = sp.start.task
            if sp.node is not None:
                # Training logs its progress from global rank 0 only: the one node that has it.
                report = next((m.report for m in sp.group if m.report is not None), None)
                self.observed[key] = Observed(attempt=sp.start.attempt, state="running",
                                              progress=report.text() if report else None, report=report)
                return before is None or before.report != report
            report = combine_shards({m.shard: m.report for m, c in zip(sp.group, codes, strict=True)
                                     if c is None and m.report is not None and m.shard is not None},
                                    task.shards, task.shards - len(sp.group) + len(done))
            self.observed[key] = Observed(attempt=sp.start.attempt, state="running",
                                          progress=report.text() if report else None,
                                          report=report, completed_shards=done)
            # A new combined record re-plans, as one process's does (`_collect`): without it the
            # live progress would move only when a shard finished.
            return before is None or before.completed_shards != done or before.report != report
        del self.running[key]
        results = [_result_of(m) for m in sp.group]
        merged = next((r for r, c in zip(results, codes, strict=True) if c == 0 and r is not None and r.shard is None), None)
        if all(c == 0 for c in codes) and merged is not None:
            self.observed[key] = Observed(attempt=sp.start.attempt, state="succeeded", result=merged, completed_shards=done)
            return True
        # A multi-node attempt's first failure is the one that matters: the nodes stopped after it.
        failures = [(m, c, r) for m, c, r in zip(sp.group, codes, results, strict=True) if c != 0]
        if (first := sp.first_failed) is not None:
            failures.sort(key=lambda f: f[0] is not sp.group[first])
        bad = failures[0] if failures else None
        code: int = 0
        result: StageResult | None = None
        if bad is None:
            message = "every shard exited 0 but none merged the stage"
        else:
            m, exit_code, result = bad
            code = exit_code if exit_code is not None else 1
            message = (result.message if result and result.message else _tail(m.log_file)) or f"exit code {code}"
            message = f"node {m.node}: {message}" if m.node is not None else f"shard {m.shard}: {message}"
        self.observed[key] = Observed(
            attempt=sp.start.attempt, state="failed", exit_code=code, result=result if bad else None,
            reason=None if code >= 0 else f"Signal{-code}", message=redact(message), completed_shards=done,
        )
        return True

    def _collect(self) -> bool:
        """Turn finished processes into observations; True when something changed."""
        changed = False
        for key, sp in list(self.running.items()):
            if sp.group:
                changed = self._collect_group(key, sp) or changed
                continue
            code = sp.proc.poll()
            if code is None:
                if sp.progress:
                    before = self.observed.get(key)
                    self.observed[key] = Observed(attempt=sp.start.attempt, state="running", progress=sp.progress,
                                                  report=sp.report)
                    # A new record re-plans: status.progress (and the saved status) follow the
                    # stage at the rate it logs progress (bounded by the worker's log module).
                    changed = changed or (sp.report is not None and (before is None or before.report != sp.report))
                continue
            sp.proc.wait()
            del self.running[key]
            changed = True
            result = _result_of(sp)
            if code == 0 and result is not None:
                self.observed[key] = Observed(attempt=sp.start.attempt, state="succeeded", result=result)
            else:
                tail = _tail(sp.log_file)
                self.observed[key] = Observed(
                    attempt=sp.start.attempt, state="failed", exit_code=code, result=result,
                    reason=None if code >= 0 else f"Signal{-code}",
                    message=redact((result.message if result and result.message else tail) or f"exit code {code}"),
                )
        return changed

    # ------------------------------------------------------------------ the loop
    def _current(self) -> SelfImproveRunStatus:
        """The status as of the last `step` (which always sets it)."""
        if self.status is None:
            raise RuntimeError("the run has no status before its first step()")
        return self.status

    def run_to_end(self, stop: threading.Event | None = None) -> SelfImproveRunStatus:
        stop = stop or threading.Event()
        p = self.step()
        while not is_terminal(self._current()) and self._current().phase != "Suspended":
            deadline = time.monotonic() + (p.requeue_after if p.requeue_after else 3600)
            while not stop.is_set() and time.monotonic() < deadline:
                if self._collect():
                    break
                if not self.running and not p.requeue_after and not p.starts:
                    break  # nothing running and nothing scheduled: plan again now
                time.sleep(self.poll_seconds)
            if stop.is_set():
                self.interrupt()
                break
            p = self.step()
        return self._current()

    def interrupt(self) -> None:
        """Stop running stages and record them as interrupted, not failed (Ctrl-C)."""
        for key in list(self.running):
            sp = self.running[key]
            self._stop(key)
            for rnd, s in running_stages(self.status):
                if (rnd, s.name) == key and s.attempts == sp.start.attempt:
                    s.state, s.message = "Pending", "interrupted; run the same command to resume"
        status = self._current()
        status.message = "interrupted; run the same command to resume"
        self.store.save(status)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _result_of(sp: StageProcess) -> StageResult | None:
    result = None
    if sp.result_file.exists():
        try:
            result = StageResult.parse_summary(sp.result_file.read_text())
        except ValueError:
            result = None
    if result is not None and result.message:
        result = result.model_copy(update={"message": redact(result.message)})
    return result


def _tail(path: Path, lines: int = 5) -> str | None:
    """The last error lines of a stage log, for the status message."""
    if not path.exists():
        return None
    messages = []
    for line in path.read_text(errors="replace").splitlines()[-200:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("level") in ("error", "critical"):
            messages.append(record.get("msg", ""))
    return "; ".join(messages[-lines:]) or None
