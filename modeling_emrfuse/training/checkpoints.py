"""Resumable checkpoints, written atomically.

Every process writes into a temporary folder (``Accelerator.save_state``); the main process adds a manifest of the
files (names and sizes) and ``training_state.json``, the completion marker, then renames the folder into place. A
checkpoint is complete when its marker is there and every file has the size its manifest names; ``latest`` is the
newest complete one, and resuming from a damaged one is an error that names the file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from accelerate.utils import RNG_STATE_NAME
from accelerate.utils import load as accelerate_load

from ..runtime import strict_json

logger = logging.getLogger("emrfuse.train")

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_NAME = "training_state.json"  # written last: the completion marker
MANIFEST_NAME = "checkpoint_manifest.json"  # every other file of the checkpoint and its size in bytes


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the checkpoint and the file."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _checkpoint_files(folder: Path) -> Dict[str, int]:
    """Every file below ``folder`` (relative POSIX path -> size), manifest and completion marker left out."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST_NAME, TRAINING_STATE_NAME)
    }


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why a ``.safetensors`` file is not whole (its header names more bytes than it holds), or None."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            return f"{size} bytes, its header alone needs {8 + header_len}"
        try:
            header = json.loads(fh.read(header_len))
        except ValueError:
            return "its header is not valid JSON"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + header_len + max(ends, default=0)
    return None if size == expected else f"{size} bytes, its header names {expected}"


def _file_problem(path: Path) -> Optional[str]:
    """Why a checkpoint file cannot be read whole (format checks for files that no manifest describes), or None."""
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.suffix in (".bin", ".pt", ".pth", ".pkl") and not zipfile.is_zipfile(path):
        return f"{path.stat().st_size} bytes, not a whole torch archive"
    return None


def checkpoint_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` is not a complete checkpoint (``"<file>: <what is wrong>"``), or None when it is complete."""
    folder = Path(folder)
    if not (folder / TRAINING_STATE_NAME).is_file():
        return f"no {TRAINING_STATE_NAME} (the save did not finish)"
    manifest = folder / MANIFEST_NAME
    if manifest.is_file():
        expected = json.loads(manifest.read_text())["files"]
        found = _checkpoint_files(folder)
        for name, size in expected.items():
            if name not in found:
                return f"{folder / name}: missing"
            if found[name] != size:
                return f"{folder / name}: {found[name]} bytes, the checkpoint's manifest says {size} (truncated)"
        return None
    for path in sorted(folder.rglob("*")):  # no manifest: read each file's own structure
        problem = _file_problem(path) if path.is_file() else None
        if problem:
            return f"{path}: {problem}"
    return None


def _numbered_checkpoints(output_dir: str | Path) -> List[Path]:
    """Every ``checkpoint-<step>`` folder, oldest first (complete or not)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(CHECKPOINT_PREFIX) and d.name[len(CHECKPOINT_PREFIX) :].isdigit():
            found.append((int(d.name[len(CHECKPOINT_PREFIX) :]), d))
    return [d for _, d in sorted(found)]


def list_checkpoints(output_dir: str | Path) -> List[Path]:
    """Complete checkpoints (:func:`checkpoint_problem` finds nothing), oldest first.

    Temporary folders of a save that was interrupted are never listed.
    """
    return [
        d
        for d in _numbered_checkpoints(output_dir)
        if (d / TRAINING_STATE_NAME).is_file() and checkpoint_problem(d) is None
    ]


def resolve_checkpoint(resume: Optional[str], output_dir: str | Path) -> Optional[Path]:
    """``--resume_from_checkpoint``: a folder, or ``latest`` (the newest complete one; None if there is none).

    ``latest`` passes over damaged checkpoints with a warning each; a folder given by name must be complete.
    """
    if not resume:
        return None
    if resume == "latest":
        for folder in reversed(_numbered_checkpoints(output_dir)):
            problem = checkpoint_problem(folder)
            if problem is None:
                return folder
            logger.warning(f"--resume_from_checkpoint latest: {folder.name} passed over: {problem}")
        return None
    path = Path(resume)
    if not (path / TRAINING_STATE_NAME).is_file():
        raise CheckpointError(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {TRAINING_STATE_NAME}).")
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(
            f"--resume_from_checkpoint {path}: damaged checkpoint: {problem}; resume from another "
            "checkpoint (e.g. 'latest', which passes over damaged ones)."
        )
    return path


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (the same step saved again) is replaced."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    accelerator, output_dir: str | Path, state: Dict[str, Any], total_limit: Optional[int] = None
) -> Path:
    """Save a resumable checkpoint atomically.

    Every process writes into ``checkpoints/.tmp-checkpoint-<step>`` (``Accelerator.save_state``:
    weights, optimiser, scheduler, scaler, each process's RNG states); the main process adds the
    manifest (every file and its size) and ``training_state.json`` (step, epoch, position in the epoch,
    best metric) and renames the folder to ``checkpoint-<step>`` (an atomic rename on one file system).
    A run killed at any moment leaves either the new complete checkpoint or the previous one; leftovers
    of an interrupted save are removed at the next save. Older checkpoints beyond ``total_limit`` are
    deleted after the new one is in place.
    """
    root = checkpoint_root(output_dir)
    step = int(state["global_step"])
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(f".tmp-{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_durably(tmp / MANIFEST_NAME, strict_json.dumps({"files": _checkpoint_files(tmp)}, indent=2) + "\n")
        _write_durably(tmp / TRAINING_STATE_NAME, strict_json.dumps(state, indent=2) + "\n")
        _move_into_place(tmp, final)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def random_state_problem(path: Path, process_index: int) -> Optional[str]:
    """Why accelerate would refuse this process's random state in checkpoint ``path`` (it then resumes without
    it, logging only at info level), or None when the state loads."""
    rng_file = Path(path) / f"{RNG_STATE_NAME}_{process_index}.pkl"
    if not rng_file.is_file():
        return f"{rng_file}: missing"
    try:
        accelerate_load(rng_file)
    except Exception as exc:  # what accelerate's own load raises is refused there
        return f"{rng_file}: refused ({type(exc).__name__})"
    return None


def load_checkpoint(accelerator, path: Path) -> Dict[str, Any]:
    """Restore weights, optimiser, scheduler and RNG states; return the saved training state.

    A damaged file is a :class:`CheckpointError` naming it; a random state that cannot be restored is a warning
    (the run continues from the weights, but does not repeat the uninterrupted run exactly).
    """
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"cannot resume from {path}: {problem}.")
    rng_problem = random_state_problem(path, accelerator.process_index)
    try:
        accelerator.load_state(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot resume from {path}: {type(exc).__name__}: {exc}") from exc
    if rng_problem:
        logger.warning(
            f"resumed from {path} without its random state: {rng_problem}; the run will not repeat the "
            "uninterrupted run exactly."
        )
    return json.loads((path / TRAINING_STATE_NAME).read_text())


def start_or_resume(accelerator, resume: Optional[str], output_dir: Path, task: str, desc: str) -> Dict[str, Any]:
    """The loop's state: fresh (step 0; the evaluation history starts afresh), or from the checkpoint ``resume``
    names (a folder or ``latest``; model, optimizer, scheduler and RNG states are restored by accelerate)."""
    state: Dict[str, Any] = {
        "global_step": 0,
        "epoch": 0,
        "batches_in_epoch": 0,
        "best_metric": None,
        "best_step": None,
        "task": task,
    }
    checkpoint = resolve_checkpoint(resume, output_dir)
    if checkpoint is not None:
        saved_task = json.loads((checkpoint / TRAINING_STATE_NAME).read_text()).get("task", task)
        if saved_task != task:
            raise CheckpointError(f"{checkpoint}: a {saved_task} checkpoint cannot resume a {task} run.")
        state = load_checkpoint(accelerator, checkpoint)
        logger.info(
            f"{desc}: resumed from {checkpoint} (step {state['global_step']}, epoch {state['epoch']}, batch {state['batches_in_epoch']})"
        )
        return state
    if resume:
        logger.info(f"{desc}: no checkpoint in {checkpoint_root(output_dir)}; starting from step 0")
    if accelerator.is_main_process:
        (output_dir / "eval_history.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh history
    return state
