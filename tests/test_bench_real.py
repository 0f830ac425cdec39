"""bench/bench_real.py's recipe levers: each reaches train.py only when it differs from train.py's default, so the
arguments of runs finished before a lever existed are unchanged (and those runs are reused)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench_real():
    spec = importlib.util.spec_from_file_location("bench_real", ROOT / "bench" / "bench_real.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def _argv(bench_real, *extra):
    args = bench_real.parse_args(["--output_dir", "/tmp/unused", *extra])
    return bench_real.train_args(args, [Path("/data")], [], None, "image", None, None)


def test_levers_are_passed_only_when_set():
    bench_real = _bench_real()
    plain = _argv(bench_real)
    for option in ("--augmentation", "--flip_axes", "--clip_percentiles"):
        assert option not in plain
    levered = _argv(bench_real, "--augmentation", "monai", "--flip_axes", "0", "--clip_percentiles", "0.5", "99.5")
    assert levered[levered.index("--augmentation") + 1] == "monai"
    assert levered[levered.index("--flip_axes") + 1] == "0"
    i = levered.index("--clip_percentiles")
    assert levered[i + 1 : i + 3] == ["0.5", "99.5"]
    # everything else is as before: a finished run of the plain recipe keeps its reuse key
    start = levered.index("--augmentation")
    assert levered[:start] + levered[start + 7 :] == plain


def test_final_postprocessing_is_saved_with_every_processor_of_the_folder(tmp_path):
    from conftest import build_tiny_model_folder

    from modeling_emrfuse.processing_emrfuse import EmrFuseProcessor

    folder = build_tiny_model_folder(tmp_path / "model")
    before = EmrFuseProcessor.from_pretrained(str(folder)).image_processor.postprocessing
    assert before == {"min_component_mm3": 0.0, "et_min_mm3": 0.0}
    settings = _bench_real().set_postprocessing(folder, 1000, 200)
    assert settings == {"min_component_mm3": 1000.0, "et_min_mm3": 200.0}
    for sub in (folder, folder / "grading"):
        assert EmrFuseProcessor.from_pretrained(str(sub)).image_processor.postprocessing == settings


def test_shuffled_report_recipe_is_the_report_recipe_with_shuffled_reports():
    bench_real = _bench_real()
    args = bench_real.parse_args(["--output_dir", "/tmp/unused", "--recipes", "image", "image+shuffled-report"])
    argv = {
        recipe: bench_real.train_args(args, [Path("/data")], [], Path("/r.jsonl"), recipe, "/tower", None)
        for recipe in ("image", "image+report", "image+shuffled-report")
    }
    assert "--no_text" in argv["image"] and "--text_model" not in argv["image"]
    assert argv["image+report"][argv["image+report"].index("--text_model") + 1] == "/tower"
    assert argv["image+shuffled-report"] == argv["image+report"] + ["--shuffle_reports"]
    fusion = bench_real.train_args(args, [Path("/data")], [], Path("/r.jsonl"), "image+fusion", "/tower", None)
    assert "--reports" not in fusion and fusion[-1] == "--no_reports"
    assert [a for a in argv["image+report"] if a not in ("--reports", "/r.jsonl")] == fusion[:-1]
    from train_script import load_train_script

    train = load_train_script()
    parsed = train.parse_args([*argv["image+shuffled-report"], "--output_dir", "/tmp/unused"])
    assert parsed.shuffle_reports and train.data_settings(parsed).shuffle_reports
