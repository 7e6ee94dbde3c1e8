"""The demo's self-improvement table: `selfimprove demo` for several seeds, side by side.

For each seed: the held-out greedy accuracy of the warm-started model (round 0) and after each
LMSI round, the gain in points, and the wall time (first run includes the warm-start; the
data and model are cached afterwards). The demo's claim is a gain of at least 10 points for each
of 3 seeds within 10 minutes on 2 cores.

    .venv/bin/python bench/bench_demo.py [--seeds 0 1 2] [--storage DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--storage", default=None, help="default: a fresh temp dir (rounds not resumed)")
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "demo"))
    args = parser.parse_args()
    storage = args.storage or tempfile.mkdtemp(prefix="selfimprove-bench-demo-")
    rows = []
    for seed in args.seeds:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "selfimprove_operator.cli", "demo", "--seed", str(seed),
                               "--storage", storage, "--cache", args.cache,
                               "--manifest", str(ROOT / "examples" / "local-arithmetic.yaml")],
                              capture_output=True, text=True, cwd=ROOT)
        seconds = time.monotonic() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
            return 1
        status = json.loads((Path(storage) / "local" / f"arithmetic-seed{seed}" / "status.json").read_text())
        accs = [r["accuracy"] for r in status["rounds"]]
        rows.append((seed, accs, seconds))
    print(f"{'seed':>4}  " + "  ".join(f"round {i:>2}" for i in range(len(rows[0][1]))) + "   gain    time")
    for seed, accs, seconds in rows:
        gain = (accs[-1] - accs[0]) * 100
        print(f"{seed:>4}  " + "  ".join(f"{a:8.1%}" for a in accs) + f"  {gain:+5.1f}  {seconds:5.0f}s")
    worst = min((a[-1] - a[0]) * 100 for _, a, _ in rows)
    print(f"smallest gain: {worst:+.1f} points (target ≥ +10); slowest: {max(s for *_, s in rows):.0f}s (target ≤ 600 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
