"""The package's two kinds of code stay apart, and `pip install .` ships every module.

- The files that travel to the Hub with a model (the top level of ``modeling_emrfuse/``) import only
  each other (relatively), the model stack and the standard library: a saved model folder is checked
  file by file.
- Every sub-package (the local tools) is found by the package discovery in ``pyproject.toml``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "modeling_emrfuse"

# third-party modules the Hub files may import (nibabel / SimpleITK only where a file is read, scipy only where
# the post-processing looks for connected components)
HUB_THIRD_PARTY = {"torch", "transformers", "timm", "numpy", "nibabel", "SimpleITK", "scipy"}


def _imports(path: Path):
    """(level, module) of every import in ``path`` (level 0: absolute)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level and node.module is None:
                for alias in node.names:
                    yield node.level, alias.name
            else:
                yield node.level, node.module or ""


def _check_hub_file(path: Path, shipped: set) -> list:
    problems = []
    for level, module in _imports(path):
        top = module.split(".")[0]
        if level == 0:
            if top in sys.stdlib_module_names or top == "__future__":
                continue
            if top not in HUB_THIRD_PARTY:
                problems.append(f"{path.name}: imports {module!r} (not in the model stack)")
        elif level != 1 or top not in shipped:
            problems.append(f"{path.name}: relative import {'.' * level}{module} is not a file of the model folder")
    return problems


def test_hub_files_are_the_top_level_modules():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == {
        "brats_io",
        "brats_labels",
        "configuration_emrfuse",
        "modeling_emrfuse",
        "processing_emrfuse",
        "pipeline_emrfuse",
        "inference_optim",
    }, "a new top-level module travels to the Hub: put local tools in a sub-package"


def test_top_level_modules_import_nothing_outside_the_hub_set():
    shipped = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    problems = [
        msg for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__" for msg in _check_hub_file(p, shipped)
    ]
    assert not problems, "\n".join(problems)


def test_saved_model_folder_carries_only_self_contained_code(tmp_path):
    from conftest import build_tiny_model_folder

    folder = build_tiny_model_folder(tmp_path / "model")
    for sub in (folder, folder / "grading"):
        files = sorted(sub.glob("*.py"))
        assert files, f"no model code in {sub}"
        shipped = {p.stem for p in files}
        problems = [msg for p in files for msg in _check_hub_file(p, shipped)]
        assert not problems, "\n".join(problems)
        # the folder's code is exactly a subset of the package's top-level (Hub) files, byte for byte
        for p in files:
            assert p.read_bytes() == (PACKAGE / p.name).read_bytes(), p.name
    assert {p.name for p in folder.glob("*.py")} >= {"pipeline_emrfuse.py", "modeling_emrfuse.py", "brats_io.py"}


def test_package_discovery_finds_every_sub_package():
    from setuptools import find_namespace_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    find = config["tool"]["setuptools"]["packages"]["find"]
    found = set(find_namespace_packages(where=str(ROOT), include=find["include"], exclude=find.get("exclude", ())))
    wanted = set()
    for root in ("modeling_emrfuse", "datasets_scripts"):
        for py in (ROOT / root).rglob("*.py"):
            if "__pycache__" not in py.parts:
                wanted.add(".".join(py.parent.relative_to(ROOT).parts))
    missing = wanted - found
    assert not missing, f"not installed by `pip install .`: {sorted(missing)}"
