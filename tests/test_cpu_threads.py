"""CPU threading of the torch entry points (modeling_emrfuse/runtime/cpu_threads.py): OpenMP threads that sleep instead of
spinning, set before torch loads, and no more threads than the cores a process may use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_emrfuse.runtime import cpu_threads

REPO = Path(__file__).resolve().parents[1]

# records OMP_WAIT_POLICY at the moment torch is first imported, then imports the entry point
PROBE = r"""
import importlib.abc, os, sys
seen = {}
class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in seen:
            seen["torch"] = os.environ.get("OMP_WAIT_POLICY", "unset")
        return None
sys.meta_path.insert(0, Probe())
__import__(sys.argv[1])  # python -c: the working directory, the entry point's folder, is on the import path
import torch  # the Space loads torch later, with the model: the policy must be set by then
print(seen["torch"])
"""


@pytest.mark.parametrize("module", ["train", "app"])
@pytest.mark.parametrize("user_value", [None, "ACTIVE"])
def test_entry_points_set_passive_wait_policy_before_torch_loads(module, user_value):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if user_value:
        env["OMP_WAIT_POLICY"] = user_value
    folder = REPO / "space" if module == "app" else REPO
    out = subprocess.run(
        [sys.executable, "-c", PROBE, module], env=env, capture_output=True, text=True, timeout=300, cwd=folder
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == (user_value or "PASSIVE")  # the user's value always wins


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_follow_the_allowed_cores_shared_by_local_processes(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert cpu_threads.allowed_cores() == 1
    assert cpu_threads.limit_torch_threads() == 1 == torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun --nproc_per_node 2: three cores each
    assert cpu_threads.default_num_threads() == 3
    torch.set_num_threads(8)
    assert cpu_threads.limit_torch_threads() == 3
    torch.set_num_threads(2)
    assert cpu_threads.limit_torch_threads() == 2  # never more than torch would use by itself
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert cpu_threads.default_num_threads() == 1  # at least one


def test_user_thread_settings_win(monkeypatch, restore_threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert cpu_threads.limit_torch_threads() == 2  # OMP_NUM_THREADS is the user's choice
    assert cpu_threads.limit_torch_threads(3) == 3  # an explicit count wins over everything
    with pytest.raises(ValueError, match=">= 1"):
        cpu_threads.limit_torch_threads(0)


def test_train_threads_flag(restore_threads):
    from train_script import load_train_script

    train = load_train_script()

    assert train.parse_args(["--demo", "--threads", "1"]).threads == 1
    assert train.parse_args(["--demo"]).threads is None  # default: the allowed cores
    with pytest.raises(SystemExit, match="--threads"):
        train.main(["--demo", "--threads", "0"])  # refused before anything runs
