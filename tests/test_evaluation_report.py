"""The one evaluation report (modeling_emrfuse.evaluation.report) shared by train.py and ``emrfuse score``,
and the ET metrics that do not hide behind empty cases (Dice over ET-present cases, false-positive cases).

Expected values are computed here independently: ET masks straight from the label values, Dice by its
formula, statistics with the ``statistics`` module.
"""

from __future__ import annotations

import csv
import json
import statistics

import numpy as np
import pytest

from modeling_emrfuse.brats_labels import REGIONS
from modeling_emrfuse.evaluation import metrics as M
from modeling_emrfuse.evaluation.ablation_report import format_ablation_table, row_numbers
from modeling_emrfuse.evaluation.report import (
    format_results_markdown,
    region_presence,
    summarize_segmentation,
    write_evaluation_report,
)

SHAPE = (16, 16, 10)


def _case(et_ref: bool, et_pred: bool, shift: int) -> tuple:
    """A brats2017 tumour; ET in the reference and / or the prediction as asked; the prediction shifted."""
    ref = np.zeros(SHAPE, np.uint8)
    ref[3:12, 3:12, 2:8] = 2
    ref[5:10, 5:10, 3:7] = 1
    if et_ref:
        ref[6:9, 6:9, 4:6] = 4
    pred = np.roll(ref, shift, axis=0)
    pred[pred == 4] = 1
    if et_pred:
        pred[6 + shift : 9, 6:9, 4:7] = 4
    return pred, ref


CASES = {  # case id -> (ET in reference, ET predicted, shift)
    "a": (True, True, 0),
    "b": (True, True, 1),
    "c": (True, False, 1),  # ET missed
    "d": (False, False, 0),  # ET absent, correctly not predicted: Dice 1 by the BraTS rule
    "e": (False, True, 0),  # ET absent, predicted: a false-positive case
    "f": (False, True, 2),  # another false-positive case
    "g": (False, False, 1),
}


@pytest.fixture(scope="module")
def cases():
    return {cid: _case(*spec) for cid, spec in CASES.items()}


def _rows(cases):
    return [
        {"case_id": cid, **M.metrics_to_row(M.score_label_maps(p, r, "brats2017"))} for cid, (p, r) in cases.items()
    ]


def _independent_et(cases):
    present, fp, absent = [], 0, 0
    for pred, ref in cases.values():
        r, p = ref == 4, pred == 4
        if r.any():
            present.append(2.0 * np.count_nonzero(r & p) / (r.sum() + p.sum()))
        else:
            absent += 1
            fp += int(p.any())
    return present, fp, absent


def test_et_present_dice_and_false_positive_cases_match_independent_computation(cases):
    present, fp, absent = _independent_et(cases)
    assert (len(present), fp, absent) == (3, 2, 4)  # the fixture covers every kind of case
    seg = summarize_segmentation(_rows(cases))
    et = seg["ET"]
    assert et["present_cases"] == 3 and et["absent_cases"] == 4 and et["false_positive_cases"] == 2
    assert et["dice_present"]["mean"] == pytest.approx(statistics.mean(present))
    assert et["dice_present"]["std"] == pytest.approx(statistics.stdev(present))
    assert et["dice_present"]["median"] == pytest.approx(statistics.median(present))
    assert et["dice_present"]["n"] == 3
    # the mean over all cases counts the two correct empty cases as 1: it is higher than over present cases
    all_dice = present + [1.0, 1.0, 0.0, 0.0]
    assert et["dice"]["mean"] == pytest.approx(statistics.mean(all_dice))
    # WT is present everywhere: its present-case Dice is its mean
    assert seg["WT"]["present_cases"] == len(CASES) and seg["WT"]["false_positive_cases"] == 0
    assert seg["WT"]["dice_present"]["mean"] == pytest.approx(seg["WT"]["dice"]["mean"])


def test_region_presence_with_no_present_case():
    rows = [{"case_id": "x", "ET_dice": 1.0, "ET_ref_voxels": 0, "ET_pred_voxels": 0}]
    out = region_presence(rows, "ET")
    assert out["present_cases"] == 0 and out["dice_present"]["n"] == 0 and out["false_positive_cases"] == 0
    with pytest.raises(ValueError, match="ET_ref_voxels"):
        region_presence([{"case_id": "y", "ET_dice": 1.0}], "ET")


def test_report_tables_show_et_present_and_false_positives(cases, tmp_path):
    rows = _rows(cases)
    summary = {"num_cases": len(rows), "segmentation": summarize_segmentation(rows)}
    md = format_results_markdown(summary)
    present, _, _ = _independent_et(cases)
    assert "Dice, region-present cases (%)" in md and "False-positive cases" in md
    et_line = next(line for line in md.splitlines() if line.startswith("| ET |"))
    assert f"{100 * statistics.mean(present):.1f} ± {100 * statistics.stdev(present):.1f}" in et_line
    assert "n=3" in et_line and "2 of 4 region-absent" in et_line
    paths = write_evaluation_report(tmp_path / "eval", rows, summary, title="Check", header_lines=["cases: 7"])
    assert {p.name for p in paths.values()} >= {"per_case.csv", "summary.json", "summary.md", "dice_boxplot.png"}
    text = (tmp_path / "eval" / "summary.md").read_text()
    assert text.startswith("# Check\n\n- cases: 7\n") and md in text
    with open(tmp_path / "eval" / "per_case.csv", newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["case_id"] for r in back] == list(CASES)  # the order given
    assert float(back[1]["ET_dice"]) == rows[1]["ET_dice"]  # full precision
    assert (
        json.loads((tmp_path / "eval" / "summary.json").read_text())["segmentation"]["ET"]["false_positive_cases"] == 2
    )


def test_score_cli_summary_has_et_present_and_false_positive_cases(cases, tmp_path, capsys):
    import nibabel as nib

    from modeling_emrfuse.commands.cli import main

    for cid, (pred, ref) in cases.items():
        for folder, arr in (("ref", ref), ("pred", pred)):
            (tmp_path / folder).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / folder / f"{cid}_seg.nii.gz"))
    rc = main(
        [
            "score",
            "--no-progress",
            "--pred",
            str(tmp_path / "pred"),
            "--ref",
            str(tmp_path / "ref"),
            "--out",
            str(tmp_path / "out"),
            "--ref-convention",
            "brats2017",
            "--pred-convention",
            "brats2017",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "2 of 4 region-absent" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    present, fp, absent = _independent_et(cases)
    et = summary["segmentation"]["ET"]
    assert (et["false_positive_cases"], et["absent_cases"], et["present_cases"]) == (fp, absent, len(present))
    assert et["dice_present"]["mean"] == pytest.approx(statistics.mean(present))
    # the same layout train.py writes: the markdown of the summary is the shared one
    assert format_results_markdown(summary) in (tmp_path / "out" / "summary.md").read_text()


def test_ablation_table_has_et_present_and_false_positive_columns(cases):
    rows = _rows(cases)
    summary = {"num_cases": len(rows), "segmentation": summarize_segmentation(rows), "grading": {"accuracy": 0.5}}
    nums = row_numbers(summary)
    present, fp, _ = _independent_et(cases)
    assert nums["dice_ET_present"] == pytest.approx(statistics.mean(present))
    assert nums["ET_false_positive_cases"] == fp
    other = dict(nums, dice_ET_present=0.5, ET_false_positive_cases=0.0)
    table = format_ablation_table("table3", [("full", "Complete model", [nums, other])])
    header, _, line = table.splitlines()
    assert "Dice ET, ET-present cases (%)" in header and "ET-absent cases with ET predicted" in header
    cells = [c.strip() for c in line.strip("|").split("|")]
    titles = [c.strip() for c in header.strip("|").split("|")]
    et_cell = cells[titles.index("Dice ET, ET-present cases (%)")]
    vals = [100 * statistics.mean(present), 50.0]
    t = 12.706204736  # Student t, 97.5 % quantile, 1 degree of freedom: cells are mean ± 95 % CI over the 2 seeds
    half = lambda v: t * statistics.stdev(v) / len(v) ** 0.5  # noqa: E731
    assert et_cell == f"{statistics.mean(vals):.1f} ± {half(vals):.1f}"
    assert (
        cells[titles.index("ET-absent cases with ET predicted")]
        == f"{statistics.mean([fp, 0]):.1f} ± {half([fp, 0]):.1f}"
    )
    assert all(r in nums for r in ("dice_WT", "dice_TC", "dice_ET")) and set(REGIONS) <= set(summary["segmentation"])


def test_summary_rejects_rows_without_metrics():
    with pytest.raises(ValueError, match="missing or not finite"):
        summarize_segmentation([{"case_id": "x"}])


def test_grading_table_and_ablation_rows_carry_the_enhancing_fraction_control():
    """The control's figures sit next to the model's: a row of the grading table, a column of the ablation table."""
    from modeling_emrfuse.evaluation.grading_control import control_from_features

    control = control_from_features(
        [0.3, 0.25, 0.01, 0.02], ["HGG", "HGG", "LGG", "LGG"], [0.2, 0.015, 0.3], ["HGG", "LGG", "LGG"]
    )
    assert control["predictions"] == ["HGG", "LGG", "HGG"]  # threshold between 0.02 and 0.25
    grading = M.classification_metrics(
        ["HGG", "LGG", "LGG"], np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]]), labels=["HGG", "LGG"]
    )
    summary = {"num_cases": 3, "grading": grading, "grading_control": control}
    md = format_results_markdown(summary)
    model_row = next(line for line in md.splitlines() if line.startswith("| EmrFuse |"))
    control_row = next(line for line in md.splitlines() if line.startswith("| Control: enhancing fraction"))
    assert model_row.split(" | ")[1] == "100.0" and control_row.split(" | ")[1] == "66.7"  # accuracy 2 of 3
    assert f"threshold {control['rule']['threshold']:.4f}" in control_row
    numbers = row_numbers(summary)
    assert numbers["accuracy"] == 1.0 and numbers["control_accuracy"] == pytest.approx(2 / 3)
    table = format_ablation_table("table3", [("full", "Complete model", [numbers, numbers])])
    header = table.splitlines()[0]
    assert header.index("Grading accuracy (%)") < header.index("Control: enhancing fraction, accuracy (%)")
    assert table.splitlines()[2].endswith("| 100.0 ± 0.0 | 66.7 ± 0.0 |")
