"""The run plan: the named stages a command line asks for, each with its trainer, run in order.

A plain run is one stage (``segmentation`` or ``classification``, warm-started from ``--init_from`` when given);
the demo's default is ``segmentation`` then a grading stage that starts from its weights: ``grading-head`` (the
towers frozen, :mod:`.grading_head`) or ``grading-finetune`` (the whole model, the loop of :mod:`.loop`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..brats_labels import GRADES
from .control import run_grading_control
from .data import RunDataError
from .evaluation import CASE_FEATURES
from .grading_head import train_grading_head
from .loop import train_one
from .model_setup import WarmStart
from .outputs import GRADING_SUBFOLDER, rewrite_evaluation_summary
from .settings import TrainingSettings


@dataclass(frozen=True)
class PlannedStage:
    """One stage of a run plan."""

    name: str  # segmentation, classification, grading-head or grading-finetune
    task: str  # segmentation or classification
    schedule: str = "main"  # which steps and learning rate (ScheduleSettings.stage)
    subfolder: str = ""  # where the stage saves, inside the run's output folder
    warm_start: str = "none"  # none, init_from (a saved folder) or previous (the previous stage's weights)


def run_plan(
    task: str, grading_after_segmentation: bool, grading_fit: str, init_from: Optional[str]
) -> List[PlannedStage]:
    """The stages of a run, in order."""
    if not grading_after_segmentation:
        return [PlannedStage(task, task, warm_start="init_from" if init_from else "none")]
    grading = PlannedStage(
        f"grading-{grading_fit}",
        "classification",
        schedule="grading",
        subfolder=GRADING_SUBFOLDER,
        warm_start="previous",
    )
    return [PlannedStage("segmentation", "segmentation"), grading]


def grading_case_counts(train_cases: Sequence[Any], labels: Sequence[str] = GRADES) -> Dict[str, int]:
    """The training cases the grading stage uses: ``{grade: count, ..., "without_grade": count}``. Cases without a
    grade (HGG/LGG) train the segmentation only; the grading stage needs training cases of every grade
    (``RunDataError`` otherwise, before anything is trained)."""
    counts = {g: sum(1 for c in train_cases if c.grade == g) for g in labels}
    counts["without_grade"] = len(train_cases) - sum(counts[g] for g in labels)
    missing = [g for g in labels if not counts[g]]
    if missing:
        raise RunDataError(
            f"the grading stage needs training cases of every grade {tuple(labels)}, but none of the "
            f"{len(train_cases)} training cases is {' or '.join(missing)} ({counts}); give the grades (HGG/LGG "
            "folders, or an id table with a Grade column through --id_mapping) or train without the grading stage."
        )
    return counts


def _loop_trainer(stage: PlannedStage) -> Callable[..., Any]:
    def train(settings, accelerator, run, **kwargs):
        return train_one(settings, accelerator, run, task=stage.task, schedule=stage.schedule, **kwargs)

    return train


def _head_trainer(stage: PlannedStage) -> Callable[..., Any]:
    def train(settings, accelerator, run, *, use_trackers, resume, **kwargs):
        # seconds long: no trackers and no checkpoints; a resumed demo run resumes segmentation and fits the head anew
        return train_grading_head(settings, accelerator, run, **kwargs)

    return train


def stage_trainer(stage: PlannedStage) -> Callable[..., Any]:
    """The function that trains ``stage``: the grading-head fit, or the training loop."""
    return _head_trainer(stage) if stage.name == "grading-head" else _loop_trainer(stage)


def _warm_start(stage: PlannedStage, init_from: Optional[str], previous_state) -> Optional[WarmStart]:
    if stage.warm_start == "init_from":
        return WarmStart.from_folder(init_from)
    if stage.warm_start == "previous":
        return WarmStart(source="the segmentation run's weights", state=previous_state)
    return None


def run_stages(
    plan: List[PlannedStage],
    settings: TrainingSettings,
    accelerator,
    run,
    *,
    output_dir: Path,
    switches: Dict[str, bool],
    seed: int,
    init_from: Optional[str] = None,
    save_model: bool = True,
    use_trackers: bool = True,
    resume: Optional[str] = None,
    desc: str = "",
) -> Dict[str, Any]:
    """Train the plan's stages in order; the summary is the first stage's, with the grading stage's grading metrics.

    The grading model (``<output_dir>/grading``) shares the towers and the fusion head with the segmentation model
    and adds the paper's case-level classification head (F19-F21); a short stage suffices because the shared parts
    are already trained.
    """
    summaries, state = [], None
    for k, stage in enumerate(plan):
        trainer = stage_trainer(stage)
        summary, state = trainer(
            settings,
            accelerator,
            run,
            output_dir=Path(output_dir) / stage.subfolder if stage.subfolder else output_dir,
            switches=switches,
            seed=seed,
            warm_start=_warm_start(stage, init_from, state),
            save_model=save_model,
            use_trackers=use_trackers and k == 0,
            resume=resume,
            desc=f"{desc}{'grading' if stage.schedule == 'grading' else stage.task}",
        )
        summaries.append(summary)
    merged = merge_summaries(summaries)
    add_grading_control(merged, summaries, run, accelerator)
    return merged


def add_grading_control(merged: Dict[str, Any], summaries: List[Dict[str, Any]], run, accelerator) -> None:
    """A segmentation stage followed by a grading stage: the enhancing-fraction control (:mod:`.control`) goes into
    the merged summary and into the grading stage's summary and evaluation report."""
    features = summaries[0].get(CASE_FEATURES)
    if len(summaries) < 2 or not merged.get("grading") or not features:
        return
    control = run_grading_control(run, features, merged.get("grade_labels") or GRADES)
    if control is None:
        return
    merged["grading_control"] = summaries[-1]["grading_control"] = control
    if accelerator.is_main_process and summaries[-1].get("output_dir"):
        rewrite_evaluation_summary(Path(summaries[-1]["output_dir"]) / "eval", summaries[-1])


def merge_summaries(summaries: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The first stage's summary, with the grading metrics and the run record of a grading stage after it."""
    merged = dict(summaries[0])
    for grading in summaries[1:]:
        for key in ("grading", "grade_labels", "num_graded_cases"):
            merged[key] = grading.get(key)
        merged["grading_run"] = {
            k: grading.get(k) for k in ("output_dir", "train_seconds", "steps", "best_step", "calibration")
        }
    return merged
