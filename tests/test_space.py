"""The Gradio Space (space/app.py): its functions, the running app through gradio_client, the Space
card, and a real headless Chromium that runs an example and checks what the page shows."""

from __future__ import annotations

import importlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tiny_emrfuse import build_tiny_model_folder, write_small_case

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "space"
REPORT = "Ring enhancing mass in the right temporal lobe with central necrosis and surrounding oedema."


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """space/app.py imported with a tiny model (EMRFUSE_MODEL) and small demo examples."""
    model = build_tiny_model_folder(tmp_path_factory.mktemp("space") / "model")
    saved = {k: os.environ.get(k) for k in ("EMRFUSE_MODEL", "EMRFUSE_DEMO_SIZE", "EMRFUSE_DEMO_CASES")}
    os.environ.update(EMRFUSE_MODEL=str(model), EMRFUSE_DEMO_SIZE="small", EMRFUSE_DEMO_CASES="2")
    sys.path.insert(0, str(SPACE))
    module = importlib.import_module("app")
    module = importlib.reload(module)  # module-level settings read the environment above
    yield module
    sys.path.remove(str(SPACE))
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _demo_example(app):
    return next(name for name in app.example_cases() if name.startswith("Demo"))


# ------------------------------------------------------------------------------------------ card
def test_space_card_parses():
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(SPACE / "README.md")
    data = card.data
    assert data.sdk == "gradio" and data.app_file == "app.py" and (SPACE / data.app_file).is_file()
    assert str(data.sdk_version).split(".")[0] == "6"
    assert str(data.python_version).startswith("3.")
    assert data.license == "apache-2.0" and data.models and all("/" in m for m in data.models)
    requirements = (SPACE / "requirements.txt").read_text()
    for package in ("torch", "transformers", "timm", "nibabel", "numpy"):
        assert package in requirements


# ------------------------------------------------------------------------------------------ functions
def test_predict_on_an_example(app):
    name = _demo_example(app)
    report = app.example_report(name)
    assert report  # the demo case's own report is offered in the report box
    out = app.predict(None, None, None, None, name, report, None)
    (state, pred_img, gt_img, slider, legend, grade, alphas, highlighted, volumes, metrics, download, status, *cleared) = out
    spec = app.example_cases()[name]
    shape = nib.load(str(next(Path(spec["input"]).glob("*_flair.nii.gz")))).shape
    assert state["pred"].shape == shape and pred_img.ndim == 3 and pred_img.shape[-1] == 3
    assert gt_img["visible"] and gt_img["value"].shape == pred_img.shape  # demo ground truth side by side
    assert 0 <= slider["value"] <= slider["maximum"] == shape[2] - 1
    assert "emrfuse-legend" in legend and "enhancing tumour" in legend and "cm³" in legend
    assert set(grade) == {"HGG", "LGG"} and abs(sum(grade.values()) - 1) < 1e-5
    assert set(alphas) == {"text (alpha_text)", "image (alpha_image)"}
    assert "".join(piece for piece, _ in highlighted) == report
    assert any(w is not None and w > 0 for _, w in highlighted)
    assert [row[0] for row in volumes] == ["whole tumour (WT)", "tumour core (TC)", "enhancing tumour (ET)"]
    assert metrics["visible"] and len(metrics["value"]) == 3 and all(0 <= row[1] <= 1 for row in metrics["value"])
    assert nib.load(download).shape == shape and np.allclose(nib.load(download).affine, nib.load(str(next(Path(spec["input"]).glob("*_t1.nii.gz")))).affine)
    assert "Prediction done" in status and report not in status
    assert all(c == {"__type__": "update", "value": None} for c in cleared)


def test_viewer_planes_and_sequences(app):
    name = _demo_example(app)
    state = app.predict(None, None, None, None, name, "", None)[0]
    x, y, z = state["pred"].shape
    for plane, size in (("axial", z), ("coronal", y), ("sagittal", x)):
        slider, pred, gt = app.change_plane(state, "T1ce", plane, True)
        assert slider["maximum"] == size - 1 and pred.ndim == 3 and gt is not None
    plain, _ = app.render_view(state, "T2", "axial", state["best_axial"], False)
    overlay, _ = app.render_view(state, "T2", "axial", state["best_axial"], True)
    assert plain.shape == overlay.shape
    if state["pred"][:, :, state["best_axial"]].any():
        assert not np.array_equal(plain, overlay)


def test_predict_on_uploads_deletes_them(app, tmp_path):
    case = write_small_case(tmp_path / "src", shape=(32, 32, 16))
    uploads = {}
    for seq in ("t1", "t1ce", "t2", "flair"):
        target = tmp_path / "uploads" / seq / f"Case_001_{seq}.nii.gz"
        target.parent.mkdir(parents=True)
        shutil.copy(case / f"Case_001_{seq}.nii.gz", target)
        uploads[seq] = str(target)
    gt = tmp_path / "uploads" / "gt" / "gt.nii.gz"
    gt.parent.mkdir()
    ref = nib.load(uploads["t1"])
    nib.save(nib.Nifti1Image(np.zeros(ref.shape, np.uint8), ref.affine), str(gt))
    out = app.predict(uploads["t1"], uploads["t1ce"], uploads["t2"], uploads["flair"], None, REPORT, str(gt))
    assert out[0]["pred"].shape == (32, 32, 16) and out[9]["visible"]
    assert "Case_001" in out[11]
    assert not any(Path(p).exists() for p in list(uploads.values()) + [str(gt)])  # uploads deleted after reading


def _gt_with_labels(values, shape=(4, 4, 4)):
    gt = np.zeros(shape, np.uint8)
    gt.flat[: len(values)] = values
    return gt


def test_ground_truth_convention_is_resolved_as_emrfuse_score_does(app):
    """Unambiguous label values pin the convention; ambiguous ones are settled by the prediction's convention
    when it is one of the candidates (saying why), and are an error naming the control otherwise."""
    assert app.ground_truth_convention(_gt_with_labels([1, 2, 3, 4]), "brats2017") == (
        "brats2015", "inferred from the ground truth label values {0, 1, 2, 3, 4}")
    conv, why = app.ground_truth_convention(_gt_with_labels([1, 2, 3]), "brats2023")  # 2023 ET or 2015 NET?
    assert conv == "brats2023" and "brats2015" in why and "read these labels differently" in why
    conv, why = app.ground_truth_convention(_gt_with_labels([1, 2, 4]), "brats2015")  # 2017 and 2015 agree here
    assert conv == "brats2015" and "same regions" in why
    with pytest.raises(ValueError, match="ambiguous.*Ground-truth labels"):
        app.ground_truth_convention(_gt_with_labels([1, 2, 3]), "brats2017")


def test_predict_says_which_ground_truth_convention_and_why(app, tmp_path):
    import gradio as gr

    case = write_small_case(tmp_path / "src", shape=(32, 32, 16))
    ref = nib.load(str(case / "Case_001_t1.nii.gz"))

    def uploads(gt_values):
        files = []
        for seq in ("t1", "t1ce", "t2", "flair"):
            target = tmp_path / "uploads" / seq / f"Case_001_{seq}.nii.gz"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(case / f"Case_001_{seq}.nii.gz", target)
            files.append(str(target))
        gt = tmp_path / "uploads" / "gt" / "gt.nii.gz"
        gt.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(_gt_with_labels(gt_values, ref.shape), ref.affine), str(gt))
        return files + [None, REPORT, str(gt)]

    status = app.predict(*uploads([1, 2, 3, 4]))[11]  # unambiguous: BraTS 2015 labels
    assert "Ground truth shown on the right (brats2015 labels: inferred from the ground truth label values" in status
    # labels {1, 2, 3}: BraTS 2023 or 2015, and the prediction (Case_001_t1 ... names: brats2017) does not settle it
    with pytest.raises(gr.Error, match="ambiguous.*Ground-truth labels"):
        app.predict(*uploads([1, 2, 3]))
    status = app.predict(*uploads([1, 2, 3]), "FLAIR", "axial", False, "brats2023")[11]
    assert "Ground truth shown on the right (brats2023 labels: as chosen under Ground-truth labels)" in status


@pytest.mark.parametrize("problem", ["extension", "empty", "too_big", "magic", "partial", "nothing"])
def test_upload_checks(app, tmp_path, monkeypatch, problem):
    import gradio as gr

    case = write_small_case(tmp_path / "src", shape=(16, 16, 8))
    files = [str(case / f"Case_001_{s}.nii.gz") for s in ("t1", "t1ce", "t2", "flair")]
    expected = {"extension": "not a NIfTI", "empty": "is empty", "too_big": "limit", "magic": "does not look like",
                "partial": "missing: FLAIR", "nothing": "pick an example"}[problem]
    example = None
    if problem == "extension":
        files[0] = str(tmp_path / "t1.png")
        Path(files[0]).write_bytes(b"\x89PNG....")
    elif problem == "empty":
        Path(files[1]).write_bytes(b"")
    elif problem == "too_big":
        monkeypatch.setattr(app, "MAX_UPLOAD_MB", 0.0001)
    elif problem == "magic":
        Path(files[2]).write_bytes(b"definitely not gzip")
    elif problem == "partial":
        files[3] = None
    elif problem == "nothing":
        files = [None] * 4
    with pytest.raises(gr.Error, match=expected):
        app.predict(*files, example, REPORT, None)


def test_predict_two_uploads_with_allow_missing_sequences(app, tmp_path):
    import gradio as gr

    case = write_small_case(tmp_path / "src", shape=(32, 32, 16))

    def uploads():
        out = {}
        for seq in ("t1ce", "flair"):
            target = tmp_path / "uploads" / seq / f"Case_001_{seq}.nii.gz"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(case / f"Case_001_{seq}.nii.gz", target)
            out[seq] = str(target)
        return out

    files = uploads()
    with pytest.raises(gr.Error, match="missing: T1, T2"):  # checkbox off: all four sequences are needed
        app.predict(None, files["t1ce"], None, files["flair"], None, REPORT, None, "FLAIR", "axial", False)
    files = uploads()
    out = app.predict(None, files["t1ce"], None, files["flair"], None, REPORT, None, "FLAIR", "axial", True)
    state, status = out[0], out[11]
    assert state["pred"].shape == (32, 32, 16) and out[1].ndim == 3
    assert not state["images"]["t1"].any() and state["images"]["flair"].any()  # zero-filled T1 shows black
    assert "Prediction done" in status and "Case_001" in status and REPORT not in status
    assert "Missing sequences (zero-filled, shown black in the viewer): T1, T2." in status
    assert "not trained to know which sequences are missing" in status  # the tiny model has no presence channels
    assert not any(Path(p).exists() for p in files.values())  # uploads deleted after reading


def test_missing_model_says_how_to_make_one(app, monkeypatch, tmp_path):
    import gradio as gr

    monkeypatch.setenv("EMRFUSE_MODEL", str(tmp_path / "no-model-here"))
    assert "README's main job" in app.model_missing_message()
    with pytest.raises(gr.Error, match="README's main job"):
        app.get_pipeline()


# ------------------------------------------------------------------------------------------ running app
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def running_app(app):
    demo = app.build_demo()
    port = _free_port()
    demo.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                                                   quiet=True, ssr_mode=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_gradio_client_predicts_an_example(app, running_app):
    from gradio_client import Client

    client = Client(running_app, verbose=False)
    name = _demo_example(app)
    result = client.predict(None, None, None, None, name, app.example_report(name), None, "FLAIR", "axial", api_name="/predict")
    spec = app.example_cases()[name]
    shape = nib.load(str(next(Path(spec["input"]).glob("*_flair.nii.gz")))).shape
    files = [r for r in result if isinstance(r, str) and r.endswith(".nii.gz")]
    assert files, result
    assert nib.load(files[0]).shape == shape
    grade = next(r for r in result if isinstance(r, dict) and r.get("label") in ("HGG", "LGG"))
    assert {c["label"] for c in grade["confidences"]} == {"HGG", "LGG"}


def test_gradio_client_uploads_are_deleted_after_the_request(app, running_app, tmp_path):
    import uuid

    from gradio.utils import get_upload_folder
    from gradio_client import Client, handle_file

    case_id = f"Upl{uuid.uuid4().hex[:10]}"
    case = write_small_case(tmp_path, shape=(32, 32, 16), case_id=case_id)
    files = [handle_file(str(case / f"{case_id}_{s}.nii.gz")) for s in ("t1", "t1ce", "t2", "flair")]
    client = Client(running_app, verbose=False)
    result = client.predict(*files, None, REPORT, None, "T2", "coronal", api_name="/predict")
    label_map = next(r for r in result if isinstance(r, str) and r.endswith(".nii.gz"))
    assert nib.load(label_map).shape == (32, 32, 16) and Path(label_map).name.startswith(case_id)
    left = [str(p) for s in ("t1", "t1ce", "t2", "flair") for p in Path(get_upload_folder()).rglob(f"{case_id}_{s}.nii.gz")]
    assert left == [], f"uploads still on the server: {left}"


# ------------------------------------------------------------------------------------------ browser
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
    "--remote-debugging-pipe", "--window-size=1400,1800",
]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DevToolsPipe:
    """Minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out)."""

    def __init__(self, chromium: str, user_data_dir: Path):
        cmd = ["bash", "-c", 'exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null', chromium, *CHROMIUM_FLAGS,
               f"--user-data-dir={user_data_dir}", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._buf = b""
        self._id = 0
        self.session = None

    def _read_message(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from Chromium")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, timeout: float = 60, session: bool = True) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        self.proc.stdin.write(json.dumps(msg).encode() + b"\0")
        self.proc.stdin.flush()
        while True:
            reply = self._read_message(timeout)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", {"width": 1400, "height": 1800, "deviceScaleFactor": 1, "mobile": False})
        self.call("Page.enable")
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(f"the page never showed {what} within {timeout} s")

    def screenshot(self, path: Path) -> None:
        import base64

        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, timeout=120)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False, timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _overlay_pixels(png: Path) -> dict:
    """Counts of the overlay colours (green oedema, red core, yellow enhancing) in a screenshot."""
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # blended with grey: a colour channel far above the others
    return {
        "green": int(((g - r > 40) & (g - b > 40)).sum()),
        "red": int(((r - g > 60) & (r - b > 60)).sum()),
        "yellow": int(((r - b > 60) & (g - b > 60) & (abs(r - g) < 60)).sum()),
    }


def test_browser_runs_an_example_and_shows_the_overlay(app, running_app, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no headless Chromium here (Debian: apt-get install -y chromium)")
    browser = DevToolsPipe(chromium, tmp_path / "chromium-profile")
    try:
        browser.open(running_app)
        browser.wait_for("!!document.querySelector('#emrfuse-run')", 90, "the Run button")
        browser.evaluate(
            "(() => { const b = document.querySelector('#emrfuse-run');"
            " (b.tagName === 'BUTTON' ? b : b.querySelector('button')).click(); return true; })()"
        )
        browser.wait_for("document.body.innerText.includes('Prediction done')", 180, "a finished prediction")
        browser.wait_for(
            "(() => { const i = document.querySelector('#emrfuse-pred-view img');"
            " return !!(i && i.complete && i.naturalWidth > 0); })()", 60, "the prediction image")
        browser.evaluate("document.querySelector('#emrfuse-pred-view').scrollIntoView(); true")
        time.sleep(1.0)
        text = browser.evaluate("document.body.innerText")
        shot = Path(os.environ.get("EMRFUSE_SCREENSHOT_DIR", tmp_path)) / "emrfuse_space.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        browser.screenshot(shot)
        gt_loaded = browser.evaluate(
            "(() => { const i = document.querySelector('#emrfuse-gt-view img'); return !!(i && i.naturalWidth > 0); })()")
    finally:
        browser.close()
    # the page's content, not only that it loaded
    for needle in ("Prediction done", "HGG", "LGG", "alpha_text", "alpha_image", "whole tumour (WT)",
                   "enhancing tumour", "cm³", "Dice", "Overlay (brats2017 labels)"):
        assert needle in text, needle
    assert gt_loaded  # the demo example's ground truth is shown side by side
    pixels = _overlay_pixels(shot)
    assert shot.stat().st_size > 10_000
    assert sum(pixels.values()) > 200, pixels  # predicted regions drawn in colour over the MRI
