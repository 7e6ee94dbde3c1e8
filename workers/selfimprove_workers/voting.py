"""Self-consistency voting over the answers of N sampled reasoning paths (LMSI).

    â = argmax_a Σ_i 1[a_i = a]          majority answer; ties → the answer seen first
    confidence = count(â) / N
    entropy = H(p) / ln N                 normalized to [0, 1]; 0 when N = 1

Paths whose answer could not be extracted count in N (they lower the confidence) and form one
outcome of their own in the entropy: a question half of whose paths give no answer is not a
certain one. The majority is always a real answer (None when no path gave one).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Vote", "vote", "normalized_entropy"]


@dataclass(frozen=True)
class Vote:
    distribution: dict[str, int]    # answer → paths giving it, in first-seen order
    unanswered: int                 # paths without an extractable answer
    majority: str | None
    count: int                      # paths agreeing with the majority
    paths: int                      # N
    confidence: float
    entropy: float                  # normalized

    def wire(self) -> dict:
        return {
            "distribution": self.distribution,
            "unanswered": self.unanswered,
            "majority": self.majority,
            "count": self.count,
            "paths": self.paths,
            "confidence": self.confidence,
            "entropy": self.entropy,
        }


def normalized_entropy(counts: Sequence[int], n: int) -> float:
    """Shannon entropy (nats) of the outcome counts, divided by ln n (the entropy of n distinct
    outcomes); 0 for n ≤ 1."""
    if n <= 1:
        return 0.0
    h = -sum((c / n) * math.log(c / n) for c in counts if c > 0)
    return max(0.0, min(1.0, h / math.log(n)))


def vote(answers: Sequence[str | None]) -> Vote:
    """The vote over one question's path answers (already normalized by `extract_answer`)."""
    n = len(answers)
    counts = Counter(a for a in answers if a is not None)
    distribution = {a: counts[a] for a in dict.fromkeys(a for a in answers if a is not None)}
    unanswered = n - sum(counts.values())
    majority, best = None, 0
    for answer, c in distribution.items():  # first seen wins a tie: strictly greater replaces
        if c > best:
            majority, best = answer, c
    outcomes = list(distribution.values()) + ([unanswered] if unanswered else [])
    return Vote(
        distribution=distribution,
        unanswered=unanswered,
        majority=majority,
        count=best,
        paths=n,
        confidence=best / n if n else 0.0,
        entropy=normalized_entropy(outcomes, n),
    )
