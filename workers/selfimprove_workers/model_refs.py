"""Where model weights come from: `s3://` and `file://` prefixes, local paths (e.g. the model-cache
PVC), and Hugging Face Hub repos, `hf://ORG/NAME` or `hf://ORG/NAME@REVISION`.

The Hub form is huggingface_hub's own (`HfFileSystem` paths are `hf://ORG/NAME@REVISION/...`).
REVISION is a branch, a tag or a commit; pin a 40-hex commit for a run that must not change
under you. A Hub model is downloaded once into the Hugging Face cache (the standard layout, so
a cache populated by `huggingface-cli download` or another job is used as it is) and is not
fetched again when that revision is already there; `HF_TOKEN` (from the run's secret) is used
for gated and private repos. huggingface_hub is imported only to download: the API models
validate references (`ModelRef`) in the operator image, which does not install it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field

HF_SCHEME = "hf://"
# huggingface_hub.utils.validate_repo_id: `name` or `namespace/name` of word characters, `-` and
# `.`, at most 96 characters, no `--` or `..`, not starting or ending with `-` or `.`. Here a
# separator must sit between two word characters (which also refuses the rare `a.-b`), so one
# RE2 pattern says it all and the API server's CEL rule is the same pattern as this check.
# A revision (branch, tag, commit, `refs/pr/N`) has the same shape with `/` as a separator too.
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_]|[.-][A-Za-z0-9_])*"
_REV = r"[A-Za-z0-9_](?:[A-Za-z0-9_]|[./-][A-Za-z0-9_])*"
_REF_RE2 = rf"^hf://(?:{_PART}/)?{_PART}(?:@{_REV})?$"
_TOO_LONG_RE2 = r"^hf://[^@]{97,}"
HF_REF_CEL = (f"!self.startsWith('hf://') || (self.matches('{_REF_RE2}') && !self.matches('{_TOO_LONG_RE2}'))")
HF_REF_MESSAGE = "a Hugging Face reference is hf://ORG/NAME or hf://ORG/NAME@REVISION"
# What a model needs: configs, tokenizer files, safetensors weights. Not `original/` (Meta's
# consolidated .pth copies, as large again) and not pickled .bin weights.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
IGNORE_PATTERNS = ["original/*", "*.pth"]

log = logging.getLogger("selfimprove.models")


def is_hf_ref(uri: str) -> bool:
    return uri.startswith(HF_SCHEME)


def hf_ref_problem(uri: str) -> str | None:
    """Why `uri` is not a valid `hf://` reference (None when it is, or is not one at all)."""
    if not is_hf_ref(uri):
        return None
    repo, at, revision = uri[len(HF_SCHEME):].partition("@")
    if not repo:
        return f"{uri!r}: no repo id; {HF_REF_MESSAGE}"
    if len(repo) > 96 or not re.match(rf"^(?:{_PART}/)?{_PART}$", repo):
        return (f"{uri!r}: {repo!r} is not a Hub repo id (ORG/NAME: letters, digits and '_', with single "
                f"'-' or '.' between them; at most 96 characters); {HF_REF_MESSAGE}")
    if at and not re.match(rf"^{_REV}$", revision):
        return f"{uri!r}: {revision!r} is not a revision (a branch, tag or commit); {HF_REF_MESSAGE}"
    return None


def parse_hf_ref(uri: str) -> tuple[str, str | None]:
    """(repo id, revision or None) of a valid `hf://` reference."""
    if problem := hf_ref_problem(uri):
        raise ValueError(problem)
    repo, _, revision = uri[len(HF_SCHEME):].partition("@")
    return repo, revision or None


def _check_ref(value: str) -> str:
    if problem := hf_ref_problem(value):
        raise ValueError(problem)
    return value


ModelRef = Annotated[
    str,
    Field(min_length=1, max_length=2048,
          json_schema_extra={"x-kubernetes-validations": [{"rule": HF_REF_CEL, "message": HF_REF_MESSAGE}]}),
    AfterValidator(_check_ref),
]
"""A model reference field: an s3:// or file:// URI, a path, or hf://ORG/NAME[@REVISION]."""


def hub_cache(model_cache: Path) -> Path:
    """The Hugging Face cache a stage uses: `HF_HUB_CACHE` / `HF_HOME` when the environment sets
    them (a cache the cluster already fills), else `huggingface/hub` under the model cache."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return model_cache / "huggingface" / "hub"


def snapshot_complete(path: Path) -> bool:
    """A config, and every weight file its safetensors index names (or one safetensors file)."""
    import json

    if not (path / "config.json").is_file():
        return False
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return bool(shards) and all((path / s).is_file() for s in shards)
    return any(path.glob("*.safetensors"))


def fetch_hf(uri: str, model_cache: Path) -> Path:
    """The local snapshot directory of `hf://REPO[@REVISION]`: from the cache when that revision is
    there, else downloaded (with `HF_TOKEN` if set). Raises BadInput for a reference that cannot
    be resolved: a missing repo or revision, a gated repo without a token, no network offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .errors import BadInput

    repo, revision = parse_hf_ref(uri)
    cache = hub_cache(model_cache)

    def snapshot(offline: bool) -> Path:
        return Path(snapshot_download(repo, revision=revision, cache_dir=str(cache), allow_patterns=ALLOW_PATTERNS,
                                      ignore_patterns=IGNORE_PATTERNS, local_files_only=offline,
                                      token=None if offline else (os.environ.get("HF_TOKEN") or None)))

    try:
        path = snapshot(offline=True)
        if not snapshot_complete(path):  # an interrupted download: fetch what it lacks
            raise LocalEntryNotFoundError(f"{path} is incomplete")
        log.info(f"{uri}: found in the Hugging Face cache at {path}")
    except LocalEntryNotFoundError:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise BadInput(f"{uri}: not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set; "
                           "populate the cache (huggingface-cli download) or allow downloads") from None
        log.info(f"{uri}: downloading into {cache}")
        try:
            path = snapshot(offline=False)
        except GatedRepoError:
            raise BadInput(f"{uri}: the repo is gated; accept its terms on the Hub and put an HF_TOKEN "
                           "that may read it in the run's secret") from None
        except RepositoryNotFoundError:
            raise BadInput(f"{uri}: no such repo on the Hub (or it is private: HF_TOKEN in the run's secret)") from None
        except RevisionNotFoundError:
            raise BadInput(f"{uri}: the repo has no revision {revision!r}") from None
        except HfHubHTTPError as exc:
            raise RuntimeError(f"{uri}: download failed: {exc}") from None  # transient: the stage retries
    if not snapshot_complete(path):
        raise BadInput(f"{uri}: the snapshot at {path} has no config.json or no complete *.safetensors "
                       "weights; only safetensors checkpoints are loaded")
    return path
