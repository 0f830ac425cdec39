"""CPU threading of the torch entry points (``train.py``, ``emrfuse predict``, the Space).

Two rules, both measured on a 2-core machine shared with one other torch process
(``bench/bench_train.py --load``): OpenMP threads sleep while they wait instead of spinning
(:func:`prefer_passive_openmp`), and a process uses no more intra-op threads than the cores it may
run on, shared between the processes of one node (:func:`limit_torch_threads`). A value the user
set always wins.

Only the standard library is imported here (torch is passed in, or imported when the limit is applied).
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["allowed_cores", "prefer_passive_openmp", "default_num_threads", "limit_torch_threads"]


def allowed_cores() -> int:
    """Number of cores this process may run on (its CPU affinity; ``os.cpu_count()`` where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS / Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def prefer_passive_openmp() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the user set it. Call before torch is imported.

    Spinning threads steal the cores their siblings, or another job, need: ``python train.py --demo``
    beside one other torch process ran 3-5 s/step instead of 0.2 s/step. The variable is read when
    torch's OpenMP runtime loads, hence before ``import torch``.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def default_num_threads() -> int:
    """Intra-op threads for one process: the allowed cores shared by the processes on this node.

    The allowed cores come from ``os.sched_getaffinity`` (a container, ``taskset`` or a job scheduler can
    allow fewer cores than the machine has); the processes of one node under ``torchrun`` /
    ``accelerate launch`` are counted by ``LOCAL_WORLD_SIZE``.
    """
    local_procs = 1
    try:
        local_procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        pass
    return max(1, allowed_cores() // local_procs)


def limit_torch_threads(threads: Optional[int] = None) -> int:
    """Set torch's intra-op threads: ``threads`` if given, else keep ``OMP_NUM_THREADS`` if the user set it,
    else :func:`default_num_threads` (never more than torch would use by itself). Returns the count in use."""
    import torch

    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"the number of threads must be >= 1, got {threads}.")
        torch.set_num_threads(int(threads))
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, min(torch.get_num_threads(), default_num_threads())))
    return torch.get_num_threads()
