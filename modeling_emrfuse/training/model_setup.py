"""Building a run's model and processor: towers, config from the run's settings, warm starts, the optimiser."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file

from ..configuration_emrfuse import EmrFuseConfig
from ..modeling_emrfuse import EmrFuseForImageClassification, EmrFuseForSegmentation
from ..processing_emrfuse import EmrFuseImageProcessor, EmrFuseProcessor
from .settings import ModelSettings, OptimizerSettings
from .text_tower import load_tokenizer, placeholder_tokenizer

logger = logging.getLogger("emrfuse.train")


def build_processor(settings: ModelSettings, text_model: Optional[str]):
    """Image processor (brain crop, z-score with optional percentile clipping, context slices, sequence presence) + the text tower's
    tokenizer (image-only runs: a placeholder tokenizer built here, see :func:`placeholder_tokenizer`)."""
    image_processor = EmrFuseImageProcessor(
        context_slices=settings.context_slices,
        sequence_presence=settings.sequence_presence,
        clip_percentiles=settings.clip_percentiles,
    )
    tokenizer = placeholder_tokenizer() if text_model is None else load_tokenizer(text_model)
    return EmrFuseProcessor(image_processor=image_processor, tokenizer=tokenizer)


def model_class(task: str):
    return EmrFuseForSegmentation if task == "segmentation" else EmrFuseForImageClassification


def config_kwargs(settings: ModelSettings, switches: Dict[str, bool]) -> Dict[str, Any]:
    """Config arguments of a run: the switches plus the sizes the user (or the demo defaults) chose."""
    kwargs: Dict[str, Any] = dict(switches)
    kwargs["context_slices"] = settings.context_slices
    kwargs["sequence_presence"] = settings.sequence_presence
    kwargs["grading_slices"] = settings.grading_slices or None  # the one grading bag policy
    kwargs["grading_pooling"] = settings.grading_pooling
    for name in ("fusion_dim", "decoder_channels", "cross_attention_heads", "align_loss_weight", "ortho_loss_weight"):
        value = getattr(settings, name)
        if value is not None:
            kwargs[name] = list(value) if isinstance(value, (list, tuple)) else value
    return kwargs


@dataclass
class WarmStart:
    """The weights a training run starts from: the one warm-start path for both sources.

    - a saved EmrFuse folder (``--init_from``): the run takes the folder's config (with this run's switches),
      its tokenizer and its weights;
    - the previous stage's weights in memory (the demo's grading run starts from the segmentation run).

    Every weight the model shares with the source (towers, fusion head) is loaded; a task head the source
    lacks starts fresh. (``--init_vision_from`` is different: it copies image parts across models whose
    shapes may differ, see :func:`warm_start_image_parts`.)
    """

    source: str  # what the weights are, for the log
    folder: Optional[Path] = None
    state: Optional[Dict[str, torch.Tensor]] = None

    @classmethod
    def from_folder(cls, folder: str | Path) -> "WarmStart":
        return cls(source=str(folder), folder=Path(folder))

    def weights(self) -> Dict[str, torch.Tensor]:
        return self.state if self.state is not None else read_saved_weights(self.folder, "--init_from")

    def apply(self, model, desc: str) -> None:
        try:
            result = model.load_state_dict(self.weights(), strict=False)
        except RuntimeError as exc:  # shapes that differ: another model size
            raise SystemExit(
                f"train.py: cannot start from {self.source}: its weights do not fit this model ({exc})."
            ) from None
        logger.info(f"{desc}: started from {self.source} ({len(result.missing_keys)} task-head tensors new)")


def read_saved_weights(folder: str | Path, flag: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a saved model folder's ``*.safetensors`` files (shards included)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{flag} {folder}: no *.safetensors weights in this folder.")
    saved: Dict[str, torch.Tensor] = {}
    for f in files:
        saved.update(load_file(str(f)))
    return saved


def build_model(
    settings: ModelSettings,
    text_model: Optional[str],
    task: str,
    switches: Dict[str, bool],
    config_from: Optional[Path] = None,
):
    """The task model: from the two pretrained towers, or (``config_from``) with a saved EmrFuse folder's config
    and fresh weights, which :meth:`WarmStart.apply` then fills."""
    cls = model_class(task)
    if config_from is not None:
        config = EmrFuseConfig.from_pretrained(config_from)
        for key, value in switches.items():
            setattr(config, key, value)
        config.grading_slices = settings.grading_slices or None  # this run's grading bag policy
        config.grading_pooling = settings.grading_pooling
        return cls(config)
    model = cls.from_text_vision_pretrained(
        text_model,
        settings.vision_model,
        vision_pretrained=settings.vision_pretrained,
        **config_kwargs(settings, switches),
    )
    if settings.init_vision_from:
        copied, widened = warm_start_image_parts(model, settings.init_vision_from)
        logger.info(
            f"warm start from {settings.init_vision_from}: {copied} tensors copied ({widened} widened to more input channels)"
        )
    return model


def warm_start_image_parts(model, folder: str | Path) -> Tuple[int, int]:
    """Copy the weights of a saved EmrFuse model into ``model`` where names and shapes match.

    The text tower is never copied (its vocabulary and size may differ). A convolution whose input
    channels grew (e.g. sequence-presence channels added) gets the saved weights on the first
    channels and zeros on the new ones, so it starts as the saved model. Returns ``(copied,
    widened)``; raises ``ValueError`` when nothing matches (not an EmrFuse folder of this kind).
    """
    saved = read_saved_weights(folder, "--init_vision_from")
    own = model.state_dict()
    copied = widened = 0
    with torch.no_grad():
        for name, tensor in own.items():
            if ".text_model." in f".{name}" or name not in saved:
                continue
            src = saved[name]
            if src.shape == tensor.shape:
                tensor.copy_(src)
                copied += 1
            elif (
                src.dim() == 4
                and tensor.dim() == 4
                and src.shape[0] == tensor.shape[0]
                and src.shape[2:] == tensor.shape[2:]
                and src.shape[1] < tensor.shape[1]
            ):
                tensor.zero_()
                tensor[:, : src.shape[1]].copy_(src)
                copied += 1
                widened += 1
    if not copied:
        raise ValueError(f"--init_vision_from {folder}: no weight matches this model's names and shapes.")
    return copied, widened


def optimizer_groups(model, learning_rate: float, weight_decay: float, text_learning_rate: Optional[float] = None):
    """AdamW parameter groups: no weight decay on biases and norms; optional own rate for the text tower."""
    groups: Dict[Tuple[bool, bool], List[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias")
        is_text = text_learning_rate is not None and ".text_model." in f".{name}"
        groups.setdefault((no_decay, is_text), []).append(param)
    out = []
    for (no_decay, is_text), params in groups.items():
        out.append(
            {
                "params": params,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr": text_learning_rate if is_text else learning_rate,
            }
        )
    return out


def make_optimizer(model, settings: OptimizerSettings, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW over :func:`optimizer_groups` (fused kernel where available: one call for all parameters, markedly
    faster on CPU)."""
    groups = optimizer_groups(model, learning_rate, settings.weight_decay, settings.text_learning_rate)
    try:
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups)
