"""Ablation statistics (modeling_emrfuse/evaluation/ablation_stats.py) against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from modeling_emrfuse.evaluation.ablation_stats import (
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
    ref = stats.bootstrap(
        (d,), np.mean, confidence_level=0.95, method="percentile", n_resamples=20000, random_state=0
    ).confidence_interval
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


# ------------------------------------------------------------------------------------------ in the ablation tables
def _case_values(rng, shift=0.0, wrong=()):
    cases = [f"c{i}" for i in range(30)]
    base = np.linspace(0.6, 0.9, 30)
    values = {
        f"dice_{r}": {c: float(b + shift + rng.normal(0, 0.005)) for c, b in zip(cases, base)}
        for r in ("WT", "TC", "ET")
    }
    values["grading"] = {c: 0.0 if c in wrong else 1.0 for c in cases}
    return values


def test_tables_give_intervals_paired_differences_and_a_sentence(tmp_path):
    import json

    from modeling_emrfuse.evaluation.ablation_report import format_ablation_table, write_ablation_report

    rng = np.random.default_rng(0)

    def numbers(d):
        return {"dice": d, "ppv": d, "sensitivity": d, "dice_WT": d, "dice_TC": d, "dice_ET": d, "accuracy": 0.9}

    rows = [
        (
            "full",
            "Complete model",
            [numbers(0.80), numbers(0.82), numbers(0.84)],
            [_case_values(rng) for _ in range(3)],
        ),
        ("no_residual", "Without residual connection", [numbers(0.80)] * 3, [_case_values(rng, 0.0) for _ in range(3)]),
        (
            "no_alignment",
            "Without modality alignment",
            [numbers(0.70)] * 3,
            [_case_values(rng, -0.10, wrong={"c1", "c2"}) for _ in range(3)],
        ),
    ]
    table = format_ablation_table("table3", rows)
    lines = table.splitlines()
    header = lines[0]
    assert "Δ Dice WT vs complete (pts)" in header and "Δ Grading vs complete (pts)" in header
    assert "| Complete model | 82.0 ± 5.0 |" in lines[2]  # mean ± t-interval half-width over the 3 seeds
    assert "(reference)" in lines[2]
    no_res, no_align = lines[3], lines[4]
    assert "*" not in no_res  # same per-case values up to noise: no marked difference
    assert "-10.0 [" in no_align and "]*" in no_align  # 10 points lower on every case
    assert "-6.7 [" in no_align  # grading: 2 of 30 cases wrong
    assert "Without modality alignment (Dice WT -10.0 pts)" in lines[-1]
    paths = write_ablation_report(tmp_path, "table3", rows)
    data = json.loads(paths["json"].read_text())
    row = data["rows"][2]
    assert row["grading_accuracy_per_seed"] == [0.9, 0.9, 0.9]
    assert row["ci95"]["dice"]["n_seeds"] == 3 and row["paired_difference_to_complete"]["dice_WT"]["excludes_zero"]
    # nothing measurable: the sentence says so
    same = [rows[0], rows[1]]
    assert format_ablation_table("table3", same).splitlines()[-1].startswith("No row differs measurably")


def test_case_values_read_the_runs_evaluation_reports(tmp_path):
    from modeling_emrfuse.evaluation.ablation_report import case_values

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "per_case.csv").write_text("case_id,WT_dice,TC_dice,ET_dice\na,0.9,0.8,\nb,0.5,0.4,0.3\n")
    (tmp_path / "grading" / "eval").mkdir(parents=True)
    (tmp_path / "grading" / "eval" / "per_case.csv").write_text("case_id,grade,pred_grade\na,HGG,HGG\nb,LGG,HGG\n")
    got = case_values(tmp_path)
    assert got["dice_WT"] == {"a": 0.9, "b": 0.5} and got["dice_ET"] == {"b": 0.3}
    assert got["grading"] == {"a": 1.0, "b": 0.0}
    assert case_values(tmp_path / "missing")["dice_WT"] == {}
