"""bench/bench_predict.py: the cold-start figures (no model, no subprocess)."""

from __future__ import annotations

import bench_predict
import pytest


def test_cold_start_overhead_in_units_of_import_torch():
    figures = bench_predict.cold_start_figures(cold_s=12.0, warm_s=3.0, import_torch_s=2.0, peak_rss_kib=3 * 2**19)
    assert figures["cold_overhead_s"] == pytest.approx(9.0)
    assert figures["cold_overhead_over_import_torch"] == pytest.approx(4.5)
    assert figures["peak_rss_gib"] == pytest.approx(1.5)


def test_fresh_process_seconds_runs_python():
    assert 0 < bench_predict._fresh_process_seconds("pass") < 60
