"""One training stage with the Accelerate loop: slice loader, optimiser and schedule, checkpoints, model selection,
the final evaluation of the selected model and what the stage leaves on disk."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from datasets_scripts.slice_cache import SliceDataset, build_cache, collate_slices

from .checkpoints import save_checkpoint, start_or_resume
from .model_setup import WarmStart, build_model, build_processor, make_optimizer
from .outputs import write_run_outputs
from .selection import BestModel, SelectionEvaluation, evaluate_and_select, score_best_model
from .settings import LoaderSettings, TrainingSettings

logger = logging.getLogger("emrfuse.train")


def build_train_loader(
    settings: LoaderSettings,
    run,
    processor,
    seed: int,
    batch_size: int,
    accelerator,
    balance_grades: bool = False,
    grading_bag: bool = False,
):
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
            run.train_cases,
            Path(settings.cache_dir) / "slices",
            processor.image_processor,
            processor.tokenizer,
            max_length=settings.max_report_tokens,
            reports=run.reports,
            progress=accelerator.is_local_main_process,
            allow_missing_sequences=settings.sequence_presence,
        )
    dataset = SliceDataset(
        cached,
        image_size=settings.image_size,
        context_slices=settings.context_slices,
        train=True,
        samples_per_epoch=settings.samples_per_epoch,
        tumour_prob=settings.tumour_prob,
        slices_per_case=settings.slices_per_case,
        augment=not settings.no_augmentation,
        augmentation=settings.augmentation,
        flip_axes=tuple(settings.flip_axes),
        seed=seed,
        sequence_dropout=settings.sequence_dropout,
        presence_channels=settings.sequence_presence,
        balance_grades=balance_grades,
        grading_bag=grading_bag,
        grading_slices=settings.grading_slices or None,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_slices,
        num_workers=settings.num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),  # workers' base seeds: never drawn from the global RNG
    )
    return loader, dataset


def batch_to_inputs(batch: Dict[str, Any], task: str) -> Dict[str, Any]:
    """A collated batch -> the model's keyword arguments (labels by task; case ids and text never passed on)."""
    inputs = {
        k: batch[k]
        for k in ("pixel_values", "slice_to_case", "input_ids", "attention_mask", "token_type_ids", "has_report")
        if k in batch
    }
    inputs["labels"] = batch["labels"] if task == "segmentation" else batch["grade_labels"]
    return inputs


class TrainingStopped(Exception):
    """Raised by ``--stop_after_steps`` (a deliberate interruption, e.g. to test resuming)."""


def training_length(
    num_epochs: Optional[int], max_steps: Optional[int], batches_per_epoch: int, accum: int
) -> Tuple[int, int]:
    """``(max_steps, num_epochs)``: from the stage's ``max_steps`` when set, else from ``--num_epochs``."""
    updates_per_epoch = max(1, math.ceil(batches_per_epoch / accum))
    if max_steps:
        return max_steps, math.ceil(max_steps / updates_per_epoch)
    return num_epochs * updates_per_epoch, num_epochs


@dataclass
class Stage:
    """A training stage prepared for the loop: the prepared model, optimiser, loader and schedule, and where it is."""

    task: str
    output_dir: Path
    desc: str
    processor: Any
    model: Any
    optimizer: Any
    loader: Any
    scheduler: Any
    max_steps: int
    num_epochs: int
    learning_rate: float
    state: Dict[str, Any]  # global_step, epoch, batches_in_epoch, best metric and step (checkpointed)


@dataclass
class LoopCounters:
    """What the loop measures (not checkpointed)."""

    slices_seen: int = 0
    data_wait: float = 0.0
    eval_seconds: float = 0.0
    running_loss: Any = None
    running_n: int = 0


def prepare_stage(
    settings: TrainingSettings,
    accelerator,
    run,
    *,
    task: str,
    output_dir: Path,
    switches: Dict[str, bool],
    seed: int,
    schedule: str,
    warm_start: Optional[WarmStart],
    resume: Optional[str],
    desc: str,
) -> Stage:
    """Build the model (from the towers, or a warm start), its processor, loader, optimiser and schedule, prepared by
    accelerate; then the loop's state, fresh or from a checkpoint."""
    max_steps, learning_rate = settings.schedule.stage(schedule)
    set_seed(seed)
    folder = warm_start.folder if warm_start is not None else None
    processor = build_processor(
        settings.model, str(folder) if folder else run.text_model
    )  # a saved EmrFuse folder holds its tokenizer
    model = build_model(settings.model, run.text_model, task, switches, config_from=folder)
    if warm_start is not None:
        warm_start.apply(model, desc)
    model.train()
    grading = task == "classification"
    balanced = grading and settings.grading.grading_sampling == "balanced"
    train_loader, _ = build_train_loader(
        settings.loader,
        run,
        processor,
        seed,
        settings.loop.batch_size,
        accelerator,
        balance_grades=balanced,
        grading_bag=grading,
    )
    optimizer = make_optimizer(model, settings.optimizer, learning_rate)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    accum = accelerator.gradient_accumulation_steps
    max_steps, num_epochs = training_length(settings.schedule.num_epochs, max_steps, len(train_loader), accum)
    scheduler = accelerator.prepare(
        get_scheduler(
            settings.optimizer.lr_scheduler,
            optimizer,
            num_warmup_steps=min(settings.optimizer.warmup_steps, max_steps // 2) * accelerator.num_processes,
            num_training_steps=max_steps * accelerator.num_processes,
        )
    )
    state = start_or_resume(accelerator, resume, output_dir, task, desc)
    return Stage(
        task,
        output_dir,
        desc,
        processor,
        model,
        optimizer,
        train_loader,
        scheduler,
        max_steps,
        num_epochs,
        learning_rate,
        state,
    )


def log_stage_start(
    settings: TrainingSettings, accelerator, run, stage: Stage, switches: Dict[str, bool], use_trackers: bool
) -> None:
    """Start the trackers (once per process) and log what the stage trains."""
    loop = settings.loop
    if use_trackers and not accelerator.trackers and loop.report_to != "none":
        extra = {"task": stage.task, "max_steps": stage.max_steps, "switches": str(switches)}
        accelerator.init_trackers("emrfuse", config={**settings.card.tracker_config, **extra})
    net = accelerator.unwrap_model(stage.model)
    logger.info(
        f"{stage.desc}: {len(run.train_cases)} training cases, {len(stage.loader)} batches/epoch/process of {loop.batch_size} slices ({loop.batch_size // loop.slices_per_case} cases), "
        f"{accelerator.num_processes} process(es), accumulation {accelerator.gradient_accumulation_steps}, {stage.max_steps} steps, "
        f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, "
        f"parts: {'+'.join(k[4:] for k, v in switches.items() if v) or 'image only'}"
    )


def optimisation_step(settings: TrainingSettings, accelerator, stage: Stage, batch: Dict[str, Any]) -> torch.Tensor:
    """Forward, backward, clip, step (accelerate accumulates); returns the batch's loss."""
    with accelerator.accumulate(stage.model):
        loss = stage.model(**batch_to_inputs(batch, stage.task)).loss
        accelerator.backward(loss)
        if accelerator.sync_gradients and settings.optimizer.max_grad_norm:
            accelerator.clip_grad_norm_(stage.model.parameters(), settings.optimizer.max_grad_norm)
        stage.optimizer.step()
        stage.scheduler.step()
        stage.optimizer.zero_grad(set_to_none=True)
    return loss


def log_loss(accelerator, stage: Stage, counters: LoopCounters, progress, use_trackers: bool) -> None:
    """The mean training loss since the last log line (over the processes), on the bar and the trackers."""
    mean_loss = accelerator.reduce(counters.running_loss / max(counters.running_n, 1), reduction="mean").item()
    counters.running_loss.zero_()
    counters.running_n = 0
    lr = stage.scheduler.get_last_lr()[0]
    progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
    if use_trackers and accelerator.trackers:
        accelerator.log({"train/loss": mean_loss, "train/lr": lr}, step=stage.state["global_step"])


def after_update(
    settings: TrainingSettings,
    accelerator,
    run,
    stage: Stage,
    counters: LoopCounters,
    progress,
    selection: SelectionEvaluation,
    best: BestModel,
    use_trackers: bool,
) -> bool:
    """Logging, selection evaluations, checkpoints and ``--stop_after_steps`` after one optimiser update; returns
    True when the stage has reached its last step."""
    loop, state = settings.loop, stage.state
    step = state["global_step"]
    if step % loop.logging_steps == 0 or step == stage.max_steps:
        log_loss(accelerator, stage, counters, progress, use_trackers)
    if selection.cases and (step >= stage.max_steps or (loop.eval_steps and step % loop.eval_steps == 0)):
        counters.eval_seconds += evaluate_and_select(
            accelerator, stage.model, stage.processor, run.reports, stage.task, step, stage.max_steps, selection, best
        )
    if loop.checkpointing_steps and step % loop.checkpointing_steps == 0:
        state.update(best_metric=best.metric, best_step=best.step)
        save_checkpoint(accelerator, stage.output_dir, dict(state), loop.checkpoints_total_limit)
    if step >= stage.max_steps:
        return True
    if loop.stop_after_steps and step >= loop.stop_after_steps:
        progress.close()
        logger.info(f"{stage.desc}: stopped after step {step} (--stop_after_steps)")
        accelerator.wait_for_everyone()
        raise TrainingStopped(step)
    return False


def run_epochs(
    settings: TrainingSettings,
    accelerator,
    run,
    stage: Stage,
    selection: SelectionEvaluation,
    best: BestModel,
    progress,
    use_trackers: bool,
) -> LoopCounters:
    """The epochs of the stage from where its state stands (a resumed run skips the batches it has seen)."""
    state = stage.state
    counters = LoopCounters(running_loss=torch.zeros((), device=accelerator.device))
    start_epoch = int(state["epoch"])
    if int(state["global_step"]) >= stage.max_steps:
        return counters
    for epoch in range(start_epoch, stage.num_epochs):
        stage.loader.set_epoch(epoch)
        skip = int(state["batches_in_epoch"]) if epoch == start_epoch else 0
        loader = accelerator.skip_first_batches(stage.loader, skip) if skip else stage.loader
        batches_in_epoch = skip
        t_wait = time.perf_counter()
        for batch in loader:
            counters.data_wait += time.perf_counter() - t_wait
            loss = optimisation_step(settings, accelerator, stage, batch)
            batches_in_epoch += 1
            counters.slices_seen += int(batch["pixel_values"].shape[0])
            counters.running_loss += loss.detach().float()
            counters.running_n += 1
            if accelerator.sync_gradients:
                progress.update(1)
                end_of_epoch = batches_in_epoch >= len(stage.loader)
                state.update(
                    global_step=int(state["global_step"]) + 1,
                    epoch=epoch + 1 if end_of_epoch else epoch,
                    batches_in_epoch=0 if end_of_epoch else batches_in_epoch,
                )
                if after_update(settings, accelerator, run, stage, counters, progress, selection, best, use_trackers):
                    return counters
            t_wait = time.perf_counter()
    return counters


def train_one(
    settings: TrainingSettings,
    accelerator,
    run,
    *,
    task: str,
    output_dir: Path,
    switches: Dict[str, bool],
    seed: int,
    schedule: str = "main",
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
    ``output_dir/checkpoints``. ``schedule`` picks the steps and learning rate
    (:meth:`ScheduleSettings.stage`), ``warm_start`` the initial weights. Returns the final summary
    and the best weights (CPU tensors).
    """
    stage = prepare_stage(
        settings,
        accelerator,
        run,
        task=task,
        output_dir=Path(output_dir),
        switches=switches,
        seed=seed,
        schedule=schedule,
        warm_start=warm_start,
        resume=resume,
        desc=desc,
    )
    log_stage_start(settings, accelerator, run, stage, switches, use_trackers)
    best = BestModel(
        metric=stage.state["best_metric"], step=stage.state["best_step"]
    )  # a resumed run keeps its best metric
    global_step = int(stage.state["global_step"])
    progress = tqdm(
        total=stage.max_steps,
        initial=global_step,
        desc=desc,
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
    selection = SelectionEvaluation(
        cases=run.val_cases or run.eval_cases,
        split="validation" if run.val_cases else "test",
        output_dir=stage.output_dir,
        save_best=save_model and bool(run.val_cases),
        use_trackers=use_trackers,
        log=progress.write,
        max_report_tokens=settings.model.max_report_tokens,
        inference=settings.evaluation.pipeline_options(),
    )
    t_train = time.perf_counter()
    counters = run_epochs(settings, accelerator, run, stage, selection, best, progress, use_trackers)
    progress.close()
    train_seconds = time.perf_counter() - t_train - counters.eval_seconds
    return finish_stage(
        settings,
        accelerator,
        run,
        stage,
        best,
        selection,
        counters,
        train_seconds,
        switches=switches,
        seed=seed,
        save_model=save_model,
    )


def finish_stage(
    settings: TrainingSettings,
    accelerator,
    run,
    stage: Stage,
    best: BestModel,
    selection: SelectionEvaluation,
    counters: LoopCounters,
    train_seconds: float,
    *,
    switches: Dict[str, bool],
    seed: int,
    save_model: bool,
) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Score the selected model on the held-out cases, write the report (and the model folder), free memory."""
    net = accelerator.unwrap_model(stage.model)
    task, global_step = stage.task, int(stage.state["global_step"])
    if not selection.cases:  # trained on every case: nothing to evaluate, the last weights are the model
        best.keep(
            None, global_step, {"task": task, "step": global_step, "num_cases": 0, "split": "none"}, [], None, net
        )
    elif best.state is None:  # resumed from a checkpoint taken after the last step
        evaluate_and_select(
            accelerator, stage.model, stage.processor, run.reports, task, global_step, stage.max_steps, selection, best
        )
    rows, summary, embeds = score_best_model(
        accelerator,
        stage.model,
        stage.processor,
        run,
        task,
        best,
        stage.max_steps,
        settings.model.max_report_tokens,
        settings.evaluation.pipeline_options(),
    )
    summary.update(
        best_step=best.step,
        train_seconds=round(train_seconds, 1),
        data_wait_share=round(counters.data_wait / max(train_seconds, 1e-9), 3),
        train_slices_per_second=round(counters.slices_seen * accelerator.num_processes / max(train_seconds, 1e-9), 2),
        steps=global_step,
        output_dir=str(stage.output_dir),
    )
    if accelerator.is_main_process:
        write_run_outputs(
            settings,
            run,
            net,
            stage.processor,
            stage.output_dir,
            task,
            rows,
            summary,
            embeds,
            switches,
            seed,
            stage.max_steps,
            stage.learning_rate,
            save_model,
        )
    accelerator.wait_for_everyone()
    best_state = best.state
    accelerator.free_memory()
    return summary, best_state
