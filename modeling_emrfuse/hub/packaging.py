"""Packaging a saved model folder as one unit for ``transformers.pipeline``, ``emrfuse predict``, the Space
and the Hub (next to :mod:`model_card`, which writes the folder's README).

A model folder holds ONE task model at its root (``save_pretrained`` output: config with ``auto_map``,
model code, weights, processor) and, when there is one, the grading model in its ``grading/`` sub-folder,
so that one folder or Hub repository carries both heads; :func:`add_pipeline_to_folder` makes it
runnable with ``transformers.pipeline(model=folder, trust_remote_code=True)``.

This file stays local (it does not travel to the Hub).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

from transformers.dynamic_module_utils import custom_object_save

from ..pipeline_emrfuse import GRADING_SUBFOLDER, EmrFusePipeline, custom_pipelines_entry
from ..runtime.strict_json import write_json

__all__ = ["add_pipeline_to_folder"]


def _read_config_json(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def add_pipeline_to_folder(
    folder: Union[str, os.PathLike], grading_model: Optional[Union[str, os.PathLike]] = None
) -> Path:
    """Make a saved model folder runnable with ``transformers.pipeline(model=folder, trust_remote_code=True)``.

    Adds the ``glioma-analysis`` entry to ``config.custom_pipelines`` and copies the pipeline's code files
    (``pipeline_emrfuse.py`` and the files it imports relatively, e.g. ``brats_io.py`` and
    ``inference_optim.py``) next to the model code. ``grading_model``: a folder holding the grading model (``save_pretrained`` output),
    usually the folder's own ``grading/`` (``train.py`` saves it there); a folder elsewhere is copied into
    ``folder/grading``. Either way the root config's ``grading_model`` names ``grading``: the one place the
    pipeline looks for it (:func:`~modeling_emrfuse.pipeline_emrfuse.resolve_companion`). Returns the folder.
    """
    folder = Path(folder)
    config = _read_config_json(folder)
    if config is None:
        raise ValueError(f"{folder}: no readable config.json (not a saved model folder).")
    if grading_model is not None:
        source = Path(grading_model)
        if _read_config_json(source) is None:
            raise ValueError(f"{source}: no readable config.json (not a saved model folder).")
        target = folder / GRADING_SUBFOLDER
        if source.resolve() != target.resolve():
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(source, target)
        config["grading_model"] = GRADING_SUBFOLDER
    config["custom_pipelines"] = custom_pipelines_entry()
    write_json(folder / "config.json", config, indent=2, sort_keys=True)
    custom_object_save(EmrFusePipeline, folder)  # pipeline_emrfuse.py and the files it imports relatively
    return folder
