"""LTD's diversity selection at 10⁴ / 10⁵ / 10⁶ candidates: wall time and peak memory.

The diversity filter embeds every candidate (question + path) and keeps ⌈keep·n⌉ of them. The
selection before issue 16 (`selection.k_center_greedy`: float64, one n×d temporary per greedy
step) costs O(n·k·d) = O(keep·n²·d); this one (`coreset.ltd_coreset`: mini-batch K-means, then
k-center greedy inside each cluster, float32, chunked) costs about O((iterations·batch + n)·C·d)
for K-means plus Σ_c n_c·k_c·d for the per-cluster k-center.

The embeddings are synthetic but shaped like real ones: L2-normalized points of a mixture of
200 Gaussian topics in d dimensions (d = 384 by default, a MiniLM-sized embedding; the tiny
Llama's is 128, a 7B model's mean-pooled state 4096), float32, generated chunk by chunk. Time
depends on n, d and the number of clusters, not on where the points lie.

Columns: wall seconds of K-means and of the per-cluster k-center, their total, and the peak of
memory numpy allocated during the selection (tracemalloc; the n×d float32 input itself is
listed apart). The old algorithm runs at one size only (n₀ = --old-at, 10⁴; it is quadratic in
n); its figure at larger n is extrapolated as t(n₀)·(n/n₀)², the cost model above. Figures are
wall time on whatever else the machine is doing: note the load.

    .venv/bin/python bench/bench_selection.py [--sizes 10000,100000,1000000] [--dim 384] [--keep 0.5]
    .venv/bin/python bench/bench_selection.py --smoke      # toy sizes: checks that it runs
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (the k-center's kernels: imported here so that its import is not timed)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workers"))

from selfimprove_workers.coreset import auto_clusters, k_center_greedy_fast, minibatch_kmeans, share_budget  # noqa: E402
from selfimprove_workers.selection import k_center_greedy  # noqa: E402

TOPICS = 200


def embeddings(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((TOPICS, d), dtype=np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 65536):
        m = min(65536, n - s)
        part = topics[rng.integers(TOPICS, size=m)] + 0.6 * rng.standard_normal((m, d), dtype=np.float32)
        part /= np.linalg.norm(part, axis=1, keepdims=True)
        out[s:s + m] = part
    return out


def run_new(x: np.ndarray, keep: float, seed: int) -> dict[str, float]:
    n = x.shape[0]
    tracemalloc.start()
    t0 = time.perf_counter()
    c = auto_clusters(n)
    labels, _ = minibatch_kmeans(x, c, seed=seed)
    t1 = time.perf_counter()
    order = np.argsort(labels, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(labels, minlength=c))[:-1])
    budget = share_budget([len(m) for m in members], math.ceil(keep * n))
    chosen = 0
    for idx, kc in zip(members, budget):
        if kc:
            chosen += len(k_center_greedy_fast(x[idx], kc))
    t2 = time.perf_counter()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert chosen == math.ceil(keep * n)
    sizes = np.bincount(labels, minlength=c)
    return {"clusters": c, "kmeans": t1 - t0, "kcenter": t2 - t1, "total": t2 - t0, "peak": peak / 2**20,
            "largest": int(sizes.max())}


def run_old(x: np.ndarray, keep: float) -> dict[str, float]:
    tracemalloc.start()
    t0 = time.perf_counter()
    k_center_greedy(x, math.ceil(keep * x.shape[0]))
    t = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"total": t, "peak": peak / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--old-at", type=int, default=10000, help="n at which the old algorithm runs (quadratic in n)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes (2000, 5000; d = 32): checks that it runs")
    args = ap.parse_args()
    sizes = [2000, 5000] if args.smoke else [int(s) for s in args.sizes.split(",")]
    d = 32 if args.smoke else args.dim

    print(f"LTD diversity selection, keep {args.keep}, d = {d}, float32 input, clusters ⌈√(n/2)⌉")
    print(f"{'n':>9} {'input MB':>9} {'clusters':>8} {'largest':>8} {'k-means s':>10} {'k-center s':>11} "
          f"{'total s':>9} {'peak MB':>8}")
    new_at: dict[int, float] = {}
    for n in sizes:
        x = embeddings(n, d, args.seed)
        r = run_new(x, args.keep, args.seed)
        new_at[n] = r["total"]
        print(f"{n:>9} {x.nbytes / 2**20:>9.0f} {r['clusters']:>8} {r['largest']:>8} {r['kmeans']:>10.2f} "
              f"{r['kcenter']:>11.2f} {r['total']:>9.2f} {r['peak']:>8.0f}", flush=True)
        del x
    n0 = min(sizes[0], args.old_at)
    x0 = embeddings(n0, d, args.seed)
    if n0 not in new_at:
        new_at[n0] = run_new(x0, args.keep, args.seed)["total"]
    old = run_old(x0, args.keep)
    print(f"\nold k_center_greedy (float64, no clusters) at n = {n0}: {old['total']:.2f} s, peak {old['peak']:.0f} MB; "
          f"new: {new_at[n0]:.2f} s ({old['total'] / new_at[n0]:.1f}× faster)")
    for n in sizes:
        if n > n0:
            est = old["total"] * (n / n0) ** 2
            print(f"old at n = {n} (extrapolated, ∝ n²): ~{est:,.0f} s ({est / 3600:,.1f} h); "
                  f"new measured {new_at[n]:.1f} s ({est / new_at[n]:,.0f}×)")
    if args.smoke:
        print("smoke run: figures mean nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
