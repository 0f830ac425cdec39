"""Hub round trips: save_pretrained -> Auto*.from_pretrained(trust_remote_code=True) in a fresh process where the
``modeling_emrfuse`` package cannot be imported, a faked offline Hub cache, and push_to_hub with HfApi mocked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import tiny_config
from huggingface_hub import HfApi, ModelCard
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
    BertTokenizerFast,
)

from modeling_emrfuse.configuration_emrfuse import EmrFuseConfig
from modeling_emrfuse.modeling_emrfuse import EmrFuseForImageClassification, EmrFuseForSegmentation, EmrFuseModel


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Outputs are compared (to float32 rounding) with a fresh process that runs on one thread: run on one thread too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


REPORT = "mass in the left frontal lobe with ring enhancement and surrounding edema ."
WORDS = sorted(set(REPORT.split()) | {"right", "tumour", "no", "lesion"})
CODE_FILES = ("configuration_emrfuse.py", "modeling_emrfuse.py", "brats_labels.py")
REPO_ID = "emrfuse-org/emrfuse-tiny"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def _tokenizer():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=32)


def _processor():
    from modeling_emrfuse.processing_emrfuse import EmrFuseImageProcessor, EmrFuseProcessor

    return EmrFuseProcessor(EmrFuseImageProcessor(), _tokenizer())


def _volume(seed=0):
    rng = np.random.default_rng(seed)
    vol = np.zeros((4, 24, 24, 6), dtype=np.float32)
    vol[:, 4:20, 5:19, 1:5] = rng.normal(100.0, 20.0, size=(4, 16, 14, 4))
    return vol


# The fresh interpreter: -S (no site: the editable install's .pth finder is not run), -s (no user site), -P (no
# script folder or cwd on the path); its PYTHONPATH names only the environment's site-packages directories.
CHILD = textwrap.dedent(
    """
    import importlib.util, json, sys
    out_path, folders = sys.argv[1], json.loads(sys.argv[2])
    result = {"package_importable": importlib.util.find_spec("modeling_emrfuse") is not None}
    try:
        import modeling_emrfuse  # noqa: F401
        result["import_error"] = None
    except ImportError as err:
        result["import_error"] = type(err).__name__
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from transformers import (AutoConfig, AutoModel, AutoModelForImageClassification,
                              AutoModelForSemanticSegmentation, AutoProcessor)
    inputs = torch.load(folders.pop("inputs"))
    volume = np.load(folders.pop("volume"))
    for tag, where in folders.items():
        res = {}
        config = AutoConfig.from_pretrained(where, trust_remote_code=True)
        res["config_class"] = type(config).__name__
        res["config_module"] = type(config).__module__
        processor = AutoProcessor.from_pretrained(where, trust_remote_code=True)
        res["processor_class"] = type(processor).__name__
        enc = processor(volumes=volume, text=[inputs["report"]])
        res["pixel_values"] = enc["pixel_values"]
        res["input_ids"] = enc["input_ids"]
        model_inputs = {k: enc[k] for k in ("pixel_values", "input_ids", "attention_mask", "token_type_ids",
                                            "slice_to_case", "has_report")}
        for name, auto in (("seg", AutoModelForSemanticSegmentation), ("cls", AutoModelForImageClassification),
                           ("base", AutoModel)):
            sub = where if name == "seg" else where + "-cls"  # the grading model sits next to it
            model = auto.from_pretrained(sub, trust_remote_code=True).eval()
            res[name + "_class"] = type(model).__name__
            res[name + "_module"] = type(model).__module__
            res[name + "_state"] = {k: v.clone() for k, v in model.state_dict().items()}
            with torch.no_grad():
                out = model(**model_inputs)
            res[name] = out.logits if name != "base" else out.case_embeds
        result[tag] = res
    torch.save(result, out_path)
    """
)


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every weight and buffer away from its initial value before saving.

    An untrained model's zero / one / identity initialisations (biases, LayerNorm, BatchNorm statistics, gates)
    come back unchanged when a parameter silently fails to load and is re-initialised; perturbed, it cannot.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        seen = set()
        for name, tensor in model.state_dict().items():  # what is saved (not the non-persistent buffers)
            if tensor.data_ptr() in seen:  # tied weights: once
                continue
            seen.add(tensor.data_ptr())
            if tensor.is_floating_point():
                noise = torch.rand(tensor.shape, generator=gen, dtype=tensor.dtype)
                if name.endswith("running_var"):
                    tensor.mul_(1.0 + 0.5 * noise)  # variances stay positive
                else:
                    tensor.add_(0.02 * (noise - 0.5))
            elif tensor.dtype in (torch.int64, torch.int32):
                tensor.add_(7)  # e.g. num_batches_tracked
    return model


def _same_output(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Outputs of a reloaded model vs the saved one: equal up to float32 rounding (a reloaded model need not
    round bit for bit like the in-memory one: kernels may pick other code paths for other allocations); a
    weight that did not load (perturbed away from its initialisation) differs by far more."""
    return torch.allclose(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def _state_dicts_equal(a, b) -> None:
    """Every saved tensor loads back exactly (``a``, ``b``: models or state dicts)."""
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert set(sa) == set(sb), sorted(set(sa) ^ set(sb))
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} did not load back"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two model folders (segmentation and grading, each with the processor), reference outputs in-process."""
    root = tmp_path_factory.mktemp("hub")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    processor = _processor()
    seg = _perturb(EmrFuseForSegmentation(tiny_config()), seed=1).eval()
    cls = _perturb(EmrFuseForImageClassification(tiny_config(use_residual=False)), seed=2).eval()
    seg_dir, cls_dir = root / "model", root / "model-cls"
    for model, folder in ((seg, seg_dir), (cls, cls_dir)):
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    volume = _volume()
    enc = processor(volumes=volume, text=[REPORT])
    model_inputs = {
        k: enc[k]
        for k in ("pixel_values", "input_ids", "attention_mask", "token_type_ids", "slice_to_case", "has_report")
    }
    with torch.no_grad():
        ref = {
            "seg": seg(**model_inputs).logits,
            "cls": cls(**model_inputs).logits,
            "base": cls.emrfuse(**model_inputs).case_embeds,
            "pixel_values": enc["pixel_values"],
            "input_ids": enc["input_ids"],
        }
    torch.set_num_threads(before)
    return dict(
        root=root, seg_dir=seg_dir, cls_dir=cls_dir, ref=ref, volume=volume, processor=processor, seg=seg, cls=cls
    )


def _fake_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)


@pytest.fixture(scope="module")
def fresh_process(saved):
    """Run every Auto class once in a fresh interpreter without the package, from a folder and a Hub cache."""
    root = saved["root"]
    cache = root / "hub-cache"
    _fake_hub_cache(cache, REPO_ID, saved["seg_dir"])
    _fake_hub_cache(cache, REPO_ID + "-cls", saved["cls_dir"])
    torch.save({"report": REPORT}, root / "inputs.pt")
    np.save(root / "volume.npy", saved["volume"])
    script = root / "child.py"
    script.write_text(CHILD)
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    folders = {
        "folder": str(saved["seg_dir"]),
        "hub": REPO_ID,
        "inputs": str(root / "inputs.pt"),
        "volume": str(root / "volume.npy"),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHON", "TRANSFORMERS_"))}
    env.update(
        HF_HUB_CACHE=str(cache),
        HF_HOME=str(root / "hf-home"),
        HF_MODULES_CACHE=str(root / "modules"),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=os.pathsep.join(paths),
    )
    out = root / "child-out.pt"
    proc = subprocess.run(
        [sys.executable, "-S", "-s", "-P", str(script), str(out), json.dumps(folders)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


def test_save_pretrained_writes_code_auto_map_and_processor(saved):
    for folder in (saved["seg_dir"], saved["cls_dir"]):
        names = set(os.listdir(folder))
        for name in CODE_FILES + ("config.json", "model.safetensors", "processing_emrfuse.py", "processor_config.json"):
            assert name in names, (folder.name, name)
        assert names & {"tokenizer.json", "vocab.txt"}
        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        assert auto_map == {
            "AutoConfig": "configuration_emrfuse.EmrFuseConfig",
            "AutoModel": "modeling_emrfuse.EmrFuseModel",
            "AutoModelForImageClassification": "modeling_emrfuse.EmrFuseForImageClassification",
            "AutoModelForSemanticSegmentation": "modeling_emrfuse.EmrFuseForSegmentation",
        }
    # the copied code imports (at module level) only torch, transformers, timm, numpy and itself (relatively)
    import ast

    for name in CODE_FILES + ("processing_emrfuse.py",):
        tree = ast.parse((saved["seg_dir"] / name).read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                tops = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                tops = set() if node.level else {node.module.split(".")[0]}
            else:
                continue
            assert tops <= {
                "torch",
                "transformers",
                "timm",
                "numpy",
                "__future__",
                "math",
                "dataclasses",
                "typing",
                "os",
                "json",
                "warnings",
                "collections",
                "functools",
                "itertools",
                "copy",
            }, (name, tops)


def test_in_process_round_trip_identical(saved):
    enc = saved["processor"](volumes=saved["volume"], text=[REPORT])
    inputs = {k: enc[k] for k in ("pixel_values", "input_ids", "attention_mask", "token_type_ids", "slice_to_case")}
    seg = EmrFuseForSegmentation.from_pretrained(saved["seg_dir"]).eval()
    cls = EmrFuseForImageClassification.from_pretrained(saved["cls_dir"]).eval()
    base = EmrFuseModel.from_pretrained(saved["cls_dir"]).eval()
    # every saved weight and buffer loads back (the models were perturbed away from their initialisation)
    _state_dicts_equal(seg, saved["seg"])
    _state_dicts_equal(cls, saved["cls"])
    _state_dicts_equal(base, saved["cls"].emrfuse)
    with torch.no_grad():
        assert _same_output(seg(**inputs).logits, saved["ref"]["seg"])
        assert _same_output(cls(**inputs).logits, saved["ref"]["cls"])
        assert _same_output(base(**inputs).case_embeds, saved["ref"]["base"])
    assert EmrFuseConfig.from_pretrained(saved["cls_dir"]).use_residual is False
    # the Auto classes with remote code, in this process
    assert type(AutoConfig.from_pretrained(saved["seg_dir"], trust_remote_code=True)).__name__ == "EmrFuseConfig"
    auto = AutoModelForSemanticSegmentation.from_pretrained(saved["seg_dir"], trust_remote_code=True).eval()
    _state_dicts_equal(auto, saved["seg"])
    with torch.no_grad():
        assert _same_output(auto(**inputs).logits, saved["ref"]["seg"])
    assert (
        type(AutoModelForImageClassification.from_pretrained(saved["cls_dir"], trust_remote_code=True)).__name__
        == "EmrFuseForImageClassification"
    )
    assert type(AutoModel.from_pretrained(saved["cls_dir"], trust_remote_code=True)).__name__ == "EmrFuseModel"


def test_fresh_process_cannot_import_the_package(fresh_process):
    assert fresh_process["package_importable"] is False
    assert fresh_process["import_error"] in ("ModuleNotFoundError", "ImportError")


@pytest.mark.parametrize("tag", ["folder", "hub"])
def test_fresh_process_round_trip_identical(fresh_process, saved, tag):
    res = fresh_process[tag]
    assert res["config_class"] == "EmrFuseConfig" and res["config_module"].startswith("transformers_modules.")
    assert res["processor_class"] == "EmrFuseProcessor"
    assert (res["seg_class"], res["cls_class"], res["base_class"]) == (
        "EmrFuseForSegmentation",
        "EmrFuseForImageClassification",
        "EmrFuseModel",
    )
    for name in ("seg", "cls", "base"):
        assert res[name + "_module"].startswith("transformers_modules."), res[name + "_module"]
    ref = saved["ref"]
    assert torch.equal(res["pixel_values"], ref["pixel_values"])
    assert torch.equal(res["input_ids"], ref["input_ids"])
    for name in ("seg", "cls", "base"):
        assert _same_output(res[name], ref[name]), name
    # every weight and buffer loaded back exactly in the fresh process too
    _state_dicts_equal(res["seg_state"], saved["seg"])
    _state_dicts_equal(res["cls_state"], saved["cls"])
    _state_dicts_equal(res["base_state"], saved["cls"].emrfuse)


def test_push_to_hub_uploads_model_code_and_processor(saved):
    uploaded: dict[str, bytes] = {}

    def create_commit(self, repo_id, operations, **kwargs):
        assert repo_id == REPO_ID
        for op in operations:
            src = op.path_or_fileobj
            uploaded[op.path_in_repo] = Path(src).read_bytes() if isinstance(src, (str, Path)) else bytes(src)
        return mock.MagicMock(commit_url=f"https://huggingface.co/{repo_id}/commit/{SNAPSHOT}")

    def create_repo(self, repo_id, **kwargs):
        return mock.MagicMock(repo_id=repo_id)

    card = ModelCard("---\nlibrary_name: transformers\n---\n\n# EmrFuse (test card)\n")
    with (
        mock.patch.object(HfApi, "create_repo", create_repo),
        mock.patch.object(HfApi, "create_commit", create_commit),
        mock.patch("transformers.utils.hub.create_and_tag_model_card", return_value=card),
        mock.patch.object(HfApi, "upload_folder", side_effect=AssertionError("unexpected upload_folder")),
    ):
        saved["seg"].push_to_hub(REPO_ID)
        saved["processor"].push_to_hub(REPO_ID)
    names = set(uploaded)
    for name in CODE_FILES + ("config.json", "model.safetensors", "processing_emrfuse.py", "processor_config.json"):
        assert name in names, (name, sorted(names))
    assert names & {"tokenizer.json", "vocab.txt"} and "tokenizer_config.json" in names
    config = json.loads(uploaded["config.json"])
    assert config["model_type"] == "emrfuse" and config["auto_map"]["AutoModelForSemanticSegmentation"]
    assert (
        json.loads(uploaded["processor_config.json"])["auto_map"]["AutoProcessor"]
        == "processing_emrfuse.EmrFuseProcessor"
    )
    assert (
        uploaded["modeling_emrfuse.py"]
        == (Path(__file__).parents[1] / "modeling_emrfuse" / "modeling_emrfuse.py").read_bytes()
    )
