"""LTD's selection at scale (coreset.py) against the exact reference (selection.k_center_greedy)."""

from __future__ import annotations

import numpy as np
import pytest
from selfimprove_workers.coreset import k_center_greedy_fast, ltd_coreset, minibatch_kmeans, share_budget
from selfimprove_workers.selection import k_center_greedy


@pytest.mark.parametrize("trial", range(12))
def test_one_cluster_equals_the_reference_index_for_index(trial: int) -> None:
    """Integer-valued points (float32 arithmetic exact, many ties): the same indices in the same
    order as the float64 reference, through k_center_greedy_fast and through ltd_coreset(clusters=1)."""
    rng = np.random.default_rng(trial)
    n, d = int(rng.integers(1, 400)), int(rng.integers(1, 24))
    x = rng.integers(-4, 5, size=(n, d)).astype(np.float32)
    k = int(rng.integers(0, n + 1))
    ref = k_center_greedy(x, k)
    assert k_center_greedy_fast(x, k) == ref
    assert ltd_coreset(x, k=k, clusters=1).chosen == ref
    # Real-valued float64 input: computed in float64, equal as well.
    xf = rng.standard_normal((n, d))
    assert k_center_greedy_fast(xf, k) == k_center_greedy(xf, k)


def test_worked_example_and_duplicates_match() -> None:
    pts = np.array([[0.0, 0], [1, 0], [2, 0], [10, 0], [11, 0]], dtype=np.float32)
    assert k_center_greedy_fast(pts, 3) == [2, 4, 0] == k_center_greedy(pts, 3)
    dup = np.array([[1.0, 0], [1.0, 0], [0, 1.0]], dtype=np.float32)
    assert k_center_greedy_fast(dup, 3) == k_center_greedy(dup, 3)


def test_share_budget_is_exact_and_proportional() -> None:
    assert share_budget([100, 200, 300, 400], 100) == [10, 20, 30, 40]
    assert share_budget([1, 1, 1], 2) == [1, 1, 0]          # equal remainders → lower index
    assert share_budget([5, 0, 3], 8) == [5, 0, 3]
    assert share_budget([2, 10], 11) == [2, 9]               # a full cluster passes its share on
    assert share_budget([], 3) == [] and share_budget([0, 0], 2) == [0, 0]
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = [int(s) for s in rng.integers(0, 50, size=int(rng.integers(1, 20)))]
        k = int(rng.integers(0, sum(sizes) + 5))
        out = share_budget(sizes, k)
        assert sum(out) == min(k, sum(sizes)) and all(0 <= o <= s for o, s in zip(out, sizes))


def blobs(sizes: list[int], d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((len(sizes), d)) * 20
    x = np.concatenate([c + rng.standard_normal((s, d)) for c, s in zip(centers, sizes)]).astype(np.float32)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(len(x))
    return x[perm], truth[perm]


def test_kmeans_finds_separated_blobs_and_each_gets_its_share() -> None:
    x, truth = blobs([100, 200, 300, 400])
    labels, centers = minibatch_kmeans(x, 4, seed=0, batch=256)
    assert centers.shape == (4, 16)
    # A one-to-one map between found clusters and true blobs.
    pairs = {(int(a), int(b)) for a, b in zip(labels, truth)}
    assert len(pairs) == 4 and len({a for a, _ in pairs}) == 4
    core = ltd_coreset(x, keep=0.1, clusters=4, seed=0, batch=256)
    assert len(core.chosen) == 100 == len(set(core.chosen))
    assert sorted(np.bincount(truth[core.chosen]).tolist()) == [10, 20, 30, 40]


def test_deterministic_for_a_seed_and_exact_count() -> None:
    x, _ = blobs([300, 50, 650], d=8, seed=3)
    a = ltd_coreset(x, keep=0.37, seed=5)
    b = ltd_coreset(x, keep=0.37, seed=5)
    assert a.chosen == b.chosen and (a.labels == b.labels).all()
    assert len(a.chosen) == int(np.ceil(0.37 * len(x))) == len(set(a.chosen))
    assert a.clusters == 23  # ceil(sqrt(1000 / 2))
    assert ltd_coreset(x[:0], keep=0.5).chosen == []
    with pytest.raises(ValueError, match="exactly one"):
        ltd_coreset(x, keep=0.5, k=3)


def test_grouping_and_threads_do_not_change_the_selection() -> None:
    x, _ = blobs([120, 40, 260, 80], d=8, seed=7)
    core = ltd_coreset(x, keep=0.3, clusters=9, seed=1, threads=1)
    assert ltd_coreset(x, keep=0.3, clusters=9, seed=1, threads=2).chosen == core.chosen
    # Each cluster's picks are exactly the reference's on that cluster alone.
    from selfimprove_workers.coreset import per_cluster_k_center

    members = [np.flatnonzero(core.labels == j) for j in range(core.clusters)]
    grouped = per_cluster_k_center(x, members, core.budget, threads=1, group_rows=1_000_000)
    alone = per_cluster_k_center(x, members, core.budget, threads=1, group_rows=1)
    assert grouped == alone
    assert alone == [[int(m[i]) for i in k_center_greedy(x[m], k)] if k else [] for m, k in zip(members, core.budget)]
