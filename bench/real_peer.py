"""The peer of the real-data check: MONAI's SegResNet, trained the way MONAI's BraTS tutorial trains it, on the
same cases, folds and CPU time as EmrFuse, so each EmrFuse figure stands next to what a user would try instead.

MONAI's ``brats_segmentation_3d`` tutorial: ``SegResNet(blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1),
init_filters=16, in_channels=4, out_channels=3, dropout_prob=0.2)``, three sigmoid region channels, ``DiceLoss(
sigmoid=True, smooth_nr=0, smooth_dr=1e-5, squared_pred=True)``, random 224 x 224 x 144 crops, flips along each
axis, random intensity scale (0.1) and shift (0.1), Adam (1e-4, weight decay 1e-5) with a cosine schedule over 300
epochs of 388 cases on a GPU, sliding-window inference with overlap 0.5. Scaled to minutes on a CPU
(:class:`PeerSettings`): 8 initial filters, 96^3 patches centred on tumour or brain voxels half of the time each
(``RandCropByPosNegLabeld``; uniform crops rarely hold tumour in a few hundred steps), a learning rate of 1e-3, and
a cosine schedule over the wall-clock budget instead of epochs.

Both models see the same preprocessing: each case is read with :func:`~modeling_emrfuse.brats_io.load_case`,
turned to BraTS's orientation, z-scored over the brain and cropped to it by
:func:`~modeling_emrfuse.pipeline_emrfuse.prepare_case` (missing sequences zero-filled); the labels become the
three nested regions by :func:`~modeling_emrfuse.brats_labels.label_map_to_regions` in each case's own label
convention. A prediction goes back to the case's own grid (uncrop, reorient), becomes a label map in the case's
convention with the pipeline's background mask, and is scored like an EmrFuse held-out case (``case_row`` of
``modeling_emrfuse.training.evaluation``): the rows have the same columns.

The training budget is wall-clock seconds of optimiser steps only (reading and preprocessing the cases goes to a
cache under ``cache_dir`` that all folds share, as EmrFuse's slice cache is shared). A run is single-process and
uses the allowed cores (``modeling_emrfuse.runtime.cpu_threads``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from modeling_emrfuse.brats_io import GeometryWarning, load_case, read_label_map, read_volume, reorientation
from modeling_emrfuse.brats_labels import REGIONS, get_label_convention, label_map_to_regions, regions_to_label_map
from modeling_emrfuse.evaluation.grading_control import FEATURE, enhancing_fraction
from modeling_emrfuse.evaluation.metrics import metrics_to_row, score_label_maps
from modeling_emrfuse.pipeline_emrfuse import prepare_case
from modeling_emrfuse.processing_emrfuse import EmrFuseImageProcessor
from modeling_emrfuse.runtime.cpu_threads import limit_torch_threads

PEER = "segresnet"
"""The recipe name of the peer's rows (next to EmrFuse's recipes in bench_real's tables)."""
CACHE_VERSION = 1
WEIGHTS = "segresnet.safetensors"
ROWS = "rows.json"
TRAINED = ".peer_trained.json"


@dataclass
class PeerSettings:
    """MONAI's BraTS tutorial settings, scaled to a CPU budget of minutes (tutorial values in the comments)."""

    init_filters: int = 8  # 16
    patch: Tuple[int, int, int] = (96, 96, 96)  # random 224 x 224 x 144 crops
    sampling: str = "posneg"  # "uniform" is the tutorial's RandSpatialCropd
    batch_size: int = 1  # 1
    learning_rate: float = 1e-3  # 1e-4 over ~100k steps; a budget of hundreds of steps needs a larger step
    weight_decay: float = 1e-5  # 1e-5
    dropout_prob: float = 0.2  # 0.2
    overlap: float = 0.5  # sliding-window overlap at inference, 0.5 (the tutorial's window is 240 x 240 x 160)
    threshold: float = 0.5  # sigmoid > 0.5, as the tutorial's AsDiscrete(threshold=0.5)
    seed: int = 0
    threads: Optional[int] = None  # None: the cores allowed (cpu_threads.default_num_threads)

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def image_processor() -> EmrFuseImageProcessor:
    """The project's image processor (z-score over the brain, crop to the brain's box) without the in-plane
    padding that 2D slices need: the peer cuts 3D patches."""
    return EmrFuseImageProcessor(size_divisor=1)


def build_segresnet(settings: PeerSettings) -> torch.nn.Module:
    """SegResNet as in MONAI's BraTS tutorial (blocks 1-2-2-4 down, 1-1-1 up, 4 sequences in, 3 regions out; group
    norm with 8 groups, fewer when there are fewer initial filters)."""
    from monai.networks.nets import SegResNet

    return SegResNet(
        blocks_down=(1, 2, 2, 4),
        blocks_up=(1, 1, 1),
        init_filters=settings.init_filters,
        in_channels=4,
        out_channels=len(REGIONS),
        dropout_prob=settings.dropout_prob,
        norm=("GROUP", {"num_groups": min(8, settings.init_filters)}),
    )


# ----------------------------------------------------------------------------------------------
# the cases: preprocessed once, cached for every fold
# ----------------------------------------------------------------------------------------------
def region_targets(label_map: np.ndarray, convention: str, where: str = "label map") -> np.ndarray:
    """The peer's targets: ``uint8 (3, X, Y, Z)`` WT / TC / ET masks of a label map in its own convention
    (values outside the convention are an error naming ``where``)."""
    return label_map_to_regions(np.asarray(label_map), convention, where=where).astype(np.uint8)


def _read_case(case, processor: EmrFuseImageProcessor):
    """``(loaded case, prepared case)``: read as the pipeline reads it, prepared by :func:`prepare_case`."""
    missing = bool(case.missing_sequences)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeometryWarning)  # the header's geometry was checked when discovered
        loaded = load_case(case, allow_missing_sequences=missing)
    try:
        ready = prepare_case(loaded, processor, allow_missing_sequences=missing)
    except ValueError as exc:
        raise ValueError(f"case {case.case_id}: {exc}") from exc
    return loaded, ready


def _file_stamp(path: Path) -> List[Any]:
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def _cache_key(case, processor: EmrFuseImageProcessor) -> str:
    what = {
        "version": CACHE_VERSION,
        "files": {name: _file_stamp(path) for name, path in case.files()},
        "label_convention": case.label_convention,
        "processor": {k: v for k, v in processor.to_dict().items() if k != "processor_class"},
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _safe_name(case_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in case_id)


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def prepared_training_case(case, cache_dir: Path, processor: Optional[EmrFuseImageProcessor] = None):
    """A labelled case as the peer trains on it: ``(image float16 (4, H, W, D), regions uint8 (3, H, W, D))``
    on the brain's box in BraTS's orientation. Built once and kept under ``cache_dir/<case>``; rebuilt when the
    case's files (size, modification time), label convention or the preprocessing change."""
    processor = processor or image_processor()
    if case.label is None:
        raise ValueError(f"case {case.case_id}: no label map, so it cannot be a training case of the peer.")
    folder = Path(cache_dir) / _safe_name(case.case_id)
    key = _cache_key(case, processor)
    meta_file = folder / "meta.json"
    try:
        if json.loads(meta_file.read_text())["key"] == key:
            return np.load(folder / "image.npy"), np.load(folder / "regions.npy")
    except (OSError, ValueError, KeyError):
        pass
    _, ready = _read_case(case, processor)
    label, label_affine, _ = read_label_map(case.label)
    label = reorientation(label_affine, label.shape).apply(label)  # the label by its own header, as the slice cache
    if label.shape != ready.oriented_shape:
        raise ValueError(
            f"case {case.case_id}: label map {case.label} has shape {label.shape} in BraTS's orientation, the images "
            f"{ready.oriented_shape}."
        )
    convention = case.label_convention or "brats2017"
    regions = region_targets(label, convention, where=f"case {case.case_id} label map ({case.label})")
    regions = processor.crop_label_map(regions, ready.prepared.crop)
    image = ready.prepared.volume.astype(np.float16)
    if not np.isfinite(image).all():
        raise ValueError(f"case {case.case_id}: normalised intensities overflow float16 (|z| > 65504).")
    folder.mkdir(parents=True, exist_ok=True)
    _save_npy(folder / "image.npy", image)
    _save_npy(folder / "regions.npy", np.ascontiguousarray(regions))
    meta_file.write_text(json.dumps({"key": key, "case_id": case.case_id, "shape": list(image.shape)}))
    return image, regions


def _training_item(image: np.ndarray, regions: np.ndarray, patch: Sequence[int]) -> Dict[str, Any]:
    """One case ready for patch sampling: padded with background to at least the patch size, with the
    indices of tumour (any region) and of tumour-free brain voxels for tumour/brain-centred crops."""
    pad = [(0, 0)] + [(0, max(0, int(p) - s)) for p, s in zip(patch, image.shape[1:])]
    if any(after for _, after in pad):
        image, regions = np.pad(image, pad), np.pad(regions, pad)
    tumour = regions.any(axis=0)
    brain = np.any(image != 0, axis=0) & ~tumour
    return {
        "image": image,
        "label": regions,
        "fg": np.flatnonzero(tumour),
        "bg": np.flatnonzero(brain if brain.any() else ~tumour),
    }


def _patch_transform(settings: PeerSettings):
    """The tutorial's training transforms after loading (crop, flips on three axes, intensity scale and shift);
    normalisation is the project's, done before the cache."""
    from monai.transforms import (
        CastToTyped,
        Compose,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSpatialCropd,
    )

    keys = ["image", "label"]
    if settings.sampling == "posneg":
        crop = RandCropByPosNegLabeld(
            keys,
            label_key="label",
            spatial_size=settings.patch,
            pos=1,
            neg=1,
            num_samples=1,
            fg_indices_key="fg",
            bg_indices_key="bg",
            allow_smaller=False,
        )
    elif settings.sampling == "uniform":
        crop = RandSpatialCropd(keys, roi_size=settings.patch, random_size=False)
    else:
        raise ValueError(f"sampling must be 'posneg' or 'uniform', got {settings.sampling!r}.")
    transform = Compose(
        [
            crop,
            CastToTyped(keys, dtype=(np.float32, np.float32)),
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys, prob=0.5, spatial_axis=2),
            RandScaleIntensityd("image", factors=0.1, prob=1.0),
            RandShiftIntensityd("image", offsets=0.1, prob=1.0),
        ]
    )
    transform.set_random_state(seed=settings.seed)
    return transform


def _batch(items: List[Dict[str, Any]], transform, rng: np.random.Generator, size: int):
    images, labels = [], []
    for _ in range(size):
        item = items[int(rng.integers(len(items)))]
        out = transform({k: item[k] for k in ("image", "label", "fg", "bg")})
        out = out[0] if isinstance(out, list) else out
        images.append(torch.as_tensor(out["image"]))
        labels.append(torch.as_tensor(out["label"]))
    return torch.stack(images), torch.stack(labels)


# ----------------------------------------------------------------------------------------------
# training for a wall-clock budget
# ----------------------------------------------------------------------------------------------
def train_segresnet(
    cases: Sequence[Any],
    budget_s: float,
    cache_dir: Path,
    settings: Optional[PeerSettings] = None,
    log: Optional[Callable[[str], None]] = None,
) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Train SegResNet on the labelled ``cases`` (discovered ``CaseFiles``) for ``budget_s`` seconds of optimiser
    steps: a step starts only while the elapsed time is under the budget, so training ends within the budget plus
    one step. The learning rate follows a cosine over the budget's seconds. Returns the model (eval mode) and
    ``{"steps", "seconds", "max_step_seconds", "threads", "preprocess_seconds", "losses"}``."""
    from monai.data import get_track_meta, set_track_meta
    from monai.losses import DiceLoss

    settings = settings or PeerSettings()
    if not budget_s > 0:
        raise ValueError(f"the training budget must be positive seconds, got {budget_s!r}.")
    if not cases:
        raise ValueError("no training case for the peer.")
    t_prep = time.perf_counter()
    processor = image_processor()
    items = [_training_item(*prepared_training_case(c, cache_dir, processor), settings.patch) for c in cases]
    preprocess_seconds = time.perf_counter() - t_prep

    previous_threads, previous_meta = torch.get_num_threads(), get_track_meta()
    threads = limit_torch_threads(settings.threads)
    set_track_meta(False)  # plain tensors: no metadata bookkeeping per patch
    try:
        torch.manual_seed(settings.seed)
        rng = np.random.default_rng(settings.seed)
        transform = _patch_transform(settings)
        model = build_segresnet(settings).train()
        loss_fn = DiceLoss(sigmoid=True, smooth_nr=0, smooth_dr=1e-5, squared_pred=True, to_onehot_y=False)
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
        losses: List[float] = []
        steps, max_step = 0, 0.0
        t0 = time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < budget_s:
            t_step = time.perf_counter()
            for group in optimizer.param_groups:  # cosine over the budget (CosineAnnealingLR over time, not epochs)
                group["lr"] = settings.learning_rate * 0.5 * (1.0 + math.cos(math.pi * elapsed / budget_s))
            image, label = _batch(items, transform, rng, settings.batch_size)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(image), label)
            loss.backward()
            optimizer.step()
            steps += 1
            losses.append(float(loss.detach()))
            max_step = max(max_step, time.perf_counter() - t_step)
            if log is not None and steps % 50 == 0:
                log(f"    segresnet step {steps}, {elapsed / 60:.1f} min, Dice loss {np.mean(losses[-50:]):.3f}")
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous_threads)
        set_track_meta(previous_meta)
    stats = {
        "steps": steps,
        "seconds": round(seconds, 2),
        "budget_seconds": round(float(budget_s), 2),
        "max_step_seconds": round(max_step, 3),
        "threads": threads,
        "preprocess_seconds": round(preprocess_seconds, 2),
        "losses": [round(v, 4) for v in losses],
    }
    return model.eval(), stats


# ----------------------------------------------------------------------------------------------
# held-out cases: a label map on the case's own grid, scored as EmrFuse's
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_label_map(model: torch.nn.Module, case, settings: Optional[PeerSettings] = None):
    """One case (``CaseFiles``) -> ``(uint8 label map on the case's own grid, its label convention, slices)``:
    sliding-window inference on the brain's box, regions thresholded, uncropped, turned back to the case's
    orientation, painted in the case's convention (:func:`regions_to_label_map`) with the pipeline's background
    mask (no tumour where every given sequence is 0)."""
    from monai.inferers import sliding_window_inference

    settings = settings or PeerSettings()
    processor = image_processor()
    loaded, ready = _read_case(case, processor)
    x = torch.from_numpy(np.ascontiguousarray(ready.prepared.volume, dtype=np.float32))[None]
    was_training = model.training
    model.eval()
    try:
        logits = sliding_window_inference(
            x, roi_size=settings.patch, sw_batch_size=1, predictor=model, overlap=settings.overlap
        )
    finally:
        model.train(was_training)
    regions = torch.sigmoid(torch.as_tensor(logits))[0].numpy() > settings.threshold  # (3, H, W, D)
    regions = processor.uncrop(regions, ready.prepared.crop, fill=False)  # BraTS's orientation
    regions = np.stack([ready.reorientation.undo(r) for r in regions])  # the case's own grid
    background = np.ones(loaded.shape, dtype=bool)
    for volume in loaded.volumes.values():
        background &= volume == 0
    regions &= ~background
    convention = get_label_convention(case.label_convention or "brats2017").name
    return regions_to_label_map(regions, convention), convention, ready.prepared.crop.num_slices


def score_case(case, label_map: np.ndarray, convention: str) -> Dict[str, Any]:
    """Metrics of a predicted label map against the case's own, as ``case_row`` scores EmrFuse's."""
    ref = read_volume(case.label)
    scores = score_label_maps(label_map, np.asarray(ref.array), pred_convention=convention, spacing=ref.spacing)
    row = metrics_to_row(scores)
    row[FEATURE] = enhancing_fraction(label_map, convention)
    return row


def evaluate_segresnet(model: torch.nn.Module, cases: Sequence[Any], settings: Optional[PeerSettings] = None):
    """Per-case rows (``case_id``, ``grade``, ``missing_sequences``, ``num_slices``, ``<region>_<metric>``...,
    ``seconds``) of the held-out ``cases``, sorted by case id."""
    settings = settings or PeerSettings()
    previous = torch.get_num_threads()
    threads = limit_torch_threads(settings.threads)
    rows = []
    try:
        for case in sorted(cases, key=lambda c: c.case_id):
            t0 = time.perf_counter()
            label_map, convention, slices = predict_label_map(model, case, settings)
            row: Dict[str, Any] = {
                "case_id": case.case_id,
                "grade": case.grade,
                "missing_sequences": ",".join(case.missing_sequences),
                "num_slices": slices,
            }
            row.update(score_case(case, label_map, convention))
            row["seconds"] = round(time.perf_counter() - t0, 2)
            row["threads"] = threads
            rows.append(row)
    finally:
        torch.set_num_threads(previous)
    return rows


# ----------------------------------------------------------------------------------------------
# one fold, reused when it already ran with the same cases, budget and settings
# ----------------------------------------------------------------------------------------------
def run_fold(
    train_cases: Sequence[Any],
    test_cases: Sequence[Any],
    budget_s: float,
    run_dir: Path,
    cache_dir: Path,
    settings: Optional[PeerSettings] = None,
    log: Callable[[str], None] = print,
) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Train the peer on ``train_cases`` for ``budget_s`` seconds, evaluate it on ``test_cases``; returns
    ``(rows, stats)``. ``run_dir`` keeps the weights (``segresnet.safetensors``), the training record and the
    rows: a fold that already finished with the same cases, budget and settings is reused, one that stopped
    after training is only evaluated."""
    from safetensors.torch import load_file, save_file

    settings = settings or PeerSettings()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = json.dumps(
        {
            "train": sorted(c.case_id for c in train_cases),
            "test": sorted(c.case_id for c in test_cases),
            "budget_s": round(float(budget_s), 1),
            "settings": settings.to_dict(),
        },
        sort_keys=True,
    )
    rows_file, trained_file = run_dir / ROWS, run_dir / TRAINED
    try:
        done = json.loads(rows_file.read_text())
        if done["key"] == key:
            log(f"  segresnet: reused ({done['stats']['steps']} steps in {done['stats']['seconds'] / 60:.1f} min)")
            return done["rows"], done["stats"]
    except (OSError, ValueError, KeyError):
        pass
    stats = None
    try:
        trained = json.loads(trained_file.read_text())
        if trained["key"] == key and (run_dir / WEIGHTS).is_file():
            model = build_segresnet(settings)
            model.load_state_dict(load_file(str(run_dir / WEIGHTS)))
            stats = trained["stats"]
            log(f"  segresnet: trained weights reused ({stats['steps']} steps); evaluating")
    except (OSError, ValueError, KeyError):
        pass
    if stats is None:
        log(f"  segresnet: training on {len(train_cases)} cases for {budget_s / 60:.1f} min")
        model, stats = train_segresnet(train_cases, budget_s, cache_dir, settings, log=log)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / WEIGHTS))
        trained_file.write_text(json.dumps({"key": key, "stats": stats}))
    t0 = time.perf_counter()
    rows = _finite_or_none(evaluate_segresnet(model, test_cases, settings))
    stats = dict(stats, eval_seconds=round(time.perf_counter() - t0, 2))
    tmp = rows_file.with_name(f".{rows_file.name}.tmp")
    tmp.write_text(json.dumps({"key": key, "stats": stats, "rows": rows}, allow_nan=False))
    os.replace(tmp, rows_file)
    log(
        f"  segresnet: {stats['steps']} steps in {stats['seconds'] / 60:.1f} min; Dice "
        + " ".join(f"{r} {np.nanmean([_num(row, f'{r}_dice') for row in rows]):.3f}" for r in REGIONS)
    )
    return rows, stats


def _num(row: Dict[str, Any], key: str) -> float:
    value = row.get(key)
    return float("nan") if value is None else float(value)


def _finite_or_none(obj: Any) -> Any:
    """JSON-safe rows: NaN / inf (HD95 of an empty region) as null, read back as NaN by the tables."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# bench_real.py: the peer in its cross-validation
# ----------------------------------------------------------------------------------------------
def fold_budget_seconds(peer_minutes: Optional[float], timings: Dict[str, float], fold: int, recipes) -> float:
    """The peer's training budget for ``fold``: ``peer_minutes`` when given, else the wall time of the fold's
    first EmrFuse run (``timings["cv-fold<k>-<recipe>"]``, which includes that run's start-up, cache and
    held-out evaluation: the peer gets all of it for optimiser steps)."""
    if peer_minutes:
        return float(peer_minutes) * 60.0
    for recipe in recipes:
        seconds = timings.get(f"cv-fold{fold}-{recipe}")
        if seconds:
            return float(seconds)
    raise SystemExit(
        f"bench_real: fold {fold + 1} has no EmrFuse run whose wall time the peer could match; give --peer_minutes."
    )


def cv_fold(
    args, out: Path, cases: Sequence[Any], split: Dict[str, List[str]], fold: int, recipes, timings: Dict[str, float]
) -> List[Dict[str, Any]]:
    """The peer on one fold of bench_real's cross-validation: trained on ``split["train"]`` for the fold's
    budget (:func:`fold_budget_seconds`), evaluated on ``split["test"]``; its run under
    ``OUTPUT_DIR/runs/cv-fold<k>-segresnet`` (reused when finished), its cache under ``OUTPUT_DIR/peer-cache``
    (shared by the folds). Returns the rows (with ``fold``); its training time goes to ``timings``."""
    by_id = {c.case_id: c for c in cases}
    budget = fold_budget_seconds(args.peer_minutes, timings, fold, recipes)
    rows, stats = run_fold(
        [by_id[c] for c in split["train"]],
        [by_id[c] for c in split["test"]],
        budget,
        out / "runs" / f"cv-fold{fold}-{PEER}",
        out / "peer-cache",
        PeerSettings(seed=args.seed),
        log=lambda line: print(line, flush=True),
    )
    timings[f"cv-fold{fold}-{PEER}"] = float(stats["seconds"])
    return [dict(row, fold=fold + 1) for row in rows]


def describe(settings: Optional[PeerSettings] = None) -> str:
    """One line for bench_real's results: what the peer is and how it was trained."""
    s = settings or PeerSettings()
    return (
        f"`{PEER}`: MONAI SegResNet (blocks 1-2-2-4 / 1-1-1, {s.init_filters} initial filters, sigmoid WT/TC/ET, "
        f"Dice loss as MONAI's BraTS tutorial), {'x'.join(map(str, s.patch))} patches ({s.sampling} sampling), "
        f"flips and intensity scale/shift, Adam {s.learning_rate:g} with a cosine over the budget, trained on the same "
        "folds for the same wall time as the fold's first EmrFuse run (or --peer_minutes), the project's "
        f"preprocessing; sliding-window inference (overlap {s.overlap}), scored on the native grid like EmrFuse."
    )
