"""Model selection during training: evaluate on the selection cases, keep the best weights, score them on the
held-out test cases."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..runtime import strict_json
from .evaluation import eval_log_line, evaluate, selection_metric, summary_scalars
from .outputs import save_model_folder


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
    max_report_tokens: Optional[int] = None
    inference: Dict[str, Any] = field(default_factory=dict)  # the pipeline's inference options (tta, post-processing)
    segmentation_model: Any = None  # the grading model's companion in the pipeline (grading_pooling="tumour")


def evaluate_and_select(
    accelerator,
    model,
    processor,
    reports: Dict[str, Optional[str]],
    task: str,
    step: int,
    max_steps: int,
    selection: SelectionEvaluation,
    best: BestModel,
) -> float:
    """Evaluate on the selection cases, log the result (line, trackers, ``eval_history.jsonl``) and keep the model
    in ``best`` when it is better (:meth:`BestModel.is_better`). Returns the seconds it took."""
    t_eval = time.perf_counter()
    net = accelerator.unwrap_model(model)
    sync_buffers(net, accelerator)
    rows, summary, embeds = evaluate(
        accelerator,
        model,
        processor,
        selection.cases,
        reports,
        task,
        step,
        selection.max_report_tokens,
        selection.inference,
        segmentation_model=selection.segmentation_model,
    )
    summary["split"] = selection.split
    metric = selection_metric(summary, task)
    if accelerator.is_main_process:
        selection.log(eval_log_line(summary, task, step, max_steps, selection.split))
    if selection.use_trackers and accelerator.trackers:
        accelerator.log(summary_scalars(summary, task), step=step)
    if accelerator.is_main_process:
        selection.output_dir.mkdir(parents=True, exist_ok=True)
        with (selection.output_dir / "eval_history.jsonl").open("a") as fh:
            fh.write(
                strict_json.dumps(
                    {"step": step, "split": selection.split, "metric": metric, "summary": summary}, default=float
                )
                + "\n"
            )
    if best.is_better(metric):
        best.keep(metric, step, summary, rows, embeds, net)
        if selection.save_best and accelerator.is_main_process:
            save_model_folder(net, processor, selection.output_dir)
    accelerator.wait_for_everyone()
    return time.perf_counter() - t_eval


def score_best_model(
    accelerator,
    model,
    processor,
    run,
    task: str,
    best: BestModel,
    max_steps: int,
    max_report_tokens: Optional[int] = None,
    inference: Optional[Dict[str, Any]] = None,
    segmentation_model=None,
):
    """Load the selected weights and give ``(rows, summary, embeddings)`` on the held-out test cases: a fresh
    evaluation (with the ``inference`` options) when a validation split chose the model, else the selection
    evaluation itself (which ran on the test cases at the last step, with the same options, and chose nothing)."""
    accelerator.unwrap_model(model).load_state_dict(best.state)
    if not run.val_cases:
        return best.rows, best.summary, best.embeds
    rows, summary, embeds = evaluate(
        accelerator,
        model,
        processor,
        run.eval_cases,
        run.reports,
        task,
        best.step,
        max_report_tokens,
        inference,
        segmentation_model=segmentation_model,
    )
    summary["split"] = "test"
    summary["validation"] = {"metric": best.metric, "num_cases": len(run.val_cases)}
    accelerator.print(eval_log_line(summary, task, best.step, max_steps, "test (best model)"))
    return rows, summary, embeds
