"""Inference rewrites of an EmrFuse task model: BatchNorm folding, bf16 weights, channels-last.

:class:`~pipeline_emrfuse.EmrFusePipeline` rewrites its models once, when it is built
(``optimize=True``, the default), with :func:`optimize_for_inference`; :func:`resolve_precision`
turns ``precision="auto"`` into what the device runs natively, and :func:`inference_autocast` is the
bf16 autocast used when the weights were left in fp32 (``optimize=False``).

This file travels to the Hub with the pipeline: it imports only torch (and the standard library).
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Sequence, Tuple

import torch

__all__ = [
    "PRECISIONS",
    "cpu_supports_bf16",
    "resolve_precision",
    "inference_autocast",
    "fold_batchnorm",
    "undo_folds",
    "probe_forward",
    "optimize_for_inference",
    "is_inference_optimized",
]

PRECISIONS = ("auto", "bf16", "fp32")


def cpu_supports_bf16() -> bool:
    """The CPU has native bf16 instructions (AVX512-BF16 or AMX)."""
    checker = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool((checker and checker()) or (amx and amx()))
    except Exception:  # pragma: no cover - private helpers may change
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"bf16"`` or ``"fp32"``: ``"auto"`` is bf16 on CUDA with bf16 and on a CPU with native bf16
    instructions, fp32 elsewhere. ``ValueError`` for a name outside :data:`PRECISIONS`."""
    precision = str(precision).lower()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}.")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"


def inference_autocast(precision: str, weights_dtype: torch.dtype, device: torch.device):
    """bf16 autocast when bf16 is asked for but the weights are not bf16 (CPU / CUDA); otherwise no-op."""
    if precision == "bf16" and weights_dtype != torch.bfloat16 and device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fold_batchnorm(model: torch.nn.Module) -> Tuple[int, List[tuple]]:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` into that convolution.

    Pairs are found among the children of each module in registration order (timm ResNets and
    ``Sequential`` conv-BN-ReLU blocks register the layers in the order they run). The folded model
    is checked against the original by :func:`optimize_for_inference`, which undoes every fold
    (:func:`undo_folds`) if the outputs differ. Returns the number of folded pairs and what undoes
    them. For inference only: the folded model cannot be saved as the original architecture.
    """
    undo = []
    with torch.no_grad():
        for parent in list(model.modules()):
            names = list(parent._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = parent._modules[a], parent._modules[b]
                if not (isinstance(conv, torch.nn.Conv2d) and type(bn) is torch.nn.BatchNorm2d) or bn.training:
                    continue
                if not bn.track_running_stats or bn.running_var is None or conv.out_channels != bn.num_features:
                    continue
                scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(
                    bn.running_var + bn.eps
                )
                shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
                old_weight, old_bias = conv.weight, conv.bias
                bias = old_bias if old_bias is not None else torch.zeros_like(bn.running_mean)
                conv.weight = torch.nn.Parameter(old_weight * scale.reshape(-1, 1, 1, 1), requires_grad=False)
                conv.bias = torch.nn.Parameter((bias - bn.running_mean) * scale + shift, requires_grad=False)
                parent._modules[b] = torch.nn.Identity()
                undo.append((parent, conv, b, bn, old_weight, old_bias))
    return len(undo), undo


def undo_folds(undo: Sequence[tuple]) -> None:
    """Put back the BatchNorm layers and convolution weights that :func:`fold_batchnorm` replaced."""
    for parent, conv, name, bn, weight, bias in undo:
        conv.weight, conv.bias = weight, bias
        parent._modules[name] = bn


def probe_forward(model: torch.nn.Module) -> torch.Tensor:
    """Region / grade logits of a tiny random case (no report), to check an inference rewrite."""
    config = model.config
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    x = torch.randn(2, config.in_channels, 64, 64, generator=gen).to(device)
    with torch.inference_mode():
        out = model(
            pixel_values=x,
            slice_to_case=torch.zeros(2, dtype=torch.long, device=device),
            has_report=torch.zeros(1, dtype=torch.bool, device=device),
        )
    return out.logits.float()


def optimize_for_inference(
    model: torch.nn.Module, precision: str = "bf16", channels_last: bool = True
) -> Dict[str, Any]:
    """Rewrite an EmrFuse task model, in place, for fast inference; returns what was done.

    * BatchNorm folded into the preceding convolutions (checked on a probe input, undone if the
      outputs change by more than 1e-3 relative);
    * ``precision="bf16"``: every parameter and buffer cast to bfloat16 (plain bf16 runs faster than
      fp32 weights under autocast on CPU, which re-casts the weights at every call);
    * channels-last memory format for the convolutions.
    """
    model.eval()
    before = probe_forward(model)
    folded, undo = fold_batchnorm(model)
    if folded:
        after = probe_forward(model)
        if (after - before).abs().max() > 1e-3 * max(1.0, float(before.abs().max())):
            undo_folds(undo)
            folded = 0
    if precision == "bf16":
        model.to(torch.bfloat16)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model._emrfuse_inference_optimized = True  # see is_inference_optimized
    return {
        "batchnorm_folded": folded,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "channels_last": channels_last,
    }


def is_inference_optimized(model: torch.nn.Module) -> bool:
    """``model`` was rewritten by :func:`optimize_for_inference` (such a model cannot be saved as a checkpoint)."""
    return bool(getattr(model, "_emrfuse_inference_optimized", False))
