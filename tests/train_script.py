"""``train.py``, the documented entry point, loaded from its file for tests of its arguments and ``main()``
(everything else it runs is imported from ``modeling_emrfuse.training``)."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"


@functools.lru_cache(maxsize=None)
def load_train_script() -> ModuleType:
    """The module ``train.py`` (executed once per test session; its ``__name__`` is not ``__main__``)."""
    spec = importlib.util.spec_from_file_location("emrfuse_train_script", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
