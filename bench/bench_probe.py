"""The tumour-slab path (``probe_stride``) against the exact path, on real cases with real cross-validation models.

    python bench/bench_probe.py --output_dir outputs/real                # the finished folds of a bench_real.py --cv run
    python bench/bench_probe.py --output_dir outputs/real --strides 2 4 --margin 2 --threads 2
    python bench/bench_probe.py --output_dir outputs/real --strides 4 --box_margins 16 32   # + in-plane boxes

Each finished fold model of ``OUTPUT_DIR/runs/cv-fold<k>-<recipe>`` (default recipe ``image``) predicts its
held-out cases through the pipeline as ``emrfuse predict`` does (default precision and rewrites), once on every
slice (the exact path) and once per variant: each stride with ``probe_stride`` on whole slices, and with
``--box_margins`` each stride with the slab slices cropped to the probe's tumour box plus that margin. Printed, and written to
``OUTPUT_DIR/probe.md`` / ``probe.json``: per variant, the share of slices the model ran on, the segmentation
model's time and the end-to-end time against the exact path's (median ratio over cases, measured case by case
in the same process, exact first), the agreement of the label maps with the exact path's (Dice per region; a
region absent from both counts 1) and the Dice of both against the expert label. The accuracy guard of the
option is an agreement of at least 0.99 on every case and region. Figures only; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

GUARD = 0.99


def agreement(a: np.ndarray, b: np.ndarray, convention: str) -> Dict[str, float]:
    """Dice of two label maps per region (1.0 where the region is absent from both)."""
    from modeling_emrfuse.brats_labels import REGIONS, label_map_to_regions

    ra, rb = label_map_to_regions(a, convention), label_map_to_regions(b, convention)
    out = {}
    for i, region in enumerate(REGIONS):
        x, y = ra[i].astype(bool), rb[i].astype(bool)
        total = int(x.sum()) + int(y.sum())
        out[region] = 1.0 if total == 0 else 2.0 * int(np.logical_and(x, y).sum()) / total
    return out


def dice_to_reference(label_map: np.ndarray, convention: str, reference: np.ndarray) -> Dict[str, float]:
    """Dice per region against the expert label map (the project's metric)."""
    from modeling_emrfuse.brats_labels import REGIONS
    from modeling_emrfuse.evaluation.metrics import score_label_maps

    scores = score_label_maps(label_map, reference, pred_convention=convention)
    return {r: float(scores[r]["dice"]) for r in REGIONS}


def variant_name(stride: int, box_margin: Optional[int]) -> str:
    return str(stride) if box_margin is None else f"{stride}, box +{box_margin} px"


def summarise(rows: Sequence[Dict[str, Any]], variants: Sequence[str]) -> Dict[str, Any]:
    """Per variant: slices share, time ratios (median, range), agreement (mean, min) and Dice to the reference."""
    from modeling_emrfuse.brats_labels import REGIONS

    out: Dict[str, Any] = {}
    for k in variants:
        rk = [r for r in rows if r["variant"] == k]
        if not rk:
            continue
        speed_model = [r["exact_model_s"] / r["model_s"] for r in rk]
        speed_total = [r["exact_total_s"] / r["total_s"] for r in rk]
        out[str(k)] = {
            "cases": len(rk),
            "slices_share": float(np.mean([r["slices_share"] for r in rk])),
            "model_speedup_median": statistics.median(speed_model),
            "model_speedup_range": [min(speed_model), max(speed_model)],
            "total_speedup_median": statistics.median(speed_total),
            "agreement_mean": {g: float(np.mean([r["agreement"][g] for r in rk])) for g in REGIONS},
            "agreement_min": {g: float(min(r["agreement"][g] for r in rk)) for g in REGIONS},
            "below_guard": sorted({r["case_id"] for r in rk if min(r["agreement"].values()) < GUARD}),
            "dice_exact": {g: float(np.mean([r["dice_exact"][g] for r in rk])) for g in REGIONS},
            "dice_slab": {g: float(np.mean([r["dice"][g] for r in rk])) for g in REGIONS},
        }
    return out


def markdown(summary: Dict[str, Any], margin: int, command: str, load: str) -> str:
    from modeling_emrfuse.brats_labels import REGIONS

    lines = [
        "## The tumour-slab path against the exact path\n",
        f"Command: `{command}` (margin {margin} slices; load average {load}).\n",
        "| probe stride | cases | slices run | model time, speed-up (median [range]) | end to end, speed-up (median) | "
        "agreement with the exact label map, mean (min) WT / TC / ET | cases below 0.99 | Dice to the expert label, "
        "exact → slab, WT / TC / ET |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, s in summary.items():
        agree = " / ".join(f"{s['agreement_mean'][g]:.4f} ({s['agreement_min'][g]:.4f})" for g in REGIONS)
        dice = " / ".join(f"{s['dice_exact'][g]:.3f} → {s['dice_slab'][g]:.3f}" for g in REGIONS)
        lo, hi = s["model_speedup_range"]
        lines.append(
            f"| {k} | {s['cases']} | {100 * s['slices_share']:.0f} % | {s['model_speedup_median']:.2f}x "
            f"[{lo:.2f}, {hi:.2f}] | {s['total_speedup_median']:.2f}x | {agree} | "
            f"{', '.join(s['below_guard']) or 'none'} | {dice} |"
        )
    return "\n".join(lines) + "\n"


def _counting(pipe) -> Dict[str, int]:
    """Count the slices the segmentation model runs on (a forward pre-hook)."""
    count = {"slices": 0}

    def hook(_module, args, kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        count["slices"] += int(pixels.shape[0])

    pipe.segmentation_model.register_forward_pre_hook(hook, with_kwargs=True)
    return count


def run(args) -> Dict[str, Any]:
    import bench_real
    import torch
    from real_rescore import _fold_runs, _uses_text

    from modeling_emrfuse.brats_io import read_volume
    from modeling_emrfuse.pipeline_emrfuse import load_pipeline
    from modeling_emrfuse.training.evaluation import predict_case

    torch.set_num_threads(args.threads)
    cohort = bench_real.gather_cohort(bench_real.parse_args(["--output_dir", str(args.output_dir)]), args.output_dir)
    by_id = {c.case_id: c for c in cohort.cases}
    runs = _fold_runs(args.output_dir, [args.recipe], None)
    if not runs:
        raise SystemExit(
            f"bench_probe: no finished fold run of recipe {args.recipe!r} under {args.output_dir / 'runs'}"
        )
    rows: List[Dict[str, Any]] = []
    variants = [(k, None) for k in args.strides] + [(k, b) for k in args.strides for b in args.box_margins]
    for recipe, fold, test in runs:
        run_dir = args.output_dir / "runs" / f"cv-fold{fold}-{recipe}"
        pipe = load_pipeline(str(run_dir), device="cpu", grading_model=False)
        count = _counting(pipe)
        for case_id in test[: args.max_cases_per_fold or None]:
            case = by_id[case_id]
            report = cohort.attached.reports.get(case_id) if _uses_text(run_dir) else None
            reference = np.asarray(read_volume(case.label).array)
            count["slices"] = 0
            t0 = time.perf_counter()
            exact = predict_case(pipe, case, report)
            exact_total, exact_slices = time.perf_counter() - t0, count["slices"]
            convention = exact["label_convention"]
            dice_exact = dice_to_reference(exact["label_map"], convention, reference)
            for k, box in variants:
                count["slices"] = 0
                t0 = time.perf_counter()
                options = {"probe_stride": k, "probe_margin": args.margin, "probe_box_margin": box}
                slab = predict_case(pipe, case, report, **{o: v for o, v in options.items() if v is not None})
                total = time.perf_counter() - t0
                rows.append(
                    {
                        "case_id": case_id,
                        "fold": fold + 1,
                        "variant": variant_name(k, box),
                        "slices_share": count["slices"] / max(exact_slices, 1),
                        "exact_model_s": exact["timings"]["model_segmentation"],
                        "model_s": slab["timings"]["model_segmentation"],
                        "exact_total_s": exact_total,
                        "total_s": total,
                        "agreement": agreement(exact["label_map"], slab["label_map"], convention),
                        "dice_exact": dice_exact,
                        "dice": dice_to_reference(slab["label_map"], convention, reference),
                    }
                )
                r = rows[-1]
                print(
                    f"fold {fold + 1} {case_id} stride {variant_name(k, box)}: {100 * r['slices_share']:.0f} % of slices, model "
                    f"{r['exact_model_s']:.1f} -> {r['model_s']:.1f} s, agreement "
                    + " / ".join(f"{v:.4f}" for v in r["agreement"].values()),
                    flush=True,
                )
    return {"rows": rows, "summary": summarise(rows, [variant_name(k, b) for k, b in variants])}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", type=Path, required=True, help="a bench_real.py --cv OUTPUT_DIR with finished folds")
    p.add_argument("--recipe", default="image")
    p.add_argument("--strides", type=int, nargs="+", default=[2, 4])
    p.add_argument("--margin", type=int, default=2)
    p.add_argument("--box_margins", type=int, nargs="*", default=[], help="in-plane box margins (pixels) to measure")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--max_cases_per_fold", type=int, default=0, help="0: every held-out case")
    args = p.parse_args(argv)
    if any(k < 2 for k in args.strides) or args.margin < 0 or any(b < 0 for b in args.box_margins):
        p.error("--strides must be >= 2 (1 is the exact path), --margin and --box_margins >= 0")
    return args


def main(argv=None) -> Dict[str, Any]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parse_args(argv)
    result = run(args)
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    command = "python bench/bench_probe.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    text = markdown(result["summary"], args.margin, command, load)
    (args.output_dir / "probe.md").write_text(text)
    (args.output_dir / "probe.json").write_text(json.dumps({**result, "command": command, "load": load}, indent=1))
    print(text)
    return result


if __name__ == "__main__":
    main()
