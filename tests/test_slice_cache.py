"""Tests of the training slice pipeline (datasets_scripts/slice_cache.py) on small demo cases."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from datasets_scripts.brats_layouts import discover_cases
from datasets_scripts.demo_data import write_demo_dataset
from datasets_scripts.monai_augmentation import MONAI_MISSING, MonaiSliceAugmentation, require_monai
from datasets_scripts.slice_cache import (
    GRADE_IGNORE_INDEX,
    CaseDataset,
    SliceDataset,
    build_cache,
    cache_settings,
    collate_cases,
    collate_slices,
    load_cache,
)
from modeling_emrfuse.brats_labels import GRADES, label_map_to_regions
from modeling_emrfuse.processing_emrfuse import EmrFuseImageProcessor

WORDS = (
    "the lesion area is in right left frontal parietal temporal occipital lobe lobes region regions hemisphere "
    "with and of a mixed high low signal signals edema necrosis ventricular compression not observed mild "
    "moderate extensive marked central"
).split()


def make_tokenizer(extra=()):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS) | set(extra))
    vocab += [c for c in "abcdefghijklmnopqrstuvwxyz0123456789.,:-" if c not in vocab]
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=128)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("slice_cache")
    data = write_demo_dataset(root / "data", n_cases=4, size="small", seed=1)
    return root, discover_cases(data)


@pytest.fixture(scope="module")
def cached(demo):
    root, cases = demo
    tok = make_tokenizer()
    ip = EmrFuseImageProcessor()
    return build_cache(cases, root / "cache", ip, tok, progress=False), ip, tok


def _built_at(cache_dir, case_id):
    return json.loads((cache_dir / "cases" / case_id / "meta.json").read_text())["built_at"]


def test_cache_built_once_and_rebuilt_on_change(demo, tmp_path):
    _, cases = demo
    tok, ip = make_tokenizer(), EmrFuseImageProcessor()
    cache = tmp_path / "cache"
    first = build_cache(cases, cache, ip, tok, progress=False)
    stamps = {c.case_id: _built_at(cache, c.case_id) for c in first}
    again = build_cache(cases, cache, ip, tok, progress=False)
    assert {c.case_id: _built_at(cache, c.case_id) for c in again} == stamps  # nothing rebuilt

    # context_slices is applied when slices are drawn: no rebuild
    build_cache(cases, cache, EmrFuseImageProcessor(context_slices=2), tok, progress=False)
    assert {c.case_id: _built_at(cache, c.case_id) for c in first} == stamps

    # preprocessing settings changed -> every case rebuilt
    for changed in (
        dict(image_processor=EmrFuseImageProcessor(crop_margin=2), tokenizer=tok),
        dict(image_processor=EmrFuseImageProcessor(clip_percentiles=(1, 99)), tokenizer=tok),
        dict(image_processor=ip, tokenizer=make_tokenizer(extra=("tumour",))),
        dict(image_processor=ip, tokenizer=tok, max_length=16),
    ):
        out = build_cache(cases, cache, progress=False, **changed)
        new = {c.case_id: _built_at(cache, c.case_id) for c in out}
        assert all(new[k] != stamps[k] for k in stamps), changed
        stamps = new
    assert all(len(c.input_ids) <= 16 for c in out)

    # one input file changed -> only that case rebuilt
    base = build_cache(cases, cache, ip, tok, progress=False)
    stamps = {c.case_id: _built_at(cache, c.case_id) for c in base}
    target = cases[1]
    st = target.sequences["flair"].stat()
    os.utime(target.sequences["flair"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    build_cache(cases, cache, ip, tok, progress=False)
    new = {c.case_id: _built_at(cache, c.case_id) for c in base}
    assert [k for k in stamps if new[k] != stamps[k]] == [target.case_id]

    assert [c.case_id for c in load_cache(cache, [c.case_id for c in cases])] == [c.case_id for c in cases]


def test_cache_matches_the_processor(cached, demo):
    cc, ip, _ = cached
    _, cases = demo
    case, files = cc[0], cases[0]
    prepared = ip.prepare_volume({s: p for s, p in files.sequences.items()})
    assert case.crop == prepared.crop
    ip3 = EmrFuseImageProcessor(context_slices=1)
    ref = ip3.slices(prepared)  # (D, 12, H, W)
    item = CaseDataset([case], image_processor=ip3)[0]
    assert item["pixel_values"].shape == ref.shape
    assert np.allclose(item["pixel_values"].numpy(), ref, atol=2e-2, rtol=1e-3)  # float16 storage
    label = np.asarray(nib.load(files.label).dataobj)
    regions = ip.crop_label_map(label_map_to_regions(label, "brats2017"), prepared.crop)  # (3, H, W, D)
    assert torch.equal(item["labels"].bool(), torch.from_numpy(regions.transpose(3, 0, 1, 2)))
    assert case.grade == files.grade and case.grade_label == GRADES.index(files.grade)
    assert case.has_report and 2 < len(case.input_ids) <= 128


def test_case_dataset_round_trip_to_the_original_grid(cached, demo):
    """Labels from the case dataset, used as logits, post-process back to the original label map."""
    cc, ip, _ = cached
    _, cases = demo
    ds = CaseDataset(cc, image_processor=ip, image_size=(96, 80))
    batch = collate_cases([ds[0], ds[1]])
    assert batch["pixel_values"].shape[-2:] == (96, 80)
    assert batch["input_ids"].shape[0] == 2 and batch["slice_to_case"].max() == 1
    for i, files in enumerate(cases[:2]):
        sel = batch["slice_to_case"] == i
        logits = batch["labels"][sel] * 20 - 10
        pred = ip.post_process_segmentation(logits, batch["crop_info"][i], label_convention="brats2017")
        assert np.array_equal(pred, np.asarray(nib.load(files.label).dataobj))
        assert batch["label_path"][i] == str(files.label.resolve())
    with pytest.raises(ValueError, match="smaller"):
        CaseDataset(cc, image_size=32)


def test_augmentation_is_applied_identically_to_image_and_label(cached, tmp_path):
    """Replace a cached image by a label-derived one: after augmentation it must still match the label."""
    cc, _, _ = cached
    case = cc[0]
    image = np.array(case.image())
    bits = np.array(case.region_bits())
    fake = np.zeros_like(image)
    fake[:, 0] = (bits & 1) > 0  # WT
    fake[:, 1] = (bits & 4) > 0  # ET
    fake[:, 2:] = 1.0
    probe = type(case)(**{**case.__dict__, "case_dir": tmp_path})
    np.save(tmp_path / "image.npy", fake)
    np.save(tmp_path / "regions.npy", bits)
    ds = SliceDataset(
        [probe],
        image_size=(56, 72),
        tumour_prob=1.0,
        rotation=30,
        scale=(0.8, 1.2),
        translation=0.15,
        flip_axes=(0, 1),
        seed=3,
    )
    changed = 0
    for i in range(24):
        item = ds[i]
        x, y = item["pixel_values"], item["labels"]
        assert x.shape == (4, 56, 72) and y.shape == (3, 56, 72)
        for ch, region in ((0, 0), (1, 2)):
            img_mask = (x[ch] > 0.5).numpy()
            lab = (y[region] > 0.5).numpy()
            # bilinear (image) and nearest (label) may only disagree next to the region's border, as either
            # resampling draws it (a region of a pixel or two may survive in one and vanish from the other)
            border = np.zeros_like(lab)
            for mask in (lab, img_mask):
                border |= ndimage.binary_dilation(mask, np.ones((3, 3))) & ~ndimage.binary_erosion(
                    mask, np.ones((3, 3))
                )
            assert not ((img_mask ^ lab) & ~border).any(), (i, ch)
            union = (img_mask | lab).sum()
            if union > 150:
                assert (img_mask & lab).sum() / union > 0.8, (i, ch)
        # the label itself stays nested (ET inside TC inside WT) after nearest resampling
        assert not (y[2] > y[1]).any() and not (y[1] > y[0]).any()
        centred = np.pad((bits[item["slice_index"]] & 1) > 0, ((0, 0), (4, 4)))[4:60]  # centre crop/pad
        changed += not np.array_equal(centred, y[0].numpy().astype(bool))
    assert changed > 12  # augmentation actually moves things


def test_augmentation_geometry(cached):
    """Identity parameters reproduce the slice exactly; a forced flip mirrors the right axis."""
    cc, _, _ = cached
    kw = dict(image_size=64, rotation=0.0, scale=(1.0, 1.0), translation=0.0, tumour_prob=1.0, seed=1)
    ident = SliceDataset(cc[:1], flip_axes=(), **kw)
    ref = SliceDataset(cc[:1], train=False, image_size=64)
    item = ident[0]
    z = item["slice_index"]
    assert torch.allclose(item["pixel_values"], ref[z]["pixel_values"], atol=1e-5)
    assert torch.equal(item["labels"], ref[z]["labels"])
    for axis in (0, 1):
        flipped = SliceDataset(cc[:1], flip_axes=(axis,), flip_prob=1.0, **kw)[0]
        assert flipped["slice_index"] == z
        assert torch.allclose(flipped["pixel_values"], ref[z]["pixel_values"].flip(1 + axis), atol=1e-5)
        assert torch.equal(flipped["labels"], ref[z]["labels"].flip(1 + axis))


def test_eval_mode_is_centred_and_complete(cached):
    cc, ip, _ = cached
    ds = SliceDataset(cc, image_size=64, train=False)
    assert len(ds) == sum(c.num_slices for c in cc)
    seen = [ds.locate(i) for i in range(len(ds))]
    assert len(set(seen)) == len(ds)
    item = ds[5]
    ref = CaseDataset(cc[:1])[0]
    assert torch.equal(item["pixel_values"], ref["pixel_values"][5])
    assert torch.equal(item["labels"], ref["labels"][5])


def test_tumour_oversampling(cached):
    cc, _, _ = cached
    total = sum(c.num_slices for c in cc)
    base = sum(c.tumour_slices.size for c in cc) / total
    frac = {}
    for p in (0.0, 1.0):
        ds = SliceDataset(cc, image_size=64, tumour_prob=p, augment=False, samples_per_epoch=400, seed=0)
        hits = [ds[i]["labels"][0].any().item() for i in range(len(ds))]
        frac[p] = float(np.mean(hits))
    assert frac[1.0] == 1.0
    assert abs(frac[0.0] - base) < 0.1
    print(f"\ntumour slices: base rate {base:.2f}, tumour_prob=0 -> {frac[0.0]:.2f}, tumour_prob=1 -> {frac[1.0]:.2f}")


def test_determinism_and_epochs(cached):
    cc, _, _ = cached
    a = SliceDataset(cc, image_size=64, seed=4)
    b = pickle.loads(pickle.dumps(a))  # what a DataLoader worker gets (no memory maps inside)
    assert len(pickle.dumps(a)) < 100_000
    for i in (0, 7, 31):
        assert torch.equal(a[i]["pixel_values"], b[i]["pixel_values"])
    before = a[3]["pixel_values"].clone()
    a.set_epoch(1)
    assert not torch.equal(before, a[3]["pixel_values"])


def test_collate_carries_each_report_once(cached):
    cc, _, _ = cached
    ds = SliceDataset(cc, image_size=64, slices_per_case=4, seed=2, context_slices=1)
    items = [ds[i] for i in range(8)]
    batch = collate_slices(items)
    assert batch["pixel_values"].shape == (8, 12, 64, 64)
    assert batch["labels"].shape == (8, 3, 64, 64)
    ids = [it["case_id"] for it in items]
    assert batch["case_ids"] == list(dict.fromkeys(ids))
    assert batch["input_ids"].shape[0] == len(set(ids)) <= 2
    by_id = {c.case_id: c for c in cc}
    for n, item in enumerate(items):
        row = batch["slice_to_case"][n].item()
        assert batch["case_ids"][row] == item["case_id"]
    for row, cid in enumerate(batch["case_ids"]):
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == by_id[cid].input_ids.tolist()
        assert (batch["input_ids"][row, length:] == 0).all()
        assert batch["grade_labels"][row].item() == GRADES.index(by_id[cid].grade)
    assert batch["has_report"].all()


def test_examples_as_mappings_and_missing_reports(tmp_path):
    """Dataset-style examples (arrays + grade ids), an unknown grade, no report, no label."""
    from datasets_scripts.demo_data import generate_case

    examples = []
    for i, grade in enumerate(("HGG", "LGG")):
        c = generate_case(i + 1, grade, size=(48, 48, 32), seed=0)
        examples.append(
            {
                "case_id": c.case_id,
                "grade": -1 if i else 0,
                "report": c.report if i == 0 else "",
                "has_report": i == 0,
                "label_convention": "brats2017",
                **{s: nib.Nifti1Image(c.images[s], c.affine) for s in c.images},
                "seg": nib.Nifti1Image(c.label, c.affine) if i == 0 else None,
            }
        )
    cc = build_cache(examples, tmp_path / "c", EmrFuseImageProcessor(), make_tokenizer(), progress=False)
    assert [c.grade for c in cc] == ["HGG", None]
    assert cc[1].grade_label == GRADE_IGNORE_INDEX and not cc[1].has_report and not cc[1].has_label
    assert cc[1].input_ids.tolist() == [2, 3]  # [CLS] [SEP]
    with pytest.raises(ValueError, match="without a label"):
        SliceDataset(cc)
    item = CaseDataset(cc)[1]
    assert item["grade_labels"].tolist() == [GRADE_IGNORE_INDEX] and not item["has_label"]


def test_bad_inputs(demo, tmp_path):
    _, cases = demo
    tok, ip = make_tokenizer(), EmrFuseImageProcessor()
    with pytest.raises(ValueError, match="Duplicate case id"):
        build_cache([cases[0], cases[0]], tmp_path / "d", ip, tok, progress=False)
    c = cases[0]
    wrong = {"case_id": "bad", **{s: str(p) for s, p in c.sequences.items()}, "seg": np.zeros((3, 3, 3), np.uint8)}
    with pytest.raises(ValueError, match="bad.*label map shape"):
        build_cache([wrong], tmp_path / "e", ip, tok, progress=False)
    with pytest.raises(ValueError, match="no cache manifest"):
        load_cache(tmp_path / "nothing")


REALDATA = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "realdata"


@pytest.mark.skipif(not (REALDATA / "TCGA-DU-7294").is_dir(), reason="../shared/realdata/TCGA-DU-7294 absent")
def test_real_case_through_the_cache(tmp_path):
    """A real full-size case (2018 naming, labels {0, 1, 2}) cached and mapped back to its grid exactly."""
    real = REALDATA / "TCGA-DU-7294"
    example = {
        "case_id": "TCGA-DU-7294",
        "grade": "LGG",
        "label_convention": "brats2017",
        **{s: real / f"TCGA-DU-7294_{s}.nii.gz" for s in ("t1", "t1ce", "t2", "flair")},
        "seg": real / "TCGA-DU-7294_seg.nii.gz",
    }
    ip = EmrFuseImageProcessor()
    (case,) = build_cache([example], tmp_path / "c", ip, make_tokenizer(), progress=False)
    assert case.crop.original_shape == (240, 240, 155) and case.height % 32 == 0 and case.width % 32 == 0
    assert not case.has_report and case.grade == "LGG" and case.tumour_slices.size > 0
    item = CaseDataset([case])[0]
    label = np.asarray(nib.load(real / "TCGA-DU-7294_seg.nii.gz").dataobj)
    pred = ip.post_process_segmentation(item["labels"] * 20 - 10, item["crop_info"])
    assert np.array_equal(pred, label)
    ds = SliceDataset([case], image_size=(160, 192), tumour_prob=1.0)
    assert ds[0]["pixel_values"].shape == (4, 160, 192) and ds[0]["labels"][0].any()


def test_case_draw_weights_balance_grades():
    from datasets_scripts.slice_cache import case_draw_weights

    slices = [100, 100, 200, 50, 30]
    np.testing.assert_allclose(case_draw_weights(slices), np.array(slices) / 480)
    w = case_draw_weights(slices, ["HGG", "HGG", "HGG", "LGG", None])
    # HGG: 1/2 split 100:100:200; LGG: 1/2 on its one case; no grade: never drawn
    np.testing.assert_allclose(w, [0.125, 0.125, 0.25, 0.5, 0.0])
    with pytest.raises(ValueError, match="grade"):
        case_draw_weights([1, 2], [None, None])


def test_balanced_grade_sampling_draws_each_grade_equally(cached):
    import dataclasses

    cases, _, _ = cached
    grades = ["HGG", "HGG", "HGG", "LGG"]  # a 3:1 cohort
    graded = [dataclasses.replace(c, grade=g) for c, g in zip(cases, grades)]
    counts = {}
    for balance in (False, True):
        ds = SliceDataset(
            graded, tumour_prob=0.0, samples_per_epoch=4000, augment=False, seed=0, balance_grades=balance
        )
        drawn = [grades[ds.locate(i)[0]] for i in range(len(ds))]
        counts[balance] = drawn.count("LGG") / len(drawn)
    natural = graded[3].num_slices / sum(c.num_slices for c in graded)
    assert counts[False] == pytest.approx(natural, abs=0.03)
    assert counts[True] == pytest.approx(0.5, abs=0.03)


def test_cache_holds_every_case_in_bratss_orientation(demo, tmp_path):
    """A case whose files are transposed and mirrored (same world geometry) caches exactly the arrays of the
    original: training sees BraTS's orientation whatever the files' own."""
    import shutil

    from datasets_scripts.slice_cache import _CacheReader

    _, cases = demo
    case = cases[0]
    folder = tmp_path / "turned" / case.case_id
    folder.mkdir(parents=True)
    ornt = np.array([[1, -1], [0, 1], [2, 1]], dtype=float)
    for path in sorted(Path(case.sequences["flair"]).parent.iterdir()):
        if path.name.endswith(".nii.gz"):
            nib.save(nib.load(str(path)).as_reoriented(ornt), str(folder / path.name))
        else:
            shutil.copy(path, folder / path.name)
    turned = discover_cases(folder.parent)[0]
    assert nib.aff2axcodes(nib.load(str(turned.sequences["flair"])).affine) != ("L", "P", "S")
    tok, ip = make_tokenizer(), EmrFuseImageProcessor()
    original = build_cache([case], tmp_path / "c1", ip, tok, progress=False)
    copy = build_cache([turned], tmp_path / "c2", ip, tok, progress=False)
    (img_a, lab_a), (img_b, lab_b) = _CacheReader(original).arrays(0), _CacheReader(copy).arrays(0)
    np.testing.assert_array_equal(img_a, img_b)
    np.testing.assert_array_equal(lab_a, lab_b)


# ------------------------------------------------------------------------------------------ clipping in the cache
def test_cache_normalises_with_the_processors_clipping(demo, tmp_path):
    """The cache prepares cases with the processor's clip_percentiles; the default leaves the settings (and so the
    cache key of every cache built before the option existed) unchanged."""
    _, cases = demo
    tok = make_tokenizer()
    assert "clip_percentiles" not in cache_settings(EmrFuseImageProcessor(), tok)["image_processor"]
    clip = EmrFuseImageProcessor(clip_percentiles=(2, 98))
    assert cache_settings(clip, tok)["image_processor"]["clip_percentiles"] == [2.0, 98.0]
    case = build_cache(cases[:1], tmp_path / "cache", clip, tok, progress=False)[0]
    ref = clip.prepare_volume(dict(cases[0].sequences)).volume  # (4, H, W, D)
    plain = EmrFuseImageProcessor().prepare_volume(dict(cases[0].sequences)).volume
    got = case.prepared_volume().volume
    np.testing.assert_allclose(got, ref, atol=2e-2, rtol=1e-3)  # float16 storage
    assert np.abs(ref - plain).max() > 0.1  # clipping changed the values the cache holds


# ------------------------------------------------------------------------------------------ MONAI augmentation
NO_PROBS = dict(
    affine_prob=0.0,
    elastic_prob=0.0,
    noise_prob=0.0,
    gamma_prob=0.0,
    bias_field_prob=0.0,
    scale_intensity_prob=0.0,
    shift_intensity_prob=0.0,
)


@pytest.fixture
def monai_installed():
    pytest.importorskip("monai", reason="MONAI is not installed (pip install monai, the augment extra)")


def test_monai_transforms_known_answers(monai_installed):
    """With every probability 0 the pipeline is the identity; a sure flip mirrors image and label; a sure shift adds
    one offset per sequence, the same to its context slices, and a missing sequence stays exactly 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 32, 24, generator=g)  # context_slices=1: 3 offsets x 4 sequences
    y = (torch.rand(1, 32, 24, generator=g) > 0.6).float() * 5
    out = MonaiSliceAugmentation((32, 24), context_slices=1, **NO_PROBS)(x, y, seed=1)
    assert torch.equal(out[0], x) and torch.equal(out[1], y)
    for axis in (0, 1):
        flip = MonaiSliceAugmentation((32, 24), context_slices=1, flip_axes=(axis,), flip_prob=1.0, **NO_PROBS)
        fx, fy = flip(x, y, seed=1)
        assert torch.equal(fx, x.flip(1 + axis)) and torch.equal(fy, y.flip(1 + axis))
    shift = MonaiSliceAugmentation((32, 24), context_slices=1, **{**NO_PROBS, "shift_intensity_prob": 1.0})
    sx, sy = shift(x, y, seed=2, present=(True, False, True, True))
    assert torch.equal(sy, y)
    offsets = (sx - x).reshape(3, 4, -1)
    assert torch.equal(sx.reshape(3, 4, -1)[:, 1], torch.zeros(3, 32 * 24))  # the missing sequence
    for s in (0, 2, 3):
        assert offsets[:, s].std() < 1e-5 and 0 < offsets[0, s, 0].abs() <= 0.1 + 1e-6
    assert len({round(float(offsets[0, s, 0]), 6) for s in (0, 2, 3)}) == 3  # drawn per sequence
    with pytest.raises(ValueError, match="12 channels"):
        shift(x[:4], y, seed=0)


def test_monai_augmentation_keeps_label_aligned_and_nested(cached, tmp_path, monai_installed):
    """As for the paper's augmentation: a label-derived image still matches the label after MONAI's spatial
    transforms (every one of them applied; intensity transforms off)."""
    cc, _, _ = cached
    case = cc[0]
    bits = np.array(case.region_bits())
    fake = np.zeros_like(np.array(case.image()))
    fake[:, 0] = np.where((bits & 1) > 0, 1.0, -1.0)  # WT (> 0 inside, < 0 outside; zero padding is neither)
    fake[:, 1] = np.where((bits & 4) > 0, 1.0, -1.0)  # ET
    probe = type(case)(**{**case.__dict__, "case_dir": tmp_path})
    np.save(tmp_path / "image.npy", fake)
    np.save(tmp_path / "regions.npy", bits)
    spatial_only = {**NO_PROBS, "affine_prob": 1.0, "elastic_prob": 1.0, "rotation": 30.0}
    ds = SliceDataset(
        [probe],
        image_size=(56, 72),
        tumour_prob=1.0,
        augmentation="monai",
        augmentation_options=spatial_only,
        flip_axes=(0, 1),
        seed=3,
    )
    changed = 0
    for i in range(24):
        item = ds[i]
        x, y = item["pixel_values"], item["labels"]
        assert x.shape == (4, 56, 72) and y.shape == (3, 56, 72)
        inside = (x != 0).numpy()  # zero padding of the spatial transforms is outside the slice
        for ch, region in ((0, 0), (1, 2)):
            img_mask = (x[ch] > 0).numpy()
            lab = (y[region] > 0.5).numpy()
            border = np.zeros_like(lab)
            for mask in (lab, img_mask):
                border |= ndimage.binary_dilation(mask, np.ones((3, 3))) & ~ndimage.binary_erosion(
                    mask, np.ones((3, 3))
                )
            assert not ((img_mask ^ lab) & ~border & inside[ch]).any(), (i, ch)
        assert not (y[2] > y[1]).any() and not (y[1] > y[0]).any()
        centred = np.pad((bits[item["slice_index"]] & 1) > 0, ((0, 0), (4, 4)))[4:60]
        changed += not np.array_equal(centred, y[0].numpy().astype(bool))
    assert changed > 20  # the affine and elastic transforms move things


def test_monai_augmentation_presence_and_missing_sequences_and_determinism(cached, monai_installed):
    cc, _, _ = cached
    kw = dict(image_size=64, augmentation="monai", context_slices=1, sequence_dropout=0.6, presence_channels=True)
    ds = SliceDataset(cc, seed=5, **kw)
    assert ds.in_channels == 16
    dropped = 0
    for i in range(40):
        x = ds[i]["pixel_values"]
        assert x.shape == (16, 64, 64)
        planes = x[12:]
        assert set(planes.unique().tolist()) <= {0.0, 1.0}  # presence channels exactly 0 / 1
        present = planes[:, 0, 0] > 0
        assert (planes == present[:, None, None].float()).all()
        image = x[:12].reshape(3, 4, 64, 64)
        assert (image[:, ~present] == 0).all()  # dropped sequences stay exactly 0, in every context slice
        assert all(image[:, s].any() for s in np.flatnonzero(present.numpy()))
        dropped += int((~present).sum())
    assert dropped > 10
    # same seed -> same sample (also in a worker's copy), another seed or epoch -> another
    again = pickle.loads(pickle.dumps(SliceDataset(cc, seed=5, **kw)))
    other = SliceDataset(cc, seed=6, **kw)
    for i in (0, 9, 31):
        assert torch.equal(ds[i]["pixel_values"], again[i]["pixel_values"])
        assert torch.equal(ds[i]["labels"], again[i]["labels"])
    assert not all(torch.equal(ds[i]["pixel_values"], other[i]["pixel_values"]) for i in range(8))
    assert torch.equal(SliceDataset(cc, seed=5, **kw)[31]["pixel_values"], ds[31]["pixel_values"])  # order-free
    before = ds[3]["pixel_values"].clone()
    ds.set_epoch(1)
    assert not torch.equal(before, ds[3]["pixel_values"])
    with pytest.raises(ValueError, match="augmentation must be one of"):
        SliceDataset(cc, augmentation="torchio")


def test_monai_missing_names_the_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "monai", None)  # what an environment without MONAI sees
    with pytest.raises(ImportError, match="pip install monai"):
        require_monai()
    assert "pip install monai" in MONAI_MISSING
