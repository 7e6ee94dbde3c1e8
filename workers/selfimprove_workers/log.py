"""Structured (JSON lines) logging for stages, with credentials redacted.

One JSON object per line on stderr: `{"ts", "level", "logger", "msg", ...extra}`. Progress is a
log record with a `progress` field (`{"done", "total", "unit"}`), which the local runner renders
as a progress bar and a person can still read in `kubectl logs`. Every field of a record goes
through :func:`selfimprove_workers.redaction.redact_obj` before it is serialized, so a line never
carries a credential and is always valid JSON.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

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


def progress(logger: logging.Logger, done: int, total: int, unit: str, msg: str | None = None) -> None:
    logger.info(msg or f"{done}/{total} {unit}", extra={PROGRESS_KEY: {"done": done, "total": total, "unit": unit}})
