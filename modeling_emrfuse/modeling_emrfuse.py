"""EmrFuse: a brain MRI + radiology report model (towers, the paper's fusion head, grading and segmentation).

:class:`EmrFuseModel` holds the text tower, the image tower and the fusion head of the paper (cited in the
README's opening paragraph; the formula tags F1-F21 in this file number its equations, and where the paper is
ambiguous the docstring of the part says which reading is implemented); its docstring describes the architecture
part by part. :class:`EmrFuseForImageClassification` grades a case (HGG vs LGG); :class:`EmrFuseForSegmentation`
segments the tumour sub-regions with a report-conditioned U-Net. Without gradients, slices go through the image
tower (and decoder) in chunks of ``config.slice_chunk_size`` and the report is encoded once per case
(:meth:`EmrFuseForSegmentation.segment_case`, :meth:`EmrFuseForImageClassification.grade_case`). Usage: README,
"Load a trained model".

This file travels to the Hub: it imports only torch, transformers, timm and the package's files (relatively).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .configuration_emrfuse import EmrFuseConfig

logger = logging.get_logger(__name__)

__all__ = [
    "EmrFuseModelOutput",
    "EmrFuseImageClassifierOutput",
    "EmrFuseSegmenterOutput",
    "EmrFusePreTrainedModel",
    "EmrFuseModel",
    "EmrFuseForImageClassification",
    "EmrFuseForSegmentation",
    "soft_dice_loss",
]


AUTO_MAP = {
    "AutoConfig": "configuration_emrfuse.EmrFuseConfig",
    "AutoModel": "modeling_emrfuse.EmrFuseModel",
    "AutoModelForImageClassification": "modeling_emrfuse.EmrFuseForImageClassification",
    "AutoModelForSemanticSegmentation": "modeling_emrfuse.EmrFuseForSegmentation",
}
"""``auto_map`` written into every saved config: the four Auto classes that rebuild EmrFuse with remote code."""


# ----------------------------------------------------------------------------------------------- outputs
@dataclass
class EmrFuseModelOutput(ModelOutput):
    r"""Output of :class:`EmrFuseModel` (B cases, N slices, L tokens).

    Args:
        case_embeds (`(B, fusion_dim)`): fused case representation ``H_final`` (F19), the input of the grading
            head (the paper's Fig. 3 embedding).
        text_embeds (`(B, d)`): the text feature entering the fusion: projected ``H_T`` in the shared space
            (F14 input, ``d = fusion_dim``) when ``use_alignment``, else the tower's own (attention-enhanced)
            feature (``d = d_T``). ``None`` without text.
        image_embeds (`(B, d)`): the same for the pooled image feature ``H_I`` (``d = fusion_dim`` or ``d_I``).
        text_features (`(B, d_T)`): the text tower's case feature (after self-attention/residual, before projection;
            the no-report vector for missing reports), used by ``L_ortho``. ``None`` without text.
        image_features (`(B, d_I)`): the pooled image case feature (before projection), used by ``L_ortho``.
        slice_image_features (`(N, d_I)`): per-slice image feature (GAP of the (re-weighted) last map).
        alpha_text, alpha_image (`(B, 1)`): dynamic weights (F17), in (0, 1); ``None`` when the switch is off.
        token_attention (`(B, L)`): F8 weights, summing to 1 over the real tokens of each report (0 on padding,
            all 0 for a missing report); ``None`` without self-attention.
        channel_attention (`(N, C)`): F11 channel weights ``beta`` per slice (sum 1); ``None`` without self-attention.
        case_pooling_weights (`(N,)`): weight of each slice in its case's pooled feature (sum 1 per case).
        has_report (`(B,)` bool): whether each case had a report (``False``: the learned no-report state was used).
        loss_align (scalar): ``L_align`` (F16) when ``use_alignment`` and ``align_loss_weight > 0``, else ``None``.
        loss_ortho (scalar): ``L_ortho`` (F13) when ``use_text`` and ``ortho_loss_weight > 0``, else ``None``.
        text_last_hidden_state (`(B, L, d_T)`): token states of the text tower (zeros for missing reports).
    """

    case_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_features: torch.FloatTensor | None = None
    image_features: torch.FloatTensor | None = None
    slice_image_features: torch.FloatTensor | None = None
    alpha_text: torch.FloatTensor | None = None
    alpha_image: torch.FloatTensor | None = None
    token_attention: torch.FloatTensor | None = None
    channel_attention: torch.FloatTensor | None = None
    case_pooling_weights: torch.FloatTensor | None = None
    has_report: torch.BoolTensor | None = None
    loss_align: torch.FloatTensor | None = None
    loss_ortho: torch.FloatTensor | None = None
    text_last_hidden_state: torch.FloatTensor | None = None


@dataclass
class EmrFuseImageClassifierOutput(ModelOutput):
    r"""Output of :class:`EmrFuseForImageClassification`: ``loss``, ``logits`` first (as in every transformers head),
    then every field of :class:`EmrFuseModelOutput`.

    Args:
        loss (scalar): cross-entropy of the grade + ``align_loss_weight * loss_align + ortho_loss_weight * loss_ortho``
            (only when ``labels`` are given).
        logits (`(B, num_labels)`): one row per **case** (F20 before the softmax).
        loss_classification (scalar): the cross-entropy term alone.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    loss_classification: torch.FloatTensor | None = None
    case_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_features: torch.FloatTensor | None = None
    image_features: torch.FloatTensor | None = None
    slice_image_features: torch.FloatTensor | None = None
    alpha_text: torch.FloatTensor | None = None
    alpha_image: torch.FloatTensor | None = None
    token_attention: torch.FloatTensor | None = None
    channel_attention: torch.FloatTensor | None = None
    case_pooling_weights: torch.FloatTensor | None = None
    has_report: torch.BoolTensor | None = None
    loss_align: torch.FloatTensor | None = None
    loss_ortho: torch.FloatTensor | None = None
    text_last_hidden_state: torch.FloatTensor | None = None


@dataclass
class EmrFuseSegmenterOutput(ModelOutput):
    r"""Output of :class:`EmrFuseForSegmentation`: ``loss``, ``logits`` first, the fields below, then every field
    of :class:`EmrFuseModelOutput`.

    Args:
        loss (scalar): ``dice_loss_weight * loss_dice + bce_loss_weight * loss_bce`` + the weighted auxiliary
            losses (only when ``labels`` are given).
        logits (`(N, R, H, W)`): region logits (WT, TC, ET; sigmoid per region) at input resolution.
        loss_dice, loss_bce (scalar): the two segmentation terms.
        slice_embeds (`(N, fusion_dim)`): per-slice fused representation that conditions the decoder
            (``None`` without text).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    loss_dice: torch.FloatTensor | None = None
    loss_bce: torch.FloatTensor | None = None
    slice_embeds: torch.FloatTensor | None = None
    case_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_features: torch.FloatTensor | None = None
    image_features: torch.FloatTensor | None = None
    slice_image_features: torch.FloatTensor | None = None
    alpha_text: torch.FloatTensor | None = None
    alpha_image: torch.FloatTensor | None = None
    token_attention: torch.FloatTensor | None = None
    channel_attention: torch.FloatTensor | None = None
    case_pooling_weights: torch.FloatTensor | None = None
    has_report: torch.BoolTensor | None = None
    loss_align: torch.FloatTensor | None = None
    loss_ortho: torch.FloatTensor | None = None
    text_last_hidden_state: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------- helpers
def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per region (channel 1), over the whole batch, averaged over regions.

    ``1 - (2 sum(p y) + eps) / (sum(p) + sum(y) + eps)`` with ``p = sigmoid(logits)``; summing over the batch
    keeps slices without tumour from producing a 0/0.
    """
    probs = torch.sigmoid(logits.float())
    targets = targets.float()
    dims = (0,) + tuple(range(2, probs.ndim))
    inter = (probs * targets).sum(dims)
    denom = probs.sum(dims) + targets.sum(dims)
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()


def masked_feature_mean(feature_map: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each slice's feature map averaged over a mask: ``(N, C, h, w)`` and ``(N, H, W)`` (0/1, at input resolution)
    -> ``(N, C)``. The mask is brought to the map's grid by max-pooling (a map cell counts when any of its pixels is
    in the mask); a slice whose mask is empty gives zeros."""
    m = F.adaptive_max_pool2d(mask[:, None].float(), feature_map.shape[-2:]).to(feature_map.dtype)
    return (feature_map * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp(min=1)


def _l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2.0, dim=-1, eps=1e-12)


class _TokenAttention(nn.Module):
    """F8-F9: attention of the [CLS] feature over the report's token states."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size)
        self.query._emrfuse_init = "identity"
        self.scale = 1.0 / math.sqrt(hidden_size)

    def forward(self, cls: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.einsum("bd,bld->bl", self.query(cls), tokens).float() * self.scale
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return torch.einsum("bl,bld->bd", weights.to(tokens.dtype), tokens), weights


class _ChannelAttention(nn.Module):
    """F10-F12: softmax channel weights from the GAP channel descriptor; re-weights (keeps) the channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.logit_scale = nn.Parameter(torch.ones(channels))
        self.logit_bias = nn.Parameter(torch.zeros(channels))

    def weights(self, z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(z.float() * self.logit_scale.float() + self.logit_bias.float(), dim=-1)


class _CrossAttention(nn.Module):
    """Image positions (queries) attend to report tokens (keys/values) plus a learned null token."""

    def __init__(self, channels: int, text_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(1, channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(text_dim, channels)
        self.v = nn.Linear(text_dim, channels)
        self.out = nn.Linear(channels, channels)
        self.out._emrfuse_init = "zeros"
        self.null_token = nn.Parameter(torch.zeros(text_dim))

    def prepare(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project keys/values once per case: tokens (B, L, d_T), mask (B, L) -> k, v (B, L+1, C), mask (B, L+1)."""
        null = self.null_token.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        tokens = torch.cat([null, tokens], dim=1)
        mask = torch.cat([torch.ones(mask.shape[0], 1, dtype=torch.bool, device=mask.device), mask.bool()], dim=1)
        return self.k(tokens), self.v(tokens), mask

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor], index: torch.Tensor):
        n, c, h, w = x.shape
        k, v, mask = (t[index] for t in kv)
        q = self.q(self.norm(x).flatten(2).transpose(1, 2))  # (n, hw, c)

        def split(t):
            return t.reshape(n, -1, self.heads, c // self.heads).transpose(1, 2)

        attn_mask = mask[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(split(q), split(k).to(q.dtype), split(v).to(q.dtype), attn_mask=attn_mask)
        out = self.out(out.transpose(1, 2).reshape(n, h * w, c))
        return x + out.transpose(1, 2).reshape(n, c, h, w)


class _DecoderStage(nn.Module):
    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        cond_dim: int | None,
        text_dim: int | None,
        heads: int,
        cross_attention: bool,
    ):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.film = nn.Linear(cond_dim, 2 * out_channels) if cond_dim is not None else None
        if self.film is not None:
            self.film._emrfuse_init = "zeros"
        self.cross_attention = _CrossAttention(out_channels, text_dim, heads) if cross_attention else None

    def forward(self, x, skip, size, cond=None, kv=None, index=None):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip.to(x.dtype)], dim=1)
        x = self.block(x)
        if self.film is not None:
            gamma, beta = self.film(cond).to(x.dtype).chunk(2, dim=-1)
            x = x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        if self.cross_attention is not None:
            x = self.cross_attention(x, kv, index)
        return x


class EmrFuseSegmentationDecoder(nn.Module):
    """U-Net decoder over timm multi-scale features, FiLM- and cross-attention-conditioned on the report."""

    def __init__(self, config: EmrFuseConfig, encoder_channels: list[int], text_dim: int | None):
        super().__init__()
        channels = list(config.decoder_channels)
        if len(channels) != len(encoder_channels):
            raise ValueError(
                f"decoder_channels has {len(channels)} stages but the image tower "
                f"{config.vision_config['architecture']!r} gives {len(encoder_channels)} feature levels "
                f"(channels {encoder_channels}); give one decoder stage per level."
            )
        use_text = config.use_text
        stages = []
        in_ch = encoder_channels[-1]
        skips = list(reversed(encoder_channels[:-1])) + [0]
        for j, (out_ch, skip_ch) in enumerate(zip(channels, skips)):
            stages.append(
                _DecoderStage(
                    in_ch,
                    skip_ch,
                    out_ch,
                    cond_dim=config.fusion_dim if use_text else None,
                    text_dim=text_dim,
                    heads=config.cross_attention_heads,
                    cross_attention=use_text and config.use_cross_attention and j < config.cross_attention_scales,
                )
            )
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)
        self.head = nn.Conv2d(channels[-1], len(config.regions), kernel_size=1)

    def prepare_text(self, tokens: torch.Tensor, mask: torch.Tensor):
        return [s.cross_attention.prepare(tokens, mask) if s.cross_attention is not None else None for s in self.stages]

    def forward(self, feature_maps, bottleneck, size, cond=None, kvs=None, index=None):
        skips = list(reversed(feature_maps[:-1]))
        x = bottleneck
        for j, stage in enumerate(self.stages):
            skip = skips[j] if j < len(skips) else None
            target = skip.shape[-2:] if skip is not None else size
            x = stage(x, skip, target, cond, kvs[j] if kvs is not None else None, index)
        return self.head(x)


# ----------------------------------------------------------------------------------------------- models
class EmrFusePreTrainedModel(PreTrainedModel):
    """Base class: config class, weight init that leaves the (pre-trained) towers alone, Hub plumbing."""

    config_class = EmrFuseConfig
    config: EmrFuseConfig
    base_model_prefix = "emrfuse"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = False
    _no_split_modules = ["BertLayer"]

    def __init__(self, config: EmrFuseConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        # every saved checkpoint can be rebuilt by every Auto class (not only the one of the saved head)
        config.auto_map = {**(getattr(config, "auto_map", None) or {}), **AUTO_MAP}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """Initialise the fusion head, pooling, decoder and task heads.

        The towers are never touched here: the BERT tower is a ``PreTrainedModel`` initialised (or loaded) by
        itself, and every module of the timm tower is flagged ``_is_hf_initialized`` when it is attached (timm
        initialises its own weights, or they were loaded pre-trained), so ``post_init`` skips them.
        """
        std = self.config.initializer_range
        special = getattr(module, "_emrfuse_init", None)  # set on leaf modules that need a specific init
        if isinstance(module, nn.Linear):
            if special == "identity":  # token attention query: the paper's plain dot product H_T . e_i at init
                init.eye_(module.weight)
            elif special == "zeros":  # FiLM / cross-attention output: the plain U-Net at init
                init.zeros_(module.weight)
            else:
                init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, _ChannelAttention):
            init.ones_(module.logit_scale)  # the paper's softmax(z) at init
            init.zeros_(module.logit_bias)
        elif isinstance(module, _CrossAttention):
            init.normal_(module.null_token, mean=0.0, std=std)
        elif isinstance(module, EmrFuseModel) and module.no_report_embedding is not None:
            init.normal_(module.no_report_embedding, mean=0.0, std=std)

    @staticmethod
    def _mark_initialised(module: nn.Module) -> None:
        """Flag every submodule and tensor of a tower so that ``post_init`` does not re-initialise it."""
        for sub in module.modules():
            sub._is_hf_initialized = True
        for tensor in list(module.parameters()) + list(module.buffers()):
            tensor._is_hf_initialized = True

    @classmethod
    def from_text_vision_pretrained(
        cls,
        text_name_or_path: str | None,
        vision_name: str,
        vision_pretrained: bool = True,
        text_kwargs: dict | None = None,
        vision_kwargs: dict | None = None,
        **config_kwargs,
    ):
        """Build the model from a pre-trained BERT-family checkpoint and pre-trained timm weights.

        Args:
            text_name_or_path: a Hub id or local folder loadable by ``BertModel.from_pretrained`` (ignored, may be
                ``None``, when ``use_text=False`` is in ``config_kwargs``).
            vision_name: a timm model name (``"resnet50"``, ``"resnet50.a1_in1k"``, ...). timm adapts the first
                convolution of the pre-trained weights to ``in_chans``. Ignored, may be ``None``, when
                ``use_image=False`` is in ``config_kwargs`` (the text-only model builds no image tower).
            vision_pretrained: load timm's pre-trained weights (``False``: timm's random init).
            text_kwargs: extra arguments for ``BertModel.from_pretrained`` (e.g. ``{"local_files_only": True}``).
            vision_kwargs: extra arguments for ``timm.create_model`` that are **not** stored in the config (e.g.
                ``pretrained_cfg_overlay=dict(file=...)`` to load weights from a local file).
            config_kwargs: the other :class:`EmrFuseConfig` arguments (``fusion_dim``, switches, ...); a
                ``vision_config`` dict here is merged with ``{"architecture": vision_name}``.
        """
        use_text = config_kwargs.get("use_text", True)
        use_image = config_kwargs.get("use_image", True)
        vision_config = dict(config_kwargs.pop("vision_config", None) or {})
        if use_image or vision_name is not None:
            vision_config["architecture"] = vision_name
        text_model = None
        if use_text:
            if text_name_or_path is None:
                raise ValueError("text_name_or_path is required when use_text=True.")
            text_model = BertModel.from_pretrained(text_name_or_path, add_pooling_layer=False, **(text_kwargs or {}))
            config_kwargs["text_config"] = text_model.config
        config = EmrFuseConfig(vision_config=vision_config, **config_kwargs)
        if not config.use_image:
            return cls(config, text_model=text_model)
        vc = dict(config.vision_config)
        arch = vc.pop("architecture")
        vision_model = timm.create_model(
            arch, pretrained=vision_pretrained, features_only=True, **vc, **(vision_kwargs or {})
        )
        return cls(config, text_model=text_model, vision_model=vision_model)


def _build_vision_tower(config: EmrFuseConfig) -> nn.Module:
    vc = dict(config.vision_config)
    arch = vc.pop("architecture")
    return timm.create_model(arch, pretrained=False, features_only=True, **vc)


@dataclass
class TextState:
    """The reports of a batch, encoded once per case (:meth:`EmrFuseModel.encode_text`)."""

    features: torch.Tensor | None  # (B, d_T) after attention/residual/no-report
    tokens: torch.Tensor | None  # (B, L, d_T)
    token_mask: torch.Tensor | None  # (B, L) bool
    token_attention: torch.Tensor | None  # (B, L)
    has_report: torch.Tensor  # (B,) bool


@dataclass
class FusionOutput:
    """The fusion head's result for paired text/image features (:meth:`EmrFuseModel.fuse`): the (projected) text
    and image features ``t``/``i``, the dynamic weights ``alpha_t``/``alpha_i`` (None when off) and F19's ``embeds``."""

    t: torch.Tensor | None
    i: torch.Tensor | None
    alpha_t: torch.Tensor | None
    alpha_i: torch.Tensor | None
    embeds: torch.Tensor


class EmrFuseModel(EmrFusePreTrainedModel):
    """Text tower + image tower + the paper's fusion head (F6-F19); returns the fused case representation.

    ``forward(pixel_values, input_ids=None, attention_mask=None, token_type_ids=None, slice_to_case=None,
    has_report=None, return_dict=True)`` -> :class:`EmrFuseModelOutput`.

    Building blocks for task heads (public and stable; :class:`EmrFuseForSegmentation` is built from them):

    1. :meth:`check_inputs` validates a batch and returns ``(slice_to_case, has_report, num_cases)``;
    2. :meth:`encode_text` runs the text tower once per case -> :class:`TextState`;
    3. :meth:`slice_chunks` splits the slices into the chunks inference runs at a time, and :meth:`encode_slices`
       runs the image tower on one chunk (optionally keeping the feature maps a decoder needs);
    4. :meth:`fuse` applies the fusion head to paired text/image features -> :class:`FusionOutput`;
    5. :meth:`case_outputs` pools slice features per case (:meth:`pool_cases`), fuses them with the reports and
       computes the auxiliary losses (:meth:`auxiliary_losses`): the fields of :class:`EmrFuseModelOutput`;
    6. :meth:`weighted_auxiliary_loss` weighs ``loss_align`` / ``loss_ortho`` for a head's total loss.

    Architecture (formula numbers refer to the paper):

    * **Text tower** (F1-F3): a ``transformers`` :class:`~transformers.BertModel` built from
      ``config.text_config``; ``H_T`` is the last layer's [CLS] vector. A case's report is encoded
      **once**, however many of its slices are in the batch: ``input_ids`` has one row per case and
      ``slice_to_case`` maps every slice to its row. Reports that are missing (no real token besides
      [CLS]/[SEP], or ``has_report=False``) are not run through the tower; their text feature is a
      learned "no report" vector (``no_report_embedding``) and the outputs say which (``has_report``).
    * **Image tower** (F4-F5): ``timm.create_model(arch, features_only=True, in_chans=4*(2k+1))``; the
      last feature map ``X^(L)`` is pooled by GAP into ``H_I`` per slice.
    * **Self-attention** (``use_self_attention``):
      - text, F8-F9: ``alpha_i = softmax_i((W_q H_T) . e_i / sqrt(d_T))`` over the real tokens (padding gets 0),
        ``H_T^att = sum_i alpha_i e_i``, where ``e_i`` are the last-layer token states. ``W_q`` starts as the
        identity, i.e. the paper's dot product (scaled by ``1/sqrt(d_T)`` so that the softmax is not one-hot).
      - image, F10-F12: ``z_c = GAP(X)_c``, ``beta = softmax(s * z + b)`` over channels (``s = 1, b = 0`` at
        init: the paper's F11), and the map is **re-weighted** channel by channel, ``X_att = C * beta_c X_c``
        (deviation from the literal F12, which would collapse the map to one channel). The
        re-weighted map is the segmentation decoder's bottleneck; its GAP is the slice feature.
    * **Residual connections** (``use_residual``) are "add & norm" blocks: ``LN(x + f(x))`` around the
      text attention (``LN(H_T + H_T^att)``), around the image channel attention (``LN(GAP(X + X_att))``: the norm
      acts on the pooled vector; the decoder gets ``X + X_att``) and around the dynamic weighting
      (``LN((t + i) + alpha_T t + alpha_I i)``, or with concatenations without alignment). Switching them off removes
      the additions and the LayerNorms (with self-attention and weighting both off the switch has nothing to act on).
    * **Case pooling** (grading): slice features of one case are pooled into one case feature by
      attention-MIL pooling (Ilse et al., 2018): ``a_n = softmax_{n in case}(w^T tanh(V h_n))``,
      ``h_case = sum_n a_n h_n`` (``case_pooling="attention"``), or by a plain mean (``"mean"``).
      The weights are returned (``case_pooling_weights``).
    * **Orthogonality loss** (F13) on the towers' own case features, before projection:
      with the rows of ``H_T`` (B x d_T) and ``H_I`` (B x d_I) L2-normalised,
      ``L_ortho = ||H_T^T H_I||_F`` (the d_T x d_I cross-correlation over the cases of the batch that have a report).
    * **Alignment** (``use_alignment``, F14-F16): both features are projected into a shared
      ``fusion_dim`` space (Linear + LayerNorm), normalised, ``S = T_norm I_norm^T`` is the B x B cosine matrix
      and ``L_align = ||S - I||_F^2`` (cases with a report only). With one case it is ``(1 - cos)^2``.
    * **Dynamic weighting** (``use_dynamic_weighting``, F17-F18): ``alpha_T = sigmoid(W_T t)``,
      ``alpha_I = sigmoid(W_I i)``. In the shared space ``H = alpha_T t + alpha_I i`` (F18). Without alignment
      there is no shared space: the weighted features are concatenated, ``H = [alpha_T t; alpha_I i]``.
    * **Concatenation** (F6-F7): when dynamic weighting is off, ``H = [t; i] / ||[t; i]||_2`` (in the tower spaces
      without alignment: Table 1's "Image + Text (no alignment, no attention)" row; in the shared space with it).
      Without residual, the weighted concatenation is L2-normalised the same way.
    * **F19**: ``H_final = ReLU(W_f H + b_f)`` (then dropout) is the fused representation (``case_embeds``, size
      ``fusion_dim``); **F20-F21**: the grading head ``softmax(W_c H_final + b_c)``, argmax.
    * **Image only** (``use_text=False``): no text tower, no fusion parts: ``H = H_I``; the classification
      model is ResNet + F19-F20 and the segmentation model is a plain ResNet U-Net.
    * **Text only** (``use_image=False``, preset ``"text_only"``, the "Single-modality Text" model): no image tower,
      no fusion parts: ``H = H_T`` (the [CLS] feature, F3), then F19-F21. It grades from ``input_ids`` alone
      (``pixel_values`` is not an input; one report per case) and has no segmentation model.
    """

    def __init__(
        self, config: EmrFuseConfig, text_model: nn.Module | None = None, vision_model: nn.Module | None = None
    ):
        super().__init__(config)
        self.use_text = config.use_text
        self.use_image = config.use_image
        # --- image tower (none in the text-only model)
        if not config.use_image:
            if vision_model is not None:
                raise ValueError("A vision_model was given but config.use_image=False (text-only model).")
            self.vision_model = None
            self.feature_channels = []
            d_i = 0
        else:
            if vision_model is None:
                vision_model = _build_vision_tower(config)
            self.vision_model = vision_model
            self._mark_initialised(self.vision_model)
            self.feature_channels = list(self.vision_model.feature_info.channels())
            d_i = self.feature_channels[-1]
        # --- text tower
        if config.use_text:
            if text_model is None:
                text_model = BertModel(config.text_config, add_pooling_layer=False)
            else:
                self._mark_initialised(text_model)
            self.text_model = text_model
            d_t = config.text_config.hidden_size
            self.no_report_embedding = nn.Parameter(torch.zeros(d_t))
        else:
            if text_model is not None:
                raise ValueError("A text_model was given but config.use_text=False.")
            self.text_model = None
            d_t = 0
            self.no_report_embedding = None
        self.text_dim, self.image_dim = d_t, d_i
        D = config.fusion_dim
        # --- self-attention (F8-F12) and its add & norm residuals
        sa, res = config.use_self_attention, config.use_residual
        self.token_attention = _TokenAttention(d_t) if sa else None
        self.channel_attention = _ChannelAttention(d_i) if sa else None
        self.text_attention_norm = nn.LayerNorm(d_t) if sa and res else None
        self.image_attention_norm = nn.LayerNorm(d_i) if sa and res else None
        # --- case pooling of slice features
        if config.case_pooling == "attention" and config.use_image:
            self.pool_score = nn.Sequential(
                nn.Linear(d_i, config.case_pooling_dim), nn.Tanh(), nn.Linear(config.case_pooling_dim, 1)
            )
        else:
            self.pool_score = None
        # --- alignment: shared space (F14) + L_align
        al, dw = config.use_alignment, config.use_dynamic_weighting
        self.text_projection = nn.Sequential(nn.Linear(d_t, D), nn.LayerNorm(D)) if al else None
        self.image_projection = nn.Sequential(nn.Linear(d_i, D), nn.LayerNorm(D)) if al else None
        dim_t, dim_i = (D, D) if al else (d_t, d_i)
        # --- dynamic weighting (F17-F18)
        self.text_gate = nn.Linear(dim_t, 1) if dw else None
        self.image_gate = nn.Linear(dim_i, 1) if dw else None
        if not config.use_text:
            fused_dim = d_i
        elif not config.use_image:
            fused_dim = d_t
        elif dw and al:
            fused_dim = D
        else:
            fused_dim = dim_t + dim_i
        self.fusion_norm = nn.LayerNorm(fused_dim) if (dw and res) else None
        # --- F19
        self.fusion_fc = nn.Linear(fused_dim, D)
        self.fusion_dropout = nn.Dropout(config.fusion_dropout)
        self.post_init()

    # ------------------------------------------------------------------ input checks
    def _check_text_only_inputs(self, pixel_values, input_ids, attention_mask, slice_to_case, has_report):
        """Checks of the text-only model: one report per case, nothing image-side."""
        if pixel_values is not None or slice_to_case is not None:
            given = "pixel_values" if pixel_values is not None else "slice_to_case"
            raise ValueError(
                f"{given} was given to a text-only model (use_image=False), which has no image tower: "
                "pass only input_ids / attention_mask (one report per case)."
            )
        if input_ids is None:
            raise ValueError("A text-only model (use_image=False) needs input_ids (one report per case).")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}.")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}."
            )
        b = input_ids.shape[0]
        if has_report is not None:
            has_report = torch.as_tensor(has_report, device=input_ids.device).bool()
            if has_report.shape != (b,):
                raise ValueError(f"has_report must have shape ({b},), got {tuple(has_report.shape)}.")
        return None, has_report, b

    def check_inputs(self, pixel_values, input_ids, attention_mask, slice_to_case, has_report):
        """Validate a batch (shapes, channel count, case indices) with clear errors; returns
        ``(slice_to_case (N,) long or None for a text-only model, has_report (B,) bool or None, number of cases B)``."""
        if not self.use_image:
            return self._check_text_only_inputs(pixel_values, input_ids, attention_mask, slice_to_case, has_report)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a (N, C, H, W) tensor, got {shape}.")
        n, c = pixel_values.shape[:2]
        if c != self.config.in_channels:
            raise ValueError(
                f"pixel_values has {c} channels but the model expects {self.config.in_channels} "
                f"(4 sequences x (2 * context_slices + 1))."
            )
        if input_ids is not None and self.use_text:
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}.")
            if attention_mask is not None and attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}."
                )
        if slice_to_case is not None:
            slice_to_case = torch.as_tensor(slice_to_case, device=pixel_values.device).long()
            if slice_to_case.shape != (n,):
                raise ValueError(
                    f"slice_to_case must have shape ({n},) (one case index per slice), got {tuple(slice_to_case.shape)}."
                )
        if input_ids is not None and self.use_text:
            b = input_ids.shape[0]
        elif has_report is not None:
            b = len(has_report)
        elif slice_to_case is not None:
            b = int(slice_to_case.max().item()) + 1 if n else 0
        else:
            b = n
        if slice_to_case is None:
            if b != n:
                raise ValueError(
                    f"{n} slices but {b} reports: pass slice_to_case (the report index of each slice) "
                    "unless there is exactly one report per slice."
                )
            slice_to_case = torch.arange(n, device=pixel_values.device)
        else:
            if n and (int(slice_to_case.min()) < 0 or int(slice_to_case.max()) >= b):
                raise ValueError(
                    f"slice_to_case values must be in [0, {b}), got [{int(slice_to_case.min())}, {int(slice_to_case.max())}]."
                )
            counts = torch.bincount(slice_to_case, minlength=b)
            if (counts == 0).any():
                missing = torch.nonzero(counts == 0).flatten().tolist()
                raise ValueError(f"cases {missing} have no slice in the batch (slice_to_case).")
        if has_report is not None:
            has_report = torch.as_tensor(has_report, device=pixel_values.device).bool()
            if has_report.shape != (b,):
                raise ValueError(f"has_report must have shape ({b},), got {tuple(has_report.shape)}.")
        return slice_to_case, has_report, b

    # ------------------------------------------------------------------ pieces
    def encode_text(
        self,
        input_ids,
        attention_mask,
        token_type_ids,
        has_report,
        num_cases: int,
        device,
        tower_hidden: torch.Tensor | None = None,
    ) -> TextState:
        """Run the text tower once per case with a report (F1-F3, F8-F9, add & norm, no-report state).

        ``tower_hidden`` (`(B, L, d_T)`): the text tower's last hidden state for every case, computed beforehand
        (:meth:`tower_features`); the tower is then not run (rows of cases without a report are ignored).
        """
        if not self.use_text:
            hr = has_report if has_report is not None else torch.zeros(num_cases, dtype=torch.bool, device=device)
            return TextState(None, None, None, None, hr)
        if input_ids is None:
            derived = torch.zeros(num_cases, dtype=torch.bool, device=device)
            if has_report is not None and bool(has_report.any()):
                raise ValueError("has_report says some cases have a report but no input_ids were given.")
            feats = self.no_report_embedding[None].expand(num_cases, -1)
            return TextState(feats, None, None, None, derived)
        if attention_mask is None:
            pad = self.config.text_config.pad_token_id
            attention_mask = (input_ids != pad) if pad is not None else torch.ones_like(input_ids)
        mask = attention_mask.bool()
        # a report with no real token besides [CLS]/[SEP] is missing
        derived = mask.sum(dim=1) > 2
        has_report = derived if has_report is None else (has_report & mask.any(dim=1))
        d_t = self.text_dim
        b, length = input_ids.shape
        param = self.no_report_embedding
        tokens = torch.zeros(b, length, d_t, dtype=param.dtype, device=input_ids.device)
        feats = param[None].expand(b, -1).clone()
        token_attention = torch.zeros(b, length, device=input_ids.device) if self.token_attention is not None else None
        idx = torch.nonzero(has_report).flatten()
        if idx.numel():
            if tower_hidden is not None:
                hidden = tower_hidden[idx]
            else:
                hidden = self.text_model(
                    input_ids=input_ids[idx],
                    attention_mask=attention_mask[idx],
                    token_type_ids=token_type_ids[idx] if token_type_ids is not None else None,
                ).last_hidden_state
            cls = hidden[:, 0]  # F3
            if self.token_attention is not None:
                att, weights = self.token_attention(cls, hidden, mask[idx])  # F8-F9
                cls = self.text_attention_norm(cls + att) if self.text_attention_norm is not None else att
                token_attention = token_attention.index_put((idx,), weights.to(token_attention.dtype))
            tokens = tokens.to(hidden.dtype).index_put((idx,), hidden)
            feats = feats.to(cls.dtype).index_put((idx,), cls)
        mask = mask & has_report[:, None]
        return TextState(feats, tokens, mask, token_attention, has_report)

    def encode_slices(
        self, pixel_values: torch.Tensor | None, keep_maps: bool = False, gap: torch.Tensor | None = None
    ):
        """Image tower (F4-F5) + channel attention (F10-F12) + add & norm.

        ``gap`` (`(N, d_I)`): the tower's pooled last feature map, computed beforehand (:meth:`tower_features`);
        the tower is then not run (``keep_maps`` must be False).
        Returns ``(feature_maps or None, bottleneck map or None, slice features (N, d_I), channel weights or None)``.
        """
        if gap is not None:
            if keep_maps:
                raise ValueError("encode_slices: keep_maps needs the feature maps, not precomputed pooled features.")
            maps = x = None
            z = gap
        else:
            maps = self.vision_model(pixel_values)
            x = maps[-1]
            z = x.mean(dim=(2, 3))  # F10 / F5 (GAP)
        beta = None
        bottleneck = x if keep_maps else None
        if self.channel_attention is not None:
            beta = self.channel_attention.weights(z)  # F11
            scale = (beta * beta.shape[-1]).to(z.dtype)  # mean weight 1 (re-weights, keeps C channels)
            if self.image_attention_norm is not None:
                h = self.image_attention_norm(z + scale * z)  # GAP(X + X_att), add & norm
                if keep_maps:
                    bottleneck = x + x * scale[:, :, None, None]
            else:
                h = scale * z  # GAP(X_att)
                if keep_maps:
                    bottleneck = x * scale[:, :, None, None]
        else:
            h = z
        return (maps if keep_maps else None), bottleneck, h, beta

    def pool_cases(self, h: torch.Tensor, slice_to_case: torch.Tensor, num_cases: int):
        """Pool slice features (N, d) into case features (B, d); returns ``(pooled, weights (N,))``."""
        h32 = h.float()
        if self.pool_score is not None:
            scores = self.pool_score(h).float().squeeze(-1)
            smax = torch.full((num_cases,), float("-inf"), device=h.device).scatter_reduce(
                0, slice_to_case, scores, reduce="amax", include_self=True
            )
            e = torch.exp(scores - smax[slice_to_case])
        else:
            e = torch.ones(h.shape[0], device=h.device)
        denom = torch.zeros(num_cases, device=h.device).index_add(0, slice_to_case, e)
        weights = e / denom[slice_to_case]
        pooled = torch.zeros(num_cases, h.shape[-1], device=h.device).index_add(
            0, slice_to_case, weights[:, None] * h32
        )
        return pooled.to(h.dtype), weights

    def fuse(self, text: torch.Tensor | None, image: torch.Tensor) -> FusionOutput:
        """F6-F7 / F14 projection / F17-F18 / add & norm / F19 on paired unit features."""
        cfg = self.config
        if not self.use_text:
            return FusionOutput(None, image, None, None, self.fusion_dropout(F.relu(self.fusion_fc(image))))
        if not self.use_image:  # Single-modality Text: H = H_T, then F19
            return FusionOutput(text, None, None, None, self.fusion_dropout(F.relu(self.fusion_fc(text))))
        t, i = text, image
        if self.text_projection is not None:
            t, i = self.text_projection(t), self.image_projection(i)
        i = i.to(t.dtype)
        alpha_t = alpha_i = None
        if cfg.use_dynamic_weighting:
            alpha_t = torch.sigmoid(self.text_gate(t))  # F17
            alpha_i = torch.sigmoid(self.image_gate(i))
            if cfg.use_alignment:
                fused, skip = alpha_t * t + alpha_i * i, t + i  # F18
            else:
                fused, skip = torch.cat([alpha_t * t, alpha_i * i], -1), torch.cat([t, i], -1)
            if self.fusion_norm is not None:
                fused = self.fusion_norm(skip + fused)
            elif not cfg.use_alignment:
                fused = _l2_normalise(fused)  # F7 on the weighted concatenation
        else:
            fused = _l2_normalise(torch.cat([t, i], dim=-1))  # F6-F7
        embeds = self.fusion_dropout(F.relu(self.fusion_fc(fused)))  # F19
        return FusionOutput(t, i, alpha_t, alpha_i, embeds)

    def auxiliary_losses(self, text: TextState, image_case: torch.Tensor, fusion: FusionOutput):
        """``(loss_align, loss_ortho)`` at case level over the cases with a report (``None`` when off)."""
        cfg = self.config
        loss_align = loss_ortho = None
        if not self.use_text or not self.use_image:
            return None, None
        keep = text.has_report
        if not bool(keep.any()):
            zero = image_case.sum() * 0.0  # no case with a report: nothing to align or orthogonalise
            return (
                zero if cfg.use_alignment and cfg.align_loss_weight > 0 else None,
                zero if cfg.ortho_loss_weight > 0 else None,
            )
        if cfg.ortho_loss_weight > 0:
            th = _l2_normalise(text.features[keep].float())
            ih = _l2_normalise(image_case[keep].float())
            loss_ortho = torch.linalg.matrix_norm(th.transpose(0, 1) @ ih, ord="fro")  # F13
        if cfg.use_alignment and cfg.align_loss_weight > 0:
            tn = _l2_normalise(fusion.t[keep].float())  # F14
            im = _l2_normalise(fusion.i[keep].float())
            s = tn @ im.transpose(0, 1)  # F15: B x B cosine matrix
            eye = torch.eye(s.shape[0], device=s.device)
            loss_align = ((s - eye) ** 2).sum()  # F16
        return loss_align, loss_ortho

    def weighted_auxiliary_loss(self, loss_align, loss_ortho):
        """``align_loss_weight * loss_align + ortho_loss_weight * loss_ortho`` over the terms that are on (None if none)."""
        total = None
        for value, weight in ((loss_align, self.config.align_loss_weight), (loss_ortho, self.config.ortho_loss_weight)):
            if value is not None and weight > 0:
                total = weight * value if total is None else total + weight * value
        return total

    @torch.no_grad()
    def tower_features(self, pixel_values, input_ids=None, attention_mask=None, token_type_ids=None):
        """What the two towers compute for one case, for training the rest of the model on frozen towers:
        ``(gap (N, d_I) or None, text hidden state (1, L, d_T) or None)``. The image tower runs in chunks of
        ``config.slice_chunk_size`` slices (not at all for ``pixel_values=None``); the text tower once (``None``
        without a report or a text tower)."""
        gap = None
        if self.use_image and pixel_values is not None:
            gap = torch.cat(
                [
                    self.vision_model(pixel_values[s:e])[-1].mean(dim=(2, 3))
                    for s, e in self.slice_chunks(pixel_values.shape[0])
                ]
            )
        hidden = None
        if self.use_text and input_ids is not None:
            hidden = self.text_model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
        return gap, hidden

    def outputs_from_tower_features(
        self, gap, slice_to_case, num_cases: int, input_ids=None, attention_mask=None, text_hidden=None, has_report=None
    ) -> EmrFuseModelOutput:
        """The model's outputs from the towers' precomputed features (:meth:`tower_features`): everything after the
        towers (self-attention, case pooling, fusion, auxiliary losses) runs as in :meth:`forward`."""
        device = gap.device if gap is not None else text_hidden.device
        if self.use_text and input_ids is not None and text_hidden is None:
            raise ValueError(
                "outputs_from_tower_features: input_ids were given without the text tower's hidden states."
            )
        text = self.encode_text(
            input_ids, attention_mask, None, has_report, num_cases, device, tower_hidden=text_hidden
        )
        h = self.encode_slices(None, gap=gap)[2] if self.use_image else None
        return EmrFuseModelOutput(**self.case_outputs(text, h, slice_to_case, num_cases, return_hidden=False))

    def slice_chunks(self, n: int):
        """``[(start, end), ...]`` over ``n`` slices: one chunk while training (gradients), chunks of
        ``config.slice_chunk_size`` otherwise (bounded memory on whole volumes)."""
        size = n if torch.is_grad_enabled() else max(1, self.config.slice_chunk_size)
        return [(s, min(n, s + size)) for s in range(0, n, size)] or [(0, 0)]

    def case_outputs(self, text: TextState, slice_feats, slice_to_case, num_cases, return_hidden: bool):
        """Case pooling, fusion (F6-F19) and auxiliary losses from encoded reports and slice features (``None`` for a
        text-only model): a dict of :class:`EmrFuseModelOutput` fields (``text_last_hidden_state`` only with
        ``return_hidden``)."""
        if slice_feats is None:  # text-only model
            image_case = pool_weights = None
        else:
            image_case, pool_weights = self.pool_cases(slice_feats, slice_to_case, num_cases)
        fusion = self.fuse(text.features, image_case)
        loss_align, loss_ortho = self.auxiliary_losses(text, image_case, fusion)
        return dict(
            case_embeds=fusion.embeds,
            text_embeds=fusion.t,
            image_embeds=fusion.i,
            text_features=text.features,
            image_features=image_case,
            slice_image_features=slice_feats,
            alpha_text=fusion.alpha_t,
            alpha_image=fusion.alpha_i,
            token_attention=text.token_attention,
            case_pooling_weights=pool_weights,
            has_report=text.has_report,
            loss_align=loss_align,
            loss_ortho=loss_ortho,
            text_last_hidden_state=text.tokens if return_hidden else None,
        )

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        slice_to_case: torch.LongTensor | None = None,
        has_report: torch.BoolTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> EmrFuseModelOutput | tuple:
        r"""Encode the slices and (once per case) the reports, pool slices per case and fuse.

        Args:
            pixel_values (`(N, C, H, W)` float): slices, ``C = 4 * (2 * context_slices + 1)``; not an input of the
                text-only model (``use_image=False``), whose case count is the number of reports.
            input_ids, attention_mask, token_type_ids (`(B, L)`): one tokenised report per case.
            slice_to_case (`(N,)` long): case/report index of each slice in ``0..B-1``; ``None`` means ``N == B``.
            has_report (`(B,)` bool): ``None`` derives it (a report without any token besides [CLS]/[SEP] is
                missing); ``False`` forces the learned no-report state.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        slice_to_case, has_report, b = self.check_inputs(
            pixel_values, input_ids, attention_mask, slice_to_case, has_report
        )
        if not self.use_image:
            text = self.encode_text(input_ids, attention_mask, token_type_ids, has_report, b, input_ids.device)
            output = EmrFuseModelOutput(**self.case_outputs(text, None, None, b, return_hidden=True))
            return output if return_dict else output.to_tuple()
        text = self.encode_text(input_ids, attention_mask, token_type_ids, has_report, b, pixel_values.device)
        feats, betas = [], []
        for s, e in self.slice_chunks(pixel_values.shape[0]):
            _, _, h, beta = self.encode_slices(pixel_values[s:e])
            feats.append(h)
            betas.append(beta)
        out = self.case_outputs(text, torch.cat(feats), slice_to_case, b, return_hidden=True)
        out["channel_attention"] = torch.cat(betas) if betas[0] is not None else None
        output = EmrFuseModelOutput(**out)
        return output if return_dict else output.to_tuple()


class EmrFuseForImageClassification(EmrFusePreTrainedModel):
    """Case-level grading (HGG vs LGG by default): slices pooled per case, fused with the report, F19-F21.

    ``forward(pixel_values, input_ids=None, attention_mask=None, token_type_ids=None, slice_to_case=None,
    has_report=None, labels=None (B,) long, return_dict=True)`` -> :class:`EmrFuseImageClassifierOutput`
    with ``logits`` (B, num_labels), one row per case.
    """

    def __init__(
        self, config: EmrFuseConfig, text_model: nn.Module | None = None, vision_model: nn.Module | None = None
    ):
        super().__init__(config)
        self.emrfuse = EmrFuseModel(config, text_model=text_model, vision_model=vision_model)
        self.classifier = nn.Linear(config.fusion_dim, config.num_labels)  # F20 (W_c, b_c)
        self.tumour_levels: list[int] = []
        self.tumour_projection = None
        if config.grading_pooling == "tumour" and config.use_image:
            reductions = list(self.emrfuse.vision_model.feature_info.reduction())
            missing = [s for s in config.grading_pooling_strides if s not in reductions]
            if missing:
                raise ValueError(
                    f"grading_pooling_strides {config.grading_pooling_strides}: the image tower has no feature map of "
                    f"stride {missing} (its strides: {reductions})."
                )
            self.tumour_levels = [reductions.index(s) for s in config.grading_pooling_strides]
            channels = sum(self.emrfuse.feature_channels[i] for i in self.tumour_levels)
            self.tumour_projection = nn.Linear(channels, self.emrfuse.image_dim)
        self.post_init()

    def tumour_features(self, pixel_values: torch.Tensor, pooling_mask: torch.Tensor) -> torch.Tensor:
        """``(N, sum of channels)``: each slice's feature maps of the strides ``config.grading_pooling_strides``
        averaged over its mask (:func:`masked_feature_mean`), concatenated. The tower runs in chunks (see
        :meth:`EmrFuseModel.slice_chunks`)."""
        out = []
        for s, e in self.emrfuse.slice_chunks(pixel_values.shape[0]):
            maps = self.emrfuse.vision_model(pixel_values[s:e])
            out.append(torch.cat([masked_feature_mean(maps[i], pooling_mask[s:e]) for i in self.tumour_levels], 1))
        return torch.cat(out)

    def grading_bag(self, pixel_values, pooling_mask, slice_to_case, num_cases: int) -> dict | None:
        """What the tower gives the grading head with ``grading_pooling="tumour"``: ``{"gap", "slice_to_case",
        "tumour_features", "tumour_slice_to_case"}``. A case with tumour in its mask contributes the slices that
        contain tumour, each as :meth:`tumour_features`; a case with an empty mask contributes all its slices as
        today's pooled last feature map (``gap``). ``None`` when no case has tumour (then today's forward runs)."""
        with_tumour = pooling_mask.flatten(1).bool().any(dim=1)
        case_has = torch.zeros(num_cases, dtype=torch.bool, device=slice_to_case.device)
        case_has[slice_to_case[with_tumour]] = True
        if not bool(case_has.any()):
            return None
        fallback = ~case_has[slice_to_case]
        gap = None
        if bool(fallback.any()):
            x = pixel_values[fallback]
            gap = torch.cat(
                [self.emrfuse.vision_model(x[s:e])[-1].mean(dim=(2, 3)) for s, e in self.emrfuse.slice_chunks(len(x))]
            )
        return {
            "gap": gap,
            "slice_to_case": slice_to_case[fallback] if gap is not None else None,
            "tumour_features": self.tumour_features(pixel_values[with_tumour], pooling_mask[with_tumour]),
            "tumour_slice_to_case": slice_to_case[with_tumour],
        }

    def bag_slice_features(self, gap, slice_to_case, tumour_features=None, tumour_slice_to_case=None):
        """``(slice features before the head (N, d_I), slice_to_case)``: ``gap`` as it is, followed by the
        projected ``tumour_features`` (the one place where both are put together, for training and inference)."""
        if tumour_features is None:
            return gap, slice_to_case
        projected = self.tumour_projection(tumour_features)
        if gap is None:
            return projected, tumour_slice_to_case
        return torch.cat([gap, projected.to(gap.dtype)]), torch.cat([slice_to_case, tumour_slice_to_case])

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        slice_to_case: torch.LongTensor | None = None,
        has_report: torch.BoolTensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        pooling_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> EmrFuseImageClassifierOutput | tuple:
        r"""See :meth:`EmrFuseModel.forward`; ``labels`` (`(B,)` long): grade index per case.

        ``pooling_mask`` (`(N, H, W)`, 0/1, aligned with ``pixel_values``): the predicted whole tumour of every
        slice, read with ``config.grading_pooling="tumour"`` (ignored otherwise): each case is graded from the
        feature maps averaged over its tumour, on its slices with tumour (:meth:`grading_bag`); a case whose mask
        is empty, or every case when the mask is absent, is pooled as with ``"slices"``."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        bag = None
        if self.tumour_projection is not None and pooling_mask is not None and pixel_values is not None:
            model = self.emrfuse
            slice_to_case, has_report, b = model.check_inputs(
                pixel_values, input_ids, attention_mask, slice_to_case, has_report
            )
            pooling_mask = torch.as_tensor(pooling_mask, device=pixel_values.device)
            if pooling_mask.shape != (pixel_values.shape[0], *pixel_values.shape[-2:]):
                raise ValueError(
                    f"pooling_mask must have shape {(pixel_values.shape[0], *pixel_values.shape[-2:])} (one mask per "
                    f"slice of pixel_values), got {tuple(pooling_mask.shape)}."
                )
            bag = self.grading_bag(pixel_values, pooling_mask, slice_to_case, b)
        if bag is None:
            base = self.emrfuse(
                pixel_values, input_ids, attention_mask, token_type_ids, slice_to_case, has_report, return_dict=True
            )
        else:
            text = model.encode_text(input_ids, attention_mask, token_type_ids, has_report, b, pixel_values.device)
            z, s2c = self.bag_slice_features(**bag)
            _, _, h, beta = model.encode_slices(None, gap=z)
            out = model.case_outputs(text, h, s2c, b, return_hidden=True)
            out["channel_attention"] = beta
            base = EmrFuseModelOutput(**out)
        logits = self.classifier(base.case_embeds)  # F20 (softmax in the loss / at prediction)
        loss = loss_cls = None
        if labels is not None:
            labels = torch.as_tensor(labels, device=logits.device).long()
            if labels.shape != (logits.shape[0],):
                raise ValueError(
                    f"labels must have shape ({logits.shape[0]},) (one grade per case), got {tuple(labels.shape)}."
                )
            loss_cls = F.cross_entropy(logits.float(), labels)
            aux = self.emrfuse.weighted_auxiliary_loss(base.loss_align, base.loss_ortho)
            loss = loss_cls if aux is None else loss_cls + aux
        output = EmrFuseImageClassifierOutput(
            loss=loss, logits=logits, loss_classification=loss_cls, **dict(base.items())
        )
        return output if return_dict else output.to_tuple()

    def forward_from_tower_features(
        self,
        gap,
        slice_to_case,
        num_cases: int,
        input_ids=None,
        attention_mask=None,
        text_hidden=None,
        has_report=None,
        tumour_features=None,
        tumour_slice_to_case=None,
    ) -> EmrFuseImageClassifierOutput:
        """Logits from the towers' precomputed features (:meth:`EmrFuseModel.tower_features`, and with
        ``grading_pooling="tumour"`` the :meth:`grading_bag` of each case), for fitting the grading head on frozen
        towers. No ``loss``: the caller weighs the cases' cross-entropy itself and adds
        ``emrfuse.weighted_auxiliary_loss(loss_align, loss_ortho)``."""
        gap, slice_to_case = self.bag_slice_features(gap, slice_to_case, tumour_features, tumour_slice_to_case)
        base = self.emrfuse.outputs_from_tower_features(
            gap, slice_to_case, num_cases, input_ids, attention_mask, text_hidden, has_report
        )
        return EmrFuseImageClassifierOutput(logits=self.classifier(base.case_embeds), **dict(base.items()))

    @torch.no_grad()
    def grade_case(
        self, pixel_values, input_ids=None, attention_mask=None, token_type_ids=None, has_report=None, pooling_mask=None
    ):
        """Grade one case from all its slices (N, C, H, W) and its report (1, L): returns probabilities (num_labels,).
        ``pooling_mask`` (N, H, W): its predicted tumour, for ``config.grading_pooling="tumour"``.

        Slices go through the image tower in chunks of ``config.slice_chunk_size``; the report is encoded once.
        The text-only model (``use_image=False``) takes ``pixel_values=None`` and the report alone.
        """
        if not self.config.use_image:
            out = self(None, input_ids, attention_mask, token_type_ids, None, has_report)
            return torch.softmax(out.logits.float(), dim=-1)[0]
        n = pixel_values.shape[0]
        s2c = torch.zeros(n, dtype=torch.long, device=pixel_values.device)
        out = self(pixel_values, input_ids, attention_mask, token_type_ids, s2c, has_report, pooling_mask=pooling_mask)
        return torch.softmax(out.logits.float(), dim=-1)[0]  # F20-F21: argmax of this is the grade


class EmrFuseForSegmentation(EmrFusePreTrainedModel):
    """Tumour sub-region segmentation (WT, TC, ET logits at input resolution), report-conditioned U-Net.

    ``forward(pixel_values, input_ids=None, attention_mask=None, token_type_ids=None, slice_to_case=None,
    has_report=None, labels=None (N, R, H, W) float, return_dict=True)`` -> :class:`EmrFuseSegmenterOutput`
    with ``logits`` (N, R, H, W). With ``use_text=False`` this is a plain ResNet U-Net (no text tower).
    Registered for ``AutoModelForSemanticSegmentation`` (the closest Auto class: per-pixel logits).

    A U-Net decoder over the tower's multi-scale features (``features_only``), coarse to fine, one stage per
    feature level (``config.decoder_channels``): upsample, concatenate the skip, two conv-BN-ReLU. With text,
    every stage is FiLM-conditioned (``x * (1 + gamma) + beta``) on the slice's fused representation (the
    fusion head applied to the slice's own feature and its case's report): the paper's route from the report to
    the decoder. With ``use_cross_attention`` (an extension; off in the presets of the paper's rows), the
    ``cross_attention_scales`` coarsest stages also add cross-attention from every image position to the report's
    token states (a learned "null" token is always attendable, so slices of cases without report attend to it). FiLM and
    cross-attention outputs start at zero: at init the model is the plain U-Net. The last stage works at input
    resolution; a 1x1 conv gives one logit per region (WT, TC, ET; sigmoid per region).
    Loss: ``dice_loss_weight * soft Dice + bce_loss_weight * BCE`` per region (batch-level soft Dice averaged over
    regions) plus the weighted auxiliary losses (computed at case level, as in grading).
    """

    def __init__(
        self, config: EmrFuseConfig, text_model: nn.Module | None = None, vision_model: nn.Module | None = None
    ):
        if not config.use_image:
            raise ValueError(
                "EmrFuseForSegmentation needs the image tower: config.use_image=False is the text-only "
                "grading model (use EmrFuseForImageClassification)."
            )
        super().__init__(config)
        self.emrfuse = EmrFuseModel(config, text_model=text_model, vision_model=vision_model)
        self.decoder = EmrFuseSegmentationDecoder(
            config, self.emrfuse.feature_channels, self.emrfuse.text_dim if config.use_text else None
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        slice_to_case: torch.LongTensor | None = None,
        has_report: torch.BoolTensor | None = None,
        labels: torch.FloatTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> EmrFuseSegmenterOutput | tuple:
        r"""See :meth:`EmrFuseModel.forward`; ``labels`` (`(N, R, H, W)`): region masks (0/1) per slice."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        model = self.emrfuse
        slice_to_case, has_report, b = model.check_inputs(
            pixel_values, input_ids, attention_mask, slice_to_case, has_report
        )
        text = model.encode_text(input_ids, attention_mask, token_type_ids, has_report, b, pixel_values.device)
        kvs = None
        if self.config.use_text and self.config.use_cross_attention:  # the report tokens, for the decoder to attend to
            tokens, mask = text.tokens, text.token_mask
            if tokens is None:  # no input_ids at all: only the null token
                tokens = torch.zeros(
                    b, 0, model.text_dim, device=pixel_values.device, dtype=model.no_report_embedding.dtype
                )
                mask = torch.zeros(b, 0, dtype=torch.bool, device=pixel_values.device)
            kvs = self.decoder.prepare_text(tokens, mask)
        size = pixel_values.shape[-2:]
        feats, betas, logits, slice_embeds = [], [], [], []
        for s, e in model.slice_chunks(pixel_values.shape[0]):
            maps, bottleneck, h, beta = model.encode_slices(pixel_values[s:e], keep_maps=True)
            feats.append(h)
            betas.append(beta)
            index = slice_to_case[s:e]
            cond = None
            if self.config.use_text:
                cond = model.fuse(text.features[index], h).embeds  # per-slice fused representation
                slice_embeds.append(cond)
            logits.append(self.decoder(maps, bottleneck, size, cond, kvs, index))
        logits = torch.cat(logits)
        out = model.case_outputs(text, torch.cat(feats), slice_to_case, b, return_hidden=False)
        out["channel_attention"] = torch.cat(betas) if betas[0] is not None else None
        loss = loss_dice = loss_bce = None
        if labels is not None:
            labels = torch.as_tensor(labels, device=logits.device)
            if labels.shape != logits.shape:
                raise ValueError(
                    f"labels must have shape {tuple(logits.shape)} (N, regions, H, W), got {tuple(labels.shape)}."
                )
            labels = labels.float()
            loss_dice = soft_dice_loss(logits, labels)
            loss_bce = F.binary_cross_entropy_with_logits(logits.float(), labels)
            loss = self.config.dice_loss_weight * loss_dice + self.config.bce_loss_weight * loss_bce
            aux = model.weighted_auxiliary_loss(out["loss_align"], out["loss_ortho"])
            if aux is not None:
                loss = loss + aux
        output = EmrFuseSegmenterOutput(
            loss=loss,
            logits=logits,
            loss_dice=loss_dice,
            loss_bce=loss_bce,
            slice_embeds=torch.cat(slice_embeds) if slice_embeds else None,
            **out,
        )
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def segment_case(self, pixel_values, input_ids=None, attention_mask=None, token_type_ids=None, has_report=None):
        """Region probabilities (N, R, H, W) for all slices of one case and its report (1, L).

        Slices are processed in chunks of ``config.slice_chunk_size``; the report is encoded once.
        """
        n = pixel_values.shape[0]
        s2c = torch.zeros(n, dtype=torch.long, device=pixel_values.device)
        out = self(pixel_values, input_ids, attention_mask, token_type_ids, s2c, has_report)
        return torch.sigmoid(out.logits.float())


EmrFuseModel.register_for_auto_class("AutoModel")
EmrFuseForImageClassification.register_for_auto_class("AutoModelForImageClassification")
EmrFuseForSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
