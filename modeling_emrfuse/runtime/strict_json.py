"""Strict JSON for every JSON file EmrFuse writes (prediction records, summaries, reports, caches).

``json.dumps`` writes a float NaN or infinity as the bare words ``NaN`` / ``Infinity``, which are not
JSON: strict parsers (JavaScript, ``jq``, most other languages) reject the file. In EmrFuse NaN means
"not defined" (``roc_auc`` with one class, the standard deviation of one case), and JSON spells that
``null`` (:func:`json_ready`). Values that must never be NaN (model outputs) are checked where they are
computed; this module only makes sure that what is written is valid JSON. It imports only the standard
library (numpy is duck-typed), so it travels to the Hub with the pipeline code.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Optional, Union

__all__ = ["json_ready", "dumps", "write_json"]


def json_ready(obj: Any) -> Any:
    """``obj`` with non-finite floats as ``None`` and numpy / path / tuple / set values as plain JSON types.

    A non-finite float (Python, numpy or a 0-d array) becomes ``None``; numpy scalars and arrays become plain
    numbers / lists, paths strings, tuples and sets lists. :func:`dumps` then encodes with
    ``allow_nan=False``, so nothing non-finite can slip through.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else str(k)): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [json_ready(v) for v in sorted(obj, key=str)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    tolist = getattr(obj, "tolist", None)  # numpy scalars / arrays (and torch tensors)
    if callable(tolist) and type(obj).__module__.split(".")[0] in ("numpy", "torch"):
        return json_ready(tolist())
    return obj  # left to ``default`` (or a TypeError from json)


def dumps(
    obj: Any, *, indent: Optional[int] = None, sort_keys: bool = False, default: Optional[Callable[[Any], Any]] = None
) -> str:
    """Strict ``json.dumps`` (values through :func:`json_ready`): ``NaN`` -> ``null``, ``allow_nan=False``."""
    return json.dumps(json_ready(obj), indent=indent, sort_keys=sort_keys, default=default, allow_nan=False)


def write_json(
    path: Union[str, os.PathLike],
    obj: Any,
    *,
    indent: Optional[int] = 2,
    sort_keys: bool = False,
    default: Optional[Callable[[Any], Any]] = None,
) -> Path:
    """Write ``obj`` as strict JSON (plus a final newline) to ``path``; returns the path.

    The text goes to a temporary file in the same folder, which is then renamed onto ``path`` (``os.replace``,
    atomic on one file system): a run killed while writing never leaves a half-written file under the final name."""
    path = Path(path)
    text = dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:  # the usual permissions (umask), unlike mkstemp's 0600
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return path
