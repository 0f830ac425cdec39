"""Configuration of the EmrFuse model (brain MRI slices + radiology report).

:class:`EmrFuseConfig` nests its two towers the way ``CLIPConfig`` does (``text_config``: a
BERT-family sub-config; ``vision_config``: a dict for ``timm.create_model``) and holds the paper's
four fusion parts as switches; :data:`ABLATION_PRESETS` names the rows of the paper's Table 1 and
Table 3 plus ``"text_only"``, and :meth:`EmrFuseConfig.from_preset` builds a config from one of them.
The class docstring says what each argument does.

This file travels to the Hub with the model code: it imports only transformers, timm and the
package's own files (relatively).
"""

from __future__ import annotations

import math
from typing import Any

import timm
from transformers import BertConfig, PretrainedConfig
from transformers.utils import logging

from .brats_labels import GRADES, REGIONS, SEQUENCES

logger = logging.get_logger(__name__)

SWITCHES: tuple[str, ...] = (
    "use_text",
    "use_alignment",
    "use_self_attention",
    "use_residual",
    "use_dynamic_weighting",
)
"""The five ablation switches, in the order in which the paper's Table 1 adds them."""

FUSION_SWITCHES: tuple[str, ...] = SWITCHES[1:]
"""The four fusion parts: they act on the report and the image together, so a model without one of them has none."""


def _preset(text: bool, align: bool, attn: bool, residual: bool, weighting: bool) -> dict[str, bool]:
    return dict(zip(SWITCHES, (text, align, attn, residual, weighting)))


MODALITY_SWITCH = "use_image"
"""A switch besides :data:`SWITCHES`: ``False`` builds no image tower (the text-only preset). Presets that
do not name it keep the image tower (``use_image=True``)."""

CROSS_ATTENTION_SWITCH = "use_cross_attention"
"""A switch besides :data:`SWITCHES`: cross-attention from the segmentation decoder's image positions to the report
tokens, an extension of this implementation. The paper's route from the report to the decoder is the fused
representation alone (FiLM conditioning), so every preset that reproduces a row of the paper's tables switches it
off; ``"full_cross_attention"`` is the complete model with it. The config's default is on: a ``config.json``
without the key loads with the decoder cross-attention that its weights hold."""


_PAPER = {CROSS_ATTENTION_SWITCH: False}  # the paper's rows: the report reaches the decoder through FiLM only

ABLATION_PRESETS: dict[str, dict[str, bool]] = {
    # Table 1 (BraTS 2018): components added one by one
    "image_only": {**_preset(False, False, False, False, False), **_PAPER},
    "concat": {**_preset(True, False, False, False, False), **_PAPER},
    "plus_alignment": {**_preset(True, True, False, False, False), **_PAPER},
    "plus_self_attention": {**_preset(True, True, True, False, False), **_PAPER},
    "plus_residual": {**_preset(True, True, True, True, False), **_PAPER},
    "full": {**_preset(True, True, True, True, True), **_PAPER},
    # Table 3 (ablation): one component removed from the full model
    "no_alignment": {**_preset(True, False, True, True, True), **_PAPER},
    "no_self_attention": {**_preset(True, True, False, True, True), **_PAPER},
    "no_residual": {**_preset(True, True, True, False, True), **_PAPER},
    "no_dynamic_weighting": {**_preset(True, True, True, True, False), **_PAPER},
    # this implementation's extension: the complete model + decoder cross-attention to the report tokens
    "full_cross_attention": {**_preset(True, True, True, True, True), CROSS_ATTENTION_SWITCH: True},
    # "Single-modality Text": the text tower + F19-F21, no image tower (grading from the report alone)
    "text_only": {**_preset(True, False, False, False, False), **_PAPER, MODALITY_SWITCH: False},
}
"""Preset name -> the five switches (``use_text``, ``use_alignment``, ``use_self_attention``,
``use_residual``, ``use_dynamic_weighting``) and ``use_cross_attention``; ``"text_only"`` also sets
``use_image=False``."""

CASE_POOLING_MODES: tuple[str, ...] = ("attention", "mean")
GRADING_POOLING_MODES: tuple[str, ...] = ("slices", "tumour")


def _is_timm_architecture(name: str) -> bool:
    """True if ``name`` is a timm model (with or without a pretrained tag such as ``resnet50.a1_in1k``)."""
    if not isinstance(name, str) or not name:
        return False
    if timm.is_model(name):
        return True
    base = name.split(".", 1)[0]
    return timm.is_model(base)


class EmrFuseConfig(PretrainedConfig):
    r"""Configuration of :class:`EmrFuseModel` and its task heads.

    Args:
        text_config (`dict` or `BertConfig`, *optional*):
            The text tower (any BERT-family config). Default: a BERT-base sized ``BertConfig()``.
            Not used (and no tower is built) when ``use_text=False``.
        vision_config (`dict`, *optional*):
            ``{"architecture": timm model name (default "resnet50"), "in_chans": input channels, ...}``.
            ``in_chans`` defaults to ``4 * (2 * context_slices + 1)`` and must be a multiple of 4 (the four
            MRI sequences per slice). Other keys (e.g. ``drop_path_rate``, ``output_stride``) go to
            ``timm.create_model``; ``pretrained``/``features_only`` are not allowed here (see
            :meth:`EmrFuseModel.from_text_vision_pretrained`).
        fusion_dim (`int`, defaults to 256): size of the shared text/image space and of the fused
            representation (``case_embeds``).
        fusion_dropout (`float`, defaults to 0.1): dropout on the fused representation, in ``[0, 1)``.
        cross_attention_heads (`int`, defaults to 8): heads of the decoder's image-to-report cross-attention.
        decoder_channels (`list[int]`, defaults to ``(256, 128, 64, 32, 16)``): channels of the
            segmentation decoder stages, coarse to fine; one per feature level of the image tower.
        cross_attention_scales (`int`, defaults to 2): number of coarsest decoder stages with
            cross-attention from image positions to report tokens when ``use_cross_attention`` (0 disables it).
        use_cross_attention (`bool`, *optional*): the decoder's cross-attention to the report tokens, an
            extension of this implementation (:data:`CROSS_ATTENTION_SWITCH`); the presets of the paper's rows
            switch it off. Unset: on with image and report.
        use_text (`bool`, defaults to True), use_alignment, use_self_attention, use_residual, use_dynamic_weighting
            (`bool`, *optional*): the ablation switches (see :data:`ABLATION_PRESETS`). A fusion switch left unset
            is on with image and report and off without one of them; one set on for a model without the report or
            the image is switched off with a warning (it has no part to act on). ``use_text=False`` is the
            image-only ResNet baseline of the paper's Table 1.
        use_image (`bool`, defaults to True): ``False`` is the "Single-modality Text" model (preset
            ``"text_only"``): no image tower is built, the model grades from the report alone (its text tower
            feature H_T goes straight into F19-F21; ``pixel_values`` is not an input) and cannot segment; it needs ``use_text=True`` and switches the four fusion
            parts off. ``vision_config`` is then kept but unused.
        grading_slices (`int` or `None`, defaults to 32): the grading bag policy, one for training, evaluation
            and inference: a case is graded from at most this many of its (brain-cropped) slices, evenly spaced
            (:func:`~processing_emrfuse.grading_slice_indices`); training draws each case's bag of slices from the
            same positions. ``None``: every slice.
        align_loss_weight (`float`, defaults to 0.1): weight of L_align (F16); 0 disables the term.
        ortho_loss_weight (`float`, defaults to 0.01): weight of L_ortho (F13); 0 disables the term.
        dice_loss_weight, bce_loss_weight (`float`, default 1.0): segmentation loss weights.
        case_pooling (`str`, defaults to "attention"): how slice features are pooled into one case
            feature for grading: ``"attention"`` (attention-MIL) or ``"mean"``.
        case_pooling_dim (`int`, defaults to 128): hidden size of the attention-MIL scorer.
        grading_pooling (`str`, defaults to "slices"): what the grading model reads from each slice.
            ``"slices"``: the image tower's pooled last feature map (GAP) of every grading slice. ``"tumour"``: the
            tower's feature maps of the strides ``grading_pooling_strides`` averaged over the predicted whole
            tumour only (``pooling_mask``, an input of the forward: the segmentation model's output of the same
            case in the pipeline), on the slices that contain tumour, concatenated and projected linearly to the
            slice-feature size. A case whose mask is empty or absent is pooled as with ``"slices"``.
        grading_pooling_strides (`list[int]`, defaults to ``[8, 16]``): the feature-map strides (timm
            ``feature_info.reduction()``) that ``grading_pooling="tumour"`` averages over the tumour.
        slice_chunk_size (`int`, defaults to 32): slices per image-tower call when running without
            gradients (inference on a whole case).
        num_labels / id2label / label2id: grading labels; default ``{0: "HGG", 1: "LGG"}``.
        regions (`list[str]`, defaults to ``("WT", "TC", "ET")``): segmentation output channels.
        context_slices (`int`, defaults to 0): neighbouring slices on each side stacked as channels.
        sequence_presence (`bool`, defaults to False): the input carries four extra sequence-presence
            channels (1 = sequence present, 0 = missing and zero-filled), as the image processor with
            ``sequence_presence=True`` writes them; a model trained with sequence dropout then serves
            cases with any non-empty subset of the four sequences. ``in_chans`` grows by 4.
        sequences (`list[str]`): MRI sequence order of the input channels (informative).
        initializer_range (`float`, defaults to 0.02): std of the fusion head's linear layers.
        grading_model (`str`, *optional*): set on a segmentation model's config when its folder (or Hub
            repository) also carries the grading model: the sub-folder that holds it (``"grading"``). The
            pipeline finds the companion only here (or in an explicit argument), never outside the folder
            or repository.
        segmentation_model (`str`, *optional*): the same for a grading model's segmentation companion.
    """

    model_type = "emrfuse"
    sub_configs_defaults = {"text_config": BertConfig}

    text_config: dict | BertConfig | None = None
    vision_config: dict | None = None
    fusion_dim: int = 256
    fusion_dropout: float = 0.1
    cross_attention_heads: int = 8
    decoder_channels: list[int] | tuple[int, ...] = (256, 128, 64, 32, 16)
    cross_attention_scales: int = 2
    use_text: bool = True
    use_alignment: bool | None = None  # None: on with image and report, off without one of them
    use_self_attention: bool | None = None
    use_residual: bool | None = None
    use_dynamic_weighting: bool | None = None
    use_image: bool = True
    use_cross_attention: bool | None = None
    align_loss_weight: float = 0.1
    ortho_loss_weight: float = 0.01
    dice_loss_weight: float = 1.0
    bce_loss_weight: float = 1.0
    case_pooling: str = "attention"
    case_pooling_dim: int = 128
    slice_chunk_size: int = 32
    grading_slices: int | None = 32
    grading_pooling: str = "slices"
    grading_pooling_strides: list[int] | tuple[int, ...] = (8, 16)
    regions: list[str] | tuple[str, ...] = REGIONS
    context_slices: int = 0
    sequence_presence: bool = False
    sequences: list[str] | tuple[str, ...] = SEQUENCES
    initializer_range: float = 0.02
    grading_model: str | None = None
    segmentation_model: str | None = None

    def __post_init__(self, **kwargs: Any):
        # default grading labels: HGG / LGG (unless a different number of labels is asked for)
        if self.id2label is None and kwargs.get("num_labels") in (None, len(GRADES)):
            kwargs.pop("num_labels", None)
            self.id2label = dict(enumerate(GRADES))
            self.label2id = {name: i for i, name in enumerate(GRADES)}
        if isinstance(self.text_config, BertConfig) or self.text_config is None or isinstance(self.text_config, dict):
            pass
        elif isinstance(self.text_config, PretrainedConfig):
            # another BERT-family config object (e.g. loaded with AutoConfig): keep its values
            self.text_config = BertConfig(**self.text_config.to_dict())
        else:
            raise ValueError(f"text_config must be a dict or a BertConfig, got {type(self.text_config).__name__}.")
        super().__post_init__(**kwargs)
        self._normalise_and_validate()

    # ------------------------------------------------------------------ validation
    def _normalise_and_validate(self) -> None:
        """Fill the switches a modality implies, then check every field, one concern at a time."""
        self._normalise_switches()
        self._normalise_vision_config()
        self._validate_sizes()
        self._validate_decoder()
        self._validate_outputs()
        self._validate_text_config()

    def _normalise_switches(self) -> None:
        """Each fusion switch and ``use_cross_attention`` left unset (None) follows the modalities: on with image and
        report, off without one of them. A switch set on for a model without the report (``use_text=False``) or without
        the image (``use_image=False``) has no part to act on: it is switched off with a warning."""
        for name in (MODALITY_SWITCH, "use_text"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}.")
        if not self.use_image and not self.use_text:
            raise ValueError("use_image=False and use_text=False: the model needs at least one modality.")
        both = self.use_text and self.use_image
        reason = "use_image=False (text-only model)" if not self.use_image else "use_text=False (image-only baseline)"
        conflicting = []
        for name in FUSION_SWITCHES + (CROSS_ATTENTION_SWITCH,):
            value = getattr(self, name)
            if value is None:
                value = both
            elif not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}.")
            elif value and not both:
                conflicting.append(name)
                value = False
            setattr(self, name, value)
        if conflicting:
            logger.warning(f"{reason}: {', '.join(f'{n}=True' for n in conflicting)} switched off (no part to act on).")

    def _normalise_vision_config(self) -> None:
        """The timm tower's arguments: architecture (default resnet50) and input channels from the slices' layout."""
        if not isinstance(self.context_slices, int) or isinstance(self.context_slices, bool) or self.context_slices < 0:
            raise ValueError(f"context_slices must be an integer >= 0, got {self.context_slices!r}.")
        if not isinstance(self.sequence_presence, bool):
            raise ValueError(f"sequence_presence must be a bool, got {self.sequence_presence!r}.")
        expected_chans = len(SEQUENCES) * (2 * self.context_slices + 1) + (
            len(SEQUENCES) if self.sequence_presence else 0
        )
        if not isinstance(self.vision_config, (dict, type(None))):
            raise ValueError(f"vision_config must be a dict, got {type(self.vision_config).__name__}.")
        vision = dict(self.vision_config) if self.vision_config is not None else {}
        vision.setdefault("architecture", "resnet50")
        vision.setdefault("in_chans", expected_chans)
        arch = vision["architecture"]
        if not _is_timm_architecture(arch):
            raise ValueError(
                f"vision_config['architecture']: {arch!r} is not a timm model name (see timm.list_models())."
            )
        in_chans = vision["in_chans"]
        if not isinstance(in_chans, int) or isinstance(in_chans, bool) or in_chans < 4 or in_chans % 4:
            raise ValueError(
                f"vision_config['in_chans'] must be a positive multiple of 4 (4 MRI sequences per slice), got {in_chans!r}."
            )
        if in_chans != expected_chans:
            raise ValueError(
                f"vision_config['in_chans']={in_chans} does not match context_slices={self.context_slices} and "
                f"sequence_presence={self.sequence_presence} (expected 4 * (2 * {self.context_slices} + 1)"
                f"{' + 4' if self.sequence_presence else ''} = {expected_chans})."
            )
        for reserved in ("pretrained", "features_only", "num_classes"):
            if reserved in vision:
                raise ValueError(f"vision_config[{reserved!r}] is set by the model and cannot be given in the config.")
        self.vision_config = vision

    def _positive_int(self, name: str, minimum: int = 1) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")

    def _finite_number(self, name: str) -> float:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}.")
        return float(value)

    def _validate_sizes(self) -> None:
        """Layer sizes, dropout, loss weights, initialisation."""
        for name in ("fusion_dim", "cross_attention_heads", "case_pooling_dim", "slice_chunk_size"):
            self._positive_int(name)
        self._positive_int("cross_attention_scales", minimum=0)
        if not 0.0 <= self._finite_number("fusion_dropout") < 1.0:
            raise ValueError(f"fusion_dropout must be in [0, 1), got {self.fusion_dropout!r}.")
        for name in ("align_loss_weight", "ortho_loss_weight", "dice_loss_weight", "bce_loss_weight"):
            if self._finite_number(name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")
        if self._finite_number("initializer_range") <= 0:
            raise ValueError(f"initializer_range must be > 0, got {self.initializer_range!r}.")

    def _validate_decoder(self) -> None:
        """Decoder stages, and the heads of its cross-attention stages."""
        channels = self.decoder_channels
        if (
            not isinstance(channels, (list, tuple))
            or len(channels) == 0
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels)
        ):
            raise ValueError(f"decoder_channels must be a non-empty list of positive integers, got {channels!r}.")
        self.decoder_channels = list(channels)
        if self.cross_attention_scales > len(self.decoder_channels):
            raise ValueError(
                f"cross_attention_scales={self.cross_attention_scales} exceeds the number of decoder stages "
                f"({len(self.decoder_channels)})."
            )
        if self.use_text and self.use_cross_attention:
            for stage in range(self.cross_attention_scales):
                if self.decoder_channels[stage] % self.cross_attention_heads:
                    raise ValueError(
                        f"decoder_channels[{stage}]={self.decoder_channels[stage]} must be divisible by "
                        f"cross_attention_heads={self.cross_attention_heads} (cross-attention stage)."
                    )

    def _validate_outputs(self) -> None:
        """Grading (bag policy, pooling, labels), segmentation regions, input sequence order."""
        if self.grading_slices is not None and (
            not isinstance(self.grading_slices, int) or isinstance(self.grading_slices, bool) or self.grading_slices < 1
        ):
            raise ValueError(
                f"grading_slices must be None (every slice) or an integer >= 1, got {self.grading_slices!r}."
            )
        if self.case_pooling not in CASE_POOLING_MODES:
            raise ValueError(f"case_pooling must be one of {CASE_POOLING_MODES}, got {self.case_pooling!r}.")
        if self.grading_pooling not in GRADING_POOLING_MODES:
            raise ValueError(f"grading_pooling must be one of {GRADING_POOLING_MODES}, got {self.grading_pooling!r}.")
        strides = self.grading_pooling_strides
        if (
            not isinstance(strides, (list, tuple))
            or not strides
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in strides)
        ):
            raise ValueError(f"grading_pooling_strides must be a non-empty list of positive integers, got {strides!r}.")
        self.grading_pooling_strides = list(strides)
        regions = list(self.regions)
        if not regions or len(set(regions)) != len(regions) or not all(r in REGIONS for r in regions):
            raise ValueError(f"regions must be distinct names out of {REGIONS}, got {self.regions!r}.")
        self.regions = regions
        sequences = list(self.sequences)
        if sorted(sequences) != sorted(SEQUENCES):
            raise ValueError(f"sequences must be an ordering of {SEQUENCES}, got {self.sequences!r}.")
        self.sequences = sequences
        if self.num_labels is None or self.num_labels < 2:
            raise ValueError(f"num_labels (id2label) must give at least 2 grading labels, got {self.id2label!r}.")

    def _validate_text_config(self) -> None:
        if not self.use_text:
            return
        text = self.text_config
        if not isinstance(text, BertConfig):
            raise ValueError(f"text_config must be a BertConfig, got {type(text).__name__}.")
        if text.hidden_size % text.num_attention_heads:
            raise ValueError(
                f"text_config.hidden_size={text.hidden_size} is not divisible by "
                f"text_config.num_attention_heads={text.num_attention_heads}."
            )

    # ------------------------------------------------------------------ helpers
    @property
    def in_channels(self) -> int:
        """Input channels of a slice: ``4 * (2 * context_slices + 1)`` (+ 4 with ``sequence_presence``)."""
        return int(self.vision_config["in_chans"])

    @property
    def active_preset(self) -> str | None:
        """Name of the :data:`ABLATION_PRESETS` entry the switches match (``None`` if no preset matches)."""
        current = {name: getattr(self, name) for name in SWITCHES + (MODALITY_SWITCH, CROSS_ATTENTION_SWITCH)}
        for name, switches in ABLATION_PRESETS.items():
            if {MODALITY_SWITCH: True, **switches} == current:
                return name
        return None

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> "EmrFuseConfig":
        """Build a config with the switches of :data:`ABLATION_PRESETS` ``[name]``.

        ``kwargs`` are the other config arguments; passing a switch that contradicts the preset raises
        ``ValueError``.
        """
        return cls(**apply_preset(name, kwargs))


def apply_preset(name: str, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return ``kwargs`` with the five switches of preset ``name`` set (ValueError on a conflict)."""
    if name not in ABLATION_PRESETS:
        raise ValueError(f"Unknown ablation preset {name!r}: use one of {sorted(ABLATION_PRESETS)}.")
    out = dict(kwargs or {})
    for switch, value in {MODALITY_SWITCH: True, **ABLATION_PRESETS[name]}.items():
        if switch in out and out[switch] != value:
            raise ValueError(f"{switch}={out[switch]!r} contradicts preset {name!r} ({switch}={value}).")
        out[switch] = value
    return out


EmrFuseConfig.register_for_auto_class()  # "AutoConfig": save_pretrained writes auto_map and copies this file

__all__ = [
    "ABLATION_PRESETS",
    "CASE_POOLING_MODES",
    "EmrFuseConfig",
    "MODALITY_SWITCH",
    "CROSS_ATTENTION_SWITCH",
    "SWITCHES",
    "apply_preset",
]
