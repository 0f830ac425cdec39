"""BraTS tumour sub-region metrics (Dice, PPV, sensitivity, HD95 for WT / TC / ET) as an ``evaluate`` metric.

The numbers come from :mod:`modeling_emrfuse.evaluation.metrics` (the project's single implementation); this
file only adapts its inputs and outputs to the ``evaluate.Metric`` API.
"""

from typing import Any, Dict, List, Sequence

import datasets
import evaluate
import numpy as np

from modeling_emrfuse.brats_labels import REGIONS
from modeling_emrfuse.evaluation.lesion_metrics import LESION_COUNTS, LESION_METRICS
from modeling_emrfuse.evaluation.metrics import METRICS, aggregate, region_metrics, score_label_maps
from modeling_emrfuse.evaluation.report import lesion_stats

_DESCRIPTION = """\
Per-case BraTS segmentation metrics on 3D volumes, for the whole tumour (WT), tumour core (TC)
and enhancing tumour (ET): Dice, positive predictive value, sensitivity and the 95th percentile
Hausdorff distance (MedPy's hd95: 6-connected surfaces, distances in mm at the voxel spacing).
Empty masks follow the BraTS rules (both empty: Dice/PPV/sensitivity 1, HD95 0; exactly one
empty: Dice 0, HD95 373.13 mm). Results are averaged over cases (mean; the nested "aggregate"
entry also holds std and median).

With lesion_wise=True it also gives the BraTS 2023+ lesion-wise metrics per region (tp, fp, fn,
sq_dsc, pq_dsc, sq_hd95: panoptica configured as the official BraTS evaluation; needs the optional
panoptica package), averaged over the cases where they are defined.

Configurations: "label_maps" (default): predictions and references are integer label maps
(X, Y, Z) in a BraTS label convention; "regions": they are boolean region masks (3, X, Y, Z) in
WT, TC, ET order.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted volumes, label maps (X, Y, Z) (configuration "label_maps")
        or region masks (3, X, Y, Z) (configuration "regions"); numpy arrays or nested lists.
    references: list of reference volumes of the same kind and shapes.
    pred_convention: label convention of the predictions ("brats2015", "brats2017",
        "brats2023" or a BraTS release year), one for all cases or one per case;
        "label_maps" only; default "brats2017".
    ref_convention: label convention of the references; None = same as pred_convention.
    spacing: voxel size in mm (x, y, z) from the image header, one triple for all cases or one
        per case; default (1, 1, 1).
    return_per_case: also return the per-case results (default True).
    lesion_wise: also compute the lesion-wise metrics (default False; needs panoptica, about a
        second per full-size case).
Returns:
    "<region>_<metric>": mean over cases for each region (WT, TC, ET) and metric
        (dice, ppv, sensitivity, hd95);
    "n_cases": number of cases;
    "aggregate": {region: {metric: {"mean", "std", "median", "n"}}};
    with lesion_wise: "<region>_<tp|fp|fn|sq_dsc|pq_dsc|sq_hd95>": mean over the cases where the
        value is finite (NaN: no lesion on either side; sq_hd95 infinite: no matched lesion), and
        "lesion_wise": {region: {metric: {"mean", "std", "median", "n", "undefined", "infinite"}}};
    "per_case": list of {region: {metric: value}} in input order (if return_per_case).
Examples:
    >>> brats = evaluate.load("path/to/modeling_emrfuse/evaluation/brats_metric")
    >>> ref = np.zeros((8, 8, 8), dtype=np.uint8); ref[2:5, 2:5, 2:5] = 4
    >>> out = brats.compute(predictions=[ref], references=[ref], pred_convention="brats2017")
    >>> out["ET_dice"], out["WT_hd95"]
    (1.0, 0.0)
"""

_CITATION = """\
@article{menze2015brats,
  title={The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS)},
  author={Menze, Bjoern H. and others},
  journal={IEEE Transactions on Medical Imaging},
  volume={34}, number={10}, pages={1993--2024}, year={2015}
}
"""

_CONFIGS = ("default", "label_maps", "regions")


def _per_case(value: Any, n: int, name: str) -> List[Any]:
    """Broadcast one value to ``n`` cases, or check a per-case list has ``n`` entries."""
    if value is None or isinstance(value, str):
        return [value] * n
    if name == "spacing":
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim <= 1:
            return [arr] * n
        if arr.ndim == 2 and arr.shape[0] == n:
            return list(arr)
        raise ValueError(f"spacing: give one (x, y, z) triple or one per case ({n} cases), got shape {arr.shape}.")
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} cases.")
    return values


class BratsMetric(evaluate.Metric):
    """Dice, PPV, sensitivity and HD95 per BraTS region (WT, TC, ET), averaged over cases."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in _CONFIGS:
            raise ValueError(f"Unknown configuration {self.config_name!r}: use 'label_maps' (default) or 'regions'.")
        if self.config_name == "regions":
            volume = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("bool")))))
        else:
            volume = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("int16"))))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": volume, "references": volume}),
            reference_urls=[
                "https://www.synapse.org/brats",
                "https://loli.github.io/medpy/generated/medpy.metric.binary.hd95.html",
            ],
        )

    def _compute(
        self,
        predictions: Sequence[Any],
        references: Sequence[Any],
        pred_convention: Any = "brats2017",
        ref_convention: Any = None,
        spacing: Any = (1.0, 1.0, 1.0),
        return_per_case: bool = True,
        lesion_wise: bool = False,
    ) -> Dict[str, Any]:
        n = len(predictions)
        if n != len(references):
            raise ValueError(f"{n} predictions for {len(references)} references.")
        spacings = _per_case(spacing, n, "spacing")
        results = []
        if self.config_name == "regions":
            for i, (pred, ref) in enumerate(zip(predictions, references)):
                try:
                    results.append(
                        region_metrics(
                            np.asarray(pred, dtype=bool),
                            np.asarray(ref, dtype=bool),
                            spacings[i],
                            lesion_wise=lesion_wise,
                        )
                    )
                except ValueError as exc:
                    raise ValueError(f"case {i}: {exc}") from None
        else:
            pconvs = _per_case(pred_convention, n, "pred_convention")
            rconvs = _per_case(ref_convention, n, "ref_convention")
            for i, (pred, ref) in enumerate(zip(predictions, references)):
                try:
                    results.append(
                        score_label_maps(
                            np.asarray(pred),
                            np.asarray(ref),
                            pconvs[i],
                            rconvs[i],
                            spacings[i],
                            lesion_wise=lesion_wise,
                        )
                    )
                except ValueError as exc:
                    raise ValueError(f"case {i}: {exc}") from None
        summary = aggregate(results)
        out: Dict[str, Any] = {
            f"{region}_{metric}": summary[region][metric]["mean"] for region in REGIONS for metric in METRICS
        }
        if lesion_wise:
            lesions = {
                region: {
                    m: lesion_stats([r[region][m] for r in results], count=m in LESION_COUNTS) for m in LESION_METRICS
                }
                for region in REGIONS
            }
            out.update({f"{region}_{m}": lesions[region][m]["mean"] for region in REGIONS for m in LESION_METRICS})
            out["lesion_wise"] = lesions
        out["n_cases"] = n
        out["aggregate"] = summary
        if return_per_case:
            out["per_case"] = results
        return out
