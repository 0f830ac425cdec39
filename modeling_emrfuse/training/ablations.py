"""The paper's ablation tables: every row trained and evaluated on the same data, seeds and budget, plus the
shuffled-reports control row."""

from __future__ import annotations

import time
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from datasets_scripts.brats_text import derange_reports

from ..configuration_emrfuse import ABLATION_PRESETS
from ..evaluation.ablation_report import (
    SHUFFLED_REPORTS_PRESET,
    SHUFFLED_REPORTS_ROW,
    TABLE1_ROWS,
    TABLE3_ROWS,
    TABLE_TITLES,
    case_values,
    format_ablation_table,
    preset_parts,
    row_numbers,
    write_ablation_report,
)
from .data import RunData
from .plan import PlannedStage, run_stages
from .settings import TrainingSettings


def shuffled_reports_run(run: RunData, seed: int = 0) -> RunData:
    """The run's data with every case's report swapped with another case's of the same split (a derangement)."""
    splits = [[c.case_id for c in cases] for cases in (run.train_cases, run.val_cases, run.eval_cases)]
    return dataclass_replace(run, reports=derange_reports(run.reports, splits, seed=seed, patients=run.patients))


def table_rows(table: str) -> List[tuple]:
    """``(preset, label)`` of every row of ``table`` (table1 or table3), the shuffled-reports control row last."""
    return list(TABLE1_ROWS if table == "table1" else TABLE3_ROWS) + [SHUFFLED_REPORTS_ROW]


def ablation_caption(table: str, settings: TrainingSettings, run: RunData, seeds: Sequence[int]) -> str:
    """The table's caption: the data, the budget, the seeds, the tower, and the parts of each row."""
    vision = settings.model.vision_model
    schedule = settings.schedule
    shuffled = SHUFFLED_REPORTS_ROW[0]
    return (
        f"{TABLE_TITLES[table]} on {'SYNTHETIC DEMO DATA' if run.synthetic else run.description['name']}: "
        f"{len(run.train_cases)} training / {len(run.eval_cases)} held-out cases, {schedule.max_steps or schedule.num_epochs} "
        f"{'steps' if schedule.max_steps else 'epochs'} per run, seeds {list(seeds)}, vision {vision}. "
        "Parts of each row: "
        + "; ".join(
            f"{label.replace('(ResNet-50)', f'({vision})')}: "
            f"{preset_parts(SHUFFLED_REPORTS_PRESET if preset == shuffled else preset)}"
            + (", reports shuffled across cases" if preset == shuffled else "")
            for preset, label in table_rows(table)
        )
        + "."
    )


def run_ablation(
    table: str,
    settings: TrainingSettings,
    accelerator,
    run: RunData,
    *,
    plan: List[PlannedStage],
    output_dir: Path,
    seeds: Sequence[int],
    command: Optional[str] = None,
) -> Dict[str, Any]:
    """Train + evaluate every row of the paper's Table 1 or Table 3 (same data, seeds, budget).

    Writes ``<output_dir>/ablation-<table>/<table>.md`` (paper format, mean ± 95 % confidence interval
    over seeds, and each row's paired per-case difference to the complete model with its bootstrap
    interval), ``<table>.png`` (bar chart) and ``<table>.json`` (every run's numbers, per-seed grading
    accuracies, intervals, differences); each run's evaluation report goes to
    ``<output_dir>/ablation-<table>/<preset>-seed<seed>/eval``.
    """
    out_dir = Path(output_dir) / f"ablation-{table}"
    # the tables report grades (accuracy), which calibrating the probabilities leaves as they are, and the runs keep
    # no model: the cross-fitting would only cost time
    settings = dataclass_replace(settings, grading=dataclass_replace(settings.grading, grading_calibration_folds=0))
    vision = settings.model.vision_model
    rows = []
    t0 = time.perf_counter()
    for preset, label in table_rows(table):
        label = label.replace("(ResNet-50)", f"({vision})")  # the paper's row names its tower; name the one used
        row_run, switches = run, ABLATION_PRESETS.get(preset)
        if preset == SHUFFLED_REPORTS_ROW[0]:
            row_run, switches = shuffled_reports_run(run), ABLATION_PRESETS[SHUFFLED_REPORTS_PRESET]
        runs, per_case = [], []
        for seed in seeds:
            run_dir = out_dir / f"{preset}-seed{seed}"
            summary = run_stages(
                plan,
                settings,
                accelerator,
                row_run,
                output_dir=run_dir,
                switches=dict(switches),
                seed=seed,
                save_model=False,
                use_trackers=False,
                desc=f"{preset} seed {seed}: ",
            )
            runs.append(row_numbers(summary))
            per_case.append(case_values(run_dir))  # for the paired differences to the complete model
            accelerator.print(
                f"ablation {table} | {label} | seed {seed} | " + ", ".join(f"{k} {v:.3f}" for k, v in runs[-1].items())
            )
        rows.append((preset, label, runs, per_case))
    caption = ablation_caption(table, settings, run, seeds)
    result = {
        "table": table,
        "markdown": format_ablation_table(table, rows, caption=caption),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if accelerator.is_main_process:
        paths = write_ablation_report(
            out_dir, table, rows, caption=caption, extra={"command": command, "seconds": result["seconds"]}
        )
        result.update({k: str(v) for k, v in paths.items()})
        accelerator.print(result["markdown"])
        accelerator.print(f"ablation table: {paths['markdown']}  chart: {paths['chart']}")
    return result
