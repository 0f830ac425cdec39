"""The run behind ``train.py``: the ``Accelerator``, logging, the stages of the run plan (or an ablation), and the
results written, printed and pushed. ``train.py`` parses the options and calls :func:`run_main`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict

import huggingface_hub
import transformers
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration

from ..evaluation.report import format_results_markdown
from ..runtime import strict_json
from .ablations import run_ablation
from .data import DataSettings, RunData, prepare_run_data
from .loop import TrainingStopped
from .outputs import NO_EVALUATION_NOTE, make_pipeline_ready, push_folder_to_hub
from .plan import grading_case_counts, run_plan, run_stages
from .settings import TrainingSettings

logger = logging.getLogger("emrfuse.train")

SELECTION_NEEDS_VALIDATION = (
    "train.py: --eval_steps chooses the best model during training, which needs a validation split: set "
    "--val_fraction > 0 (or give a --split_file with validation cases). Without one the model would be chosen on "
    "the test cases and then scored on them."
)


def train_command() -> str | None:
    """The command line that started this run, for the model card (None when train.py was not the program)."""
    return "python train.py " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("train.py") else None


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
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    for noisy in ("httpx", "urllib3", "filelock", "PIL", "matplotlib", "timm", "huggingface_hub", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def run_main(args: argparse.Namespace, determinism, data: DataSettings, switches: Dict[str, bool]) -> Dict[str, Any]:
    """The run that train.py's options ask for (``data``: where the cases come from; ``switches``: the fusion parts);
    the summary records the determinism settings."""
    accelerator = make_accelerator(args)
    setup_logging(accelerator)
    t0 = time.perf_counter()
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    run = prepare_run_data(data, accelerator)
    if args.eval_steps and not run.val_cases:  # e.g. a --split_file without validation cases
        raise SystemExit(SELECTION_NEEDS_VALIDATION)
    settings = TrainingSettings.from_args(args, train_command=train_command())
    grading_cases = grading_case_counts(run.train_cases) if args.grading_after_segmentation else None
    if grading_cases:
        logger.info(
            f"grading stage: trained on the {len(run.train_cases) - grading_cases['without_grade']} training cases "
            f"with a grade ({', '.join(f'{v} {k}' for k, v in grading_cases.items() if k != 'without_grade')}); "
            f"{grading_cases['without_grade']} without a grade are left out of it"
        )

    if args.ablation:  # every row: segmentation, then the demo's grading stage when asked
        plan = run_plan("segmentation", args.grading_after_segmentation, args.grading_fit, None)
        result = run_ablation(
            args.ablation,
            settings,
            accelerator,
            run,
            plan=plan,
            output_dir=output_dir,
            seeds=args.ablation_seeds,
            command="python train.py " + " ".join(sys.argv[1:]),
        )
        accelerator.end_training()
        return result

    plan = run_plan(args.task, args.grading_after_segmentation, args.grading_fit, args.init_from)
    try:
        summary = run_stages(
            plan,
            settings,
            accelerator,
            run,
            output_dir=output_dir,
            switches=switches,
            seed=args.seed,
            init_from=args.init_from,
            resume=args.resume_from_checkpoint,
        )
    except TrainingStopped as stop:
        accelerator.end_training()
        return {"stopped_at_step": stop.args[0]}
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    if grading_cases:
        summary["grading_training_cases"] = grading_cases
    summary["determinism"] = determinism.to_dict()
    report_main(args, accelerator, run, output_dir, summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
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
        make_pipeline_ready(output_dir, args.grading_after_segmentation)
        if args.push_to_hub:
            pushed = push_folder_to_hub(output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private)
            accelerator.print(f"pushed {output_dir} to https://huggingface.co/{pushed}")
