"""Chunked work inside one stage (or one shard): a preempted pod loses at most one chunk.

A long stage (sample: hours of generation; filter: scoring every candidate) splits its input
rows into fixed-size chunks, commits each chunk's output files as soon as the chunk is done, and
at the end streams the chunks' files, in order, into the stage's own outputs. A retry (same task
digest) skips every chunk already committed and continues with the first missing one.

Layout and markers
    Chunk k of a stage whose output prefix is ``P`` (``ctx.prefix``: a shard's prefix when the
    stage is sharded, so shards × chunks compose) lives under ``P/chunks/<k:05d>/`` and is
    committed like a stage output (`storage.StageWriter`: files first, ``_SUCCESS`` last), its
    marker carrying the task digest and ``"chunk": {index, start, stop, size, ids, stats}``:
    the row range, the chunk size, a sha256 of the chunk's row keys (``ids``) and the stage's
    own per-chunk figures (``stats``: e.g. generation seconds, which a resumed run must report
    for chunks it did not generate itself). A marker is reused only when the digest and every
    field but ``stats`` equal what this run would write, and its files pass their size and
    sha256 check; anything else (another task, another chunk size, other rows, a damaged file)
    is deleted and the chunk is done again — never reused.

Boundaries
    Chunk k holds rows ``[k·size, (k+1)·size)``: a pure function of the row list and the size,
    so a retry cuts the rows where the first attempt did. Byte identity with an unchunked run is
    the stage's job: each row's output must depend on the row alone (the sample stage seeds each
    question by its id, `GenerationParams.seed_keys`), and the final file is the chunk files
    concatenated byte for byte.

Chunk size
    Each stage passes its own default (in rows of *its* input: questions for sample, candidates
    for filter) to :func:`chunk_size`; the environment variable ``SELFIMPROVE_CHUNK_ROWS``
    overrides it (tests use 2). The size is recorded in each chunk's marker, so a retry with
    another size redoes the chunks whose boundaries moved instead of mixing two cuttings.

API (a stage's use)::

    from ..chunks import Chunks, chunk_size

    chunks = Chunks(ctx, keys=[q.id for q in questions], size=chunk_size(256))

    def work(chunk: Chunk, writer: StageWriter) -> dict:      # called for missing chunks only
        rows = chunk.rows(questions)                           # questions[chunk.start:chunk.stop]
        writer.write_jsonl("samples.jsonl", ...)               # the chunk's own files
        return {"seconds": 12.5}                               # → marker "stats"; JSON values

    done = chunks.run(work)          # [ChunkResult(chunk, stats, reused)], in chunk order
    chunks.concat("samples.jsonl", on_row=acc.add)   # streams into ctx.writer, row by row

`concat_committed` does the same streaming concatenation over any committed prefixes (a
sharded stage's merge over its shards). Nothing here holds more than one line of output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import BadInput, CorruptObjectError
from .storage import FileEntry, StageWriter, Storage, is_complete, iter_committed, join_uri, read_marker

if TYPE_CHECKING:
    from .runtime import StageContext

__all__ = ["CHUNK_ROWS_ENV", "CHUNKS_DIR", "Chunk", "ChunkResult", "Chunks", "chunk_size", "plan_chunks",
           "chunk_prefix", "concat_committed"]

CHUNK_ROWS_ENV = "SELFIMPROVE_CHUNK_ROWS"
CHUNKS_DIR = "chunks"

log = logging.getLogger("selfimprove.chunks")
T = TypeVar("T")


def chunk_size(default: int) -> int:
    """The chunk size in rows: ``$SELFIMPROVE_CHUNK_ROWS`` when set, else the stage's
    ``default``. A bad value is a BadInput naming the variable."""
    text = os.environ.get(CHUNK_ROWS_ENV)
    if text is None or text == "":
        value = default
    else:
        try:
            value = int(text)
        except ValueError:
            raise BadInput(f"{CHUNK_ROWS_ENV}: {text!r} is not an integer") from None
    if value < 1:
        raise BadInput(f"{CHUNK_ROWS_ENV}: {value} must be at least 1 (rows per chunk)")
    return value


@dataclass(frozen=True)
class Chunk:
    """Rows ``[start, stop)`` of the stage's input, chunk ``index`` of a cutting by ``size``;
    ``ids`` is a sha256 of those rows' keys."""

    index: int
    start: int
    stop: int
    size: int
    ids: str

    def rows(self, rows: Sequence[T]) -> Sequence[T]:
        return rows[self.start:self.stop]

    def __len__(self) -> int:
        return self.stop - self.start

    def identity(self) -> dict[str, Any]:
        """What a committed chunk's marker must hold to be reused."""
        return {"index": self.index, "start": self.start, "stop": self.stop, "size": self.size, "ids": self.ids}


def _ids_hash(keys: Sequence[str]) -> str:
    # JSON, not a joined string: keys are user data and may hold any separator.
    return "sha256:" + hashlib.sha256(json.dumps(list(keys), ensure_ascii=False).encode()).hexdigest()


def plan_chunks(keys: Sequence[str], size: int) -> list[Chunk]:
    """The chunks of rows keyed ``keys`` (in row order) at ``size`` rows each; the last may be
    shorter, and no rows make no chunks."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [Chunk(k, start, min(start + size, len(keys)), size, _ids_hash(keys[start:start + size]))
            for k, start in enumerate(range(0, len(keys), size))]


def chunk_prefix(prefix: str, index: int) -> str:
    return join_uri(prefix, f"{CHUNKS_DIR}/{index:05d}/")


@dataclass
class ChunkResult:
    chunk: Chunk
    stats: dict[str, Any] = field(default_factory=dict)
    reused: bool = False  # committed by an earlier attempt, not done by this one


WorkFn = Callable[[Chunk, StageWriter], "dict[str, Any] | None"]


class Chunks:
    """The chunks of one stage (or shard) run: see the module docstring."""

    def __init__(self, ctx: StageContext, keys: Sequence[str], size: int):
        self.storage: Storage = ctx.storage
        self.writer: StageWriter = ctx.writer
        self.prefix = ctx.prefix
        self.digest = ctx.task.digest()
        self.log = ctx.log
        self.chunks = plan_chunks(keys, size)
        self.results: list[ChunkResult] = []

    def prefix_of(self, chunk: Chunk) -> str:
        return chunk_prefix(self.prefix, chunk.index)

    def committed(self, chunk: Chunk) -> dict[str, Any] | None:
        """The stats of ``chunk`` when an earlier attempt committed exactly this chunk of this
        task, intact; else None, after deleting a marker that does not qualify (so that a crash
        while the chunk is redone cannot leave a marker over half-rewritten files)."""
        prefix = self.prefix_of(chunk)
        marker_uri = join_uri(prefix, "_SUCCESS")
        try:
            marker = read_marker(self.storage, prefix)
            if marker is None:
                return None
            recorded = marker.get("chunk")
            if marker.get("task") == self.digest and isinstance(recorded, dict) and \
                    {k: v for k, v in recorded.items() if k != "stats"} == chunk.identity() and \
                    is_complete(self.storage, prefix, verify_checksums=True):
                stats = recorded.get("stats")
                return stats if isinstance(stats, dict) else {}
            why = "another task" if marker.get("task") != self.digest else f"other rows or size ({recorded})"
        except CorruptObjectError as exc:
            why = f"damaged: {exc}"
        self.log.warning(f"chunk {chunk.index}: the committed chunk at {prefix} is not this one ({why}); redoing it")
        self.storage.delete(marker_uri)
        return None

    def run(self, work: WorkFn) -> list[ChunkResult]:
        """Every chunk in order: a committed one is reused, a missing one is `work(chunk,
        writer)`, whose files (written through `writer`, under the chunk's prefix) are then
        committed with the stats it returns. Returns one result per chunk (also `.results`)."""
        self.results = []
        reused = 0
        for chunk in self.chunks:
            stats = self.committed(chunk)
            if stats is not None:
                reused += 1
                self.results.append(ChunkResult(chunk, stats, reused=True))
                continue
            writer = StageWriter(self.storage, self.prefix_of(chunk))
            stats = dict(work(chunk, writer) or {})
            writer.commit(self.digest, {"chunk": {**chunk.identity(), "stats": stats}})
            self.log.info(f"chunk {chunk.index + 1}/{len(self.chunks)} committed "
                          f"(rows {chunk.start}-{chunk.stop - 1})")
            self.results.append(ChunkResult(chunk, stats, reused=False))
        if reused:
            self.log.info(f"{reused} of {len(self.chunks)} chunks were committed by an earlier attempt; reused")
        return self.results

    def concat(self, name: str, on_row: Callable[[dict[str, Any]], None] | None = None) -> FileEntry:
        """Stream file ``name`` of every chunk, in order, into the stage's output ``name``
        (`ctx.writer`: committed with the stage); ``on_row`` sees each row on the way, parsed.
        A chunk found damaged loses its marker (its retry redoes it) and the error propagates."""
        try:
            return concat_committed(self.writer, [self.prefix_of(c) for c in self.chunks], name, on_row)
        except CorruptObjectError as exc:
            for c in self.chunks:
                if exc.key.startswith(self.prefix_of(c)):
                    self.storage.delete(join_uri(self.prefix_of(c), "_SUCCESS"))
            raise


def concat_committed(writer: StageWriter, prefixes: Sequence[str], name: str,
                     on_row: Callable[[dict[str, Any]], None] | None = None) -> FileEntry:
    """Write ``name`` under ``writer`` as the byte-for-byte concatenation of the committed files
    ``<prefix>/name``, in order, one line in memory at a time; each is checked against its
    marker (size, sha256) before anything is published."""

    def lines() -> Iterator[bytes]:
        for prefix in prefixes:
            for line in iter_committed(writer.storage, prefix, name):
                if on_row is not None and line.strip():
                    on_row(json.loads(line))
                yield line

    return writer.write_stream(name, lines())
