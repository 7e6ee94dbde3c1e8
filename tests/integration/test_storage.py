"""Storage backends and the stage commit protocol, each behaviour on files and on S3 (moto)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st_h
from selfimprove_workers import storage as st
from selfimprove_workers.errors import (
    BadInput,
    CorruptObjectError,
    DataError,
    NotFoundError,
    StorageError,
)
from selfimprove_workers.storage import (
    FileEntry,
    FileStorage,
    ObjectInfo,
    S3Storage,
    StageWriter,
    download_dir,
    file_entry_of,
    is_complete,
    read_committed,
    read_jsonl,
    read_marker,
    storage_for,
    upload_dir,
    write_jsonl,
)

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Backend:
    """A storage plus a root prefix that is private to one test."""

    kind: str
    storage: st.Storage
    root: str

    def uri(self, name: str) -> str:
        return st.join_uri(self.root, name)

    def display(self, name: str) -> str:
        return st.display_name(self.uri(name))


@pytest.fixture(params=["path", "file-uri", pytest.param("s3", marks=pytest.mark.s3)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "path":
        return Backend("file", FileStorage(), str(tmp_path / "store"))
    if request.param == "file-uri":
        return Backend("file", storage_for(f"file://{tmp_path}/store"), f"file://{tmp_path}/store/")
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Backend("s3", S3Storage(endpoint=server.endpoint), f"{bucket}/root")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------
# URIs


def test_uri_helpers() -> None:
    assert st.normalize_prefix("s3://b") == "s3://b/"
    assert st.normalize_prefix("s3://b/x/") == "s3://b/x/"
    assert st.join_uri("s3://b/x", "y/z.json") == "s3://b/x/y/z.json"
    assert st.join_uri("/tmp/a/", "b") == "/tmp/a/b"
    assert st.parse_s3_uri("s3://bucket/a/b") == ("bucket", "a/b")
    assert st.parse_s3_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(StorageError):
        st.parse_s3_uri("s3:///key")
    assert st.display_name("file:///data/x.jsonl") == "/data/x.jsonl"
    assert st.display_name("data/x.jsonl") == "data/x.jsonl"
    assert st.display_name("s3://b/x.jsonl") == "s3://b/x.jsonl"


def test_storage_for_picks_backend_by_scheme() -> None:
    assert isinstance(storage_for("s3://bucket/key"), S3Storage)
    assert isinstance(storage_for("file:///tmp/x"), FileStorage)
    assert isinstance(storage_for("relative/path"), FileStorage)
    assert isinstance(storage_for(Path("/abs/path")), FileStorage)  # type: ignore[arg-type]
    with pytest.raises(StorageError, match="unsupported storage scheme"):
        storage_for("gs://bucket/key")
    with pytest.raises(StorageError, match="absolute"):
        FileStorage().read_bytes("file://relative/x")


def test_import_does_not_load_boto3() -> None:
    code = (
        "import sys, selfimprove_workers.storage, selfimprove_workers.data\n"
        "bad = [m for m in ('boto3', 'botocore', 'torch', 'vllm', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "workers")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ------------------------------------------------------------------------------------------
# Basic operations, both backends


def test_round_trip(backend: Backend) -> None:
    s = backend.storage
    uri = backend.uri("a/b/c.bin")
    data = b"\x00hello\nworld\xff" * 100
    entry = s.write_bytes(uri, data)
    assert entry == FileEntry(len(data), sha(data))
    assert s.exists(uri)
    assert s.read_bytes(uri) == data
    with s.open_read(uri) as f:
        assert f.read(6) == b"\x00hello"
        assert f.readline() == b"\n"
        assert f.read() == data[7:]
    # Overwrite replaces the whole content.
    s.write_bytes(uri, b"short")
    assert s.read_bytes(uri) == b"short"
    s.delete(uri)
    assert not s.exists(uri)
    s.delete(uri)  # deleting a missing object is fine, as on S3


def test_missing_objects_raise_not_found_naming_the_uri(backend: Backend, tmp_path: Path) -> None:
    s = backend.storage
    uri = backend.uri("nope/missing.json")
    assert not s.exists(uri)
    for call in (
        lambda: s.read_bytes(uri),
        lambda: s.open_read(uri),
        lambda: s.download_file(uri, tmp_path / "dl"),
    ):
        with pytest.raises(NotFoundError) as ei:
            call()
        assert uri in str(ei.value)
        assert isinstance(ei.value, BadInput)  # permanent: the user must fix the reference
    assert not (tmp_path / "dl").exists()
    # A prefix is not an object.
    s.write_bytes(backend.uri("dir/x"), b"x")
    assert not s.exists(backend.uri("dir"))
    assert not s.exists(backend.uri("dir/"))


def test_list_recursive_sorted_with_sizes(backend: Backend) -> None:
    s = backend.storage
    names = {"b.txt": b"bb", "a/1.txt": b"1", "a/deep/2.txt": b"22", "ab/3.txt": b"333"}
    for name, data in names.items():
        s.write_bytes(backend.uri(name), data)
    got = s.list(backend.root)
    assert got == sorted(
        (ObjectInfo(backend.uri(n), len(d)) for n, d in names.items()), key=lambda o: o.uri
    )
    # With or without the trailing slash; "a" must not match the sibling "ab".
    for prefix in (backend.uri("a"), backend.uri("a/")):
        assert [o.uri for o in s.list(prefix)] == [backend.uri("a/1.txt"), backend.uri("a/deep/2.txt")]
    assert s.list(backend.uri("missing")) == []


def test_upload_and_download_file(backend: Backend, tmp_path: Path) -> None:
    s = backend.storage
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    entry = s.upload_file(src, backend.uri("up/file.bin"))
    assert entry == file_entry_of(src)
    dst = tmp_path / "out" / "nested" / "file.bin"
    s.download_file(backend.uri("up/file.bin"), dst)
    assert dst.read_bytes() == src.read_bytes()
    with pytest.raises(NotFoundError):
        s.upload_file(tmp_path / "no-such-file", backend.uri("x"))


@pytest.mark.s3
def test_s3_multipart_upload(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    s = S3Storage(endpoint=s3_server.endpoint)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(9 * 1024 * 1024))  # above boto3's 8 MiB multipart threshold
    uri = f"{s3_bucket}/big.bin"
    assert s.upload_file(src, uri) == file_entry_of(src)
    head = s3_server.client().head_object(Bucket=s3_bucket[5:], Key="big.bin")
    assert "-" in head["ETag"]  # multipart ETags end in -<parts>
    dst = tmp_path / "back.bin"
    s.download_file(uri, dst)
    assert file_entry_of(dst) == file_entry_of(src)


@pytest.mark.s3
def test_s3_list_paginates(s3_server: Any, s3_bucket: str) -> None:
    s = S3Storage(endpoint=s3_server.endpoint, list_page_size=2)
    for i in range(7):
        s.write_bytes(f"{s3_bucket}/p/{i}.txt", b"x" * i)
    got = s.list(f"{s3_bucket}/p")
    assert [(o.uri, o.size) for o in got] == [(f"{s3_bucket}/p/{i}.txt", i) for i in range(7)]


@pytest.mark.s3
def test_s3_missing_bucket_is_not_found(s3_server: Any) -> None:
    s = S3Storage(endpoint=s3_server.endpoint)
    with pytest.raises(NotFoundError, match=r"s3://no-such-bucket-x/k: bucket not found"):
        s.read_bytes("s3://no-such-bucket-x/k")
    with pytest.raises(NotFoundError):
        s.list("s3://no-such-bucket-x/")


@pytest.mark.s3
def test_s3_endpoint_and_region_from_environment(
    s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    s = storage_for(f"{s3_bucket}/k")
    assert isinstance(s, S3Storage) and s.region == "eu-west-3"
    s.write_bytes(f"{s3_bucket}/k", b"via env")
    assert s.read_bytes(f"{s3_bucket}/k") == b"via env"
    # Clients are cached per (endpoint, region, ...).
    assert storage_for(f"{s3_bucket}/other").client is s.client  # type: ignore[attr-defined]
    assert S3Storage(region="us-west-2").client is not s.client  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------
# Atomic local writes


def _tmp_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if st._TMP_TAG in p.name]


def test_file_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = FileStorage()
    target = tmp_path / "deep" / "dir" / "out.json"
    s.write_bytes(str(target), b"old")  # creates parent directories
    assert target.read_bytes() == b"old"
    assert _tmp_leftovers(tmp_path) == []

    # A crash between writing and renaming leaves the old content and no temp file.
    def boom(src: str, dst: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StorageError, match=r"write .*out.json: Input/output error"):
        s.write_bytes(str(target), b"new")
    with pytest.raises(StorageError):
        write_jsonl(s, str(target), [{"a": 1}])
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert _tmp_leftovers(tmp_path) == []

    # A failing producer also leaves nothing behind.
    def rows() -> Any:
        yield {"a": 1}
        raise RuntimeError("producer died")

    with pytest.raises(RuntimeError):
        write_jsonl(s, str(target), rows())
    assert target.read_bytes() == b"old"
    assert _tmp_leftovers(tmp_path) == []


def test_file_listing_skips_crash_leftovers(tmp_path: Path) -> None:
    s = FileStorage()
    s.write_bytes(str(tmp_path / "a.txt"), b"a")
    (tmp_path / f".a.txt{st._TMP_TAG}deadbeef").write_bytes(b"half")
    assert [o.uri for o in s.list(str(tmp_path))] == [f"{tmp_path}/a.txt"]


def test_file_write_under_a_file_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(StorageError, match=str(tmp_path / "f" / "x")):
        FileStorage().write_bytes(str(tmp_path / "f" / "x"), b"x")


# ------------------------------------------------------------------------------------------
# JSONL


class _CountingReader(io.RawIOBase):
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.inner.read(len(b))
        b[: len(data)] = data
        self.consumed += len(data)
        return len(data)

    def close(self) -> None:
        self.inner.close()
        super().close()


def test_jsonl_streams_large_files(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    s = backend.storage
    uri = backend.uri("rows.jsonl")
    n = 40_000
    rows = ({"i": i, "text": f"row {i} ünïcode", "xs": [i, i * 2]} for i in range(n))
    entry = write_jsonl(s, uri, rows)  # a generator: never materialised
    data = s.read_bytes(uri)
    assert entry == FileEntry(len(data), sha(data))
    assert len(data) > 2_000_000

    seen = 0
    for lineno, obj in read_jsonl(s, uri):
        assert obj["i"] == lineno - 1
        seen += 1
    assert seen == n

    # Taking the first row must read a small part of the object, not all of it.
    readers: list[_CountingReader] = []
    real_open = s.open_read

    def counting_open(u: str) -> Any:
        r = _CountingReader(real_open(u))
        readers.append(r)
        return io.BufferedReader(r, 8192)

    monkeypatch.setattr(s, "open_read", counting_open)
    it = read_jsonl(s, uri)
    assert next(it) == (1, {"i": 0, "text": "row 0 ünïcode", "xs": [0, 0]})
    it.close()
    assert 0 < readers[0].consumed < len(data) // 10


_json_scalars = st_h.none() | st_h.booleans() | st_h.integers() | st_h.text()
_json_values = st_h.recursive(
    _json_scalars,
    lambda inner: st_h.lists(inner, max_size=3) | st_h.dictionaries(st_h.text(), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st_h.lists(st_h.dictionaries(st_h.text(), _json_values, max_size=4), max_size=8))
def test_jsonl_round_trip_property(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    # Any text (newlines, U+2028, non-ASCII) must survive the one-row-per-line encoding.
    s = FileStorage()
    uri = str(tmp_path / "prop.jsonl")
    entry = write_jsonl(s, uri, rows)
    assert entry == file_entry_of(uri)
    assert [obj for _, obj in read_jsonl(s, uri)] == rows
    assert [n for n, _ in read_jsonl(s, uri)] == list(range(1, len(rows) + 1))


def test_write_jsonl_rejects_non_dict_rows(backend: Backend) -> None:
    with pytest.raises(TypeError, match="rows must be dicts"):
        write_jsonl(backend.storage, backend.uri("x.jsonl"), [{"a": 1}, [1, 2]])  # type: ignore[list-item]
    assert not backend.storage.exists(backend.uri("x.jsonl"))


def test_read_jsonl_skips_blank_lines_and_reports_bad_lines(backend: Backend) -> None:
    s = backend.storage
    uri = backend.uri("data.jsonl")
    s.write_bytes(uri, b'\xef\xbb\xbf{"a": 1}\n\n   \r\n{"b": 2}\r\n{"c": 3}')  # BOM, CRLF, no final \n
    assert list(read_jsonl(s, uri)) == [(1, {"a": 1}), (4, {"b": 2}), (5, {"c": 3})]

    d = backend.display("bad.jsonl")
    cases = {
        b'{"a": 1}\n{"a" 2}\n': f"{d}:2: invalid JSON: Expecting ':' delimiter at column 6",
        b'{"a": 1}\n\n[1, 2]\n': f"{d}:3: expected a JSON object, got array",
        b'"text"\n': f"{d}:1: expected a JSON object, got string",
        b'{"a": 1}\n{"a": "\xff"}\n': f"{d}:2: invalid UTF-8 at byte 7",
        b'{"a": 1}\n{"a": 1}}\n': f"{d}:2: invalid JSON: Extra data at column 9",
    }
    for content, message in cases.items():
        s.write_bytes(backend.uri("bad.jsonl"), content)
        with pytest.raises(DataError) as ei:
            list(read_jsonl(s, backend.uri("bad.jsonl")))
        assert str(ei.value) == message
    with pytest.raises(NotFoundError):
        list(read_jsonl(s, backend.uri("missing.jsonl")))


def test_file_uri_display_is_plain_path(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text("{}\nnot json\n")
    with pytest.raises(DataError) as ei:
        list(read_jsonl(FileStorage(), f"file://{tmp_path}/x.jsonl"))
    assert str(ei.value).startswith(f"{tmp_path}/x.jsonl:2: invalid JSON:")


# ------------------------------------------------------------------------------------------
# Directories


def _make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "adapter_config.json": b'{"r": 8}',
        "adapter_model.safetensors": os.urandom(50_000),
        "sub/dir/tokenizer.json": b"{}",
        "sub/empty.txt": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_upload_and_download_dir(backend: Backend, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = _make_tree(src)
    entries = upload_dir(backend.storage, src, backend.uri("adapter"))
    assert entries == {rel: FileEntry(len(d), sha(d)) for rel, d in sorted(files.items())}
    assert {o.uri for o in backend.storage.list(backend.uri("adapter"))} == {
        backend.uri(f"adapter/{rel}") for rel in files
    }
    dst = tmp_path / "dst"
    got = download_dir(backend.storage, backend.uri("adapter/"), dst)
    assert sorted(got) == sorted(files)
    for rel, data in files.items():
        assert (dst / rel).read_bytes() == data
    with pytest.raises(NotFoundError):
        upload_dir(backend.storage, tmp_path / "nope", backend.uri("x"))


@pytest.mark.s3
def test_download_dir_refuses_keys_escaping_the_target(
    s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    s3_server.client().put_object(Bucket=s3_bucket[5:], Key="p/../../evil", Body=b"x")
    with pytest.raises(StorageError, match="refusing"):
        download_dir(S3Storage(endpoint=s3_server.endpoint), f"{s3_bucket}/p", tmp_path / "d")
    assert not (tmp_path / "evil").exists()


# ------------------------------------------------------------------------------------------
# Commit protocol


def _write_stage(backend: Backend, tmp_path: Path) -> StageWriter:
    w = StageWriter(backend.storage, backend.uri("round-001/sample"))
    w.write_jsonl("samples.jsonl", ({"q": i, "a": str(i)} for i in range(100)))
    w.write_json("result.json", {"accuracy": 0.5})
    w.write_bytes("notes/readme.txt", b"hello")
    (tmp_path / "local.bin").write_bytes(b"\x01" * 1000)
    w.upload_file("local.bin", tmp_path / "local.bin")
    _make_tree(tmp_path / "adapter")
    w.upload_dir("adapter", tmp_path / "adapter")
    return w


def test_uncommitted_stage_is_not_complete(backend: Backend, tmp_path: Path) -> None:
    w = _write_stage(backend, tmp_path)  # every output written, then "crash": no commit
    assert len(backend.storage.list(w.prefix)) == 8
    assert read_marker(backend.storage, w.prefix) is None
    assert is_complete(backend.storage, w.prefix) is False
    assert is_complete(backend.storage, w.prefix, verify_checksums=True) is False
    with pytest.raises(NotFoundError, match="not committed"):
        read_committed(backend.storage, w.prefix, "result.json")
    assert is_complete(backend.storage, backend.uri("never-written")) is False


def test_commit_writes_marker_last(backend: Backend, tmp_path: Path) -> None:
    w = _write_stage(backend, tmp_path)
    order: list[str] = []
    real_write = backend.storage.write_bytes

    def spy(uri: str, data: bytes) -> FileEntry:
        order.append(uri)
        return real_write(uri, data)

    w.storage = _Spy(backend.storage, spy)  # type: ignore[assignment]
    now = datetime(2026, 11, 21, 12, 30, 5, tzinfo=UTC)
    marker = w.commit("sha256:abc", {"stage": "sample", "rows": 100}, now=now)
    assert order == [w.marker_uri]

    assert read_marker(backend.storage, w.prefix) == marker
    assert marker["version"] == 1
    assert marker["task"] == "sha256:abc"
    assert marker["committedAt"] == "2026-11-21T12:30:05Z"
    assert marker["stage"] == "sample" and marker["rows"] == 100
    assert sorted(marker["files"]) == sorted(
        ["samples.jsonl", "result.json", "notes/readme.txt", "local.bin"]
        + [f"adapter/{rel}" for rel in _make_tree(tmp_path / "t")]
    )
    for name, rec in marker["files"].items():
        data = backend.storage.read_bytes(w.uri(name))
        assert rec == {"size": len(data), "sha256": sha(data)}

    assert is_complete(backend.storage, w.prefix)
    assert is_complete(backend.storage, w.prefix, verify_checksums=True)
    assert json.loads(read_committed(backend.storage, w.prefix, "result.json")) == {"accuracy": 0.5}
    with pytest.raises(NotFoundError, match="not listed"):
        read_committed(backend.storage, w.prefix, "other.json")

    with pytest.raises(RuntimeError, match="already committed"):
        w.write_bytes("late.txt", b"x")
    with pytest.raises(RuntimeError, match="already committed"):
        w.commit("sha256:abc")


class _Spy:
    """Delegates to a storage, intercepting write_bytes."""

    def __init__(self, inner: st.Storage, write_bytes: Any) -> None:
        self._inner = inner
        self.write_bytes = write_bytes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_stage_writer_validates_names_and_extra(backend: Backend) -> None:
    w = StageWriter(backend.storage, backend.uri("stage"))
    for bad in ("", "/abs", "../up", "a/../b", "_SUCCESS", "dir/", "a//b"):
        with pytest.raises(ValueError):
            w.write_bytes(bad, b"x")
    with pytest.raises(ValueError, match="override"):
        w.commit("t", {"files": {}})
    assert w.uri("a/b.json") == backend.uri("stage/a/b.json")


def test_tampered_committed_file_is_detected(backend: Backend, tmp_path: Path) -> None:
    w = _write_stage(backend, tmp_path)
    w.commit("t1")
    uri = w.uri("result.json")
    original = backend.storage.read_bytes(uri)
    tampered = original.replace(b"0.5", b"0.9")
    assert len(tampered) == len(original) and tampered != original
    backend.storage.write_bytes(uri, tampered)

    # Same size: only the checksum can tell.
    assert is_complete(backend.storage, w.prefix) is True
    with pytest.raises(CorruptObjectError) as ei:
        is_complete(backend.storage, w.prefix, verify_checksums=True)
    assert ei.value.key == uri and uri in str(ei.value) and "sha256" in str(ei.value)
    with pytest.raises(CorruptObjectError) as ei:
        read_committed(backend.storage, w.prefix, "result.json")
    assert ei.value.key == uri and uri in str(ei.value)

    # A size change is caught even without checksums.
    backend.storage.write_bytes(uri, original + b" ")
    with pytest.raises(CorruptObjectError, match="size"):
        is_complete(backend.storage, w.prefix)


def test_deleted_committed_file_is_detected(backend: Backend, tmp_path: Path) -> None:
    w = _write_stage(backend, tmp_path)
    w.commit("t1")
    uri = w.uri("adapter/sub/dir/tokenizer.json")
    backend.storage.delete(uri)
    for verify in (False, True):
        with pytest.raises(CorruptObjectError) as ei:
            is_complete(backend.storage, w.prefix, verify_checksums=verify)
        assert ei.value.key == uri and "missing" in str(ei.value)
    with pytest.raises(CorruptObjectError) as ei:
        read_committed(backend.storage, w.prefix, "adapter/sub/dir/tokenizer.json")
    assert ei.value.key == uri


def test_corrupt_marker(backend: Backend) -> None:
    prefix = backend.uri("stage")
    for content, reason in (
        (b"{not json", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b'{"version": 9, "files": {}}', "unsupported marker version"),
        (b'{"version": 1, "files": {"a": 3}}', "must map names"),
    ):
        backend.storage.write_bytes(st.join_uri(prefix, "_SUCCESS"), content)
        with pytest.raises(CorruptObjectError, match=reason) as ei:
            is_complete(backend.storage, prefix)
        assert ei.value.key == st.join_uri(prefix, "_SUCCESS")


# ------------------------------------------------------------------------------------------
# Credentials never leak

FAKE_SECRET = "SeCrEt-XYZZY-do-not-leak-0123456789abcdef"
FAKE_TOKEN = "ToKeN-PLUGH-do-not-leak-9876543210fedcba"


def _free_closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _assert_clean(err: BaseException, caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in str(err)
        assert secret not in repr(err)
        assert secret not in caplog.text
        for record in caplog.records:
            assert secret not in record.getMessage()


@pytest.mark.s3
def test_unreachable_endpoint_error_names_uri_not_secret(
    s3_server: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    caplog.set_level(logging.DEBUG)  # root at DEBUG: botocore's own debug logs are captured too
    endpoint = f"http://127.0.0.1:{_free_closed_port()}"
    s = S3Storage(endpoint=endpoint, max_attempts=1, connect_timeout=2)
    for call in (
        lambda: s.read_bytes("s3://bucket/some/key.json"),
        lambda: s.write_bytes("s3://bucket/some/key.json", b"x"),
        lambda: s.list("s3://bucket/some/"),
    ):
        with pytest.raises(StorageError) as ei:
            call()
        assert not isinstance(ei.value, NotFoundError)  # transient: retried by the control plane
        msg = str(ei.value)
        assert "s3://bucket/some/" in msg and "EndpointConnectionError" in msg and endpoint in msg
        _assert_clean(ei.value, caplog, FAKE_SECRET)


@pytest.mark.s3
def test_session_token_never_in_our_logs_or_errors(
    s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # botocore's DEBUG request logs contain X-Amz-Security-Token; we never enable them, and our
    # own logger must not echo anything similar at any level.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", FAKE_TOKEN)
    caplog.set_level(logging.DEBUG, logger="selfimprove_workers")
    s = S3Storage(endpoint=s3_server.endpoint, max_attempts=1)
    s.write_bytes(f"{s3_bucket}/k", b"data")
    w = StageWriter(s, f"{s3_bucket}/stage")
    w.write_bytes("x", b"x")
    w.commit("t")
    with pytest.raises(NotFoundError) as ei:
        s.read_bytes(f"{s3_bucket}/missing")
    assert any(r.name.startswith("selfimprove_workers") for r in caplog.records)
    _assert_clean(ei.value, caplog, FAKE_SECRET, FAKE_TOKEN)


@pytest.mark.s3
def test_access_denied_and_bad_signature(
    s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import boto3
    from s3_fixtures import moto_auth_enforced

    iam = boto3.client("iam", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    iam.create_user(UserName="no-permissions")
    key = iam.create_access_key(UserName="no-permissions")["AccessKey"]
    secret = key["SecretAccessKey"]
    caplog.set_level(logging.DEBUG)
    uri = f"{s3_bucket}/secret/thing.json"

    with moto_auth_enforced(s3_server):
        # A real user without any policy: S3 answers AccessDenied.
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        s = S3Storage(endpoint=s3_server.endpoint, max_attempts=1)
        with pytest.raises(StorageError) as ei:
            s.write_bytes(uri, b"x")
        assert not isinstance(ei.value, NotFoundError)
        assert uri in str(ei.value) and "AccessDenied" in str(ei.value)
        _assert_clean(ei.value, caplog, secret)

        # The right key id with a wrong secret: the signature does not match.
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
        s = S3Storage(endpoint=s3_server.endpoint, max_attempts=1)
        with pytest.raises(StorageError) as ei:
            s.read_bytes(uri)
        assert uri in str(ei.value) and "SignatureDoesNotMatch" in str(ei.value)
        _assert_clean(ei.value, caplog, FAKE_SECRET, secret)


def test_redaction_of_known_secrets_and_url_userinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    from selfimprove_workers.redaction import redact

    assert st.redact is redact  # storage errors use the one redactor
    text = redact(f"failed at http://user:{FAKE_SECRET}@host:9000/b with {FAKE_SECRET}")
    assert FAKE_SECRET not in text and "user" not in text
    assert text == "failed at http://***@host:9000/b with ***"
