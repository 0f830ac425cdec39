"""Tests of modeling_emrfuse/runtime/determinism.py: seeded runs repeat bit for bit on CPU."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_emrfuse.runtime.determinism import CUBLAS_WORKSPACE, make_deterministic

ROOT = Path(__file__).resolve().parents[1]


def _train_steps(seed: int, steps: int = 3) -> dict:
    """A tiny conv net (BatchNorm, dropout) trained a few AdamW steps on data drawn from the seeded generators."""
    report = make_deterministic(seed, threads=1)
    try:
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.3),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(8, 2),
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x = torch.randn(6, 3, 16, 16) + torch.from_numpy(np.random.rand(6, 3, 16, 16).astype(np.float32))
        y = torch.randint(0, 2, (6,))
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        report.restore()


def _digest(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].numpy().tobytes())
    return h.hexdigest()


def test_two_seeded_training_runs_give_bit_identical_weights():
    a, b, c = _train_steps(0), _train_steps(0), _train_steps(1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_the_same_run_in_a_fresh_process_gives_the_same_weights():
    code = "from test_determinism import _train_steps, _digest; print(_digest(_train_steps(0)))"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == _digest(_train_steps(0))


def test_report_names_settings_and_limits_and_restores():
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    report = make_deterministic(5, threads=1)
    try:
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
        assert report.settings["CUBLAS_WORKSPACE_CONFIG"] == os.environ["CUBLAS_WORKSPACE_CONFIG"]
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (CUBLAS_WORKSPACE, ":16:8")
        assert any("machines" in n for n in report.not_deterministic)
        assert not any("thread count" in n for n in report.not_deterministic)
        assert report.to_dict()["seed"] == 5
    finally:
        report.restore()
    assert (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()) == before
    unfixed = make_deterministic(5)
    unfixed.restore()
    assert any("thread count" in n for n in unfixed.not_deterministic)
    with pytest.raises(ValueError, match="threads"):
        make_deterministic(5, threads=0)
