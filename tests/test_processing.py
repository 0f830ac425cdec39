"""Tests of the EmrFuse image processor and processor (volume <-> slices, reports -> tokens).

Synthetic volumes are small (tens of voxels per side). The real cases in ``../shared/realdata`` are
loaded once per module and the tests using them are skipped (with the reason) when the folder is absent.
Report texts are never printed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoProcessor, BertTokenizer

from modeling_emrfuse.brats_labels import SEQUENCES, convert_label_map, label_map_to_regions
from modeling_emrfuse.processing_emrfuse import CropInfo, EmrFuseImageProcessor, EmrFuseProcessor, PreparedVolume

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
TCGA = REALDATA / "TCGA-DU-7294"
GLI = REALDATA / "BraTS-GLI-00001-000"
REPORTS = REALDATA / "textbrats_reports.jsonl"

SHAPE = (40, 36, 12)
BRAIN = ((5, 30), (7, 33), (2, 10))  # half-open brain box of the synthetic case


# ------------------------------------------------------------------------------------------ test data
def synthetic_case(seed: int = 0, shape=SHAPE, brain=BRAIN) -> np.ndarray:
    """(4, X, Y, Z) int-valued volume: non-zero inside ``brain`` (with a hole in one sequence), zero outside."""
    rng = np.random.default_rng(seed)
    vol = np.zeros((4,) + tuple(shape), dtype=np.float32)
    (x0, x1), (y0, y1), (z0, z1) = brain
    inner = (slice(x0, x1), slice(y0, y1), slice(z0, z1))
    for s in range(4):
        vol[(s,) + inner] = rng.integers(20, 1000, size=(x1 - x0, y1 - y0, z1 - z0)) * (s + 1)
    # sequence 0 is zero in part of the brain: those voxels are still brain (another sequence is non-zero)
    vol[0, x0 : x0 + 3, y0:y1, z0:z1] = 0
    # a voxel where only FLAIR is non-zero sets the corner of the bbox
    vol[:, x1 - 1, y1 - 1, z1 - 1] = 0
    vol[3, x1 - 1, y1 - 1, z1 - 1] = 7.0
    return vol


def synthetic_label_map(convention: str, shape=SHAPE) -> np.ndarray:
    """Nested tumour (edema shell, core, enhancing centre) inside the synthetic brain."""
    lab = np.zeros(shape, dtype=np.uint8)
    if convention == "brats2017":
        edema, core, enh = 2, 1, 4
    else:
        edema, core, enh = 2, 1, 3
    lab[10:24, 12:26, 3:9] = edema
    lab[13:21, 15:23, 4:8] = core
    lab[15:19, 17:21, 5:7] = enh
    lab[11, 13, 3] = core  # an isolated core voxel at the tumour's edge
    return lab


def region_logits(processor: EmrFuseImageProcessor, label_map, convention, crop, scale=8.0) -> np.ndarray:
    """One-hot region logits (D, 3, H, W) in the model-ready frame, built from a label map."""
    regions = label_map_to_regions(label_map, convention)  # (3, X, Y, Z)
    cropped = processor.crop_label_map(regions, crop).astype(np.float32)  # (3, H, W, D)
    return (cropped * 2.0 - 1.0).transpose(3, 0, 1, 2) * scale


def write_vocab(folder: Path) -> Path:
    words = "the a lesion is in right left frontal parietal temporal lobe edema tumor signal high low mixed with and of"
    words = words.split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + words
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return folder / "vocab.txt"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = write_vocab(tmp_path_factory.mktemp("tok"))
    return BertTokenizer(vocab_file=str(vocab), model_max_length=16)


@pytest.fixture
def processor():
    return EmrFuseImageProcessor()


# ------------------------------------------------------------------------------------------ normalise
def test_normalize_mean0_std1_over_brain_background_zero(processor):
    vol = synthetic_case()
    out = processor.normalize(vol)
    assert out.dtype == np.float32 and out.shape == vol.shape
    brain = np.any(vol != 0, axis=0)
    assert brain[BRAIN[0][0], BRAIN[1][0], BRAIN[2][0]]  # zero in sequence 0 but brain
    for s in range(4):
        vals = out[s][brain].astype(np.float64)
        assert abs(vals.mean()) < 1e-5
        assert abs(vals.std() - 1.0) < 1e-5
        assert np.all(out[s][~brain] == 0)
        # independent recomputation
        ref = (vol[s][brain] - vol[s][brain].mean(dtype=np.float64)) / vol[s][brain].std(dtype=np.float64)
        np.testing.assert_allclose(vals, ref, rtol=1e-5, atol=1e-5)


def test_brain_mask_is_any_sequence_nonzero(processor):
    vol = synthetic_case()
    np.testing.assert_array_equal(processor.brain_mask(vol), np.any(vol != 0, axis=0))


def test_normalize_rejects_constant_and_empty(processor):
    vol = synthetic_case()
    vol[2][vol[2] != 0] = 5.0
    vol[2][np.any(vol != 0, axis=0)] = 5.0
    with pytest.raises(ValueError, match="'t2'.*constant"):
        processor.normalize(vol)
    with pytest.raises(ValueError, match="all zero"):
        processor.normalize(np.zeros((4, 4, 4, 4), np.float32))
    vol = synthetic_case()
    vol[1, 10, 10, 5] = np.nan
    with pytest.raises(ValueError, match="'t1ce' contains NaN"):
        processor.normalize(vol)
    with pytest.raises(ValueError, match=r"\(4, X, Y, Z\)"):
        processor.normalize(np.ones((3, 4, 4, 4), np.float32))


# ------------------------------------------------------------------------------------------ crop / pad
def test_crop_bbox_exact_and_padding(processor):
    vol = synthetic_case()
    prep = processor.prepare_volume(vol)
    assert isinstance(prep, PreparedVolume)
    crop = prep.crop
    assert crop.original_shape == SHAPE
    assert crop.bbox == BRAIN
    h, w, d = prep.volume.shape[1:]
    assert prep.volume.dtype == np.float32
    assert h % 32 == 0 and w % 32 == 0 and (h, w) == (32, 32)
    assert d == BRAIN[2][1] - BRAIN[2][0]  # Z is cropped, never padded
    assert crop.pad == ((3, 4), (3, 3))  # 25 -> 32 and 26 -> 32, split evenly, odd voxel after
    assert crop.padded_shape == (h, w, d)
    # content = normalised volume inside the bbox, zeros in the padding
    ref = processor.normalize(vol)[:, 5:30, 7:33, 2:10]
    np.testing.assert_allclose(prep.volume[:, 3:28, 3:29, :], ref, rtol=1e-6, atol=1e-6)
    pad_mask = np.ones((h, w), bool)
    pad_mask[3:28, 3:29] = False
    assert np.all(prep.volume[:, pad_mask, :] == 0)
    # normalising the crop (prepare_volume) equals cropping the normalised volume
    assert prep.volume.shape == (4, 32, 32, 8)


def test_crop_margin_and_clipping():
    vol = synthetic_case()
    proc = EmrFuseImageProcessor(crop_margin=3)
    assert proc.prepare_volume(vol).crop.bbox == ((2, 33), (4, 36), (0, 12))  # y and z clipped to the grid
    big = EmrFuseImageProcessor(crop_margin=100, size_divisor=16)
    prep = big.prepare_volume(vol)
    assert prep.crop.bbox == ((0, 40), (0, 36), (0, 12))
    assert prep.volume.shape[1:] == (48, 48, 12)
    assert prep.crop.pad == ((4, 4), (6, 6))


def test_size_divisor_one_means_no_padding():
    proc = EmrFuseImageProcessor(size_divisor=1)
    prep = proc.prepare_volume(synthetic_case())
    assert prep.crop.pad == ((0, 0), (0, 0)) and prep.volume.shape == (4, 25, 26, 8)


def test_crop_info_dict_round_trip():
    crop = EmrFuseImageProcessor().prepare_volume(synthetic_case()).crop
    as_json = json.loads(json.dumps(crop.to_dict()))
    assert CropInfo.from_dict(as_json) == crop
    with pytest.raises(ValueError):
        CropInfo(original_shape=(10, 10, 10), bbox=((0, 11), (0, 5), (0, 5)), pad=((0, 0), (0, 0)))
    with pytest.raises(ValueError, match="original_shape"):
        CropInfo.from_dict({"bbox": [[0, 1]] * 3})


def test_crop_label_map_matches_image_and_uncrop_inverts(processor):
    vol = synthetic_case()
    prep = processor.prepare_volume(vol)
    lab = synthetic_label_map("brats2017")
    cropped = processor.crop_label_map(lab, prep.crop)
    assert cropped.shape == prep.volume.shape[1:] and cropped.dtype == np.uint8
    assert cropped.sum() and cropped.sum() == lab[5:30, 7:33, 2:10].sum()
    back = processor.uncrop(cropped, prep.crop)
    np.testing.assert_array_equal(back, lab)  # the tumour lies inside the brain box
    with pytest.raises(ValueError, match="expected shape"):
        processor.crop_label_map(lab[:-1], prep.crop)
    with pytest.raises(ValueError, match="trailing shape"):
        processor.uncrop(cropped[:-1], prep.crop)


# ------------------------------------------------------------------------------------------ slices
@pytest.mark.parametrize("k", [0, 1, 2])
def test_context_slices_channel_order_and_edges(k):
    proc = EmrFuseImageProcessor(context_slices=k)
    assert proc.in_channels == 4 * (2 * k + 1)
    d = 5
    vol = np.zeros((4, 32, 32, d), dtype=np.float32)
    for s in range(4):
        for z in range(d):
            vol[s, :, :, z] = 100 * s + z  # value encodes (sequence, slice)
    out = proc.slices(PreparedVolume(vol, CropInfo((32, 32, d), ((0, 32), (0, 32), (0, d)), ((0, 0), (0, 0)))))
    assert out.shape == (d, proc.in_channels, 32, 32) and out.dtype == np.float32
    for z in range(d):
        for j, offset in enumerate(range(-k, k + 1)):
            for s in range(4):
                expected = 100 * s + min(max(z + offset, 0), d - 1)  # edge slices replicated
                assert np.all(out[z, j * 4 + s] == expected), (z, offset, s)
    # channel layout = reshape of (2k+1, 4)
    np.testing.assert_array_equal(out.reshape(d, 2 * k + 1, 4, 32, 32)[:, k], np.moveaxis(vol, -1, 0))
    sub = proc.slices(vol, indices=[4, 0])
    np.testing.assert_array_equal(sub, out[[4, 0]])
    with pytest.raises(ValueError, match="indices"):
        proc.slices(vol, indices=[d])


# ------------------------------------------------------------------------------------------ post-processing
@pytest.mark.parametrize("convention", ["brats2017", "brats2023"])
@pytest.mark.parametrize("margin", [0, 2])
def test_post_process_recovers_label_map_exactly(convention, margin):
    proc = EmrFuseImageProcessor(crop_margin=margin)
    vol = synthetic_case(seed=3)
    prep = proc.prepare_volume(vol)
    lab = synthetic_label_map(convention)
    logits = region_logits(proc, lab, convention, prep.crop)
    assert logits.shape == (prep.num_slices, 3, *prep.volume.shape[1:3])
    out = proc.post_process_segmentation(torch.from_numpy(logits), prep.crop.to_dict(), label_convention=convention)
    assert out.dtype == np.uint8 and out.shape == SHAPE
    np.testing.assert_array_equal(out, lab)
    # probabilities instead of logits, and returned regions
    probs = 1.0 / (1.0 + np.exp(-logits))
    out2, regions = proc.post_process_segmentation(
        probs, prep.crop, label_convention=convention, logits_are_probabilities=True, return_regions=True
    )
    np.testing.assert_array_equal(out2, lab)
    np.testing.assert_array_equal(regions, label_map_to_regions(lab, convention))


def test_post_process_label_convention_conversion(processor):
    prep = processor.prepare_volume(synthetic_case())
    lab17 = synthetic_label_map("brats2017")
    logits = region_logits(processor, lab17, "brats2017", prep.crop)
    out23 = processor.post_process_segmentation(logits, prep.crop, label_convention="brats2023")
    np.testing.assert_array_equal(out23, convert_label_map(lab17, "brats2017", "brats2023"))
    assert set(np.unique(out23)) == {0, 1, 2, 3}
    out_rel = processor.post_process_segmentation(logits, prep.crop, label_convention="2018")
    np.testing.assert_array_equal(out_rel, lab17)
    with pytest.raises(ValueError, match="Unknown label convention"):
        processor.post_process_segmentation(logits, prep.crop, label_convention="brats1999")


def test_post_process_threshold_and_outside_crop(processor):
    prep = processor.prepare_volume(synthetic_case())
    h, w, d = prep.crop.padded_shape
    logits = np.full((d, 3, h, w), 0.5, dtype=np.float32)  # sigmoid(0.5) = 0.62
    logits[:, 1:] = -5.0
    out = processor.post_process_segmentation(logits, prep.crop)
    inside = np.zeros(SHAPE, bool)
    inside[5:30, 7:33, 2:10] = True
    assert np.all(out[inside] == 2) and np.all(out[~inside] == 0)  # WT only -> edema; padding dropped
    assert not processor.post_process_segmentation(logits, prep.crop, threshold=0.7).any()
    with pytest.raises(ValueError, match="threshold"):
        processor.post_process_segmentation(logits, prep.crop, threshold=1.0)
    with pytest.raises(ValueError, match="expected logits of shape"):
        processor.post_process_segmentation(logits[:-1], prep.crop)
    with pytest.raises(ValueError, match="expected logits of shape"):
        processor.post_process_segmentation(logits[:, :2], prep.crop)


# ------------------------------------------------------------------------------------------ preprocess (batch)
def test_preprocess_one_and_several_cases(processor):
    a = synthetic_case(seed=1)
    b = synthetic_case(seed=2, shape=(70, 50, 9), brain=((3, 60), (2, 40), (1, 8)))
    one = processor.preprocess(a)
    assert one["pixel_values"].shape == (8, 4, 32, 32) and one["pixel_values"].dtype == torch.float32
    assert one["slice_to_case"].tolist() == [0] * 8 and len(one["crop_info"]) == 1
    both = processor([a, b], return_tensors="pt")
    n_a, n_b = 8, 7
    assert both["pixel_values"].shape == (n_a + n_b, 4, 64, 64)  # common size (57 -> 64)
    assert both["slice_to_case"].tolist() == [0] * n_a + [1] * n_b
    crops = [CropInfo.from_dict(c) for c in both["crop_info"]]
    assert crops[0].padded_shape == (64, 64, n_a) and crops[1].padded_shape == (64, 64, n_b)
    # each case's slices post-process exactly with its own crop info
    for i, (vol, crop) in enumerate(zip((a, b), crops)):
        lab = np.zeros(vol.shape[1:], np.uint8)
        lab[np.any(vol != 0, axis=0)] = 2
        (x0, _), (y0, _), (z0, _) = crop.bbox
        lab[x0 + 2 : x0 + 6, y0 + 3 : y0 + 5, z0 : z0 + 2] = 4
        logits = region_logits(processor, lab, "brats2017", crop)
        np.testing.assert_array_equal(processor.post_process_segmentation(logits, both["crop_info"][i]), lab)
        # the pixels are those of the case prepared alone, re-padded
        alone = processor.prepare_volume(vol)
        h, w, _ = crop.cropped_shape
        (pa, _), (pc, _) = crop.pad
        sel = both["pixel_values"][both["slice_to_case"] == i].numpy()  # (D, 4, 64, 64)
        (qa, _), (qc, _) = alone.crop.pad
        np.testing.assert_array_equal(
            sel[:, :, pa : pa + h, pc : pc + w], np.moveaxis(alone.volume[:, qa : qa + h, qc : qc + w], -1, 0)
        )
    as_np = processor.preprocess([a], return_tensors="np")
    assert isinstance(as_np["pixel_values"], np.ndarray)
    assert json.loads(json.dumps(as_np["crop_info"])) == as_np["crop_info"]


# ------------------------------------------------------------------------------------------ loading
def test_load_volume_accepts_arrays_lists_dicts_images_paths(processor, tmp_path):
    vol = synthetic_case()
    np.testing.assert_array_equal(processor.load_volume(vol), vol)
    np.testing.assert_array_equal(processor.load_volume(torch.from_numpy(vol)), vol)
    np.testing.assert_array_equal(processor.load_volume(list(vol.astype(np.int16))), vol)
    aliases = {"t2f": vol[3], "t1n": vol[0], "T1c": vol[1], "t2w": vol[2]}
    np.testing.assert_array_equal(processor.load_volume(aliases), vol)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    images = [nib.Nifti1Image(v.astype(np.int16), affine) for v in vol]
    np.testing.assert_array_equal(processor.load_volume(images), vol)
    paths = {}
    for name, img in zip(SEQUENCES, images):
        paths[name] = tmp_path / f"case_{name}.nii.gz"
        nib.save(img, str(paths[name]))
    np.testing.assert_array_equal(processor.load_volume(paths), vol)
    np.testing.assert_array_equal(processor.load_volume({k: str(p) for k, p in paths.items()}), vol)
    # a different channel order
    other = EmrFuseImageProcessor(sequence_order=("flair", "t1", "t1ce", "t2"))
    np.testing.assert_array_equal(other.load_volume(aliases), vol[[3, 0, 1, 2]])


def test_paths_without_nibabel_give_a_clear_error(processor, monkeypatch, tmp_path):
    path = tmp_path / "t1.nii.gz"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel -> ImportError
    vol = synthetic_case()
    with pytest.raises(ImportError, match="needs nibabel"):
        processor.load_volume({"t1": path, "t1ce": vol[1], "t2": vol[2], "flair": vol[3]})


def test_spacing_and_grid_checks(processor):
    vol = synthetic_case()
    two_mm = [nib.Nifti1Image(v, np.diag([2.0, 2.0, 2.0, 1.0])) for v in vol]
    with pytest.raises(ValueError, match="spacing.*does not resample"):
        processor.load_volume(two_mm)
    assert EmrFuseImageProcessor(expected_spacing=None).check_spacing(two_mm) == (2.0, 2.0, 2.0)
    assert processor.check_spacing([nib.Nifti1Image(v, np.eye(4)) for v in vol]) == (1.0, 1.0, 1.0)
    assert processor.check_spacing(list(vol)) is None  # arrays carry no geometry
    shifted = [nib.Nifti1Image(v, np.eye(4)) for v in vol]
    moved = np.eye(4)
    moved[0, 3] = 5.0
    shifted[2] = nib.Nifti1Image(vol[2], moved)
    with pytest.raises(ValueError, match="'t2' is not on the voxel grid"):
        processor.load_volume(shifted)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda v: list(v[:3]), "Expected 4 sequences"),
        (lambda v: v[:3], "Expected 4 sequences"),
        (lambda v: v[0], r"shape \(4, X, Y, Z\)"),
        (lambda v: [v[0], v[1], v[2][:, :, :-1], v[3]], "different shapes.*'t2'"),
        (lambda v: [v[0], v[1], v[2], v[3][..., None]], "Sequence 'flair': expected a 3-D volume"),
        (lambda v: [v[0], v[1], v[2][0], v[3]], "Sequence 't2': expected a 3-D volume"),
        (lambda v: [v[0], np.zeros_like(v[1]), v[2], v[3]], "Sequence 't1ce' is all zero"),
        (lambda v: np.zeros_like(v), "Sequence 't1' is all zero"),
        (lambda v: {"t1": v[0], "t1ce": v[1], "t2": v[2], "pd": v[3]}, "Unknown MRI sequence name 'pd'"),
        (lambda v: {"t1": v[0], "t1ce": v[1], "t2": v[2]}, r"Missing sequence\(s\) \['flair'\]"),
        (lambda v: {"t1": v[0], "t1n": v[0], "t1ce": v[1], "t2": v[2], "flair": v[3]}, "'t1' given twice"),
        (lambda v: "/nonexistent/case.nii.gz", "single path"),
        (lambda v: {"t1": "/nonexistent/t1.nii.gz", "t1ce": v[1], "t2": v[2], "flair": v[3]}, "does not exist"),
        (lambda v: [v[0], v[1], v[2], np.full(v[3].shape, "a")], "Sequence 'flair': expected a numeric array"),
        (lambda v: [v[0], v[1], v[2], Path(__file__)], "only NIfTI paths"),
    ],
)
def test_bad_volumes_raise_value_error(processor, make, match):
    with pytest.raises(ValueError, match=match):
        processor.prepare_volume(make(synthetic_case()))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_raise_naming_sequence(processor, bad):
    vol = synthetic_case()
    vol[2, 10, 10, 5] = bad
    with pytest.raises(ValueError, match="Sequence 't2' contains NaN or infinite"):
        processor.prepare_volume(vol)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sequence_order": ("t1", "t1", "t2", "flair")}, "permutation"),
        ({"sequence_order": ("t1", "t1ce", "t2", "dwi")}, "Unknown MRI sequence"),
        ({"context_slices": -1}, "context_slices"),
        ({"size_divisor": 0}, "size_divisor"),
        ({"crop_margin": 1.5}, "crop_margin"),
        ({"expected_spacing": (1.0, 1.0)}, "expected_spacing"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EmrFuseImageProcessor(**kwargs)


# ------------------------------------------------------------------------------------------ reports
def test_report_truncation_and_missing_reports(tokenizer):
    proc = EmrFuseProcessor(EmrFuseImageProcessor(), tokenizer)
    short = "the lesion is in the right frontal lobe ."  # 9 tokens + 2 special
    long = " ".join(["edema"] * 40)
    out = proc(text=[short, long, None, "   ", ""])
    assert out["input_ids"].shape == (5, 16) and out["input_ids"].dtype == torch.int64
    assert out["report_truncated"].tolist() == [False, True, False, False, False]
    assert out["has_report"].tolist() == [True, True, False, False, False]
    assert out["attention_mask"].sum(1).tolist() == [11, 16, 2, 2, 2]
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert out["input_ids"][2, :2].tolist() == [cls_id, sep_id]
    assert out["input_ids"][1, -1].item() == sep_id  # truncated report still ends with [SEP]
    assert set(out) >= {"token_type_ids"}
    # explicit max_length overrides the tokenizer's; exactly max_length tokens is not truncated
    out = proc(text=[short, long], max_length=11)
    assert out["input_ids"].shape == (2, 11) and out["report_truncated"].tolist() == [False, True]
    out = proc(text=short, max_length=10)
    assert out["report_truncated"].tolist() == [True]
    with pytest.raises(ValueError, match="Report 1"):
        proc(text=[short, 3])
    with pytest.raises(ValueError, match="needs volumes, text or both"):
        proc()


def test_text_max_length_fallback(tmp_path):
    vocab = write_vocab(tmp_path / "v")
    tok = BertTokenizer(vocab_file=str(vocab))  # states no maximum length
    proc = EmrFuseProcessor(EmrFuseImageProcessor(), tok)
    assert proc.text_max_length() == 512
    assert proc.text_max_length(64) == 64


def test_processor_volumes_and_text(tokenizer):
    proc = EmrFuseProcessor(EmrFuseImageProcessor(context_slices=1), tokenizer)
    a, b = synthetic_case(1), synthetic_case(2)
    out = proc(volumes=[a, b], text=["the lesion", None])
    assert out["pixel_values"].shape == (16, 12, 32, 32)
    assert out["slice_to_case"].tolist() == [0] * 8 + [1] * 8
    assert out["has_report"].tolist() == [True, False] and out["input_ids"].shape[0] == 2
    assert len(out["crop_info"]) == 2
    with pytest.raises(ValueError, match="2 case\\(s\\) of volumes but 1 report"):
        proc(volumes=[a, b], text="the lesion")
    h, w, d = CropInfo.from_dict(out["crop_info"][0]).padded_shape
    assert proc.post_process_segmentation(np.full((d, 3, h, w), -3.0), out["crop_info"][0]).sum() == 0


# ------------------------------------------------------------------------------------------ save / load
def test_image_processor_save_load_round_trip(tmp_path):
    proc = EmrFuseImageProcessor(
        sequence_order=("flair", "t1ce", "t1", "t2"),
        context_slices=2,
        size_divisor=16,
        crop_margin=4,
        expected_spacing=None,
        spacing_tolerance=0.2,
    )
    proc.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["expected_spacing"] is None and saved["context_slices"] == 2
    loaded = EmrFuseImageProcessor.from_pretrained(tmp_path)
    for name in EmrFuseImageProcessor._SETTINGS:
        assert getattr(loaded, name) == getattr(proc, name), name
    assert loaded.to_dict() == proc.to_dict()
    assert loaded.in_channels == 20
    vol = synthetic_case()
    np.testing.assert_array_equal(loaded.preprocess(vol)["pixel_values"], proc.preprocess(vol)["pixel_values"])
    assert EmrFuseImageProcessor.from_pretrained(tmp_path, context_slices=1).context_slices == 1
    auto = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(auto).__name__ == "EmrFuseImageProcessor" and auto.to_dict() == proc.to_dict()


def test_processor_save_load_round_trip(tmp_path, tokenizer):
    proc = EmrFuseProcessor(EmrFuseImageProcessor(context_slices=1, crop_margin=2), tokenizer)
    proc.save_pretrained(tmp_path)
    for name in ("processor_config.json", "processing_emrfuse.py", "brats_labels.py"):
        assert (tmp_path / name).is_file(), name
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_emrfuse.EmrFuseProcessor"
    texts = ["the lesion is in the left temporal lobe .", " ".join(["signal"] * 30), None]
    ref = proc(volumes=[synthetic_case(1), synthetic_case(2), synthetic_case(3)], text=texts)
    for loaded in (
        EmrFuseProcessor.from_pretrained(tmp_path),
        AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True),
    ):
        assert type(loaded).__name__ == "EmrFuseProcessor"
        assert loaded.image_processor.to_dict() == proc.image_processor.to_dict()
        assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
        assert loaded.tokenizer.model_max_length == 16
        out = loaded(volumes=[synthetic_case(1), synthetic_case(2), synthetic_case(3)], text=texts)
        for key in ref:
            if key == "crop_info":
                continue
            assert torch.equal(out[key], ref[key]), key
        assert out["crop_info"] == ref["crop_info"]


# ------------------------------------------------------------------------------------------ real data
@pytest.fixture(scope="module")
def tcga():
    if not TCGA.is_dir():
        pytest.skip(f"real case not available: {TCGA} is absent (only in the development checkout)")
    images = {s: nib.load(str(TCGA / f"TCGA-DU-7294_{s}.nii.gz")) for s in SEQUENCES}
    seg = np.asarray(nib.load(str(TCGA / "TCGA-DU-7294_seg.nii.gz")).dataobj)
    proc = EmrFuseImageProcessor()
    volume = proc.load_volume(images)
    return {"images": images, "volume": volume, "seg": seg, "prepared": proc.prepare_volume(volume)}


def test_real_case_preprocess(tcga):
    proc = EmrFuseImageProcessor()
    vol, prep = tcga["volume"], tcga["prepared"]
    assert vol.shape == (4, 240, 240, 155)
    raw = np.asarray(tcga["images"]["t1ce"].dataobj)
    np.testing.assert_array_equal(vol[1], raw.astype(np.float32))
    brain = np.any(vol != 0, axis=0)
    (x0, x1), (y0, y1), (z0, z1) = prep.crop.bbox
    assert brain[x0:x1, y0:y1, z0:z1].sum() == brain.sum()  # every brain voxel is inside the crop
    for axis, (lo, hi) in enumerate(prep.crop.bbox):  # and the box is tight
        proj = np.any(brain, axis=tuple(a for a in range(3) if a != axis))
        assert proj[lo] and proj[hi - 1]
    h, w, d = prep.volume.shape[1:]
    assert h % 32 == 0 and w % 32 == 0 and d == z1 - z0
    (pa, _), (pc, _) = prep.crop.pad
    inner = prep.volume[:, pa : pa + x1 - x0, pc : pc + y1 - y0]
    crop_brain = brain[x0:x1, y0:y1, z0:z1]
    for s in range(4):
        vals = inner[s][crop_brain].astype(np.float64)
        assert abs(vals.mean()) < 1e-4 and abs(vals.std() - 1) < 1e-4
        assert np.all(inner[s][~crop_brain] == 0)
    assert np.isfinite(prep.volume).all()
    x = proc.slices(prep, indices=[0, d // 2, d - 1])
    assert x.shape == (3, 4, h, w)


def test_real_case_crop_uncrop_exact(tcga):
    proc = EmrFuseImageProcessor()
    seg, prep = tcga["seg"], tcga["prepared"]
    assert seg.shape == (240, 240, 155) and set(np.unique(seg)) <= {0, 1, 2}
    logits = region_logits(proc, seg, "brats2017", prep.crop)
    out = proc.post_process_segmentation(logits, prep.crop.to_dict(), label_convention="brats2017")
    np.testing.assert_array_equal(out, seg)
    out23 = proc.post_process_segmentation(logits, prep.crop, label_convention="brats2023")
    np.testing.assert_array_equal(out23, convert_label_map(seg, "brats2017", "brats2023"))
    # the label map cropped like the image goes back unchanged
    np.testing.assert_array_equal(proc.uncrop(proc.crop_label_map(seg, prep.crop), prep.crop), seg)


def test_real_case_through_processor_with_context(tcga, tokenizer):
    proc = EmrFuseProcessor(EmrFuseImageProcessor(context_slices=1), tokenizer)
    out = proc(volumes=tcga["images"], text=None, return_tensors="pt")
    crop = CropInfo.from_dict(out["crop_info"][0])
    assert crop == tcga["prepared"].crop
    assert out["pixel_values"].shape == (crop.num_slices, 12, *crop.padded_shape[:2])
    # middle block of channels = the slice itself
    np.testing.assert_array_equal(out["pixel_values"][:, 4:8].numpy(), np.moveaxis(tcga["prepared"].volume, -1, 0))


def test_real_2023_case_dict_with_2023_names():
    if not GLI.is_dir():
        pytest.skip(f"real case not available: {GLI} is absent (only in the development checkout)")
    proc = EmrFuseImageProcessor()
    files = {name: GLI / f"BraTS-GLI-00001-000-{name}.nii.gz" for name in ("t1n", "t1c", "t2w", "t2f")}
    vol = proc.load_volume(files)
    assert vol.shape == (4, 240, 240, 155) and vol.dtype == np.float32
    for i, name in enumerate(("t1n", "t1c", "t2w", "t2f")):  # canonical order t1, t1ce, t2, flair
        np.testing.assert_array_equal(vol[i], np.asarray(nib.load(str(files[name])).dataobj).astype(np.float32))
    prep = proc.prepare_volume(vol)
    assert prep.volume.shape[1] % 32 == 0 and prep.volume.shape[2] % 32 == 0
    assert np.isfinite(prep.volume).all()


def test_real_reports_tokenizer_path(tmp_path):
    if not REPORTS.is_file():
        pytest.skip(f"real reports not available: {REPORTS} is absent (only in the development checkout)")
    rows = [json.loads(line) for line in REPORTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [r["text"] for r in rows]
    assert len(texts) == 369
    tok = BertTokenizer(vocab_file=str(write_vocab(tmp_path / "v")), model_max_length=128)
    proc = EmrFuseProcessor(EmrFuseImageProcessor(), tok)
    n_tokens = np.array([len(tok.tokenize(t)) + 2 for t in texts])
    out = proc(text=texts)
    assert out["has_report"].all()
    np.testing.assert_array_equal(out["report_truncated"].numpy(), n_tokens > 128)
    assert 0 < out["report_truncated"].sum() < len(texts)  # reports of 53-156 words straddle 128 tokens
    np.testing.assert_array_equal(out["attention_mask"].sum(1).numpy(), np.minimum(n_tokens, 128))
    assert out["input_ids"].shape == (len(texts), min(128, n_tokens.max()))
    # at BERT's 512 nothing is truncated
    assert not proc(text=texts, max_length=512)["report_truncated"].any()


# ------------------------------------------------------------------------------------------ percentile clipping
def _outlier_case() -> np.ndarray:
    vol = synthetic_case(5)
    vol[2, 12, 15, 5] = 1e7  # one huge voxel in T2 (e.g. a raw scanner value)
    return vol


def test_clip_percentiles_known_answer_with_an_outlier():
    vol = _outlier_case()
    brain = np.any(vol != 0, axis=0)
    plain = EmrFuseImageProcessor().normalize(vol)
    clipped = EmrFuseImageProcessor(clip_percentiles=(1, 99)).normalize(vol)
    for s in range(4):
        values = vol[s][brain].astype(np.float64)
        lo, hi = np.percentile(values, [1, 99])
        c = np.clip(values, lo, hi)
        np.testing.assert_allclose(clipped[s][brain], (c - c.mean()) / c.std(), rtol=1e-5, atol=1e-5)
        assert np.all(clipped[s][~brain] == 0)
    # without clipping the outlier squashes every other T2 voxel to about one value; with it they keep their spread
    others = brain.copy()
    others[12, 15, 5] = False
    assert plain[2][others].std() < 0.02 and clipped[2][others].std() > 0.9
    assert clipped[2, 12, 15, 5] == pytest.approx(clipped[2][brain].max())  # the outlier sits at the top percentile
    # no outlier: clipping at (0, 100) is the plain z-score
    np.testing.assert_allclose(
        EmrFuseImageProcessor(clip_percentiles=(0, 100)).normalize(synthetic_case(5)),
        EmrFuseImageProcessor().normalize(synthetic_case(5)),
        atol=1e-6,
    )


@pytest.mark.parametrize("clip", [None, (0.5, 99.5)])
def test_normalisation_ignores_the_raw_scale_and_dtype(clip):
    """A 10x-scaled copy (as two LGG cases of the real data) and int16 / float copies normalise alike."""
    proc = EmrFuseImageProcessor(clip_percentiles=clip)
    vol = _outlier_case()
    vol[2, 12, 15, 5] = 30000  # fits int16
    ref = proc.prepare_volume(vol).volume
    np.testing.assert_allclose(proc.prepare_volume(vol * 10.0).volume, ref, rtol=1e-5, atol=1e-5)
    as_int16 = proc.prepare_volume([vol[s].astype(np.int16) for s in range(4)]).volume
    np.testing.assert_array_equal(as_int16, ref)
    np.testing.assert_array_equal(proc.prepare_volume(vol.astype(np.float64)).volume, ref)


def test_clip_percentiles_round_trip_and_bad_values(tmp_path):
    proc = EmrFuseImageProcessor(clip_percentiles=[0.5, 99.5])
    assert proc.clip_percentiles == (0.5, 99.5) and proc.to_dict()["clip_percentiles"] == (0.5, 99.5)
    proc.save_pretrained(tmp_path / "clip")
    saved = json.loads((tmp_path / "clip" / "preprocessor_config.json").read_text())
    assert saved["clip_percentiles"] == [0.5, 99.5]
    loaded = EmrFuseImageProcessor.from_pretrained(tmp_path / "clip")
    assert loaded.clip_percentiles == (0.5, 99.5) and loaded.to_dict() == proc.to_dict()
    vol = _outlier_case()
    np.testing.assert_array_equal(loaded.normalize(vol), proc.normalize(vol))
    EmrFuseImageProcessor().save_pretrained(tmp_path / "plain")
    assert EmrFuseImageProcessor.from_pretrained(tmp_path / "plain").clip_percentiles is None
    # a folder saved before the setting existed loads with no clipping
    old = json.loads((tmp_path / "plain" / "preprocessor_config.json").read_text())
    old.pop("clip_percentiles")
    (tmp_path / "plain" / "preprocessor_config.json").write_text(json.dumps(old))
    assert EmrFuseImageProcessor.from_pretrained(tmp_path / "plain").clip_percentiles is None
    for bad in ((99, 1), (-1, 50), (1, 101), (5,), "low", (1, 1)):
        with pytest.raises(ValueError, match="clip_percentiles"):
            EmrFuseImageProcessor(clip_percentiles=bad)
