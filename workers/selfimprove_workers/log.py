"""Structured (JSON lines) logging for stages, with credentials redacted.

One JSON object per line on stderr: `{"ts", "level", "logger", "msg", ...extra}`. Progress is a
log record with a `progress` field (`{"done", "total", "unit", "etaSeconds"}`), at most one line per
count every few seconds: the local runner renders it as a progress bar, the operator reads the
last one from the pod's log (`pods/log`) onto the run's status, and a person can still read it
in `kubectl logs`. Every field of a record goes
through :func:`selfimprove_workers.redaction.redact_obj` before it is serialized, so a line never
carries a credential and is always valid JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .redaction import redact_obj

PROGRESS_KEY = "progress"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("stage", "round", PROGRESS_KEY, "metrics"):
            if hasattr(record, key):
                body[key] = getattr(record, key)
        if record.exc_info:
            body["error"] = self.formatException(record.exc_info)
        return json.dumps(redact_obj(body), ensure_ascii=False)


def setup(level: str | None = None) -> None:
    """Route every logger through one JSON handler; keep chatty libraries at WARNING.

    botocore's DEBUG logs contain request headers (signatures), so it is pinned to WARNING
    whatever the level asked for.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("SELFIMPROVE_LOG_LEVEL", "INFO"))
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# At most one progress line per this many seconds and count (the first and the last always go
# out): the operator reads the log's tail, so a line per token would only push records out of it.
# (Not SELFIMPROVE_PROGRESS_INTERVAL: that is the operator's setting, how often it reads the log.)
PROGRESS_INTERVAL_ENV = "SELFIMPROVE_PROGRESS_LOG_SECONDS"
DEFAULT_PROGRESS_INTERVAL = 2.0


@dataclass
class _Count:
    total: int
    first_done: int
    started: float
    last_line: float


_counts: dict[tuple[str, str], _Count] = {}


def progress(logger: logging.Logger, done: int, total: int, unit: str, msg: str | None = None, *,
             clock: Callable[[], float] = time.monotonic) -> bool:
    """Log progress of a count (`done` of `total` `unit`), with the estimated seconds left from
    the rate since the count started; rate-bounded (see PROGRESS_INTERVAL_ENV). True when a
    line was written."""
    now = clock()
    key = (logger.name, unit)
    count = _counts.get(key)
    if count is None or count.total != total or done < count.first_done:
        count = _counts[key] = _Count(total, done, now, -math.inf)
    interval = float(os.environ.get(PROGRESS_INTERVAL_ENV, DEFAULT_PROGRESS_INTERVAL))
    edge = done == count.first_done or done >= total
    if not edge and now - count.last_line < interval:
        return False
    count.last_line = now
    body: dict[str, object] = {"done": done, "total": total, "unit": unit}
    if done > count.first_done and now > count.started:
        rate = (done - count.first_done) / (now - count.started)
        body["etaSeconds"] = round(max(0, total - done) / rate, 1)
    logger.info(msg or f"{done}/{total} {unit}", extra={PROGRESS_KEY: body})
    return True


@dataclass(frozen=True)
class ProgressRecord:
    """A progress line as a reader of the log (the operator, the local runner) sees it."""

    done: int
    total: int
    unit: str
    ts: str                          # when the stage wrote it (RFC 3339, seconds)
    eta_seconds: float | None = None

    @property
    def percent(self) -> int:
        return min(100, int(100 * self.done / self.total)) if self.total > 0 else 0

    def text(self) -> str:
        return f"{self.done}/{self.total} {self.unit}"


def parse_progress(line: str) -> ProgressRecord | None:
    """The progress record of one log line; None for any other line (text, JSON without a
    well-formed `progress` field)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    prog = obj.get(PROGRESS_KEY) if isinstance(obj, dict) else None
    if not isinstance(prog, dict):
        return None
    done, total, unit, ts = prog.get("done"), prog.get("total"), prog.get("unit"), obj.get("ts")
    if not (isinstance(done, int) and isinstance(total, int) and _count(done) and _count(total)
            and isinstance(unit, str) and isinstance(ts, str)):
        return None
    raw_eta = prog.get("etaSeconds")
    eta = float(raw_eta) if isinstance(raw_eta, (int, float)) and not isinstance(raw_eta, bool) and raw_eta >= 0 else None
    return ProgressRecord(done, total, unit, ts, eta)


def last_progress(text: str) -> ProgressRecord | None:
    """The newest progress record in a log excerpt (e.g. the tail of a pod's log)."""
    for line in reversed(text.splitlines()):
        if (rec := parse_progress(line)) is not None:
            return rec
    return None


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def combine_shards(records: Mapping[int, ProgressRecord], shards: int, finished: int) -> ProgressRecord | None:
    """One record for a sharded stage, from the latest records read of its running shards
    (`records`, by shard), `shards` in all and `finished` of them done (over every attempt).

    Shards are slices of n//N ± 1 rows, so a shard's total stands for every shard's: the stage's
    total is the mean shard total × N, a finished shard counts as that mean, and a running shard
    not read yet as 0 (progress never overstates). Time left is the slowest shard's read: the
    stage ends when its last shard does. None when nothing was read."""
    if not records or shards < 1:
        return None
    per_shard = sum(r.total for r in records.values()) / len(records)
    done = round(finished * per_shard) + sum(r.done for r in records.values())
    total = max(done, round(per_shard * shards))
    etas = [r.eta_seconds for r in records.values() if r.eta_seconds is not None]
    newest = max(records.values(), key=lambda r: r.ts)
    return ProgressRecord(done, total, newest.unit, newest.ts, max(etas) if etas else None)
