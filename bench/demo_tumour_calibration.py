"""Tumour composition by grade on the real expert label maps: the calibration of the demo tumours.

    python bench/demo_tumour_calibration.py                       # ../shared/realdata
    python bench/demo_tumour_calibration.py --data DIR --json out.json

Per case, from the label map under its own label convention: the enhancing fraction of the whole
tumour (ET / WT), the necrotic and non-enhancing core fraction ((TC - ET) / WT), the oedema fraction
((WT - TC) / WT), the whole-tumour volume in cm^3 (voxel counts times the voxel volume) and the brain
volume in cm^3 (non-zero voxels of the first sequence, the images being skull-stripped). Per grade:
median and range (min-max) of each. ``datasets_scripts/demo_data.py`` ships the resulting table
(``TUMOUR_COMPOSITION``), never the data. Nothing here is a test; the last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from datasets_scripts.brats_ids import IdMapping
from modeling_emrfuse.brats_io import discover_cases, read_label_map, read_volume
from modeling_emrfuse.brats_labels import GRADES, get_label_convention

ROOT = Path(__file__).resolve().parents[1]
SKIP_FOLDERS = {"meta", "pseudolabels"}
DEFAULT_PSEUDO = ("TCGA-DU-7294",)
DEFAULT_SAME_SCAN = ("brats_2013_pat0004_1",)
MEASURES = ("et_fraction", "ncr_net_fraction", "oedema_fraction", "wt_cm3", "brain_cm3")


def composition(label: np.ndarray, spacing: Sequence[float], convention: str) -> Dict[str, float]:
    """ET, NCR/NET and oedema fractions of the whole tumour and its volume (cm^3) for one label map."""
    conv = get_label_convention(convention)
    wt = np.isin(label, conv.regions["WT"])
    tc = np.isin(label, conv.regions["TC"])
    et = np.isin(label, conv.regions["ET"])
    n_wt = int(wt.sum())
    if n_wt == 0:
        raise ValueError("empty label map (no tumour voxel)")
    return {
        "et_fraction": float(et.sum()) / n_wt,
        "ncr_net_fraction": float((tc & ~et).sum()) / n_wt,
        "oedema_fraction": float((wt & ~tc).sum()) / n_wt,
        "wt_cm3": n_wt * float(np.prod(spacing)) / 1000.0,
    }


def _id_tables(data: Path) -> Optional[IdMapping]:
    paths = [p for p in (data / "meta" / "name_mapping.csv", data / "meta" / "BraTS21-17_Mapping.csv") if p.exists()]
    return IdMapping.from_files(paths) if paths else None


def _skip_reason(case, grade: Optional[str], pseudo: Sequence[str], same_scan: Sequence[str]) -> Optional[str]:
    if case.label is None:
        return "no label map"
    if case.case_id in pseudo:
        return "pseudo-label (algorithm fusion), not expert"
    if case.case_id in same_scan:
        return "the same scan as a case already used"
    if grade not in GRADES:
        return "grade unknown (not in the layout or the id tables)"
    return None


def measure_cases(data: Path, pseudo: Sequence[str] = DEFAULT_PSEUDO, same_scan: Sequence[str] = DEFAULT_SAME_SCAN):
    """``(used, skipped)``: per-case measurements of the usable cases and ``(case, folder, reason)`` of the rest.

    Every sub-folder of ``--data`` is discovered with ``release="auto"`` (``meta`` and ``pseudolabels``
    excepted). A case is used when it has a label map, the label is expert (not one of ``--pseudo_case``,
    by default ``TCGA-DU-7294``, an algorithm fusion) and its grade is known: from the release layout
    (``HGG``/``LGG`` folders) or else from the organisers' id tables in ``meta/`` (``name_mapping.csv``,
    through ``BraTS21-17_Mapping.csv`` for BraTS 2021 ids). A scan already used under another name
    (``--same_scan``, by default ``brats_2013_pat0004_1`` = ``Brats18_2013_21_1``) is counted once.
    Every other case is listed as skipped, with the reason.
    """
    ids = _id_tables(data)
    used: List[Dict[str, Any]] = []
    skipped: List[tuple] = []
    for folder in sorted(p for p in data.iterdir() if p.is_dir() and p.name not in SKIP_FOLDERS):
        cases = discover_cases(folder, on_error="skip", allow_missing_sequences=True)
        skipped.extend((s.case_id, folder.name, s.reason) for s in cases.skipped)
        for case in cases:
            grade = case.grade or (ids.grade_of(case.case_id) if ids is not None else None)
            reason = _skip_reason(case, grade, pseudo, same_scan)
            if reason:
                skipped.append((case.case_id, folder.name, reason + (f" [grade {grade}]" if grade else "")))
                continue
            label, _, spacing = read_label_map(case.label)
            row = {
                "case_id": case.case_id,
                "folder": folder.name,
                "grade": grade,
                **composition(label, spacing, case.label_convention),
            }
            image, _, img_spacing = read_volume(next(iter(case.sequences.values())))
            row["brain_cm3"] = int(np.count_nonzero(image)) * float(np.prod(img_spacing)) / 1000.0
            used.append(row)
    return used, skipped


def summarise(used: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per grade: ``n`` and, for each measure, ``[median, min, max]``."""
    table: Dict[str, Dict[str, Any]] = {}
    for grade in GRADES:
        rows = [r for r in used if r["grade"] == grade]
        if not rows:
            continue
        table[grade] = {"n": len(rows)}
        for key in MEASURES:
            values = np.array([r[key] for r in rows], dtype=float)
            table[grade][key] = [float(np.median(values)), float(values.min()), float(values.max())]
    return table


def _fmt(stat: Sequence[float], percent: bool) -> str:
    scale, unit = (100.0, " %") if percent else (1.0, "")
    return f"{stat[0] * scale:.1f}{unit} ({stat[1] * scale:.1f}-{stat[2] * scale:.1f})"


def print_report(used, skipped, table) -> None:
    print("| case | folder | grade | ET / WT | NCR+NET / WT | oedema / WT | WT cm^3 | brain cm^3 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in used:
        print(
            f"| {r['case_id']} | {r['folder']} | {r['grade']} | {100 * r['et_fraction']:.1f} % | "
            f"{100 * r['ncr_net_fraction']:.1f} % | {100 * r['oedema_fraction']:.1f} % | {r['wt_cm3']:.1f} | {r['brain_cm3']:.0f} |"
        )
    print("\nSkipped:")
    for case_id, folder, reason in skipped:
        print(f"- {folder}/{case_id}: {reason}")
    print("\n| grade | n | ET / WT | NCR+NET / WT | oedema / WT | WT cm^3 | brain cm^3 |  (median (min-max))")
    print("|---|---|---|---|---|---|---|")
    for grade, t in table.items():
        print(
            f"| {grade} | {t['n']} | {_fmt(t['et_fraction'], True)} | {_fmt(t['ncr_net_fraction'], True)} | "
            f"{_fmt(t['oedema_fraction'], True)} | {_fmt(t['wt_cm3'], False)} | {_fmt(t['brain_cm3'], False)} |"
        )


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data",
        type=Path,
        default=ROOT.parent / "shared" / "realdata",
        help="folder of real cases (default ../shared/realdata)",
    )
    p.add_argument(
        "--pseudo_case",
        action="append",
        default=None,
        help=f"a case whose label is a pseudo-label (default {list(DEFAULT_PSEUDO)})",
    )
    p.add_argument(
        "--same_scan",
        action="append",
        default=None,
        help=f"a case that repeats a scan used elsewhere (default {list(DEFAULT_SAME_SCAN)})",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the per-case rows and the table here")
    args = p.parse_args(argv)
    if not args.data.is_dir():
        raise SystemExit(f"--data {args.data}: folder not found")
    used, skipped = measure_cases(args.data, args.pseudo_case or DEFAULT_PSEUDO, args.same_scan or DEFAULT_SAME_SCAN)
    table = summarise(used)
    print_report(used, skipped, table)
    result = {"cases": used, "skipped": [list(s) for s in skipped], "table": table}
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps(table))
    return result


if __name__ == "__main__":
    main()
