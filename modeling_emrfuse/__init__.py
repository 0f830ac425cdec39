"""EmrFuse: brain MRI + radiology report models on the Hugging Face stack.

The public classes are imported lazily, so that light entry points (the ``emrfuse`` command
line, the label conventions) do not pay for importing torch and transformers.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "EmrFuseConfig": "configuration_emrfuse",
    "ABLATION_PRESETS": "configuration_emrfuse",
    "TABLE1_ROWS": "evaluation.ablation_report",
    "TABLE3_ROWS": "evaluation.ablation_report",
    "EmrFusePreTrainedModel": "modeling_emrfuse",
    "EmrFuseModel": "modeling_emrfuse",
    "EmrFuseForImageClassification": "modeling_emrfuse",
    "EmrFuseForSegmentation": "modeling_emrfuse",
    "EmrFuseImageProcessor": "processing_emrfuse",
    "EmrFuseProcessor": "processing_emrfuse",
    "CropInfo": "processing_emrfuse",
    "PreparedVolume": "processing_emrfuse",
    "SEQUENCES": "brats_labels",
    "REGIONS": "brats_labels",
    "GRADES": "brats_labels",
    "LABEL_CONVENTIONS": "brats_labels",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
