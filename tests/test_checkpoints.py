"""Resumable checkpoints (modeling_emrfuse/training/checkpoints.py): written atomically with a manifest, a damaged
one named in a clear error, ``latest`` falling back to the newest complete one, a refused random state reported."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from modeling_emrfuse.training import checkpoints
from modeling_emrfuse.training.checkpoints import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint


class _PlainObject:  # a pickled class instance: torch.load(weights_only=True) refuses it
    pass


@pytest.fixture
def saved(tmp_path):
    """Two real checkpoints (steps 2 and 4) of a tiny model with an optimiser, saved by accelerate on the CPU."""
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    for step in (2, 4):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        save_checkpoint(
            accelerator, tmp_path, {"global_step": step, "epoch": 0, "batches_in_epoch": step}, total_limit=3
        )
    return accelerator, tmp_path / "checkpoints"


def _truncate(path: Path, keep: int = 40) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_checkpoint_holds_a_manifest_of_its_files(saved):
    _, root = saved
    folder = root / "checkpoint-4"
    manifest = json.loads((folder / checkpoints.MANIFEST_NAME).read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= set(manifest)
    assert all(manifest[name] == (folder / name).stat().st_size for name in manifest)
    assert checkpoints.checkpoint_problem(folder) is None
    assert not list(root.glob(".tmp-*"))


@pytest.mark.parametrize("name", ["optimizer.bin", "model.safetensors"])
def test_truncated_file_is_named_and_latest_falls_back(saved, name, caplog):
    accelerator, root = saved
    _truncate(root / "checkpoint-4" / name)
    with pytest.raises(CheckpointError, match=rf"checkpoint-4/{name}: 40 bytes, the checkpoint's manifest says \d+"):
        resolve_checkpoint(str(root / "checkpoint-4"), root.parent)
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(accelerator, root / "checkpoint-4")
    with caplog.at_level(logging.WARNING, logger="emrfuse.train"):
        assert resolve_checkpoint("latest", root.parent) == root / "checkpoint-2"
    assert "checkpoint-4 passed over" in caplog.text and name in caplog.text
    assert checkpoints.list_checkpoints(root.parent) == [root / "checkpoint-2"]
    assert load_checkpoint(accelerator, root / "checkpoint-2")["global_step"] == 2


@pytest.mark.parametrize("name", ["optimizer.bin", "model.safetensors"])
def test_truncated_file_without_a_manifest_is_found_by_its_format(saved, name):
    _, root = saved
    folder = root / "checkpoint-4"
    (folder / checkpoints.MANIFEST_NAME).unlink()
    assert checkpoints.checkpoint_problem(folder) is None  # whole files pass the format checks
    _truncate(folder / name, keep=200)
    with pytest.raises(CheckpointError, match=rf"checkpoint-4/{name}: 200 bytes"):
        resolve_checkpoint(str(folder), root.parent)
    assert resolve_checkpoint("latest", root.parent) == root / "checkpoint-2"


def test_refused_random_state_is_reported(saved, caplog):
    accelerator, root = saved
    folder = root / "checkpoint-4"
    rng_file = folder / "random_states_0.pkl"
    rng_file.write_bytes(pickle.dumps({"random_state": _PlainObject()}))
    manifest = json.loads((folder / checkpoints.MANIFEST_NAME).read_text())
    manifest["files"]["random_states_0.pkl"] = rng_file.stat().st_size  # whole, but refused
    (folder / checkpoints.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert "refused" in checkpoints.random_state_problem(folder, 0)
    with caplog.at_level(logging.WARNING, logger="emrfuse.train"):
        state = load_checkpoint(accelerator, folder)
    assert state["global_step"] == 4
    assert "without its random state" in caplog.text and "random_states_0.pkl" in caplog.text


def test_interrupted_save_leaves_the_previous_checkpoint(saved, monkeypatch):
    accelerator, root = saved

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while the manifest is written

    monkeypatch.setattr(checkpoints, "_write_durably", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, root.parent, {"global_step": 6, "epoch": 0, "batches_in_epoch": 6})
    assert not (root / "checkpoint-6").exists() and (root / ".tmp-checkpoint-6").is_dir()
    assert resolve_checkpoint("latest", root.parent) == root / "checkpoint-4"
    monkeypatch.undo()
    save_checkpoint(accelerator, root.parent, {"global_step": 8, "epoch": 0, "batches_in_epoch": 8})
    assert not (root / ".tmp-checkpoint-6").exists()  # leftovers go at the next save
    assert os.path.isdir(root / "checkpoint-8")
