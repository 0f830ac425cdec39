"""modeling_emrfuse.brats_io, the one home of BraTS case I/O: its place in the layers (what may import
what), the BraTS 2023 naming rule shared by every caller, and label maps written and read back."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from brats_fixtures import volume, write_nifti

from modeling_emrfuse import brats_io
from modeling_emrfuse.brats_io import (
    case_id_from_file_names,
    discover_cases,
    is_brats2023_naming,
    label_convention_from_file_names,
    read_label_map,
    read_volume_and_header,
    write_label_map,
)

PACKAGE = Path(brats_io.__file__).resolve().parent
# the files of modeling_emrfuse/ that travel to the Hub (copied next to the weights by save_pretrained)
HUB_FILES = (
    "configuration_emrfuse.py",
    "modeling_emrfuse.py",
    "brats_labels.py",
    "processing_emrfuse.py",
    "pipeline_emrfuse.py",
    "brats_io.py",
    "inference_optim.py",
)


def _imports(tree: ast.AST):
    """(node, absolute top-level module or None for a relative import) for every import in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            yield node, None if node.level else (node.module or "").split(".")[0]


# ------------------------------------------------------------------------------------------ layers
def test_modeling_emrfuse_imports_no_datasets_scripts():
    """The data side builds on the model package, not the other way round; only ``training/`` (what train.py runs,
    a tool above both: it trains on the data side's slice cache) imports it, and the data side never imports
    ``training/``."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "training":
            continue
        for node, top in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if top == "datasets_scripts":
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, f"modeling_emrfuse must not import datasets_scripts: {offenders}"
    data_side = PACKAGE.parent / "datasets_scripts"
    for path in sorted(data_side.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            assert not any(n.startswith("modeling_emrfuse.training") for n in names), f"{path.name}:{node.lineno}"


def test_brats_io_module_level_imports_are_stdlib_numpy_and_siblings():
    tree = ast.parse((PACKAGE / "brats_io.py").read_text(encoding="utf-8"))
    for node in tree.body:  # module level only: nibabel / SimpleITK are imported inside functions
        if isinstance(node, ast.Import):
            tops = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert node.level == 1 and (PACKAGE / f"{node.module}.py").is_file(), ast.dump(node)
                continue
            tops = {node.module.split(".")[0]}
        else:
            continue
        assert all(t == "numpy" or t in sys.stdlib_module_names for t in tops), (node.lineno, tops)


def test_hub_files_need_only_the_model_stack():
    """What transformers checks before running remote code (``get_imports``: every import outside a ``try``),
    for each file that travels: nibabel and SimpleITK must stay optional."""
    from transformers.dynamic_module_utils import get_imports

    allowed = {"numpy", "torch", "transformers", "timm"}
    for name in HUB_FILES:
        needed = {m for m in get_imports(PACKAGE / name) if m not in sys.stdlib_module_names}
        assert needed <= allowed, (name, needed - allowed)


def test_saved_pipeline_folder_carries_brats_io(tmp_path):
    """``add_pipeline_to_folder`` (like the pipeline's save_pretrained) copies the pipeline's relative imports:
    brats_io and inference_optim too."""
    from modeling_emrfuse.hub.packaging import add_pipeline_to_folder

    (tmp_path / "config.json").write_text('{"architectures": ["EmrFuseForSegmentation"]}')
    add_pipeline_to_folder(tmp_path)
    copied = {p.name for p in tmp_path.iterdir()}
    assert {"pipeline_emrfuse.py", "brats_io.py", "brats_labels.py", "inference_optim.py"} <= copied
    for name in ("brats_io.py", "inference_optim.py"):
        assert (tmp_path / name).read_bytes() == (PACKAGE / name).read_bytes()
    assert "model_packaging.py" not in copied  # packaging stays local


def test_processor_save_pretrained_carries_brats_io(tmp_path):
    from transformers import BertTokenizerFast

    from modeling_emrfuse.processing_emrfuse import EmrFuseImageProcessor, EmrFuseProcessor

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "mass"]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=16)
    processor = EmrFuseProcessor(EmrFuseImageProcessor(), tokenizer)
    processor.register_for_auto_class()
    processor.save_pretrained(tmp_path)
    assert {"processing_emrfuse.py", "brats_io.py", "brats_labels.py"} <= {p.name for p in tmp_path.iterdir()}


# ------------------------------------------------------------------------------------------ naming rule
def test_brats2023_naming_rule():
    assert is_brats2023_naming({"t1n", "t1c", "t2w", "t2f"})
    assert is_brats2023_naming({"t2f"})
    assert is_brats2023_naming({"t1c"}, "BraTS-GLI-00001-000")
    assert not is_brats2023_naming({"t1c"})  # T1c is also the BraTS 2013/2015 name of contrast T1
    assert not is_brats2023_naming({"t1c", "flair"}, "brats_2013_pat0002_1")
    assert not is_brats2023_naming({"t1", "t1ce", "t2", "flair"}, "BraTS-GLI-00001-000")


def test_convention_from_file_names():
    names = [f"/d/BraTS-GLI-00001-000/BraTS-GLI-00001-000-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f")]
    assert label_convention_from_file_names(names) == "brats2023"
    assert label_convention_from_file_names(["t1n", "t1c", "t2w", "t2f"]) == "brats2023"  # bare sequence names
    assert label_convention_from_file_names(names[1:2]) == "brats2023"  # t1c alone, in a BraTS 2023 case
    assert (
        label_convention_from_file_names(["/d/brats_2013_pat0002_1/T1c.nii.gz", "/d/brats_2013_pat0002_1/Flair.nii.gz"])
        is None
    )
    assert label_convention_from_file_names(["/d/brats_2013_pat0002_1/T1c.nii.gz"]) is None
    assert label_convention_from_file_names([f"/d/Case_001_{s}.nii.gz" for s in ("t1", "t1ce", "t2", "flair")]) is None
    assert case_id_from_file_names(names) == "BraTS-GLI-00001-000"
    assert case_id_from_file_names(["/d/TCGA-DU-7294_t1.nii.gz", "/d/TCGA-DU-7294_flair.nii.gz"]) == "TCGA-DU-7294"


def _write_case(folder: Path, names) -> Path:
    folder.mkdir(parents=True)
    for i, name in enumerate(names):
        write_nifti(folder / name, volume(seed=i))
    return folder


def test_every_caller_uses_the_one_rule(tmp_path):
    from modeling_emrfuse.brats_io import load_case

    new = _write_case(
        tmp_path / "new" / "BraTS-GLI-00001-000",
        [f"BraTS-GLI-00001-000-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f")],
    )
    old = _write_case(
        tmp_path / "old" / "brats_2013_pat0002_1", ["T1.nii.gz", "T1c.nii.gz", "T2.nii.gz", "Flair.nii.gz"]
    )
    assert discover_cases(new.parent).release == "2023"
    assert discover_cases(old.parent).release == "2015"  # all cases named like BraTS 2013/2015 cases
    assert load_case(str(new)).label_convention == "brats2023"
    assert load_case(str(old)).label_convention == "brats2015"
    # the four files given one by one (a dict, as emrfuse predict --t1 ... passes them)
    files_new = {s: str(new / f"BraTS-GLI-00001-000-{s}.nii.gz") for s in ("t1n", "t1c", "t2w", "t2f")}
    files_old = {s: str(old / f"{s}.nii.gz") for s in ("T1", "T1c", "T2", "Flair")}
    assert load_case(files_new).label_convention == "brats2023"
    assert load_case(files_old).label_convention is None  # T1c alone does not make BraTS 2023
    t1c_only = {"t1c": files_new["t1c"]}
    assert load_case(t1c_only, allow_missing_sequences=True).label_convention == "brats2023"


# ------------------------------------------------------------------------------------------ label maps
def test_write_label_map_keeps_affine_and_header_and_reads_back(tmp_path):
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, -5.0]
    source = write_nifti(tmp_path / "case_t1.nii.gz", volume(), spacing=(1.0, 1.0, 1.0))
    (_, src_affine, _), header = read_volume_and_header(source)
    labels = np.zeros((8, 9, 5), dtype=np.int64)
    labels[2:5, 3:6, 1:3] = 4
    labels[3, 4, 2] = 1
    out = write_label_map(tmp_path / "sub" / "pred.nii.gz", labels, src_affine, header)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8 and np.allclose(img.affine, src_affine)
    assert img.header["descrip"].tobytes().startswith(b"EmrFuse predicted label map")
    array, affine_back, spacing = read_label_map(out)
    assert array.dtype == np.uint8 and np.array_equal(array, labels) and np.allclose(affine_back, src_affine)
    # without a header (MetaImage input, arrays): a fresh one with the given affine
    out2 = write_label_map(tmp_path / "pred2.nii.gz", labels, affine)
    assert np.allclose(nib.load(str(out2)).affine, affine)


@pytest.mark.parametrize(
    "data, match",
    [
        (np.full((4, 4, 3), 0.5, dtype=np.float32), "non-integer"),
        (np.full((4, 4, 3), 300, dtype=np.int16), "outside 0..255"),
        (np.zeros((4, 4), dtype=np.uint8), "3D volume"),
    ],
)
def test_read_label_map_refuses_what_is_not_a_label_map(tmp_path, data, match):
    path = tmp_path / "bad_seg.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(ValueError, match=f"bad_seg.nii.gz.*{match}"):
        read_label_map(path)


def test_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "garbage_t1.nii.gz"
    path.write_bytes(b"not a nifti file" * 10)
    with pytest.raises(ValueError, match="garbage_t1.nii.gz: not a readable NIfTI file: unreadable or truncated"):
        read_volume_and_header(path)
    with pytest.raises(FileNotFoundError, match="nowhere.nii.gz"):
        read_label_map(tmp_path / "nowhere.nii.gz")
