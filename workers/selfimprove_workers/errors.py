"""Error classes shared by every stage.

The split matters at the process boundary: a `BadInput` is the user's to fix (exit code 2, the
control plane does not retry it), anything else is treated as transient (exit code 1, retried).

Every message is redacted when the error is made (:func:`selfimprove_workers.redaction.redact`):
`str(exc)`, `repr(exc)` and a formatted traceback of our own errors never carry a credential,
wherever they end up (a log, a termination message, an Event).
"""

from .redaction import redact


class SelfImproveError(Exception):
    """Base class of the errors selfimprove raises on purpose; string arguments are redacted."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class BadInput(SelfImproveError):
    """Permanent: a bad task, manifest field or data line. The message names the field or file:line."""


class InputChanged(BadInput):
    """A pinned input file (`StageTask.pinned`) is not the version the run started with."""

    reason = "InputChanged"  # constants.INPUT_CHANGED_REASON


class DataError(BadInput):
    """A malformed data file; the message starts with `file:line:`."""


class StorageError(SelfImproveError):
    """Storage could not be read or written (transient unless it is also a BadInput)."""


class NotFoundError(StorageError, BadInput):
    """A URI the task names does not exist: permanent, the user has to fix the reference."""


class CorruptObjectError(StorageError):
    """A committed object does not match the size or sha256 its `_SUCCESS` marker recorded."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class EndpointError(SelfImproveError):
    """A served teacher or judge (`model.teacherEndpoint`, `model.judgeEndpoint`) still failed
    after its retries — overloaded, down or too slow: transient (exit 1), reason EndpointError.
    Not a StorageError (that sends the user to the storage credentials) nor a bare Error (the
    message is already the whole story: the field, the URL, the last status). An answer no retry
    can change (401, 404, 400) is a BadInput instead."""

    reason = "EndpointError"  # constants.ENDPOINT_ERROR_REASON


class Terminated(SelfImproveError):
    """The stage was asked to stop (SIGTERM) and stopped at a safe point, its progress saved:
    exit code 143 (`constants.EXIT_TERMINATED`), retried like any interruption."""
