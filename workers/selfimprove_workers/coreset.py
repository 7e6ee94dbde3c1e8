"""LTD's coreset selection at scale: mini-batch K-means, then k-center greedy inside each cluster.

LTD (shared/research/methods.md §4) embeds every example, clusters the embeddings with K-means
and picks a coreset per cluster, so that a small subset covers the whole distribution. Done
naively (`selection.k_center_greedy`, float64, one n×d temporary per step) k-center alone costs
O(n·k·d) — with k = keep·n that is quadratic in n: GSM8K × 32 paths at keep 0.5 is about
2.4·10⁵ × 1.2·10⁵ × d, days of CPU. Here:

* **K-means** (`minibatch_kmeans`): k-means++ seeding on a random sample, then mini-batch
  updates (Sculley 2010, per-center learning rate 1/count), then one chunked pass assigning every
  point to its nearest center. Cost O((sample + iterations·batch + n)·C·d), float32 BLAS.
* **k-center greedy per cluster** (`k_center_greedy_fast`): the same greedy rule as the
  reference (start at the point nearest the cluster's mean, then repeatedly the point farthest
  from everything chosen; ties to the lowest index), with squared distances updated as
  ‖x‖² − 2x·c + ‖c‖² (one float32 matrix-vector product per step). Cost Σ_c n_c·k_c·d instead
  of n·k·d: with C balanced clusters, C times less. Clusters run in parallel threads.
* **Budget**: the ⌈keep·n⌉ points are shared between clusters in proportion to their sizes by
  largest remainder (ties to the lower cluster), so the total is exact.

With one cluster the result is the reference's, index for index, whenever float32 arithmetic
is exact on the data (tests/unit/test_coreset.py checks integer-valued data and float64 inputs);
on general float data the two can differ only where two distances tie within float32 rounding.
The result is deterministic for a given seed and input on one machine (the sampling is
seeded, ties go to the lower index, the thread count does not enter); another BLAS build may
round K-means' distances differently and so move a point near a cluster boundary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Coreset", "auto_clusters", "share_budget", "minibatch_kmeans", "k_center_greedy_fast", "ltd_coreset"]

# Rows per chunk in the distance passes: bounds the temporary (CHUNK × C floats) at any n.
CHUNK = 16384
# Padded rows a group of clusters takes in the batched k-center (× d floats: ~12 MB at d = 384).
GROUP_ROWS = 8192


def _sq_norms(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape[0], dtype=np.float64 if x.dtype == np.float64 else np.float32)
    for s in range(0, x.shape[0], CHUNK):
        part = x[s:s + CHUNK].astype(out.dtype, copy=False)
        out[s:s + CHUNK] = np.einsum("ij,ij->i", part, part)
    return out


def _nearest_to_mean(x: np.ndarray) -> int:
    """argmin ‖x_i − mean‖², in float64 (chunked), lowest index on ties — the reference's start."""
    mean = np.zeros(x.shape[1], dtype=np.float64)
    for s in range(0, x.shape[0], CHUNK):
        mean += x[s:s + CHUNK].sum(axis=0, dtype=np.float64)
    mean /= x.shape[0]
    best, best_d = 0, math.inf
    for s in range(0, x.shape[0], CHUNK):
        d = ((x[s:s + CHUNK].astype(np.float64) - mean) ** 2).sum(axis=1)
        i = int(np.argmin(d))
        if d[i] < best_d:
            best, best_d = s + i, float(d[i])
    return best


def k_center_greedy_fast(x: np.ndarray, k: int) -> list[int]:
    """`selection.k_center_greedy`'s selection, in x's dtype (float32 unless given float64)."""
    return k_center_group([x], [k])[0]


def k_center_group(xs: Sequence[np.ndarray], ks: Sequence[int]) -> list[list[int]]:
    """k-center greedy in each of several point sets at once, one batched step for all of them.

    The sets are stacked (padded to the largest): the element-wise work of a step (distance,
    minimum, argmax) runs once for the group, a matrix-vector product per set, and a group of a
    few MB stays in cache. Padding rows start at −2 and never win an argmax; a set
    whose budget is reached stops appending. Single-threaded torch kernels: `per_cluster_k_center`
    runs groups in parallel (one multi-threaded BLAS call per small step costs more in thread
    hand-offs than the product itself).
    """
    import torch

    ks = [max(0, min(k, x.shape[0])) for x, k in zip(xs, ks)]
    out: list[list[int]] = [[] for _ in xs]
    live = [i for i, k in enumerate(ks) if k > 0]
    if not live:
        return out
    dtype = np.float64 if all(xs[i].dtype == np.float64 for i in live) else np.float32
    m = max(xs[i].shape[0] for i in live)
    d = xs[live[0]].shape[1]
    stack = np.zeros((len(live), m, d), dtype=dtype)
    for b, i in enumerate(live):
        stack[b, : xs[i].shape[0]] = xs[i]
    starts = [_nearest_to_mean(np.ascontiguousarray(xs[i], dtype=dtype)) for i in live]
    with torch.inference_mode():
        t = torch.from_numpy(stack)
        sq = (t * t).sum(dim=2)                                   # (B, m)
        rows = torch.arange(len(live))
        pick = torch.tensor(starts)
        nearest = torch.full((len(live), m), -2.0, dtype=t.dtype)  # padding: never chosen
        for b, i in enumerate(live):
            nearest[b, : xs[i].shape[0]] = 0.0
        valid = nearest > -2.0
        prod = torch.empty((len(live), m), dtype=t.dtype)
        first = True
        for step in range(max(ks[i] for i in live)):
            for b, i in enumerate(live):
                if step < ks[i]:
                    out[i].append(int(pick[b]))
            if step + 1 == max(ks[i] for i in live):
                break
            for b in range(len(live)):  # one mv each: torch's bmm with one column is ~5× slower
                torch.mv(t[b], t[b, pick[b]], out=prod[b])
            dist = sq - 2.0 * prod + sq[rows, pick].unsqueeze(1)
            dist = torch.clamp(dist, min=0.0)                        # rounding: ‖x − x‖² ≥ 0
            if first:
                nearest = torch.where(valid, dist, nearest)
                first = False
            else:
                nearest = torch.where(valid, torch.minimum(nearest, dist), nearest)
            nearest[rows, pick] = -1.0                               # chosen: never again
            pick = torch.argmax(nearest, dim=1)                      # first maximum: lowest index
    return out


def auto_clusters(n: int) -> int:
    """⌈√(n/2)⌉ clusters when none is given: about √(2n) points a cluster, so the per-cluster
    k-center costs O(n^1.5·d) in all, and K-means' assignment pass about the same."""
    return max(1, math.ceil(math.sqrt(n / 2)))


def share_budget(sizes: Sequence[int], k: int) -> list[int]:
    """k points shared in proportion to `sizes` (largest remainder; ties to the lower index),
    never more than a cluster holds. Sums to min(k, Σ sizes)."""
    total = sum(sizes)
    k = min(k, total)
    if total == 0:
        return [0] * len(sizes)
    quotas = [k * s / total for s in sizes]
    out = [min(s, math.floor(q)) for s, q in zip(sizes, quotas)]
    order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), i))
    left = k - sum(out)
    while left > 0:  # a second sweep only when a full cluster could not take its share
        for i in order:
            if left and out[i] < sizes[i]:
                out[i] += 1
                left -= 1
    return out


def _assign(x: np.ndarray, centers: np.ndarray, center_sq: np.ndarray) -> np.ndarray:
    """Index of the nearest center of every row (chunked; lowest index on ties)."""
    labels = np.empty(x.shape[0], dtype=np.int64)
    for s in range(0, x.shape[0], CHUNK):
        part = x[s:s + CHUNK].astype(np.float32, copy=False)
        d = center_sq[None, :] - 2.0 * (part @ centers.T)  # ‖x‖² is the same for every center
        labels[s:s + CHUNK] = np.argmin(d, axis=1)
    return labels


def _kmeans_pp(sample: np.ndarray, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (D² sampling) on the sample."""
    m = sample.shape[0]
    sq = _sq_norms(sample)
    centers = np.empty((clusters, sample.shape[1]), dtype=np.float32)
    first = int(rng.integers(m))
    centers[0] = sample[first]
    dist = np.maximum(sq - 2.0 * (sample @ sample[first]) + sq[first], 0.0)
    for j in range(1, clusters):
        total = float(dist.sum(dtype=np.float64))
        if total <= 0:  # fewer distinct points than clusters: repeat one (it stays empty)
            idx = int(rng.integers(m))
        else:
            idx = int(np.searchsorted(np.cumsum(dist, dtype=np.float64), rng.random() * total, side="right"))
            idx = min(idx, m - 1)
        centers[j] = sample[idx]
        np.minimum(dist, np.maximum(sq - 2.0 * (sample @ sample[idx]) + sq[idx], 0.0), out=dist)
    return centers


def minibatch_kmeans(x: np.ndarray, clusters: int, seed: int = 0, iterations: int = 100,
                     batch: int = 4096, sample: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, centers): mini-batch K-means with k-means++ seeding on a random sample
    (default max(10·clusters, batch) points). Deterministic for a seed."""
    n = x.shape[0]
    clusters = max(1, min(clusters, n))
    if clusters == 1:
        mean = sum((x[s:s + CHUNK].sum(axis=0, dtype=np.float64) for s in range(0, n, CHUNK)), np.zeros(x.shape[1]))
        return np.zeros(n, dtype=np.int64), (mean / n).astype(np.float32)[None, :]
    rng = np.random.default_rng(seed)
    m = min(n, sample or max(10 * clusters, batch))
    pick = np.sort(rng.choice(n, size=m, replace=False)) if m < n else np.arange(n)
    centers = _kmeans_pp(np.ascontiguousarray(x[pick], dtype=np.float32), clusters, rng)
    counts = np.zeros(clusters, dtype=np.float64)
    b = min(batch, n)
    for _ in range(iterations):
        rows = np.ascontiguousarray(x[np.sort(rng.choice(n, size=b, replace=False))], dtype=np.float32)
        labels = _assign(rows, centers, _sq_norms(centers))
        per = np.bincount(labels, minlength=clusters).astype(np.float64)
        order = np.argsort(labels, kind="stable")
        hit = per > 0
        sums = np.zeros(centers.shape, dtype=np.float64)  # Σ of each center's batch points
        starts = (np.cumsum(per) - per)[hit].astype(np.int64)  # offsets of the non-empty clusters
        sums[hit] = np.add.reduceat(rows[order].astype(np.float64), starts, axis=0)
        counts += per
        # c ← c + (Σ_batch x − m·c) / count: each point moves its center by 1/count (Sculley).
        centers[hit] += ((sums[hit] - per[hit, None] * centers[hit]) / counts[hit, None]).astype(np.float32)
    return _assign(x, centers, _sq_norms(centers)), centers


@dataclass
class Coreset:
    chosen: list[int]          # indices, cluster by cluster, each cluster's in greedy order
    labels: np.ndarray         # cluster of every point
    budget: list[int]          # points chosen per cluster
    clusters: int


def ltd_coreset(x: np.ndarray, keep: float | None = None, k: int | None = None, clusters: int | None = None,
                seed: int = 0, iterations: int = 100, batch: int = 4096, threads: int | None = None) -> Coreset:
    """LTD: K-means into `clusters` (default `auto_clusters(n)`), then k-center greedy inside
    each cluster with the budget ⌈keep·n⌉ (or k) shared by cluster size."""
    n = x.shape[0]
    if (keep is None) == (k is None):
        raise ValueError("give exactly one of keep, k")
    target = min(n, math.ceil(keep * n) if keep is not None else int(k or 0))
    c = max(1, min(clusters or auto_clusters(n), n)) if n else 1
    if n == 0:
        return Coreset([], np.zeros(0, dtype=np.int64), [0], c)
    labels, _ = minibatch_kmeans(x, c, seed=seed, iterations=iterations, batch=batch)
    order = np.argsort(labels, kind="stable")  # members of each cluster, in index order
    members = np.split(order, np.cumsum(np.bincount(labels, minlength=c))[:-1])
    budget = share_budget([len(m) for m in members], target)
    chosen: list[int] = []
    for part in per_cluster_k_center(x, members, budget, threads):
        chosen.extend(part)
    return Coreset(chosen, labels, budget, c)


def per_cluster_k_center(x: np.ndarray, members: Sequence[np.ndarray], budget: Sequence[int],
                         threads: int | None = None, group_rows: int = GROUP_ROWS) -> list[list[int]]:
    """k-center greedy inside each cluster (indices into x). Clusters of similar size are
    grouped (`k_center_group`, at most `group_rows` padded rows a group) and groups spread over
    `threads` threads (default: the CPUs), each single-threaded; results in cluster order and
    independent of the grouping, so the outcome does not depend on the thread count."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import torch

    order = sorted((j for j in range(len(members)) if budget[j]), key=lambda j: (len(members[j]), j))
    groups: list[list[int]] = []
    for j in order:
        if groups and len(members[j]) * (len(groups[-1]) + 1) <= group_rows:
            groups[-1].append(j)
        else:
            groups.append([j])

    def run(group: list[int]) -> list[tuple[int, list[int]]]:
        picked = k_center_group([x[members[j]] for j in group], [budget[j] for j in group])
        return [(j, [int(members[j][i]) for i in p]) for j, p in zip(group, picked)]

    workers = max(1, threads or os.cpu_count() or 1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if workers == 1:
            done = [run(g) for g in groups]
        else:
            with ThreadPoolExecutor(workers) as pool:
                done = list(pool.map(run, groups))  # torch's kernels release the GIL
    finally:
        torch.set_num_threads(before)
    out: list[list[int]] = [[] for _ in members]
    for part in done:
        for j, picked in part:
            out[j] = picked
    return out
