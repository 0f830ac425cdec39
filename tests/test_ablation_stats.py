"""Ablation statistics (modeling_emrfuse/ablation_stats.py) against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from modeling_emrfuse.ablation_stats import (
    PairedDifference,
    format_difference,
    format_interval,
    paired_difference,
    seed_mean_ci,
)


def test_seed_interval_is_students_t():
    values = [0.91, 0.88, 0.95]
    got = seed_mean_ci(values)
    low, high = stats.t.interval(0.95, df=2, loc=np.mean(values), scale=stats.sem(values))
    assert got.n == 3 and got.mean == pytest.approx(np.mean(values))
    assert got.mean - got.half_width == pytest.approx(low) and got.mean + got.half_width == pytest.approx(high)
    # by hand: t_{0.975, 2} = 4.3027
    assert got.half_width == pytest.approx(4.302653 * np.std(values, ddof=1) / math.sqrt(3), rel=1e-5)
    one = seed_mean_ci([0.5, float("nan")])
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.half_width)
    assert seed_mean_ci([]).n == 0
    with pytest.raises(ValueError):
        seed_mean_ci(values, confidence=1.0)


def test_paired_difference_averages_seeds_per_case_then_bootstraps_over_cases():
    rng = np.random.default_rng(1)
    cases = [f"c{i}" for i in range(40)]
    base = rng.uniform(0.6, 0.9, size=40)
    reference = [{c: float(v + rng.normal(0, 0.01)) for c, v in zip(cases, base)} for _ in range(3)]
    row = [{c: float(v - 0.05 + rng.normal(0, 0.01)) for c, v in zip(cases, base)} for _ in range(3)]
    row[0]["only_in_row"] = 0.0  # scored by one row only: not paired
    got = paired_difference(row, reference, n_resamples=20000)
    # independent: per-case seed means, differences, mean; bootstrap interval from scipy
    a = np.array([np.mean([r[c] for r in row]) for c in cases])
    b = np.array([np.mean([r[c] for r in reference]) for c in cases])
    d = a - b
    assert got.n_cases == 40 and got.mean == pytest.approx(d.mean())
    ref = stats.bootstrap((d,), np.mean, confidence_level=0.95, method="percentile", n_resamples=20000,
                          random_state=0).confidence_interval
    assert got.low == pytest.approx(ref.low, abs=0.002) and got.high == pytest.approx(ref.high, abs=0.002)
    assert got.excludes_zero and got.high < 0  # a 5-point drop on every case is not noise


def test_no_difference_is_not_marked():
    rng = np.random.default_rng(2)
    cases = [f"c{i}" for i in range(30)]
    reference = [{c: float(rng.uniform(0.5, 1.0)) for c in cases} for _ in range(3)]
    row = [{c: float(rng.uniform(0.5, 1.0)) for c in cases} for _ in range(3)]  # same distribution
    got = paired_difference(row, reference)
    assert got.low < 0 < got.high and not got.excludes_zero
    # grading: 1/0 per case (correct / wrong); identical predictions differ by exactly zero
    same = [{c: 1.0 for c in cases}]
    assert paired_difference(same, same).mean == 0.0 and not paired_difference(same, same).excludes_zero
    assert paired_difference([{"a": 1.0}], [{"b": 1.0}]).n_cases == 0


def test_formatting():
    assert format_interval(seed_mean_ci([0.9, 0.92, 0.94]), scale=100) == "92.0 ± 5.0"
    assert format_interval(seed_mean_ci([0.9]), scale=100) == "90.0"
    assert format_difference(PairedDifference(-0.021, -0.034, -0.008, 24), scale=100) == "-2.1 [-3.4, -0.8]*"
    assert format_difference(PairedDifference(0.01, -0.01, 0.03, 24), scale=100) == "+1.0 [-1.0, +3.0]"
    assert format_difference(None) == "n/a"
