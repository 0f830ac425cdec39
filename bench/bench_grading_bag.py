"""Where is the grade in a demo run's image features? A linear read-out of three grading bags.

    nice -n 10 python bench/bench_grading_bag.py --run outputs/emrfuse-demo \\
        --demo_data_dir data/emrfuse-demo-small-96 --cache_dir cache/emrfuse

A probe for the grading model's design (issue 21), not a figure of EmrFuse's grading: it takes a finished
``train.py --demo`` run's segmentation model (the towers the grading head is fitted on), computes image features
of every training and held-out case of the same split, and fits a logistic regression (scikit-learn, balanced
classes, standardised features) on the training cases for each of three bags:

    ``even``            the image tower's pooled last feature map (GAP) over the 32 evenly spaced slices the grading
                        model pools today (``grading_slice_indices``), mean- and max-pooled over the slices;
    ``tumour``          the same GAP features over the slices where the segmentation finds tumour (WT logit > 0),
                        at most 32 evenly spaced among them (the even bag when none has tumour);
    ``tumour_masked``   the tumour slices' stride-8 and stride-16 feature maps averaged over the predicted tumour
                        only (the WT mask max-pooled to each map's grid), mean- and max-pooled over the slices.

It prints held-out accuracy for three regularisation strengths. The reports are not read (image features only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BAGS = ("even", "tumour", "tumour_masked")
C_VALUES = (0.01, 0.1, 1.0)


class _MainProcess:
    is_main_process = True
    process_index, num_processes = 0, 1

    def wait_for_everyone(self):
        pass


def case_features(pipe, case, max_slices: int = 32):
    """``{bag: (slices, features)}`` of one case (see the module docstring)."""
    import torch

    from modeling_emrfuse.processing_emrfuse import grading_slice_indices

    seg = pipe.segmentation_model
    inputs = pipe.preprocess(case, use_case_report=False)["model_inputs"]
    x = inputs["pixel_values"].float()
    logits = seg(**dict(inputs, pixel_values=x), return_dict=True).logits
    tumour = (logits[:, :1] > 0).float()  # WT, the first region
    gap, _ = seg.emrfuse.tower_features(x)
    maps = seg.emrfuse.vision_model(x)
    masked = []
    for fm in maps[-3:-1]:  # strides 8 and 16
        m = torch.nn.functional.adaptive_max_pool2d(tumour, fm.shape[-2:])
        masked.append((fm * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp(min=1))
    masked = torch.cat(masked, dim=1)
    even = grading_slice_indices(len(x), max_slices)
    with_tumour = np.flatnonzero(tumour.sum(dim=(1, 2, 3)).numpy() > 0)
    bag = with_tumour[grading_slice_indices(len(with_tumour), max_slices)] if len(with_tumour) else even
    return {"even": gap[even].numpy(), "tumour": gap[bag].numpy(), "tumour_masked": masked[bag].numpy()}


def pooled(rows, bag: str) -> np.ndarray:
    return np.stack([np.concatenate([r[bag].mean(0), r[bag].max(0)]) for r in rows])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished train.py --demo output folder")
    parser.add_argument("--demo_data_dir", required=True, help="its --demo_data_dir")
    parser.add_argument("--cache_dir", required=True, help="its --cache_dir (the demo text tower, for the split)")
    args = parser.parse_args(argv)

    import importlib.util

    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from modeling_emrfuse.pipeline_emrfuse import load_pipeline
    from modeling_emrfuse.training.data import prepare_run_data

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("emrfuse_train_script", ROOT / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)  # train.py's options and data settings (its main() is not run)
    run_args = train.parse_args(["--demo", "--demo_data_dir", args.demo_data_dir, "--cache_dir", args.cache_dir])
    run = prepare_run_data(train.data_settings(run_args), _MainProcess())
    pipe = load_pipeline(args.run, device="cpu", precision="fp32", optimize=False)
    with torch.no_grad():
        rows = {
            split: [case_features(pipe, c) for c in cases]
            for split, cases in (("train", run.train_cases), ("test", run.eval_cases))
        }
    labels = {
        split: np.array([c.grade == "LGG" for c in cases])
        for split, cases in (("train", run.train_cases), ("test", run.eval_cases))
    }
    print(f"{len(rows['train'])} training / {len(rows['test'])} held-out cases; held-out accuracy (%) by C")
    print("| bag | " + " | ".join(f"C={c}" for c in C_VALUES) + " |")
    print("|---|" + "---|" * len(C_VALUES))
    for bag in BAGS:
        scaler = StandardScaler().fit(pooled(rows["train"], bag))
        x_train, x_test = scaler.transform(pooled(rows["train"], bag)), scaler.transform(pooled(rows["test"], bag))
        accs = []
        for c in C_VALUES:
            clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(x_train, labels["train"])
            accs.append(100 * float(np.mean(clf.predict(x_test) == labels["test"])))
        print(f"| {bag} | " + " | ".join(f"{a:.1f}" for a in accs) + " |")


if __name__ == "__main__":
    main()
