"""A Hugging Face cache populated the way `huggingface-cli download` leaves it, without a network:
`models--ORG--NAME/` with content-addressed `blobs/`, `refs/<branch or tag>` holding the commit,
and `snapshots/<commit>/` of relative symlinks to the blobs (huggingface_hub's file_download)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def populate_hf_cache(cache: Path, repo: str, model_dir: Path, refs: tuple[str, ...] = ("main",)) -> str:
    """Put every file of `model_dir` into `cache` as revision `refs` of `repo`; return the commit."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(p.read_bytes() for p in files)).hexdigest()
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    for p in files:
        data = p.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / p.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return commit
