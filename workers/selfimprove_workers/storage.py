"""Object storage for stage inputs and outputs: local files or S3, behind one small interface.

URIs
    ``s3://bucket/key``, ``file:///abs/path`` or a plain filesystem path (treated as a file URI;
    relative paths resolve against the working directory). File URIs are taken literally: there is
    no percent-decoding, because every URI here is built by joining plain names, and decoding would
    corrupt a name that contains ``%``. A *prefix* is a directory-like URI; a trailing slash is
    optional and added by :func:`normalize_prefix`.

Commit protocol
    A stage writes its outputs through a :class:`StageWriter`, which records the size and sha256 of
    each file, and then :meth:`StageWriter.commit` writes ``<prefix>/_SUCCESS`` *last*. A prefix
    without the marker is never complete, so a stage that crashed or was preempted half-way can
    never be mistaken for a finished one; :func:`is_complete` and :func:`read_committed` check the
    recorded sizes/checksums so silent corruption is caught where it is read.

Credentials
    S3 credentials come only from boto3's standard chain (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``...). Error messages are built by this module
    from the URI, the operation and the S3 error code, and pass through
    :func:`selfimprove_workers.redaction.redact` with the session's frozen credentials as extra
    values (they may come from a profile, not the environment), which removes every credential
    value the process knows of, URL userinfo and credential-shaped text. This module's logger
    never logs request headers, client configuration or credentials. We never enable botocore's
    DEBUG logging: botocore logs full request headers at DEBUG, and with temporary credentials
    those include the session token (``X-Amz-Security-Token``). Leave the ``botocore``/``boto3``/
    ``urllib3`` loggers at INFO or above in workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from .constants import MARKER_NAME
from .errors import CorruptObjectError, DataError, NotFoundError, StorageError
from .redaction import CREDENTIAL_ENV, redact

__all__ = [
    "MARKER_NAME",
    "MARKER_VERSION",
    "FileEntry",
    "ObjectInfo",
    "Storage",
    "FileStorage",
    "S3Storage",
    "StageWriter",
    "storage_for",
    "clear_client_cache",
    "normalize_prefix",
    "join_uri",
    "parse_s3_uri",
    "display_name",
    "json_type_name",
    "read_jsonl",
    "write_jsonl",
    "upload_dir",
    "download_dir",
    "read_marker",
    "is_complete",
    "read_committed",
    "iter_committed",
    "write_stream",
    "file_entry_of",
]

log = logging.getLogger(__name__)

MARKER_VERSION = 1

_CHUNK = 1 << 20
# Temp files of atomic writes: hidden, and recognisable so listings skip leftovers of a crash.
_TMP_TAG = ".selfimprove-tmp-"


# --------------------------------------------------------------------------------------------
# Value types


@dataclass(frozen=True)
class FileEntry:
    """Size and sha256 (lowercase hex) of one stored file, as recorded in ``_SUCCESS``."""

    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class ObjectInfo:
    """One object found by :meth:`Storage.list`: its full URI and size in bytes."""

    uri: str
    size: int


class _Hasher:
    """Running size + sha256, so writers can hash while they stream."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes) -> None:
        self._h.update(data)
        self.size += len(data)

    def entry(self) -> FileEntry:
        return FileEntry(self.size, self._h.hexdigest())


def file_entry_of(path: str | os.PathLike[str]) -> FileEntry:
    """Size and sha256 of a local file, read in chunks so large files need no memory."""
    h = _Hasher()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.entry()


def _entry_of_bytes(data: bytes) -> FileEntry:
    return FileEntry(len(data), hashlib.sha256(data).hexdigest())


# --------------------------------------------------------------------------------------------
# URIs


def _is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _is_file_uri(uri: str) -> bool:
    return uri.startswith("file://")


def normalize_prefix(uri: str) -> str:
    """Return a prefix URI with exactly one trailing slash (``s3://b`` → ``s3://b/``)."""
    uri = str(uri)
    if not uri:
        raise StorageError("empty storage prefix")
    return uri if uri.endswith("/") else uri + "/"


def join_uri(prefix: str, name: str) -> str:
    """Join a prefix and a relative ``/``-separated name into a full URI."""
    return normalize_prefix(prefix) + name.lstrip("/")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; the key may be empty."""
    if not _is_s3(uri):
        raise StorageError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in S3 URI")
    return bucket, key


def _file_path(uri: str) -> str:
    """Filesystem path of a ``file://`` URI or plain path."""
    uri = os.fspath(uri)
    if _is_file_uri(uri):
        rest = uri[len("file://") :]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest.startswith("/"):
            raise StorageError(f"{uri}: file URIs must be absolute (file:///abs/path)")
        return rest
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported storage scheme (use s3://, file:// or a path)")
    return uri


def display_name(uri: str) -> str:
    """How a URI is shown in ``file:line:`` messages: file URIs as their plain path."""
    if _is_file_uri(uri):
        try:
            return _file_path(uri)
        except StorageError:
            return uri
    return uri


def _relative_name(name: str) -> str:
    """Validate a relative output name (``a/b.jsonl``): no absolute paths, no ``..``, no marker."""
    if not name or name.startswith("/") or "\\" in name:
        raise ValueError(f"invalid output name {name!r}: must be a relative '/'-separated path")
    parts = PurePosixPath(name).parts
    if any(p in (".", "..") for p in parts) or name.endswith("/") or "//" in name:
        raise ValueError(f"invalid output name {name!r}")
    if parts[0] == MARKER_NAME:
        raise ValueError(f"{MARKER_NAME} is reserved for the commit marker")
    return "/".join(parts)


# --------------------------------------------------------------------------------------------
# Backends


class Storage(ABC):
    """Read and write whole objects by URI: :class:`FileStorage` or :class:`S3Storage`.

    Every method takes full URIs. Missing objects raise :class:`NotFoundError`; any other failure
    raises :class:`StorageError` naming the URI (never credentials).
    """

    @abstractmethod
    def read_bytes(self, uri: str) -> bytes:
        """The whole object. Use :meth:`open_read` for large objects."""

    @abstractmethod
    def open_read(self, uri: str) -> BinaryIO:
        """A streaming binary reader (supports ``read``, ``readline``, iteration, ``with``)."""

    @abstractmethod
    def write_bytes(self, uri: str, data: bytes) -> FileEntry:
        """Write (or replace) an object atomically; returns its size and sha256."""

    def upload_file(self, local_path: str | os.PathLike[str], uri: str) -> FileEntry:
        """Copy a local file to ``uri`` (large files streamed / multipart)."""
        try:
            entry = file_entry_of(local_path)
        except FileNotFoundError:
            raise NotFoundError(f"{os.fspath(local_path)}: local file not found") from None
        except OSError as e:
            raise StorageError(f"{os.fspath(local_path)}: cannot read: {e.strerror or e}") from e
        return self._upload_file(local_path, uri, entry)

    @abstractmethod
    def _upload_file(
        self, local_path: str | os.PathLike[str], uri: str, entry: FileEntry
    ) -> FileEntry:
        """Upload a local file whose entry the caller already computed (saves re-hashing)."""

    @abstractmethod
    def download_file(self, uri: str, local_path: str | os.PathLike[str]) -> None:
        """Copy an object to a local path (parents created; the local file appears atomically)."""

    @abstractmethod
    def exists(self, uri: str) -> bool:
        """Whether an object (not a prefix) exists at ``uri``."""

    @abstractmethod
    def list(self, prefix: str) -> list[ObjectInfo]:
        """All objects under ``prefix``, recursively, sorted by URI; ``[]`` when there are none."""

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Delete one object. Deleting a missing object is not an error (as on S3)."""

    def fingerprint(self, uri: str) -> str:
        """A digest that changes whenever the object's content does (pinned run inputs): here
        `sha256:<hex>` of its bytes, streamed; S3 answers from the object's metadata."""
        h = _Hasher()
        with self.open_read(uri) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return "sha256:" + h.entry().sha256


class FileStorage(Storage):
    """Local filesystem backend. Writes are atomic: temp file in the same dir, fsync, rename."""

    def read_bytes(self, uri: str) -> bytes:
        path = _file_path(uri)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise self._error("read", uri, e) from e

    def open_read(self, uri: str) -> BinaryIO:
        path = _file_path(uri)
        try:
            return open(path, "rb")
        except OSError as e:
            raise self._error("read", uri, e) from e

    def write_bytes(self, uri: str, data: bytes) -> FileEntry:
        path = _file_path(uri)
        entry = _entry_of_bytes(data)
        self._atomic_write(uri, path, lambda f: f.write(data))
        log.debug("wrote %s (%d bytes)", uri, entry.size)
        return entry

    def _upload_file(
        self, local_path: str | os.PathLike[str], uri: str, entry: FileEntry
    ) -> FileEntry:
        path = _file_path(uri)

        def copy(dst: BinaryIO) -> None:
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, dst, _CHUNK)

        self._atomic_write(uri, path, copy)
        log.debug("uploaded %s -> %s (%d bytes)", os.fspath(local_path), uri, entry.size)
        return entry

    def download_file(self, uri: str, local_path: str | os.PathLike[str]) -> None:
        src_path = _file_path(uri)
        try:
            src = open(src_path, "rb")
        except OSError as e:
            raise self._error("read", uri, e) from e
        with src:
            self._atomic_write(
                os.fspath(local_path),
                os.fspath(local_path),
                lambda dst: shutil.copyfileobj(src, dst, _CHUNK),
            )

    def exists(self, uri: str) -> bool:
        return os.path.isfile(_file_path(uri))

    def list(self, prefix: str) -> list[ObjectInfo]:
        prefix = normalize_prefix(prefix)
        root = _file_path(prefix)
        out: list[ObjectInfo] = []
        if not os.path.isdir(root):
            return out

        def onerror(e: OSError) -> None:
            raise self._error("list", prefix, e)

        for dirpath, _dirs, files in os.walk(root, onerror=onerror):
            for fname in files:
                if fname.startswith(".") and _TMP_TAG in fname:
                    continue
                full = os.path.join(dirpath, fname)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                try:
                    size = os.stat(full).st_size
                except FileNotFoundError:
                    continue  # deleted while we walked
                except OSError as e:
                    raise self._error("list", prefix + rel, e) from e
                out.append(ObjectInfo(prefix + rel, size))
        out.sort(key=lambda o: o.uri)
        return out

    def delete(self, uri: str) -> None:
        try:
            os.remove(_file_path(uri))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._error("delete", uri, e) from e
        log.debug("deleted %s", uri)

    # -- helpers

    @staticmethod
    def _error(op: str, uri: str, e: OSError) -> StorageError:
        if isinstance(e, FileNotFoundError | IsADirectoryError | NotADirectoryError):
            return NotFoundError(f"{uri}: not found")
        return StorageError(f"{op} {uri}: {e.strerror or type(e).__name__}")

    def _atomic_write(self, uri: str, path: str, fill: Callable[[BinaryIO], object]) -> None:
        """Create ``path`` atomically: readers see the old file or the whole new one, never half."""
        directory = os.path.dirname(os.path.abspath(path))
        tmp = os.path.join(directory, f".{os.path.basename(path)}{_TMP_TAG}{uuid.uuid4().hex[:12]}")
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(directory)
        except OSError as e:
            _unlink_quietly(tmp)
            raise StorageError(f"write {uri}: {e.strerror or type(e).__name__}") from e
        except BaseException:
            _unlink_quietly(tmp)
            raise


def _fsync_dir(directory: str) -> None:
    # The rename is only durable once the directory entry is on disk; not every OS/FS allows it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# S3 error codes that mean "the thing you named is not there" (HeadObject has no body, hence "404").
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})

_clients: dict[tuple[Any, ...], tuple[Any, Any]] = {}
_clients_lock = threading.Lock()


def clear_client_cache() -> None:
    """Forget cached boto3 clients (tests that change credentials or endpoints use this)."""
    with _clients_lock:
        _clients.clear()


def _credential_fingerprint() -> str:
    # Clients bind credentials when created: a change of credentials in the environment must give
    # a new client. Only a digest goes into the cache key, so the key never shows a secret.
    material = "\0".join(
        os.environ.get(k, "")
        for k in (*CREDENTIAL_ENV, "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


class S3Storage(Storage):
    """S3 (AWS, MinIO, moto...) via boto3.

    ``endpoint``: argument, else boto3 reads ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` itself.
    ``region``: argument, else ``AWS_REGION``/``AWS_DEFAULT_REGION``, else ``us-east-1``.
    With any custom endpoint, path-style addressing is used (MinIO and moto need it).
    Clients are cached per (endpoint, region, settings, credentials fingerprint).
    """

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        max_attempts: int = 8,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        list_page_size: int = 1000,
    ) -> None:
        self.endpoint = endpoint or None
        self.region = (
            region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.list_page_size = list_page_size

    def __repr__(self) -> str:
        return f"S3Storage(endpoint={self._effective_endpoint()!r}, region={self.region!r})"

    # -- client

    def _effective_endpoint(self) -> str | None:
        if self.endpoint:
            return self.endpoint
        if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
            return None
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None

    def _client_and_session(self) -> tuple[Any, Any]:
        effective = self._effective_endpoint()
        key = (
            effective,
            self.region,
            self.max_attempts,
            self.connect_timeout,
            self.read_timeout,
            _credential_fingerprint(),
        )
        with _clients_lock:
            cached = _clients.get(key)
            if cached is not None:
                return cached
            # Imported here: the workers' contract must import without boto3 being loaded.
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"max_attempts": self.max_attempts, "mode": "standard"},
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                s3={"addressing_style": "path"} if effective else None,
            )
            # One session per client: sessions are not thread-safe, clients are.
            session = boto3.session.Session(region_name=self.region)
            client = session.client("s3", endpoint_url=self.endpoint, config=config)
            _clients[key] = (client, session)
            log.debug(
                "created S3 client (endpoint=%s, region=%s)", redact(str(effective)), self.region
            )
            return client, session

    @property
    def client(self) -> Any:
        """The cached boto3 S3 client for this endpoint/region."""
        return self._client_and_session()[0]

    def _error(self, op: str, uri: str, exc: BaseException) -> StorageError:
        """Turn a botocore/boto3 exception into our error, with no credentials in the message."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        extra: list[str | None] = []
        try:
            creds = self._client_and_session()[1].get_credentials()
            if creds is not None:
                frozen = creds.get_frozen_credentials()
                extra = [frozen.secret_key, frozen.token, frozen.access_key]
        except Exception:  # redaction must never mask the real error
            pass

        # boto3's managed transfers wrap the ClientError; the code is on the original.
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ClientError | BotoCoreError):
            cause = cause.__cause__ or cause.__context__

        if isinstance(cause, ClientError):
            resp = cause.response if isinstance(cause.response, dict) else {}
            err = resp.get("Error") or {}
            code = str(err.get("Code") or "Unknown")
            message = str(err.get("Message") or "").strip()
            status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in _NOT_FOUND_CODES:
                what = "bucket not found" if code == "NoSuchBucket" else "not found"
                return NotFoundError(redact(f"{uri}: {what} ({code})", extra))
            text = f"{op} {uri}: S3 error {code}"
            if status:
                text += f" (HTTP {status})"
            if message:
                text += f": {message}"
            return StorageError(redact(text, extra))
        if isinstance(cause, NoCredentialsError):
            return StorageError(
                f"{op} {uri}: no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
            )
        if isinstance(cause, BotoCoreError):
            endpoint = self._effective_endpoint() or "AWS"
            text = f"{op} {uri}: S3 request failed ({type(cause).__name__}) at endpoint {endpoint}"
            detail = str(cause)
            if detail:
                text += f": {detail}"
            return StorageError(redact(text, extra))
        return StorageError(redact(f"{op} {uri}: {type(exc).__name__}: {exc}", extra))

    def _call(self, op: str, uri: str, fn: Any, /, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (BotoCoreError, ClientError) as e:
            raise self._error(op, uri, e) from e

    # -- operations

    def read_bytes(self, uri: str) -> bytes:
        with self.open_read(uri) as f:
            return f.read()

    def open_read(self, uri: str) -> BinaryIO:
        bucket, key = parse_s3_uri(uri)
        resp = self._call("read", uri, self.client.get_object, Bucket=bucket, Key=key)
        reader = io.BufferedReader(_S3Reader(self, uri, resp["Body"]), _CHUNK)
        return reader  # type: ignore[return-value]

    def write_bytes(self, uri: str, data: bytes) -> FileEntry:
        bucket, key = parse_s3_uri(uri)
        entry = _entry_of_bytes(data)
        self._call("write", uri, self.client.put_object, Bucket=bucket, Key=key, Body=data)
        log.debug("wrote %s (%d bytes)", uri, entry.size)
        return entry

    def _upload_file(
        self, local_path: str | os.PathLike[str], uri: str, entry: FileEntry
    ) -> FileEntry:
        from boto3.exceptions import S3UploadFailedError

        bucket, key = parse_s3_uri(uri)
        try:
            # Managed transfer: multipart (parallel parts, per-part retries) above 8 MiB.
            self._call(
                "upload", uri, self.client.upload_file,
                Filename=os.fspath(local_path), Bucket=bucket, Key=key,
            )
        except S3UploadFailedError as e:
            raise self._error("upload", uri, e) from e
        log.debug("uploaded %s -> %s (%d bytes)", os.fspath(local_path), uri, entry.size)
        return entry

    def download_file(self, uri: str, local_path: str | os.PathLike[str]) -> None:
        bucket, key = parse_s3_uri(uri)
        local = os.fspath(local_path)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        except OSError as e:
            raise StorageError(f"download {uri}: cannot create {local}: {e.strerror}") from e
        # boto3 downloads to a temp name and renames, so the local file appears atomically.
        self._call(
            "download", uri, self.client.download_file, Bucket=bucket, Key=key, Filename=local
        )
        log.debug("downloaded %s -> %s", uri, local)

    def exists(self, uri: str) -> bool:
        bucket, key = parse_s3_uri(uri)
        if not key or key.endswith("/"):
            return False
        try:
            self._call("head", uri, self.client.head_object, Bucket=bucket, Key=key)
        except NotFoundError:
            return False
        return True

    def fingerprint(self, uri: str) -> str:
        """`etag:<ETag>` (and `@<VersionId>` in a versioned bucket) from one HEAD request: a
        rewritten object gets a new ETag (a multipart one is not an MD5 of the content, but it
        changes with it), and a version id names the exact version."""
        bucket, key = parse_s3_uri(uri)
        head = self._call("head", uri, self.client.head_object, Bucket=bucket, Key=key)
        version = head.get("VersionId")
        etag = str(head.get("ETag", "")).strip('"')
        return f"etag:{etag}" + (f"@{version}" if version and version != "null" else "")

    def list(self, prefix: str) -> list[ObjectInfo]:
        prefix = normalize_prefix(prefix)
        bucket, key_prefix = parse_s3_uri(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=bucket, Prefix=key_prefix, PaginationConfig={"PageSize": self.list_page_size}
        )
        out: list[ObjectInfo] = []
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            for page in pages:
                for obj in page.get("Contents", ()):
                    key = obj["Key"]
                    if key.endswith("/"):
                        continue  # "folder" placeholder objects some tools create
                    out.append(ObjectInfo(f"s3://{bucket}/{key}", int(obj["Size"])))
        except (BotoCoreError, ClientError) as e:
            raise self._error("list", prefix, e) from e
        out.sort(key=lambda o: o.uri)
        return out

    def delete(self, uri: str) -> None:
        bucket, key = parse_s3_uri(uri)
        self._call("delete", uri, self.client.delete_object, Bucket=bucket, Key=key)
        log.debug("deleted %s", uri)


class _S3Reader(io.RawIOBase):
    """Raw stream over an S3 response body that maps mid-stream failures to StorageError."""

    def __init__(self, storage: S3Storage, uri: str, body: Any) -> None:
        super().__init__()
        self._storage = storage
        self._uri = uri
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            data = self._body.read(len(buffer))
        except (BotoCoreError, ClientError) as e:
            raise self._storage._error("read", self._uri, e) from e
        except OSError as e:  # connection reset etc. surfacing from urllib3
            raise StorageError(f"read {self._uri}: {type(e).__name__}") from e
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            try:
                self._body.close()
            finally:
                super().close()


_file_storage = FileStorage()


def storage_for(uri: str, *, endpoint: str | None = None, region: str | None = None) -> Storage:
    """The backend for a URI: :class:`S3Storage` for ``s3://``, else :class:`FileStorage`."""
    uri = os.fspath(uri)
    if _is_s3(uri):
        return S3Storage(endpoint=endpoint, region=region)
    _file_path(uri)  # rejects unknown schemes early, with a clear message
    return _file_storage


# --------------------------------------------------------------------------------------------
# JSONL


def json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def read_jsonl(storage: Storage, uri: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream a JSONL file as ``(line number, object)``; blank lines are skipped.

    Reads line by line from the stream, so memory stays bounded by the longest line. A line that
    is not valid UTF-8/JSON, or not a JSON object, raises ``DataError("<file>:<line>: <reason>")``
    where ``<file>`` is the URI (plain path for file URIs).
    """
    display = display_name(uri)
    with storage.open_read(uri) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{display}:{lineno}: invalid UTF-8 at byte {e.start}") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{display}:{lineno}: invalid JSON: {e.msg} at column {e.colno}"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(
                    f"{display}:{lineno}: expected a JSON object, got {json_type_name(obj)}"
                )
            yield lineno, obj


def write_jsonl(storage: Storage, uri: str, rows: Iterable[dict[str, Any]]) -> FileEntry:
    """Write rows as JSONL, streaming through a local temp file so memory stays flat.

    The file is hashed as it is written and uploaded in one piece, so the object appears
    atomically with its final content.
    """

    def lines() -> Iterator[bytes]:
        for row in rows:
            if not isinstance(row, dict):
                raise TypeError(f"write_jsonl({uri}): rows must be dicts, got {type(row).__name__}")
            yield (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")

    return write_stream(storage, uri, lines())


def write_stream(storage: Storage, uri: str, blocks: Iterable[bytes]) -> FileEntry:
    """Write the concatenation of ``blocks`` to ``uri`` through a local temp file (memory stays
    at one block), hashed on the way; the object appears in one piece only after the last block,
    so an iterator that raises half-way leaves nothing behind."""
    h = _Hasher()
    fd, tmp = tempfile.mkstemp(prefix="selfimprove-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            for block in blocks:
                h.update(block)
                f.write(block)
        return storage._upload_file(tmp, uri, h.entry())
    finally:
        _unlink_quietly(tmp)


# --------------------------------------------------------------------------------------------
# Directories


def upload_dir(
    storage: Storage, local_dir: str | os.PathLike[str], prefix: str
) -> dict[str, FileEntry]:
    """Upload every file under ``local_dir`` to ``prefix/<relative path>``.

    Returns ``{relative posix path: FileEntry}``.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise NotFoundError(f"{root}: local directory not found")
    out: dict[str, FileEntry] = {}
    for dirpath, _dirs, files in os.walk(root):
        for fname in sorted(files):
            full = Path(dirpath) / fname
            rel = full.relative_to(root).as_posix()
            out[rel] = storage.upload_file(full, join_uri(prefix, rel))
    return dict(sorted(out.items()))


def download_dir(storage: Storage, prefix: str, local_dir: str | os.PathLike[str]) -> list[str]:
    """Download everything under ``prefix`` into ``local_dir``, mirroring relative paths.

    Returns the relative paths downloaded. Keys that would escape ``local_dir`` (``..``) are
    refused.
    """
    prefix = normalize_prefix(prefix)
    root = Path(local_dir)
    root.mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    for obj in storage.list(prefix):
        rel = obj.uri[len(prefix) :]
        parts = PurePosixPath(rel).parts
        if not rel or any(p in ("..", ".") for p in parts) or rel.startswith("/"):
            raise StorageError(f"{obj.uri}: refusing to download a key outside {prefix}")
        storage.download_file(obj.uri, root.joinpath(*parts))
        done.append(rel)
    return done


# --------------------------------------------------------------------------------------------
# Stage commit protocol


class StageWriter:
    """Writes a stage's outputs under ``prefix`` and commits them with a ``_SUCCESS`` marker.

    Each ``write_*``/``upload_*`` records ``{name: FileEntry}``; :meth:`commit` writes the marker
    last. Until then the prefix is incomplete to every reader, whatever files it holds.
    """

    def __init__(self, storage: Storage, prefix: str) -> None:
        self.storage = storage
        self.prefix = normalize_prefix(prefix)
        self.files: dict[str, FileEntry] = {}
        self.committed = False

    def uri(self, name: str) -> str:
        """Full URI of an output (``name`` is relative, ``/``-separated)."""
        return join_uri(self.prefix, _relative_name(name))

    @property
    def marker_uri(self) -> str:
        """Full URI of this stage's ``_SUCCESS`` marker."""
        return join_uri(self.prefix, MARKER_NAME)

    def _record(self, name: str, entry: FileEntry) -> FileEntry:
        self.files[name] = entry
        return entry

    def _check_open(self) -> None:
        if self.committed:
            raise RuntimeError(f"{self.prefix}: already committed; outputs are never rewritten")

    def write_bytes(self, name: str, data: bytes) -> FileEntry:
        self._check_open()
        return self._record(_relative_name(name), self.storage.write_bytes(self.uri(name), data))

    def write_json(self, name: str, obj: Any) -> FileEntry:
        data = (json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode()
        return self.write_bytes(name, data)

    def write_jsonl(self, name: str, rows: Iterable[dict[str, Any]]) -> FileEntry:
        self._check_open()
        return self._record(_relative_name(name), write_jsonl(self.storage, self.uri(name), rows))

    def write_stream(self, name: str, blocks: Iterable[bytes]) -> FileEntry:
        """Write ``name`` from an iterator of byte blocks (see :func:`write_stream`)."""
        self._check_open()
        return self._record(_relative_name(name), write_stream(self.storage, self.uri(name), blocks))

    def upload_file(self, name: str, local_path: str | os.PathLike[str]) -> FileEntry:
        self._check_open()
        return self._record(
            _relative_name(name), self.storage.upload_file(local_path, self.uri(name))
        )

    def upload_dir(self, name: str, local_dir: str | os.PathLike[str]) -> dict[str, FileEntry]:
        """Upload a directory as ``name/...``; returns entries keyed by ``name/<relpath>``."""
        self._check_open()
        base = _relative_name(name)
        entries = upload_dir(self.storage, local_dir, self.uri(base))
        out = {f"{base}/{rel}": e for rel, e in entries.items()}
        self.files.update(out)
        return out

    def commit(
        self, task_digest: str, extra: dict[str, Any] | None = None, *, now: datetime | None = None
    ) -> dict[str, Any]:
        """Write ``_SUCCESS`` (last) listing every recorded file; returns the marker."""
        self._check_open()
        reserved = {"version", "task", "committedAt", "files"}
        if extra and reserved & extra.keys():
            clash = sorted(reserved & extra.keys())
            raise ValueError(f"extra marker fields may not override {clash}")
        when = (now or datetime.now(UTC)).astimezone(UTC)
        marker: dict[str, Any] = {
            "version": MARKER_VERSION,
            "task": task_digest,
            "committedAt": when.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "files": {n: e.to_json() for n, e in sorted(self.files.items())},
            **(extra or {}),
        }
        data = (json.dumps(marker, indent=2) + "\n").encode()
        self.storage.write_bytes(self.marker_uri, data)
        self.committed = True
        log.info("committed %s (%d files, task %s)", self.prefix, len(self.files), task_digest)
        return marker


def read_marker(storage: Storage, prefix: str) -> dict[str, Any] | None:
    """The parsed ``_SUCCESS`` marker under ``prefix``, or ``None`` when there is none."""
    uri = join_uri(prefix, MARKER_NAME)
    try:
        data = storage.read_bytes(uri)
    except NotFoundError:
        return None
    try:
        marker = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptObjectError(uri, f"marker is not valid JSON: {e}") from None
    if not isinstance(marker, dict):
        raise CorruptObjectError(uri, "marker is not a JSON object")
    if marker.get("version") != MARKER_VERSION:
        raise CorruptObjectError(uri, f"unsupported marker version {marker.get('version')!r}")
    files = marker.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(v, dict)
        and isinstance(v.get("size"), int)
        and isinstance(v.get("sha256"), str)
        for v in files.values()
    ):
        raise CorruptObjectError(uri, 'marker "files" must map names to {size, sha256}')
    return marker


def _hash_stream(storage: Storage, uri: str) -> FileEntry:
    h = _Hasher()
    with storage.open_read(uri) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.entry()


def is_complete(storage: Storage, prefix: str, *, verify_checksums: bool = False) -> bool:
    """Whether ``prefix`` holds a committed stage output.

    ``False`` when there is no marker. With a marker, every listed file must exist with its
    recorded size (and sha256 when ``verify_checksums``); otherwise ``CorruptObjectError`` names
    the first bad file — a committed output that went bad is not something to silently redo.
    """
    prefix = normalize_prefix(prefix)
    marker = read_marker(storage, prefix)
    if marker is None:
        return False
    # One listing instead of a HEAD per file: cheaper on S3 for adapters with many shards.
    sizes = {o.uri: o.size for o in storage.list(prefix)}
    for name, rec in sorted(marker["files"].items()):
        uri = join_uri(prefix, name)
        if uri not in sizes:
            raise CorruptObjectError(uri, f"listed in {MARKER_NAME} but missing")
        if sizes[uri] != rec["size"]:
            raise CorruptObjectError(uri, f"size {sizes[uri]} != recorded {rec['size']}")
        if verify_checksums:
            try:
                actual = _hash_stream(storage, uri)
            except NotFoundError:
                raise CorruptObjectError(uri, f"listed in {MARKER_NAME} but missing") from None
            if actual.sha256 != rec["sha256"]:
                raise CorruptObjectError(
                    uri, f"sha256 {actual.sha256} != recorded {rec['sha256']}"
                )
    return True


def read_committed(storage: Storage, prefix: str, name: str) -> bytes:
    """Read a committed output, checking its size and sha256 against the marker.

    ``NotFoundError`` when the prefix is not committed or the marker does not list ``name``;
    ``CorruptObjectError`` (naming the file's URI) when the bytes do not match.
    """
    prefix = normalize_prefix(prefix)
    name = _relative_name(name)
    marker = read_marker(storage, prefix)
    if marker is None:
        raise NotFoundError(f"{prefix}: not committed (no {MARKER_NAME})")
    rec = marker["files"].get(name)
    uri = join_uri(prefix, name)
    if rec is None:
        raise NotFoundError(f"{uri}: not listed in {join_uri(prefix, MARKER_NAME)}")
    try:
        data = storage.read_bytes(uri)
    except NotFoundError:
        raise CorruptObjectError(uri, f"listed in {MARKER_NAME} but missing") from None
    actual = _entry_of_bytes(data)
    if actual.size != rec["size"]:
        raise CorruptObjectError(uri, f"size {actual.size} != recorded {rec['size']}")
    if actual.sha256 != rec["sha256"]:
        raise CorruptObjectError(uri, f"sha256 {actual.sha256} != recorded {rec['sha256']}")
    return data


def iter_committed(storage: Storage, prefix: str, name: str) -> Iterator[bytes]:
    """Stream a committed output line by line (each line with its ``\\n``), checking its size
    and sha256 against the marker as it goes: memory stays at one line.

    The check can only finish at the end, so ``CorruptObjectError`` (naming the file's URI) comes
    after the last line: a consumer must not publish what it built from the lines before the
    iterator is exhausted (:func:`write_stream` publishes only then). ``NotFoundError`` as
    :func:`read_committed`.
    """
    prefix = normalize_prefix(prefix)
    name = _relative_name(name)
    marker = read_marker(storage, prefix)
    if marker is None:
        raise NotFoundError(f"{prefix}: not committed (no {MARKER_NAME})")
    rec = marker["files"].get(name)
    uri = join_uri(prefix, name)
    if rec is None:
        raise NotFoundError(f"{uri}: not listed in {join_uri(prefix, MARKER_NAME)}")
    h = _Hasher()
    try:
        f = storage.open_read(uri)
    except NotFoundError:
        raise CorruptObjectError(uri, f"listed in {MARKER_NAME} but missing") from None
    with f:
        for line in f:
            h.update(line)
            if h.size > rec["size"]:
                raise CorruptObjectError(uri, f"longer than the recorded {rec['size']} bytes")
            yield line
    actual = h.entry()
    if actual.size != rec["size"]:
        raise CorruptObjectError(uri, f"size {actual.size} != recorded {rec['size']}")
    if actual.sha256 != rec["sha256"]:
        raise CorruptObjectError(uri, f"sha256 {actual.sha256} != recorded {rec['sha256']}")
