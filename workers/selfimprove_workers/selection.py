"""The arithmetic of the data-selection filters, free of models and files.

Distribution shift (IWSI, shared/research/methods.md §3; the authors' record_weights.py and
filter_data.py):

    w'_i = clip(L̄v / L_i, 0, 2)            (w'_i = 0 when L_i = 0)
    DS_i = w'_i        if w'_i > 1
           min(1/w'_i, 5) otherwise        (1/0 is taken as 5)
    sort DS ascending; threshold = DS_sorted[⌊k·n⌋]; keep the ⌊k·n⌋ lowest DS

DS ≥ 1 always, and DS ≈ 1 means "the candidate's loss is like real data's". Without ties this
is exactly the authors' `DS_i < threshold`. With ties it is not: the strict `<` drops every
candidate tied at the threshold, and when the weights sit at a clip bound (the model's own
samples have far lower loss than human-written validation answers, so every w' = 2 and every
DS = 2) it keeps nothing (issue 13). `ds_keep` therefore keeps exactly ⌊k·n⌋ (all n when
k·n ≥ n), ordered by (DS, tie-break key, position): the filter's tie-break key is the unclipped
DS (the same shape without the clip to [0, 2] and the cap at 5, so among clipped ties the one
nearer real data still goes first), then question id and path index. ⌊k·n⌋ can be 0 (n = 1,
k < 1): nothing is kept and the filter stage fails saying so, rather than train on nothing.

Judge and self ratings (AlpaGasus, IWSI's self filter) are read from free text by
`parse_score`. `k_center_greedy` is the exact O(n·k·d) k-center greedy the diversity filter used
before LTD's clustering (issue 16); it stays as the reference `coreset.py` is tested against and
benchmarked beside (the filter itself runs `coreset.ltd_coreset`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "DS_MAX",
    "importance_weight",
    "ds_value",
    "ds_keep",
    "raw_ds",
    "W_MAX",
    "parse_score",
    "top_fraction",
    "k_center_greedy",
]

DS_MAX = 5.0
W_MAX = 2.0


def importance_weight(valid_loss: float, loss: float) -> float:
    """w' = clip(L̄v / L, 0, 2); 0 when L = 0 (a loss of zero carries no information)."""
    if loss <= 0 or valid_loss <= 0:
        return 0.0
    return min(W_MAX, max(0.0, valid_loss / loss))


def ds_value(w: float) -> float:
    """DS = w' when w' > 1, else min(1/w', 5), with 1/0 = 5."""
    if w > 1:
        return w
    return DS_MAX if w <= 0 else min(1.0 / w, DS_MAX)


def raw_ds(valid_loss: float, loss: float) -> float:
    """DS without the clip and the cap: r = L̄v / L, then r when r > 1, else 1/r (∞ for r = 0).

    Monotone with DS wherever DS is not clipped, so it orders candidates the clip made equal."""
    if loss <= 0 or valid_loss <= 0:
        return math.inf
    r = valid_loss / loss
    return r if r > 1 else 1.0 / r


def ds_keep(ds: Sequence[float], keep: float, tiebreak: Sequence[Any] | None = None) -> tuple[list[bool], float | None]:
    """Which candidates IWSI keeps — exactly ⌊k·n⌋ of them (n when k·n ≥ n), the lowest DS first,
    ties by `tiebreak[i]` then position — and IWSI's threshold DS_sorted[⌊k·n⌋] (None when
    k·n ≥ n: there is no index to read it at). Every kept DS ≤ threshold ≤ every dropped DS."""
    n = len(ds)
    count = min(n, math.floor(keep * n + 1e-9))  # + ε: 0.29·100 is 28.999… in floating point
    order = sorted(range(n), key=lambda i: (ds[i], tiebreak[i] if tiebreak is not None else 0, i))
    chosen = set(order[:count])
    threshold = ds[order[count]] if count < n else None
    return [i in chosen for i in range(n)], threshold


# A number as a rating: "4", "4.5", ".5"; signs are not ratings.
_SCORE_NUMBER = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?|\.\d+)")
_SCORE_LABEL = re.compile(r"(?:score|rating)\W{0,6}?(\d+(?:\.\d+)?|\.\d+)", re.IGNORECASE)
SCORE_LINES = 3


def parse_score(text: str, max_score: float) -> float | None:
    """The rating in a judge's reply: the first number in [0, max_score] in the first few
    non-empty lines, preferring one labeled "Score:"/"Rating:".

    Reads "4", "Score: 4.5", "**5**/5", "Rating - 3 out of 5". AlpaGasus asks for the score on
    the first line; models often prefix a label or add markdown, and some open with a sentence,
    hence a few lines. None when nothing there is a rating in range.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()][:SCORE_LINES]
    head = "\n".join(lines)
    for pattern in (_SCORE_LABEL, _SCORE_NUMBER):
        for m in pattern.finditer(head):
            value = float(m.group(1))
            if 0.0 <= value <= max_score:
                return value
    return None


def top_fraction(scores: Sequence[float], keep: float) -> list[bool]:
    """Keep the ⌈keep·n⌉ highest scores; ties are broken by position (earlier first), so the
    number kept is exact and the choice deterministic."""
    n = len(scores)
    k = min(n, math.ceil(keep * n))
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    chosen = set(order[:k])
    return [i in chosen for i in range(n)]


def k_center_greedy(embeddings: np.ndarray, k: int) -> list[int]:
    """Indices of a k-center greedy coreset, in selection order.

    Starts from the point nearest the mean (a deterministic, order-independent representative)
    and repeatedly adds the point farthest from everything chosen so far — the 2-approximation
    of the k-center problem, so the chosen points cover the whole set with the smallest radius
    it can guarantee. Distances are Euclidean (on L2-normalized embeddings, a monotone function
    of cosine distance). Ties go to the lowest index.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    n = x.shape[0]
    k = max(0, min(k, n))
    if k == 0:
        return []
    start = int(np.argmin(((x - x.mean(axis=0)) ** 2).sum(axis=1)))
    chosen = [start]
    nearest = ((x - x[start]) ** 2).sum(axis=1)
    nearest[start] = -1.0
    while len(chosen) < k:
        nxt = int(np.argmax(nearest))  # argmax returns the first maximum: lowest index on ties
        chosen.append(nxt)
        nearest = np.minimum(nearest, ((x - x[nxt]) ** 2).sum(axis=1))
        nearest[chosen] = -1.0
    return chosen
