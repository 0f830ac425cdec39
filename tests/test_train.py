"""train.py end to end on tiny synthetic cases (seconds per run), plus its checkpoint / report helpers.

Every run uses the same few tiny demo cases (32 x 32 x 24) and a tiny model (resnet18 tower at 32 px,
16-channel decoder, fusion_dim 32) so that a run takes a few seconds on two CPU cores. Runs go
through ``python train.py`` / ``torchrun`` in a subprocess, exactly as a user starts them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_script import load_train_script

from modeling_emrfuse.training import checkpoints, grading_head
from modeling_emrfuse.training.ablations import shuffled_reports_run
from modeling_emrfuse.training.data import RunData
from modeling_emrfuse.training.model_setup import WarmStart, build_model
from modeling_emrfuse.training.selection import BestModel
from modeling_emrfuse.training.settings import OptimizerSettings, TrainingSettings

ROOT = Path(__file__).resolve().parents[1]
train = load_train_script()  # parse_args, DATA_DEFAULTS, main

TINY = [
    "--demo",
    "--demo_cases",
    "6",
    "--demo_size",
    "32x32x24",
    "--eval_fraction",
    "0.34",
    "--vision_model",
    "resnet18",
    "--fusion_dim",
    "32",
    "--decoder_channels",
    "16",
    "16",
    "16",
    "16",
    "16",
    "--cross_attention_heads",
    "2",
    "--batch_size",
    "8",
    "--slices_per_case",
    "4",
    "--learning_rate",
    "1e-3",
    "--warmup_steps",
    "1",
    "--report_to",
    "none",
    "--logging_steps",
    "1",
]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONHASHSEED": "0",
}
ENV.pop("ACCELERATE_USE_CPU", None)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Demo data and the demo text tower, written once for the whole module."""
    base = tmp_path_factory.mktemp("train")
    return {"data": base / "data", "cache": base / "cache", "base": base}


def tiny_args(shared, out: Path, *extra: str) -> list:
    return TINY + [
        "--demo_data_dir",
        str(shared["data"]),
        "--cache_dir",
        str(shared["cache"]),
        "--output_dir",
        str(out),
        *extra,
    ]


def run_train(args, *, launcher=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train.py")] + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


# ------------------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def seg_run(shared):
    out = shared["base"] / "seg"
    proc = run_train(tiny_args(shared, out, "--task", "segmentation", "--max_steps", "3", "--checkpointing_steps", "2"))
    return out, proc


def test_segmentation_run_writes_model_report_and_card(seg_run):
    out, proc = seg_run
    for name in (
        "config.json",
        "model.safetensors",
        "README.md",
        "processor_config.json",
        "modeling_emrfuse.py",
        "eval/per_case.csv",
        "eval/summary.json",
        "eval/summary.md",
        "eval/dice_boxplot.png",
        "eval/embeddings_pca.png",
    ):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "checkpoint-2" / "training_state.json").is_file()
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["split"] == "test" and summary["num_cases"] == 2
    assert set(summary["segmentation"]) >= {"WT", "TC", "ET", "mean"}
    # the one evaluation report layout (the same as emrfuse score's): ET over ET-present cases, false-positive cases
    et = summary["segmentation"]["ET"]
    assert et["present_cases"] + et["absent_cases"] == 2 and 0 <= et["false_positive_cases"] <= et["absent_cases"]
    header = (out / "eval" / "per_case.csv").read_text().splitlines()[0].split(",")
    assert {"ET_dice", "ET_ref_voxels", "ET_pred_voxels"} <= set(header)
    assert "False-positive cases" in (out / "eval" / "summary.md").read_text()
    assert "ET-present" in proc.stdout
    # one clean line per evaluation and the printed table; report text never printed
    assert proc.stdout.count("eval step 3/3") == 1
    assert "| WT |" in proc.stdout and "Dice" in proc.stdout
    reports = [p.read_text().strip() for p in Path(out.parent / "data").rglob("*_flair_text.txt")]
    assert reports and not any(r[:60] in proc.stdout + proc.stderr for r in reports)


def test_best_model_loads_with_auto_classes(seg_run):
    from transformers import AutoModel, AutoModelForSemanticSegmentation, AutoProcessor

    out, _ = seg_run
    model = AutoModelForSemanticSegmentation.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    base = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert type(base).__name__ == "EmrFuseModel"
    vol = np.zeros((4, 32, 32, 24), np.float32)
    vol[:, 4:28, 4:28, 2:22] = np.random.default_rng(0).normal(100, 10, (4, 24, 24, 20))
    inputs = processor(volumes=[vol], text=["A lesion in the left frontal lobe."], return_tensors="pt")
    crop = inputs.pop("crop_info")
    with torch.no_grad():
        logits = model(
            **{
                k: inputs[k]
                for k in (
                    "pixel_values",
                    "slice_to_case",
                    "input_ids",
                    "attention_mask",
                    "token_type_ids",
                    "has_report",
                )
            }
        ).logits
    label_map = processor.post_process_segmentation(logits, crop[0])
    assert label_map.shape == (32, 32, 24)


def test_model_card_parses_with_metrics(seg_run):
    from huggingface_hub import ModelCard, metadata_load

    out, _ = seg_run
    meta = metadata_load(out / "README.md")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-segmentation"
    assert "synthetic-data" in meta["tags"]
    results = meta["model-index"][0]["results"]
    names = {m["name"] for r in results for m in r["metrics"]}
    assert any("Dice WT" in n for n in names)
    card = ModelCard.load(out / "README.md")
    assert "not a medical device" in card.text.lower() and "synthetic" in card.text.lower()
    assert "trust_remote_code=True" in card.text


def test_classification_run(shared):
    out = shared["base"] / "cls"
    proc = run_train(
        tiny_args(shared, out, "--task", "classification", "--max_steps", "2", "--report_to", "tensorboard")
    )
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["task"] == "classification" and "balanced_accuracy" in summary["grading"]
    assert "grade acc" in proc.stdout
    meta = json.loads((out / "config.json").read_text())
    assert meta["architectures"] == ["EmrFuseForImageClassification"]
    assert list((out / "logs").rglob("events.out.tfevents.*")), "tensorboard logs"


def test_resume_gives_the_same_weights(shared):
    """Interrupted at step 2 (checkpoint), resumed in a fresh process == uninterrupted 4 steps."""
    full, part = shared["base"] / "resume-full", shared["base"] / "resume-part"
    common = ["--task", "segmentation", "--max_steps", "4", "--checkpointing_steps", "2", "--seed", "3"]
    run_train(tiny_args(shared, full, *common))
    run_train(tiny_args(shared, part, *common, "--stop_after_steps", "2"))
    assert not (part / "model.safetensors").exists() and (part / "checkpoints" / "checkpoint-2").is_dir()
    proc = run_train(tiny_args(shared, part, *common, "--resume_from_checkpoint", "latest"))
    assert "resumed from" in proc.stderr + proc.stdout
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys()
    diffs = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a}
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]


def test_two_processes_synchronise_and_gather_each_case_once(shared, tmp_path):
    """torchrun --nproc_per_node 2: identical weights on both ranks, one writer, each case evaluated once."""
    out = shared["base"] / "ddp"
    probe = tmp_path / "probe_train.py"
    probe.write_text(
        "import hashlib, os, runpy, sys\n"
        "from modeling_emrfuse.training import plan\n"
        "probe_dir = sys.argv.pop()\n"
        "orig = plan.train_one\n"
        "def spy(*a, **k):\n"
        "    summary, state = orig(*a, **k)\n"
        "    h = hashlib.sha256(b''.join(state[n].float().numpy().tobytes() for n in sorted(state))).hexdigest()\n"
        "    open(os.path.join(probe_dir, f\"rank{os.environ['RANK']}.txt\"), 'w').write(h)\n"
        "    return summary, state\n"
        "plan.train_one = spy\n"
        f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n"
    )
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    args = tiny_args(
        shared,
        out,
        "--task",
        "segmentation",
        "--max_steps",
        "2",
        "--demo_cases",
        "7",
        "--demo_data_dir",
        str(tmp_path / "data7"),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(probe),
        *args,
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "2 process(es)" in proc.stderr + proc.stdout
    h0, h1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert h0 == h1
    rows = (out / "eval" / "per_case.csv").read_text().strip().splitlines()[1:]
    ids = [r.split(",")[0] for r in rows]
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert len(ids) == len(set(ids)) == summary["num_cases"] == 3  # 7 cases, 3 held out: uneven over 2 ranks
    assert proc.stdout.count("eval step 2/2") == 1  # one writer of the log line


def test_demo_default_trains_segmentation_then_grading_and_pushes(shared):
    """`--demo` without --task: segmentation, then the grading run from its weights; push_to_hub mocked."""
    out = shared["base"] / "demo"
    args = tiny_args(
        shared,
        out,
        "--max_steps",
        "2",
        "--grading_max_steps",
        "2",
        "--push_to_hub",
        "--hub_model_id",
        "someone/emrfuse-tiny",
    )
    with mock.patch("huggingface_hub.HfApi") as api_cls:
        api = api_cls.return_value
        api.create_repo.side_effect = lambda repo_id, **kw: mock.Mock(repo_id=repo_id)
        summary = train.main(args)
    assert summary["grading"] is not None and "segmentation" in summary
    grading = out / "grading"  # written once, inside the model folder: no <out>-grading copy
    assert json.loads((grading / "config.json").read_text())["architectures"] == ["EmrFuseForImageClassification"]
    assert not Path(str(out) + "-grading").exists()
    pushed = {c.kwargs["repo_id"]: c.kwargs for c in api.upload_folder.call_args_list}
    # one repo serves both heads: the grading model travels in grading/, with the pipeline
    assert set(pushed) == {"someone/emrfuse-tiny"}
    config = json.loads((out / "config.json").read_text())
    assert config["grading_model"] == "grading" and "glioma-analysis" in config["custom_pipelines"]
    assert (out / "grading" / "config.json").exists() and (out / "pipeline_emrfuse.py").exists()
    assert pushed["someone/emrfuse-tiny"]["folder_path"] == str(out)
    assert {"checkpoints/**", "grading/checkpoints/**"} <= set(pushed["someone/emrfuse-tiny"]["ignore_patterns"])


def test_ablation_writes_table_and_chart(shared):
    out = shared["base"] / "ablation"
    proc = run_train(
        tiny_args(
            shared,
            out,
            "--ablation",
            "table3",
            "--ablation_seeds",
            "0",
            "1",
            "--max_steps",
            "1",
            "--grading_max_steps",
            "0",
        )
    )
    table = (out / "ablation-table3" / "table3.md").read_text()
    for label in (
        "Complete model",
        "Without modality alignment",
        "Without self-attention",
        "Without residual connection",
        "Without dynamic feature weighting",
        "Complete model, reports shuffled across cases (control)",
    ):
        assert label in table
    assert "±" in table and "SYNTHETIC DEMO DATA" in table
    assert "Parts of each row: Complete model: image; report" in table and "cross-attention" not in table
    assert (out / "ablation-table3" / "table3.png").stat().st_size > 1000
    data = json.loads((out / "ablation-table3" / "table3.json").read_text())
    assert [len(r["runs"]) for r in data["rows"]] == [2] * 6
    assert "Δ Dice WT vs complete (pts)" in table and "(reference)" in table  # paired differences to the complete model
    assert data["rows"][1]["paired_difference_to_complete"]["dice_WT"]["n_cases"] == 2  # the 2 held-out cases
    assert data["rows"][-1]["preset"] == "shuffled_reports"
    assert "Complete model" in proc.stdout


# ------------------------------------------------------------------------------------------ helpers
class _FakeAccelerator:
    is_main_process = True
    process_index = 0
    num_processes = 1

    def __init__(self):
        self.saved = []

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"x")
        self.saved.append(path)


def test_checkpoints_are_atomic_and_latest_skips_incomplete(tmp_path):
    acc = _FakeAccelerator()
    for step in (2, 4, 6):
        checkpoints.save_checkpoint(acc, tmp_path, {"global_step": step}, total_limit=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    # a save killed half-way leaves a temp folder; a folder without training_state.json is incomplete
    (root / ".tmp-checkpoint-8").mkdir()
    (root / "checkpoint-9").mkdir()
    assert checkpoints.resolve_checkpoint("latest", tmp_path) == root / "checkpoint-6"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpoints.resolve_checkpoint(str(root / "checkpoint-9"), tmp_path)
    checkpoints.save_checkpoint(acc, tmp_path, {"global_step": 10}, total_limit=2)
    assert not (root / ".tmp-checkpoint-8").exists()
    assert checkpoints.resolve_checkpoint("latest", tmp_path) == root / "checkpoint-10"
    assert checkpoints.resolve_checkpoint("latest", tmp_path / "nothing-here") is None


def test_model_switches_from_presets_and_flags():
    args = train.parse_args(["--demo", "--preset", "plus_alignment"])
    assert train.model_switches(args) == {
        "use_text": True,
        "use_alignment": True,
        "use_self_attention": False,
        "use_residual": False,
        "use_dynamic_weighting": False,
        "use_cross_attention": False,
    }
    args = train.parse_args(["--demo", "--no_residual"])
    assert train.model_switches(args)["use_residual"] is False and train.model_switches(args)["use_alignment"] is True
    args = train.parse_args(["--demo", "--no_text"])
    assert not any(train.model_switches(args).values())
    with pytest.raises(SystemExit):
        train.parse_args(["--demo", "--preset", "nonsense"])
    with pytest.raises(SystemExit):
        train.parse_args([])  # neither data nor --demo
    for folds in ("1", "-2"):
        with pytest.raises(SystemExit, match="--grading_calibration_folds must be 0"):
            train.parse_args(["--demo", "--grading_calibration_folds", folds])
    assert train.parse_args(["--demo"]).grading_calibration_folds == 3


def test_augmentation_and_clip_percentiles_options(monkeypatch):
    from modeling_emrfuse.training.model_setup import build_processor

    default = train.parse_args(["--demo"])
    assert default.augmentation == "paper" and default.clip_percentiles is None
    settings = TrainingSettings.from_args(default)
    assert settings.loader.augmentation == "paper" and settings.model.clip_percentiles is None
    assert train.parse_args(["--demo", "--no_augmentation"]).augmentation == "none"
    args = train.parse_args(["--demo", "--augmentation", "monai", "--clip_percentiles", "0.5", "99.5"])
    settings = TrainingSettings.from_args(args)
    assert settings.loader.augmentation == "monai" and settings.model.clip_percentiles == (0.5, 99.5)
    processor = build_processor(settings.model, None)  # the processor saved with the model carries the setting
    assert processor.image_processor.clip_percentiles == (0.5, 99.5)
    with pytest.raises(SystemExit, match="clip_percentiles"):
        train.parse_args(["--demo", "--clip_percentiles", "99", "1"])
    monkeypatch.setitem(sys.modules, "monai", None)  # an environment without MONAI
    with pytest.raises(SystemExit, match="pip install monai"):
        train.parse_args(["--demo", "--augmentation", "monai"])
    assert train.parse_args(["--demo"]).augmentation == "paper"  # the default never needs MONAI


# ------------------------------------------------------------------------------------------ defaults, warm start, selection
def test_defaults_come_from_one_table_and_the_users_value_wins():
    demo, real = train.parse_args(["--demo"]), train.parse_args(["--data_dir", "x"])
    for key, (demo_value, real_value) in train.DATA_DEFAULTS.items():
        assert getattr(demo, key) == demo_value and getattr(real, key) == real_value, key
    assert train.parse_args(["--demo", "--learning_rate", "0.5", "--max_steps", "7"]).learning_rate == 0.5
    demo_schedule, real_schedule = TrainingSettings.from_args(demo).schedule, TrainingSettings.from_args(real).schedule
    assert demo_schedule.stage("main") == (200, 2e-3)
    assert demo_schedule.stage("grading") == (120, 2e-3)
    assert real_schedule.stage("main") == (None, 1e-4)  # real data: --num_epochs (50) decides
    assert real.num_epochs == 50 and demo.batch_size == real.batch_size == 16
    assert train.parse_args(["--demo", "--ablation", "table1"]).output_dir == train.DEMO_OUTPUT_DIR + "-ablations"


def test_warm_start_from_a_folder_and_from_memory_load_the_same_shared_weights(tmp_path):
    from conftest import build_tiny_model_folder
    from safetensors.torch import load_file

    folder = build_tiny_model_folder(tmp_path / "seg", with_grading=False, with_pipeline=False)
    saved = load_file(str(folder / "model.safetensors"))
    args = train.parse_args(["--demo"])
    switches = train.model_switches(args)
    from_folder = build_model(
        TrainingSettings.from_args(args).model, None, "classification", switches, config_from=folder
    )
    WarmStart.from_folder(folder).apply(from_folder, "test")
    from_memory = build_model(
        TrainingSettings.from_args(args).model, None, "classification", switches, config_from=folder
    )
    WarmStart(source="a state dict", state=saved).apply(from_memory, "test")
    shared = [k for k in from_folder.state_dict() if k in saved]
    assert len(shared) > 100 and any(k.startswith("classifier.") for k in from_folder.state_dict())
    for key in shared:  # towers and fusion head: the saved weights, whichever the source
        assert torch.equal(from_folder.state_dict()[key], saved[key]), key
        assert torch.equal(from_memory.state_dict()[key], saved[key]), key
    other = {k: (v[:1] if v.ndim else v) for k, v in saved.items()}  # another model size
    with pytest.raises(SystemExit, match="do not fit this model"):
        WarmStart(source="other", state=other).apply(from_memory, "test")


def test_best_model_selection():
    net = torch.nn.Linear(2, 1)
    best = BestModel()
    assert best.is_better(float("nan"))  # the first evaluation always gives weights
    best.keep(0.5, 10, {"s": 1}, [], None, net)
    assert not best.is_better(0.4) and not best.is_better(float("nan")) and best.is_better(0.6)
    with torch.no_grad():
        net.weight.add_(1.0)
    assert not torch.equal(best.state["weight"], net.weight)  # a copy, not a view of the live weights
    resumed = BestModel(metric=0.9, step=30)  # from a checkpoint: metric known, weights not
    assert resumed.is_better(0.1)


def test_eval_steps_needs_a_validation_split():
    """Best-model selection on the test cases, then scored on them, is refused."""
    with pytest.raises(SystemExit, match="needs a validation split"):
        train.parse_args(["--demo", "--eval_steps", "10"])  # the demo has no validation split by default
    with pytest.raises(SystemExit, match="needs a validation split"):
        train.parse_args(["--data_dir", "x", "--val_fraction", "0", "--eval_steps", "10"])
    with pytest.raises(SystemExit, match=">= 1"):
        train.parse_args(["--data_dir", "x", "--eval_steps", "0"])
    assert train.parse_args(["--data_dir", "x", "--eval_steps", "10"]).val_fraction == 0.1  # real data: a split
    assert train.parse_args(["--demo", "--val_fraction", "0.2", "--eval_steps", "10"]).eval_steps == 10


def test_shuffled_reports_run_swaps_reports_within_each_split():
    from types import SimpleNamespace

    cases = [SimpleNamespace(case_id=f"BraTS20_Training_{i:03d}") for i in range(1, 13)]
    reports = {c.case_id: f"synthetic report {i}" for i, c in enumerate(cases)}
    run = RunData(
        data_dir=Path("."),
        train_cases=cases[:8],
        eval_cases=cases[8:],
        val_cases=[],
        reports=reports,
        synthetic=True,
        release="2020",
        text_model=None,
    )
    shuffled = shuffled_reports_run(run)
    assert shuffled.reports is not run.reports and run.reports == reports  # the run itself is untouched
    assert shuffled.train_cases == run.train_cases and shuffled.eval_cases == run.eval_cases
    for split in (run.train_cases, run.eval_cases):
        ids = [c.case_id for c in split]
        assert sorted(shuffled.reports[i] for i in ids) == sorted(reports[i] for i in ids)
        assert all(shuffled.reports[i] != reports[i] for i in ids)


def test_cross_attention_flag():
    assert train.model_switches(train.parse_args(["--demo"]))["use_cross_attention"] is False  # the paper's model
    assert train.model_switches(train.parse_args(["--demo", "--cross_attention"]))["use_cross_attention"] is True
    assert train.model_switches(train.parse_args(["--demo", "--preset", "full_cross_attention"]))["use_cross_attention"]
    assert not train.model_switches(train.parse_args(["--demo", "--no_text", "--cross_attention"]))[
        "use_cross_attention"
    ]


# ------------------------------------------------------------------------------------------ --grading_fit head
def test_grading_fit_head_keeps_the_towers_and_fits_the_rest(shared):
    """`--grading_fit head`: the grading model's towers are the segmentation run's, bit for bit; the rest moved."""
    out = shared["base"] / "head-fit"
    summary = train.main(
        tiny_args(
            shared,
            out,
            "--max_steps",
            "2",
            "--grading_max_steps",
            "5",
            "--grading_fit",
            "head",
            "--grading_calibration_folds",
            "2",
        )
    )  # 2 training cases of each grade
    assert summary["grading"] is not None and summary["grading_run"]["steps"] == 5
    seg, grading = weights(out), weights(out / "grading")
    towers = [k for k in seg if k.startswith(("emrfuse.vision_model.", "emrfuse.text_model."))]
    assert towers and all(torch.equal(seg[k], grading[k]) for k in towers)
    head = [k for k in seg if k.startswith("emrfuse.") and k not in towers]
    assert any(not torch.equal(seg[k], grading[k]) for k in head)
    assert "classifier.weight" in grading
    assert json.loads((out / "grading" / "eval" / "summary.json").read_text())["grading_fit"] == "head"
    assert json.loads((out / "grading" / "config.json").read_text())["grading_pooling"] == "tumour"  # demo default
    card = (out / "grading" / "README.md").read_text()
    assert (
        "| `grading_fit` | `head` |" in card and "grading bag policy" in card
    )  # the card says how it was fitted and graded
    calibration = summary["grading_run"]["calibration"]
    assert calibration["folds"] == 2 and calibration["temperature"] > 0
    assert f"temperature-scaled (T = {calibration['temperature']:.3g}" in card
    grading_summary = json.loads((out / "grading" / "eval" / "summary.json").read_text())["grading"]
    assert 0 < grading_summary["log_loss"] and 0 <= grading_summary["brier"] <= 1


def test_grading_fit_finetune_trains_the_whole_model(shared):
    """`--grading_fit finetune`: the earlier recipe, every part of the model trained on slice bags."""
    out = shared["base"] / "finetune-fit"
    summary = train.main(
        tiny_args(shared, out, "--max_steps", "2", "--grading_max_steps", "2", "--grading_fit", "finetune")
    )
    assert summary["grading"] is not None and summary["grading_run"]["steps"] == 2
    seg, grading = weights(out), weights(out / "grading")
    assert any(
        not torch.equal(seg[k], grading[k])
        for k in seg
        if k.startswith("emrfuse.vision_model.") and k.endswith(".weight")
    )


def test_grading_pooling_defaults_and_the_finetune_combination():
    """The demo pools the predicted tumour, real data the slices; finetune (no masks in its slice bags) keeps the
    slices and refuses an explicit tumour."""
    assert train.parse_args(["--demo"]).grading_pooling == "tumour"
    assert train.parse_args(["--data_dir", "x"]).grading_pooling == "slices"
    assert train.parse_args(["--demo", "--grading_fit", "finetune"]).grading_pooling == "slices"
    with pytest.raises(SystemExit, match="--grading_pooling tumour is fitted with --grading_fit head"):
        train.parse_args(["--demo", "--grading_fit", "finetune", "--grading_pooling", "tumour"])


def test_fit_grading_head_learns_a_grade_that_the_tower_features_carry():
    """Full-batch steps on frozen features: a grade written into the pooled image features is learnt (training
    accuracy 1), the towers are left untouched, and the same seed gives the same weights."""
    from types import SimpleNamespace

    from conftest import tiny_config

    from modeling_emrfuse.modeling_emrfuse import EmrFuseForImageClassification

    args = grading_head.HeadFitSettings(
        OptimizerSettings(weight_decay=1e-4, lr_scheduler="cosine", warmup_steps=5, max_grad_norm=1.0),
        grading_sampling="balanced",
        cases_per_group=2,
        logging_steps=10,
    )
    acc = SimpleNamespace(device=torch.device("cpu"), is_local_main_process=False)

    def fitted(seed):
        torch.manual_seed(0)
        net = EmrFuseForImageClassification(tiny_config())
        d_i, d_t = net.emrfuse.image_dim, net.emrfuse.text_dim
        gen = torch.Generator().manual_seed(1)
        direction = torch.randn(d_i, generator=gen)
        feats = []
        for k in range(12):
            label = k % 2
            gap = torch.randn(4, d_i, generator=gen) + 2.0 * (1 if label else -1) * direction
            ids = torch.tensor([2, 5, 6, 7, 3])
            feats.append(
                grading_head.CaseTowerFeatures(
                    case_id=f"c{k:02d}",
                    label=label,
                    gap=gap,
                    input_ids=ids,
                    attention_mask=torch.ones(5, dtype=torch.long),
                    has_report=True,
                    text_hidden=torch.randn(5, d_t, generator=gen),
                )
            )
        before = {
            k: v.clone()
            for k, v in net.state_dict().items()
            if ".vision_model." in f".{k}" or ".text_model." in f".{k}"
        }
        user_frozen = next(net.emrfuse.vision_model.parameters())
        user_frozen.requires_grad_(False)  # a tower parameter the caller had frozen stays frozen afterwards
        grading_head.fit_grading_head(args, acc, net, feats, max_steps=60, learning_rate=5e-3, seed=seed, desc="test")
        assert all(torch.equal(before[k], net.state_dict()[k]) for k in before)
        assert not user_frozen.requires_grad and all(p.requires_grad for p in net.emrfuse.text_model.parameters())
        net.eval()
        with torch.no_grad():
            logits = net.forward_from_tower_features(**grading_head.tower_feature_batch(feats, "cpu")).logits
        return net, (logits.argmax(-1) == torch.tensor([f.label for f in feats])).float().mean().item()

    net_a, accuracy = fitted(0)
    assert accuracy == 1.0
    net_b, _ = fitted(0)
    assert all(torch.equal(v, net_b.state_dict()[k]) for k, v in net_a.state_dict().items())


def test_grading_folds_are_a_stratified_seeded_partition():
    labels = [0] * 10 + [1] * 5
    folds = grading_head.grading_folds(labels, 3, seed=4)
    assert sorted(i for f in folds for i in f) == list(range(15))  # every case in exactly one fold
    assert [sum(labels[i] for i in f) for f in folds] in ([2, 2, 1], [2, 1, 2], [1, 2, 2])  # each fold 1-2 of the 5 LGG
    assert all(len(f) == 5 for f in folds)
    assert folds == grading_head.grading_folds(labels, 3, seed=4) and folds != grading_head.grading_folds(
        labels, 3, seed=5
    )


def test_fit_temperature_minimises_the_log_loss():
    from scipy.optimize import minimize_scalar

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (60,), generator=gen)
    logits = torch.randn(60, 2, generator=gen) * 6 + 2.0 * torch.nn.functional.one_hot(labels, 2)  # overconfident
    t = grading_head.fit_temperature(logits, labels)

    def nll(log_t):
        return torch.nn.functional.cross_entropy(logits.double() / math.exp(log_t), labels).item()

    best = math.exp(minimize_scalar(nll, bounds=(math.log(0.05), math.log(50)), method="bounded").x)
    assert t > 1 and t == pytest.approx(best, rel=0.01)


def test_calibration_scales_the_head_without_changing_a_grade_and_helps_held_out_cases():
    """An over-fitted head on a weak planted grade: cross-fitted temperature scaling divides its logits by T > 1
    (every predicted grade stays), and held-out cases that played no part get a lower log loss."""
    from types import SimpleNamespace

    from conftest import tiny_config

    from modeling_emrfuse.modeling_emrfuse import EmrFuseForImageClassification

    acc = SimpleNamespace(device=torch.device("cpu"), is_local_main_process=False)
    torch.manual_seed(0)
    net = EmrFuseForImageClassification(tiny_config())
    d_i, d_t = net.emrfuse.image_dim, net.emrfuse.text_dim
    gen = torch.Generator().manual_seed(1)
    direction = torch.randn(d_i, generator=gen)

    def cases(n, prefix):
        out = []
        for k in range(n):
            label = k % 2
            gap = torch.randn(4, d_i, generator=gen) + 0.15 * (1 if label else -1) * direction
            out.append(
                grading_head.CaseTowerFeatures(
                    case_id=f"{prefix}{k:02d}",
                    label=label,
                    gap=gap,
                    input_ids=torch.tensor([2, 5, 3]),
                    attention_mask=torch.ones(3, dtype=torch.long),
                    has_report=True,
                    text_hidden=torch.randn(3, d_t, generator=gen),
                )
            )
        return out

    feats, held_out = cases(24, "t"), cases(40, "h")
    args = grading_head.HeadFitSettings(
        OptimizerSettings(weight_decay=1e-4, lr_scheduler="cosine", warmup_steps=5, max_grad_norm=1.0),
        grading_sampling="balanced",
        cases_per_group=6,
        logging_steps=10,
        calibration_folds=3,
    )
    initial = grading_head._head_state(net)
    grading_head.fit_grading_head(args, acc, net, feats, max_steps=200, learning_rate=2e-2, seed=0, desc="test")
    raw = grading_head.head_logits(net, held_out, "cpu")
    towers = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(grading_head.TOWER_PREFIXES)}
    rng = torch.get_rng_state()
    result = grading_head.calibrate_grading_head(args, acc, net, feats, initial, 200, 2e-2, 0, "test")
    assert torch.equal(torch.get_rng_state(), rng)  # what runs next draws the same numbers as without calibration
    scaled = grading_head.head_logits(net, held_out, "cpu")
    t = result["temperature"]
    assert t > 1 and result["folds"] == 3
    torch.testing.assert_close(scaled, raw / t, rtol=1e-4, atol=1e-5)  # the same head, its logits divided by T
    assert torch.equal(scaled.argmax(-1), raw.argmax(-1))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in towers.items())
    y = torch.tensor([f.label for f in held_out])
    assert F.cross_entropy(scaled, y) < F.cross_entropy(raw, y)
    assert result["out_of_fold_log_loss"][1] <= result["out_of_fold_log_loss"][0]
    # too few cases of a grade for the folds: no calibration, and the head is left as it was
    args = dataclasses.replace(args, calibration_folds=13)
    assert grading_head.calibrate_grading_head(args, acc, net, feats, initial, 200, 2e-2, 0, "test") is None
    torch.testing.assert_close(grading_head.head_logits(net, held_out, "cpu"), scaled)


# ------------------------------------------------------------------------------------------ data that cannot make a run
class _OneProcess:
    is_main_process = True

    def wait_for_everyone(self):
        pass


def test_single_case_that_cannot_be_split_is_a_clear_error(tmp_path):
    from datasets_scripts.demo_data import write_demo_dataset
    from modeling_emrfuse.training.data import RunDataError, SplitSettings, prepare_run_data, split_run_cases

    folder = write_demo_dataset(tmp_path / "one", n_cases=1, size=(16, 16, 16))
    settings = train.data_settings(
        train.parse_args(["--demo", "--data_dir", str(folder), "--no_text", "--cache_dir", str(tmp_path / "c")])
    )
    with pytest.raises(RunDataError, match="cannot be split into training and held-out cases.*--eval_fraction 0"):
        prepare_run_data(settings, _OneProcess())
    run = prepare_run_data(dataclasses.replace(settings, split=SplitSettings(eval_fraction=0.0)), _OneProcess())
    assert len(run.train_cases) == 1 and not run.eval_cases  # --eval_fraction 0: trains on the one case
    two_scans = [mock.Mock(case_id="a"), mock.Mock(case_id="b")]  # two scans of one patient stay together
    with pytest.raises(RunDataError, match="2 case\\(s\\) of one patient"):
        split_run_cases(two_scans, SplitSettings(eval_fraction=0.5), patients={"a": "P1", "b": "P1"})


def test_empty_data_folder_is_one_line_and_exit_code_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--data_dir",
        str(empty),
        "--no_text",
        "--report_to",
        "none",
        "--output_dir",
        str(tmp_path / "out"),
        "--cache_dir",
        str(tmp_path / "cache"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("train.py: error: ")
        and str(empty) in last
        and "no BraTS cases found" in last
        and "--data_dir" in last
    )


# ------------------------------------------------------------------------------------------ grading control, repeatability
@pytest.fixture(scope="module")
def demo_twice(shared):
    """The demo's two stages (segmentation, then grading), run twice with the same seed into two folders; the second
    run builds its own text tower and slice cache (a cache folder of its own), as a fresh run does, in a process
    whose str hashing differs (PYTHONHASHSEED)."""
    outs = [shared["base"] / f"repeat{k}" for k in (1, 2)]
    caches = [shared["cache"], shared["base"] / "cache-repeat2"]
    for k, (out, cache) in enumerate(zip(outs, caches)):
        args = ["--max_steps", "2", "--grading_max_steps", "2", "--seed", "3", "--cache_dir", str(cache)]
        run_train(tiny_args(shared, out, *args), env={"PYTHONHASHSEED": str(k)})
    return [json.loads((out / "eval" / "run_summary.json").read_text()) for out in outs], outs


def _reference_fraction(case_dir: Path) -> float:
    """ET voxels / tumour voxels of a case's reference label map (BraTS 2017+ labels: ET is 4, tumour non-zero)."""
    import nibabel as nib

    seg = np.asarray(nib.load(str(next(case_dir.glob("*_seg.nii.gz")))).dataobj)
    return float(np.count_nonzero(seg == 4)) / float(np.count_nonzero(seg))


def _best_balanced_accuracy(x, y) -> float:
    """Best balanced accuracy of a one-threshold rule (either direction) on features ``x`` and LGG flags ``y``."""
    x, y = np.asarray(x), np.asarray(y, dtype=bool)
    best = 0.0
    for t in np.concatenate([[x.min() - 1], (np.sort(x)[:-1] + np.sort(x)[1:]) / 2, [x.max() + 1]]):
        for pred in (x < t, x > t):
            best = max(best, 0.5 * (np.mean(pred[y]) + np.mean(~pred[~y])))
    return best


def test_demo_run_reports_the_enhancing_fraction_control(demo_twice, shared):
    """The control: threshold fitted on the training cases' reference maps, applied to the held-out predicted maps."""
    from modeling_emrfuse.pipeline_emrfuse import load_pipeline

    (summary, _), (out, _) = demo_twice
    control = summary["grading_control"]
    grades = {
        line.split(",")[-1]: line.split(",")[0]
        for line in (shared["data"] / "name_mapping.csv").read_text().split()[1:]
    }
    held_out = sorted(control["cases"])
    training = sorted(set(grades) - set(held_out))
    assert len(held_out) == 2 and control["num_train_cases"] == len(training) == 4
    # fitted on the training cases' reference maps: the best balanced accuracy of any threshold on them
    train_x = [_reference_fraction(shared["data"] / c) for c in training]
    train_y = [grades[c] == "LGG" for c in training]
    rule = control["rule"]
    assert rule["train_balanced_accuracy"] == pytest.approx(_best_balanced_accuracy(train_x, train_y))
    # applied to the predicted label maps of the held-out cases (the pipeline's: evaluation runs the same path)
    pipe = load_pipeline(str(out), device="cpu", precision="fp32", optimize=False)
    for case in held_out:
        label_map = pipe(str(shared["data"] / case))["label_map"]
        expected = np.count_nonzero(label_map == 4) / max(np.count_nonzero(label_map), 1)
        assert control["cases"][case]["enhancing_fraction"] == pytest.approx(expected, abs=0.02)
        lgg = (expected < rule["threshold"]) == rule["lgg_below"]
        assert control["cases"][case]["pred_grade"] == ("LGG" if lgg else "HGG")
    accuracy = np.mean([control["cases"][c]["pred_grade"] == grades[c] for c in held_out])
    assert control["metrics"]["accuracy"] == pytest.approx(accuracy)
    # next to the model's grading figure: per-case CSV, the grading report and the printed tables
    per_case = (out / "eval" / "per_case.csv").read_text()
    assert "enhancing_fraction" in per_case.splitlines()[0]
    grading_report = (out / "grading" / "eval" / "summary.md").read_text()
    assert "Control: enhancing fraction of the predicted tumour" in grading_report
    assert json.loads((out / "grading" / "eval" / "summary.json").read_text())["grading_control"]["rule"] == rule


def test_same_seed_gives_the_same_figures(demo_twice, shared):
    """Two runs with the same command and seed: identical metrics; the determinism settings are recorded."""
    (first, second), _ = demo_twice
    for key in ("segmentation", "grading", "grading_control", "case_enhancing_fraction"):
        a, b = dict(first[key]), dict(second[key])
        assert a == b, key
    assert (
        first["determinism"]["seed"] == 3 and first["determinism"]["settings"]["use_deterministic_algorithms"] is True
    )
    assert first["determinism"]["threads"] == 1  # OMP_NUM_THREADS of the test environment
    assert any("machines" in note for note in first["determinism"]["not_deterministic"])  # what stays open is named
    # the demo text tower, built anew in each run's own process, is the same: its vocabulary is counted, not learned
    assert not any("WordPiece" in note for note in first["determinism"]["not_deterministic"])
    towers = [next(Path(c).glob("demo-text-tower-*")) for c in (shared["cache"], shared["base"] / "cache-repeat2")]
    assert (towers[0] / "tokenizer.json").read_bytes() == (towers[1] / "tokenizer.json").read_bytes()


def test_shuffle_reports_swaps_reports_within_each_split(tmp_path):
    from collections import Counter

    from datasets_scripts.demo_data import write_demo_dataset
    from modeling_emrfuse.training.data import RunDataError, prepare_run_data, shuffled_reports

    folder = write_demo_dataset(tmp_path / "ten", n_cases=10, size=(16, 16, 16))
    argv = ["--demo", "--data_dir", str(folder), "--eval_fraction", "0.3", "--cache_dir", str(tmp_path / "c")]
    plain = prepare_run_data(train.data_settings(train.parse_args(argv)), _OneProcess())
    shuffled = prepare_run_data(train.data_settings(train.parse_args(argv + ["--shuffle_reports"])), _OneProcess())
    for cases_a, cases_b in ((plain.train_cases, shuffled.train_cases), (plain.eval_cases, shuffled.eval_cases)):
        ids = [c.case_id for c in cases_a]
        assert ids == [c.case_id for c in cases_b]  # the same split
        assert Counter(plain.reports[i] for i in ids) == Counter(shuffled.reports[i] for i in ids)  # same reports
        assert all(plain.reports[i] != shuffled.reports[i] for i in ids)  # none keeps its own
    one_reported = [[mock.Mock(case_id="a"), mock.Mock(case_id="b")], [mock.Mock(case_id="c")]]
    with pytest.raises(RunDataError, match="--shuffle_reports: .*single case with a report"):
        shuffled_reports({"a": "x", "b": "y", "c": "z"}, one_reported, {})
    with pytest.raises(SystemExit, match="--no_text and --shuffle_reports exclude each other"):
        train.parse_args(argv + ["--shuffle_reports", "--no_text"])  # nothing to shuffle without the text tower


def test_no_reports_keeps_the_text_tower_but_gives_no_case_a_report(tmp_path):
    from datasets_scripts.demo_data import write_demo_dataset
    from modeling_emrfuse.training.data import RunDataError, prepare_run_data
    from modeling_emrfuse.training.offline_text_tower import minilm_folder

    folder = write_demo_dataset(tmp_path / "six", n_cases=6, size=(16, 16, 16))
    argv = ["--demo", "--data_dir", str(folder), "--cache_dir", str(tmp_path / "c")]
    with pytest.raises(RunDataError, match="--no_reports with --demo needs --text_model"):
        prepare_run_data(train.data_settings(train.parse_args(argv + ["--no_reports"])), _OneProcess())
    argv += ["--text_model", str(minilm_folder(tmp_path / "towers"))]
    args = train.parse_args(argv + ["--no_reports"])
    switches = train.model_switches(args)  # the complete model: text tower and fusion head on
    assert switches == train.model_switches(train.parse_args(argv)) and switches["use_text"]
    run = prepare_run_data(train.data_settings(args), _OneProcess())
    assert all(r is None for r in run.reports.values()) and run.text_model is not None
    for pair in (["--no_reports", "--no_text"], ["--no_reports", "--shuffle_reports"]):
        with pytest.raises(SystemExit, match="exclude each other"):
            train.parse_args(argv + pair)
