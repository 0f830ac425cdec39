#!/usr/bin/env python
"""Train and evaluate EmrFuse (brain MRI + radiology report) with 🤗 Accelerate.

One readable script in the style of diffusers' ``examples/*/train_*.py``: arguments, an
``Accelerator``, a plain loop, checkpoints, evaluation on whole volumes, the best model saved with
``save_pretrained`` (+ processor, tokenizer and a model card), ``push_to_hub`` at the end.

Runs as ``python train.py ...`` or ``accelerate launch train.py ...`` (whatever the accelerate
config says: devices, processes, mixed precision, gradient accumulation); on CPU with several
processes: ``ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 train.py ...``.

The main job (nothing to download; CPU; about one minute on an idle 2-core machine)::

    python train.py --demo

generates 96 synthetic demo cases (``datasets_scripts.demo_data``; 72 for training, 24 held
out), trains a WordPiece tokenizer on the training reports for a small BERT text tower (2 layers,
hidden 64, random weights: nothing can be downloaded), trains the full model (all fusion parts
on, ResNet-18 image tower) for segmentation, then the grading head in a second, short run that
starts from the segmentation weights, evaluates both on the held-out cases, prints the tables
and leaves one model folder, ``outputs/emrfuse-demo``: segmentation at its root, grading in its
``grading/`` sub-folder (named by the root config, where ``emrfuse predict`` and the Space find it).

Real data::

    accelerate launch train.py --data_dir /data/BraTS2020_TrainingData --task segmentation \\
        --text_model dmis-lab/biobert-base-cased-v1.2 --vision_model resnet50 --vision_pretrained

Several releases at once (each folder its own release and label convention), image only, any
subset of the four sequences, reports and grades through the organisers' id tables::

    python train.py --data_dir BraTS2018 --data_dir BraTS2021 --id_mapping name_mapping.csv \
        --reports textbrats_reports.jsonl --no_text --sequence_dropout 0.25 --vision_model resnet18

``bench/bench_real.py`` runs this recipe on the real cases in ``../shared/realdata`` with
patient-level cross-validation.

The paper's ablations (every row trained and evaluated on the same data, seeds and budget)::

    python train.py --demo --ablation table1 --ablation_seeds 0 1 2

Both tables end with a control row: the complete model with every case's report swapped with another
case's of its split (:func:`shuffled_reports_run`); if it matches the complete model, the report is not used.

Evaluation runs on whole volumes: the image processor's slices -> the model ->
``post_process_segmentation`` back to the original grid -> 3D metrics
(:mod:`modeling_emrfuse.evaluation.metrics`); each held-out case is evaluated exactly once, by one process,
and the results are gathered. Report text is never logged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace as dataclass_replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from modeling_emrfuse.runtime.cpu_threads import limit_torch_threads, prefer_passive_openmp

prefer_passive_openmp()  # before torch (and everything that imports it) loads OpenMP: waiting threads sleep

# ruff: noqa: E402  (the imports below must follow prefer_passive_openmp)
import huggingface_hub
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from safetensors.torch import load_file
from tokenizers import BertWordPieceTokenizer
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from tqdm.auto import tqdm
from transformers import BertConfig, BertModel, BertTokenizer, get_scheduler

from datasets_scripts.brats_text import (
    attach_reports_and_grades,
    derange_reports,
    load_id_mapping,
    make_splits,
    read_reports,
)
from datasets_scripts.demo_data import DEMO_DATA_VERSION, demo_case_ids, write_demo_dataset
from datasets_scripts.slice_cache import SliceDataset, build_cache, collate_slices
from modeling_emrfuse.runtime import strict_json
from modeling_emrfuse.evaluation.ablation_report import (
    SHUFFLED_REPORTS_PRESET,
    SHUFFLED_REPORTS_ROW,
    TABLE_TITLES,
    case_values,
    format_ablation_table,
    row_numbers,
    write_ablation_report,
)
from modeling_emrfuse.brats_io import discover_folders, read_volume, reorientation, reoriented_image, to_nifti_image
from modeling_emrfuse.brats_labels import REGIONS
from modeling_emrfuse.configuration_emrfuse import ABLATION_PRESETS, TABLE1_ROWS, TABLE3_ROWS, EmrFuseConfig, preset_parts
from modeling_emrfuse.evaluation.report import format_results_markdown, summarize_segmentation, write_evaluation_report
from modeling_emrfuse.evaluation.metrics import classification_metrics, metrics_to_row, score_label_maps
from modeling_emrfuse.hub.model_card import build_model_card, training_config_for_card
from modeling_emrfuse.hub.packaging import add_pipeline_to_folder
from modeling_emrfuse.modeling_emrfuse import EmrFuseForImageClassification, EmrFuseForSegmentation
from modeling_emrfuse.processing_emrfuse import EmrFuseImageProcessor, EmrFuseProcessor, grading_slice_indices

logger = logging.getLogger("emrfuse.train")

DEFAULT_TEXT_MODEL = "dmis-lab/biobert-base-cased-v1.2"
DEFAULT_VISION_MODEL = "resnet50"
DEFAULT_OUTPUT_DIR = "outputs/emrfuse"
DEMO_OUTPUT_DIR = "outputs/emrfuse-demo"
GRADING_SUBFOLDER = "grading"  # the grading run saves into <output_dir>/grading
CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_NAME = "training_state.json"
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
    "output_dir":             (DEMO_OUTPUT_DIR,         DEFAULT_OUTPUT_DIR),
    "vision_model":           ("resnet18",              DEFAULT_VISION_MODEL),
    "fusion_dim":             (128,                     256),
    "decoder_channels":       ([128, 64, 32, 16, 16],   None),  # None: the config's default
    "cross_attention_heads":  (4,                       8),
    "max_steps":              (200,                     None),  # None: --num_epochs decides
    "num_epochs":             (None,                    50),
    "learning_rate":          (2e-3,                    1e-4),
    "warmup_steps":           (20,                      500),
    "grading_max_steps":      (120,                     None),  # the demo's grading run after segmentation
    "grading_learning_rate":  (2e-3,                    1e-4),
    "eval_fraction":          (0.25,                    0.2),
    "val_fraction":           (0.0,                     0.1),
}
SELECTION_NEEDS_VALIDATION = (
    "train.py: --eval_steps chooses the best model during training, which needs a validation split: set "
    "--val_fraction > 0 (or give a --split_file with validation cases). Without one the model would be chosen on "
    "the test cases and then scored on them."
)
NO_EVALUATION_NOTE = (
    "No held-out evaluation: this model was trained on every case given (--eval_fraction 0). Its expected "
    "quality is what cross-validation of the same recipe measures (e.g. bench/bench_real.py --cv 5)."
)
MIN_REPORTS_PER_WORD = 5
"""k: a WordPiece vocabulary learned from reports (the demo text tower) never keeps a word found in fewer than k
distinct reports (a patient's rare words would otherwise be saved, and pushed, in ``vocab.txt``); k >= 5."""
# The small BERT tower trained from scratch for the demo (nothing can be downloaded).
DEMO_TEXT_TOWER = {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128, "max_position_embeddings": 256}


# =============================================================================================
# arguments
# =============================================================================================
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments (see ``python train.py --help``)."""
    p = argparse.ArgumentParser(description="Train and evaluate EmrFuse (brain MRI + radiology report).")
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", type=str, action="append", default=None,
                   help="BraTS folder (any supported layout); repeat for several folders in one run (case ids must be unique).")
    g.add_argument("--reports", type=str, default=None, help="Reports file (CSV/JSONL: case id -> text); default: per-case <case>_flair_text.txt.")
    g.add_argument("--release", type=str, action="append", default=None,  # None: ["auto"], set in finalize_args
                   help="BraTS release ('auto' detects it, the default); once for every folder, or once per --data_dir in the same order.")
    g.add_argument("--id_mapping", type=str, action="append", default=None,
                   help="Id table (BraTS 2020 name_mapping.csv, BraTS 2021 BraTS21-17_Mapping.csv; repeatable): reports keyed by "
                   "BraTS 2020 ids and grades follow their patients into other releases, and one patient stays in one split. "
                   "A name_mapping*.csv inside a BraTS 2020 folder is used automatically.")
    g.add_argument("--demo", action="store_true",
                   help="Use synthetic demo data (generated when --data_dir is not given). A --data_dir must then hold demo data "
                   "(written by `emrfuse demo-data` or by train.py --demo), unless --allow_demo_on_other_data.")
    g.add_argument("--allow_demo_on_other_data", action="store_true",
                   help="Allow --demo on a --data_dir that the demo generator did not write (e.g. real reports): the demo's small "
                   "models and text tower are trained on it, the run is not described as synthetic, and the tower's vocabulary "
                   "keeps only words found in at least --vocab_min_reports distinct reports.")
    g.add_argument("--vocab_min_reports", type=int, default=MIN_REPORTS_PER_WORD,
                   help=f"The demo text tower's WordPiece vocabulary, learned from the training reports, never keeps a word found in "
                   f"fewer than this many distinct reports (default {MIN_REPORTS_PER_WORD}; at least {MIN_REPORTS_PER_WORD}): rare words "
                   "of patients' reports never reach tokenizer files or the Hub.")
    g.add_argument("--demo_cases", type=int, default=96, help="Number of demo cases to generate.")
    g.add_argument("--demo_size", type=str, default="small", help="Demo grid: small (64x64x48), medium (96x96x64), full (240x240x155) or XxYxZ.")
    g.add_argument("--demo_data_dir", type=str, default=None, help="Where demo cases are written (default data/emrfuse-demo-<size>-<n>).")
    g.add_argument("--cache_dir", type=str, default="cache/emrfuse", help="Preprocessed slice cache (rebuilt only when inputs change).")
    g.add_argument("--eval_fraction", type=float, default=None,
                   help="Share of patients held out as test (grade-stratified folds: n_folds = 1/eval_fraction); 0 = train on every case, no evaluation.")
    g.add_argument("--fold", type=int, default=0, help="Which fold is the test split.")
    g.add_argument("--val_fraction", type=float, default=None, help="Share of training patients used for validation (model selection); 0 = none.")
    g.add_argument("--split_file", type=str, default=None, help="Split file(s) (TextBraTS Train.json/Test.json style or id lists) instead of folds.")
    g.add_argument("--max_eval_cases", type=int, default=None, help="Evaluate at most this many held-out cases.")
    g.add_argument("--max_train_cases", type=int, default=None, help="Train on at most this many cases.")
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes.")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per process (default: OMP_NUM_THREADS if set, else the cores this "
                        "process may use, os.sched_getaffinity, shared by the processes of a torchrun/accelerate node).")

    g = p.add_argument_group("model")
    g.add_argument("--task", choices=("segmentation", "classification"), default=None,
                   help="What to train. Default: segmentation; with --demo, segmentation then a short grading run.")
    g.add_argument("--text_model", type=str, default=None, help=f"Text tower: Hub id or local folder (default {DEFAULT_TEXT_MODEL}; demo: a small BERT trained here).")
    g.add_argument("--vision_model", type=str, default=None, help="timm architecture (default resnet50; demo: resnet18).")
    g.add_argument("--vision_pretrained", action="store_true", help="Load timm's pretrained weights for the image tower.")
    g.add_argument("--init_from", type=str, default=None, help="Start from a saved EmrFuse model folder (e.g. the segmentation run, for grading).")
    g.add_argument("--preset", type=str, default=None, help="Ablation row: one of configuration_emrfuse.ABLATION_PRESETS (default full).")
    g.add_argument("--no_text", action="store_true", help="Image-only baseline (Table 1, row 1): no text tower, no tokenizer, reports ignored.")
    g.add_argument("--sequence_dropout", type=float, default=0.0,
                   help="Training: probability that each MRI sequence of a slice is dropped (zero-filled); the model then "
                   "gets sequence-presence channels and serves cases with any subset of T1/T1ce/T2/FLAIR. Cases that lack "
                   "sequences are accepted when this is > 0 or with --sequence_presence.")
    g.add_argument("--sequence_presence", action="store_true", help="Give the model sequence-presence channels (implied by --sequence_dropout > 0).")
    g.add_argument("--init_vision_from", type=str, default=None,
                   help="Warm start: copy the image tower, fusion and decoder weights of a saved EmrFuse folder whose shapes match "
                   "(e.g. the demo model: synthetic pretraining); extra input channels start at zero, the text tower is untouched.")
    for name in SWITCH_FLAGS:
        g.add_argument(f"--no_{name}", action="store_true", help=f"Switch off {name.replace('_', ' ')}.")
    g.add_argument("--cross_attention", action="store_true",
                   help="Add the decoder's cross-attention to the report tokens (an extension; the paper's model, and "
                   "every preset of its tables, reaches the decoder through FiLM only). Same as --preset full_cross_attention.")
    g.add_argument("--fusion_dim", type=int, default=None)
    g.add_argument("--decoder_channels", type=int, nargs="+", default=None)
    g.add_argument("--cross_attention_heads", type=int, default=None)
    g.add_argument("--align_loss_weight", type=float, default=None)
    g.add_argument("--ortho_loss_weight", type=float, default=None)
    g.add_argument("--context_slices", type=int, default=0, help="Neighbouring slices on each side as extra channels.")
    g.add_argument("--image_size", type=int, default=None,
                   help="In-plane training crop (pixels, multiple of 32); default: the whole padded slice. Evaluation always uses whole slices.")
    g.add_argument("--max_report_tokens", type=int, default=None, help="Truncate reports to this many tokens (default: the tower's limit).")

    g = p.add_argument_group("training")
    g.add_argument("--num_epochs", type=int, default=None)
    g.add_argument("--max_steps", type=int, default=None, help="Optimiser steps (overrides --num_epochs).")
    g.add_argument("--batch_size", type=int, default=16, help="Slices per batch per process (a multiple of --slices_per_case).")
    g.add_argument("--slices_per_case", type=int, default=4,
                   help="Consecutive slices drawn from one case: a batch holds batch_size/slices_per_case cases (grading: each case's bag of slices).")
    g.add_argument("--gradient_accumulation_steps", type=int, default=None, help="Default: the accelerate config's, else 1.")
    g.add_argument("--learning_rate", type=float, default=None)
    g.add_argument("--text_learning_rate", type=float, default=None, help="Learning rate of a pretrained text tower (default learning_rate).")
    g.add_argument("--lr_scheduler", type=str, default="cosine", help="linear, cosine, constant, constant_with_warmup, ... (transformers.get_scheduler)")
    g.add_argument("--warmup_steps", type=int, default=None)
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="Default: the accelerate config's.")
    g.add_argument("--tumour_prob", type=float, default=0.7, help="Probability that a training slice is drawn among the slices with tumour.")
    g.add_argument("--samples_per_epoch", type=int, default=None, help="Slices per epoch (default: all training slices).")
    g.add_argument("--no_augmentation", action="store_true", help="Switch off rotation / scaling / translation / flips.")
    g.add_argument("--flip_axes", type=int, nargs="*", default=[],
                   help="Mirror-flip axes (0 = left-right, 1 = anterior-posterior). Default none: a flip would contradict the side / lobe the report names.")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--grading_max_steps", type=int, default=None, help="Demo: steps of the grading run after segmentation (0 = skip).")
    g.add_argument("--grading_learning_rate", type=float, default=None)
    g.add_argument("--grading_slices", type=int, default=32,
                   help="The grading bag policy (config.grading_slices): a case is graded from at most this many evenly "
                   "spaced brain slices, in training (bags drawn from them), evaluation, emrfuse predict and the Space "
                   "alike; 0: every slice.")
    g.add_argument("--grading_fit", choices=("head", "finetune"), default="head",
                   help="The demo's grading run after segmentation: 'head' (default) keeps the segmentation run's towers "
                   "frozen and fits the rest of the model (self-attention, case pooling, fusion, classifier) on their "
                   "features of every training case's grading slices, --grading_max_steps full-batch steps; 'finetune' "
                   "trains the whole model on augmented slice bags, --grading_max_steps steps of --batch_size slices "
                   "(README: 'Results on demo data' compares the two).")
    g.add_argument("--grading_calibration_folds", type=int, default=3,
                   help="With --grading_fit head: the grade probabilities are temperature-scaled on out-of-fold "
                   "predictions of this many heads, each fitted without one fold of the training cases (the grades "
                   "themselves do not change); 0: no calibration.")
    g.add_argument("--grading_sampling", choices=("balanced", "natural"), default="balanced",
                   help="Grading runs: draw HGG and LGG cases equally often (balanced, the default: a 293:76 cohort otherwise "
                   "lets the head collapse to HGG) or in proportion to their slices (natural).")

    g = p.add_argument_group("output, evaluation and checkpoints")
    g.add_argument("--output_dir", type=str, default=None, help=f"Model folder (default {DEFAULT_OUTPUT_DIR}; demo {DEMO_OUTPUT_DIR}).")
    g.add_argument("--eval_steps", type=int, default=None,
                   help="Evaluate on the validation split every N steps and keep the best model (needs a validation split: "
                   "--val_fraction > 0 or a --split_file with one). Without it, the model of the last step is kept.")
    g.add_argument("--checkpointing_steps", type=int, default=None, help="Save a resumable checkpoint every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=2)
    g.add_argument("--stop_after_steps", type=int, default=None,
                   help="Stop after this many steps as if interrupted (no final evaluation); continue later with --resume_from_checkpoint.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None, help="A checkpoint folder or 'latest'.")
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--report_to", type=str, default="auto", help="Tracker: tensorboard, wandb, all, none; auto = tensorboard when installed.")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", type=str, default=None)
    g.add_argument("--hub_token", type=str, default=None)
    g.add_argument("--hub_private", action="store_true")

    g = p.add_argument_group("ablations")
    g.add_argument("--ablation", choices=("table1", "table3"), default=None, help="Train + evaluate every row of the paper's Table 1 / Table 3, plus the shuffled-reports control row.")
    g.add_argument("--ablation_seeds", type=int, nargs="+", default=None,
                   help="Seeds per row (cells: mean ± 95 %% confidence interval over seeds); default: 0 1 2.")

    args = p.parse_args(argv)
    finalize_args(args)
    return args


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on demo vs real data; validate combinations."""
    if args.data_dir is None and not args.demo:
        raise SystemExit("train.py: give --data_dir (a BraTS folder) or --demo (synthetic demo data).")
    if args.vocab_min_reports < MIN_REPORTS_PER_WORD:
        raise SystemExit(f"train.py: --vocab_min_reports must be >= {MIN_REPORTS_PER_WORD}, got {args.vocab_min_reports}.")
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
        raise SystemExit(f"train.py: {len(args.release)} --release values for {len(args.data_dir)} --data_dir folders: give one, or one per folder.")
    if args.eval_fraction is not None and not 0.0 <= args.eval_fraction < 1.0:
        raise SystemExit(f"train.py: --eval_fraction must be in [0, 1), got {args.eval_fraction}.")
    if not 0.0 <= args.sequence_dropout < 1.0:
        raise SystemExit(f"train.py: --sequence_dropout must be in [0, 1), got {args.sequence_dropout}.")
    args.sequence_presence = bool(args.sequence_presence or args.sequence_dropout > 0)
    if args.output_dir is None and args.ablation:  # keep ablation runs out of the model folder
        args.output_dir = DATA_DEFAULTS["output_dir"][0 if args.demo else 1] + "-ablations"
    for key, (demo_value, real_value) in DATA_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, demo_value if args.demo else real_value)
    if args.grading_slices < 0:
        raise SystemExit(f"train.py: --grading_slices must be >= 0 (0: every slice), got {args.grading_slices}.")
    if args.grading_calibration_folds < 0 or args.grading_calibration_folds == 1:
        raise SystemExit(f"train.py: --grading_calibration_folds must be 0 (no calibration) or >= 2, got {args.grading_calibration_folds}.")
    if args.eval_steps is not None and (args.eval_steps < 1 or (args.val_fraction == 0 and args.split_file is None)):
        raise SystemExit(SELECTION_NEEDS_VALIDATION if args.eval_steps >= 1 else
                         f"train.py: --eval_steps must be >= 1, got {args.eval_steps}.")
    args.grading_after_segmentation = args.task is None and args.demo and bool(args.grading_max_steps)
    args.task = args.task or "segmentation"
    if args.batch_size % args.slices_per_case:
        raise SystemExit(f"train.py: --batch_size {args.batch_size} must be a multiple of --slices_per_case {args.slices_per_case}.")
    if args.image_size is not None and (args.image_size < 32 or args.image_size % 32):
        raise SystemExit(f"train.py: --image_size must be a multiple of 32 (>= 32), got {args.image_size}.")
    if args.preset is not None:

        if args.preset not in ABLATION_PRESETS:
            raise SystemExit(f"train.py: unknown --preset {args.preset!r}; use one of {sorted(ABLATION_PRESETS)}.")
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


# =============================================================================================
# data
# =============================================================================================
@dataclass
class RunData:
    """Cases and reports of a run (shared by every row of an ablation)."""

    data_dir: Path  # the first data folder (the demo folder with --demo)
    train_cases: list
    eval_cases: list  # held out: the final evaluation (test split)
    val_cases: list  # model selection during training (empty: select on eval_cases, see --val_fraction)
    reports: Dict[str, Optional[str]]
    synthetic: bool
    release: str
    text_model: Optional[str]
    description: Dict[str, Any] = field(default_factory=dict)
    data_dirs: List[Path] = field(default_factory=list)
    patients: Dict[str, str] = field(default_factory=dict)  # case id -> patient (id tables), for splits
    demo_text_tower: bool = False  # the text tower was built here (--demo): a small BERT + WordPiece from the reports


def is_demo_data_folder(folder: str | Path) -> bool:
    """``folder`` was written by the demo generator (its marker) or by :func:`ensure_demo_data` (``.complete.json``)."""
    return demo_case_ids(folder) is not None or (Path(folder) / ".complete.json").is_file()


def _cases_not_generated(cases, data_dirs: Sequence[Path]) -> int:
    """How many of ``cases`` the demo generator did not write (not in a demo folder's list of generated cases)."""
    generated: set = set()
    for folder in data_dirs:
        ids = demo_case_ids(folder)
        if ids is None and is_demo_data_folder(folder):
            return 0  # a demo folder of an older train.py (.complete.json only): no case list to compare with
        generated |= ids or set()
    return sum(1 for c in cases if c.case_id not in generated)


def demo_data_dir(args: argparse.Namespace) -> Path:
    """Where the demo cases go (the data seed is fixed, so every run and every ablation row sees the same cases)."""
    return Path(args.demo_data_dir or f"data/emrfuse-demo-{args.demo_size}-{args.demo_cases}")


def demo_grid(size: str):
    """``small`` / ``medium`` / ``full`` or ``XxYxZ`` (e.g. ``32x32x24`` for tests)."""
    if "x" in size:
        try:
            dims = tuple(int(v) for v in size.lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) != 3 or min(dims) < 8:
            raise ValueError(f"--demo_size {size!r}: expected small, medium, full or XxYxZ with sizes >= 8.")
        return dims
    return size


def ensure_demo_data(args: argparse.Namespace, accelerator) -> Path:
    """Generate the demo cases once (main process; the others wait); reuse them when complete."""
    out = demo_data_dir(args)
    marker = out / ".complete.json"
    # the generator's version too: a folder written by an older generator is regenerated, not reused
    spec = {"n_cases": args.demo_cases, "size": args.demo_size, "seed": 0, "version": DEMO_DATA_VERSION}
    if accelerator.is_main_process:
        if not (marker.exists() and json.loads(marker.read_text()) == spec):
            if marker.exists():  # our own demo folder, written with other settings: start afresh
                shutil.rmtree(out)
            t0 = time.time()
            write_demo_dataset(out, n_cases=args.demo_cases, size=demo_grid(args.demo_size), seed=0)
            strict_json.write_json(marker, spec, indent=None)
            logger.info(f"wrote {args.demo_cases} synthetic demo cases ({args.demo_size}) to {out} in {time.time() - t0:.1f} s")
    accelerator.wait_for_everyone()
    return out


def read_case_reports(cases, reports_file: Optional[str], id_mapping=None):
    """Reports and grades of the run's cases: ``(reports, attachment)``.

    ``reports`` maps case id -> report text (``None`` when the case has none; never logged): the
    reports file's entry (under the case id, or under the patient's BraTS 2020 id through the id
    tables), else the case's own report file. ``attachment`` (:class:`ReportAttachment`) holds the
    cases with the grades the id tables give, the patients and the counts.
    """
    by_id = read_reports(reports_file) if reports_file else {}
    attached = attach_reports_and_grades(cases, by_id, id_mapping, read_case_files=not reports_file)
    unknown = sorted(set(by_id) - attached.used_report_ids)
    if unknown and reports_file:
        logger.info(f"{len(unknown)} report(s) in {reports_file} name no case of the data folders.")
    return {c.case_id: attached.reports.get(c.case_id) for c in attached.cases}, attached


def split_run_cases(cases, args: argparse.Namespace, patients: Optional[Dict[str, str]] = None) -> Tuple[list, list, list]:
    """Patient-level splits (``datasets_scripts.brats_text.make_splits``): train / validation / test.

    A split file (``--split_file``) wins; otherwise ``n_folds = round(1 / eval_fraction)``
    grade-stratified folds, fold ``--fold`` held out as test, and ``--val_fraction`` of the
    training patients as validation (model selection). Deterministic (seed 0), so every run and
    every ablation row sees the same cases.
    """


    if args.split_file is None and args.eval_fraction == 0:
        if args.val_fraction:
            raise ValueError("--eval_fraction 0 (train on every case) leaves no case for --val_fraction; set it to 0.")
        return sorted(cases, key=lambda c: c.case_id), [], []
    n_folds = max(2, int(round(1.0 / args.eval_fraction))) if args.eval_fraction else 2  # folds unused with a split file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if args.split_file is None else "default")
        assignment = make_splits(
            cases, splits=args.split_file, n_folds=n_folds, fold=args.fold, val_fraction=args.val_fraction, seed=0, patient_map=patients or None
        )
    by_id = {c.case_id: c for c in cases}
    pick = lambda *names: [by_id[i] for name in names for i in assignment.get(name, []) if i in by_id]  # noqa: E731
    train, val, test = pick("train"), pick("validation"), pick("test")
    if not test and val:
        test, val = val, []
    if not train or (not test and args.eval_fraction != 0):
        raise ValueError(
            f"The splits {sorted(assignment)} leave no training or no held-out case ({len(cases)} cases); "
            "with --eval_fraction 0 a split file without test cases trains on its training cases only."
        )
    return sorted(train, key=lambda c: c.case_id), sorted(val, key=lambda c: c.case_id), sorted(test, key=lambda c: c.case_id)


def prepare_run_data(args: argparse.Namespace, accelerator) -> RunData:
    """Find the cases (generating demo data if asked), read reports, split, build the demo text tower."""
    data_dirs = [Path(d) for d in args.data_dir] if args.data_dir else [ensure_demo_data(args, accelerator)]
    data_dir = data_dirs[0]
    found = discover_folders(data_dirs, args.release, allow_missing_sequences=args.sequence_presence)
    cases = list(found)
    if not cases:
        raise ValueError(f"{', '.join(map(str, data_dirs))}: no BraTS cases found.")
    # synthetic: every case was generated by the demo generator (--demo without --data_dir, or a demo folder)
    synthetic = bool(args.demo) and all(is_demo_data_folder(d) for d in data_dirs) and not _cases_not_generated(cases, data_dirs)
    if args.demo and not synthetic and not args.allow_demo_on_other_data:
        raise ValueError(
            f"--demo: {_cases_not_generated(cases, data_dirs)} case(s) of {', '.join(map(str, data_dirs))} were not written by "
            "the demo generator; drop --demo for real data, or pass --allow_demo_on_other_data."
        )
    unlabeled = [c.case_id for c in cases if c.label is None]
    if unlabeled and args.task == "segmentation":
        raise ValueError(f"{data_dir}: {len(unlabeled)} case(s) have no label map (e.g. {unlabeled[:3]}); segmentation needs labels.")
    id_mapping = load_id_mapping(args.id_mapping, [str(d) for d in data_dirs], found.releases)
    reports, attached = read_case_reports(cases, args.reports, id_mapping)
    cases = attached.cases  # with the grades the id tables give
    if args.no_text:
        reports = {cid: None for cid in reports}  # image only: reports reach neither the model nor the cache
    train_cases, val_cases, eval_cases = split_run_cases(cases, args, attached.patients)
    if args.max_train_cases:
        train_cases = train_cases[: args.max_train_cases]
    if args.max_eval_cases:
        eval_cases = eval_cases[: args.max_eval_cases]
    text_model = args.text_model
    if args.no_text:
        text_model = None  # no text tower and no tokenizer to load
    elif text_model is None:
        if args.demo:
            text_model = build_demo_text_tower(
                [reports[c.case_id] for c in train_cases if reports.get(c.case_id)],
                Path(args.cache_dir) / f"demo-text-tower-{data_dir.name}",
                accelerator,
                min_reports_per_word=args.vocab_min_reports,
            )
        else:
            text_model = DEFAULT_TEXT_MODEL
    n_reports = len(attached.reports)
    partial = sum(1 for c in cases if c.missing_sequences)
    logger.info(
        f"data: {len(cases)} cases ({found.release}), {n_reports} with a report"
        f"{f' ({attached.reports_via_id_mapping} through the id tables)' if id_mapping is not None else ''}, "
        f"{sum(1 for c in cases if c.grade)} with a grade"
        f"{f' ({attached.grades_via_id_mapping} through the id tables)' if id_mapping is not None else ''}, "
        f"{partial} with missing sequences; "
        f"{len(train_cases)} training / {len(val_cases)} validation / {len(eval_cases)} held-out test"
    )
    release_name = found.release if found.release != "mixed" else "+".join(sorted(set(found.releases.values())))
    return RunData(
        data_dir=data_dir,
        data_dirs=data_dirs,
        patients=attached.patients,
        train_cases=train_cases,
        eval_cases=eval_cases,
        val_cases=val_cases,
        reports=reports,
        synthetic=synthetic,
        release=release_name,
        text_model=None if text_model is None else str(text_model),
        demo_text_tower=bool(args.demo and text_model is not None and args.text_model is None),
        description={
            "name": "EmrFuse synthetic demo data" if synthetic else f"BraTS {release_name}",
            "synthetic": synthetic,
            "release": release_name,
            "num_train_cases": len(train_cases),
            "num_val_cases": len(val_cases),
            "num_eval_cases": len(eval_cases),
            "reports": "synthetic template reports" if synthetic else ("reports file" if args.reports else "per-case report files"),
        },
    )


def report_vocabulary_corpus(texts: Sequence[str], min_reports: int = MIN_REPORTS_PER_WORD) -> Tuple[List[str], Dict[str, int]]:
    """The reports as a vocabulary learner may see them: only words found in at least ``min_reports`` distinct reports.

    Words are what the BERT tokenizer sees (``BertNormalizer`` lower-casing, ``BertPreTokenizer`` splitting on
    spaces and punctuation); every other word is removed from every report. Returns ``(texts, reports per word)``
    (the counts are for the caller's checks; words are never logged).
    """


    normalizer, pre_tokenizer = BertNormalizer(lowercase=True), BertPreTokenizer()
    words = [[w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))] for t in texts]
    reports_per_word = Counter(w for ws in words for w in set(ws))
    kept = [" ".join(w for w in ws if reports_per_word[w] >= min_reports) for ws in words]
    return [t for t in kept if t], dict(reports_per_word)


def build_demo_text_tower(texts: Sequence[str], folder: Path, accelerator, spec: Optional[Dict[str, int]] = None,
                          min_reports_per_word: int = MIN_REPORTS_PER_WORD) -> str:
    """A small BERT (random weights) + a WordPiece tokenizer trained on the training reports.

    Nothing can be downloaded here, so the demo's text tower is built from scratch and saved as
    a local folder; it then goes through the same ``from_text_vision_pretrained`` path as any
    Hub checkpoint. Built once (main process), reused when the reports and sizes are unchanged.

    Privacy: the vocabulary never keeps a word found in fewer than ``min_reports_per_word`` (k, default
    :data:`MIN_REPORTS_PER_WORD` = 5, at least 5) distinct reports. Such words are removed from the reports
    before the WordPiece vocabulary is learned (:func:`report_vocabulary_corpus`), and a token that still
    equals one of them is dropped, so that a patient's rare words (names, places, rare findings) never end
    up in ``vocab.txt`` / ``tokenizer.json``, which are saved with the model and pushed with
    ``--push_to_hub``. With fewer than k reports nothing is learned (every word becomes ``[UNK]``).
    """
    if int(min_reports_per_word) < MIN_REPORTS_PER_WORD:
        raise ValueError(f"min_reports_per_word must be >= {MIN_REPORTS_PER_WORD}, got {min_reports_per_word}.")
    spec = dict(spec or DEMO_TEXT_TOWER)
    key = hashlib.sha256(json.dumps([spec, int(min_reports_per_word), "rare-words-removed", list(texts)]).encode()).hexdigest()[:16]
    marker = folder / "emrfuse_tower.json"
    if accelerator.is_main_process and not (marker.exists() and json.loads(marker.read_text()).get("key") == key):

        if not texts:
            raise ValueError("No training reports to train the demo tokenizer on.")
        corpus, reports_per_word = report_vocabulary_corpus(texts, int(min_reports_per_word))
        n_rare = sum(1 for n in reports_per_word.values() if n < min_reports_per_word)
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        wp = BertWordPieceTokenizer(lowercase=True)
        # min_frequency counts occurrences, not reports: the rare words are already out of the corpus
        wp.train_from_iterator(corpus, vocab_size=spec["vocab_size"], min_frequency=1, show_progress=False, special_tokens=special)
        # a token may still spell a rare word as a piece of frequent ones (e.g. "ring" of "rings"): drop it
        learned = sorted(wp.get_vocab().items(), key=lambda item: item[1])
        tokens = special + [t for t, _ in learned if t not in special
                            and not (len(t) > 1 and 0 < reports_per_word.get(t, 0) < min_reports_per_word)]
        tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True,
                                  model_max_length=spec["max_position_embeddings"])
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec["hidden_size"],
            num_hidden_layers=spec["num_hidden_layers"],
            num_attention_heads=spec["num_attention_heads"],
            intermediate_size=spec["intermediate_size"],
            max_position_embeddings=spec["max_position_embeddings"],
        )
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = BertModel(config, add_pooling_layer=False)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        strict_json.write_json(tmp / "emrfuse_tower.json", {"key": key, **spec, "num_reports": len(texts),
                                                            "min_reports_per_word": int(min_reports_per_word)}, indent=None)
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder)
        logger.info(f"demo text tower: BERT {spec['num_hidden_layers']} layers x {spec['hidden_size']}, WordPiece vocabulary {len(tokenizer)} trained on {len(texts)} reports "
                    f"({n_rare} distinct words found in fewer than {min_reports_per_word} reports left out) -> {folder}")
    accelerator.wait_for_everyone()
    return str(folder)


# =============================================================================================
# checkpoints (atomic) and the best model
# =============================================================================================
def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> List[Path]:
    """Complete checkpoints (folders ``checkpoint-<step>`` holding ``training_state.json``), oldest first.

    Temporary folders of a save that was interrupted are never listed.
    """
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(CHECKPOINT_PREFIX) and d.name[len(CHECKPOINT_PREFIX):].isdigit() and (d / TRAINING_STATE_NAME).is_file():
            found.append((int(d.name[len(CHECKPOINT_PREFIX):]), d))
    return [d for _, d in sorted(found)]


def resolve_checkpoint(resume: Optional[str], output_dir: str | Path) -> Optional[Path]:
    """``--resume_from_checkpoint``: a folder, or ``latest`` (the newest complete one; None if there is none)."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINING_STATE_NAME).is_file():
        raise ValueError(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {TRAINING_STATE_NAME}).")
    return path


def save_checkpoint(accelerator, output_dir: str | Path, state: Dict[str, Any], total_limit: Optional[int] = None) -> Path:
    """Save a resumable checkpoint atomically.

    Every process writes into ``checkpoints/.tmp-checkpoint-<step>`` (``Accelerator.save_state``:
    weights, optimiser, scheduler, scaler, each process's RNG states); the main process adds
    ``training_state.json`` (step, epoch, position in the epoch, best metric) and renames the
    folder to ``checkpoint-<step>`` (an atomic rename on one file system). A run killed at any
    moment leaves either the new complete checkpoint or the previous one; leftovers of an
    interrupted save are removed at the next save. Older checkpoints beyond ``total_limit`` are
    deleted after the new one is in place.
    """
    root = checkpoint_root(output_dir)
    step = int(state["global_step"])
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(f".tmp-{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / TRAINING_STATE_NAME, "w") as fh:
            fh.write(strict_json.dumps(state, indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> Dict[str, Any]:
    """Restore weights, optimiser, scheduler and RNG states; return the saved training state."""
    accelerator.load_state(str(path))
    return json.loads((path / TRAINING_STATE_NAME).read_text())


def save_model_folder(model, processor, folder: Path, card=None) -> None:
    """``save_pretrained`` model + processor (+ model card) into ``folder``.

    Written into a temporary sibling first and moved into place file by file, so that a reader
    never sees a half-written weights file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    if card is not None:
        card.save(tmp / "README.md")
    for item in sorted(tmp.iterdir()):
        target = folder / item.name
        if item.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(item, target)
    shutil.rmtree(tmp, ignore_errors=True)


# =============================================================================================
# model and processor
# =============================================================================================
def build_processor(args: argparse.Namespace, text_model: Optional[str]):
    """Image processor (brain crop, z-score, context slices, sequence presence) + the text tower's
    tokenizer (image-only runs: a placeholder tokenizer built here, see :func:`placeholder_tokenizer`)."""
    image_processor = EmrFuseImageProcessor(context_slices=args.context_slices, sequence_presence=bool(getattr(args, "sequence_presence", False)))
    tokenizer = placeholder_tokenizer() if text_model is None else load_tokenizer(text_model)
    return EmrFuseProcessor(image_processor=image_processor, tokenizer=tokenizer)


def placeholder_tokenizer():
    """The tokenizer of an image-only model: BERT's five special tokens and nothing else.

    An image-only model (``use_text=False``) reads no report, but the processor, the cache and the
    pipeline keep one shape for every model; this tokenizer is built in code (nothing is downloaded),
    saved with the model, and learns nothing from any report.
    """


    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) + "\n", encoding="utf-8")
        return BertTokenizer(vocab_file=str(vocab), do_lower_case=True, model_max_length=16)


def load_tokenizer(name_or_path: str):
    """The text tower's tokenizer. In a saved EmrFuse folder, the class named in its
    ``tokenizer_config.json`` is used directly (``AutoTokenizer`` would ask to run the folder's
    model code just to read the config)."""
    cfg = Path(name_or_path) / "tokenizer_config.json"
    if (Path(name_or_path) / "processor_config.json").is_file() and cfg.is_file():
        cls = getattr(transformers, json.loads(cfg.read_text()).get("tokenizer_class") or "", None)
        if cls is not None:
            return cls.from_pretrained(name_or_path)
    return transformers.AutoTokenizer.from_pretrained(name_or_path)


def model_class(task: str):

    return EmrFuseForSegmentation if task == "segmentation" else EmrFuseForImageClassification


def config_kwargs(args: argparse.Namespace, switches: Dict[str, bool]) -> Dict[str, Any]:
    """Config arguments of a run: the switches plus the sizes the user (or the demo defaults) chose."""
    kwargs: Dict[str, Any] = dict(switches)
    kwargs["context_slices"] = args.context_slices
    kwargs["sequence_presence"] = bool(getattr(args, "sequence_presence", False))
    kwargs["grading_slices"] = (getattr(args, "grading_slices", 32) or None)  # the one grading bag policy
    for name in ("fusion_dim", "decoder_channels", "cross_attention_heads", "align_loss_weight", "ortho_loss_weight"):
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = list(value) if isinstance(value, (list, tuple)) else value
    return kwargs


@dataclass
class WarmStart:
    """The weights a training run starts from: the one warm-start path for both sources.

    - a saved EmrFuse folder (``--init_from``): the run takes the folder's config (with this run's switches),
      its tokenizer and its weights;
    - the previous stage's weights in memory (the demo's grading run starts from the segmentation run).

    Every weight the model shares with the source (towers, fusion head) is loaded; a task head the source
    lacks starts fresh. (``--init_vision_from`` is different: it copies image parts across models whose
    shapes may differ, see :func:`warm_start_image_parts`.)
    """

    source: str  # what the weights are, for the log
    folder: Optional[Path] = None
    state: Optional[Dict[str, torch.Tensor]] = None

    @classmethod
    def from_folder(cls, folder: str | Path) -> "WarmStart":
        return cls(source=str(folder), folder=Path(folder))

    def weights(self) -> Dict[str, torch.Tensor]:
        return self.state if self.state is not None else read_saved_weights(self.folder, "--init_from")

    def apply(self, model, desc: str) -> None:
        try:
            result = model.load_state_dict(self.weights(), strict=False)
        except RuntimeError as exc:  # shapes that differ: another model size
            raise SystemExit(f"train.py: cannot start from {self.source}: its weights do not fit this model ({exc}).") from None
        logger.info(f"{desc}: started from {self.source} ({len(result.missing_keys)} task-head tensors new)")


def read_saved_weights(folder: str | Path, flag: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a saved model folder's ``*.safetensors`` files (shards included)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{flag} {folder}: no *.safetensors weights in this folder.")
    saved: Dict[str, torch.Tensor] = {}
    for f in files:
        saved.update(load_file(str(f)))
    return saved


def build_model(args: argparse.Namespace, run: RunData, task: str, switches: Dict[str, bool],
                config_from: Optional[Path] = None):
    """The task model: from the two pretrained towers, or (``config_from``) with a saved EmrFuse folder's config
    and fresh weights, which :meth:`WarmStart.apply` then fills."""
    cls = model_class(task)
    if config_from is not None:

        config = EmrFuseConfig.from_pretrained(config_from)
        for key, value in switches.items():
            setattr(config, key, value)
        config.grading_slices = args.grading_slices or None  # this run's grading bag policy
        return cls(config)
    model = cls.from_text_vision_pretrained(
        run.text_model, args.vision_model, vision_pretrained=args.vision_pretrained, **config_kwargs(args, switches)
    )
    if getattr(args, "init_vision_from", None):
        copied, widened = warm_start_image_parts(model, args.init_vision_from)
        logger.info(f"warm start from {args.init_vision_from}: {copied} tensors copied ({widened} widened to more input channels)")
    return model


def warm_start_image_parts(model, folder: str | Path) -> Tuple[int, int]:
    """Copy the weights of a saved EmrFuse model into ``model`` where names and shapes match.

    The text tower is never copied (its vocabulary and size may differ). A convolution whose input
    channels grew (e.g. sequence-presence channels added) gets the saved weights on the first
    channels and zeros on the new ones, so it starts as the saved model. Returns ``(copied,
    widened)``; raises ``ValueError`` when nothing matches (not an EmrFuse folder of this kind).
    """
    saved = read_saved_weights(folder, "--init_vision_from")
    own = model.state_dict()
    copied = widened = 0
    with torch.no_grad():
        for name, tensor in own.items():
            if ".text_model." in f".{name}" or name not in saved:
                continue
            src = saved[name]
            if src.shape == tensor.shape:
                tensor.copy_(src)
                copied += 1
            elif src.dim() == 4 and tensor.dim() == 4 and src.shape[0] == tensor.shape[0] and src.shape[2:] == tensor.shape[2:] and src.shape[1] < tensor.shape[1]:
                tensor.zero_()
                tensor[:, : src.shape[1]].copy_(src)
                copied += 1
                widened += 1
    if not copied:
        raise ValueError(f"--init_vision_from {folder}: no weight matches this model's names and shapes.")
    return copied, widened


def optimizer_groups(model, learning_rate: float, weight_decay: float, text_learning_rate: Optional[float] = None):
    """AdamW parameter groups: no weight decay on biases and norms; optional own rate for the text tower."""
    groups: Dict[Tuple[bool, bool], List[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias")
        is_text = text_learning_rate is not None and ".text_model." in f".{name}"
        groups.setdefault((no_decay, is_text), []).append(param)
    out = []
    for (no_decay, is_text), params in groups.items():
        out.append({"params": params, "weight_decay": 0.0 if no_decay else weight_decay, "lr": text_learning_rate if is_text else learning_rate})
    return out


# =============================================================================================
# evaluation on whole volumes
# =============================================================================================
MODEL_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "has_report")


@dataclass
class CaseInputs:
    """One whole case as the model sees it in evaluation (see :func:`case_model_inputs`)."""

    prepared: Any  # the processor's prepared volume (crop, number of slices)
    turn: Any  # the reorientation to BraTS's orientation (``turn.undo`` maps a label map back)
    pixel_values: torch.Tensor  # (N, C, H, W): every slice, or for grading the grading bag policy's slices
    text_inputs: Dict[str, torch.Tensor]  # the model's text keyword arguments (one report)


def case_model_inputs(model, processor, case, report: Optional[str], args, device, task: str) -> CaseInputs:
    """A case's volumes brought to BraTS's orientation (as in training), prepared and sliced, and its report
    tokenised; for grading only the slices of the grading bag policy (``config.grading_slices``), exactly as the
    pipeline pools them."""
    ip = processor.image_processor
    images = {name: to_nifti_image(path) for name, path in case.sequences.items()}
    first = next(iter(images.values()))
    turn = reorientation(first.affine, first.shape)  # the model sees BraTS's orientation, as in training
    images = {name: reoriented_image(img) for name, img in images.items()}
    prepared = ip.prepare_volume(images, allow_missing_sequences=bool(case.missing_sequences))
    text = processor.encode_reports([report], max_length=args.max_report_tokens)
    text_inputs = {k: text[k].to(device) for k in MODEL_TEXT_KEYS if k in text}
    pixel_values = torch.from_numpy(ip.slices(prepared)).to(device)
    if task == "classification":
        keep = grading_slice_indices(prepared.num_slices, getattr(model.config, "grading_slices", None))
        pixel_values = pixel_values[torch.from_numpy(keep).to(device)]
    return CaseInputs(prepared, turn, pixel_values, text_inputs)


def evaluate_case(model, processor, case, report: Optional[str], args, device, task: str) -> Tuple[Dict[str, Any], Optional[np.ndarray]]:
    """One held-out case: slices -> model -> label map on the original grid -> 3D metrics.

    Returns the per-case row (id, grade, metrics / grade probabilities, timing) and the fused case
    embedding (``case_embeds``) for the embedding plot.
    """
    t0 = time.perf_counter()
    ip = processor.image_processor
    inputs = case_model_inputs(model, processor, case, report, args, device, task)
    prepared, turn, text_inputs = inputs.prepared, inputs.turn, inputs.text_inputs
    row: Dict[str, Any] = {
        "case_id": case.case_id, "grade": case.grade, "has_report": bool(text_inputs["has_report"][0]),
        "num_slices": prepared.num_slices, "missing_sequences": ",".join(case.missing_sequences),
    }
    # one forward for the whole case: the model runs the image tower in chunks of config.slice_chunk_size
    # without gradients and encodes the report once; case_embeds pools the case's slices (grading: the
    # slices of the grading bag policy, config.grading_slices, exactly as the pipeline pools them)
    pixel_values = inputs.pixel_values
    out = model(pixel_values=pixel_values, slice_to_case=torch.zeros(pixel_values.shape[0], dtype=torch.long, device=device),
                **text_inputs)
    logits = out.logits.float().cpu()
    embedding = out.case_embeds[0].float().cpu().numpy() if getattr(out, "case_embeds", None) is not None else None
    if task == "segmentation":
        label_map = turn.undo(ip.post_process_segmentation(logits.numpy(), prepared.crop, label_convention=case.label_convention))
        ref = read_volume(case.label)  # scored on the files' own grid
        result = score_label_maps(label_map, np.asarray(ref.array), pred_convention=case.label_convention, spacing=ref.spacing)
        row.update(metrics_to_row(result))
    else:
        probs = torch.softmax(logits[0], dim=-1).numpy()
        labels = [model.config.id2label[i] for i in range(len(probs))]
        row["pred_grade"] = labels[int(np.argmax(probs))]
        for label, p in zip(labels, probs):
            row[f"prob_{label}"] = float(p)
    row["seconds"] = time.perf_counter() - t0
    return row, embedding


@torch.no_grad()
def evaluate(args, accelerator, model, processor, cases, reports, task: str, step: int) -> Tuple[List[Dict[str, Any]], Dict[str, Any], Optional[np.ndarray]]:
    """Evaluate every held-out case exactly once (cases dealt round-robin to the processes), gather.

    Returns the per-case rows (sorted by case id), the summary (segmentation: mean / std / median
    per region and metric; grading: accuracy, balanced accuracy, ROC AUC, F1, confusion matrix)
    and the case embeddings in row order.
    """


    t0 = time.perf_counter()
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    mine = cases[accelerator.process_index :: accelerator.num_processes]
    local = []
    with accelerator.autocast():
        for case in mine:
            row, emb = evaluate_case(net, processor, case, reports.get(case.case_id), args, accelerator.device, task)
            local.append((row, None if emb is None else emb.tolist()))
    gathered = gather_object(local) if accelerator.num_processes > 1 else local
    net.train(was_training)
    seen, rows, embeds = set(), [], []
    for row, emb in sorted(gathered, key=lambda item: item[0]["case_id"]):
        if row["case_id"] in seen:  # cannot happen (each case is dealt once); guard against padding anyway
            continue
        seen.add(row["case_id"])
        rows.append(row)
        embeds.append(emb)
    summary: Dict[str, Any] = {"task": task, "step": step, "num_cases": len(rows), "eval_seconds": round(time.perf_counter() - t0, 2)}
    if task == "segmentation":
        summary["segmentation"] = summarize_segmentation(rows)
    graded = [r for r in rows if r.get("grade") in net.config.label2id and "pred_grade" in r]
    if graded:
        labels = [net.config.id2label[i] for i in range(net.config.num_labels)]
        summary["grade_labels"] = labels
        summary["num_graded_cases"] = len(graded)
        y_prob = np.array([[r[f"prob_{label}"] for label in labels] for r in graded])
        summary["grading"] = classification_metrics([r["grade"] for r in graded], y_prob, labels=labels)
    emb_array = np.asarray(embeds, dtype=np.float32) if embeds and all(e is not None for e in embeds) else None
    return rows, summary, emb_array


def sync_buffers(model, accelerator) -> None:
    """Give every process the main process's buffers (BatchNorm running statistics).

    DDP synchronises gradients (hence parameters) but each process updates its BatchNorm
    statistics with its own batches; DDP re-broadcasts them only at the next forward. Before an
    evaluation (and before the best weights are kept) every process must hold the weights that
    the main process saves.
    """
    if accelerator.num_processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def selection_metric(summary: Dict[str, Any], task: str) -> float:
    """Model selection: mean Dice over WT/TC/ET (segmentation) or balanced accuracy (grading)."""
    if task == "segmentation":
        return float(summary["segmentation"]["mean"]["dice"]["mean"])
    return float(summary.get("grading", {}).get("balanced_accuracy", float("nan")))


def eval_log_line(summary: Dict[str, Any], task: str, step: int, max_steps: int, split: str = "") -> str:
    """One clean line per evaluation."""
    parts = [f"eval step {step}/{max_steps}", f"{summary['num_cases']} {split + ' ' if split else ''}cases"]
    if task == "segmentation":
        seg = summary["segmentation"]
        parts.append("Dice " + " ".join(f"{r} {seg[r]['dice']['mean']:.3f}" for r in REGIONS) + f" (mean {seg['mean']['dice']['mean']:.3f})")
        parts.append("HD95 " + " ".join(f"{r} {seg[r]['hd95']['mean']:.1f}" for r in REGIONS) + " mm")
        et = seg["ET"]  # the ET mean counts ET-absent cases predicted empty as Dice 1: show what it hides
        present = f"{et['dice_present']['mean']:.3f}" if et["present_cases"] else "n/a"
        parts.append(f"ET Dice {present} over {et['present_cases']} ET-present, {et['false_positive_cases']}/{et['absent_cases']} ET-absent with ET predicted")
    if summary.get("grading"):
        gr = summary["grading"]
        parts.append(f"grade acc {gr['accuracy']:.3f} bal-acc {gr['balanced_accuracy']:.3f} AUC {gr['roc_auc']:.3f}")
    parts.append(f"{summary['eval_seconds']:.1f} s")
    return " | ".join(parts)


# =============================================================================================
# training data
# =============================================================================================
def build_train_loader(args: argparse.Namespace, run: RunData, processor, seed: int, batch_size: int, accelerator,
                       balance_grades: bool = False, grading_bag: bool = False):
    """Slice cache -> :class:`~datasets_scripts.slice_cache.SliceDataset` -> DataLoader (not yet prepared).

    Every item depends only on ``(seed, epoch, index)`` (the dataset draws the case, the slice and
    the augmentation from its own generator), and the sampler is sequential: a run resumed at
    step ``k`` of an epoch (first ``k`` batches skipped) sees exactly the batches of the
    uninterrupted run, whatever the number of workers. Consecutive groups of ``slices_per_case``
    items share one case, so a batch holds ``batch_size / slices_per_case`` cases, each report
    encoded once; for grading, those slices are the case's bag (pooled per case by the model).
    No mirror flips by default (``--flip_axes``): a left-right flip would contradict the side that
    the report names (and an anterior-posterior one the lobe), and every ablation row must see
    the same augmentation. ``balance_grades`` (grading runs, ``--grading_sampling balanced``): each grade is
    drawn equally often. ``grading_bag`` (grading runs): slices are drawn among the positions the grading bag
    policy (``--grading_slices``, stored as ``config.grading_slices``) pools in evaluation and inference.
    """
    with accelerator.main_process_first():  # the main process builds the cache, the others then find it up to date
        cached = build_cache(
            run.train_cases, Path(args.cache_dir) / "slices", processor.image_processor, processor.tokenizer,
            max_length=args.max_report_tokens, reports=run.reports, progress=accelerator.is_local_main_process,
            allow_missing_sequences=args.sequence_presence,
        )
    dataset = SliceDataset(
        cached,
        image_size=args.image_size,
        context_slices=args.context_slices,
        train=True,
        samples_per_epoch=args.samples_per_epoch,
        tumour_prob=args.tumour_prob,
        slices_per_case=args.slices_per_case,
        augment=not args.no_augmentation,
        flip_axes=tuple(args.flip_axes),
        seed=seed,
        sequence_dropout=args.sequence_dropout,
        presence_channels=args.sequence_presence,
        balance_grades=balance_grades,
        grading_bag=grading_bag,
        grading_slices=args.grading_slices or None,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_slices,
        num_workers=args.num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),  # workers' base seeds: never drawn from the global RNG
    )
    return loader, dataset


def batch_to_inputs(batch: Dict[str, Any], task: str) -> Dict[str, Any]:
    """A collated batch -> the model's keyword arguments (labels by task; case ids and text never passed on)."""
    inputs = {k: batch[k] for k in ("pixel_values", "slice_to_case", "input_ids", "attention_mask", "token_type_ids", "has_report") if k in batch}
    inputs["labels"] = batch["labels"] if task == "segmentation" else batch["grade_labels"]
    return inputs


# =============================================================================================
# one training run
# =============================================================================================
def _tracker_config(args: argparse.Namespace, extra: Dict[str, Any]) -> Dict[str, Any]:
    cfg = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}  # never log the token
    cfg.update({k: v for k, v in extra.items() if isinstance(v, (int, float, str, bool))})
    return cfg


@dataclass
class BestModel:
    """Model selection: the best evaluation of a run so far and the weights (CPU copies) that made it."""

    metric: Optional[float] = None
    step: Optional[int] = None
    summary: Optional[Dict[str, Any]] = None
    rows: Optional[List[Dict[str, Any]]] = None
    embeds: Optional[np.ndarray] = None
    state: Optional[Dict[str, torch.Tensor]] = None

    def is_better(self, metric: float) -> bool:
        """The first evaluation of this process always wins (weights are needed, also after a resume); later ones
        when their metric is higher (a NaN metric never beats a number)."""
        return self.state is None or self.metric is None or (metric == metric and metric > self.metric)

    def keep(self, metric, step, summary, rows, embeds, net) -> None:
        self.metric, self.step, self.summary, self.rows, self.embeds = metric, step, summary, rows, embeds
        self.state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


@dataclass
class SelectionEvaluation:
    """Where and how :func:`evaluate_and_select` evaluates during training."""

    cases: list  # the validation cases, or the held-out cases when there is no validation split
    split: str  # "validation" or "test"
    output_dir: Path
    save_best: bool  # keep the best model on disk as training goes (validation split only)
    use_trackers: bool
    log: Any  # prints a line above the progress bar


def evaluate_and_select(args, accelerator, model, processor, run: RunData, task: str, step: int, max_steps: int,
                        selection: SelectionEvaluation, best: BestModel) -> float:
    """Evaluate on the selection cases, log the result (line, trackers, ``eval_history.jsonl``) and keep the model
    in ``best`` when it is better (:meth:`BestModel.is_better`). Returns the seconds it took."""
    t_eval = time.perf_counter()
    net = accelerator.unwrap_model(model)
    sync_buffers(net, accelerator)
    rows, summary, embeds = evaluate(args, accelerator, model, processor, selection.cases, run.reports, task, step)
    summary["split"] = selection.split
    metric = selection_metric(summary, task)
    if accelerator.is_main_process:
        selection.log(eval_log_line(summary, task, step, max_steps, selection.split))
    if selection.use_trackers and accelerator.trackers:
        accelerator.log(_summary_scalars(summary, task), step=step)
    if accelerator.is_main_process:
        selection.output_dir.mkdir(parents=True, exist_ok=True)
        with (selection.output_dir / "eval_history.jsonl").open("a") as fh:
            fh.write(strict_json.dumps({"step": step, "split": selection.split, "metric": metric, "summary": summary}, default=float) + "\n")
    if best.is_better(metric):
        best.keep(metric, step, summary, rows, embeds, net)
        if selection.save_best and accelerator.is_main_process:
            save_model_folder(net, processor, selection.output_dir)
    accelerator.wait_for_everyone()
    return time.perf_counter() - t_eval


def stage_schedule(args: argparse.Namespace, stage: str) -> Tuple[Optional[int], float]:
    """``(max_steps, learning_rate)`` of a training stage: ``"main"`` (--max_steps / --learning_rate; max_steps
    None means --num_epochs) or ``"grading"``, the demo's grading run after segmentation (--grading_max_steps /
    --grading_learning_rate)."""
    if stage == "main":
        return args.max_steps, args.learning_rate
    if stage == "grading":
        return args.grading_max_steps, args.grading_learning_rate
    raise ValueError(f"unknown training stage {stage!r}")


class TrainingStopped(Exception):
    """Raised by ``--stop_after_steps`` (a deliberate interruption, e.g. to test resuming)."""


def make_optimizer(model, args: argparse.Namespace, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW over :func:`optimizer_groups` (fused kernel where available: one call for all parameters, markedly
    faster on CPU)."""
    groups = optimizer_groups(model, learning_rate, args.weight_decay, args.text_learning_rate)
    try:
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups)


def training_length(args: argparse.Namespace, max_steps: Optional[int], batches_per_epoch: int, accum: int) -> Tuple[int, int]:
    """``(max_steps, num_epochs)``: from the stage's ``max_steps`` when set, else from ``--num_epochs``."""
    updates_per_epoch = max(1, math.ceil(batches_per_epoch / accum))
    if max_steps:
        return max_steps, math.ceil(max_steps / updates_per_epoch)
    return args.num_epochs * updates_per_epoch, args.num_epochs


def start_or_resume(accelerator, resume: Optional[str], output_dir: Path, task: str, desc: str) -> Dict[str, Any]:
    """The loop's state: fresh (step 0; the evaluation history starts afresh), or from the checkpoint ``resume``
    names (a folder or ``latest``; model, optimizer, scheduler and RNG states are restored by accelerate)."""
    state: Dict[str, Any] = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "best_metric": None, "best_step": None, "task": task}
    checkpoint = resolve_checkpoint(resume, output_dir)
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        if state.get("task", task) != task:
            raise ValueError(f"{checkpoint}: a {state.get('task')} checkpoint cannot resume a {task} run.")
        logger.info(f"{desc}: resumed from {checkpoint} (step {state['global_step']}, epoch {state['epoch']}, batch {state['batches_in_epoch']})")
        return state
    if resume:
        logger.info(f"{desc}: no checkpoint in {checkpoint_root(output_dir)}; starting from step 0")
    if accelerator.is_main_process:
        (output_dir / "eval_history.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh history
    return state


# ---------------------------------------------------------------------------------------------
# the grading head on frozen towers (--grading_fit head)
# ---------------------------------------------------------------------------------------------
@dataclass
class CaseTowerFeatures:
    """What the frozen towers compute for one training case (its grading slices and its report)."""

    case_id: str
    label: int
    gap: Optional[torch.Tensor]  # (N, d_I) pooled last feature map per grading slice (CPU)
    input_ids: Optional[torch.Tensor]  # (L,) the tokenised report
    attention_mask: Optional[torch.Tensor]  # (L,)
    has_report: bool
    text_hidden: Optional[torch.Tensor]  # (L, d_T) the text tower's last hidden state (CPU)


@torch.no_grad()
def training_tower_features(args, accelerator, net, processor, run: RunData, desc: str) -> List[CaseTowerFeatures]:
    """The towers' features of every graded training case, computed once without augmentation (each process
    computes its share, every process gets all of them, in case-id order)."""
    label2id = net.config.label2id
    cases = [c for c in run.train_cases if c.grade in label2id]
    if not cases:
        raise SystemExit("train.py: grading needs training cases with a grade; none of the training cases has one.")
    net.eval()
    device = accelerator.device
    local = []
    mine = cases[accelerator.process_index :: accelerator.num_processes]
    for case in tqdm(mine, desc=f"{desc}: tower features", disable=not accelerator.is_local_main_process, dynamic_ncols=True):
        inputs = case_model_inputs(net, processor, case, run.reports.get(case.case_id), args, device, "classification")
        t = inputs.text_inputs
        has_report = bool(t["has_report"][0]) if "has_report" in t else False
        gap, hidden = net.emrfuse.tower_features(inputs.pixel_values, t.get("input_ids") if has_report else None,
                                                 t.get("attention_mask"), t.get("token_type_ids"))
        local.append(CaseTowerFeatures(
            case_id=case.case_id, label=int(label2id[case.grade]),
            gap=None if gap is None else gap.float().cpu(),
            input_ids=t["input_ids"][0].cpu() if "input_ids" in t else None,
            attention_mask=t["attention_mask"][0].cpu() if "attention_mask" in t else None,
            has_report=has_report, text_hidden=None if hidden is None else hidden[0].float().cpu(),
        ))
    gathered = gather_object(local) if accelerator.num_processes > 1 else local
    return sorted({f.case_id: f for f in gathered}.values(), key=lambda f: f.case_id)


def _pad(rows: List[Optional[torch.Tensor]], length: int, fill=0) -> torch.Tensor:
    ref = next(r for r in rows if r is not None)
    out = torch.full((len(rows), length, *ref.shape[1:]), fill, dtype=ref.dtype)
    for k, r in enumerate(rows):
        if r is not None:
            out[k, : r.shape[0]] = r
    return out


def tower_feature_batch(feats: List[CaseTowerFeatures], device) -> Dict[str, Any]:
    """Keyword arguments of :meth:`EmrFuseForImageClassification.forward_from_tower_features` for a group of cases."""
    batch: Dict[str, Any] = {"num_cases": len(feats)}
    if feats[0].gap is not None:
        batch["gap"] = torch.cat([f.gap for f in feats]).to(device)
        batch["slice_to_case"] = torch.cat([torch.full((f.gap.shape[0],), k, dtype=torch.long) for k, f in enumerate(feats)]).to(device)
    else:
        batch["gap"], batch["slice_to_case"] = None, None
    if feats[0].input_ids is not None:
        length = max(f.input_ids.shape[0] for f in feats)
        batch["input_ids"] = _pad([f.input_ids for f in feats], length).to(device)
        batch["attention_mask"] = _pad([f.attention_mask for f in feats], length).to(device)
        batch["has_report"] = torch.tensor([f.has_report for f in feats], device=device)
        if any(f.text_hidden is not None for f in feats):
            batch["text_hidden"] = _pad([f.text_hidden for f in feats], length).to(device)
    return batch


def fit_grading_head(args, accelerator, net, feats: List[CaseTowerFeatures], max_steps: int, learning_rate: float,
                     seed: int, desc: str) -> int:
    """Fit everything after the towers (self-attention, case pooling, fusion, classifier) on the towers' frozen
    features of every training case: full-batch AdamW steps, cosine schedule with warm-up. Each step's loss is
    the cross-entropy over all cases (each grade weighted equally with ``--grading_sampling balanced``) plus the
    auxiliary losses averaged over groups of ``batch_size / slices_per_case`` cases, the size they act on in
    segmentation training (L_align compares the cases of one group). Returns the number of steps."""
    towers = [m for m in (net.emrfuse.vision_model, net.emrfuse.text_model) if m is not None]
    trainable = {p: p.requires_grad for tower in towers for p in tower.parameters()}
    for tower in towers:
        tower.requires_grad_(False)
    net.train()
    for tower in towers:
        tower.eval()  # frozen: no dropout, batch norm keeps its statistics (the towers do not run here anyway)
    device = accelerator.device
    labels = torch.tensor([f.label for f in feats], device=device)
    counts = torch.bincount(labels, minlength=net.config.num_labels).float()
    if args.grading_sampling == "balanced":
        weights = torch.where(counts > 0, labels.numel() / (counts.clamp(min=1) * int((counts > 0).sum())), counts)
    else:
        weights = torch.ones_like(counts)
    group = max(1, args.batch_size // args.slices_per_case)
    optimizer = make_optimizer(net, args, learning_rate)
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=min(args.warmup_steps, max_steps // 2),
                              num_training_steps=max_steps)
    generator = torch.Generator().manual_seed(int(seed))
    progress = tqdm(total=max_steps, desc=desc, disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    for step in range(1, max_steps + 1):
        order = torch.randperm(len(feats), generator=generator).tolist()  # new groups for the auxiliary losses
        groups = [order[k : k + group] for k in range(0, len(order), group)]
        loss_cls = torch.zeros((), device=device)
        aux_terms = []
        for idx in groups:
            out = net.forward_from_tower_features(**tower_feature_batch([feats[k] for k in idx], device))
            y = labels[idx]
            loss_cls = loss_cls + (F.cross_entropy(out.logits.float(), y, reduction="none") * weights[y]).sum()
            aux = net.emrfuse.weighted_auxiliary_loss(out.loss_align, out.loss_ortho)
            if aux is not None:
                aux_terms.append(aux)
        loss = loss_cls / len(feats) + (torch.stack(aux_terms).mean() if aux_terms else 0.0)
        loss.backward()
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update(1)
        if step % args.logging_steps == 0 or step == max_steps:
            progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    progress.close()
    for p, flag in trainable.items():  # the towers as they were
        p.requires_grad_(flag)
    return max_steps


TOWER_PREFIXES = ("emrfuse.vision_model.", "emrfuse.text_model.")


def _head_state(net) -> Dict[str, torch.Tensor]:
    """A copy of every weight after the towers (what :func:`fit_grading_head` trains)."""
    return {k: v.detach().clone() for k, v in net.state_dict().items() if not k.startswith(TOWER_PREFIXES)}


def grading_folds(labels: Sequence[int], folds: int, seed: int) -> List[List[int]]:
    """Stratified folds of case indices: each grade's cases shuffled (seeded) and dealt out in turn, so every fold
    holds about the same share of each grade."""
    generator = torch.Generator().manual_seed(int(seed))
    out: List[List[int]] = [[] for _ in range(folds)]
    dealt = 0
    for label in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == label]
        for j in torch.randperm(len(idx), generator=generator).tolist():
            out[dealt % folds].append(idx[j])
            dealt += 1
    return [sorted(f) for f in out]


@torch.no_grad()
def head_logits(net, feats: List[CaseTowerFeatures], device) -> torch.Tensor:
    """(N, num_labels) logits of cases from their tower features, one case at a time as evaluation grades them."""
    net.eval()
    return torch.cat([net.forward_from_tower_features(**tower_feature_batch([f], device)).logits.float().cpu() for f in feats])


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature ``T`` that minimises the log loss of ``softmax(logits / T)`` (temperature scaling, Guo et al.
    2017), searched on a grid of 1001 log-spaced values from 0.05 to 50 (steps of 0.7 %). Dividing logits by a positive
    ``T`` leaves every argmax, so every predicted grade, as it was."""
    grid = torch.logspace(math.log10(0.05), math.log10(50.0), 1001, dtype=torch.float64)
    logits, labels = logits.double(), labels.long()
    nll = torch.stack([F.cross_entropy(logits / t, labels) for t in grid])
    return float(grid[int(torch.argmin(nll))])


def calibrate_grading_head(args, accelerator, net, feats: List[CaseTowerFeatures], initial: Dict[str, torch.Tensor],
                           max_steps: int, learning_rate: float, seed: int, desc: str) -> Optional[Dict[str, Any]]:
    """Temperature scaling of the fitted grading head without a validation split: ``--grading_calibration_folds`` K
    heads are fitted from ``initial`` as the final head was, each without one stratified fold of the training cases,
    and grade that fold. The temperature that best fits these out-of-fold logits divides the final head's logits
    (its classifier weights are scaled by ``1 / T``): the grades, accuracy and AUC stay as they were, the probabilities
    get the confidence that held-out cases support. Returns ``{"temperature", "folds", "out_of_fold_log_loss"
    (before, after)}``, or None when there are too few cases of a grade for K folds."""
    folds = int(args.grading_calibration_folds)
    labels = [f.label for f in feats]
    counts = Counter(labels)
    if folds < 2:
        return None
    if len(counts) < 2 or min(counts.values()) < folds:
        logger.warning(f"{desc}: grade probabilities left uncalibrated: {folds}-fold cross-fitting needs at least {folds} "
                       f"training cases of every grade, there are {dict(sorted(counts.items()))} (by grade id).")
        return None
    fitted = _head_state(net)
    oof = torch.zeros(len(feats), net.config.num_labels)
    device = torch.device(accelerator.device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # the random state stays as the final fit left it
        for k, held in enumerate(grading_folds(labels, folds, seed)):
            net.load_state_dict(initial, strict=False)
            held_set = set(held)
            rest = [f for i, f in enumerate(feats) if i not in held_set]
            fit_grading_head(args, accelerator, net, rest, max_steps, learning_rate, seed, f"{desc}: calibration fold {k + 1}/{folds}")
            oof[held] = head_logits(net, [feats[i] for i in held], device)
    net.load_state_dict(fitted, strict=False)
    y = torch.tensor(labels)
    temperature = fit_temperature(oof, y)
    with torch.no_grad():
        net.classifier.weight.div_(temperature)
        net.classifier.bias.div_(temperature)
    before, after = F.cross_entropy(oof.double(), y).item(), F.cross_entropy(oof.double() / temperature, y).item()
    logger.info(f"{desc}: grade probabilities temperature-scaled, T = {temperature:.3g} (out-of-fold log loss of the "
                f"training cases {before:.3f} -> {after:.3f}, {folds} folds)")
    return {"temperature": round(temperature, 4), "folds": folds,
            "out_of_fold_log_loss": [round(before, 4), round(after, 4)]}


def train_grading_head(args, accelerator, run: RunData, *, output_dir: Path, switches: Dict[str, bool], seed: int,
                       warm_start: WarmStart, save_model: bool, desc: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The demo's grading run with ``--grading_fit head``: the towers of the warm start stay frozen, the grading head
    is fitted on their features (:func:`fit_grading_head`), then evaluated and saved like every other run. It takes
    seconds, so it writes no resumable checkpoints: a resumed demo run resumes segmentation and fits the head anew."""
    output_dir = Path(output_dir)
    max_steps, learning_rate = stage_schedule(args, "grading")
    set_seed(seed)
    processor = build_processor(args, str(warm_start.folder) if warm_start.folder else run.text_model)
    model = build_model(args, run, "classification", switches, config_from=warm_start.folder)
    warm_start.apply(model, desc)
    model.to(accelerator.device)
    t_train = time.perf_counter()
    feats = training_tower_features(args, accelerator, model, processor, run, desc)
    logger.info(f"{desc}: grading head fitted on the frozen towers' features of {len(feats)} training cases, "
                f"{max_steps} full-batch steps")
    initial = _head_state(model)
    steps = fit_grading_head(args, accelerator, model, feats, max_steps, learning_rate, seed, desc)
    calibration = calibrate_grading_head(args, accelerator, model, feats, initial, max_steps, learning_rate, seed, desc)
    train_seconds = time.perf_counter() - t_train
    if accelerator.is_main_process:
        (output_dir / "eval_history.jsonl").unlink(missing_ok=True)
    best = BestModel()
    select_cases = run.val_cases or run.eval_cases
    if select_cases:
        selection = SelectionEvaluation(cases=select_cases, split="validation" if run.val_cases else "test", output_dir=output_dir,
                                        save_best=False, use_trackers=False, log=accelerator.print)
        evaluate_and_select(args, accelerator, model, processor, run, "classification", steps, max_steps, selection, best)
    else:
        best.keep(None, steps, {"task": "classification", "step": steps, "num_cases": 0, "split": "none"}, [], None, model)
    rows, summary, embeds = score_best_model(args, accelerator, model, processor, run, "classification", best, max_steps)
    summary.update(best_step=best.step, train_seconds=round(train_seconds, 1), steps=steps, output_dir=str(output_dir),
                   grading_fit="head", calibration=calibration)
    if accelerator.is_main_process:
        write_run_outputs(args, run, model, processor, output_dir, "classification", rows, summary, embeds, switches, seed,
                          max_steps, learning_rate, save_model)
    accelerator.wait_for_everyone()
    return summary, best.state


def train_one(
    args: argparse.Namespace,
    accelerator,
    run: RunData,
    *,
    task: str,
    output_dir: Path,
    switches: Dict[str, bool],
    seed: int,
    stage: str = "main",
    warm_start: Optional[WarmStart] = None,
    save_model: bool = True,
    use_trackers: bool = True,
    resume: Optional[str] = None,
    desc: str = "train",
) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Train one model, select the best by validation, evaluate it on the held-out test cases.

    Evaluations during training (every ``--eval_steps`` and at the end) run on the validation
    cases, or on the held-out cases when there is no validation split (the demo evaluates only
    at the end, so its held-out numbers are not used for any choice). The best model (mean Dice
    for segmentation, balanced accuracy for grading) is kept; at the end it is evaluated on the
    held-out cases and, when ``save_model``, saved with ``save_pretrained`` (+ processor, model
    card, evaluation report) into ``output_dir``. Resumable checkpoints go to
    ``output_dir/checkpoints``. ``stage`` picks the schedule (:func:`stage_schedule`), ``warm_start``
    the initial weights. Returns the final summary and the best weights (CPU tensors).
    """
    if stage == "grading" and task == "classification" and args.grading_fit == "head" and warm_start is not None:
        return train_grading_head(args, accelerator, run, output_dir=output_dir, switches=switches, seed=seed,
                                  warm_start=warm_start, save_model=save_model, desc=desc)
    output_dir = Path(output_dir)
    max_steps, learning_rate = stage_schedule(args, stage)
    set_seed(seed)
    folder = warm_start.folder if warm_start is not None else None
    processor = build_processor(args, str(folder) if folder else run.text_model)  # a saved EmrFuse folder holds its tokenizer
    model = build_model(args, run, task, switches, config_from=folder)
    if warm_start is not None:
        warm_start.apply(model, desc)
    model.train()
    grading = task == "classification"
    train_loader, _ = build_train_loader(args, run, processor, seed, args.batch_size, accelerator,
                                         balance_grades=grading and args.grading_sampling == "balanced", grading_bag=grading)
    optimizer = make_optimizer(model, args, learning_rate)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    accum = accelerator.gradient_accumulation_steps
    max_steps, num_epochs = training_length(args, max_steps, len(train_loader), accum)
    scheduler = accelerator.prepare(get_scheduler(
        args.lr_scheduler, optimizer,
        num_warmup_steps=min(args.warmup_steps, max_steps // 2) * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    ))
    state = start_or_resume(accelerator, resume, output_dir, task, desc)

    if use_trackers and not accelerator.trackers and args.report_to != "none":
        accelerator.init_trackers("emrfuse", config=_tracker_config(args, {"task": task, "max_steps": max_steps, "switches": str(switches)}))

    net = accelerator.unwrap_model(model)
    select_cases = run.val_cases or run.eval_cases
    select_split = "validation" if run.val_cases else "test"
    logger.info(
        f"{desc}: {len(run.train_cases)} training cases, {len(train_loader)} batches/epoch/process of {args.batch_size} slices ({args.batch_size // args.slices_per_case} cases), "
        f"{accelerator.num_processes} process(es), accumulation {accum}, {max_steps} steps, "
        f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, "
        f"parts: {'+'.join(k[4:] for k, v in switches.items() if v) or 'image only'}"
    )
    global_step = int(state["global_step"])
    best = BestModel(metric=state["best_metric"], step=state["best_step"])  # a resumed run keeps its best metric
    progress = tqdm(total=max_steps, initial=global_step, desc=desc, disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    running_loss = torch.zeros((), device=accelerator.device)
    running_n = 0
    t_train = time.perf_counter()
    slices_seen = 0
    data_wait = 0.0
    eval_seconds = 0.0
    selection = SelectionEvaluation(cases=select_cases, split=select_split, output_dir=output_dir,
                                    save_best=save_model and bool(run.val_cases), use_trackers=use_trackers, log=progress.write)

    done = global_step >= max_steps
    for epoch in range(int(state["epoch"]), num_epochs):
        if done:
            break
        train_loader.set_epoch(epoch)
        skip = int(state["batches_in_epoch"]) if epoch == int(state["epoch"]) else 0
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        batches_in_epoch = skip
        t_wait = time.perf_counter()
        for batch in loader:
            data_wait += time.perf_counter() - t_wait
            with accelerator.accumulate(model):
                outputs = model(**batch_to_inputs(batch, task))
                loss = outputs.loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            batches_in_epoch += 1
            slices_seen += int(batch["pixel_values"].shape[0])
            running_loss += loss.detach().float()
            running_n += 1
            if accelerator.sync_gradients:
                global_step += 1
                progress.update(1)
                end_of_epoch = batches_in_epoch >= len(train_loader)
                state.update(global_step=global_step, epoch=epoch + 1 if end_of_epoch else epoch, batches_in_epoch=0 if end_of_epoch else batches_in_epoch)
                if global_step % args.logging_steps == 0 or global_step == max_steps:
                    mean_loss = accelerator.reduce(running_loss / max(running_n, 1), reduction="mean").item()
                    running_loss.zero_()
                    running_n = 0
                    progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                    if use_trackers and accelerator.trackers:
                        accelerator.log({"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0]}, step=global_step)
                if select_cases and (global_step >= max_steps or (args.eval_steps and global_step % args.eval_steps == 0)):
                    eval_seconds += evaluate_and_select(args, accelerator, model, processor, run, task, global_step, max_steps,
                                                        selection, best)
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    state.update(best_metric=best.metric, best_step=best.step)
                    save_checkpoint(accelerator, output_dir, dict(state), args.checkpoints_total_limit)
                if global_step >= max_steps:
                    done = True
                    break
                if args.stop_after_steps and global_step >= args.stop_after_steps:
                    progress.close()
                    logger.info(f"{desc}: stopped after step {global_step} (--stop_after_steps)")
                    accelerator.wait_for_everyone()
                    raise TrainingStopped(global_step)
            t_wait = time.perf_counter()
    progress.close()
    train_seconds = time.perf_counter() - t_train - eval_seconds
    if not select_cases:  # trained on every case: nothing to evaluate, the last weights are the model
        best.keep(None, global_step, {"task": task, "step": global_step, "num_cases": 0, "split": "none"}, [], None, net)
    elif best.state is None:  # resumed from a checkpoint taken after the last step
        evaluate_and_select(args, accelerator, model, processor, run, task, global_step, max_steps, selection, best)

    rows, summary, embeds = score_best_model(args, accelerator, model, processor, run, task, best, max_steps)
    summary.update(
        best_step=best.step,
        train_seconds=round(train_seconds, 1),
        data_wait_share=round(data_wait / max(train_seconds, 1e-9), 3),
        train_slices_per_second=round(slices_seen * accelerator.num_processes / max(train_seconds, 1e-9), 2),
        steps=global_step,
        output_dir=str(output_dir),
    )
    if accelerator.is_main_process:
        write_run_outputs(args, run, net, processor, output_dir, task, rows, summary, embeds, switches, seed, max_steps, learning_rate, save_model)
    accelerator.wait_for_everyone()
    best_state = best.state
    accelerator.free_memory()
    return summary, best_state


def score_best_model(args, accelerator, model, processor, run: RunData, task: str, best: BestModel, max_steps: int):
    """Load the selected weights and give ``(rows, summary, embeddings)`` on the held-out test cases: a fresh
    evaluation when a validation split chose the model, else the selection evaluation itself (which ran on the
    test cases at the last step and chose nothing)."""
    accelerator.unwrap_model(model).load_state_dict(best.state)
    if not run.val_cases:
        return best.rows, best.summary, best.embeds
    rows, summary, embeds = evaluate(args, accelerator, model, processor, run.eval_cases, run.reports, task, best.step)
    summary["split"] = "test"
    summary["validation"] = {"metric": best.metric, "num_cases": len(run.val_cases)}
    accelerator.print(eval_log_line(summary, task, best.step, max_steps, "test (best model)"))
    return rows, summary, embeds


def write_run_outputs(args, run: RunData, net, processor, output_dir: Path, task: str, rows, summary, embeds, switches, seed, max_steps, learning_rate, save_model: bool) -> None:
    """Evaluation report (per-case CSV, summary JSON, markdown, figures) and, if asked, the model folder + card."""
    if rows:
        write_evaluation_report(output_dir / "eval", rows, summary, embeddings=embeds, embedding_grades=[r.get("grade") for r in rows])
    if not save_model:
        return
    card = build_model_card(
        task=task,
        model_name=args.hub_model_id or output_dir.name,
        summary=summary,
        results_markdown=format_results_markdown(summary) if rows else NO_EVALUATION_NOTE,
        training_config=training_config_for_card(_card_config(args, task, max_steps, learning_rate, switches, seed)),
        data=run.description,
        text_model=run.text_model if not run.demo_text_tower else (
            "a 2-layer BERT with a WordPiece vocabulary trained on the " + ("demo reports" if run.synthetic else "training reports")
            + f" (words of at least {args.vocab_min_reports} distinct reports)"),
        vision_model=args.vision_model,
        repo_id=args.hub_model_id,
        train_command="python train.py " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("train.py") else None,
    )
    save_model_folder(net, processor, output_dir, card=card)


def _summary_scalars(summary: Dict[str, Any], task: str) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for region, metrics in (summary.get("segmentation") or {}).items():
        for metric, stats in metrics.items():  # statistics ({"mean", ...}) or case counts (ints)
            out[f"eval/{region}_{metric}"] = float(stats["mean"] if isinstance(stats, dict) else stats)
    for key in ("accuracy", "balanced_accuracy", "roc_auc", "f1", "log_loss", "brier"):
        if key in (summary.get("grading") or {}):
            out[f"eval/grade_{key}"] = float(summary["grading"][key])
    return out


def _card_config(args, task: str, max_steps: int, learning_rate: float, switches: Dict[str, bool], seed: int) -> Dict[str, Any]:
    cfg = {
        "task": task,
        "vision_model": args.vision_model,
        "vision_pretrained": args.vision_pretrained,
        "context_slices": args.context_slices,
        "image_size": args.image_size or "whole slice",
        "fusion_dim": args.fusion_dim,
        "max_steps": max_steps,
        "batch_size": args.batch_size,
        "learning_rate": learning_rate,
        "lr_scheduler": args.lr_scheduler,
        "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay,
        "augmentation": not args.no_augmentation,
        "tumour_prob": args.tumour_prob,
        "slices_per_case": args.slices_per_case,
        "seed": seed,
    }
    if task == "classification" and getattr(args, "grading_after_segmentation", False):
        cfg["grading_fit"] = args.grading_fit  # head: frozen towers, full-batch steps (batch_size, augmentation unused)
        if args.grading_fit == "head":
            cfg["grading_calibration_folds"] = args.grading_calibration_folds
    cfg.update(switches)
    return cfg


# =============================================================================================
# the demo's two runs, ablations, push to the Hub
# =============================================================================================
def train_with_grading(args, accelerator, run: RunData, *, output_dir: Path, switches, seed: int, save_model=True, use_trackers=True, resume=None, desc="") -> Dict[str, Any]:
    """Segmentation, then (demo default) a short grading run that starts from the segmentation weights.

    The grading model (``<output_dir>/grading``) shares the towers and the fusion head with the
    segmentation model and adds the paper's case-level classification head (F19-F21); a short
    run suffices because the shared parts are already trained. The returned summary holds the
    segmentation metrics and the grading metrics.
    """
    seg, seg_state = train_one(
        args, accelerator, run, task="segmentation", output_dir=output_dir, switches=switches, seed=seed,
        save_model=save_model, use_trackers=use_trackers, resume=resume, desc=f"{desc}segmentation",
    )
    if not args.grading_after_segmentation:
        return seg
    cls_summary, _ = train_one(
        args, accelerator, run, task="classification", output_dir=Path(output_dir) / GRADING_SUBFOLDER, switches=switches, seed=seed,
        stage="grading", warm_start=WarmStart(source="the segmentation run's weights", state=seg_state),
        save_model=save_model, use_trackers=False, resume=resume, desc=f"{desc}grading",
    )
    merged = dict(seg)
    for key in ("grading", "grade_labels", "num_graded_cases"):
        merged[key] = cls_summary.get(key)
    merged["grading_run"] = {k: cls_summary.get(k) for k in ("output_dir", "train_seconds", "steps", "best_step", "calibration")}
    return merged


def shuffled_reports_run(run: RunData, seed: int = 0) -> RunData:
    """The run's data with every case's report swapped with another case's of the same split (a derangement)."""
    splits = [[c.case_id for c in cases] for cases in (run.train_cases, run.val_cases, run.eval_cases)]
    return dataclass_replace(run, reports=derange_reports(run.reports, splits, seed=seed, patients=run.patients))


def run_ablation(args: argparse.Namespace, accelerator, run: RunData) -> Dict[str, Any]:
    """Train + evaluate every row of the paper's Table 1 or Table 3 (same data, seeds, budget).

    Writes ``<output_dir>/ablation-<table>/<table>.md`` (paper format, mean ± 95 % confidence interval
    over seeds, and each row's paired per-case difference to the complete model with its bootstrap
    interval), ``<table>.png`` (bar chart) and ``<table>.json`` (every run's numbers, per-seed grading
    accuracies, intervals, differences); each run's evaluation report goes to
    ``<output_dir>/ablation-<table>/<preset>-seed<seed>/eval``.
    """
    table_rows = TABLE1_ROWS if args.ablation == "table1" else TABLE3_ROWS
    out_dir = Path(args.output_dir) / f"ablation-{args.ablation}"
    # the tables report grades (accuracy), which calibrating the probabilities leaves as they are, and the runs keep
    # no model: the cross-fitting would only cost time
    args = argparse.Namespace(**{**vars(args), "grading_calibration_folds": 0})
    rows = []
    t0 = time.perf_counter()
    for preset, label in list(table_rows) + [SHUFFLED_REPORTS_ROW]:
        # the paper's row names its tower; name the one this run really used
        label = label.replace("(ResNet-50)", f"({args.vision_model})")
        row_run, switches = run, ABLATION_PRESETS.get(preset)
        if preset == SHUFFLED_REPORTS_ROW[0]:
            row_run, switches = shuffled_reports_run(run), ABLATION_PRESETS[SHUFFLED_REPORTS_PRESET]
        runs, per_case = [], []
        for seed in args.ablation_seeds:
            run_dir = out_dir / f"{preset}-seed{seed}"
            summary = train_with_grading(
                args, accelerator, row_run, output_dir=run_dir, switches=dict(switches), seed=seed,
                save_model=False, use_trackers=False, desc=f"{preset} seed {seed}: ",
            )
            runs.append(row_numbers(summary))
            per_case.append(case_values(run_dir))  # for the paired differences to the complete model
            accelerator.print(f"ablation {args.ablation} | {label} | seed {seed} | " + ", ".join(f"{k} {v:.3f}" for k, v in runs[-1].items()))
        rows.append((preset, label, runs, per_case))
    caption = (
        f"{TABLE_TITLES[args.ablation]} on {'SYNTHETIC DEMO DATA' if run.synthetic else run.description['name']}: "
        f"{len(run.train_cases)} training / {len(run.eval_cases)} held-out cases, {args.max_steps or args.num_epochs} "
        f"{'steps' if args.max_steps else 'epochs'} per run, seeds {args.ablation_seeds}, vision {args.vision_model}. "
        "Parts of each row: " + "; ".join(
            f"{label.replace('(ResNet-50)', f'({args.vision_model})')}: "
            f"{preset_parts(SHUFFLED_REPORTS_PRESET if preset == SHUFFLED_REPORTS_ROW[0] else preset)}"
            + (", reports shuffled across cases" if preset == SHUFFLED_REPORTS_ROW[0] else "")
            for preset, label in list(table_rows) + [SHUFFLED_REPORTS_ROW]
        ) + "."
    )
    result = {"table": args.ablation, "markdown": format_ablation_table(args.ablation, rows, caption=caption), "seconds": round(time.perf_counter() - t0, 1)}
    if accelerator.is_main_process:
        paths = write_ablation_report(out_dir, args.ablation, rows, caption=caption, extra={"command": "python train.py " + " ".join(sys.argv[1:]), "seconds": result["seconds"]})
        result.update({k: str(v) for k, v in paths.items()})
        accelerator.print(result["markdown"])
        accelerator.print(f"ablation table: {paths['markdown']}  chart: {paths['chart']}")
    return result


def push_folder_to_hub(folder: Path, repo_id: str, token: Optional[str] = None, private: bool = False, commit_message: str = "Upload EmrFuse model") -> str:
    """Upload a saved model folder (weights, config, code, processor, model card, evaluation report).

    Checkpoints, tracker logs and temporary folders stay local.
    """
    api = huggingface_hub.HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
        ignore_patterns=["checkpoints/**", "logs/**", ".tmp*", ".tmp*/**", "eval_history.jsonl", "ablation-*/**",
                         *(f"{GRADING_SUBFOLDER}/{p}" for p in ("checkpoints/**", "logs/**", ".tmp*", ".tmp*/**", "eval_history.jsonl"))],
    )
    return repo_id


# =============================================================================================
# main
# =============================================================================================
def make_accelerator(args: argparse.Namespace):
    """The ``Accelerator``: mixed precision and accumulation from the flags or the accelerate config."""
    report_to = args.report_to
    if report_to == "auto":
        try:
            import tensorboard  # noqa: F401

            report_to = "tensorboard"
        except ImportError:
            report_to = "none"
    args.report_to = report_to
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs"))
    return Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps or 1,
        log_with=None if report_to == "none" else report_to,
        project_config=project,
        # switched-off parts / cases without a report leave parameters without gradient in a step
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def setup_logging(accelerator) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    for noisy in ("httpx", "urllib3", "filelock", "PIL", "matplotlib", "timm", "huggingface_hub", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run what the arguments ask for and return its summary (also printed)."""
    args = parse_args(argv)
    try:
        limit_torch_threads(args.threads)
    except ValueError as exc:
        raise SystemExit(f"train.py: error: --threads: {exc}") from None
    accelerator = make_accelerator(args)
    setup_logging(accelerator)
    t0 = time.perf_counter()
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    run = prepare_run_data(args, accelerator)
    if args.eval_steps and not run.val_cases:  # e.g. a --split_file without validation cases
        raise SystemExit(SELECTION_NEEDS_VALIDATION)

    if args.ablation:
        result = run_ablation(args, accelerator, run)
        accelerator.end_training()
        return result

    switches = model_switches(args)
    try:
        summary = _train_main(args, accelerator, run, output_dir, switches)
    except TrainingStopped as stop:
        accelerator.end_training()
        return {"stopped_at_step": stop.args[0]}
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    report_main(args, accelerator, run, output_dir, summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _train_main(args, accelerator, run: RunData, output_dir: Path, switches: Dict[str, bool]) -> Dict[str, Any]:
    common = dict(output_dir=output_dir, switches=switches, seed=args.seed, resume=args.resume_from_checkpoint)
    if args.grading_after_segmentation:
        summary = train_with_grading(args, accelerator, run, **common)
    else:
        warm_start = WarmStart.from_folder(args.init_from) if args.init_from else None
        summary, _ = train_one(args, accelerator, run, task=args.task, warm_start=warm_start, desc=args.task, **common)
    return summary


def report_main(args, accelerator, run: RunData, output_dir: Path, summary: Dict[str, Any]) -> None:
    """Print the results table, write ``eval/run_summary.json``, push to the Hub if asked (main process)."""
    if accelerator.is_main_process:
        (output_dir / "eval").mkdir(parents=True, exist_ok=True)
        strict_json.write_json(output_dir / "eval" / "run_summary.json", summary, indent=2, default=float)
        label = "SYNTHETIC demo data" if run.synthetic else run.description["name"]
        accelerator.print(f"\nResults on {len(run.eval_cases)} held-out cases ({label}); model: {output_dir}\n")
        accelerator.print(format_results_markdown(summary) if run.eval_cases else NO_EVALUATION_NOTE)
        accelerator.print(
            f"\ntraining {summary.get('train_seconds')} s ({summary.get('train_slices_per_second')} slices/s), "
            f"total {summary['total_seconds']} s"
        )
        make_pipeline_ready(args, output_dir)
        if args.push_to_hub:
            pushed = push_folder_to_hub(output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private)
            accelerator.print(f"pushed {output_dir} to https://huggingface.co/{pushed}")


def make_pipeline_ready(args, output_dir: Path) -> None:
    """Make the saved model folder one self-contained unit for ``transformers.pipeline``, the CLI and the Space.

    Adds the ``glioma-analysis`` pipeline to the folder's config and code files and, after the demo's
    two runs, names the grading model (saved in ``<output_dir>/grading``) in the root config, so that
    one folder or Hub repo serves segmentation and grading.
    """
    if not (output_dir / "config.json").exists():
        return  # no model was saved (e.g. save disabled)
    grading = output_dir / GRADING_SUBFOLDER
    with_grading = args.grading_after_segmentation and (grading / "config.json").exists()
    add_pipeline_to_folder(output_dir, grading_model=grading if with_grading else None)


if __name__ == "__main__":
    main()
