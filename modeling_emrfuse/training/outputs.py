"""What a run leaves: the model folder (weights, processor, card), its evaluation report, the pipeline wiring of
the folder, the push to the Hub."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import huggingface_hub

from ..evaluation.report import (
    OUTPUT_FILES,
    format_results_markdown,
    write_evaluation_report,
)
from ..hub.model_card import build_model_card, training_config_for_card
from ..hub.packaging import add_pipeline_to_folder
from ..runtime.strict_json import write_json
from .settings import TrainingSettings

GRADING_SUBFOLDER = "grading"  # the grading run saves into <output_dir>/grading


NO_EVALUATION_NOTE = (
    "No held-out evaluation: this model was trained on every case given (--eval_fraction 0). Its expected "
    "quality is what cross-validation of the same recipe measures (e.g. bench/bench_real.py --cv 5)."
)


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


def rewrite_evaluation_summary(eval_dir: Path, summary: Dict[str, Any]) -> None:
    """Replace ``summary.json`` and ``summary.md`` of an evaluation report written by :func:`write_run_outputs`
    with ``summary`` (e.g. after the grading control was added); nothing when the report does not exist."""
    eval_dir = Path(eval_dir)
    if not (eval_dir / OUTPUT_FILES["summary"]).is_file():
        return
    write_json(eval_dir / OUTPUT_FILES["summary"], summary, indent=2, default=float)
    (eval_dir / OUTPUT_FILES["markdown"]).write_text(
        "# Evaluation\n\n" + format_results_markdown(summary) + "\n", encoding="utf-8"
    )


def write_run_outputs(
    settings: TrainingSettings,
    run,
    net,
    processor,
    output_dir: Path,
    task: str,
    rows,
    summary,
    embeds,
    switches: Dict[str, bool],
    seed: int,
    max_steps: int,
    learning_rate: float,
    save_model: bool,
) -> None:
    """Evaluation report (per-case CSV, summary JSON, markdown, figures) and, if asked, the model folder + card."""
    if rows:
        write_evaluation_report(
            output_dir / "eval", rows, summary, embeddings=embeds, embedding_grades=[r.get("grade") for r in rows]
        )
    if not save_model:
        return
    card = build_model_card(
        task=task,
        model_name=settings.card.hub_model_id or output_dir.name,
        summary=summary,
        results_markdown=format_results_markdown(summary) if rows else NO_EVALUATION_NOTE,
        training_config=training_config_for_card(card_config(settings, task, max_steps, learning_rate, switches, seed)),
        data=run.description,
        text_model=run.text_model
        if not run.demo_text_tower
        else (
            "a 2-layer BERT with a WordPiece vocabulary counted from the "
            + ("demo reports" if run.synthetic else "training reports")
            + f" (words of at least {settings.card.vocab_min_reports} distinct reports)"
        ),
        vision_model=settings.model.vision_model,
        repo_id=settings.card.hub_model_id,
        train_command=settings.card.train_command,
    )
    save_model_folder(net, processor, output_dir, card=card)


def card_config(
    settings: TrainingSettings, task: str, max_steps: int, learning_rate: float, switches: Dict[str, bool], seed: int
) -> Dict[str, Any]:
    """The training configuration the model card shows."""
    model, loader, opt, grading = settings.model, settings.loader, settings.optimizer, settings.grading
    cfg = {
        "task": task,
        "vision_model": model.vision_model,
        "vision_pretrained": model.vision_pretrained,
        "context_slices": model.context_slices,
        "image_size": loader.image_size or "whole slice",
        "fusion_dim": model.fusion_dim,
        "max_steps": max_steps,
        "batch_size": settings.loop.batch_size,
        "learning_rate": learning_rate,
        "lr_scheduler": opt.lr_scheduler,
        "warmup_steps": opt.warmup_steps,
        "weight_decay": opt.weight_decay,
        "augmentation": "none" if loader.no_augmentation else loader.augmentation,
        "tumour_prob": loader.tumour_prob,
        "slices_per_case": loader.slices_per_case,
        "seed": seed,
    }
    if task == "classification" and grading.grading_after_segmentation:
        cfg["grading_fit"] = (
            grading.grading_fit
        )  # head: frozen towers, full-batch steps (batch_size, augmentation unused)
        if grading.grading_fit == "head":
            cfg["grading_calibration_folds"] = grading.grading_calibration_folds
    cfg.update(switches)
    return cfg


def push_folder_to_hub(
    folder: Path,
    repo_id: str,
    token: Optional[str] = None,
    private: bool = False,
    commit_message: str = "Upload EmrFuse model",
) -> str:
    """Upload a saved model folder (weights, config, code, processor, model card, evaluation report).

    Checkpoints, tracker logs and temporary folders stay local.
    """
    api = huggingface_hub.HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message,
        ignore_patterns=[
            "checkpoints/**",
            "logs/**",
            ".tmp*",
            ".tmp*/**",
            "eval_history.jsonl",
            "ablation-*/**",
            *(
                f"{GRADING_SUBFOLDER}/{p}"
                for p in ("checkpoints/**", "logs/**", ".tmp*", ".tmp*/**", "eval_history.jsonl")
            ),
        ],
    )
    return repo_id


def make_pipeline_ready(output_dir: Path, grading_after_segmentation: bool) -> None:
    """Make the saved model folder one self-contained unit for ``transformers.pipeline``, the CLI and the Space.

    Adds the ``glioma-analysis`` pipeline to the folder's config and code files and, after the demo's
    two runs, names the grading model (saved in ``<output_dir>/grading``) in the root config, so that
    one folder or Hub repo serves segmentation and grading.
    """
    if not (output_dir / "config.json").exists():
        return  # no model was saved (e.g. save disabled)
    grading = output_dir / GRADING_SUBFOLDER
    with_grading = grading_after_segmentation and (grading / "config.json").exists()
    add_pipeline_to_folder(output_dir, grading_model=grading if with_grading else None)
