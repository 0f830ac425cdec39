"""Statistics that can tell ablation rows apart: seed confidence intervals and paired per-case differences.

Two questions, two tools: how much does a row's figure move between training runs (:func:`seed_mean_ci`),
and is a row better or worse than the complete model on the same cases (:func:`paired_difference`)?
Neither corrects for the number of comparisons in a table; read a single marked cell among many with
that in mind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from .metrics import bootstrap_mean_ci

__all__ = [
    "SeedInterval",
    "PairedDifference",
    "seed_mean_ci",
    "paired_difference",
    "format_interval",
    "format_difference",
]


@dataclass(frozen=True)
class SeedInterval:
    """Mean over seeds with a confidence interval ``mean ± half_width`` (NaN half-width with one seed)."""

    mean: float
    half_width: float
    n: int

    def to_dict(self) -> Dict[str, float]:
        return {"mean": self.mean, "ci95_half_width": self.half_width, "n_seeds": self.n}


@dataclass(frozen=True)
class PairedDifference:
    """Mean per-case difference (row - reference), its bootstrap interval, and whether it excludes zero."""

    mean: float
    low: float
    high: float
    n_cases: int

    @property
    def excludes_zero(self) -> bool:
        return bool(self.n_cases > 1 and (self.low > 0 or self.high < 0))

    def to_dict(self) -> Dict[str, object]:
        return {
            "mean": self.mean,
            "ci95_low": self.low,
            "ci95_high": self.high,
            "n_cases": self.n_cases,
            "excludes_zero": self.excludes_zero,
        }


def seed_mean_ci(values: Sequence[float], confidence: float = 0.95) -> SeedInterval:
    """Mean of per-seed values and the half-width of its Student-t confidence interval (NaNs left out).

    Each cell of an ablation table is the mean over seeds with this interval: with 3 seeds the 95 %
    half-width is 2.48 standard errors, so the interval is honest about how few runs there are.
    """
    from scipy import stats

    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return SeedInterval(float("nan"), float("nan"), 0)
    if x.size == 1:
        return SeedInterval(float(x[0]), float("nan"), 1)
    sem = float(x.std(ddof=1)) / math.sqrt(x.size)
    t = float(stats.t.ppf(0.5 + float(confidence) / 2.0, df=x.size - 1))
    return SeedInterval(float(x.mean()), t * sem, int(x.size))


def _case_means(per_seed: Sequence[Mapping[str, float]]) -> Dict[str, float]:
    """Each case's value averaged over the seeds that scored it (NaN values left out)."""
    sums: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for run in per_seed:
        for case, value in run.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            sums[case] = sums.get(case, 0.0) + float(value)
            counts[case] = counts.get(case, 0) + 1
    return {case: sums[case] / counts[case] for case in sums}


def paired_difference(
    row: Sequence[Mapping[str, float]],
    reference: Sequence[Mapping[str, float]],
    confidence: float = 0.95,
    n_resamples: int = 10000,
    seed: int = 0,
) -> PairedDifference:
    """Paired per-case difference between two ablation rows.

    ``row`` and ``reference``: one ``{case id: value}`` per seed (e.g. a case's WT Dice, or 1/0 for a correctly /
    wrongly graded case). Each case is averaged over its row's seeds, the differences are taken on the cases both
    rows scored, and their mean gets a percentile bootstrap interval over cases (fixed ``seed``;
    :func:`modeling_emrfuse.evaluation.metrics.bootstrap_mean_ci`). Rows are evaluated on the same held-out
    cases, so the comparison is paired; a difference whose interval excludes zero is marked: it is larger
    than what the choice of cases explains.
    """
    a, b = _case_means(row), _case_means(reference)
    cases = sorted(set(a) & set(b))
    if not cases:
        return PairedDifference(float("nan"), float("nan"), float("nan"), 0)
    diffs = [a[c] - b[c] for c in cases]
    mean, low, high = bootstrap_mean_ci(diffs, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return PairedDifference(mean, low, high, len(cases))


def format_interval(interval: SeedInterval, scale: float = 1.0, digits: int = 1) -> str:
    """``"93.2 ± 1.4"`` (mean ± 95 % CI half-width), or just the mean with one seed; ``"n/a"`` without values."""
    if interval.n == 0:
        return "n/a"
    if interval.n == 1:
        return f"{interval.mean * scale:.{digits}f}"
    return f"{interval.mean * scale:.{digits}f} ± {interval.half_width * scale:.{digits}f}"


def format_difference(diff: Optional[PairedDifference], scale: float = 1.0, digits: int = 1) -> str:
    """``"-2.1 [-3.4, -0.8]*"``: mean difference, its interval, and ``*`` when the interval excludes zero."""
    if diff is None or diff.n_cases == 0:
        return "n/a"
    mark = "*" if diff.excludes_zero else ""
    return f"{diff.mean * scale:+.{digits}f} [{diff.low * scale:+.{digits}f}, {diff.high * scale:+.{digits}f}]{mark}"
