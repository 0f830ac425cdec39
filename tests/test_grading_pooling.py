"""The grading model's tumour pooling (``config.grading_pooling="tumour"``): feature maps averaged over the predicted
tumour, the fallback to today's pooling, the pipeline's mask, the head fit's features and the config round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import batch, build_tiny_model_folder, tiny_config, write_small_case

from modeling_emrfuse.configuration_emrfuse import EmrFuseConfig
from modeling_emrfuse.modeling_emrfuse import EmrFuseForImageClassification, masked_feature_mean
from modeling_emrfuse.pipeline_emrfuse import grading_pooling_mask, load_pipeline, pipeline_for_model

REPORT = "Irregular ring enhancing mass in the left frontal lobe with central necrosis and surrounding oedema."


def _model(pooling: str, seed: int = 0) -> EmrFuseForImageClassification:
    torch.manual_seed(seed)
    return EmrFuseForImageClassification(tiny_config(grading_pooling=pooling)).eval()


def test_masked_feature_mean_by_hand():
    # one slice, two channels on a 2 x 2 grid; the 4 x 4 mask covers one input pixel of the top-left cell and the
    # whole bottom-right cell: max-pooled to the grid, those two cells count
    fmap = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]]])
    mask = torch.zeros(1, 4, 4)
    mask[0, 1, 0] = 1
    mask[0, 2:, 2:] = 1
    assert torch.equal(masked_feature_mean(fmap, mask), torch.tensor([[(1 + 4) / 2, (10 + 40) / 2]]))
    # an empty mask gives zeros, not a division by zero
    assert torch.equal(masked_feature_mean(fmap, torch.zeros(1, 4, 4)), torch.zeros(1, 2))


def test_tumour_features_are_the_mid_level_maps_over_the_mask():
    model = _model("tumour")
    b = batch(n_slices=(2,), lengths=(5,))
    mask = torch.zeros(2, 32, 32)
    mask[0, 8:16, 8:24] = 1
    with torch.no_grad():
        maps = model.emrfuse.vision_model(b["pixel_values"])
        feats = model.tumour_features(b["pixel_values"], mask)
    # resnet18: strides 2, 4, 8, 16, 32; 8 and 16 are maps 2 and 3 (128 + 256 channels)
    assert model.tumour_levels == [2, 3] and feats.shape == (2, 128 + 256)
    by_hand = maps[2][0][:, 1:2, 1:3].mean(dim=(1, 2))  # stride 8: rows 8-15 -> 1, columns 8-23 -> 1, 2
    assert torch.allclose(feats[0, :128], by_hand, atol=1e-6)
    by_hand = maps[3][0][:, 0:1, 0:2].mean(dim=(1, 2))  # stride 16: rows 8-15 -> 0, columns 8-23 -> 0, 1
    assert torch.allclose(feats[0, 128:], by_hand, atol=1e-6)


def test_empty_or_absent_mask_falls_back_to_slice_pooling():
    tumour, slices = _model("tumour"), _model("slices")
    slices.load_state_dict(tumour.state_dict(), strict=False)  # the same weights, without the tumour projection
    b = batch(n_slices=(3, 2))
    with torch.no_grad():
        today = slices(**b).logits
        assert torch.equal(tumour(**b).logits, today)
        assert torch.equal(tumour(**b, pooling_mask=torch.zeros(5, 32, 32)).logits, today)
        # a case with tumour is pooled over it, the other case (empty mask) as today
        mask = torch.zeros(5, 32, 32)
        mask[1, 4:20, 4:20] = 1
        mixed = tumour(**b, pooling_mask=mask).logits
    assert torch.allclose(mixed[1], today[1], atol=1e-6)
    assert not torch.allclose(mixed[0], today[0], atol=1e-4)


def test_forward_pools_the_tumour_slices_as_the_head_fit_does():
    model = _model("tumour")
    b = batch(n_slices=(3, 2))
    mask = torch.zeros(5, 32, 32)
    mask[0, 2:10, 2:10] = 1
    mask[2, 0:32, 16:32] = 1  # case 0: slices 0 and 2; case 1: none (fallback)
    with torch.no_grad():
        out = model(**b, pooling_mask=mask)
        bag = model.grading_bag(b["pixel_values"], mask, b["slice_to_case"], 2)
        assert bag["tumour_slice_to_case"].tolist() == [0, 0] and bag["slice_to_case"].tolist() == [1, 1]
        hidden = model.emrfuse.text_model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"]
        ).last_hidden_state
        fitted = model.forward_from_tower_features(
            num_cases=2, input_ids=b["input_ids"], attention_mask=b["attention_mask"], text_hidden=hidden, **bag
        )
    assert torch.allclose(out.logits, fitted.logits, atol=1e-5)
    assert out.case_pooling_weights.shape == (4,)  # two tumour slices of case 0, two slices of case 1


def test_bad_mask_shape_and_config_values_raise():
    model = _model("tumour")
    b = batch(n_slices=(2,), lengths=(5,))
    with pytest.raises(ValueError, match="pooling_mask must have shape"):
        model(**b, pooling_mask=torch.zeros(2, 16, 16))
    with pytest.raises(ValueError, match="grading_pooling must be one of"):
        tiny_config(grading_pooling="tumor")
    with pytest.raises(ValueError, match="grading_pooling_strides"):
        tiny_config(grading_pooling_strides=[])
    with pytest.raises(ValueError, match="no feature map of stride"):
        EmrFuseForImageClassification(tiny_config(grading_pooling="tumour", grading_pooling_strides=[64]))


def test_config_and_model_round_trip(tmp_path):
    model = _model("tumour")
    model.config.grading_pooling_strides = [16, 32]
    model = EmrFuseForImageClassification(model.config).eval()
    model.save_pretrained(tmp_path / "m")
    config = EmrFuseConfig.from_pretrained(tmp_path / "m")
    assert config.grading_pooling == "tumour" and config.grading_pooling_strides == [16, 32]
    assert EmrFuseConfig().grading_pooling == "slices"
    loaded = EmrFuseForImageClassification.from_pretrained(tmp_path / "m").eval()
    b = batch(n_slices=(2,), lengths=(5,))
    mask = torch.zeros(2, 32, 32)
    mask[1, 4:28, 4:28] = 1
    with torch.no_grad():
        assert torch.allclose(loaded(**b, pooling_mask=mask).logits, model(**b, pooling_mask=mask).logits, atol=1e-6)


@pytest.fixture(scope="module")
def tumour_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tumour-pooling")
    return build_tiny_model_folder(root / "model", grading_pooling="tumour"), write_small_case(root / "cases")


def _manual_grade(pipe, case_dir):
    """The grade probabilities of a case computed by hand: the segmentation's predicted tumour, its slices, one
    forward of the grading model with that mask."""
    inputs = pipe.preprocess(str(case_dir), report=REPORT)["model_inputs"]
    with torch.no_grad():
        seg = pipe.segmentation_model(**inputs, return_dict=True).logits
        mask = (seg > 0).any(dim=1)
        keep = torch.nonzero(mask.flatten(1).any(dim=1)).flatten()
        assert 0 < len(keep) <= 32  # the tiny random model predicts tumour on some slices, the mask is not empty
        graded = dict(inputs, pixel_values=inputs["pixel_values"][keep], slice_to_case=inputs["slice_to_case"][keep])
        logits = pipe.grading_model(**graded, pooling_mask=mask[keep], return_dict=True).logits
    return torch.softmax(logits.float(), dim=-1)[0], mask


def test_pipeline_grades_from_the_segmentations_mask(tumour_folder):
    folder, case_dir = tumour_folder
    pipe = load_pipeline(str(folder), device="cpu", precision="fp32", optimize=False)
    assert pipe.grading_model.config.grading_pooling == "tumour"
    out = pipe(str(case_dir), report=REPORT)
    probs, mask = _manual_grade(pipe, case_dir)
    got = torch.tensor([out["grade_probabilities"][pipe.grading_model.config.id2label[i]] for i in range(2)])
    assert torch.allclose(got, probs, atol=1e-6)
    # without the mask the same model grades otherwise (the mask is what it read)
    inputs = pipe.preprocess(str(case_dir), report=REPORT)["model_inputs"]
    with torch.no_grad():
        plain = torch.softmax(pipe.grading_model(**pipe.grading_inputs(inputs)).logits.float(), -1)[0]
    assert not torch.allclose(plain, probs, atol=1e-4)
    assert torch.equal(grading_pooling_mask(torch.tensor([[[[-1.0]], [[0.5]]]])), torch.tensor([[[True]]]))


def test_head_fit_features_grade_as_the_pipeline(tumour_folder):
    """The grading-head fit's features of a training case (masks from the same segmentation model) give the logits
    the pipeline gives the case."""
    from modeling_emrfuse.brats_io import discover_cases
    from modeling_emrfuse.training.grading_head import _case_tower_features, tower_feature_batch

    folder, case_dir = tumour_folder
    pipe = load_pipeline(str(folder), device="cpu", precision="fp32", optimize=False)
    case = dataclasses.replace(discover_cases(case_dir.parent)[0], grade="HGG")
    probs, _ = _manual_grade(pipe, case_dir)
    cls, seg = pipe.grading_model, pipe.segmentation_model
    with pipeline_for_model(cls, pipe.processor, "cpu", segmentation_model=seg) as fit_pipe:
        feats = _case_tower_features(fit_pipe, cls, case, REPORT, None)
    assert feats.gap is None and feats.tumour is not None and feats.tumour.shape[1] == 128 + 256
    with torch.no_grad():
        logits = cls.forward_from_tower_features(**tower_feature_batch([feats], "cpu")).logits
    assert torch.allclose(torch.softmax(logits.float(), -1)[0], probs, atol=1e-5)
