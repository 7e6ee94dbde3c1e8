"""`chunks`: boundaries, which committed chunks a retry reuses and which it redoes, and the
streaming concatenation, on file:// storage and on the repo's S3 server (moto)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from selfimprove_workers.chunks import CHUNK_ROWS_ENV, Chunk, Chunks, chunk_size, concat_committed, plan_chunks
from selfimprove_workers.contract import StageTask
from selfimprove_workers.errors import BadInput, CorruptObjectError
from selfimprove_workers.runtime import StageContext
from selfimprove_workers.storage import StageWriter, iter_committed, read_marker, storage_for

KEYS = [f"q{i}" for i in range(7)]


def _ctx(output: str, tmp: Path, *, seed: int = 7, shard: int | None = None, endpoint: str | None = None,
         shards: int = 1) -> StageContext:
    task = StageTask.model_validate({
        "run": {"name": "c"}, "round": 1, "stage": "sample", "output": output, "shards": shards,
        "model": {"base": "/nowhere"}, "inputs": {"questions": "/nowhere/q.jsonl"},
        "storage": {"endpoint": endpoint} if endpoint else {},
        "sampling": {"paths": 2, "temperature": 1.0, "seed": seed}})
    return StageContext(task, tmp, shard)


def _work(calls: list[int]):
    """Writes each chunk's rows as JSONL (one row per key, two lines for odd keys)."""

    def work(chunk: Chunk, writer: StageWriter) -> dict[str, Any]:
        calls.append(chunk.index)
        rows = [{"id": k, "n": j} for k in chunk.rows(KEYS) for j in range(1 + int(k[1:]) % 2)]
        writer.write_jsonl("rows.jsonl", rows)
        return {"rows": len(rows)}

    return work


def _expected() -> bytes:
    return b"".join((json.dumps({"id": k, "n": j}) + "\n").encode() for k in KEYS for j in range(1 + int(k[1:]) % 2))


def test_boundaries_are_a_pure_function_of_the_keys_and_the_size():
    chunks = plan_chunks(KEYS, 3)
    assert [(c.index, c.start, c.stop) for c in chunks] == [(0, 0, 3), (1, 3, 6), (2, 6, 7)]
    assert plan_chunks(list(KEYS), 3) == chunks  # same rows, same size: same chunks, same ids hashes
    assert [len(c) for c in plan_chunks(KEYS, 7)] == [7] and plan_chunks([], 4) == []
    assert plan_chunks(["a", "b", "c"], 2)[0].ids != plan_chunks(["a", "x", "c"], 2)[0].ids
    # keys are hashed as a JSON list: ["a,b"] and ["a", "b"] are different rows
    assert plan_chunks(["a,b"], 2)[0].ids != plan_chunks(["a", "b"], 2)[0].ids
    with pytest.raises(ValueError, match="chunk size"):
        plan_chunks(KEYS, 0)


def test_chunk_size_setting(monkeypatch):
    monkeypatch.delenv(CHUNK_ROWS_ENV, raising=False)
    assert chunk_size(256) == 256
    monkeypatch.setenv(CHUNK_ROWS_ENV, "2")
    assert chunk_size(256) == 2
    for bad in ("two", "0", "-3"):
        monkeypatch.setenv(CHUNK_ROWS_ENV, bad)
        with pytest.raises(BadInput, match=CHUNK_ROWS_ENV):
            chunk_size(256)


def test_retry_reuses_committed_chunks_and_the_concatenation_is_the_whole(tmp_path):
    out = str(tmp_path / "out")
    calls: list[int] = []
    first = Chunks(_ctx(out, tmp_path), KEYS, 3)
    done = first.run(_work(calls))
    assert calls == [0, 1, 2] and [r.reused for r in done] == [False] * 3
    marker = read_marker(storage_for(out), f"{out}/chunks/00001/")
    assert marker is not None and marker["chunk"] == {**plan_chunks(KEYS, 3)[1].identity(), "stats": {"rows": 5}}

    # A preempted attempt: chunk 2's marker never got written.
    (tmp_path / "out" / "chunks" / "00002" / "_SUCCESS").unlink()
    calls.clear()
    retry = Chunks(_ctx(out, tmp_path), KEYS, 3)
    done = retry.run(_work(calls))
    assert calls == [2] and [r.reused for r in done] == [True, True, False]
    assert [r.stats for r in done] == [{"rows": 4}, {"rows": 5}, {"rows": 1}]  # reused chunks keep their stats
    seen: list[dict] = []
    entry = retry.concat("rows.jsonl", on_row=seen.append)
    data = (tmp_path / "out" / "rows.jsonl").read_bytes()
    assert data == _expected() and entry.size == len(data)
    assert [r["id"] for r in seen] == [json.loads(x)["id"] for x in data.splitlines()]
    assert retry.writer.files["rows.jsonl"] == entry  # recorded for the stage's own commit


def test_a_different_size_task_or_rows_redoes_the_chunk(tmp_path):
    out = str(tmp_path / "out")
    Chunks(_ctx(out, tmp_path), KEYS, 3).run(_work([]))

    calls: list[int] = []
    Chunks(_ctx(out, tmp_path), KEYS, 2).run(_work(calls))  # other boundaries: nothing reused
    assert calls == [0, 1, 2, 3]

    calls.clear()
    Chunks(_ctx(out, tmp_path, seed=8), KEYS, 2).run(_work(calls))  # another task digest
    assert calls == [0, 1, 2, 3]

    calls.clear()
    other = ["q0", "q1", "zz", "q3", "q4", "q5", "q6"]  # chunk 1 holds other rows, same range
    Chunks(_ctx(out, tmp_path, seed=8), other, 2).run(_work(calls))
    assert calls == [1]


def test_a_damaged_chunk_is_redone_not_reused(tmp_path):
    out = str(tmp_path / "out")
    Chunks(_ctx(out, tmp_path), KEYS, 3).run(_work([]))
    path = tmp_path / "out" / "chunks" / "00000" / "rows.jsonl"
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"q1"', b'"q9"'))  # same size, other bytes
    calls: list[int] = []
    Chunks(_ctx(out, tmp_path), KEYS, 3).run(_work(calls))
    assert calls == [0] and path.read_bytes() == data


def test_concat_checks_each_file_and_publishes_nothing_when_one_is_bad(tmp_path):
    out = str(tmp_path / "out")
    chunks = Chunks(_ctx(out, tmp_path), KEYS, 3)
    chunks.run(_work([]))
    path = tmp_path / "out" / "chunks" / "00001" / "rows.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"q3"', b'"q8"'))  # damaged after the chunk was checked
    with pytest.raises(CorruptObjectError, match="chunks/00001/rows.jsonl"):
        chunks.concat("rows.jsonl")
    assert not (tmp_path / "out" / "rows.jsonl").exists()
    # its marker is gone, so the retry redoes that chunk (and only it)
    assert not (tmp_path / "out" / "chunks" / "00001" / "_SUCCESS").exists()
    calls: list[int] = []
    Chunks(_ctx(out, tmp_path), KEYS, 3).run(_work(calls))
    assert calls == [1]


def test_iter_committed_notices_a_longer_file(tmp_path):
    w = StageWriter(storage_for(str(tmp_path)), str(tmp_path / "p"))
    w.write_bytes("a.jsonl", b'{"a": 1}\n')
    w.commit("sha256:x")
    (tmp_path / "p" / "a.jsonl").write_bytes(b'{"a": 1}\n{"a": 2}\n')
    with pytest.raises(CorruptObjectError, match="longer than"):
        list(iter_committed(storage_for(str(tmp_path)), str(tmp_path / "p"), "a.jsonl"))


def test_shards_keep_their_chunks_under_their_own_prefix(tmp_path):
    out = str(tmp_path / "out")
    for shard in (0, 1):
        ctx = _ctx(out, tmp_path, shard=shard, shards=2)
        Chunks(ctx, ctx.shard_rows(KEYS), 2).run(_work([]))
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("_SUCCESS")) == [
        "shards/00000/chunks/00000/_SUCCESS", "shards/00000/chunks/00001/_SUCCESS",
        "shards/00001/chunks/00000/_SUCCESS", "shards/00001/chunks/00001/_SUCCESS"]


def test_on_s3(s3_server, s3_bucket, tmp_path):
    out = f"{s3_bucket}/runs/out"
    calls: list[int] = []
    Chunks(_ctx(out, tmp_path, endpoint=s3_server.endpoint), KEYS, 3).run(_work(calls))
    s3_server.client().delete_object(Bucket=s3_bucket[len("s3://"):], Key="runs/out/chunks/00001/_SUCCESS")
    calls.clear()
    ctx = _ctx(out, tmp_path, endpoint=s3_server.endpoint)
    chunks = Chunks(ctx, KEYS, 3)
    chunks.run(_work(calls))
    assert calls == [1]
    chunks.concat("rows.jsonl")
    assert ctx.storage.read_bytes(f"{out}/rows.jsonl") == _expected()
    # the same streaming concatenation over any committed prefixes (a merge over shards)
    merged = StageWriter(ctx.storage, f"{s3_bucket}/merged")
    concat_committed(merged, [f"{out}/chunks/00002/", f"{out}/chunks/00000/"], "rows.jsonl")
    assert ctx.storage.read_bytes(f"{s3_bucket}/merged/rows.jsonl") == \
        ctx.storage.read_bytes(f"{out}/chunks/00002/rows.jsonl") + ctx.storage.read_bytes(f"{out}/chunks/00000/rows.jsonl")
