"""bench/real_curve.py, the real-data learning curve: nested patient-level subsamples, the runs, the table and the
plot, on fake case lists, fake rows and a fake trainer: no training, no real data."""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from modeling_emrfuse.evaluation.metrics import bootstrap_mean_ci

ROOT = Path(__file__).resolve().parents[1]
real_curve = importlib.import_module("real_curve")


def fake_fold(n_hgg=12, n_lgg=6, n_unknown=6, pairs=3):
    """Training case ids, case -> patient, case -> grade, case -> expert: ``pairs`` HGG patients with two cases each
    (the same patient under two releases), every 5th case pseudo-labelled."""
    ids, patient, grade, expert = [], {}, {}, {}
    for g, n in (("HGG", n_hgg), ("LGG", n_lgg), (None, n_unknown)):
        for k in range(n):
            cid = f"{g or 'UNK'}_{k:02d}"
            ids.append(cid)
            patient[cid] = cid
            grade[cid] = g
            expert[cid] = len(ids) % 5 != 0
    for k in range(pairs):  # a second scan of HGG patients 0..pairs-1
        cid = f"HGG_{k:02d}_b"
        ids.append(cid)
        patient[cid] = f"HGG_{k:02d}"
        grade[cid] = "HGG"
        expert[cid] = True
    return ids, patient, grade, expert


def test_parse_sizes_orders_sizes_and_always_ends_with_all():
    assert real_curve.parse_sizes(["18", "6", "12", "6"]) == [6, 12, 18, "all"]
    assert real_curve.parse_sizes(["all", "3"]) == [3, "all"]
    for bad in (["0"], ["six"]):
        with pytest.raises(ValueError):
            real_curve.parse_sizes(bad)


def test_nested_subsamples_are_nested_whole_patients_of_the_asked_size_and_seeded():
    ids, patient, grade, expert = fake_fold()
    sizes = [6, 12, 18, "all"]
    picked = real_curve.nested_subsamples(ids, patient, grade, expert, sizes, seed=0)
    assert picked["all"] == sorted(ids) and len(ids) == 27
    for small, large in zip(sizes, sizes[1:]):
        assert set(picked[small]) <= set(picked[large]), (small, large)
    for size in (6, 12, 18):
        chosen = picked[size]
        assert len(chosen) == len(set(chosen)) and size - 1 <= len(chosen) <= size  # a 2-case patient may not fit
        patients = {patient[c] for c in chosen}
        assert chosen == sorted(c for c in ids if patient[c] in patients), "a patient's cases stay together"
    # the grades keep their share of the split (12+3 HGG : 6 LGG : 6 unknown cases)
    for size in (6, 12, 18):
        n_lgg = sum(grade[c] == "LGG" for c in picked[size])
        assert abs(n_lgg - len(picked[size]) * 6 / 27) <= 1, (size, n_lgg)
    # expert-labelled cases come first within their grade: the 6 smallest subsample holds no pseudo label
    assert all(expert[c] for c in picked[6])
    # deterministic under the seed; another seed draws other patients
    assert picked == real_curve.nested_subsamples(ids, patient, grade, expert, sizes, seed=0)
    other = real_curve.nested_subsamples(ids, patient, grade, expert, sizes, seed=1)
    assert other[12] != picked[12] and other["all"] == picked["all"]
    # a size at or beyond the split is the whole split
    assert real_curve.nested_subsamples(ids, patient, grade, expert, [27, 40], seed=0) == {
        27: sorted(ids),
        40: sorted(ids),
    }


def test_one_subsample_is_at_least_one_patient():
    ids = ["a1", "a2", "b1"]
    picked = real_curve.nested_subsamples(ids, {"a1": "a", "a2": "a", "b1": "b"}, {}, {}, [1], seed=3)
    assert picked[1] in (["b1"], ["a1", "a2"])


def fake_rows():
    """Held-out rows of two recipes and three sizes over two folds, plus a pseudo-labelled case."""
    rng = np.random.default_rng(0)
    rows = []
    for recipe in ("image", "image+demo"):
        for size, n_train in (("6", {1: 6, 2: 5}), ("12", {1: 12, 2: 12}), ("all", {1: 17, 2: 16})):
            for fold in (1, 2):
                for k in range(4):
                    case = f"case{fold}{k}"
                    row = {"case_id": case, "recipe": recipe, "size": size, "n_train": n_train[fold], "fold": fold}
                    row.update({f"{r}_dice": str(round(float(rng.uniform(0.2, 0.9)), 4)) for r in ("WT", "TC", "ET")})
                    row["label"] = "pseudo" if k == 3 and fold == 2 else "expert"
                    rows.append(row)
    return rows


def test_curve_table_and_plot_from_fake_rows(tmp_path):
    rows = fake_rows()
    result, lines = {}, []
    points = real_curve.write_curve(rows, tmp_path, 300, result, lines)
    png = tmp_path / "learning_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert [(p["recipe"], p["size"]) for p in points] == [
        (r, s) for r in ("image", "image+demo") for s in ("6", "12", "all")
    ]
    for p in points:
        mine = [r for r in rows if r["recipe"] == p["recipe"] and r["size"] == p["size"] and r["label"] == "expert"]
        assert p["n_cases"] == len(mine) == 7  # the pseudo-labelled case is left out
        for region in ("WT", "TC", "ET"):
            values = [float(r[f"{region}_dice"]) for r in mine]
            assert p[region]["mean"] == pytest.approx(np.mean(values), abs=5e-5)
            low, high = p[region]["ci95"]
            assert low <= p[region]["mean"] <= high
            assert [low, high] == pytest.approx(list(bootstrap_mean_ci(values)[1:]), abs=5e-5)
    first = points[0]
    assert first["n_train_per_fold"] == {1: 6, 2: 5} and first["n_train_mean"] == 5.5
    table = "\n".join(lines)
    assert f"| image | 6 | 6, 5 | 7 | {first['WT']['mean']:.3f} [" in table and "learning_curve.png" in table
    assert json.loads(json.dumps(result))["learning_curve"]["points"][0]["size"] == "6"
    per_case = list(csv.DictReader((tmp_path / "learning_curve_per_case.csv").open()))
    assert len(per_case) == len(rows)


def test_run_learning_curve_trains_subsamples_on_the_same_held_out_cases(tmp_path):
    """Each fold: one run per size below the fold's split, all on the fold's test cases; 'all' is the CV's result."""
    ids, patient, grade, expert = fake_fold(n_hgg=6, n_lgg=2, n_unknown=2, pairs=0)
    test = {0: ids[:5], 1: ids[5:]}
    runs = tmp_path / "runs"
    runs.mkdir()
    for fold in (0, 1):
        (runs / f"cv-fold{fold}-split.json").write_text(
            json.dumps({"train": [c for c in ids if c not in test[fold]], "test": test[fold]})
        )
    cases = [SimpleNamespace(case_id=c, label=None, patient_id=c, grade=grade[c]) for c in ids]
    cohort = SimpleNamespace(
        cases=cases,
        attached=SimpleNamespace(cases=cases, patients={}),
        info={c: {"label": "expert" if expert[c] else "pseudo"} for c in ids},
        has_report={},
    )
    per_case = {c: {"image": {"case_id": c, "fold": 1 + (c in test[1]), "WT_dice": "0.9"}} for c in ids}
    calls = []

    def train_fold(recipe, split_file, run_dir, what):
        split = json.loads(split_file.read_text())
        calls.append((run_dir.name, split))
        return [{"case_id": c, "WT_dice": "0.5"} for c in split["test"]]

    args = SimpleNamespace(learning_curve=[2, 4, "all"], cv=2, seed=0)
    rows = real_curve.run_learning_curve(args, tmp_path, cohort, per_case, train_fold, ["image"])
    assert [name for name, _ in calls] == [
        "curve-fold0-image-n2",
        "curve-fold0-image-n4",
        "curve-fold1-image-n2",
        "curve-fold1-image-n4",
    ]
    for k, (name, split) in enumerate(calls):
        fold = int(name[10])
        assert split["test"] == test[fold]
        assert not set(split["train"]) & set(test[fold])
        if k % 2:  # nested: the 2 inside the 4
            assert set(calls[k - 1][1]["train"]) < set(split["train"])
    full = [r for r in rows if r["size"] == "all"]
    assert len(full) == len(ids) and {r["WT_dice"] for r in full} == {"0.9"}  # from the cross-validation
    assert {r["n_train"] for r in full} == {5}
    assert len([r for r in rows if r["size"] == "2"]) == len(ids)
    saved = json.loads((tmp_path / "learning_curve_subsamples.json").read_text())
    assert saved["1"]["2"] == calls[0][1]["train"]


def test_bench_real_options_for_the_curve_and_grading(tmp_path):
    bench_real = importlib.import_module("bench_real")
    args = bench_real.parse_args(["--output_dir", str(tmp_path), "--cv", "5", "--learning_curve", "12", "6"])
    assert args.learning_curve == [6, 12, "all"] and args.curve_recipes == ["image"]
    for bad in (
        ["--learning_curve", "6"],  # no --cv
        ["--cv", "5", "--learning_curve", "x"],
        ["--cv", "5", "--learning_curve", "6", "--recipes", "image+demo"],  # curve recipe not compared
    ):
        with pytest.raises(SystemExit):
            bench_real.parse_args(["--output_dir", str(tmp_path), *bad])
