"""Repeatable runs: the same command and seed give the same numbers in the same environment, where torch allows.

:func:`make_deterministic` seeds every generator, turns on torch's deterministic algorithms and kernels and
fixes the thread counts; its :class:`DeterminismReport` says what was set and, in plain words, what cannot
be made deterministic here (:meth:`DeterminismReport.restore` puts the previous settings back). Floating-point
sums depend on the order of operations, so the same figures need the same thread count, the same torch
build and the same kind of CPU or GPU.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

__all__ = ["CUBLAS_WORKSPACE", "DeterminismReport", "make_deterministic", "seed_everything"]

CUBLAS_WORKSPACE = ":4096:8"
"""``CUBLAS_WORKSPACE_CONFIG`` value that makes cuBLAS deterministic (CUDA >= 10.2)."""

ALWAYS_NOT_DETERMINISTIC = (
    "results across machines, CPU/GPU models or torch / oneDNN / MKL / cuDNN builds: kernels are chosen by the "
    "hardware and library version, and floating-point sums depend on their order",
    "DataLoader worker processes: give the loader a seeded torch.Generator and seed each worker "
    "(worker_init_fn) from torch.initial_seed()",
)


@dataclass
class DeterminismReport:
    """What :func:`make_deterministic` set, what it could not, and the settings it replaced.

    Attributes:
        seed: the seed given to Python, NumPy and torch.
        threads: torch intra-op threads in use afterwards.
        interop_threads: torch inter-op threads in use afterwards.
        settings: the settings applied (name -> value), for logs and run records.
        not_deterministic: what stays non-deterministic, one plain sentence each.
        previous: the global settings before the call (for :meth:`restore`).
    """

    seed: int
    threads: int
    interop_threads: int
    settings: Dict[str, Any] = field(default_factory=dict)
    not_deterministic: List[str] = field(default_factory=list)
    previous: Dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able summary (without the previous settings)."""
        return {
            "seed": self.seed,
            "threads": self.threads,
            "interop_threads": self.interop_threads,
            "settings": dict(self.settings),
            "not_deterministic": list(self.not_deterministic),
        }

    def restore(self) -> None:
        """Put back the deterministic-algorithm, cuDNN and intra-op thread settings found before the call."""
        import torch

        prev = self.previous
        torch.use_deterministic_algorithms(prev["deterministic"], warn_only=prev["warn_only"])
        torch.backends.cudnn.deterministic = prev["cudnn_deterministic"]
        torch.backends.cudnn.benchmark = prev["cudnn_benchmark"]
        torch.set_num_threads(prev["threads"])


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every GPU)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _cuda_started(torch) -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_initialized())


def _set_cublas(torch, notes: List[str]) -> str:
    value = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if value not in (":4096:8", ":16:8"):
        if _cuda_started(torch):
            notes.append(
                "cuBLAS: CUDA was started before CUBLAS_WORKSPACE_CONFIG was set; set it in the "
                f"environment (CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE}) or call this before any CUDA use"
            )
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
        value = CUBLAS_WORKSPACE
    return value


def _set_threads(torch, threads: Optional[int], interop_threads: Optional[int], notes: List[str]) -> None:
    if threads is None:
        notes.append(
            f"thread count: not fixed by the caller ({torch.get_num_threads()} intra-op threads in use); "
            "the same figures need the same count"
        )
    else:
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}.")
        torch.set_num_threads(int(threads))
    if interop_threads is not None and interop_threads != torch.get_num_interop_threads():
        try:
            torch.set_num_interop_threads(int(interop_threads))
        except RuntimeError:  # torch allows it only once, before any inter-op parallel work
            notes.append(
                f"inter-op threads: already fixed at {torch.get_num_interop_threads()} by earlier parallel "
                f"work (asked {interop_threads}); set them at the start of the process"
            )


def make_deterministic(
    seed: int,
    threads: Optional[int] = None,
    *,
    interop_threads: Optional[int] = None,
    warn_only: bool = True,
) -> DeterminismReport:
    """Make this process's torch runs repeatable where torch allows it; say what stays non-deterministic.

    Seeds Python, NumPy and torch (every device), turns on ``torch.use_deterministic_algorithms``, switches
    cuDNN to its deterministic kernels with benchmarking off, sets ``CUBLAS_WORKSPACE_CONFIG`` (read by
    cuBLAS when CUDA starts) and fixes torch's intra-op (and, if still possible, inter-op) thread counts.
    Run it once, early: before CUDA is first used (for cuBLAS) and before any parallel work (for the
    inter-op thread count).

    Args:
        seed: seed for Python, NumPy and torch.
        threads: torch intra-op threads (the same count is needed for the same figures); ``None`` keeps the
            current count and says so in the report.
        interop_threads: torch inter-op threads, if given (only possible before any parallel work).
        warn_only: ``True`` (default): an op without a deterministic implementation warns (and is named in the
            warning) instead of raising; ``False`` makes it an error.

    Returns:
        A :class:`DeterminismReport`.
    """
    import torch

    previous = {
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "threads": torch.get_num_threads(),
    }
    notes: List[str] = []
    cublas = _set_cublas(torch, notes)
    _set_threads(torch, threads, interop_threads, notes)
    seed_everything(int(seed))
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if warn_only:
        notes.append(
            "ops without a deterministic implementation (mostly CUDA backward kernels, e.g. index_add_, "
            "scatter_add_, adaptive pooling) run anyway and torch warns naming them"
        )
    if os.environ.get("PYTHONHASHSEED") in (None, "random"):
        notes.append(
            "Python's str hashing (set and dict-of-str order): fixed only by PYTHONHASHSEED in the "
            "environment before Python starts"
        )
    notes.extend(ALWAYS_NOT_DETERMINISTIC)
    settings = {
        "use_deterministic_algorithms": True,
        "warn_only": warn_only,
        "cudnn.deterministic": True,
        "cudnn.benchmark": False,
        "CUBLAS_WORKSPACE_CONFIG": cublas,
        "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED"),
    }
    return DeterminismReport(
        seed=int(seed),
        threads=torch.get_num_threads(),
        interop_threads=torch.get_num_interop_threads(),
        settings=settings,
        not_deterministic=notes,
        previous=previous,
    )
