"""`selfimprove report RUN`: one self-contained HTML page about a run, from its artifacts.

RUN is a local run directory (`./runs/local/<name>`), a run prefix (`s3://bucket/runs/<ns>/<run>-<uid>/`,
`file:///…`), or a manifest (its run prefix under `--storage`, as `selfimprove run` uses it). The
page reads only what the stages committed (each stage folder's `_SUCCESS`, `result.json` and
outputs) and, for a local run, `status.json`; it needs no network to open: the plots are PNGs
(matplotlib, Agg backend) embedded as base64, the styles inline.

Sections:
- held-out accuracy per round (evaluate), the best round marked;
- kept paths and mean confidence per round (filter, sample);
- LMSI's calibration plot: accuracy of the majority answer against its confidence (the sampled
  votes, binned), per round — it needs the answers of the sampled questions, which a run never
  has (that is the point of LMSI): `--labels FILE` gives them (a labeled JSONL, matched by id,
  then by question text); with a manifest, the questions file's own answers or its
  `<name>.answers.jsonl` sibling (the demo writes one) are used. Without labels, the confidence
  histogram alone;
- training loss per optimizer step, one curve per round (train's metrics.json);
- examples of kept and rejected paths per filter (filter's kept.jsonl and rejected.jsonl).

Runs on a user's machine with the user's storage credentials, like `aws s3 cp`: it is not part of
the control plane, which never reads data.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfimprove_workers.answers import answers_equal, extract_answer
from selfimprove_workers.data import load_examples
from selfimprove_workers.errors import DataError
from selfimprove_workers.spec import AnswerSpec
from selfimprove_workers.storage import Storage, display_name, is_complete, read_committed, read_jsonl, storage_for

ROUND_DIR = re.compile(r"round-(\d{3,})/$")
EXAMPLES_PER_FILTER = 3
CALIBRATION_BINS = 10
TEXT_LIMIT = 600


class ReportError(Exception):
    """A RUN that names nothing readable; the message says which."""


# =========================================================================== reading a run
@dataclass
class RoundData:
    round: int
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)   # stage → result.json
    votes: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)

    def metric(self, stage: str, key: str) -> Any:
        return ((self.stages.get(stage) or {}).get("summary") or {}).get("metrics", {}).get(key)

    @property
    def accuracy(self) -> float | None:
        return self.metric("evaluate", "accuracy")


@dataclass
class RunData:
    prefix: str
    name: str
    rounds: list[RoundData]
    status: dict[str, Any] | None
    labels: dict[str, str] | None = None          # question id or text → gold final answer
    labels_source: str | None = None
    answer: AnswerSpec = field(default_factory=AnswerSpec)

    @property
    def best(self) -> RoundData | None:
        scored = [r for r in self.rounds if r.accuracy is not None]
        return max(scored, key=lambda r: (r.accuracy, -r.round)) if scored else None


def resolve_run(run: str, storage: str | None = None) -> tuple[str, Any]:
    """(run prefix, the manifest's SelfImproveRun or None) of what the user named."""
    if "://" in run:
        return run.rstrip("/") + "/", None
    path = Path(run)
    if path.is_dir():
        return path.resolve().as_uri() + "/", None
    if path.is_file():
        from .local import identity_of, local_run
        from .manifest import ManifestInvalid, load_runs
        from .planner import run_prefix
        from .presets import resolve

        try:
            runs = load_runs(path)
        except ManifestInvalid as exc:
            raise ReportError("\n".join(map(str, exc.errors))) from None
        if len(runs) != 1:
            raise ReportError(f"{path}: holds {len(runs)} runs; name one run (a file with one, or its run directory)")
        local = local_run(runs[0], storage)
        return run_prefix(resolve(local.spec), identity_of(local)), local
    raise ReportError(f"{run}: no such directory or manifest (give a run directory, an s3:// run prefix or a manifest)")


def _json(storage: Storage, uri: str) -> Any:
    return json.loads(storage.read_bytes(uri))


def _jsonl(storage: Storage, uri: str, limit: int | None = None) -> list[dict[str, Any]]:
    if not storage.exists(uri):
        return []
    rows = []
    for _, obj in read_jsonl(storage, uri):
        rows.append(obj)
        if limit is not None and len(rows) >= limit:
            break
    return rows


def load_run(prefix: str, *, endpoint: str | None = None, region: str | None = None, name: str | None = None) -> RunData:
    storage = storage_for(prefix, endpoint=endpoint, region=region)
    entries = storage.list(prefix)
    round_nos = sorted({int(m.group(1)) for e in entries
                        if (m := ROUND_DIR.match(_relative(e.uri, prefix).split("/", 1)[0] + "/"))})
    if not round_nos:
        raise ReportError(f"{display_name(prefix)}: no round-NNN/ folders: not a run's artifacts "
                          "(a run directory looks like ./runs/local/<run>/)")
    status = _json(storage, prefix + "status.json") if storage.exists(prefix + "status.json") else None
    rounds = []
    for r in round_nos:
        rd = RoundData(r)
        base = f"{prefix}round-{r:03d}/"
        for stage in ("sample", "filter", "augment", "train", "evaluate"):
            stage_prefix = f"{base}{stage}/"
            if not is_complete(storage, stage_prefix):
                continue
            rd.stages[stage] = json.loads(read_committed(storage, stage_prefix, "result.json"))
        if "sample" in rd.stages:
            rd.votes = _jsonl(storage, f"{base}sample/votes.jsonl")
        if "filter" in rd.stages:
            rd.kept = _jsonl(storage, f"{base}filter/kept.jsonl", limit=200)
            rd.rejected = _jsonl(storage, f"{base}filter/rejected.jsonl")
        if "train" in rd.stages and storage.exists(f"{base}train/metrics.json"):
            rd.history = _json(storage, f"{base}train/metrics.json").get("history") or []
        rounds.append(rd)
    return RunData(prefix=prefix, name=name or prefix.rstrip("/").rsplit("/", 1)[-1], rounds=rounds, status=status)


def _relative(uri: str, prefix: str) -> str:
    return uri[len(prefix):] if uri.startswith(prefix) else uri


def load_labels(uri: str, answer: AnswerSpec) -> dict[str, str]:
    """id → gold answer and question text → gold answer, from a labeled JSONL file."""
    storage = storage_for(uri)
    try:
        examples = load_examples(storage, uri, require_answer=True)
    except DataError as exc:
        raise ReportError(f"--labels: {exc}") from None
    labels: dict[str, str] = {}
    for ex in examples:
        assert ex.final is not None
        gold = extract_answer(ex.final, answer) or ex.final.strip()
        labels[f"id:{ex.id}"] = gold
        labels[f"q:{ex.question.strip()}"] = gold
    return labels


def labels_for(run: Any) -> str | None:
    """Where a manifest's questions have answers: the file itself, or `<name>.answers.jsonl`."""
    questions = run.spec.data.questions
    if not questions:
        return None
    if "://" not in questions and not Path(questions).exists():
        return None
    storage = storage_for(questions)
    try:
        first = next(iter(read_jsonl(storage, questions)), None)
    except DataError:
        return None
    if first is not None and first[1].get("answer") is not None:
        return questions
    sibling = re.sub(r"\.jsonl$", ".answers.jsonl", questions)
    if sibling != questions and storage_for(sibling).exists(sibling):
        return sibling
    return None


# =========================================================================== the numbers
def calibration(votes: Iterable[dict[str, Any]], labels: dict[str, str], bins: int = CALIBRATION_BINS) -> list[dict[str, Any]]:
    """Accuracy of the majority answer per confidence bin: [{lo, hi, n, correct, accuracy}]."""
    table: list[dict[str, Any]] = [{"lo": i / bins, "hi": (i + 1) / bins, "n": 0, "correct": 0} for i in range(bins)]
    for v in votes:
        gold = labels.get(f"id:{v.get('id')}") or labels.get(f"q:{str(v.get('question') or '').strip()}")
        if gold is None or v.get("confidence") is None:
            continue
        b = min(bins - 1, int(float(v["confidence"]) * bins))
        table[b]["n"] += 1
        table[b]["correct"] += bool(v.get("majority") is not None and answers_equal(v["majority"], gold))
    for row in table:
        row["accuracy"] = row["correct"] / row["n"] if row["n"] else None
    return table


# =========================================================================== plots
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    ax.grid(alpha=0.3)
    return plt, fig, ax


def _png(plt, fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot_accuracy(run: RunData) -> str | None:
    scored = [r for r in run.rounds if r.accuracy is not None]
    if not scored:
        return None
    plt, fig, ax = _figure()
    xs, ys = [r.round for r in scored], [100 * float(r.accuracy or 0) for r in scored]
    ax.plot(xs, ys, marker="o", color="#1f77b4", label="held-out accuracy")
    best = run.best
    if best is not None:
        ax.scatter([best.round], [100 * float(best.accuracy or 0)], s=220, marker="*", color="#ff7f0e", zorder=5,
                   label=f"best: round {best.round} ({100 * float(best.accuracy or 0):.1f}%)")
    seed = [(r.round, r.metric("evaluate", "seedAccuracy")) for r in scored if r.metric("evaluate", "seedAccuracy") is not None]
    if seed:
        ax.plot([x for x, _ in seed], [100 * float(y) for _, y in seed], marker="s", ls="--", color="#2ca02c",
                label="seed-set accuracy")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(xs)
    ax.legend(loc="lower right")
    ax.set_title("Held-out accuracy per round (greedy)")
    return _png(plt, fig)


def plot_kept(run: RunData) -> str | None:
    rows = [r for r in run.rounds if r.metric("filter", "kept") is not None or r.metric("sample", "meanConfidence") is not None]
    if not rows:
        return None
    plt, fig, ax = _figure()
    xs = [r.round for r in rows]
    kept = [r.metric("filter", "kept") or 0 for r in rows]
    paths = [r.metric("sample", "paths") or 0 for r in rows]
    ax.bar([x - 0.2 for x in xs], paths, width=0.4, color="#c7c7c7", label="sampled paths")
    ax.bar([x + 0.2 for x in xs], kept, width=0.4, color="#1f77b4", label="kept paths")
    ax.set_xlabel("round")
    ax.set_ylabel("paths")
    ax.set_xticks(xs)
    ax2 = ax.twinx()
    conf = [(r.round, r.metric("sample", "meanConfidence")) for r in rows if r.metric("sample", "meanConfidence") is not None]
    kconf = [(r.round, r.metric("filter", "meanConfidence")) for r in rows if r.metric("filter", "meanConfidence") is not None]
    if conf:
        ax2.plot([x for x, _ in conf], [y for _, y in conf], marker="o", color="#d62728", label="mean confidence (all questions)")
    if kconf:
        ax2.plot([x for x, _ in kconf], [y for _, y in kconf], marker="^", ls="--", color="#9467bd",
                 label="mean confidence (kept)")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("self-consistency confidence")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [str(h.get_label()) for h in handles], loc="upper center", bbox_to_anchor=(0.5, -0.2),
              ncol=2, fontsize=8, frameon=False)
    fig.set_size_inches(6.4, 4.2)
    ax.set_title("Kept samples and mean confidence per round")
    return _png(plt, fig)


def plot_calibration(run: RunData) -> tuple[str | None, list[tuple[int, list[dict[str, Any]]]]]:
    rounds = [r for r in run.rounds if r.votes]
    if not rounds:
        return None, []
    plt, fig, ax = _figure()
    tables: list[tuple[int, list[dict[str, Any]]]] = []
    if run.labels:
        ax.plot([0, 1], [0, 100], ls=":", color="grey", label="accuracy = confidence")
        for r in rounds:
            table = calibration(r.votes, run.labels)
            tables.append((r.round, table))
            pts = [((t["lo"] + t["hi"]) / 2, 100 * t["accuracy"]) for t in table if t["n"]]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"round {r.round}")
        ax.set_xlabel("confidence of the majority answer (share of paths that agree)")
        ax.set_ylabel("accuracy of the majority answer (%)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 105)
        ax.legend(loc="upper left", fontsize=8)
        ax.set_title("Calibration (LMSI): majority-answer accuracy vs confidence")
    else:
        for r in rounds:
            ax.hist([float(v["confidence"]) for v in r.votes if v.get("confidence") is not None],
                    bins=CALIBRATION_BINS, range=(0, 1), histtype="step", lw=1.8, label=f"round {r.round}")
        ax.set_xlabel("confidence of the majority answer")
        ax.set_ylabel("questions")
        ax.legend(loc="upper left", fontsize=8)
        ax.set_title("Confidence of the sampled votes (no labels: no accuracy)")
    return _png(plt, fig), tables


def plot_loss(run: RunData) -> str | None:
    rounds = [r for r in run.rounds if r.history]
    if not rounds:
        return None
    plt, fig, ax = _figure()
    for r in rounds:
        steps, losses = [h["step"] for h in r.history], [float(h["loss"]) for h in r.history]
        line = ax.plot(steps, losses, lw=0.8, alpha=0.3)[0]
        ax.plot(steps, _smooth(losses), lw=1.8, color=line.get_color(), label=f"round {r.round} (moving mean)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Training loss per step")
    return _png(plt, fig)


def _smooth(values: Sequence[float], window: int | None = None) -> list[float]:
    """Trailing moving mean (window: 5% of the curve, at least 1): per-step losses are noisy."""
    w = window or max(1, len(values) // 20)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= w:
            total -= values[i - w]
        out.append(total / min(i + 1, w))
    return out


def _spread(rows: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to n rows, from different questions where there are enough."""
    seen: set[Any] = set()
    out = []
    for x in rows:
        q = x.get("questionId") or x.get("question")
        if q not in seen:
            seen.add(q)
            out.append(x)
            if len(out) == n:
                return out
    return out + [x for x in rows if x not in out][: n - len(out)]


def _why(x: dict[str, Any], step: dict[str, Any]) -> str:
    """What a filter saw of a path: the reason it was dropped, where it can be told, and its scores."""
    notes = []
    kind = step.get("kind")
    if kind in ("consistency", "entropy") and x.get("pathAnswer") != x.get("answer"):
        notes.append("disagrees with the majority")
    if kind == "consistency" and step.get("minConfidence") is not None and float(x.get("confidence") or 0) < float(step["minConfidence"]):
        notes.append(f"confidence < {step['minConfidence']}")
    if kind == "entropy" and step.get("maxEntropy") is not None and float(x.get("entropy") or 0) > float(step["maxEntropy"]):
        notes.append(f"entropy > {step['maxEntropy']}")
    standard = {"id", "question", "cot", "answer", "questionId", "path", "pathAnswer", "confidence", "entropy",
                "rejectedBy", "filterIndex"}
    for key, value in x.items():
        if key not in standard:
            notes.append(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}")
    return "; ".join(notes)


# =========================================================================== HTML
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px} .meta{color:#666;font-size:13px} .cards{display:flex;flex-wrap:wrap;gap:20px} .card{width:570px}
.card h2{margin-top:12px} figure{margin:0} img{width:100%;border:1px solid #eee} table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left} th{background:#f5f5f5}
td.num{text-align:right;font-variant-numeric:tabular-nums} tr.best td{background:#fff6e0}
.text{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;max-width:560px}
.kept{color:#1a7f37;font-weight:600} .rejected{color:#b42318;font-weight:600} .note{color:#666;font-size:13px}
"""


def _esc(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _clip(text: Any, limit: int = TEXT_LIMIT) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= limit else s[:limit] + " …"


def _num(v: Any, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _img(b64: str | None, alt: str) -> str:
    if b64 is None:
        return f'<p class="note">{_esc(alt)}: nothing to plot yet.</p>'
    return f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{b64}"></figure>'


def rounds_table(run: RunData) -> str:
    best = run.best
    head = ("<tr><th>round</th><th>questions</th><th>paths</th><th>mean confidence</th><th>kept</th>"
            "<th>train loss</th><th>steps</th><th>accuracy</th><th></th></tr>")
    rows = []
    for r in run.rounds:
        is_best = best is not None and r.round == best.round
        rows.append(
            f'<tr class="{"best" if is_best else ""}"><td class="num">{r.round}</td>'
            f'<td class="num">{_num(r.metric("sample", "questions"), "d")}</td>'
            f'<td class="num">{_num(r.metric("sample", "paths"), "d")}</td>'
            f'<td class="num">{_num(r.metric("sample", "meanConfidence"), ".3f")}</td>'
            f'<td class="num">{_num(r.metric("filter", "kept"), "d")}</td>'
            f'<td class="num">{_num(r.metric("train", "trainLoss"), ".4f")}</td>'
            f'<td class="num">{_num(r.metric("train", "steps"), "d")}</td>'
            f'<td class="num">{_num(r.accuracy, ".1%")}</td><td>{"★ best" if is_best else ""}</td></tr>')
    return f'<table id="rounds">{head}{"".join(rows)}</table>'


def calibration_table(tables: Sequence[tuple[int, list[dict[str, Any]]]]) -> str:
    if not tables:
        return ""
    bins = tables[0][1]
    head = "<tr><th>confidence</th>" + "".join(f"<th>round {r} (n, accuracy)</th>" for r, _ in tables) + "</tr>"
    body = []
    for i, b in enumerate(bins):
        cells = []
        for _, t in tables:
            row = t[i]
            cells.append(f'<td class="num">{row["n"]}' + (f', {row["accuracy"]:.0%}' if row["n"] else "") + "</td>")
        body.append(f'<tr><td>{b["lo"]:.1f}–{b["hi"]:.1f}</td>{"".join(cells)}</tr>')
    return f'<table id="calibration">{head}{"".join(body)}</table>'


def examples_section(run: RunData) -> str:
    rounds = [r for r in run.rounds if "filter" in r.stages]
    if not rounds:
        return '<p class="note">No filter stage has finished yet.</p>'
    r = rounds[-1]
    steps = ((r.stages["filter"].get("details") or {}).get("filters")) or []
    parts = [f'<p class="note">Round {r.round}: {len(steps)} filter(s) in order; a path is kept when every filter keeps it. '
             "Confidence is the share of its question's paths that agree with the majority answer.</p>"]
    for i, step in enumerate(steps):
        kind = step.get("kind")
        rejected = _spread([x for x in r.rejected if x.get("filterIndex") == i], EXAMPLES_PER_FILTER)
        kept = _spread(r.kept, EXAMPLES_PER_FILTER) if i == len(steps) - 1 else []
        parts.append(f'<h3>{i + 1}. {_esc(kind)}: {step.get("in")} → {step.get("out")} paths</h3>')
        rows = [("kept", x) for x in kept] + [("rejected", x) for x in rejected]
        if not rows:
            parts.append('<p class="note">No examples stored (runs before rejected.jsonl existed keep none).</p>')
            continue
        body = "".join(
            f'<tr><td class="{verdict}">{verdict}</td><td class="text">{_esc(_clip(x.get("question"), 300))}</td>'
            f'<td class="text">{_esc(_clip(x.get("cot")))}</td><td>{_esc(x.get("pathAnswer"))}</td>'
            f'<td>{_esc(x.get("answer"))}</td><td class="num">{_num(x.get("confidence"), ".2f")}</td>'
            f'<td>{_esc(_why(x, step))}</td></tr>'
            for verdict, x in rows)
        parts.append('<table class="examples"><tr><th></th><th>question</th><th>sampled reasoning</th><th>path answer</th>'
                     f"<th>majority</th><th>confidence</th><th>what the filter saw</th></tr>{body}</table>")
    return "".join(parts)


def render(run: RunData) -> str:
    """The report's HTML (self-contained)."""
    status = run.status or {}
    best = run.best
    phase = status.get("phase")
    facts = [f"artifacts: {_esc(run.prefix)}"]
    if phase:
        facts.append(f"phase: {_esc(phase)}")
    if best is not None:
        facts.append(f"best: round {best.round}, {float(best.accuracy or 0):.1%}")
    first = next((r for r in run.rounds if r.accuracy is not None), None)
    if first is not None and best is not None:
        facts.append(f"round {first.round} → best: {100 * (float(best.accuracy or 0) - float(first.accuracy or 0)):+.1f} points")
    cal_png, tables = plot_calibration(run)
    if run.labels:
        cal_note = (f"Gold answers from {_esc(run.labels_source)}, used only here: the run never saw them. "
                    "LMSI's premise is that the confidence of the majority answer tracks its accuracy, so that "
                    "high-confidence answers make good training labels.")
    else:
        cal_note = ("No labels for the sampled questions (a run has none: that is LMSI's point): pass "
                    "<code>--labels FILE</code>, a labeled JSONL of the same questions, for the accuracy curve.")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>selfimprove report: {_esc(run.name)}</title>
<style>{CSS}</style></head><body>
<h1>selfimprove report: {_esc(run.name)}</h1>
<p class="meta">{" · ".join(facts)}</p>
<h2>Rounds</h2>{rounds_table(run)}
<div class="cards">
<div class="card"><h2>Held-out accuracy</h2>{_img(plot_accuracy(run), "held-out accuracy per round")}</div>
<div class="card"><h2>Kept samples and confidence</h2>{_img(plot_kept(run), "kept samples and mean confidence")}</div>
<div class="card"><h2>Calibration</h2>{_img(cal_png, "calibration")}<p class="note">{cal_note}</p>{calibration_table(tables)}</div>
<div class="card"><h2>Training loss</h2>{_img(plot_loss(run), "training loss per step")}</div>
</div>
<h2>Examples per filter</h2>{examples_section(run)}
</body></html>
"""


def build_report(run: str, *, storage: str | None = None, labels: str | None = None,
                 endpoint: str | None = None) -> tuple[str, RunData]:
    """(HTML, the data it shows) of the run named by `run`."""
    if labels and "://" not in labels and not Path(labels).is_file():
        raise ReportError(f"--labels: {labels}: no such file")
    prefix, manifest_run = resolve_run(run, storage)
    name = manifest_run.metadata.name if manifest_run is not None else None
    if manifest_run is not None:
        endpoint = endpoint or manifest_run.spec.storage.endpoint
    data = load_run(prefix, endpoint=endpoint, name=name)
    if manifest_run is not None:
        data.answer = manifest_run.spec.task.answer
    source = labels or (labels_for(manifest_run) if manifest_run is not None else None)
    if source:
        uri = source if "://" in source else Path(source).resolve().as_uri()
        data.labels, data.labels_source = load_labels(uri, data.answer), display_name(uri)
    return render(data), data
