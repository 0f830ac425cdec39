"""The transformers custom pipeline (modeling_emrfuse/pipeline_emrfuse.py) on tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import build_tiny_model_folder, write_small_case

from modeling_emrfuse.brats_io import load_case
from modeling_emrfuse.brats_labels import SEQUENCES, get_label_convention, label_map_to_regions
from modeling_emrfuse.pipeline_emrfuse import PIPELINE_TASK, EmrFusePipeline, load_pipeline, region_volumes_cm3

REPORT = "Irregular ring enhancing mass in the left frontal lobe with central necrosis and surrounding oedema."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_folder(tmp_path_factory.mktemp("pipeline") / "model")


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    return write_small_case(tmp_path_factory.mktemp("pipeline-data"))


@pytest.fixture(scope="module")
def pipe(model_dir):
    return load_pipeline(str(model_dir), device="cpu")


def _paths(case_dir: Path):
    return {s: str(next(case_dir.glob(f"*_{s}.nii.gz"))) for s in SEQUENCES}


def test_folder_registers_the_pipeline(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    entry = config["custom_pipelines"][PIPELINE_TASK]
    assert entry["impl"] == "pipeline_emrfuse.EmrFusePipeline"
    assert "AutoModelForSemanticSegmentation" in entry["pt"]
    assert config["grading_model"] == "grading"
    for name in ("pipeline_emrfuse.py", "brats_labels.py", "modeling_emrfuse.py", "processing_emrfuse.py"):
        assert (model_dir / name).is_file(), name


def test_pipeline_outputs(pipe, case_dir):
    out = pipe(_paths(case_dir), report=REPORT)
    ref = nib.load(_paths(case_dir)["t1"])
    assert out["label_map"].shape == ref.shape and out["label_map"].dtype == np.uint8
    assert np.allclose(out["affine"], ref.affine)
    assert set(np.unique(out["label_map"])) <= set(get_label_convention(out["label_convention"]).valid_labels)
    assert out["label_convention"] == "brats2017"
    # volumes from the label map and the header's voxel size
    regions = label_map_to_regions(out["label_map"], out["label_convention"])
    for i, r in enumerate(("WT", "TC", "ET")):
        assert out["region_volumes_cm3"][r] == pytest.approx(regions[i].sum() / 1000.0)
    probs = out["grade_probabilities"]
    assert set(probs) == {"HGG", "LGG"} and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert out["grade"] == max(probs, key=probs.get)
    assert 0.0 < out["alpha_text"] < 1.0 and 0.0 < out["alpha_image"] < 1.0
    assert out["has_report"] and not out["report_truncated"] and out["report_source"] == "argument"
    assert out["tokens"][0] == "[CLS]" and len(out["tokens"]) == len(out["token_attention"])
    assert sum(out["token_attention"]) == pytest.approx(1.0, abs=1e-3)
    assert [w["word"] for w in out["words"]][:3] == ["Irregular", "ring", "enhancing"]
    for w in out["words"]:
        assert REPORT[w["start"] : w["end"]] == w["word"]
    assert out["model_id"] == str(Path(pipe.model.config._name_or_path).resolve())
    assert out["revision"].startswith("sha256:") and out["grading_model_id"].endswith("grading")
    assert set(out["timings"]) >= {"load", "preprocess", "model", "postprocess", "text_encoder"}
    # the report is encoded once per model per case (segmentation + grading), not once per slice
    assert out["timings"]["text_encoder_calls"] == 2


def test_missing_report_and_case_report(pipe, case_dir, tmp_path):
    out = pipe(str(case_dir))
    assert not out["has_report"] and out["tokens"] is None and out["report_source"] is None
    assert out["label_map"] is not None and out["grade_probabilities"] is not None
    # a TextBraTS-style report file in the case folder is used when no report is given
    folder = write_small_case(tmp_path, case_id="Case_002")
    (folder / "Case_002_flair_text.txt").write_text(REPORT, encoding="utf-8")
    out = pipe(str(folder))
    assert out["has_report"] and out["report_source"] == "case folder"
    assert not pipe(str(folder), use_case_report=False)["has_report"]


def test_chunking_does_not_change_the_result(model_dir, case_dir):
    small = load_pipeline(str(model_dir), device="cpu", chunk_size=5, precision="fp32")
    large = load_pipeline(str(model_dir), device="cpu", chunk_size=64, precision="fp32")
    a = small(str(case_dir), report=REPORT, return_probabilities=True)
    b = large(str(case_dir), report=REPORT, return_probabilities=True)
    assert a["timings"]["text_encoder_calls"] == 2  # still once per model with 5 chunks of slices
    assert (
        np.abs(a["region_probabilities"].astype(np.float32) - b["region_probabilities"].astype(np.float32)).max() < 2e-3
    )
    assert a["grade_probabilities"]["HGG"] == pytest.approx(b["grade_probabilities"]["HGG"], abs=1e-4)


def test_bf16_autocast_close_to_fp32(model_dir, case_dir):
    fp32 = load_pipeline(str(model_dir), device="cpu", precision="fp32")(
        str(case_dir), report=REPORT, return_probabilities=True
    )
    bf16 = load_pipeline(str(model_dir), device="cpu", precision="bf16")(
        str(case_dir), report=REPORT, return_probabilities=True
    )
    diff = np.abs(fp32["region_probabilities"].astype(np.float32) - bf16["region_probabilities"].astype(np.float32))
    assert diff.max() < 0.05
    assert (fp32["label_map"] != bf16["label_map"]).mean() < 0.01
    assert abs(fp32["grade_probabilities"]["HGG"] - bf16["grade_probabilities"]["HGG"]) < 0.02


def test_grading_on_a_subset_of_slices(model_dir, case_dir):
    sub = load_pipeline(str(model_dir), device="cpu", grading_max_slices=4)
    out = sub(str(case_dir), report=REPORT)
    assert sum(out["grade_probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert out["label_map"].shape == nib.load(_paths(case_dir)["t1"]).shape


def test_inputs_arrays_images_and_2023_names(pipe, case_dir):
    paths = _paths(case_dir)
    imgs = {s: nib.load(p) for s, p in paths.items()}
    arrays = np.stack([np.asanyarray(imgs[s].dataobj) for s in SEQUENCES])
    from_images = pipe({"t1n": imgs["t1"], "t1c": imgs["t1ce"], "t2w": imgs["t2"], "t2f": imgs["flair"]}, report=REPORT)
    from_array = pipe(arrays, report=REPORT, affine=imgs["t1"].affine)
    assert from_images["label_convention"] == "brats2023"  # 2023 sequence names -> 2023 labels
    assert from_array["label_convention"] == "brats2017"
    assert np.allclose(from_array["affine"], imgs["t1"].affine)
    regions_a = label_map_to_regions(from_images["label_map"], "brats2023")
    regions_b = label_map_to_regions(from_array["label_map"], "brats2017")
    assert np.array_equal(regions_a, regions_b)  # same prediction, two label conventions


def test_region_volumes_use_the_voxel_size():
    label_map = np.zeros((10, 10, 10), dtype=np.uint8)
    label_map[:2, :5, :10] = 2  # 100 voxels of edema
    label_map[5, 5, 5] = 4
    vols = region_volumes_cm3(label_map, "brats2017", spacing=(2.0, 1.0, 1.5))
    assert vols == {
        "WT": pytest.approx(101 * 3.0 / 1000),
        "TC": pytest.approx(3.0 / 1000),
        "ET": pytest.approx(3.0 / 1000),
    }


def _write(path: Path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.int16), np.eye(4) if affine is None else affine), path)
    return str(path)


@pytest.mark.parametrize("problem", ["missing", "shape", "affine", "not_nifti", "empty", "garbage", "absent"])
def test_bad_cases_raise_clear_errors(tmp_path, problem):
    data = np.ones((8, 8, 6))
    files = {s: _write(tmp_path / f"c_{s}.nii.gz", data) for s in SEQUENCES}
    expected = {
        "missing": "Missing sequence",
        "shape": "different shapes",
        "affine": "different affines",
        "not_nifti": "not a NIfTI file",
        "empty": "empty",
        "garbage": "not a readable NIfTI",
        "absent": "does not exist",
    }[problem]
    if problem == "missing":
        files.pop("t2")
    elif problem == "shape":
        files["t2"] = _write(tmp_path / "c_t2.nii.gz", np.ones((8, 8, 5)))
    elif problem == "affine":
        files["flair"] = _write(
            tmp_path / "c_flair.nii.gz", data, affine=np.diag([1.0, 1.0, 1.0, 1.0]) + np.eye(4) * 0.5
        )
    elif problem == "not_nifti":
        (tmp_path / "c_t1.txt").write_text("hello")
        files["t1"] = str(tmp_path / "c_t1.txt")
    elif problem == "empty":
        (tmp_path / "c_t1ce.nii.gz").write_bytes(b"")
    elif problem == "garbage":
        (tmp_path / "c_t1ce.nii.gz").write_bytes(b"this is not a nifti file at all" * 20)
    elif problem == "absent":
        files["t1"] = str(tmp_path / "nowhere_t1.nii.gz")
    with pytest.raises(ValueError, match=expected):
        load_case(files)


def test_grading_model_in_a_sibling_folder_only_when_given(model_dir, case_dir, tmp_path):
    """outputs/emrfuse-demo + outputs/emrfuse-demo-grading: the sibling is outside the model folder, so it is
    used only when given explicitly (train.py copies the grading model into the folder's grading/)."""
    import shutil

    root = tmp_path / "emrfuse-demo"
    shutil.copytree(model_dir, root)
    shutil.move(str(root / "grading"), str(tmp_path / "emrfuse-demo-grading"))
    config = json.loads((root / "config.json").read_text())
    config.pop("grading_model")
    config.pop("custom_pipelines")
    (root / "config.json").write_text(json.dumps(config))
    assert load_pipeline(str(root), device="cpu").grading_model is None
    sibling = load_pipeline(str(root), device="cpu", grading_model=str(tmp_path / "emrfuse-demo-grading"))
    out = sibling(str(case_dir), report=REPORT)
    assert out["grading_model_id"].endswith("emrfuse-demo-grading") and out["grade_probabilities"] is not None


def test_grading_model_of_a_hub_repo_comes_from_the_same_repo_and_revision(model_dir, tmp_path):
    """A Hub repo (a fake offline cache with two commits): the grading model is its grading/ sub-folder at the
    commit the root model was loaded at, not at main (load_pipeline and transformers.pipeline); a config that
    names a folder outside the repo is refused."""
    import shutil

    repo = tmp_path / "hub" / "models--someone--emrfuse-tiny"
    old, new = "a" * 40, "b" * 40
    for commit in (old, new):
        shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(old)
    outside = repo / "snapshots" / new / "config.json"
    script = textwrap.dedent(
        f"""
        import json, pathlib
        from modeling_emrfuse.pipeline_emrfuse import load_pipeline
        pipe = load_pipeline("someone/emrfuse-tiny", revision={new!r}, device="cpu", optimize=False)
        out = {{"root": pipe.revision, "grading": list(pipe._companion_ids["grading"])}}
        from transformers import pipeline
        factory = pipeline(model="someone/emrfuse-tiny", revision={new!r}, trust_remote_code=True, device="cpu")
        out["factory"] = [factory.revision, *factory._companion_ids["grading"]]
        config = json.loads(pathlib.Path({str(outside)!r}).read_text())
        config["grading_model"] = "../elsewhere"
        pathlib.Path({str(outside)!r}).write_text(json.dumps(config))
        try:
            load_pipeline("someone/emrfuse-tiny", revision={new!r}, device="cpu", optimize=False)
        except ValueError as exc:
            out["error"] = str(exc)
        print(json.dumps(out))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_HUB_CACHE=str(tmp_path / "hub"),
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        OMP_NUM_THREADS="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["root"] == new and out["grading"] == ["someone/emrfuse-tiny", new]
    assert out["factory"] == [new, "someone/emrfuse-tiny", new]  # transformers.pipeline(..., revision=...) too
    assert "'../elsewhere'" in out["error"] and "not a sub-folder of the repository" in out["error"]


def test_default_model_folder_missing_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="README's main job"):
        load_pipeline()


def test_save_pretrained_round_trip(model_dir, case_dir, tmp_path):
    from transformers import pipeline

    pipe = load_pipeline(str(model_dir), device="cpu", optimize=False, precision="fp32")
    pipe.save_pretrained(tmp_path / "saved")
    again = pipeline(model=str(tmp_path / "saved"), trust_remote_code=True, device="cpu")
    assert type(again).__name__ == "EmrFusePipeline" and again.grading_model is not None
    a = pipe(str(case_dir), report=REPORT)
    b = again(str(case_dir), report=REPORT)
    assert (a["label_map"] != b["label_map"]).mean() < 1e-3  # b: BatchNorm folded, bf16 on a bf16 CPU
    assert a["grade_probabilities"]["HGG"] == pytest.approx(b["grade_probabilities"]["HGG"], abs=0.02)
    optimized = load_pipeline(str(model_dir), device="cpu")
    with pytest.raises(ValueError, match="optimize=False"):
        optimized.save_pretrained(tmp_path / "refused")


def test_transformers_pipeline_in_a_fresh_process_without_the_package(model_dir, case_dir, tmp_path):
    """``transformers.pipeline(model=folder, trust_remote_code=True)`` runs a case with only the folder's code."""
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["modeling_emrfuse"] = None   # the installed package must not be needed
        sys.modules["datasets_scripts"] = None
        import numpy as np
        from transformers import pipeline
        pipe = pipeline(model={str(model_dir)!r}, trust_remote_code=True, device="cpu")
        out = pipe({str(case_dir)!r}, report={REPORT!r})
        print(json.dumps({{
            "cls": type(pipe).__module__, "shape": list(out["label_map"].shape), "dtype": str(out["label_map"].dtype),
            "grade": out["grade_probabilities"], "words": len(out["words"]), "case": out["case_id"],
        }}))
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cls"].startswith("transformers_modules.")
    assert out["shape"] == list(nib.load(_paths(case_dir)["t1"]).shape) and out["dtype"] == "uint8"
    assert sum(out["grade"].values()) == pytest.approx(1.0, abs=1e-5)
    assert out["words"] > 5 and out["case"] == case_dir.name


def test_pipeline_class_is_registered():
    from transformers.pipelines import PIPELINE_REGISTRY

    assert PIPELINE_TASK in PIPELINE_REGISTRY.get_supported_tasks()
    # (a folder's own copy of the file, loaded with trust_remote_code, registers its class under the same task)
    assert PIPELINE_REGISTRY.supported_tasks[PIPELINE_TASK]["impl"].__name__ == "EmrFusePipeline"
    assert EmrFusePipeline._registered_impl[PIPELINE_TASK]["impl"] is EmrFusePipeline


def test_optimize_for_inference_keeps_the_outputs(model_dir):
    from transformers import AutoModelForSemanticSegmentation

    from modeling_emrfuse.inference_optim import optimize_for_inference, probe_forward

    model = AutoModelForSemanticSegmentation.from_pretrained(str(model_dir), trust_remote_code=True).eval()
    before = probe_forward(model)
    done = optimize_for_inference(model, precision="fp32")
    assert done["batchnorm_folded"] > 10 and done["dtype"] == "float32"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(probe_forward(model), before, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ missing sequences
def _case_without(tmp_path: Path, drop=("t1", "t2"), case_id="Case_003") -> Path:
    """A small case folder lacking the sequences ``drop``."""
    folder = write_small_case(tmp_path, shape=(32, 32, 16), case_id=case_id)
    for seq in drop:
        (folder / f"{case_id}_{seq}.nii.gz").unlink()
    return folder


def test_missing_sequences_need_the_option(pipe, tmp_path):
    folder = _case_without(tmp_path)
    for call in (lambda: load_case(str(folder)), lambda: pipe(str(folder))):
        with pytest.raises(ValueError, match=r"missing sequence\(s\) \['t1', 't2'\].*allow_missing_sequences=True"):
            call()
    files = {s: str(folder / f"Case_003_{s}.nii.gz") for s in ("t1ce", "flair")}
    with pytest.raises(ValueError, match=r"Missing sequence\(s\) \['t1', 't2'\].*--allow-missing-sequences"):
        pipe(files)


def test_missing_sequences_are_zero_filled_with_the_option(pipe, tmp_path):
    folder = _case_without(tmp_path)
    shape = nib.load(str(folder / "Case_003_flair.nii.gz")).shape
    case = load_case(str(folder), allow_missing_sequences=True)
    assert case.missing_sequences == ["t1", "t2"] and list(case.volumes) == list(SEQUENCES)
    assert all(case.volumes[s].shape == shape and not case.volumes[s].any() for s in ("t1", "t2"))
    assert case.volumes["flair"].any() and case.header is not None
    out = pipe(str(folder), allow_missing_sequences=True)
    assert out["label_map"].shape == shape and out["label_map"].dtype == np.uint8
    assert out["missing_sequences"] == ["t1", "t2"]
    assert out["grade_probabilities"] is not None
    # this tiny model has no sequence-presence channels: the result says it does not know what is missing
    assert len(out["warnings"]) == 1 and "not trained to know which sequences are missing" in out["warnings"][0]
    # a dict may map a sequence to None; at least one sequence must be given
    files = {"t1": None, "t1ce": str(folder / "Case_003_t1ce.nii.gz"), "flair": str(folder / "Case_003_flair.nii.gz")}
    assert pipe(files, allow_missing_sequences=True)["missing_sequences"] == ["t1", "t2"]
    with pytest.raises(ValueError, match="No MRI sequence given"):
        load_case({"t1": None}, allow_missing_sequences=True)


def test_complete_case_has_no_missing_sequences(pipe, case_dir):
    for allow in (False, True):
        out = pipe(str(case_dir), allow_missing_sequences=allow)
        assert out["missing_sequences"] == [] and out["warnings"] == []


def test_model_with_presence_channels_sees_them_and_gives_no_warning(tmp_path):
    presence_pipe = load_pipeline(
        str(build_tiny_model_folder(tmp_path / "presence-model", sequence_presence=True)), device="cpu"
    )
    assert presence_pipe.grading_model is not None
    seen = []

    def record(module, args, kwargs):
        seen.append((type(module).__name__, kwargs["pixel_values"].detach().float().clone()))

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in presence_pipe.models]
    try:
        folder = _case_without(tmp_path / "data")  # only T1ce and FLAIR
        out = presence_pipe(str(folder), report=REPORT, allow_missing_sequences=True)
        assert out["missing_sequences"] == ["t1", "t2"] and out["warnings"] == []
        assert out["label_map"].shape == nib.load(str(folder / "Case_003_flair.nii.gz")).shape
        assert {name for name, _ in seen} == {"EmrFuseForSegmentation", "EmrFuseForImageClassification"}
        for _, pixels in seen:
            assert pixels.shape[1] == 8
            presence = pixels[:, 4:]  # constant planes after the four sequences: t1, t1ce, t2, flair
            expected = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 4, 1, 1).expand_as(presence)
            assert torch.equal(presence, expected)
            assert not pixels[:, 0].any() and not pixels[:, 2].any()  # T1 and T2 zero-filled
        seen.clear()
        complete = write_small_case(tmp_path / "complete", shape=(32, 32, 16))
        out = presence_pipe(str(complete), report=REPORT)
        assert out["missing_sequences"] == [] and out["warnings"] == []
        assert all(torch.equal(p[:, 4:], torch.ones_like(p[:, 4:])) for _, p in seen)
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------ orientation
# nibabel orientation transforms of the array axes (same world geometry): axes 0 and 1 swapped; axis 0 mirrored;
# both, plus axis 2 mirrored (an RAS-like file of a BraTS case)
REORIENTATIONS = {
    "transposed": [[1, 1], [0, 1], [2, 1]],
    "flipped": [[0, -1], [1, 1], [2, 1]],
    "transposed_and_flipped": [[1, -1], [0, 1], [2, -1]],
}


@pytest.mark.parametrize("kind", sorted(REORIENTATIONS))
def test_a_reoriented_input_gives_the_same_label_map(pipe, case_dir, tmp_path, kind):
    """The model runs on BraTS's orientation whatever the file's: a transposed / flipped copy of a case (same
    voxels, same world positions) gives the original's label map, reoriented the same way, written on the copy's
    own grid and affine."""
    from modeling_emrfuse.brats_io import REFERENCE_AXCODES

    ornt = np.asarray(REORIENTATIONS[kind], dtype=float)
    copy = tmp_path / "Case_001"
    copy.mkdir()
    for path in sorted(case_dir.glob("*.nii.gz")):
        nib.save(nib.load(str(path)).as_reoriented(ornt), str(copy / path.name))
    assert nib.aff2axcodes(nib.load(str(copy / "Case_001_t1.nii.gz")).affine) != REFERENCE_AXCODES
    original = pipe(_paths(case_dir), report=None)
    turned = pipe(_paths(copy), report=None)
    assert original["label_map"].any()
    expected = nib.Nifti1Image(original["label_map"], original["affine"]).as_reoriented(ornt)
    np.testing.assert_array_equal(turned["label_map"], np.asarray(expected.dataobj))
    np.testing.assert_allclose(turned["affine"], nib.load(str(copy / "Case_001_t1.nii.gz")).affine)
    assert turned["reoriented_from"] == "".join(nib.aff2axcodes(turned["affine"]))
    assert original["reoriented_from"] is None  # a BraTS-oriented case is used as it is
    assert turned["region_volumes_cm3"] == pytest.approx(original["region_volumes_cm3"])
    assert turned["grade_probabilities"] == pytest.approx(original["grade_probabilities"], abs=1e-5)


def test_reorientation_round_trip_is_exact():
    from modeling_emrfuse.brats_io import REFERENCE_AXCODES, reorientation

    rng = np.random.default_rng(0)
    array = rng.integers(0, 5, size=(5, 6, 7)).astype(np.uint8)
    affine = np.diag([1.0, 2.0, 3.0, 1.0])  # RAS, anisotropic
    turn = reorientation(affine, array.shape)
    assert turn.input_axcodes == ("R", "A", "S") and not turn.is_identity
    oriented = turn.apply(array)
    assert nib.aff2axcodes(turn.affine(affine)) == REFERENCE_AXCODES
    np.testing.assert_array_equal(turn.undo(oriented), array)
    # a voxel keeps its world position
    i, j, k = 1, 2, 3
    world = affine @ [i, j, k, 1]
    ijk = np.linalg.solve(turn.affine(affine), world).round().astype(int)[:3]
    assert oriented[tuple(ijk)] == array[i, j, k]


# ------------------------------------------------------------------------------------------ one grading bag policy
def test_grading_slice_indices():
    from modeling_emrfuse.processing_emrfuse import grading_slice_indices

    assert grading_slice_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert grading_slice_indices(10, None).tolist() == list(range(10))
    assert grading_slice_indices(3, 8).tolist() == [0, 1, 2]
    assert grading_slice_indices(41, 5).tolist() == [0, 10, 20, 30, 40]
    with pytest.raises(ValueError, match="grading_slices"):
        from conftest import tiny_config

        tiny_config(grading_slices=0)


def _record_pixel_values(model, store):
    def hook(module, args, kwargs):
        store.append((kwargs.get("pixel_values") if "pixel_values" in kwargs else args[0]).detach().float().clone())

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def test_pipeline_train_evaluation_and_training_pool_the_same_slices(tmp_path, case_dir):
    """The grading bag policy is the grading model's config: the pipeline (so the CLI and the Space), train.py's
    evaluation and the training draws all use the slices grading_slice_indices gives for config.grading_slices."""
    import json

    import torch

    from datasets_scripts.slice_cache import SliceDataset
    from modeling_emrfuse.brats_io import discover_cases
    from modeling_emrfuse.modeling_emrfuse import EmrFuseForImageClassification
    from modeling_emrfuse.pipeline_emrfuse import pipeline_for_model
    from modeling_emrfuse.processing_emrfuse import grading_slice_indices
    from modeling_emrfuse.training.evaluation import evaluate_case
    from modeling_emrfuse.training.model_setup import config_kwargs
    from modeling_emrfuse.training.settings import ModelSettings

    folder = build_tiny_model_folder(tmp_path / "model")
    config_path = folder / "grading" / "config.json"
    config = json.loads(config_path.read_text())
    config["grading_slices"] = 5
    config_path.write_text(json.dumps(config))
    pipe = load_pipeline(str(folder), device="cpu", precision="fp32", optimize=False)
    seen_by_pipeline: list = []
    handle = _record_pixel_values(pipe.grading_model, seen_by_pipeline)
    pipe(str(case_dir), report=None)
    handle.remove()

    # the case's slices as the processor prepares them, and the policy's positions
    ip = pipe.image_processor
    slices = torch.from_numpy(ip.slices(ip.prepare_volume(_paths(case_dir))))
    keep = grading_slice_indices(slices.shape[0], 5)
    assert len(keep) == 5 < slices.shape[0]
    torch.testing.assert_close(seen_by_pipeline[0], slices[torch.from_numpy(keep)])
    with pytest.raises(ValueError, match="grading_max_slices"):
        load_pipeline(str(folder), device="cpu", grading_max_slices="all")

    # train.py's evaluation pools the same slices
    model = EmrFuseForImageClassification.from_pretrained(folder / "grading").eval()
    assert model.config.grading_slices == 5
    seen_by_evaluation: list = []
    handle = _record_pixel_values(model, seen_by_evaluation)
    case = discover_cases(case_dir.parent)[0]
    with torch.no_grad(), pipeline_for_model(model, pipe.processor, torch.device("cpu")) as eval_pipe:
        row, _ = evaluate_case(eval_pipe, case, None)  # as train.py's evaluation calls it
    handle.remove()
    torch.testing.assert_close(seen_by_evaluation[0], slices[torch.from_numpy(keep)])
    assert row["num_slices"] == slices.shape[0]

    # training: every drawn slice is one of the policy's positions
    class _Case:
        num_slices, tumour_slices, grade = 37, np.arange(10, 20), "HGG"

    ds = SliceDataset.__new__(SliceDataset)  # only the drawing logic
    ds.cases, ds.seed, ds.epoch, ds.slices_per_case, ds.tumour_prob = [_Case()], 0, 0, 4, 1.0
    ds._case_weights, ds.grading_bag, ds.grading_slices = np.array([1.0]), True, 5
    drawn = {ds._draw(i)[1] for i in range(200)}
    assert drawn == set(grading_slice_indices(37, 5).tolist())
    assert config_kwargs(ModelSettings(vision_model="resnet18", grading_slices=0), {})["grading_slices"] is None
