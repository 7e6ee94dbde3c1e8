"""The `selfimprove` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    from .crd import CRD_PATH, render_crd

    text = render_crd()
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.output or CRD_PATH)
    if args.check:
        if not path.exists() or path.read_text() != text:
            print(f"{path}: stale; run `selfimprove crd` and commit the result", file=sys.stderr)
            return 1
        print(f"{path}: up to date")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return 0


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

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
