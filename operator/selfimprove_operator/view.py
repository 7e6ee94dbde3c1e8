"""Rendering a run for people: the live view of `selfimprove run` and the `status` table."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .api import SelfImproveRunStatus, StageProgress

STATE_STYLE = {"Succeeded": "green", "Running": "cyan", "Failed": "red", "Pending": "dim", "Skipped": "dim"}
PHASE_STYLE = {"Succeeded": "bold green", "Failed": "bold red", "Suspended": "yellow"}


def _num(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


COLUMNS = (  # (header, RoundStatus field, format); a column no round has a value for is left out
    ("samples", "samples", "d"),
    ("kept", "kept", "d"),
    ("mean conf", "mean_confidence", ".3f"),
    ("augmented", "augmented", "d"),
    ("train loss", "train_loss", ".4f"),
    ("seed acc", "seed_accuracy", ".1%"),
)


def rounds_table(status: SelfImproveRunStatus, title: str | None = None) -> Table:
    """One row per round, the best one marked. Columns of the strategy's stages only (LMSI has
    no augmented count, LLM2LLM no samples); LMSI's always show, so the table's shape is stable."""
    table = Table(title=title, title_justify="left")
    always = {"samples", "kept", "mean_confidence", "train_loss"}
    shown = [c for c in COLUMNS if c[1] in always or any(getattr(r, c[1]) is not None for r in status.rounds)]
    table.add_column("round", justify="right")
    for header, _, _ in shown:
        table.add_column(header, justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("", justify="left")
    for r in status.rounds:
        best = r.round == status.best_round
        table.add_row(
            str(r.round),
            *(_num(getattr(r, name), fmt) for _, name, fmt in shown),
            _num(r.accuracy, ".1%"),
            Text("★ best", style="bold yellow") if best else "",
        )
    return table


def progress_text(p: StageProgress) -> str:
    """The running stage's progress as the live view shows it: what `status.progress` says."""
    from .planner import duration_text

    left = ""
    if p.estimated_remaining_seconds is not None and p.done < p.total:
        left = f", ~{duration_text(p.estimated_remaining_seconds)} left"
    return f"{p.percent}% {p.done}/{p.total} {p.unit}{left}"


def stages_line(status: SelfImproveRunStatus, progress: dict[str, str] | None = None) -> Text:
    text = Text()
    if not status.rounds:
        return text
    current = status.rounds[-1]
    text.append(f"round {current.round}: ", style="bold")
    for i, s in enumerate(current.stages):
        if i:
            text.append(" → ")
        label = s.name
        now = status.progress
        if s.state == "Running" and now is not None and (now.round, now.stage) == (current.round, s.name):
            label += f" [{progress_text(now)}]"
        elif s.state == "Running" and progress and progress.get(s.name):
            label += f" [{progress[s.name]}]"
        if s.attempts > 1:
            label += f" (attempt {s.attempts})"
        text.append(label, style=STATE_STYLE.get(s.state, ""))
    return text


def live_view(name: str, status: SelfImproveRunStatus | None, progress: dict[str, str], events: list[str]) -> Group:
    if status is None:
        return Group(Text(f"{name}: starting"))
    header = Text(f"{name}  ", style="bold")
    header.append(status.phase, style=PHASE_STYLE.get(status.phase, "cyan"))
    if status.best_accuracy is not None:
        header.append(f"   best {status.best_accuracy:.1%} (round {status.best_round})")
    parts: list[Any] = [header, stages_line(status, progress), rounds_table(status)]
    if events:
        parts.append(Text("\n".join(events[-5:]), style="dim"))
    return Group(*parts)


def summary(status: SelfImproveRunStatus) -> Group:
    parts: list[Any] = [rounds_table(status, title=f"phase {status.phase}")]
    if status.message:
        parts.append(Text(status.message, style=PHASE_STYLE.get(status.phase, "")))
    if status.best_adapter:
        parts.append(Text(f"best adapter: {status.best_adapter}"))
    if status.artifacts:
        parts.append(Text(f"artifacts: {status.artifacts}", style="dim"))
    return Group(*parts)
