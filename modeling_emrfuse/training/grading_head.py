"""The grading head on frozen towers (``--grading_fit head``): tower features of every training case computed once,
full-batch fits of everything after the towers, temperature scaling from cross-fitted heads."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..pipeline_emrfuse import pipeline_for_model
from .model_setup import WarmStart, build_model, build_processor, make_optimizer
from .outputs import write_run_outputs
from .selection import BestModel, SelectionEvaluation, evaluate_and_select, score_best_model
from .settings import OptimizerSettings, TrainingSettings

logger = logging.getLogger("emrfuse.train")


@dataclass(frozen=True)
class HeadFitSettings:
    """How the grading head is fitted on tower features and calibrated."""

    optimizer: OptimizerSettings
    grading_sampling: str = "balanced"  # balanced: each grade weighs the same in the loss
    cases_per_group: int = 4  # the auxiliary losses act on groups of this many cases (a training batch's cases)
    logging_steps: int = 10
    calibration_folds: int = 3  # 0: no calibration
    max_report_tokens: Optional[int] = None

    @classmethod
    def from_training(cls, settings: TrainingSettings) -> "HeadFitSettings":
        return cls(
            optimizer=settings.optimizer,
            grading_sampling=settings.grading.grading_sampling,
            cases_per_group=max(1, settings.loop.batch_size // settings.loop.slices_per_case),
            logging_steps=settings.loop.logging_steps,
            calibration_folds=settings.grading.grading_calibration_folds,
            max_report_tokens=settings.model.max_report_tokens,
        )


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
    tumour: Optional[torch.Tensor] = None  # grading_pooling="tumour": (N, C) masked features per tumour slice (CPU)


@torch.no_grad()
def training_tower_features(
    accelerator, net, processor, run, desc: str, max_report_tokens: Optional[int] = None, segmentation_model=None
) -> List[CaseTowerFeatures]:
    """The towers' features of every graded training case, computed once without augmentation (each process
    computes its share, every process gets all of them, in case-id order). With ``grading_pooling="tumour"``,
    ``segmentation_model`` predicts each case's tumour, as the pipeline does at inference."""
    label2id = net.config.label2id
    cases = [c for c in run.train_cases if c.grade in label2id]
    if not cases:
        raise SystemExit("train.py: grading needs training cases with a grade; none of the training cases has one.")
    net.eval()
    local = []
    mine = cases[accelerator.process_index :: accelerator.num_processes]
    with pipeline_for_model(net, processor, accelerator.device, segmentation_model=segmentation_model) as pipe:
        for case in tqdm(
            mine, desc=f"{desc}: tower features", disable=not accelerator.is_local_main_process, dynamic_ncols=True
        ):
            local.append(_case_tower_features(pipe, net, case, run.reports.get(case.case_id), max_report_tokens))
    gathered = gather_object(local) if accelerator.num_processes > 1 else local
    return sorted({f.case_id: f for f in gathered}.values(), key=lambda f: f.case_id)


def _case_tower_features(pipe, net, case, report: Optional[str], max_report_tokens: Optional[int]) -> CaseTowerFeatures:
    """The towers' features of one case, prepared by the pipeline's preprocess on the slices it grades from."""
    staged = pipe.preprocess(
        case,
        report=report,
        use_case_report=False,
        max_length=max_report_tokens,
        allow_missing_sequences=bool(case.missing_sequences),
    )
    inputs = staged["model_inputs"]
    seg_logits = pipe.segmentation_logits(inputs) if pipe.segmentation_model is not None else None
    t = {k: v.to(pipe.device) for k, v in pipe.grading_inputs(inputs, seg_logits).items()}
    has_report = bool(t["has_report"][0]) if "has_report" in t else False
    bag = None
    if "pooling_mask" in t and net.tumour_projection is not None:
        s2c = torch.zeros(t["pixel_values"].shape[0], dtype=torch.long, device=pipe.device)
        bag = net.grading_bag(t["pixel_values"], t["pooling_mask"], s2c, 1)
    gap, hidden = net.emrfuse.tower_features(
        None if bag is not None else t["pixel_values"],
        t.get("input_ids") if has_report else None,
        t.get("attention_mask"),
        t.get("token_type_ids"),
    )
    return CaseTowerFeatures(
        case_id=case.case_id,
        label=int(net.config.label2id[case.grade]),
        gap=None if gap is None else gap.float().cpu(),
        input_ids=t["input_ids"][0].cpu() if "input_ids" in t else None,
        attention_mask=t["attention_mask"][0].cpu() if "attention_mask" in t else None,
        has_report=has_report,
        text_hidden=None if hidden is None else hidden[0].float().cpu(),
        tumour=None if bag is None else bag["tumour_features"].float().cpu(),
    )


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
    for key, case_key, s2c_key in (
        ("gap", "gap", "slice_to_case"),
        ("tumour_features", "tumour", "tumour_slice_to_case"),
    ):
        rows = [(k, getattr(f, case_key)) for k, f in enumerate(feats) if getattr(f, case_key) is not None]
        if rows:
            batch[key] = torch.cat([r for _, r in rows]).to(device)
            batch[s2c_key] = torch.cat([torch.full((r.shape[0],), k, dtype=torch.long) for k, r in rows]).to(device)
        else:
            batch[key], batch[s2c_key] = None, None
    if feats[0].input_ids is not None:
        length = max(f.input_ids.shape[0] for f in feats)
        batch["input_ids"] = _pad([f.input_ids for f in feats], length).to(device)
        batch["attention_mask"] = _pad([f.attention_mask for f in feats], length).to(device)
        batch["has_report"] = torch.tensor([f.has_report for f in feats], device=device)
        if any(f.text_hidden is not None for f in feats):
            batch["text_hidden"] = _pad([f.text_hidden for f in feats], length).to(device)
    return batch


def fit_grading_head(
    fit: HeadFitSettings,
    accelerator,
    net,
    feats: List[CaseTowerFeatures],
    max_steps: int,
    learning_rate: float,
    seed: int,
    desc: str,
) -> int:
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
    if fit.grading_sampling == "balanced":
        weights = torch.where(counts > 0, labels.numel() / (counts.clamp(min=1) * int((counts > 0).sum())), counts)
    else:
        weights = torch.ones_like(counts)
    group = fit.cases_per_group
    opt = fit.optimizer
    optimizer = make_optimizer(net, opt, learning_rate)
    scheduler = get_scheduler(
        opt.lr_scheduler,
        optimizer,
        num_warmup_steps=min(opt.warmup_steps, max_steps // 2),
        num_training_steps=max_steps,
    )
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
        if opt.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], opt.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update(1)
        if step % fit.logging_steps == 0 or step == max_steps:
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
    return torch.cat(
        [net.forward_from_tower_features(**tower_feature_batch([f], device)).logits.float().cpu() for f in feats]
    )


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature ``T`` that minimises the log loss of ``softmax(logits / T)`` (temperature scaling, Guo et al.
    2017), searched on a grid of 1001 log-spaced values from 0.05 to 50 (steps of 0.7 %). Dividing logits by a positive
    ``T`` leaves every argmax, so every predicted grade, as it was."""
    grid = torch.logspace(math.log10(0.05), math.log10(50.0), 1001, dtype=torch.float64)
    logits, labels = logits.double(), labels.long()
    nll = torch.stack([F.cross_entropy(logits / t, labels) for t in grid])
    return float(grid[int(torch.argmin(nll))])


def calibrate_grading_head(
    fit: HeadFitSettings,
    accelerator,
    net,
    feats: List[CaseTowerFeatures],
    initial: Dict[str, torch.Tensor],
    max_steps: int,
    learning_rate: float,
    seed: int,
    desc: str,
) -> Optional[Dict[str, Any]]:
    """Temperature scaling of the fitted grading head without a validation split: ``--grading_calibration_folds`` K
    heads are fitted from ``initial`` as the final head was, each without one stratified fold of the training cases,
    and grade that fold. The temperature that best fits these out-of-fold logits divides the final head's logits
    (its classifier weights are scaled by ``1 / T``): the grades, accuracy and AUC stay as they were, the probabilities
    get the confidence that held-out cases support. Returns ``{"temperature", "folds", "out_of_fold_log_loss"
    (before, after)}``, or None when there are too few cases of a grade for K folds."""
    folds = int(fit.calibration_folds)
    labels = [f.label for f in feats]
    counts = Counter(labels)
    if folds < 2:
        return None
    if len(counts) < 2 or min(counts.values()) < folds:
        logger.warning(
            f"{desc}: grade probabilities left uncalibrated: {folds}-fold cross-fitting needs at least {folds} "
            f"training cases of every grade, there are {dict(sorted(counts.items()))} (by grade id)."
        )
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
            fit_grading_head(
                fit, accelerator, net, rest, max_steps, learning_rate, seed, f"{desc}: calibration fold {k + 1}/{folds}"
            )
            oof[held] = head_logits(net, [feats[i] for i in held], device)
    net.load_state_dict(fitted, strict=False)
    y = torch.tensor(labels)
    temperature = fit_temperature(oof, y)
    with torch.no_grad():
        net.classifier.weight.div_(temperature)
        net.classifier.bias.div_(temperature)
    before, after = F.cross_entropy(oof.double(), y).item(), F.cross_entropy(oof.double() / temperature, y).item()
    logger.info(
        f"{desc}: grade probabilities temperature-scaled, T = {temperature:.3g} (out-of-fold log loss of the "
        f"training cases {before:.3f} -> {after:.3f}, {folds} folds)"
    )
    return {
        "temperature": round(temperature, 4),
        "folds": folds,
        "out_of_fold_log_loss": [round(before, 4), round(after, 4)],
    }


def _build_warm_model(
    settings: TrainingSettings, accelerator, run, switches: Dict[str, bool], warm_start: WarmStart, desc: str
):
    """The processor and the classification model of the grading run, warm-started and moved to the device."""
    processor = build_processor(settings.model, str(warm_start.folder) if warm_start.folder else run.text_model)
    model = build_model(settings.model, run.text_model, "classification", switches, config_from=warm_start.folder)
    warm_start.apply(model, desc)
    model.to(accelerator.device)
    return processor, model


def _segmentation_companion(settings: TrainingSettings, accelerator, run, switches, warm_start: WarmStart, model, desc):
    """With ``grading_pooling="tumour"``: the segmentation model the grading model is warm-started from (the
    previous stage's weights), whose predictions on the training cases are the masks the head is fitted with, as the
    pipeline's segmentation model gives them at inference. ``None`` with ``"slices"``."""
    if getattr(model.config, "grading_pooling", "slices") != "tumour" or not model.config.use_image:
        return None
    segmenter = build_model(settings.model, run.text_model, "segmentation", switches, config_from=warm_start.folder)
    warm_start.apply(segmenter, f"{desc} (its segmentation model, for the tumour masks)")
    segmenter.to(accelerator.device).eval()
    return segmenter


def _fit_head_on_frozen_towers(
    fit: HeadFitSettings,
    accelerator,
    model,
    processor,
    run,
    max_steps: int,
    learning_rate: float,
    seed: int,
    desc: str,
    segmentation_model=None,
) -> Tuple[int, Optional[Dict[str, Any]], float]:
    """Fit the grading head on the frozen towers' features of the training cases, then calibrate it; returns the
    steps taken, the calibration record and the seconds it all took."""
    t_train = time.perf_counter()
    feats = training_tower_features(
        accelerator, model, processor, run, desc, fit.max_report_tokens, segmentation_model=segmentation_model
    )
    logger.info(
        f"{desc}: grading head fitted on the frozen towers' features of {len(feats)} training cases, "
        f"{max_steps} full-batch steps"
    )
    initial = _head_state(model)
    steps = fit_grading_head(fit, accelerator, model, feats, max_steps, learning_rate, seed, desc)
    calibration = calibrate_grading_head(fit, accelerator, model, feats, initial, max_steps, learning_rate, seed, desc)
    return steps, calibration, time.perf_counter() - t_train


def _select_fitted_head(
    accelerator,
    model,
    processor,
    run,
    output_dir: Path,
    fit: HeadFitSettings,
    steps: int,
    max_steps: int,
    segmentation_model=None,
) -> BestModel:
    """Evaluate the fitted head on the validation (else test) cases and keep it as the run's best model; with no
    held-out cases it is kept as it is."""
    if accelerator.is_main_process:
        (output_dir / "eval_history.jsonl").unlink(missing_ok=True)
    best = BestModel()
    select_cases = run.val_cases or run.eval_cases
    if select_cases:
        selection = SelectionEvaluation(
            cases=select_cases,
            split="validation" if run.val_cases else "test",
            output_dir=output_dir,
            save_best=False,
            use_trackers=False,
            log=accelerator.print,
            max_report_tokens=fit.max_report_tokens,
            segmentation_model=segmentation_model,
        )
        evaluate_and_select(
            accelerator, model, processor, run.reports, "classification", steps, max_steps, selection, best
        )
    else:
        best.keep(
            None, steps, {"task": "classification", "step": steps, "num_cases": 0, "split": "none"}, [], None, model
        )
    return best


def train_grading_head(
    settings: TrainingSettings,
    accelerator,
    run,
    *,
    output_dir: Path,
    switches: Dict[str, bool],
    seed: int,
    warm_start: WarmStart,
    save_model: bool,
    desc: str,
) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The demo's grading run with ``--grading_fit head``: the towers of the warm start stay frozen, the grading head
    is fitted on their features (:func:`fit_grading_head`), then evaluated and saved like every other run. It takes
    seconds, so it writes no resumable checkpoints: a resumed demo run resumes segmentation and fits the head anew."""
    output_dir = Path(output_dir)
    max_steps, learning_rate = settings.schedule.stage("grading")
    fit = HeadFitSettings.from_training(settings)
    set_seed(seed)
    processor, model = _build_warm_model(settings, accelerator, run, switches, warm_start, desc)
    segmenter = _segmentation_companion(settings, accelerator, run, switches, warm_start, model, desc)
    steps, calibration, train_seconds = _fit_head_on_frozen_towers(
        fit, accelerator, model, processor, run, max_steps, learning_rate, seed, desc, segmentation_model=segmenter
    )
    best = _select_fitted_head(
        accelerator, model, processor, run, output_dir, fit, steps, max_steps, segmentation_model=segmenter
    )
    rows, summary, embeds = score_best_model(
        accelerator,
        model,
        processor,
        run,
        "classification",
        best,
        max_steps,
        fit.max_report_tokens,
        segmentation_model=segmenter,
    )
    summary.update(
        best_step=best.step,
        train_seconds=round(train_seconds, 1),
        steps=steps,
        output_dir=str(output_dir),
        grading_fit="head",
        calibration=calibration,
    )
    if accelerator.is_main_process:
        write_run_outputs(
            settings,
            run,
            model,
            processor,
            output_dir,
            "classification",
            rows,
            summary,
            embeds,
            switches,
            seed,
            max_steps,
            learning_rate,
            save_model,
        )
    accelerator.wait_for_everyone()
    return summary, best.state
