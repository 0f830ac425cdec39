"""bench/real_compare.py: paired comparison of two bench_real cross-validations on the folds finished in both,
on fake run folders (no training)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import real_compare

from modeling_emrfuse.brats_labels import REGIONS


def _run(out, fold, cases, dice, done=True):
    run = out / "runs" / f"cv-fold{fold}-image"
    (run / "eval").mkdir(parents=True)
    (out / "runs" / f"cv-fold{fold}-split.json").write_text(json.dumps({"train": [], "test": cases}))
    with (run / "eval" / "per_case.csv").open("w", newline="") as fh:
        keys = ["case_id"] + [f"{r}_{m}" for r in REGIONS for m in ("dice", "hd95")]
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for case, value in zip(cases, dice):
            writer.writerow({"case_id": case, **{k: value for k in keys[1:]}})
    if done:
        (run / ".bench_real_done.json").write_text("{}")


def test_paired_difference_on_folds_finished_in_both(tmp_path):
    base, other = tmp_path / "base", tmp_path / "other"
    _run(base, 0, ["a", "b"], [0.5, 0.6])
    _run(base, 1, ["c", "d"], [0.7, 0.8])
    _run(other, 0, ["a", "b"], [0.6, 0.8])
    _run(other, 1, ["c", "d"], [0.9, 0.9], done=False)  # still running: left out
    result = real_compare.compare(base, other)
    assert result["folds"] == [1] and result["n_cases"] == 2
    dice = result["metrics"]["WT_dice"]
    assert dice["base"] == pytest.approx(0.55) and dice["other"] == pytest.approx(0.7)
    assert dice["difference"].mean == pytest.approx(np.mean([0.1, 0.2]))
    only_a = real_compare.compare(base, other, keep=["a"])
    assert only_a["n_cases"] == 1 and only_a["metrics"]["ET_dice"]["difference"].mean == pytest.approx(0.1)
    assert "other - base" in real_compare.to_markdown(result, base, other, "image")


def test_different_folds_are_refused(tmp_path):
    base, other = tmp_path / "base", tmp_path / "other"
    _run(base, 0, ["a", "b"], [0.5, 0.6])
    _run(other, 0, ["a", "c"], [0.5, 0.6])
    with pytest.raises(SystemExit, match="different cases"):
        real_compare.compare(base, other)
