"""Structured (JSON lines) logging for stages, with credentials redacted.

One JSON object per line on stderr: `{"ts", "level", "logger", "msg", ...extra}`. Progress is a
log record with a `progress` field (`{"done", "total", "unit"}`), which the local runner renders
as a progress bar and a person can still read in `kubectl logs`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
PROGRESS_KEY = "progress"


def secret_values() -> list[str]:
    return [v for k in SECRET_ENV if (v := os.environ.get(k)) and len(v) >= 4]


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, "***")
    return text


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
        return redact(json.dumps(body, ensure_ascii=False, default=str))


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
