"""Loading SelfImproveRun manifests with errors a person can act on.

Every problem becomes one line `FILE:LINE: field.path: message`: pydantic's locations are turned
into dotted camelCase paths, its messages into short ones, and the line comes from the YAML node
of the field (or of its parent when the field is missing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError
from selfimprove_workers.validation import dotted, field_errors

from .api import SelfImproveRun


@dataclass(frozen=True)
class ManifestError:
    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ManifestInvalid(Exception):
    def __init__(self, errors: list[ManifestError]):
        super().__init__("\n".join(map(str, errors)))
        self.errors = errors


# --------------------------------------------------------------------------- line numbers
def _line_index(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map each path (tuple of keys / indexes) in a composed YAML document to its 1-based line."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[path + (key,)] = key_node.start_mark.line + 1
            _line_index(value_node, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_index(item, path + (i,), out)
    return out


def _line_of(lines: dict[tuple, int], path: tuple) -> int | None:
    while path not in lines and path:
        path = path[:-1]
    return lines.get(path)


def errors_from_validation(exc: ValidationError, file: str, lines: dict[tuple, int], prefix: tuple = ()) -> list[ManifestError]:
    return [
        ManifestError(file, _line_of(lines, path), dotted(path), message)
        for path, message in field_errors(exc, prefix)
    ]


# --------------------------------------------------------------------------- loading
def parse_documents(text: str, file: str) -> list[tuple[dict, dict[tuple, int], int]]:
    """Split a YAML stream into (object, line index, first line) triples; syntax errors name the line."""
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        docs = list(yaml.safe_load_all(text))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or str(exc)
        raise ManifestInvalid([ManifestError(file, line, "", f"YAML syntax error: {problem}")]) from None
    out = []
    for node, doc in zip(nodes, docs):
        if doc is None:
            continue
        first = node.start_mark.line + 1
        if not isinstance(doc, dict):
            raise ManifestInvalid([ManifestError(file, first, "", "a manifest must be a mapping")])
        out.append((doc, _line_index(node), first))
    return out


def load_runs(path: str | Path) -> list[SelfImproveRun]:
    """All SelfImproveRuns in a file; raises ManifestInvalid listing every problem."""
    file = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ManifestInvalid([ManifestError(file, None, "", f"cannot read: {exc.strerror}")]) from None
    return runs_from_text(text, file)


def runs_from_text(text: str, file: str = "<manifest>") -> list[SelfImproveRun]:
    docs = parse_documents(text, file)
    if not docs:
        raise ManifestInvalid([ManifestError(file, None, "", "no SelfImproveRun in the file")])
    runs, errors = [], []
    for doc, lines, first in docs:
        if doc.get("kind") != "SelfImproveRun":
            errors.append(ManifestError(file, _line_of(lines, ("kind",)) or first, "kind", "must be SelfImproveRun"))
            continue
        try:
            runs.append(SelfImproveRun.model_validate(doc))
        except ValidationError as exc:
            errors.extend(errors_from_validation(exc, file, lines))
    if errors:
        raise ManifestInvalid(errors)
    return runs
