"""The tumour-slab path of the pipeline (``probe_stride``): every k-th slice first, then only the slab around the
tumour it finds; computed slices equal the exact path, the others are background."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from conftest import build_tiny_model_folder, write_small_case

from modeling_emrfuse.pipeline_emrfuse import (
    PROBE_BACKGROUND_LOGIT,
    EmrFusePipeline,
    ProbeSettings,
    check_probe,
    load_pipeline,
    probe_slabs,
    tumour_box,
)


def _stub(tumour_slices):
    """A stand-in whose 'model' gives a positive region logit exactly on the slices whose pixel value (their own
    index) is in ``tumour_slices``, and records which slices it was asked for."""
    seen = []

    def segment_slices(self, inputs, tta):
        index = inputs["pixel_values"][:, 0, 0, 0].long()
        seen.extend(index.tolist())
        positive = torch.tensor([int(i) in tumour_slices for i in index])
        logits = torch.where(positive, 5.0, -5.0)[:, None, None, None].expand(-1, 3, 2, 2).clone()
        logits += index[:, None, None, None] * 1e-3  # each slice's logits its own
        return types.SimpleNamespace(n=len(index)), logits

    stub = types.SimpleNamespace(seen=seen)
    stub._segment_slices = types.MethodType(segment_slices, stub)
    return stub


def _inputs(n):
    pixels = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(-1, 4, 2, 2).clone()
    return {"pixel_values": pixels, "slice_to_case": torch.zeros(n, dtype=torch.long), "input_ids": torch.ones(1, 3)}


def test_probe_slabs_cover_each_run_of_hits():
    assert probe_slabs([], 40, 4, 2) == []
    assert probe_slabs([12, 16, 20], 40, 4, 0) == list(range(9, 24))  # one run: 12 - 3 .. 20 + 3
    assert probe_slabs([0, 36], 40, 4, 2) == [0, 1, 2, 3, 4, 5] + list(range(31, 40))  # two runs, clipped
    assert probe_slabs([8, 16], 40, 4, 1) == list(range(4, 13)) + list(range(12, 21))[1:]  # 12 had no tumour


@pytest.mark.parametrize("stride,margin", [(4, 2), (3, 0), (5, 1)])
@pytest.mark.parametrize("tumour", [set(range(13, 22)), set(range(2, 7)) | set(range(25, 34))])
def test_slab_equals_the_exact_path_where_computed_and_background_elsewhere(stride, margin, tumour):
    n = 40
    exact = _stub(tumour)._segment_slices(_inputs(n), False)[1]
    stub = _stub(tumour)
    out, logits = EmrFusePipeline._segment_slab(stub, _inputs(n), False, ProbeSettings(stride, margin))
    assert out.n == len(range(0, n, stride))  # the probe's output (evenly spaced over the case)
    computed = sorted(stub.seen)
    assert len(computed) == len(set(computed))  # no slice computed twice
    hits = [i for i in range(0, n, stride) if i in tumour]
    assert set(computed) == set(range(0, n, stride)) | set(probe_slabs(hits, n, stride, margin))
    assert set(tumour) <= set(computed) and len(computed) < n
    for i in range(n):
        if i in computed:
            assert torch.equal(logits[i], exact[i])
        else:
            assert torch.all(logits[i] == PROBE_BACKGROUND_LOGIT)
    assert torch.equal(logits > 0, exact > 0)  # the label map is the exact path's


def test_no_tumour_on_the_probe_computes_the_probe_only_and_a_thin_lesion_between_probes_is_missed():
    stub = _stub({5})  # one slice, between probe slices 4 and 8
    _, logits = EmrFusePipeline._segment_slab(stub, _inputs(20), False, ProbeSettings(4, 2))
    assert sorted(stub.seen) == [0, 4, 8, 12, 16]
    assert not (logits > 0).any()  # the documented limit: a lesion thinner than the stride, apart from the rest


def test_probe_settings_are_checked():
    assert check_probe(4, "probe_stride", 1) == 4 and check_probe(np.int64(0), "probe_margin", 0) == 0
    for bad in (0, -1, 2.5, "3", True):
        with pytest.raises(ValueError, match="probe_stride must be an integer >= 1"):
            check_probe(bad, "probe_stride", 1)


def test_pipeline_probe_stride_through_the_model(tmp_path):
    """With the tiny model, the slab path gives the exact path's label map wherever the model finds tumour on the
    probe slices' span; the JSON-able result records the stride; bad values are refused at call time."""
    folder = build_tiny_model_folder(tmp_path / "model", with_grading=False)
    case = write_small_case(tmp_path / "data")
    pipe = load_pipeline(str(folder), device="cpu", precision="fp32")
    exact = pipe(str(case), return_probabilities=True)
    slab = pipe(str(case), return_probabilities=True, probe_stride=3, probe_margin=1)
    assert exact["probe_stride"] == 1 and slab["probe_stride"] == 3 and slab["probe_box_margin"] is None
    boxed = pipe(str(case), probe_stride=3, probe_box_margin=10_000)  # a box as large as the slice: exact again
    assert boxed["probe_box_margin"] == 10_000
    z = np.nonzero(exact["label_map"].reshape(-1, exact["label_map"].shape[-1]).any(axis=0))[0]
    assert len(z)  # the random tiny model predicts some tumour on this case
    np.testing.assert_array_equal(slab["label_map"], exact["label_map"])
    np.testing.assert_array_equal(boxed["label_map"], exact["label_map"])
    with pytest.raises(ValueError, match="probe_stride must be an integer >= 1"):
        pipe(str(case), probe_stride=0)


def test_tumour_box_is_widened_grown_to_the_stride_and_kept_inside():
    mask = torch.zeros(96, 128, dtype=torch.bool)
    mask[40:50, 60:65] = True
    assert tumour_box(mask, 8) == (32, 64, 52, 84)  # 32..58 -> 32 rows; 52..73 -> 32 columns
    assert tumour_box(mask, 0, multiple=1) == (40, 50, 60, 65)
    mask[:] = False
    mask[90:96, 0:3] = True  # at the corner: shifted back inside
    assert tumour_box(mask, 4) == (64, 96, 0, 32)
    assert tumour_box(mask, 500) == (0, 96, 0, 128)  # a margin beyond the slice: the whole slice


def _pixel_stub(tumour):
    """A 'model' whose region logits are a per-pixel function of its input (so a crop changes nothing inside
    it): positive where the slice (value = its index in channel 0) is in ``tumour`` and channel 1 is 1."""
    shapes = []

    def segment_slices(self, inputs, tta):
        pixels = inputs["pixel_values"]
        shapes.append(tuple(pixels.shape[-2:]))
        index = pixels[:, 0, 0, 0].long()
        positive = torch.tensor([int(i) in tumour for i in index])[:, None, None] & (pixels[:, 1] > 0.5)
        logits = torch.where(positive, 5.0, -5.0)[:, None].expand(-1, 3, -1, -1).clone()
        return types.SimpleNamespace(n=len(index)), logits

    stub = types.SimpleNamespace(shapes=shapes, channels_last=False)
    stub._segment_slices = types.MethodType(segment_slices, stub)
    return stub


def test_box_margin_crops_the_slab_slices_to_the_probe_tumour():
    n, tumour = 24, set(range(8, 17))
    pixels = torch.zeros(n, 4, 64, 96)
    pixels[:, 0] = torch.arange(n, dtype=torch.float32)[:, None, None]
    pixels[:, 1, 20:30, 40:50] = 1.0  # the tumour's place in-plane
    inputs = {"pixel_values": pixels, "slice_to_case": torch.zeros(n, dtype=torch.long)}
    exact = _pixel_stub(tumour)._segment_slices(inputs, False)[1]
    stub = _pixel_stub(tumour)
    _, logits = EmrFusePipeline._segment_slab(stub, inputs, False, ProbeSettings(4, 1, box_margin=4))
    assert stub.shapes == [(64, 96), (32, 32)]  # the probe on whole slices, the slab on the box
    assert torch.equal(logits > 0, exact > 0)  # the tumour lies inside the box: the same label map
    y0, y1, x0, x1 = tumour_box(exact[8].amax(dim=0) > 0, 4)
    rest = [i for i in range(n) if i % 4]
    outside = torch.ones(64, 96, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert torch.all(logits[rest][:, :, outside] == PROBE_BACKGROUND_LOGIT)
