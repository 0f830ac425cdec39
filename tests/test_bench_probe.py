"""bench/bench_probe.py: the agreement of two label maps and the summary table (no model)."""

from __future__ import annotations

import bench_probe
import numpy as np
import pytest


def test_agreement_per_region_against_an_independent_count():
    a = np.zeros((6, 6, 4), np.uint8)
    b = np.zeros_like(a)
    a[1:4, 1:4, 1] = 2  # oedema: WT only
    a[2, 2, 1] = 4  # enhancing: WT, TC, ET
    b[1:4, 1:3, 1] = 2
    agree = bench_probe.agreement(a, b, "brats2017")
    wt_a, wt_b = a > 0, b > 0
    assert agree["WT"] == pytest.approx(2 * (wt_a & wt_b).sum() / (wt_a.sum() + wt_b.sum()))
    assert agree["TC"] == 0.0 and agree["ET"] == 0.0  # in a only
    assert bench_probe.agreement(b, b, "brats2017") == {"WT": 1.0, "TC": 1.0, "ET": 1.0}  # absent from both: 1


def test_summary_and_table():
    row = {
        "case_id": "c1",
        "variant": "4",
        "slices_share": 0.5,
        "exact_model_s": 4.0,
        "model_s": 2.0,
        "exact_total_s": 6.0,
        "total_s": 4.0,
        "agreement": {"WT": 1.0, "TC": 0.985, "ET": 1.0},
        "dice_exact": {"WT": 0.8, "TC": 0.6, "ET": 0.5},
        "dice": {"WT": 0.8, "TC": 0.59, "ET": 0.5},
    }
    other = {**row, "case_id": "c2", "model_s": 1.0, "agreement": {"WT": 1.0, "TC": 1.0, "ET": 1.0}}
    summary = bench_probe.summarise([row, other], ["4"])
    s = summary["4"]
    assert s["cases"] == 2 and s["model_speedup_median"] == pytest.approx(3.0)
    assert s["model_speedup_range"] == [2.0, 4.0] and s["total_speedup_median"] == pytest.approx(1.5)
    assert s["agreement_min"]["TC"] == pytest.approx(0.985) and s["below_guard"] == ["c1"]
    text = bench_probe.markdown(summary, 2, "python bench/bench_probe.py --output_dir X", "1.0")
    assert "| 4 | 2 | 50 % | 3.00x [2.00, 4.00] | 1.50x |" in text and "c1" in text
    assert bench_probe.variant_name(4, None) == "4" and bench_probe.variant_name(4, 16) == "4, box +16 px"
