"""Tests of the one-feature grading control (modeling_emrfuse/evaluation/grading_control.py)."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest

from modeling_emrfuse.evaluation.grading_control import enhancing_fraction, fit_threshold, grading_control


def _label_map(n_et: int, n_ncr: int, n_oedema: int, et_label: int = 4) -> np.ndarray:
    """A 10 x 10 x 10 map with the given voxel counts, in scattered positions (the order does not matter)."""
    flat = np.zeros(1000, dtype=np.uint8)
    values = [et_label] * n_et + [1] * n_ncr + [2] * n_oedema
    positions = np.random.default_rng(n_et * 7 + n_ncr).permutation(1000)[: len(values)]
    flat[positions] = values
    return flat.reshape(10, 10, 10)


def test_enhancing_fraction_counts_voxels():
    assert enhancing_fraction(_label_map(20, 30, 50)) == pytest.approx(0.2)
    assert enhancing_fraction(_label_map(0, 40, 60)) == 0.0
    assert enhancing_fraction(_label_map(6, 4, 10, et_label=3), convention="brats2023") == pytest.approx(0.3)
    assert np.isnan(enhancing_fraction(np.zeros((4, 4, 4), dtype=np.uint8)))


def test_enhancing_fraction_reads_files(tmp_path):
    path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(_label_map(10, 10, 30), np.eye(4)), str(path))
    assert enhancing_fraction(path) == pytest.approx(0.2)


def _brute_force(x, y):
    """Independent search: every threshold in a fine grid, both directions; best balanced accuracy."""
    x, y = np.asarray(x, float), np.asarray(y)
    best = 0.0
    for t, below in itertools.product(np.linspace(min(x) - 0.01, max(x) + 0.01, 2001), (True, False)):
        pred = (x < t) if below else (x > t)
        bacc = 0.5 * (np.mean(~pred[y == 0]) + np.mean(pred[y == 1]))
        best = max(best, bacc)
    return best


def test_fit_separable_known_answer():
    """HGG ET fractions 0.20-0.30, LGG 0.00-0.02: threshold between 0.02 and 0.20, LGG below."""
    x = [0.20, 0.30, 0.25, 0.01, 0.02, 0.0]
    y = ["HGG", "HGG", "HGG", "LGG", "LGG", "LGG"]
    rule = fit_threshold(x, y)
    assert rule.lgg_below and rule.threshold == pytest.approx(0.11)
    assert rule.train_balanced_accuracy == 1.0 == _brute_force(x, [0, 0, 0, 1, 1, 1])
    labels, scores = rule.predict([0.5, 0.1, 0.12, float("nan")])
    assert labels.tolist() == [0, 1, 0, rule.fallback]
    assert np.all((scores > 0.5) == (labels == 1))
    assert scores[0] < scores[2] < scores[1]  # monotone: the lower the ET fraction, the more LGG-like


def test_direction_is_learned():
    rule = fit_threshold([0.1, 0.2, 0.6, 0.7], [0, 0, 1, 1])
    assert not rule.lgg_below and 0.2 < rule.threshold < 0.6
    assert rule.predict([0.9])[0].tolist() == [1]


@pytest.mark.parametrize("seed", range(5))
def test_fit_matches_an_independent_search_on_overlapping_data(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 30)
    x = np.round(np.where(y == 0, rng.normal(0.2, 0.1, 30), rng.normal(0.08, 0.1, 30)), 3)
    rule = fit_threshold(x, y)
    assert rule.train_balanced_accuracy == pytest.approx(_brute_force(x, y))
    pred = (x < rule.threshold) if rule.lgg_below else (x > rule.threshold)
    assert 0.5 * (np.mean(~pred[y == 0]) + np.mean(pred[y == 1])) == pytest.approx(rule.train_balanced_accuracy)


def test_grading_control_on_label_maps():
    train = [_label_map(25, 10, 65), _label_map(30, 5, 65), _label_map(1, 45, 54), _label_map(0, 50, 50)]
    test = [_label_map(20, 10, 70), _label_map(2, 40, 58), _label_map(0, 0, 0)]
    out = grading_control(train, ["HGG", "HGG", "LGG", "LGG"], test, ["HGG", "LGG", "LGG"])
    assert out["feature"] == "enhancing_fraction"
    assert out["train_features"] == pytest.approx([0.25, 0.30, 0.01, 0.0])
    assert out["predictions"][:2] == ["HGG", "LGG"]
    assert out["rule"]["lgg_below"] and 0.01 < out["rule"]["threshold"] < 0.25
    assert out["metrics"]["n"] == 3 and out["metrics"]["roc_auc"] == pytest.approx(1.0)
    assert np.isnan(out["test_features"][2])  # no tumour: the fallback (training majority; a tie gives HGG)
    assert out["predictions"][2] == "HGG" and out["metrics"]["accuracy"] == pytest.approx(2 / 3)


def test_control_from_features_equals_the_label_map_path():
    from modeling_emrfuse.evaluation.grading_control import control_from_features

    train = [_label_map(25, 10, 65), _label_map(1, 45, 54), _label_map(30, 5, 65), _label_map(0, 50, 50)]
    test = [_label_map(20, 10, 70), _label_map(2, 40, 58)]
    grades = ["HGG", "LGG", "HGG", "LGG"]
    a = grading_control(train, grades, test, ["HGG", "LGG"])
    b = control_from_features(
        [enhancing_fraction(m) for m in train], grades, [enhancing_fraction(m) for m in test], ["HGG", "LGG"]
    )
    assert a["rule"] == b["rule"] and a["predictions"] == b["predictions"] and a["scores"] == b["scores"]


def test_errors():
    with pytest.raises(ValueError, match="both grades"):
        fit_threshold([0.1, 0.2], ["HGG", "HGG"])
    with pytest.raises(ValueError, match="unknown grade"):
        fit_threshold([0.1, 0.2], ["HGG", "GBM"])
    with pytest.raises(ValueError, match="features but"):
        fit_threshold([0.1, 0.2, 0.3], ["HGG", "LGG"])
