"""Confidence intervals and paired tests for the results pages: how far a score can be trusted, and whether two
methods differ on the same examples more than chance would make them.

Scores that are all 0 or 1 (passkey, the synthetic suite, multiple-choice letters) get Wilson intervals and exact
McNemar tests; other scores (ROUGE, top-1 agreement over a window, KL) a percentile bootstrap and a paired sign-flip
test. Resampling is seeded, so a page regenerated from the same records is the same page.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
RESAMPLES = 2000


def is_binary(values: list[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default); (0, 1) with no observation."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(groups: list[list[float]], resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of the groups' means, resampling each group's values with replacement
    (one group: the plain mean)."""
    rng = random.Random(seed)
    means = sorted(
        statistics.fmean(statistics.fmean(rng.choices(group, k=len(group))) for group in groups)
        for _ in range(resamples)
    )
    return means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))]


def interval(values: list[float]) -> tuple[float, float]:
    """95% interval of the mean of `values`: Wilson for 0/1 scores, else a bootstrap. Fractions that all happen to be
    0 or 1 (a method that agrees on every token of 3 fidelity windows) get Wilson's too, on purpose: a bootstrap of
    equal values is a point, claiming a certainty 3 windows do not give (the full cache's row is 1 by construction,
    and its Wilson interval is merely conservative)."""
    if is_binary(values):
        return wilson(sum(values), len(values))
    return bootstrap([values])


def average_interval(groups: list[list[float]]) -> tuple[float, float]:
    """95% interval of the mean of the groups' means (an average over task columns): for 0/1 scores, Wilson's at that
    mean over all the examples (a bootstrap collapses at 0 or 100%); else a bootstrap resampling each group."""
    values = [v for group in groups for v in group]
    if is_binary(values):
        n = len(values)
        return wilson(statistics.fmean(statistics.fmean(group) for group in groups) * n, n)
    return bootstrap(groups)


def mcnemar(better: int, worse: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: `better` examples only the first method gets
    right, `worse` only the second."""
    n = better + worse
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(better, worse) + 1)) / 2**n
    return min(1.0, 2 * tail)


def sign_flip(differences: list[float], resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of a zero mean paired difference: each difference's sign flipped at random."""
    observed = abs(statistics.fmean(differences))
    if observed == 0:
        return 1.0
    rng = random.Random(seed)
    hits = sum(
        abs(statistics.fmean(d if rng.random() < 0.5 else -d for d in differences)) >= observed - 1e-12
        for _ in range(resamples)
    )
    return (hits + 1) / (resamples + 1)


@dataclass
class Comparison:
    """One method against a reference on the examples both ran (paired)."""

    method: str
    budget: float | int
    reference: str  # e.g. "full" or "snapkv@0.2"
    examples: int
    difference: float  # mean score difference, method - reference, in [-1, 1]
    better: int  # examples where the method scores higher
    worse: int  # examples where it scores lower
    p_value: float
    test: str  # "McNemar" (0/1 scores) or "sign-flip"


def compare(method: dict, reference: dict, names: tuple[str, float | int, str]) -> Comparison | None:
    """Paired comparison of two {example key: score} maps on their common keys; None if they share none."""
    keys = sorted(method.keys() & reference.keys())
    if not keys:
        return None
    differences = [method[k] - reference[k] for k in keys]
    better, worse = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
    binary = is_binary([method[k] for k in keys] + [reference[k] for k in keys])
    p_value = mcnemar(better, worse) if binary else sign_flip(differences)
    return Comparison(
        *names, len(keys), statistics.fmean(differences), better, worse, p_value, "McNemar" if binary else "sign-flip"
    )
