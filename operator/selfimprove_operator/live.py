"""Running a run on this machine with the live view: the `selfimprove run` and `selfimprove demo`
commands share it (it lives here, not in the CLI, so the demo does not import the CLI)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path


def _new_console():
    """A rich console; when output is not a terminal (a pipe, a CI log) tables are not wrapped
    at 80 columns."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=140)


def run_with_view(run, storage: str | None, workdir: str | None = None, stage_command: list[str] | None = None):
    """Run `run` locally with the live view; returns (final status, interrupted)."""
    import signal
    import threading

    from rich.live import Live

    from .local import LocalExecutor, local_run
    from .view import live_view, summary

    run = local_run(run, storage)
    console = _new_console()
    events: list[str] = []
    stop = threading.Event()
    live = Live(console=console, refresh_per_second=4, transient=False, auto_refresh=console.is_terminal)

    def progress_of(ex) -> dict[str, str]:
        return {key[1]: sp.progress for key, sp in list(ex.running.items()) if sp.progress}

    def on_update(ex) -> None:
        if console.is_terminal:
            live.update(live_view(run.metadata.name, ex.status, progress_of(ex), events))

    def on_event(ev) -> None:
        from selfimprove_workers.redaction import redact

        line = redact(f"{ev.reason}: {ev.message}")
        events.append(line)
        if not console.is_terminal:
            console.print(line, style="red" if ev.type == "Warning" else None, highlight=False)

    # Ctrl-C: stop the stage cleanly; the next `selfimprove run` resumes.
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    executor = LocalExecutor(run, workdir=Path(workdir) if workdir else None, on_update=on_update,
                             on_event=on_event, stage_command=stage_command)
    console.print(f"artifacts: {executor.store.uri.rsplit('/', 1)[0]}/   stage logs: {executor.workdir}/", highlight=False)
    with live if console.is_terminal else contextlib.nullcontext():
        status = executor.run_to_end(stop)
    console.print(summary(status))
    if stop.is_set():
        console.print("interrupted: run the same command again to resume", style="yellow")
    return status, stop.is_set()



console = _new_console
