#!/usr/bin/env python
"""Train and evaluate EmrFuse (brain MRI + radiology report) with 🤗 Accelerate.

One readable script in the style of diffusers' ``examples/*/train_*.py``: the options, ``DATA_DEFAULTS``
and ``main()``. What they run (data and splits, the loop, checkpoints, evaluation on whole volumes, the
grading head and its calibration, the ablation tables, the model folder, card and ``push_to_hub``) is
importable from ``modeling_emrfuse.training``, one module per job (listed in its ``__init__``).

Runs as ``python train.py ...`` or ``accelerate launch train.py ...``; ``python train.py --demo``
trains and evaluates the demo model on generated cases (CPU, nothing to download) into
``outputs/emrfuse-demo``. The README's "Train on BraTS" and "The paper's ablations" sections are the
manual; ``--help`` lists the options. Report text is never logged.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from modeling_emrfuse.runtime.cpu_threads import limit_torch_threads, prefer_passive_openmp

prefer_passive_openmp()  # before torch (and everything that imports it) loads OpenMP: waiting threads sleep

# ruff: noqa: E402  (the imports below must follow prefer_passive_openmp)

from datasets_scripts.monai_augmentation import AUGMENTATIONS, require_monai
from modeling_emrfuse.configuration_emrfuse import ABLATION_PRESETS
from modeling_emrfuse.processing_emrfuse import EmrFuseImageProcessor
from modeling_emrfuse.runtime.determinism import make_deterministic
from modeling_emrfuse.training.checkpoints import CheckpointError
from modeling_emrfuse.training.data import (
    DEFAULT_TEXT_MODEL,
    DataSettings,
    DemoDataSettings,
    RunDataError,
    SplitSettings,
    is_demo_data_folder,
)
from modeling_emrfuse.training.run import SELECTION_NEEDS_VALIDATION, run_main
from modeling_emrfuse.training.settings import check_option_values, from_options
from modeling_emrfuse.training.text_tower import MIN_REPORTS_PER_WORD

logger = logging.getLogger("emrfuse.train")

DEFAULT_VISION_MODEL = "resnet50"

DEFAULT_OUTPUT_DIR = "outputs/emrfuse"

DEMO_OUTPUT_DIR = "outputs/emrfuse-demo"

SWITCH_FLAGS = ("alignment", "self_attention", "residual", "dynamic_weighting")

# ---------------------------------------------------------------------------------------------
# Defaults live in two places only, and nowhere else (no fallbacks further down):
# - an option whose default is the same for every run has it in parse_args;
# - an option whose default depends on the data has it in DATA_DEFAULTS, one column for the demo
#   and one for real data, applied by finalize_args where the user gave no value.
# The demo column is tuned so that `python train.py --demo` reaches its held-out metrics well within
# ~10 minutes on a 2-core CPU (about 1 minute idle): ResNet-18 rather than ResNet-50 and 64 x 64
# slices keep it that fast; 96 cases because grading needs more than the 36 training cases of 48 to
# generalise (segmentation does not). The real-data column is the paper-size model.
# ---------------------------------------------------------------------------------------------
DATA_DEFAULTS: Dict[str, Tuple[Any, Any]] = {
    # option                  (demo,                    real data)
    "output_dir": (DEMO_OUTPUT_DIR, DEFAULT_OUTPUT_DIR),
    "vision_model": ("resnet18", DEFAULT_VISION_MODEL),
    "fusion_dim": (128, 256),
    "decoder_channels": ([128, 64, 32, 16, 16], None),  # None: the config's default
    "cross_attention_heads": (4, 8),
    "max_steps": (200, None),  # None: --num_epochs decides
    "num_epochs": (None, 50),
    "learning_rate": (2e-3, 1e-4),
    "warmup_steps": (20, 500),
    "grading_max_steps": (120, 120),  # the grading stage after segmentation (demo; real data with --with_grading)
    "grading_learning_rate": (2e-3, 1e-4),
    "grading_pooling": ("tumour", "slices"),  # demo: the features of the predicted tumour (README)
    "eval_fraction": (0.25, 0.2),
    "val_fraction": (0.0, 0.1),
}


# =============================================================================================
# arguments
# =============================================================================================
def _add_data_folder_options(g: argparse._ArgumentGroup) -> None:
    """Where the cases and their reports come from, and how ids map between releases."""
    g.add_argument(
        "--data_dir",
        type=str,
        action="append",
        default=None,
        help="BraTS folder (any supported layout); repeat for several folders in one run (case ids must be unique).",
    )
    g.add_argument(
        "--reports",
        type=str,
        default=None,
        help="Reports file (CSV/JSONL: case id -> text); default: per-case <case>_flair_text.txt.",
    )
    g.add_argument(
        "--release",
        type=str,
        action="append",
        default=None,  # None: ["auto"], set in finalize_args
        help="BraTS release ('auto' detects it, the default); once for every folder, or once per --data_dir in the same order.",
    )
    g.add_argument(
        "--id_mapping",
        type=str,
        action="append",
        default=None,
        help="Id table (BraTS 2020 name_mapping.csv, BraTS 2021 BraTS21-17_Mapping.csv; repeatable): reports keyed by "
        "BraTS 2020 ids and grades follow their patients into other releases, and one patient stays in one split. "
        "A name_mapping*.csv inside a BraTS 2020 folder is used automatically.",
    )


def _add_demo_data_options(g: argparse._ArgumentGroup) -> None:
    """Synthetic demo data: whether to use it, how much, and where it is written."""
    g.add_argument(
        "--demo",
        action="store_true",
        help="Use synthetic demo data (generated when --data_dir is not given). A --data_dir must then hold demo data "
        "(written by `emrfuse demo-data` or by train.py --demo), unless --allow_demo_on_other_data.",
    )
    g.add_argument(
        "--allow_demo_on_other_data",
        action="store_true",
        help="Allow --demo on a --data_dir that the demo generator did not write (e.g. real reports): the demo's small "
        "models and text tower are trained on it, the run is not described as synthetic, and the tower's vocabulary "
        "keeps only words found in at least --vocab_min_reports distinct reports.",
    )
    g.add_argument(
        "--vocab_min_reports",
        type=int,
        default=MIN_REPORTS_PER_WORD,
        help=f"The demo text tower's WordPiece vocabulary, counted from the training reports, never keeps a word found in "
        f"fewer than this many distinct reports (default {MIN_REPORTS_PER_WORD}; at least {MIN_REPORTS_PER_WORD}): rare words "
        "of patients' reports never reach tokenizer files or the Hub.",
    )
    g.add_argument("--demo_cases", type=int, default=96, help="Number of demo cases to generate.")
    g.add_argument(
        "--demo_size",
        type=str,
        default="small",
        help="Demo grid: small (64x64x48), medium (96x96x64), full (240x240x155) or XxYxZ.",
    )
    g.add_argument(
        "--demo_data_dir",
        type=str,
        default=None,
        help="Where demo cases are written (default data/emrfuse-demo-<size>-<n>).",
    )


def _add_split_and_loading_options(g: argparse._ArgumentGroup) -> None:
    """The slice cache, the train / validation / test split, case limits and data-loading processes."""
    g.add_argument(
        "--cache_dir",
        type=str,
        default="cache/emrfuse",
        help="Preprocessed slice cache (rebuilt only when inputs change).",
    )
    g.add_argument(
        "--eval_fraction",
        type=float,
        default=None,
        help="Share of patients held out as test (grade-stratified folds: n_folds = 1/eval_fraction); 0 = train on every case, no evaluation.",
    )
    g.add_argument("--fold", type=int, default=0, help="Which fold is the test split.")
    g.add_argument(
        "--val_fraction",
        type=float,
        default=None,
        help="Share of training patients used for validation (model selection); 0 = none.",
    )
    g.add_argument(
        "--split_file",
        type=str,
        default=None,
        help="Split file(s) (TextBraTS Train.json/Test.json style or id lists) instead of folds.",
    )
    g.add_argument("--max_eval_cases", type=int, default=None, help="Evaluate at most this many held-out cases.")
    g.add_argument("--max_train_cases", type=int, default=None, help="Train on at most this many cases.")
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes.")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads per process (default: OMP_NUM_THREADS if set, else the cores this "
        "process may use, os.sched_getaffinity, shared by the processes of a torchrun/accelerate node).",
    )


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    _add_data_folder_options(g)
    _add_demo_data_options(g)
    _add_split_and_loading_options(g)


def _add_model_source_options(g: argparse._ArgumentGroup) -> None:
    """What to train and which towers / saved model it starts from."""
    g.add_argument(
        "--task",
        choices=("segmentation", "classification"),
        default=None,
        help="What to train. Default: segmentation; with --demo (or --with_grading), segmentation then a short grading run.",
    )
    g.add_argument(
        "--text_model",
        type=str,
        default=None,
        help=f"Text tower: Hub id or local folder (default {DEFAULT_TEXT_MODEL}; demo: a small BERT trained here).",
    )
    g.add_argument(
        "--vision_model", type=str, default=None, help="timm architecture (default resnet50; demo: resnet18)."
    )
    g.add_argument(
        "--vision_pretrained", action="store_true", help="Load timm's pretrained weights for the image tower."
    )
    g.add_argument(
        "--init_from",
        type=str,
        default=None,
        help="Start from a saved EmrFuse model folder (e.g. the segmentation run, for grading).",
    )
    g.add_argument(
        "--preset",
        type=str,
        default=None,
        help="Ablation row: one of configuration_emrfuse.ABLATION_PRESETS (default full).",
    )
    g.add_argument(
        "--no_text",
        action="store_true",
        help="Image-only baseline (Table 1, row 1): no text tower, no tokenizer, reports ignored.",
    )
    g.add_argument(
        "--shuffle_reports",
        action="store_true",
        help="Control: every case gets the report of another patient's case of its own split (train, validation, "
        "test), in training and evaluation alike; a model that uses the report's content loses what it gained.",
    )
    g.add_argument(
        "--no_reports",
        action="store_true",
        help="Control: the text tower and fusion head are built as usual but no case gets a report (each is "
        "encoded as a missing report), so a difference to --no_text is the architecture's, not the report's.",
    )


def _add_model_architecture_options(g: argparse._ArgumentGroup) -> None:
    """Inputs, switches and sizes of the model's architecture."""
    g.add_argument(
        "--sequence_dropout",
        type=float,
        default=0.0,
        help="Training: probability that each MRI sequence of a slice is dropped (zero-filled); the model then "
        "gets sequence-presence channels and serves cases with any subset of T1/T1ce/T2/FLAIR. Cases that lack "
        "sequences are accepted when this is > 0 or with --sequence_presence.",
    )
    g.add_argument(
        "--sequence_presence",
        action="store_true",
        help="Give the model sequence-presence channels (implied by --sequence_dropout > 0).",
    )
    g.add_argument(
        "--init_vision_from",
        type=str,
        default=None,
        help="Warm start: copy the image tower, fusion and decoder weights of a saved EmrFuse folder whose shapes match "
        "(e.g. the demo model: synthetic pretraining); extra input channels start at zero, the text tower is untouched.",
    )
    for name in SWITCH_FLAGS:
        g.add_argument(f"--no_{name}", action="store_true", help=f"Switch off {name.replace('_', ' ')}.")
    g.add_argument(
        "--cross_attention",
        action="store_true",
        help="Add the decoder's cross-attention to the report tokens (an extension; the paper's model, and "
        "every preset of its tables, reaches the decoder through FiLM only). Same as --preset full_cross_attention.",
    )
    g.add_argument("--fusion_dim", type=int, default=None)
    g.add_argument("--decoder_channels", type=int, nargs="+", default=None)
    g.add_argument("--cross_attention_heads", type=int, default=None)
    g.add_argument("--align_loss_weight", type=float, default=None)
    g.add_argument("--ortho_loss_weight", type=float, default=None)
    g.add_argument("--context_slices", type=int, default=0, help="Neighbouring slices on each side as extra channels.")
    g.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="In-plane training crop (pixels, multiple of 32); default: the whole padded slice. Evaluation always uses whole slices.",
    )
    clip = "Clip each sequence's brain intensities to these percentiles (e.g. 0.5 99.5) before the z-score (saved"
    g.add_argument(
        "--clip_percentiles", type=float, nargs=2, metavar=("LOW", "HIGH"), help=f"{clip} with the processor)."
    )
    g.add_argument(
        "--max_report_tokens",
        type=int,
        default=None,
        help="Truncate reports to this many tokens (default: the tower's limit).",
    )


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    _add_model_source_options(g)
    _add_model_architecture_options(g)


def _add_optimisation_options(g: argparse._ArgumentGroup) -> None:
    """Steps, batches, learning rates and the optimiser's schedule."""
    g.add_argument("--num_epochs", type=int, default=None)
    g.add_argument("--max_steps", type=int, default=None, help="Optimiser steps (overrides --num_epochs).")
    g.add_argument(
        "--batch_size", type=int, default=16, help="Slices per batch per process (a multiple of --slices_per_case)."
    )
    g.add_argument(
        "--slices_per_case",
        type=int,
        default=4,
        help="Consecutive slices drawn from one case: a batch holds batch_size/slices_per_case cases (grading: each case's bag of slices).",
    )
    g.add_argument(
        "--gradient_accumulation_steps", type=int, default=None, help="Default: the accelerate config's, else 1."
    )
    g.add_argument("--learning_rate", type=float, default=None)
    g.add_argument(
        "--text_learning_rate",
        type=float,
        default=None,
        help="Learning rate of a pretrained text tower (default learning_rate).",
    )
    g.add_argument(
        "--lr_scheduler",
        type=str,
        default="cosine",
        help="linear, cosine, constant, constant_with_warmup, ... (transformers.get_scheduler)",
    )
    g.add_argument("--warmup_steps", type=int, default=None)
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument(
        "--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="Default: the accelerate config's."
    )


def _add_sampling_options(g: argparse._ArgumentGroup) -> None:
    """How training slices are drawn and augmented, and the seed."""
    g.add_argument(
        "--tumour_prob",
        type=float,
        default=0.7,
        help="Probability that a training slice is drawn among the slices with tumour.",
    )
    g.add_argument(
        "--samples_per_epoch", type=int, default=None, help="Slices per epoch (default: all training slices)."
    )
    g.add_argument(
        "--no_augmentation", action="store_true", help="Switch off rotation / scaling / translation / flips."
    )
    aug = "paper: hand-written affine; monai: MONAI spatial + intensity transforms (pip install monai); none: off."
    g.add_argument("--augmentation", choices=AUGMENTATIONS, default="paper", help=aug)
    g.add_argument(
        "--flip_axes",
        type=int,
        nargs="*",
        default=[],
        help="Mirror-flip axes (0 = left-right, 1 = anterior-posterior). Default none: a flip would contradict the side / lobe the report names.",
    )
    g.add_argument("--seed", type=int, default=0)


def _add_grading_run_options(g: argparse._ArgumentGroup) -> None:
    """The grading run: its steps, bag policy, fit, calibration and case sampling."""
    g.add_argument(
        "--grading_max_steps",
        type=int,
        default=None,
        help="Steps of the grading stage after segmentation (the demo's default, or --with_grading; 0 = skip on the demo).",
    )
    g.add_argument(
        "--with_grading",
        action="store_true",
        help="Real data: after segmentation, train the grading stage too (as the demo does), so the model folder "
        "carries grading/ and the pipeline returns a grade. It uses the training cases with a grade (HGG/LGG: folder "
        "layout or id tables), says how many, leaves the others out, and needs both grades.",
    )
    g.add_argument("--grading_learning_rate", type=float, default=None)
    g.add_argument(
        "--grading_slices",
        type=int,
        default=32,
        help="The grading bag policy (config.grading_slices): a case is graded from at most this many evenly "
        "spaced brain slices, in training (bags drawn from them), evaluation, emrfuse predict and the Space "
        "alike; 0: every slice.",
    )
    g.add_argument(
        "--grading_pooling",
        choices=("slices", "tumour"),
        default=None,
        help="What the grading model reads (config.grading_pooling): 'slices', the image tower's pooled last feature "
        "map of the grading slices; 'tumour', its stride-8 and stride-16 feature maps averaged over the whole tumour "
        "the segmentation model predicts, on the slices with tumour (a case without predicted tumour is pooled as "
        "with 'slices'). Default: tumour on the demo, slices on real data.",
    )
    g.add_argument(
        "--grading_fit",
        choices=("head", "finetune"),
        default="head",
        help="The demo's grading run after segmentation: 'head' (default) keeps the segmentation run's towers "
        "frozen and fits the rest of the model (self-attention, case pooling, fusion, classifier) on their "
        "features of every training case's grading slices, --grading_max_steps full-batch steps; 'finetune' "
        "trains the whole model on augmented slice bags, --grading_max_steps steps of --batch_size slices "
        "(README: 'Results on demo data' compares the two).",
    )
    g.add_argument(
        "--grading_calibration_folds",
        type=int,
        default=3,
        help="With --grading_fit head: the grade probabilities are temperature-scaled on out-of-fold "
        "predictions of this many heads, each fitted without one fold of the training cases (the grades "
        "themselves do not change); 0: no calibration.",
    )
    g.add_argument(
        "--grading_sampling",
        choices=("balanced", "natural"),
        default="balanced",
        help="Grading runs: draw HGG and LGG cases equally often (balanced, the default: a 293:76 cohort otherwise "
        "lets the head collapse to HGG) or in proportion to their slices (natural).",
    )


def _add_training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    _add_optimisation_options(g)
    _add_sampling_options(g)
    _add_grading_run_options(g)


def _add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output, evaluation and checkpoints")
    g.add_argument(
        "--output_dir",
        type=str,
        default=None,
        help=f"Model folder (default {DEFAULT_OUTPUT_DIR}; demo {DEMO_OUTPUT_DIR}).",
    )
    g.add_argument(
        "--eval_steps",
        type=int,
        default=None,
        help="Evaluate on the validation split every N steps and keep the best model (needs a validation split: "
        "--val_fraction > 0 or a --split_file with one). Without it, the model of the last step is kept.",
    )
    g.add_argument("--eval_tta", action="store_true", help="Evaluate with test-time flips (emrfuse predict --tta).")
    g.add_argument(
        "--eval_min_component_mm3",
        type=float,
        default=None,
        help="Evaluate with post-processing: "
        "whole-tumour components below this many mm^3 removed (emrfuse predict --min-component-mm3).",
    )
    g.add_argument(
        "--eval_et_min_mm3",
        type=float,
        default=None,
        help="Evaluate with post-processing: ET below "
        "this many mm^3 in all relabelled as tumour core (emrfuse predict --et-min-mm3).",
    )
    g.add_argument("--checkpointing_steps", type=int, default=None, help="Save a resumable checkpoint every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=2)
    g.add_argument(
        "--stop_after_steps",
        type=int,
        default=None,
        help="Stop after this many steps as if interrupted (no final evaluation); continue later with --resume_from_checkpoint.",
    )
    g.add_argument("--resume_from_checkpoint", type=str, default=None, help="A checkpoint folder or 'latest'.")
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument(
        "--report_to",
        type=str,
        default="auto",
        help="Tracker: tensorboard, wandb, all, none; auto = tensorboard when installed.",
    )
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", type=str, default=None)
    g.add_argument("--hub_token", type=str, default=None)
    g.add_argument("--hub_private", action="store_true")


def _add_ablations_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ablations")
    g.add_argument(
        "--ablation",
        choices=("table1", "table3"),
        default=None,
        help="Train + evaluate every row of the paper's Table 1 / Table 3, plus the shuffled-reports control row.",
    )
    g.add_argument(
        "--ablation_seeds",
        type=int,
        nargs="+",
        default=None,
        help="Seeds per row (cells: mean ± 95 %% confidence interval over seeds); default: 0 1 2.",
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments (see ``python train.py --help``)."""
    p = argparse.ArgumentParser(description="Train and evaluate EmrFuse (brain MRI + radiology report).")
    _add_data_options(p)
    _add_model_options(p)
    _add_training_options(p)
    _add_output_options(p)
    _add_ablations_options(p)
    args = p.parse_args(argv)
    finalize_args(args)
    return args


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on demo vs real data; validate combinations."""
    if args.data_dir is None and not args.demo:
        raise SystemExit("train.py: give --data_dir (a BraTS folder) or --demo (synthetic demo data).")
    if args.demo and args.data_dir and not args.allow_demo_on_other_data:
        others = [d for d in args.data_dir if not is_demo_data_folder(d)]
        if others:
            raise SystemExit(
                f"train.py: --demo is for synthetic demo data, but {', '.join(others)} was not written by the demo generator "
                "(no emrfuse_demo_data.json): its reports would train the demo vocabulary and the run would be described as "
                "synthetic. Drop --demo for real data, or pass --allow_demo_on_other_data to train the demo's small models on it."
            )
    args.release = args.release or ["auto"]
    if args.data_dir and len(args.release) not in (1, len(args.data_dir)):
        raise SystemExit(
            f"train.py: {len(args.release)} --release values for {len(args.data_dir)} --data_dir folders: give one, or one per folder."
        )
    args.sequence_presence = bool(args.sequence_presence or args.sequence_dropout > 0)
    args.augmentation = "none" if args.no_augmentation else args.augmentation
    try:  # MONAI is an optional extra; the image processor checks the percentiles
        require_monai() if args.augmentation == "monai" else None
        EmrFuseImageProcessor(clip_percentiles=args.clip_percentiles)
    except (ImportError, ValueError) as exc:
        raise SystemExit(f"train.py: {exc}") from None
    if args.output_dir is None and args.ablation:  # keep ablation runs out of the model folder
        args.output_dir = DATA_DEFAULTS["output_dir"][0 if args.demo else 1] + "-ablations"
    if args.grading_pooling is None and args.grading_fit == "finetune":  # finetune trains on augmented slice bags
        args.grading_pooling = "slices"
    for key, (demo_value, real_value) in DATA_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, demo_value if args.demo else real_value)
    check_option_values(args, ABLATION_PRESETS, MIN_REPORTS_PER_WORD)
    if args.eval_steps is not None and (args.eval_steps < 1 or (args.val_fraction == 0 and args.split_file is None)):
        raise SystemExit(
            SELECTION_NEEDS_VALIDATION
            if args.eval_steps >= 1
            else f"train.py: --eval_steps must be >= 1, got {args.eval_steps}."
        )
    if args.with_grading and (args.task == "classification" or args.grading_max_steps < 1):
        raise SystemExit(
            "train.py: --with_grading trains grading after segmentation: no --task classification, --grading_max_steps >= 1."
        )
    demo_grading = args.task is None and args.demo and bool(args.grading_max_steps)
    args.grading_after_segmentation = demo_grading or args.with_grading
    args.task = args.task or "segmentation"
    if args.push_to_hub and not args.hub_model_id:
        args.hub_model_id = Path(args.output_dir).name
    if args.ablation_seeds is None:
        args.ablation_seeds = [0, 1, 2]  # a confidence interval needs several training runs per row
    return args


def model_switches(args: argparse.Namespace) -> Dict[str, bool]:
    """The preset's switches (default ``full``), then any ``--no_*`` flag switched off and ``--cross_attention`` on."""
    switches = dict(ABLATION_PRESETS[args.preset or "full"])
    if args.no_text:
        switches = {k: False for k in switches}
    for name in SWITCH_FLAGS:
        if getattr(args, f"no_{name}"):
            switches[f"use_{name}"] = False
    if getattr(args, "cross_attention", False) and switches["use_text"]:
        switches["use_cross_attention"] = True
    return switches


def data_settings(args: argparse.Namespace) -> DataSettings:
    """Where the run's cases come from and how they are split (see :func:`prepare_run_data`)."""
    return from_options(
        DataSettings, args, split=from_options(SplitSettings, args), demo_data=from_options(DemoDataSettings, args)
    )


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run what the arguments ask for and return its summary (also printed)."""
    args = parse_args(argv)
    try:
        threads = limit_torch_threads(args.threads)
    except ValueError as exc:
        raise SystemExit(f"train.py: error: --threads: {exc}") from None
    determinism = make_deterministic(args.seed, threads)  # before CUDA starts and any parallel work
    try:
        return run_main(args, determinism, data_settings(args), model_switches(args))
    finally:
        determinism.restore()  # a caller in the same process (tests) gets its settings back


def cli() -> None:
    """``python train.py``: data or checkpoints that cannot make a run end in one line on stderr and exit code 2."""
    try:
        main()
    except (RunDataError, CheckpointError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
