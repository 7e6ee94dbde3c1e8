"""The `selfimprove` command line."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .live import console as _console
from .live import run_with_view


def _cmd_validate(args: argparse.Namespace) -> int:
    from .manifest import ManifestInvalid, load_runs

    failed = False
    for file in args.files:
        try:
            runs = load_runs(file)
        except ManifestInvalid as exc:
            failed = True
            for err in exc.errors:
                print(err, file=sys.stderr)
            continue
        names = ", ".join(r.metadata.name for r in runs)
        print(f"{file}: ok ({names})")
    return 1 if failed else 0


def _cmd_crd(args: argparse.Namespace) -> int:
    from .crd import CHART_CRD_PATH, CRD_PATH, render_crd

    text = render_crd()
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    # By default both copies: the top-level file and the Helm chart's (Helm installs crds/).
    paths = [Path(args.output)] if args.output else [CRD_PATH] + ([CHART_CRD_PATH] if CHART_CRD_PATH.parent.is_dir() else [])
    if args.check:
        stale = [p for p in paths if not p.exists() or p.read_text() != text]
        for path in stale:
            print(f"{path}: stale; run `selfimprove crd` and commit the result", file=sys.stderr)
        for path in set(paths) - set(stale):
            print(f"{path}: up to date")
        return 1 if stale else 0
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


def _load_one(file: str):
    from .manifest import ManifestInvalid, load_runs

    try:
        runs = load_runs(file)
    except ManifestInvalid as exc:
        for err in exc.errors:
            print(err, file=sys.stderr)
        return None
    if len(runs) != 1:
        print(f"{file}: holds {len(runs)} runs; `selfimprove run` takes a file with one", file=sys.stderr)
        return None
    return runs[0]


def _cmd_run(args: argparse.Namespace) -> int:
    run = _load_one(args.file)
    if run is None:
        return 2  # nothing ran: the manifest is invalid
    command = shlex.split(args.stage_command) if args.stage_command else None
    status, interrupted = run_with_view(run, args.storage, args.workdir, command)
    if interrupted:
        return 130
    return 0 if status.phase == "Succeeded" else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.seed, storage=args.storage, cache=Path(args.cache), manifest=Path(args.manifest))


def _cmd_data(args: argparse.Namespace) -> int:
    from .datasets import DatasetError, prepare_gsm8k

    try:
        done = prepare_gsm8k(args.source, args.out, seed=args.seed, endpoint=args.endpoint)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, n in done.counts.items():
        print(f"wrote {done.out}{name}: {n} rows")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .local import StatusStore, local_run
    from .view import summary

    run = _load_one(args.file)
    if run is None:
        return 2
    store = StatusStore(local_run(run, args.storage))
    status = store.load()
    if status is None:
        print(f"{run.metadata.name}: not started (no {store.uri})", file=sys.stderr)
        return 1
    _console().print(summary(status))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    try:
        from .report import ReportError, build_report
    except ImportError as exc:  # pragma: no cover - the `report` extra missing
        print(f"selfimprove report needs matplotlib (pip install 'selfimprove[report]'): {exc}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("selfimprove report needs matplotlib: pip install 'selfimprove[report]'", file=sys.stderr)
        return 2
    try:
        page, data = build_report(args.run, storage=args.storage, labels=args.labels, endpoint=args.endpoint)
    except ReportError as exc:
        print(exc, file=sys.stderr)
        return 2
    out = Path(args.output or f"{data.name}-report.html")
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out} ({len(data.rounds)} rounds{', calibration from ' + str(data.labels_source) if data.labels else ''})")
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    import dataclasses

    from .k8s.config import OperatorConfig, parse_setting

    fields = {f.name for f in dataclasses.fields(OperatorConfig)}
    flags = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if "namespaces" in flags:
        flags["namespaces"] = parse_setting("namespaces", ",".join(flags["namespaces"]))
    if "metrics_port" in flags:
        flags["metrics_port"] = parse_setting("metrics_port", flags["metrics_port"])
    config = dataclasses.replace(OperatorConfig.from_env(), **flags)
    from .k8s.handlers import run_operator  # kopf: the `operator` extra

    return run_operator(config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfimprove",
        description="Run LLM self-improvement (LMSI, IWSI, LLM2LLM) locally or on Kubernetes.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check SelfImproveRun manifests")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("crd", help="write the CustomResourceDefinition generated from the API models")
    p.add_argument("-o", "--output", help="file to write ('-' for stdout); default crds/<name>.yaml")
    p.add_argument("--check", action="store_true", help="fail when the file differs from a fresh generation")
    p.set_defaults(func=_cmd_crd)

    p = sub.add_parser("run", help="run a SelfImproveRun on this machine (resumes when run again)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--storage", help="artifact storage: a directory or s3://bucket/prefix (default ./runs)")
    p.add_argument("--workdir", help="where task files and stage logs go (default: a temp dir)")
    p.add_argument("--stage-command", help="command a stage's task file is appended to "
                   "(default: this Python's `-m selfimprove_workers`)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("demo", help="the CPU demo: a tiny Llama improves itself at arithmetic (LMSI)")
    p.add_argument("--seed", type=int, default=0, help="data, model and sampling seed")
    p.add_argument("--storage", default="./runs", help="artifact storage (default ./runs)")
    p.add_argument("--cache", default=".cache/demo", help="where the data and warm-started model are kept")
    p.add_argument("--manifest", default="examples/local-arithmetic.yaml", help="the demo's run manifest")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("data", help="write a dataset's files as the example manifests name them")
    p.add_argument("dataset", choices=["gsm8k"])
    p.add_argument("--source", default="../shared/data/gsm8k", help="folder with GSM8K's train.jsonl and test.jsonl")
    p.add_argument("--out", required=True, help="a directory or an s3://bucket/prefix/ (the examples use s3://datasets/gsm8k/)")
    p.add_argument("--seed", type=int, default=0, help="which train examples are held out as valid-100 / seed-100")
    p.add_argument("--endpoint", help="S3 endpoint URL (MinIO, Ceph, …)")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("status", help="print the rounds table of a local run")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--storage", help="the storage the run used (default ./runs)")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("report", help="write one self-contained HTML report of a run (plots, calibration, examples)")
    p.add_argument("run", metavar="RUN", help="a run directory (./runs/local/NAME), an s3:// or file:// run prefix, or a manifest")
    p.add_argument("-o", "--output", help="the HTML file to write (default ./<run>-report.html)")
    p.add_argument("--storage", help="with a manifest: the storage the run used (default ./runs)")
    p.add_argument("--labels", metavar="FILE", help="labeled JSONL of the sampled questions, for the calibration plot "
                   "(default with a manifest: the questions' own answers or <questions>.answers.jsonl)")
    p.add_argument("--endpoint", help="S3 endpoint URL (MinIO, Ceph, …) of an s3:// run prefix")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "operator",
        help="run the Kubernetes operator: reconcile SelfImproveRuns with stage Jobs",
        description="Run the operator (kopf). Each setting is also read from the environment as "
        "SELFIMPROVE_<SETTING> (SELFIMPROVE_NAMESPACES, SELFIMPROVE_WORKER_IMAGE, "
        "SELFIMPROVE_GPU_RESOURCE_NAME, SELFIMPROVE_METRICS_PORT, …); flags win.",
    )
    p.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NS",
                   help="serve only these namespaces (repeatable or comma-separated; default: all namespaces)")
    p.add_argument("--worker-image", help="stage image when a run names none")
    p.add_argument("--gpu-resource", dest="gpu_resource_name", metavar="NAME",
                   help="extended resource requested for GPUs (default nvidia.com/gpu)")
    p.add_argument("--service-account", help="service account of stage pods when a run names none")
    p.add_argument("--model-cache-claim", metavar="PVC", help="PVC mounted as the model cache when a run names none")
    p.add_argument("--pending-timeout", type=float, metavar="SECONDS",
                   help="how long a pod may be stuck (image pull, unschedulable) before the run reports it (default 300)")
    p.add_argument("--metrics-port", metavar="PORT", help="Prometheus endpoint port (default 8080; 'off' disables it)")
    p.add_argument("--liveness", dest="liveness_endpoint", metavar="URL",
                   help="liveness endpoint (default http://0.0.0.0:8081/healthz)")
    p.add_argument("--peering", dest="peering_name", metavar="NAME",
                   help="kopf peering object shared by the replicas (default selfimprove)")
    p.add_argument("--standalone", action="store_true", default=None,
                   help="run without peering (a single replica only)")
    p.add_argument("--priority", type=int, help="peering priority (default: earlier start, higher priority)")
    p.add_argument("--workers", type=int, help="runs reconciled concurrently (default 8)")
    p.add_argument("--log-format", choices=["json", "plain"], help="log format (default json)")
    p.add_argument("-v", "--verbose", action="store_true", default=None, help="debug logging")
    p.set_defaults(func=_cmd_operator)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
