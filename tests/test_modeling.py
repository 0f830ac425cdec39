"""EmrFuse config and model: shapes, switches, formulas, losses, missing reports, pre-trained towers."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TEXT, batch, tiny_config, tokens
from transformers import BertConfig, BertModel

from modeling_emrfuse.configuration_emrfuse import (
    ABLATION_PRESETS,
    SWITCHES,
    EmrFuseConfig,
    apply_preset,
)
from modeling_emrfuse.evaluation.ablation_report import TABLE1_ROWS, TABLE3_ROWS
from modeling_emrfuse.modeling_emrfuse import (
    EmrFuseForImageClassification,
    EmrFuseForSegmentation,
    EmrFuseModel,
    EmrFuseSegmenterOutput,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not stall on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FUSION_SWITCHES = SWITCHES[1:]
# every combination of the four fusion switches with text, plus the image-only baseline
COMBOS = [dict(zip(FUSION_SWITCHES, bits), use_text=True) for bits in itertools.product([False, True], repeat=4)]
COMBOS.append(dict(ABLATION_PRESETS["image_only"]))


def combo_id(c):
    if not c["use_text"]:
        return "image_only"
    return "-".join(name[4:7] if c[name] else "___" for name in FUSION_SWITCHES)


# ------------------------------------------------------------------------------------------- config
def test_presets_and_table_rows():
    assert [p for p, _ in TABLE1_ROWS] == [
        "image_only",
        "concat",
        "plus_alignment",
        "plus_self_attention",
        "plus_residual",
        "full",
        "full_cross_attention",
    ]
    assert TABLE1_ROWS[0][1] == "Single-modality Image (ResNet-50)"
    assert TABLE1_ROWS[1][1] == "Image + Text (no alignment, no attention)"
    assert [p for p, _ in TABLE3_ROWS] == [
        "full",
        "no_alignment",
        "no_self_attention",
        "no_residual",
        "no_dynamic_weighting",
    ]
    assert TABLE3_ROWS[1][1] == "Without modality alignment"
    for name, _ in TABLE1_ROWS + TABLE3_ROWS:
        assert set(ABLATION_PRESETS[name]) == set(SWITCHES) | {"use_cross_attention"}
    # Table 1 adds one component per row (the paper's six rows)
    paper_rows = TABLE1_ROWS[:6]
    for (a, _), (b, _) in zip(paper_rows[1:], paper_rows[2:]):
        diff = [k for k in SWITCHES if ABLATION_PRESETS[a][k] != ABLATION_PRESETS[b][k]]
        assert len(diff) == 1 and ABLATION_PRESETS[b][diff[0]]
    # Table 3 removes one component from the full model
    for name, _ in TABLE3_ROWS[1:]:
        assert sum(ABLATION_PRESETS["full"][k] != ABLATION_PRESETS[name][k] for k in SWITCHES) == 1
    cfg = EmrFuseConfig.from_preset("no_residual", fusion_dim=8)
    assert (
        cfg.use_residual is False and cfg.use_alignment and cfg.fusion_dim == 8 and cfg.active_preset == "no_residual"
    )
    with pytest.raises(ValueError, match="preset"):
        EmrFuseConfig.from_preset("nope")
    with pytest.raises(ValueError, match="use_text"):
        apply_preset("image_only", {"use_text": True})


def test_config_defaults_and_round_trip(tmp_path):
    cfg = EmrFuseConfig()
    assert cfg.model_type == "emrfuse"
    assert isinstance(cfg.text_config, BertConfig) and cfg.text_config.hidden_size == 768
    assert cfg.vision_config == {"architecture": "resnet50", "in_chans": 4}
    assert cfg.id2label == {0: "HGG", 1: "LGG"} and cfg.num_labels == 2
    assert list(cfg.regions) == ["WT", "TC", "ET"]
    assert EmrFuseConfig(context_slices=1).vision_config["in_chans"] == 12
    cfg = tiny_config(use_residual=False, context_slices=2, vision_config={"architecture": "resnet18", "in_chans": 20})
    cfg.save_pretrained(tmp_path)
    back = EmrFuseConfig.from_pretrained(tmp_path)
    assert back.to_dict() == cfg.to_dict()
    assert isinstance(back.text_config, BertConfig) and back.text_config.hidden_size == 32
    assert back.in_channels == 20
    # text_config as an object
    assert EmrFuseConfig(text_config=BertConfig(**TINY_TEXT)).text_config.hidden_size == 32


def test_use_text_false_switches_fusion_off():
    cfg = tiny_config(use_text=False)
    assert not any(getattr(cfg, k) for k in SWITCHES)
    assert cfg.active_preset == "image_only"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(vision_config={"architecture": "not_a_timm_net"}), "architecture"),
        (dict(vision_config={"architecture": "resnet18", "in_chans": 6}), "in_chans"),
        (dict(vision_config={"architecture": "resnet18", "in_chans": 12}), "in_chans"),
        (dict(vision_config={"architecture": "resnet18", "pretrained": True}), "pretrained"),
        (dict(fusion_dim=0), "fusion_dim"),
        (dict(fusion_dim=2.5), "fusion_dim"),
        (dict(fusion_dropout=1.0), "fusion_dropout"),
        (dict(fusion_dropout=-0.1), "fusion_dropout"),
        (dict(align_loss_weight=-1.0), "align_loss_weight"),
        (dict(ortho_loss_weight=-0.01), "ortho_loss_weight"),
        (dict(dice_loss_weight=float("nan")), "dice_loss_weight"),
        (dict(cross_attention_heads=0), "cross_attention_heads"),
        (dict(cross_attention_heads=3), "cross_attention_heads"),
        (dict(decoder_channels=[]), "decoder_channels"),
        (dict(decoder_channels=[16, -1, 8, 8, 8]), "decoder_channels"),
        (dict(cross_attention_scales=9), "cross_attention_scales"),
        (dict(case_pooling="max"), "case_pooling"),
        (dict(regions=["WT", "XX"]), "regions"),
        (dict(context_slices=-1), "context_slices"),
        (dict(use_alignment="yes"), "use_alignment"),
        (dict(text_config=dict(TINY_TEXT, num_attention_heads=5)), "num_attention_heads"),
        (dict(slice_chunk_size=0), "slice_chunk_size"),
    ],
)
def test_bad_config_raises_value_error_naming_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**kwargs)


# ------------------------------------------------------------------------------------------- forward/backward
def _check_finite_grads(model):
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads, "no gradient at all"
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("switches", COMBOS, ids=combo_id)
def test_both_heads_every_switch_combination(switches):
    torch.manual_seed(0)
    cfg = tiny_config(**switches)
    inputs = batch(n_slices=(2, 1), lengths=(4, 0))  # second case has no report
    # classification
    model = EmrFuseForImageClassification(cfg)
    out = model(**inputs, labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 2) and out.case_embeds.shape == (2, 16)
    assert torch.isfinite(out.loss) and torch.isfinite(out.logits).all()
    out.loss.backward()
    _check_finite_grads(model)
    assert (out.loss_align is not None) == (cfg.use_alignment and cfg.align_loss_weight > 0)
    assert (out.loss_ortho is not None) == cfg.use_text
    assert (out.alpha_text is not None) == cfg.use_dynamic_weighting
    assert (out.token_attention is not None) == cfg.use_self_attention
    if cfg.use_text:
        assert out.has_report.tolist() == [True, False]
        assert out.text_embeds.shape == (2, 16 if cfg.use_alignment else 32)
        assert out.image_embeds.shape == (2, 16 if cfg.use_alignment else 512)
    else:
        assert model.emrfuse.text_model is None and out.text_embeds is None
    # segmentation
    seg = EmrFuseForSegmentation(cfg)
    labels = (torch.rand(3, 3, 32, 32) > 0.7).float()
    out = seg(**inputs, labels=labels)
    assert out.logits.shape == (3, 3, 32, 32)
    assert torch.isfinite(out.loss) and torch.isfinite(out.logits).all()
    out.loss.backward()
    _check_finite_grads(seg)
    assert (out.slice_embeds is not None) == cfg.use_text


def test_image_only_segmentation_is_plain_unet():
    seg = EmrFuseForSegmentation(tiny_config(use_text=False))
    names = [n for n, _ in seg.named_parameters()]
    assert not any(n.startswith("emrfuse.text_model") for n in names)
    assert not any("film" in n or "cross_attention" in n for n in names)
    out = seg(torch.randn(2, 4, 64, 64))
    assert out.logits.shape == (2, 3, 64, 64)


def _param_names(model):
    return {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("head", [EmrFuseForImageClassification, EmrFuseForSegmentation])
def test_each_switch_changes_parameter_set(switch, head):
    full = _param_names(head(tiny_config(**ABLATION_PRESETS["full"])))
    off = _param_names(head(tiny_config(**dict(ABLATION_PRESETS["full"], **{switch: False}))))
    assert off < full or off != full
    removed = full - off
    assert removed, f"switching {switch} off removed no parameter"
    expected = {
        "use_text": "text_model",
        "use_alignment": "projection",
        "use_self_attention": "token_attention",
        "use_residual": "attention_norm",
        "use_dynamic_weighting": "gate",
    }[switch]
    assert any(expected in n for n in removed), sorted(removed)[:10]


def test_self_attention_removes_channel_attention_and_token_query():
    on = _param_names(EmrFuseModel(tiny_config()))
    off = _param_names(EmrFuseModel(tiny_config(use_self_attention=False)))
    assert {"channel_attention.logit_scale", "token_attention.query.weight"} <= on - off


# ------------------------------------------------------------------------------------------- formulas
@pytest.fixture(scope="module")
def full_model():
    torch.manual_seed(1)
    model = EmrFuseForImageClassification(tiny_config(align_loss_weight=0.3, ortho_loss_weight=0.05))
    model.eval()
    return model


def test_alpha_attention_and_pooling_weights(full_model):
    inputs = batch(n_slices=(2, 3, 1), lengths=(3, 9, 0))
    with torch.no_grad():
        out = full_model(**inputs)
    assert ((out.alpha_text > 0) & (out.alpha_text < 1)).all()
    assert ((out.alpha_image > 0) & (out.alpha_image < 1)).all()
    assert out.alpha_text.shape == (3, 1)
    mask = inputs["attention_mask"].bool()
    att = out.token_attention
    assert att.shape == mask.shape
    assert torch.allclose(att[:2].sum(-1), torch.ones(2), atol=1e-6)
    assert (att[~mask] == 0).all()
    assert (att[2] == 0).all()  # missing report
    assert torch.allclose(out.channel_attention.sum(-1), torch.ones(6), atol=1e-5)
    per_case = torch.zeros(3).index_add(0, inputs["slice_to_case"], out.case_pooling_weights)
    assert torch.allclose(per_case, torch.ones(3), atol=1e-6)


def test_token_attention_is_paper_formula_at_init():
    """F8-F9: with W_q = I at init, alpha = softmax(H_T . e_i / sqrt(d)) over real tokens."""
    torch.manual_seed(2)
    model = EmrFuseModel(tiny_config(use_residual=False)).eval()
    inputs = batch(n_slices=(1, 1), lengths=(4, 6))
    with torch.no_grad():
        out = model(**inputs)
        hidden = model.text_model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).last_hidden_state
    cls = hidden[:, 0]
    scores = torch.einsum("bd,bld->bl", cls, hidden) / 32**0.5
    scores = scores.masked_fill(~inputs["attention_mask"].bool(), float("-inf"))
    alpha = scores.softmax(-1)
    assert torch.allclose(out.token_attention, alpha, atol=1e-5)
    # without residual, H_T is the attention-weighted sum of the token states (F9)
    assert torch.allclose(out.text_features, torch.einsum("bl,bld->bd", alpha, hidden), atol=1e-5)


def test_channel_attention_reweights_channels():
    """F10-F12: beta = softmax(GAP(X)); without residual the slice feature is GAP(C * beta * X)."""
    torch.manual_seed(3)
    model = EmrFuseModel(tiny_config(use_residual=False)).eval()
    inputs = batch(n_slices=(2,), lengths=(3,))
    with torch.no_grad():
        out = model(**inputs)
        x = model.vision_model(inputs["pixel_values"])[-1]
    z = x.mean((2, 3))
    beta = z.softmax(-1)
    assert torch.allclose(out.channel_attention, beta, atol=1e-5)
    assert torch.allclose(out.slice_image_features, z * beta * x.shape[1], atol=1e-4)


def test_loss_terms_match_independent_computation(full_model):
    inputs = batch(n_slices=(2, 3, 1, 2), lengths=(3, 9, 0, 5))
    labels = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        out = full_model(**inputs, labels=labels)
    keep = out.has_report
    assert keep.tolist() == [True, True, False, True]
    # L_align (F14-F16): B x B cosine matrix of the projected features of the cases with a report
    t = out.text_embeds[keep]
    i = out.image_embeds[keep]
    s = torch.stack([torch.stack([F.cosine_similarity(a, b, dim=0) for b in i]) for a in t])
    assert torch.allclose(out.loss_align, ((s - torch.eye(3)) ** 2).sum(), atol=1e-5)
    # L_ortho (F13) on the towers' own features (unit rows)
    ht = out.text_features[keep]
    hi = out.image_features[keep]
    ht = ht / ht.norm(dim=1, keepdim=True)
    hi = hi / hi.norm(dim=1, keepdim=True)
    assert torch.allclose(out.loss_ortho, torch.sqrt(((ht.T @ hi) ** 2).sum()), atol=1e-5)
    # total loss = CE + weighted auxiliary terms
    ce = F.cross_entropy(out.logits, labels)
    assert torch.allclose(out.loss_classification, ce, atol=1e-6)
    assert torch.allclose(out.loss, ce + 0.3 * out.loss_align + 0.05 * out.loss_ortho, atol=1e-5)
    # dynamic weighting (F17-F18) and F19 from the exposed embeddings
    m = full_model.emrfuse
    alpha_t = torch.sigmoid(m.text_gate(out.text_embeds))
    assert torch.allclose(alpha_t, out.alpha_text, atol=1e-6)
    fused = m.fusion_norm(
        (out.text_embeds + out.image_embeds) + out.alpha_text * out.text_embeds + out.alpha_image * out.image_embeds
    )
    assert torch.allclose(out.case_embeds, F.relu(m.fusion_fc(fused)), atol=1e-5)
    # the grading head is F20 on the case embedding
    assert torch.allclose(out.logits, full_model.classifier(out.case_embeds), atol=1e-6)


def test_align_loss_with_one_case_is_one_minus_cos_squared():
    model = EmrFuseModel(tiny_config()).eval()
    with torch.no_grad():
        out = model(**batch(n_slices=(2,), lengths=(4,)))
    cos = F.cosine_similarity(out.text_embeds[0], out.image_embeds[0], dim=0)
    assert torch.allclose(out.loss_align, (1 - cos) ** 2, atol=1e-6)


def test_concat_path_is_l2_normalised_concatenation():
    """F6-F7: the concat row fuses [H_T; H_I] / ||[H_T; H_I]|| (tower spaces, no projection)."""
    model = EmrFuseModel(tiny_config(**ABLATION_PRESETS["concat"])).eval()
    with torch.no_grad():
        out = model(**batch(n_slices=(1, 2), lengths=(4, 2)))
        h = torch.cat([out.text_features, out.image_features], dim=-1)
        expected = F.relu(model.fusion_fc(h / h.norm(dim=-1, keepdim=True)))
    assert model.text_projection is None and model.text_gate is None
    assert torch.allclose(out.case_embeds, expected, atol=1e-6)


def test_segmentation_loss_matches_independent_dice_bce():
    torch.manual_seed(4)
    seg = EmrFuseForSegmentation(tiny_config(align_loss_weight=0.2, ortho_loss_weight=0.1)).eval()
    inputs = batch(n_slices=(2, 2), lengths=(3, 4))
    labels = (torch.rand(4, 3, 32, 32) > 0.6).float()
    with torch.no_grad():
        out = seg(**inputs, labels=labels)
    p = torch.sigmoid(out.logits)
    dice = []
    for r in range(3):
        inter = (p[:, r] * labels[:, r]).sum()
        dice.append(1 - (2 * inter + 1) / (p[:, r].sum() + labels[:, r].sum() + 1))
    dice = torch.stack(dice).mean()
    x = out.logits
    bce = -(labels * F.logsigmoid(x) + (1 - labels) * F.logsigmoid(-x)).mean()
    assert torch.allclose(out.loss_dice, dice, atol=1e-5)
    assert torch.allclose(out.loss_bce, bce, atol=1e-5)
    assert torch.allclose(out.loss, dice + bce + 0.2 * out.loss_align + 0.1 * out.loss_ortho, atol=1e-5)


# ------------------------------------------------------------------------------------------- reports
def _count_text_calls(model):
    calls = []
    model.emrfuse.text_model.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    return calls


@pytest.mark.parametrize("head", [EmrFuseForImageClassification, EmrFuseForSegmentation])
def test_report_encoded_once_per_case(head):
    model = head(tiny_config())
    calls = _count_text_calls(model)
    inputs = batch(n_slices=(3, 3), lengths=(5, 7))
    model(**inputs)
    assert calls == [2]  # one call, one row per case, for 6 slices of 2 cases
    # inference on one case in chunks: still one text call
    model.eval()
    model.config.slice_chunk_size = 2
    calls.clear()
    one = batch(n_slices=(5,), lengths=(6,))
    if head is EmrFuseForSegmentation:
        probs = model.segment_case(one["pixel_values"], one["input_ids"], one["attention_mask"])
        assert probs.shape == (5, 3, 32, 32) and ((probs >= 0) & (probs <= 1)).all()
    else:
        probs = model.grade_case(one["pixel_values"], one["input_ids"], one["attention_mask"])
        assert probs.shape == (2,) and torch.allclose(probs.sum(), torch.tensor(1.0))
    assert calls == [1]


def test_chunked_inference_matches_single_pass():
    torch.manual_seed(5)
    for head in (EmrFuseForImageClassification, EmrFuseForSegmentation):
        model = head(tiny_config(slice_chunk_size=2)).eval()
        inputs = batch(n_slices=(3, 2), lengths=(5, 0))
        ref = model(**inputs)  # grad enabled: one pass
        with torch.no_grad():
            chunked = model(**inputs)  # no grad: chunks of 2 slices
        assert torch.allclose(ref.logits, chunked.logits, atol=1e-5)
        assert torch.allclose(ref.case_embeds, chunked.case_embeds, atol=1e-5)


def test_missing_reports_use_learned_state():
    torch.manual_seed(6)
    model = EmrFuseModel(tiny_config()).eval()
    calls = []
    model.text_model.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    inputs = batch(n_slices=(1, 1, 1), lengths=(4, 0, 6))
    with torch.no_grad():
        out = model(**inputs)
    assert out.has_report.tolist() == [True, False, True]
    assert calls == [2]  # the missing report is not encoded
    assert torch.equal(out.text_features[1], model.no_report_embedding)
    # the output of a case without report does not depend on its (empty) input_ids
    other = dict(inputs)
    other["input_ids"] = inputs["input_ids"].clone()
    other["input_ids"][1, 1:] = 7
    with torch.no_grad():
        out2 = model(**other)
    assert torch.allclose(out.case_embeds[1], out2.case_embeds[1])
    # has_report=False forces the no-report state even for a real report
    with torch.no_grad():
        forced = model(**inputs, has_report=torch.tensor([False, False, True]))
    assert forced.has_report.tolist() == [False, False, True]
    assert torch.equal(forced.text_features[0], model.no_report_embedding)
    # no report at all: the text tower is not called, the model still predicts
    calls.clear()
    with torch.no_grad():
        none = model(
            inputs["pixel_values"], has_report=torch.zeros(3, dtype=torch.bool), slice_to_case=inputs["slice_to_case"]
        )
    assert calls == [] and none.has_report.tolist() == [False] * 3 and torch.isfinite(none.case_embeds).all()
    assert none.loss_align is not None and float(none.loss_align) == 0.0


def test_missing_report_segmentation_and_training_signal():
    seg = EmrFuseForSegmentation(tiny_config())
    inputs = batch(n_slices=(2, 2), lengths=(0, 0))
    out = seg(**inputs, labels=torch.zeros(4, 3, 32, 32))
    assert out.has_report.tolist() == [False, False]
    out.loss.backward()
    assert seg.emrfuse.no_report_embedding.grad is not None
    assert torch.isfinite(seg.emrfuse.no_report_embedding.grad).all()
    # without input_ids at all
    out = seg(inputs["pixel_values"], slice_to_case=inputs["slice_to_case"])
    assert out.logits.shape == (4, 3, 32, 32) and out.has_report.tolist() == [False, False]


def test_one_report_per_slice_needs_no_mapping():
    model = EmrFuseForImageClassification(tiny_config())
    ids, mask, _ = tokens((3, 4, 5))
    out = model(torch.randn(3, 4, 32, 32), ids, mask)
    assert out.logits.shape == (3, 2)


def test_case_prediction_independent_of_slice_order_and_batch():
    torch.manual_seed(7)
    model = EmrFuseForImageClassification(tiny_config()).eval()
    inputs = batch(n_slices=(3, 2), lengths=(5, 6))
    with torch.no_grad():
        out = model(**inputs)
        perm = torch.tensor([2, 0, 4, 1, 3])
        shuffled = dict(inputs, pixel_values=inputs["pixel_values"][perm], slice_to_case=inputs["slice_to_case"][perm])
        out_perm = model(**shuffled)
        alone = model(
            inputs["pixel_values"][:3],
            inputs["input_ids"][:1],
            inputs["attention_mask"][:1],
            slice_to_case=torch.zeros(3, dtype=torch.long),
        )
    assert torch.allclose(out.logits, out_perm.logits, atol=1e-5)
    assert torch.allclose(out.logits[0], alone.logits[0], atol=1e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(pixel_values=torch.randn(6, 8, 32, 32)), "channels"),
        (dict(pixel_values=torch.randn(6, 32, 32)), "pixel_values"),
        (dict(slice_to_case=None), "slice_to_case"),
        (dict(slice_to_case=torch.tensor([0, 0, 0, 2, 2, 2])), "slice_to_case"),
        (dict(slice_to_case=torch.tensor([0, 0, 0, 0, 0, 0])), "no slice"),
        (dict(attention_mask=torch.ones(2, 3)), "attention_mask"),
        (dict(has_report=torch.tensor([True])), "has_report"),
        (dict(labels=torch.tensor([0, 1, 1])), "labels"),
    ],
)
def test_bad_inputs_raise_value_error(change, match):
    model = EmrFuseForImageClassification(tiny_config())
    inputs = batch(n_slices=(3, 3), lengths=(2, 3))
    inputs.update(change)
    with pytest.raises(ValueError, match=match):
        model(**inputs)


def test_segmentation_labels_shape_checked():
    seg = EmrFuseForSegmentation(tiny_config(use_text=False))
    with pytest.raises(ValueError, match="labels"):
        seg(torch.randn(2, 4, 32, 32), labels=torch.zeros(2, 32, 32))


def test_return_dict_false_gives_tuple():
    model = EmrFuseForImageClassification(tiny_config())
    out = model(**batch(), labels=torch.tensor([0, 1]), return_dict=False)
    assert isinstance(out, tuple) and out[0].ndim == 0 and out[1].shape == (2, 2)  # loss, logits first


# ------------------------------------------------------------------------------------------- pre-trained towers
@pytest.fixture(scope="module")
def pretrained_towers(tmp_path_factory):
    import timm

    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(8)
    bert = BertModel(BertConfig(**TINY_TEXT), add_pooling_layer=False)
    with torch.no_grad():
        for p in bert.parameters():
            p.add_(0.5)  # far from any init distribution
    bert.save_pretrained(root / "bert")
    resnet = timm.create_model("resnet18", pretrained=False)
    with torch.no_grad():
        for p in resnet.parameters():
            p.add_(0.25)
    torch.save(resnet.state_dict(), root / "resnet18.pth")
    return root, bert.state_dict(), resnet.state_dict()


@pytest.mark.parametrize("cls", [EmrFuseModel, EmrFuseForImageClassification, EmrFuseForSegmentation])
def test_from_text_vision_pretrained_weights_survive_post_init(cls, pretrained_towers):
    root, bert_sd, resnet_sd = pretrained_towers
    model = cls.from_text_vision_pretrained(
        str(root / "bert"),
        "resnet18",
        vision_pretrained=True,
        vision_kwargs=dict(pretrained_cfg_overlay=dict(file=str(root / "resnet18.pth"))),
        fusion_dim=16,
        cross_attention_heads=2,
        decoder_channels=[16, 16, 8, 8, 8],
    )
    base = model if isinstance(model, EmrFuseModel) else model.emrfuse
    text_sd = base.text_model.state_dict()
    for key, value in bert_sd.items():
        assert torch.equal(text_sd[key], value), key
    vision_sd = base.vision_model.state_dict()
    for key in ("layer1.0.conv1.weight", "layer4.1.bn2.weight", "bn1.running_var", "layer3.0.downsample.0.weight"):
        assert torch.equal(vision_sd[key], resnet_sd[key]), key
    # timm adapted the RGB first convolution to the 4 MRI sequences
    assert vision_sd["conv1.weight"].shape[1] == 4
    assert model.config.text_config.hidden_size == 32
    assert model.config.vision_config["architecture"] == "resnet18"
    assert "pretrained_cfg_overlay" not in model.config.vision_config
    # a forward pass works with the pre-trained towers
    with torch.no_grad():
        model.eval()(**batch(n_slices=(1, 1), lengths=(2, 3)))


def test_from_text_vision_pretrained_image_only(pretrained_towers):
    root, _, resnet_sd = pretrained_towers
    model = EmrFuseForSegmentation.from_text_vision_pretrained(
        None,
        "resnet18",
        vision_kwargs=dict(pretrained_cfg_overlay=dict(file=str(root / "resnet18.pth"))),
        use_text=False,
        decoder_channels=[16, 16, 8, 8, 8],
        fusion_dim=16,
    )
    assert model.emrfuse.text_model is None
    assert torch.equal(
        model.emrfuse.vision_model.state_dict()["layer2.0.conv2.weight"], resnet_sd["layer2.0.conv2.weight"]
    )


def test_fresh_tower_is_timm_initialised_not_reinitialised():
    """post_init leaves timm's own init alone (BatchNorm weights 1, conv std ~ kaiming, not 0.02)."""
    model = EmrFuseModel(tiny_config(initializer_range=0.02))
    w = model.vision_model.state_dict()["layer1.0.conv1.weight"]
    assert w.std() > 0.03  # kaiming for a 64x64x3x3 conv: ~0.06


# ------------------------------------------------------------------------------------------- paper size
@pytest.mark.slow
def test_paper_size_model_builds_and_runs():
    cfg = EmrFuseConfig()  # BERT-base-sized text tower, ResNet-50, fusion_dim 256
    model = EmrFuseForSegmentation(cfg).eval()
    n_text = sum(p.numel() for p in model.emrfuse.text_model.parameters())
    n_vision = sum(p.numel() for p in model.emrfuse.vision_model.parameters())
    assert 100e6 < n_text < 115e6 and 23e6 < n_vision < 25e6
    ids, mask, _ = tokens((20,))
    with torch.no_grad():
        out = model(torch.randn(2, 4, 64, 64), ids, mask, slice_to_case=torch.zeros(2, dtype=torch.long))
    assert out.logits.shape == (2, 3, 64, 64) and isinstance(out, EmrFuseSegmenterOutput)


def test_mean_pooling_and_context_slices():
    model = EmrFuseForImageClassification(
        tiny_config(case_pooling="mean", context_slices=1, vision_config={"architecture": "resnet18", "in_chans": 12})
    )
    assert model.emrfuse.pool_score is None
    inputs = batch(n_slices=(3, 1), lengths=(2, 4), channels=12)
    out = model(**inputs)
    assert torch.allclose(out.case_pooling_weights, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))
    assert torch.allclose(out.image_features[0], out.slice_image_features[:3].mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="12"):
        model(**batch(n_slices=(3, 1), lengths=(2, 4), channels=4))


# ------------------------------------------------------------------------------------------ public surface for heads
def test_task_heads_use_only_the_base_models_public_surface():
    """The heads drive EmrFuseModel through documented public methods, never its private ones."""
    import ast
    import inspect

    import modeling_emrfuse.modeling_emrfuse as mod

    for head in (mod.EmrFuseForSegmentation, mod.EmrFuseForImageClassification):
        tree = ast.parse(inspect.getsource(head))
        private = sorted(
            {
                node.attr
                for node in ast.walk(tree)
                if isinstance(node, ast.Attribute)
                and ast.unparse(node.value) in ("model", "self.emrfuse")
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            }
        )
        assert private == [], (head.__name__, private)
    for name in (
        "check_inputs",
        "encode_text",
        "slice_chunks",
        "encode_slices",
        "fuse",
        "pool_cases",
        "case_outputs",
        "weighted_auxiliary_loss",
    ):
        assert getattr(mod.EmrFuseModel, name).__doc__, name  # documented
        assert name in mod.EmrFuseModel.__doc__  # and listed in the class's guide for head writers


def test_building_blocks_reproduce_forward():
    """A head assembled from the public building blocks gets exactly what EmrFuseModel.forward returns."""
    torch.manual_seed(0)
    model = EmrFuseModel(tiny_config()).eval()
    inputs = batch(n_slices=(3, 2), lengths=(5, 8))
    with torch.no_grad():
        ref = model(**inputs)
        s2c, has_report, b = model.check_inputs(
            inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], inputs["slice_to_case"], None
        )
        text = model.encode_text(
            inputs["input_ids"], inputs["attention_mask"], None, has_report, b, inputs["pixel_values"].device
        )
        feats = [model.encode_slices(inputs["pixel_values"][s:e])[2] for s, e in model.slice_chunks(5)]
        out = model.case_outputs(text, torch.cat(feats), s2c, b, return_hidden=False)
    torch.testing.assert_close(out["case_embeds"], ref.case_embeds)
    torch.testing.assert_close(out["alpha_text"], ref.alpha_text)


# ------------------------------------------------------------------------------------------- text-only model
def test_text_only_preset_config():
    cfg = EmrFuseConfig.from_preset(
        "text_only",
        **{k: v for k, v in tiny_config().to_dict().items() if k in ("fusion_dim", "vision_config")},
        text_config=TINY_TEXT,
    )
    assert cfg.use_image is False and cfg.use_text is True
    assert not any(getattr(cfg, k) for k in SWITCHES[1:])
    assert cfg.active_preset == "text_only"
    # switches the fusion parts off like image-only does; an image preset keeps the image tower
    assert not tiny_config(use_image=False, use_alignment=True).use_alignment
    assert tiny_config(use_image=False).active_preset == "text_only"
    assert tiny_config().use_image and tiny_config().active_preset == "full_cross_attention"  # the config default
    assert tiny_config(use_cross_attention=False).active_preset == "full"
    assert EmrFuseConfig.from_preset("concat", text_config=TINY_TEXT).active_preset == "concat"
    with pytest.raises(ValueError, match="use_image"):
        apply_preset("concat", {"use_image": False})
    with pytest.raises(ValueError, match="at least one modality"):
        tiny_config(use_image=False, use_text=False)
    with pytest.raises(ValueError, match="use_image"):
        tiny_config(use_image="no")


def test_text_only_model_grades_from_the_report_alone(tmp_path):
    torch.manual_seed(0)
    model = EmrFuseForImageClassification(tiny_config(use_image=False)).eval()
    base = model.emrfuse
    assert base.vision_model is None and base.pool_score is None and base.channel_attention is None
    assert not any(n.startswith("emrfuse.vision_model") for n, _ in model.named_parameters())
    assert base.fusion_fc.in_features == 32  # H = H_T (text hidden size) -> F19
    ids, mask, tt = tokens((5, 8, 3))
    labels = torch.tensor([0, 1, 1])
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    assert out.logits.shape == (3, 2) and out.image_embeds is None and out.case_pooling_weights is None
    assert out.loss_align is None and out.loss_ortho is None
    # the head is exactly F19-F21 on the [CLS] feature of the text tower
    cls = base.text_model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state[:, 0]
    expected = model.classifier(F.relu(base.fusion_fc(cls)))
    assert torch.allclose(out.logits, expected, atol=1e-5)
    assert torch.allclose(out.loss, F.cross_entropy(expected, labels), atol=1e-5)
    # one case at a time gives the same probabilities; grade_case takes the report alone
    p0 = model.grade_case(None, ids[:1, :7], mask[:1, :7], tt[:1, :7])
    assert torch.allclose(p0, torch.softmax(out.logits[0], -1), atol=1e-5)
    # gradients reach the text tower and the head
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert base.text_model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.classifier.weight.grad.abs().sum() > 0
    # save / load round trip keeps it text-only
    model.save_pretrained(tmp_path)
    back = EmrFuseForImageClassification.from_pretrained(tmp_path).eval()
    assert back.config.active_preset == "text_only" and back.emrfuse.vision_model is None
    model.eval()
    with torch.no_grad():
        assert torch.allclose(
            back(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
        )


def test_text_only_model_refuses_image_inputs_and_segmentation():
    model = EmrFuseForImageClassification(tiny_config(use_image=False)).eval()
    b = batch()
    with pytest.raises(ValueError, match="pixel_values"):
        model(**b)
    with pytest.raises(ValueError, match="input_ids"):
        model()
    with pytest.raises(ValueError, match="image tower"):
        EmrFuseForSegmentation(tiny_config(use_image=False))


def test_from_text_vision_pretrained_text_only(pretrained_towers):
    root, bert_sd, _ = pretrained_towers
    model = EmrFuseForImageClassification.from_text_vision_pretrained(
        str(root / "bert"), None, **apply_preset("text_only", dict(fusion_dim=16))
    )
    assert model.emrfuse.vision_model is None and model.config.use_image is False
    text_sd = model.emrfuse.text_model.state_dict()
    assert all(torch.equal(text_sd[k], v) for k, v in bert_sd.items())
    ids, mask, _ = tokens((4, 6))
    with torch.no_grad():
        assert model.eval()(input_ids=ids, attention_mask=mask).logits.shape == (2, 2)


# ------------------------------------------------------------------------------------------ decoder cross-attention
def test_cross_attention_is_its_own_switch_off_in_the_papers_rows():
    from modeling_emrfuse.evaluation.ablation_report import preset_parts

    paper = [p for p, _ in TABLE1_ROWS[:6] + TABLE3_ROWS]
    assert all(ABLATION_PRESETS[p]["use_cross_attention"] is False for p in paper)
    extension = ABLATION_PRESETS["full_cross_attention"]
    assert extension["use_cross_attention"] and {k: v for k, v in extension.items() if k != "use_cross_attention"} == {
        k: v for k, v in ABLATION_PRESETS["full"].items() if k != "use_cross_attention"
    }
    assert "cross-attention" not in preset_parts("full") and "cross-attention" in preset_parts("full_cross_attention")
    assert preset_parts("image_only") == "image"
    assert EmrFuseConfig().use_cross_attention  # unset: on with image and report
    assert not EmrFuseConfig(use_text=False).use_cross_attention
    with_cross = EmrFuseForSegmentation(tiny_config(**apply_preset("full_cross_attention")))
    without = EmrFuseForSegmentation(tiny_config(**apply_preset("full")))
    assert any(".cross_attention." in n for n, _ in with_cross.named_parameters())
    assert not any(".cross_attention." in n for n, _ in without.named_parameters())
    assert any(".film" in n or "cond" in n for n, _ in without.named_parameters())  # FiLM stays: the paper's route
    assert without.config.active_preset == "full" and with_cross.config.active_preset == "full_cross_attention"


def _logits_with_other_token_states(model, inputs):
    """Segmentation logits as they are, and with the report's token states replaced (its [CLS] feature kept)."""
    with torch.no_grad():
        ref = model(**inputs).logits
        text = model.emrfuse.encode_text(
            inputs["input_ids"], inputs["attention_mask"], None, None, 1, inputs["input_ids"].device
        )
        changed = type(text)(
            text.features, torch.randn_like(text.tokens), text.token_mask, text.token_attention, text.has_report
        )
        model.emrfuse.encode_text = lambda *a, **k: changed
        try:
            out = model(**inputs).logits
        finally:
            del model.emrfuse.encode_text
    return ref, out


@pytest.mark.parametrize("preset", ["concat", "full"])
def test_without_cross_attention_the_decoder_sees_the_report_only_through_the_fused_vector(preset):
    """The paper's rows: the token states reach the decoder only through the fused representation (FiLM), so other
    token states with the same [CLS] feature give the same segmentation; with cross-attention they do not."""
    inputs = batch(n_slices=(2,), lengths=(6,))
    torch.manual_seed(0)
    model = EmrFuseForSegmentation(tiny_config(**apply_preset(preset))).eval()
    ref, out = _logits_with_other_token_states(model, inputs)
    torch.testing.assert_close(out, ref)
    torch.manual_seed(0)
    extended = EmrFuseForSegmentation(tiny_config(**apply_preset("full_cross_attention"))).eval()
    with torch.no_grad():  # cross-attention outputs start at zero: give them weight so that they act
        for stage in extended.decoder.stages:
            if stage.cross_attention is not None:
                for param in stage.cross_attention.parameters():
                    param.normal_(0, 0.5)
    ref, out = _logits_with_other_token_states(extended, inputs)
    assert not torch.allclose(out, ref)


# ------------------------------------------------------------------------------------------ frozen-tower features
@pytest.mark.parametrize(
    "switches",
    [
        {},
        {"use_text": False},
        {"use_self_attention": False, "use_alignment": False},
        {"use_residual": False, "use_dynamic_weighting": False},
    ],
)
def test_outputs_from_tower_features_equal_the_full_forward(switches):
    """The grading head fitted on frozen towers sees exactly what the full model computes after its towers."""
    from modeling_emrfuse.modeling_emrfuse import EmrFuseForImageClassification

    torch.manual_seed(0)
    model = EmrFuseForImageClassification(tiny_config(**switches)).eval()
    b = batch(n_slices=(3, 2), lengths=(5, 0))  # the second case has no report
    text_keys = ("input_ids", "attention_mask", "token_type_ids") if model.config.use_text else ()
    with torch.no_grad():
        full = model(pixel_values=b["pixel_values"], slice_to_case=b["slice_to_case"], **{k: b[k] for k in text_keys})
        gaps, hiddens = [], []
        for case in range(2):
            px = b["pixel_values"][b["slice_to_case"] == case]
            has = case == 0 and model.config.use_text
            gap, hidden = model.emrfuse.tower_features(
                px,
                b["input_ids"][case : case + 1] if has else None,
                b["attention_mask"][case : case + 1] if has else None,
            )
            gaps.append(gap)
            hiddens.append(hidden)
        text_hidden = None
        if model.config.use_text:
            text_hidden = torch.zeros(2, b["input_ids"].shape[1], model.config.text_config.hidden_size)
            text_hidden[0, : hiddens[0].shape[1]] = hiddens[0][0]
            assert hiddens[1] is None
        extra = (
            dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], text_hidden=text_hidden)
            if model.config.use_text
            else {}
        )
        part = model.forward_from_tower_features(torch.cat(gaps), b["slice_to_case"], 2, **extra)
    torch.testing.assert_close(part.logits, full.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(part.case_embeds, full.case_embeds, rtol=1e-4, atol=1e-5)
    assert part.loss is None  # the caller weighs the cases; the auxiliary terms are the full forward's
    aux = model.emrfuse.weighted_auxiliary_loss(full.loss_align, full.loss_ortho)
    part_aux = model.emrfuse.weighted_auxiliary_loss(part.loss_align, part.loss_ortho)
    if aux is None:
        assert part_aux is None
    else:
        torch.testing.assert_close(part_aux, aux)


def test_tower_features_need_the_text_hidden_state_with_input_ids():
    from modeling_emrfuse.modeling_emrfuse import EmrFuseForImageClassification

    model = EmrFuseForImageClassification(tiny_config()).eval()
    b = batch()
    gap, _ = model.emrfuse.tower_features(b["pixel_values"])
    with pytest.raises(ValueError, match="hidden states"):
        model.forward_from_tower_features(
            gap, b["slice_to_case"], 2, input_ids=b["input_ids"], attention_mask=b["attention_mask"]
        )
    with pytest.raises(ValueError, match="keep_maps"):
        model.emrfuse.encode_slices(None, keep_maps=True, gap=gap)


def test_switches_a_modality_rules_out_are_switched_off_with_a_warning(caplog):
    """Unset fusion switches follow the modalities quietly; one set on for a model that lacks a modality is
    switched off with a warning that names it; a saved config loads back without a warning."""
    import logging

    with caplog.at_level(logging.WARNING):
        image_only = tiny_config(use_text=False)
        text_only = tiny_config(use_image=False)
    assert not caplog.records
    assert not any(getattr(image_only, k) for k in SWITCHES[1:]) and not image_only.use_cross_attention
    assert not any(getattr(text_only, k) for k in SWITCHES[1:]) and not text_only.use_cross_attention
    with caplog.at_level(logging.WARNING):
        cfg = tiny_config(use_text=False, use_alignment=True, use_cross_attention=True)
    assert not cfg.use_alignment and not cfg.use_cross_attention
    assert (
        "use_text=False" in caplog.text
        and "use_alignment=True" in caplog.text
        and "use_cross_attention=True" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        reloaded = EmrFuseConfig.from_dict(cfg.to_dict())
        full = EmrFuseConfig.from_dict(tiny_config().to_dict())
    assert not caplog.records
    assert {k: getattr(reloaded, k) for k in SWITCHES} == {k: getattr(cfg, k) for k in SWITCHES}
    assert full.active_preset == "full_cross_attention"
