"""EmrFuse Gradio Space: brain MRI (four sequences) + radiology report -> tumour regions and grade.

A thin layer over :class:`modeling_emrfuse.pipeline_emrfuse.EmrFusePipeline` (the same inference as
``emrfuse predict`` and ``transformers.pipeline(model=..., trust_remote_code=True)``). The model is
``$EMRFUSE_MODEL`` (a Hub id or a local folder) or the demo model folder (:func:`model_source`).

Inputs: the four sequences as NIfTI uploads or a bundled example case, the report text, optionally a
ground-truth label map. Outputs: an MRI viewer with the predicted regions overlaid, grade
probabilities, the modality contribution, the report with words highlighted by token attention,
region volumes, metrics against the ground truth and the label map as a download. The README
describes the Space; the limits on uploads are set next to ``MAX_UPLOAD_MB``.
"""

from __future__ import annotations

import atexit
import csv
import html
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]  # the repository around the app in a checkout
# the package comes from `pip install -e .` (a checkout) or sits next to this file (a Space: Python puts the
# script's folder on the import path)
from modeling_emrfuse.runtime.cpu_threads import prefer_passive_openmp  # noqa: E402

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
prefer_passive_openmp()  # before torch loads: no spinning threads on shared vCPUs

# Every file the app holds lives under one folder, removed when the app stops (normal exit, Ctrl-C or
# SIGTERM): the examples, the result files and, unless GRADIO_TEMP_DIR is set, Gradio's uploads.
_OUTPUT_DIR = Path(tempfile.mkdtemp(prefix="emrfuse-space-", dir=os.environ.get("EMRFUSE_SPACE_TMPDIR") or None))
atexit.register(shutil.rmtree, _OUTPUT_DIR, True)
os.environ.setdefault("GRADIO_TEMP_DIR", str(_OUTPUT_DIR / "uploads"))  # before gradio is imported

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from modeling_emrfuse.brats_io import case_id_from_file_names, read_label_map, write_label_map  # noqa: E402
from modeling_emrfuse.brats_labels import (  # noqa: E402
    LABEL_CONVENTIONS,
    REGION_NAMES,
    REGIONS,
    SEQUENCES,
    check_label_values,
    get_label_convention,
)

MODEL_ENV = "EMRFUSE_MODEL"
DEFAULT_MODEL = REPO / "outputs" / "emrfuse-demo"
REALDATA = REPO.parent / "shared" / "realdata"
# Privacy and limits: uploads must be NIfTI files of at most MAX_UPLOAD_MB MB each whose header declares
# at most MAX_VOXELS voxels (checked before any voxel is read); they are deleted as soon as the prediction
# has read them; an upload whose request never reaches the prediction (rejected, abandoned, queue full) is
# deleted by Gradio's cache sweep (every 300 s, files older than KEEP_OUTPUTS_S seconds); everything
# (uploads, results, examples) lives in one temporary folder removed when the app stops (normal exit,
# Ctrl-C, SIGTERM). At most QUEUE_MAX_SIZE requests wait in the queue. Error messages name the user's
# file, never a server path. The report text is never logged.
MAX_UPLOAD_MB = float(os.environ.get("EMRFUSE_MAX_UPLOAD_MB", "100"))
# a compressed upload can expand a lot (an all-zero volume ~230x): the grid size is checked from the header
MAX_VOXELS = int(float(os.environ.get("EMRFUSE_MAX_VOXELS", str(32 * 2**20))))  # BraTS: 240 x 240 x 155 = 8.9 M
QUEUE_MAX_SIZE = int(os.environ.get("EMRFUSE_QUEUE_MAX_SIZE", "16"))
KEEP_OUTPUTS_S = float(os.environ.get("EMRFUSE_KEEP_OUTPUTS_S", "600"))
MAX_REPORT_CHARS = int(os.environ.get("EMRFUSE_MAX_REPORT_CHARS", "65536"))  # characters of a report read
MIN_SIDE = 4  # voxels along each axis: the viewer's slider needs a range, the model a few slices
TRUST_ENV = "EMRFUSE_TRUST_REMOTE_CODE"  # "1": run the model folder's own code (auto_map), for a trusted source only
DEMO_SIZE = os.environ.get("EMRFUSE_DEMO_SIZE", "medium")
N_DEMO_CASES = int(os.environ.get("EMRFUSE_DEMO_CASES", "2"))

SEQUENCE_LABELS = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}
GRADE_LABEL = "Grade probabilities"
NO_GRADING_LABEL = "Grade: this model folder has no grading model"
ATTENTION_LABEL = "Report, words shaded by the model's token attention"
NO_TEXT_LABEL = "Report: this model does not read reports (image-only model)"
GT_LABELS_AUTO = "auto"
GT_LABELS_CHOICES = (GT_LABELS_AUTO,) + tuple(sorted(LABEL_CONVENTIONS))
GT_LABELS_CONTROL = "Ground-truth labels"
PLANES = ("axial", "coronal", "sagittal")
OVERLAY_ALPHA = 0.5
DISPLAY_MIN_SIZE = 320
# colour of each label by its role in the convention
ROLE_COLOURS = {
    "edema": (0, 200, 0),  # green
    "core": (230, 30, 30),  # red: necrotic / non-enhancing core
    "enhancing": (255, 215, 0),  # yellow
    "other": (40, 120, 255),  # blue: BraTS 2015 non-enhancing tumour
}

_PIPE_LOCK = threading.Lock()
_PIPE: Dict[str, Any] = {}


# ------------------------------------------------------------------------------------------ model
def model_source() -> str:
    """The model the Space runs: ``$EMRFUSE_MODEL`` or the demo model folder that the README's main job
    leaves. Without a model the page says how to make one (:func:`model_missing_message`); the model is
    loaded with the installed classes, nothing from its folder runs, unless :func:`trust_remote_code`."""
    return os.environ.get(MODEL_ENV) or str(DEFAULT_MODEL)


def model_missing_message() -> Optional[str]:
    """A how-to message when the configured model is a local folder that does not exist, else None."""
    source = model_source()
    if os.environ.get(MODEL_ENV) and not Path(source).exists() and "/" in source and not source.startswith((".", "/")):
        return None  # a Hub id
    if Path(source).exists():
        return None
    return (
        f"No model found at `{source}`. Make the demo model with the README's main job (it trains on demo data "
        f"and leaves `outputs/emrfuse-demo`), e.g. `python train.py --demo`, or set `{MODEL_ENV}` to a model folder "
        "or a Hub id, then restart the app."
    )


def trust_remote_code() -> bool:
    """``$EMRFUSE_TRUST_REMOTE_CODE`` is set to 1 / true / yes: the model folder's own code (its ``auto_map``) runs
    instead of the installed classes. Off by default: nothing from the model folder is executed."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def get_pipeline():
    """The (cached) :class:`EmrFusePipeline` of :func:`model_source`; ``gr.Error`` when there is none."""
    source = (model_source(), trust_remote_code())
    with _PIPE_LOCK:
        if _PIPE.get("source") == source:
            return _PIPE["pipe"]
        missing = model_missing_message()
        if missing:
            raise gr.Error(missing, print_exception=False)
        from modeling_emrfuse.pipeline_emrfuse import load_pipeline

        try:
            pipe = load_pipeline(source[0], trust_remote_code=source[1])
        except Exception as exc:  # an unusable model folder / offline Hub id
            raise gr.Error(public_message(f"Cannot load the model {source[0]}: {exc}"), print_exception=False) from exc
        _PIPE.update(source=source, pipe=pipe)
        return pipe


def reads_reports(pipe) -> bool:
    """Whether any model of the pipeline has a text tower (an image-only model ignores the report)."""
    return any(getattr(m.config, "use_text", True) for m in pipe.models)


# ------------------------------------------------------------------------------------------ examples
_EXAMPLES: Dict[str, Dict[str, Any]] = {}
_EXAMPLES_LOCK = threading.Lock()


def example_cases() -> Dict[str, Dict[str, Any]]:
    """Bundled example cases: ``name -> {"input", "report", "ground_truth", "gt_convention", "note"}``.

    Synthetic demo cases are written on first use (``datasets_scripts.demo_data``, BraTS 2020 layout,
    with their reports and label maps); the real TCGA-DU-7294 case is listed when
    ``../shared/realdata`` is present (its label map is a pseudo-label, and it has no report).
    """
    with _EXAMPLES_LOCK:
        if _EXAMPLES:
            return _EXAMPLES
        try:
            from datasets_scripts.demo_data import write_demo_dataset
        except ImportError:
            write_demo_dataset = None
        if write_demo_dataset is not None:
            root = write_demo_dataset(_OUTPUT_DIR / "examples", n_cases=N_DEMO_CASES, size=DEMO_SIZE, seed=0)
            grades = {}
            mapping = root / "name_mapping.csv"
            if mapping.is_file():
                with open(mapping, newline="", encoding="utf-8") as fh:
                    for row in csv.DictReader(fh):
                        ids = [v for k, v in row.items() if k and "ID" in k and v]
                        if ids and row.get("Grade"):
                            grades[ids[-1]] = row["Grade"]
            for case_dir in sorted(p for p in root.iterdir() if p.is_dir()):
                cid = case_dir.name
                report = next(case_dir.glob("*_text.txt"), None)
                seg = next((p for p in case_dir.glob("*_seg.nii*")), None)
                grade = grades.get(cid)
                name = f"Demo {cid} (synthetic{', ' + grade if grade else ''})"
                _EXAMPLES[name] = {
                    "input": str(case_dir),
                    "report": report.read_text(encoding="utf-8") if report else "",
                    "ground_truth": str(seg) if seg else None,
                    "gt_convention": "brats2017",
                    "note": "Synthetic demo case (not patient data).",
                }
        real = REALDATA / "TCGA-DU-7294"
        if real.is_dir():
            _EXAMPLES["TCGA-DU-7294 (real, lower-grade glioma)"] = {
                "input": str(real),
                "report": "",
                "ground_truth": str(real / "TCGA-DU-7294_seg.nii.gz")
                if (real / "TCGA-DU-7294_seg.nii.gz").is_file()
                else None,
                "gt_convention": "brats2017",
                "note": "Real TCGA-LGG case (CC BY 3.0). Its label map is a fused pseudo-label, not expert ground truth; no report.",
            }
        return _EXAMPLES


def example_report(name: Optional[str]) -> str:
    """The report text that goes with an example (empty when it has none)."""
    return (example_cases().get(name) or {}).get("report", "") if name else ""


def report_for_example(name: Optional[str], *uploads) -> str:
    """The report box when the example changes: the example's own report, or empty while sequences are uploaded
    (the uploads, not the example, are what runs, and another case's report must not go with them)."""
    return "" if any(uploads) else example_report(name)


def clear_report() -> str:
    """The report box after a sequence is uploaded: empty (the report shown belonged to the example)."""
    return ""


# ------------------------------------------------------------------------------------------ uploads
def validate_upload(path: Optional[str], what: str) -> Optional[Path]:
    """Check an uploaded file: NIfTI name, not empty, at most ``MAX_UPLOAD_MB``, NIfTI/gzip magic bytes."""
    if not path:
        return None
    p = Path(path)
    name = p.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise gr.Error(f"{what}: {p.name} is not a NIfTI file (expected .nii or .nii.gz).", print_exception=False)
    if not p.is_file():
        raise gr.Error(
            f"{what}: the upload is gone (uploads are deleted after each prediction); upload it again.",
            print_exception=False,
        )
    size = p.stat().st_size
    if size == 0:
        raise gr.Error(f"{what}: {p.name} is empty.", print_exception=False)
    if size > MAX_UPLOAD_MB * 1024 * 1024:
        raise gr.Error(
            f"{what}: {p.name} is {size / 2**20:.0f} MB; the limit is {MAX_UPLOAD_MB:.0f} MB per file.",
            print_exception=False,
        )
    with open(p, "rb") as fh:
        head = fh.read(348)
    if name.endswith(".gz"):
        ok = head[:2] == b"\x1f\x8b"
    else:
        ok = len(head) >= 4 and (
            int.from_bytes(head[:4], "little") in (348, 540) or int.from_bytes(head[:4], "big") in (348, 540)
        )
    if not ok:
        raise gr.Error(f"{what}: {p.name} does not look like a NIfTI file.", print_exception=False)
    check_grid_size(p, what)
    return p


def check_grid_size(path: Path, what: str) -> None:
    """Refuse a volume whose grid holds more than ``MAX_VOXELS`` voxels, from its NIfTI header alone (no voxel
    data is read or decompressed beyond the header)."""
    import nibabel as nib

    try:
        header = nib.load(str(path)).header  # lazy: reads the header, not the data
        shape = tuple(int(v) for v in header.get_data_shape())
    except Exception:  # an unreadable header: the name only, never a server path
        raise gr.Error(f"{what}: {path.name} has no readable NIfTI header.", print_exception=False) from None
    voxels = math.prod(shape) if shape else 0
    check_min_side(shape[:3], f"{what}: {path.name}")
    if voxels > MAX_VOXELS:
        raise gr.Error(
            f"{what}: {path.name} has a {' x '.join(map(str, shape))} grid ({voxels / 1e6:.1f} million voxels); this Space "
            f"accepts at most {MAX_VOXELS / 1e6:.1f} million voxels per volume (a BraTS volume, 240 x 240 x 155, has 8.9).",
            print_exception=False,
        )


def check_min_side(shape, what: str) -> None:
    """Refuse a volume with fewer than ``MIN_SIDE`` voxels along an axis (e.g. a single slice), which the viewer
    cannot page through."""
    if len(shape) < 3 or min(int(v) for v in shape[:3]) < MIN_SIDE:
        raise gr.Error(
            f"{what} has a {' x '.join(map(str, shape))} grid; this Space needs at least {MIN_SIDE} voxels along each "
            "axis (a BraTS volume is 240 x 240 x 155): upload the whole 3-D volume, not a slice.",
            print_exception=False,
        )


def public_message(text: str) -> str:
    """``text`` with every server path under the app's temporary folders (uploads, results, examples) replaced
    by the file's own name: an error shown on the page names the user's file, never where the server keeps it."""
    from gradio.utils import get_upload_folder

    roots = {str(_OUTPUT_DIR), str(Path(get_upload_folder())), str(Path(tempfile.gettempdir()))}
    for root in sorted(roots, key=len, reverse=True):
        for variant in {root, os.path.realpath(root)}:
            text = re.sub(
                re.escape(variant) + r"""[^\s'"`,;:()\[\]]*""", lambda m: Path(m.group(0)).name or "file", text
            )
    return text


def _is_app_file(path) -> bool:
    """An example case or a result of this app (kept), as opposed to an upload (deleted once read); uploads may live
    under the app's folder too (``GRADIO_TEMP_DIR`` defaults to ``<app folder>/uploads``)."""
    try:
        first = Path(path).resolve().relative_to(_OUTPUT_DIR.resolve()).parts[0]
    except (ValueError, IndexError):
        return False
    return first == "examples" or first.startswith("result-")


def _delete_files(paths) -> None:
    for p in paths:
        if p:
            try:
                os.remove(p)
            except OSError:
                pass


def _sweep_outputs() -> None:
    """Remove result files older than ``KEEP_OUTPUTS_S`` (the examples stay)."""
    now = time.time()
    for p in _OUTPUT_DIR.glob("result-*"):
        try:
            if now - p.stat().st_mtime > KEEP_OUTPUTS_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def ground_truth_convention(gt: np.ndarray, pred_conv: str) -> Tuple[str, str]:
    """``(convention, why)`` of a ground-truth label map, inferred from its label values exactly as
    ``emrfuse score`` infers a reference folder's (:func:`modeling_emrfuse.commands.score.resolve_convention`);
    the prediction's convention settles values that several conventions fit. ``ValueError`` (naming the
    "Ground-truth labels" control) when the values fit no convention, or fit several that read them
    differently and the prediction's convention is not one of them: never a silent guess."""
    from modeling_emrfuse.commands.score import label_values, resolve_convention

    choice = resolve_convention(
        [label_values(gt)], "ground truth", f"a convention under '{GT_LABELS_CONTROL}'", pred_conv, "prediction"
    )
    return choice.used, choice.note


# ------------------------------------------------------------------------------------------ viewer
def _window(volume: np.ndarray) -> np.ndarray:
    """uint8 display volume: 0.5-99.5 percentile window over the brain (non-zero voxels)."""
    v = np.asarray(volume, dtype=np.float32)
    brain = v[v != 0]
    if brain.size == 0:
        return np.zeros(v.shape, dtype=np.uint8)
    lo, hi = np.percentile(brain, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1
    return (np.clip((v - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _take(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    axis = {"sagittal": 0, "coronal": 1, "axial": 2}[plane]
    index = int(np.clip(index, 0, volume.shape[axis] - 1))
    return np.rot90(np.take(volume, index, axis=axis))


def _label_colours(convention: str) -> Dict[int, Tuple[Tuple[int, int, int], str]]:
    conv = get_label_convention(convention)
    out = {}
    for label, name in conv.labels.items():
        role = "other"
        if label == conv.edema_label:
            role = "edema"
        elif label == conv.enhancing_label:
            role = "enhancing"
        elif label == conv.core_label:
            role = "core"
        out[int(label)] = (ROLE_COLOURS[role], name)
    return out


def _overlay(gray: np.ndarray, labels: Optional[np.ndarray], convention: str, show: bool = True) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    if labels is not None and show:
        for label, (colour, _) in _label_colours(convention).items():
            m = labels == label
            if m.any():
                rgb[m] = (1 - OVERLAY_ALPHA) * rgb[m] + OVERLAY_ALPHA * np.asarray(colour, dtype=np.float32)
    rgb = rgb.astype(np.uint8)
    scale = max(1, int(np.ceil(DISPLAY_MIN_SIZE / max(rgb.shape[:2]))))
    if scale > 1:
        rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    return rgb


def legend_html(convention: str, volumes: Optional[Dict[str, float]] = None) -> str:
    """Colour legend of the overlay (label -> colour) with the region volumes."""
    items = []
    for label, (colour, name) in sorted(_label_colours(convention).items()):
        swatch = f"background: rgb{colour}; width: 14px; height: 14px; display: inline-block; margin-right: 6px; border-radius: 3px;"
        items.append(
            f'<span style="margin-right: 16px;"><span style="{swatch}"></span>{html.escape(name)} (label {label})</span>'
        )
    text = f"<div id='emrfuse-legend'><b>Overlay ({html.escape(convention)} labels):</b> " + " ".join(items)
    if volumes:
        vols = ", ".join(f"{REGION_NAMES[r]} ({r}) {volumes[r]:.1f} cm³" for r in REGIONS if r in volumes)
        text += f"<br><b>Predicted volumes:</b> {vols}"
    return text + "</div>"


def view_state(
    case_volumes: Dict[str, np.ndarray],
    pred: np.ndarray,
    pred_conv: str,
    gt: Optional[np.ndarray],
    gt_conv: Optional[str],
) -> Dict[str, Any]:
    """What the viewer needs after a prediction (kept in the session's state only)."""
    images = {s: _window(case_volumes[s]) for s in SEQUENCES}
    tumour = pred > 0
    best = int(np.argmax(tumour.sum(axis=(0, 1)))) if tumour.any() else pred.shape[2] // 2
    return {"images": images, "pred": pred, "pred_conv": pred_conv, "gt": gt, "gt_conv": gt_conv, "best_axial": best}


def render_view(state: Optional[Dict[str, Any]], sequence: str, plane: str, index: float, show_overlay: bool = True):
    """(prediction image, ground-truth image or None) for one slice of the viewer."""
    if not state:
        return None, None
    seq = {v: k for k, v in SEQUENCE_LABELS.items()}.get(sequence, sequence)
    gray = _take(state["images"][seq], plane, int(index))
    pred = _overlay(gray, _take(state["pred"], plane, int(index)), state["pred_conv"], show_overlay)
    gt = None
    if state.get("gt") is not None:
        gt = _overlay(gray, _take(state["gt"], plane, int(index)), state["gt_conv"], show_overlay)
    return pred, gt


def slider_for_plane(state: Optional[Dict[str, Any]], plane: str):
    """Slider range (and a slice through the tumour) for a plane."""
    if not state:
        return gr.update()
    axis = {"sagittal": 0, "coronal": 1, "axial": 2}[plane]
    size = state["pred"].shape[axis]
    tumour = state["pred"] > 0
    if tumour.any():
        other = tuple(a for a in range(3) if a != axis)
        value = int(np.argmax(tumour.sum(axis=other)))
    else:
        value = size // 2
    return gr.update(minimum=0, maximum=size - 1, value=value, step=1)


def change_plane(state, sequence, plane, show_overlay):
    """Plane changed: new slider range and images."""
    slider = slider_for_plane(state, plane)
    index = slider.get("value", 0) if isinstance(slider, dict) else 0
    pred, gt = render_view(state, sequence, plane, index, show_overlay)
    return slider, pred, gt


# ------------------------------------------------------------------------------------------ outputs
def highlight_report(report: str, words: Optional[List[Dict[str, Any]]]) -> List[Tuple[str, Optional[float]]]:
    """The full report as (text, weight) pieces for gr.HighlightedText: each word's token attention,
    scaled so that the most attended word is 1, and the text between words unhighlighted."""
    if not report:
        return []
    if not words:
        return [(report, None)]
    top = max((w["weight"] for w in words), default=0.0) or 1.0
    pieces: List[Tuple[str, Optional[float]]] = []
    pos = 0
    for w in words:
        if w["start"] > pos:
            pieces.append((report[pos : w["start"]], None))
        pieces.append((report[w["start"] : w["end"]], round(float(w["weight"]) / top, 3)))
        pos = w["end"]
    if pos < len(report):
        pieces.append((report[pos:], None))
    return pieces


def metrics_table(pred: np.ndarray, pred_conv: str, gt: np.ndarray, gt_conv: str, spacing) -> List[List[Any]]:
    """Rows (region, Dice, PPV, sensitivity, HD95 mm) of the prediction against the ground truth."""
    from modeling_emrfuse.evaluation.metrics import score_label_maps

    scores = score_label_maps(pred, gt, pred_conv, gt_conv, spacing=spacing)
    return [
        [
            f"{REGION_NAMES[r]} ({r})",
            round(s["dice"], 4),
            round(s["ppv"], 4),
            round(s["sensitivity"], 4),
            round(s["hd95"], 2),
        ]
        for r, s in scores.items()
    ]


def _write_label_map(result: Dict[str, Any], case_id: str) -> str:
    folder = Path(tempfile.mkdtemp(prefix="result-", dir=_OUTPUT_DIR))
    path = folder / f"{case_id}_emrfuse_labels.nii.gz"
    write_label_map(path, result["label_map"], result["affine"], result["header"])
    return str(path)


def _case_source(uploads, given, example, report, allow_missing: bool) -> Dict[str, Any]:
    """What runs: the uploaded sequences, or else the example; ``gr.Error`` for an incomplete upload, an unknown
    example, or an example's report left in the box for uploaded sequences (another case's report)."""
    if any(given):
        if not all(given) and not allow_missing:
            missing = [SEQUENCE_LABELS[s] for s, g in zip(SEQUENCES, given) if not g]
            raise gr.Error(
                f"Upload all four sequences (missing: {', '.join(missing)}), or clear them to use an example.",
                print_exception=False,
            )
        if report and example and report.strip() == example_report(example).strip():
            raise gr.Error(
                f"The report box holds the report of the example {example!r}, not of the uploaded case: "
                "clear it, or paste the uploaded case's own report.",
                print_exception=False,
            )
        case_input = {s: str(validate_upload(u, SEQUENCE_LABELS[s])) for s, u, g in zip(SEQUENCES, uploads, given) if g}
        return {
            "input": case_input,
            "case_id": case_id_from_file_names(case_input.values()),
            "example": None,
            "gt_path": None,
            "gt_conv": None,
            "note": "",
        }
    if not example:
        raise gr.Error(
            "Upload the four sequences (T1, T1ce, T2, FLAIR) or pick an example case.", print_exception=False
        )
    spec = example_cases().get(example)
    if spec is None:
        raise gr.Error(f"Unknown example {example!r}.", print_exception=False)
    return {
        "input": spec["input"],
        "case_id": Path(spec["input"]).name,
        "example": example,
        "gt_path": spec.get("ground_truth"),
        "gt_conv": spec.get("gt_convention"),
        "note": spec.get("note", ""),
    }


def _read_case(source: Dict[str, Any], allow_missing: bool):
    """``(case, its geometry warnings, ground truth or None, seconds)``: the case read once, for the model and the
    viewer; ``gr.Error`` naming the user's file for an unreadable one or a volume too thin to view."""
    from modeling_emrfuse.pipeline_emrfuse import load_case_with_warnings

    t_read = time.perf_counter()
    try:
        case, geometry = load_case_with_warnings(source["input"], None, "auto", allow_missing)
        read_s = time.perf_counter() - t_read
        gt = read_label_map(source["gt_path"]).array if source["gt_path"] else None
    except (ValueError, OSError) as exc:
        raise gr.Error(public_message(f"Cannot read this case: {exc}"), print_exception=False) from exc
    check_min_side(case.shape, f"The case {source['case_id']}")
    return case, geometry, gt, read_s


def _ground_truth_convention(gt, source: Dict[str, Any], result: Dict[str, Any], gt_labels: str) -> Tuple[str, str]:
    """``(convention, why)`` of the ground truth shown beside the prediction; ``gr.Error`` when it cannot be used."""
    if gt.shape != result["label_map"].shape:
        raise gr.Error(
            f"Ground truth shape {gt.shape} differs from the case's {result['label_map'].shape}.", print_exception=False
        )
    try:
        if gt_labels and gt_labels != GT_LABELS_AUTO:
            gt_conv, gt_note = get_label_convention(gt_labels).name, f"as chosen under {GT_LABELS_CONTROL}"
        elif source["gt_conv"]:
            gt_conv, gt_note = source["gt_conv"], "as given with the example"
        else:
            gt_conv, gt_note = ground_truth_convention(gt, result["label_convention"])
        check_label_values(gt, gt_conv, where="ground truth")
    except ValueError as exc:
        raise gr.Error(public_message(f"Cannot compare with the ground truth: {exc}"), print_exception=False) from exc
    return gt_conv, gt_note


def report_status(result: Dict[str, Any], source: Dict[str, Any], report: str, reads: bool) -> str:
    """The status line that names whose report the prediction read, and how much of it (never its text)."""
    if not reads:
        return "Report: this model does not read reports (image-only model); the report box was not used."
    if not result["has_report"]:
        return f"Report: none for `{source['case_id']}` (image-only prediction)."
    if source["example"] and report.strip() == example_report(source["example"]).strip():
        whose = f"the example's own report ({len(report)} characters)"
    else:
        whose = f"the text in the report box ({len(report)} characters), for `{source['case_id']}`"
    if result.get("report_capped"):
        how = f"only its first {MAX_REPORT_CHARS} characters were read"
    elif result["report_truncated"]:
        how = "truncated to the model maximum"
    else:
        how = "used in full"
    return f"Report: {whose}; {how}."


def _status(result, source, report: str, reads: bool, read_s: float, warnings_: List[str], gt_conv, gt_note) -> str:
    t = result["timings"]
    status = [
        f"**Prediction done** for `{source['case_id']}` with `{result['model_id']}` (revision `{result['revision']}`).",
        report_status(result, source, report, reads),
        f"Time: read {read_s:.2f} s, preprocess {t['preprocess']:.2f} s, model {t['model']:.2f} s, post-process {t['postprocess']:.2f} s.",
    ]
    if result["grade_probabilities"] is None:
        status.append("Grade: this model folder has no grading model (segmentation only).")
    missing_seqs = result.get("missing_sequences") or []
    if missing_seqs:
        status.append(
            f"Missing sequences (zero-filled, shown black in the viewer): "
            f"{', '.join(SEQUENCE_LABELS[s] for s in missing_seqs)}."
        )
    for warning in list(dict.fromkeys(list(warnings_) + list(result.get("warnings") or []))):
        status.append(f"⚠️ {public_message(warning)}")
    if source["note"]:
        status.append(source["note"])
    if gt_conv is not None:
        status.append(f"Ground truth shown on the right ({gt_conv} labels: {gt_note}).")
    return "\n\n".join(status)


def predict(
    t1,
    t1ce,
    t2,
    flair,
    example,
    report,
    ground_truth,
    sequence="FLAIR",
    plane="axial",
    allow_missing=False,
    gt_labels=GT_LABELS_AUTO,
):
    """Run the model on the uploaded sequences (or the chosen example) and fill every output.

    ``allow_missing`` (the "Allow missing sequences" checkbox): any non-empty subset of the four
    uploads is accepted, the missing sequences are zero-filled, and the status says which were missing.
    ``gt_labels`` (the "Ground-truth labels" control): the ground truth's label convention, or
    ``"auto"``: the example's own, else inferred as ``emrfuse score`` does (:func:`ground_truth_convention`);
    the status says which convention is used and why. The status names whose report was read; a report in
    the box that is the example's, sent with uploaded sequences, is refused (it belongs to another case).
    """
    allow_missing = bool(allow_missing)
    report = (report or "")[: MAX_REPORT_CHARS + 1]  # the pipeline reads no more than MAX_REPORT_CHARS of it
    uploads = [t1, t1ce, t2, flair]
    uploaded_paths = [u for u in uploads + [ground_truth] if u]
    gt_conv = gt_note = None
    try:
        _sweep_outputs()
        source = _case_source(uploads, [u is not None and u != "" for u in uploads], example, report, allow_missing)
        if ground_truth:
            source["gt_path"], source["gt_conv"] = str(validate_upload(ground_truth, "Ground truth")), None
        pipe = get_pipeline()
        try:
            case, geometry, gt, read_s = _read_case(source, allow_missing)
        finally:  # the uploads have been read: delete them now
            _delete_files([p for p in uploaded_paths if p and not _is_app_file(p)])
        try:
            result = pipe(
                case,
                report=report or None,
                use_case_report=False,
                allow_missing_sequences=allow_missing,
                max_report_chars=MAX_REPORT_CHARS,
            )
        except ValueError as exc:
            raise gr.Error(public_message(f"Cannot run this case: {exc}"), print_exception=False) from exc
        if result["label_map"] is None:
            raise gr.Error("This model folder holds no segmentation model.", print_exception=False)
        if gt is not None:
            gt_conv, gt_note = _ground_truth_convention(gt, source, result, gt_labels)
    finally:
        _delete_files([p for p in uploaded_paths if p and not str(p).startswith(str(_OUTPUT_DIR))])
    reads = reads_reports(pipe)
    status = _status(result, source, report, reads, read_s, geometry, gt_conv, gt_note)
    return _outputs(case, result, gt, gt_conv, sequence, plane, report, reads, source["case_id"], status)


def _outputs(case, result, gt, gt_conv, sequence, plane, report, reads, case_id, status) -> List[Any]:
    """The values of every output component after a prediction (in the order of ``run.click``'s outputs)."""
    pred_conv = result["label_convention"]
    state = view_state(case.volumes, result["label_map"], pred_conv, gt, gt_conv)
    pred_img, gt_img = render_view(state, sequence, plane, state["best_axial"] if plane == "axial" else 0)
    slider = slider_for_plane(state, plane)
    if plane != "axial":
        pred_img, gt_img = render_view(state, sequence, plane, slider["value"])
    grade = result["grade_probabilities"]  # the plain value (API clients read it), or a short note without grading
    if grade is None:
        grade = gr.update(value=None, label=NO_GRADING_LABEL)
    alphas = {}
    if result.get("alpha_text") is not None:
        alphas["text (alpha_text)"] = float(result["alpha_text"])
    if result.get("alpha_image") is not None:
        alphas["image (alpha_image)"] = float(result["alpha_image"])
    if not alphas:
        alphas = {"dynamic weighting is off in this model": 1.0}
    highlighted = highlight_report(report, result.get("words"))
    if not reads:
        highlighted = gr.update(value=[], label=NO_TEXT_LABEL)
    volumes = [[f"{REGION_NAMES[r]} ({r})", round(v, 2)] for r, v in (result["region_volumes_cm3"] or {}).items()]
    metrics = metrics_table(result["label_map"], pred_conv, gt, gt_conv, result["spacing"]) if gt is not None else []
    clear = [gr.update(value=None)] * 5  # uploads were deleted
    return [
        state,
        pred_img,
        gr.update(value=gt_img, visible=gt is not None),
        slider,
        legend_html(pred_conv, result["region_volumes_cm3"]),
        grade,
        alphas,
        highlighted,
        volumes,
        gr.update(value=metrics, visible=gt is not None),
        _write_label_map(result, case_id),
        status,
        *clear,
    ]


# ------------------------------------------------------------------------------------------ page
DESCRIPTION = """# EmrFuse: brain MRI + radiology report
Upload the four MRI sequences of a case (T1, T1ce, T2, FLAIR; NIfTI, skull-stripped and co-registered at 1 mm as in
BraTS; with *Allow missing sequences* ticked, any of them) or pick an example, add the radiology report if there is one,
and run. The model segments the tumour sub-regions (whole tumour, tumour core, enhancing tumour) and grades the glioma
(HGG vs LGG).

**Research demo, not a medical device.** Uploads are deleted after each prediction; nothing is logged or kept."""


def build_demo() -> gr.Blocks:
    """Build the Blocks app (not launched)."""
    examples = example_cases()
    names = list(examples)
    first = names[0] if names else None
    missing = model_missing_message()
    with gr.Blocks(title="EmrFuse", analytics_enabled=False, delete_cache=(300, int(KEEP_OUTPUTS_S))) as demo:
        gr.Markdown(DESCRIPTION)
        gr.Markdown(f"⚠️ {missing}" if missing else f"Model: `{model_source()}`", elem_id="emrfuse-model-status")
        state = gr.State(time_to_live=int(KEEP_OUTPUTS_S))
        with gr.Row():
            inputs = _build_inputs_panel(names, first)
            outputs = _build_outputs_panel()
        _wire_events(state, inputs, outputs)
    # one prediction at a time; at most QUEUE_MAX_SIZE requests wait: the next one gets Gradio's "Queue is full" error
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_MAX_SIZE)
    return demo


def _build_inputs_panel(names: list, first) -> dict:
    """The left column: the four sequence uploads, the example picker, the report box, the ground-truth
    controls, the Run button and the status line (call inside the Blocks' row); returns the components by name."""
    with gr.Column(scale=1):
        with gr.Row():
            f_t1 = gr.File(label="T1", file_types=[".nii", ".gz"], type="filepath")
            f_t1ce = gr.File(label="T1ce", file_types=[".nii", ".gz"], type="filepath")
        with gr.Row():
            f_t2 = gr.File(label="T2", file_types=[".nii", ".gz"], type="filepath")
            f_flair = gr.File(label="FLAIR", file_types=[".nii", ".gz"], type="filepath")
        example = gr.Dropdown(choices=names, value=first, label="…or an example case (used when no upload is given)")
        report = gr.Textbox(
            label="Radiology report (optional)",
            lines=6,
            value=example_report(first),
            max_length=MAX_REPORT_CHARS,
            elem_id="emrfuse-report",
            placeholder="Paste the report here; leave empty for an image-only prediction. "
            "Uploading a sequence clears it.",
        )
        allow_missing = gr.Checkbox(
            value=False,
            label="Allow missing sequences",
            elem_id="emrfuse-allow-missing",
            info="Run with any of the four sequences; the missing ones are zero-filled (best with a model "
            "trained with sequence dropout, which knows which sequences are missing).",
        )
        gt_file = gr.File(label="Ground-truth label map (optional, NIfTI)", file_types=[".nii", ".gz"], type="filepath")
        gt_labels = gr.Dropdown(
            choices=list(GT_LABELS_CHOICES),
            value=GT_LABELS_AUTO,
            label=GT_LABELS_CONTROL,
            elem_id="emrfuse-gt-labels",
            info="The ground truth's label convention; auto: inferred from its label values as `emrfuse score` "
            "does (the status says which and why).",
        )
        run = gr.Button("Run", variant="primary", elem_id="emrfuse-run")
        status = gr.Markdown(elem_id="emrfuse-status")
    return {
        "f_t1": f_t1,
        "f_t1ce": f_t1ce,
        "f_t2": f_t2,
        "f_flair": f_flair,
        "example": example,
        "report": report,
        "allow_missing": allow_missing,
        "gt_file": gt_file,
        "gt_labels": gt_labels,
        "run": run,
        "status": status,
    }


def _build_outputs_panel() -> dict:
    """The right column: the slice viewer and its controls, the grade, the modality contributions, the report
    attention, the volumes, the metrics and the download (call inside the Blocks' row); returns the components
    by name."""
    with gr.Column(scale=2):
        with gr.Row():
            sequence = gr.Radio([SEQUENCE_LABELS[s] for s in SEQUENCES], value="FLAIR", label="Sequence")
            plane = gr.Radio(list(PLANES), value="axial", label="Plane")
            show = gr.Checkbox(value=True, label="Show overlay")
        index = gr.Slider(0, 154, value=77, step=1, label="Slice", elem_id="emrfuse-slice")
        with gr.Row():
            pred_img = gr.Image(
                label="Prediction", type="numpy", format="png", elem_id="emrfuse-pred-view", interactive=False
            )
            gt_img = gr.Image(
                label="Ground truth",
                type="numpy",
                format="png",
                visible=False,
                elem_id="emrfuse-gt-view",
                interactive=False,
            )
        legend = gr.HTML(elem_id="emrfuse-legend-box")
        with gr.Row():
            grade = gr.Label(label=GRADE_LABEL, num_top_classes=2, elem_id="emrfuse-grade")
            alphas = gr.Label(label="Modality contribution (alpha_text vs alpha_image)", elem_id="emrfuse-alpha")
        highlighted = gr.HighlightedText(label=ATTENTION_LABEL, elem_id="emrfuse-report-attention", show_legend=False)
        with gr.Row():
            volumes = gr.Dataframe(
                headers=["Region", "Volume (cm³)"],
                label="Region volumes",
                elem_id="emrfuse-volumes",
                interactive=False,
            )
            metrics = gr.Dataframe(
                headers=["Region", "Dice", "PPV", "Sensitivity", "HD95 (mm)"],
                label="Metrics against the ground truth",
                visible=False,
                elem_id="emrfuse-metrics",
                interactive=False,
            )
        download = gr.File(label="Predicted label map (NIfTI)", elem_id="emrfuse-download", interactive=False)
    return {
        "sequence": sequence,
        "plane": plane,
        "show": show,
        "index": index,
        "pred_img": pred_img,
        "gt_img": gt_img,
        "legend": legend,
        "grade": grade,
        "alphas": alphas,
        "highlighted": highlighted,
        "volumes": volumes,
        "metrics": metrics,
        "download": download,
    }


def _wire_events(state, inputs: dict, outputs: dict) -> None:
    """Connect the panels: the report box to the uploads and the example, Run to :func:`predict`, the viewer
    controls to the slice views."""
    f_t1, f_t1ce, f_t2, f_flair = inputs["f_t1"], inputs["f_t1ce"], inputs["f_t2"], inputs["f_flair"]
    example, report, gt_file = inputs["example"], inputs["report"], inputs["gt_file"]
    allow_missing, gt_labels, run, status = (
        inputs["allow_missing"],
        inputs["gt_labels"],
        inputs["run"],
        inputs["status"],
    )
    sequence, plane, show, index = outputs["sequence"], outputs["plane"], outputs["show"], outputs["index"]
    pred_img, gt_img, legend, grade = outputs["pred_img"], outputs["gt_img"], outputs["legend"], outputs["grade"]
    alphas, highlighted, volumes = outputs["alphas"], outputs["highlighted"], outputs["volumes"]
    metrics, download = outputs["metrics"], outputs["download"]
    _wire_report_box([f_t1, f_t1ce, f_t2, f_flair], example, report)
    run.click(
        predict,
        inputs=[f_t1, f_t1ce, f_t2, f_flair, example, report, gt_file, sequence, plane, allow_missing, gt_labels],
        outputs=[
            state,
            pred_img,
            gt_img,
            index,
            legend,
            grade,
            alphas,
            highlighted,
            volumes,
            metrics,
            download,
            status,
            f_t1,
            f_t1ce,
            f_t2,
            f_flair,
            gt_file,
        ],
        api_name="predict",
        concurrency_limit=1,
    )
    _wire_viewer(state, sequence, plane, index, show, pred_img, gt_img)


def _wire_report_box(uploads, example, report) -> None:
    """The report box holds one case's report: uploading a sequence empties it, an example fills in its own
    (nothing while sequences are uploaded)."""
    for upload in uploads:
        upload.upload(clear_report, outputs=report, api_name=False)
    example.change(report_for_example, inputs=[example, *uploads], outputs=report, api_name=False)


def _wire_viewer(state, sequence, plane, index, show, pred_img, gt_img) -> None:
    """The viewer's controls: sequence, overlay, slider and plane re-render the images."""
    view_inputs = [state, sequence, plane, index, show]
    for control in (sequence, show):
        control.change(render_view, inputs=view_inputs, outputs=[pred_img, gt_img], api_name=False)
    # the user's slider moves only: the value a prediction or a plane change sets comes with its images. Rendering
    # them again would rewrite the same cached image files (Gradio names them by content) while the browser is
    # still fetching them, and the browser would get a truncated image.
    index.input(render_view, inputs=view_inputs, outputs=[pred_img, gt_img], api_name=False, trigger_mode="always_last")
    plane.change(change_plane, inputs=[state, sequence, plane, show], outputs=[index, pred_img, gt_img], api_name=False)


def remove_temporary_files() -> None:
    """Delete the app's temporary folder (examples, results and, by default, uploads)."""
    shutil.rmtree(_OUTPUT_DIR, ignore_errors=True)


def _stop_on_sigterm(signum, frame) -> None:
    # Gradio's launch() ends on KeyboardInterrupt: the server closes, then the temporary folder goes
    raise KeyboardInterrupt


def main() -> None:
    """Launch the app (``python space/app.py``); host/port from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT."""
    from modeling_emrfuse.runtime.cpu_threads import limit_torch_threads

    limit_torch_threads()
    signal.signal(signal.SIGTERM, _stop_on_sigterm)  # a Space or a container stops the app with SIGTERM
    try:
        build_demo().launch(max_file_size=f"{int(MAX_UPLOAD_MB)}mb", show_error=True)
    finally:
        remove_temporary_files()


if __name__ == "__main__":
    main()
