"""The Gradio Space (space/app.py): its functions, the running app through gradio_client, the Space
card, and a real headless Chromium that runs an example and checks what the page shows."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import build_tiny_model_folder, write_small_case

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "space"
REPORT = "Ring enhancing mass in the right temporal lobe with central necrosis and surrounding oedema."


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """space/app.py imported with a tiny model (EMRFUSE_MODEL) and small demo examples."""
    model = build_tiny_model_folder(tmp_path_factory.mktemp("space") / "model")
    saved = {k: os.environ.get(k) for k in ("EMRFUSE_MODEL", "EMRFUSE_DEMO_SIZE", "EMRFUSE_DEMO_CASES")}
    os.environ.update(EMRFUSE_MODEL=str(model), EMRFUSE_DEMO_SIZE="small", EMRFUSE_DEMO_CASES="2")
    # loaded once from its file, as a Space runs it (module-level settings read the environment above)
    spec = importlib.util.spec_from_file_location("app", SPACE / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["app"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("app", None)
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
    (
        state,
        pred_img,
        gt_img,
        slider,
        legend,
        grade,
        alphas,
        highlighted,
        volumes,
        metrics,
        download,
        status,
        *cleared,
    ) = out
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
    assert f"Report: the example's own report ({len(report)} characters)" in status
    assert [row[0] for row in volumes] == ["whole tumour (WT)", "tumour core (TC)", "enhancing tumour (ET)"]
    assert metrics["visible"] and len(metrics["value"]) == 3 and all(0 <= row[1] <= 1 for row in metrics["value"])
    assert nib.load(download).shape == shape and np.allclose(
        nib.load(download).affine, nib.load(str(next(Path(spec["input"]).glob("*_t1.nii.gz")))).affine
    )
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
        "brats2015",
        "inferred from the ground truth label values {0, 1, 2, 3, 4}",
    )
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
    expected = {
        "extension": "not a NIfTI",
        "empty": "is empty",
        "too_big": "limit",
        "magic": "does not look like",
        "partial": "missing: FLAIR",
        "nothing": "pick an example",
    }[problem]
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


def test_grid_size_is_checked_from_the_header_before_any_data_is_read(app, tmp_path):
    """A small upload whose header declares a huge grid is refused from the header: the file holds no voxel data
    at all, so reading any would fail differently."""
    import gzip

    import gradio as gr

    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 1024))
    header.set_data_dtype(np.int16)
    huge = tmp_path / "huge_flair.nii.gz"
    huge.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))  # 352 bytes: header + extension flag, no data
    assert huge.stat().st_size < 1000
    with pytest.raises(gr.Error, match=r"huge_flair.nii.gz has a 1024 x 1024 x 1024 grid \(1073.7 million voxels\)"):
        app.validate_upload(str(huge), "FLAIR")
    ok = write_small_case(tmp_path / "src", shape=(16, 16, 8)) / "Case_001_t1.nii.gz"
    assert app.validate_upload(str(ok), "T1") == ok  # 2,048 voxels: accepted


def test_error_messages_name_the_file_not_the_server_path(app, tmp_path):
    import gradio as gr
    from gradio.utils import get_upload_folder

    case = write_small_case(tmp_path / "src", shape=(16, 16, 8))
    folder = Path(get_upload_folder()) / "0123abcd"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for seq in ("t1", "t1ce", "t2", "flair"):
        target = folder / seq / f"Case_001_{seq}.nii.gz"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(case / f"Case_001_{seq}.nii.gz", target)
        files.append(str(target))
    ref = nib.load(files[0])
    four_d = np.stack([np.asarray(ref.dataobj)] * 2, axis=-1)  # a 4D volume: refused by the case reader
    nib.save(nib.Nifti1Image(four_d, ref.affine), files[2])
    with pytest.raises(gr.Error) as info:
        app.predict(*files, None, REPORT, None)
    message = str(info.value)
    assert "Case_001_t2.nii.gz" in message and "3D" in message
    assert str(folder) not in message and get_upload_folder() not in message and "/tmp" not in message
    assert app.public_message(f"{folder}/t1/Case_001_t1.nii.gz: bad") == "Case_001_t1.nii.gz: bad"


def test_no_event_re_renders_the_images_of_the_event_that_set_its_trigger(app):
    """The viewer's images are cached by content: rendering them a second time rewrites the file the browser is
    fetching. So a value that an event sets together with its images (the slice after a prediction or a plane change)
    must not start a second render through a ``change`` listener; the user's own moves use ``input``."""
    demo = app.build_demo()
    fns = list(demo.fns.values())
    views = {
        c._id for f in fns for c in f.outputs if getattr(c, "elem_id", None) in ("emrfuse-pred-view", "emrfuse-gt-view")
    }
    assert len(views) == 2
    set_with_images = {c._id for f in fns if views & {o._id for o in f.outputs} for c in f.outputs}
    renders = [f for f in fns if views & {o._id for o in f.outputs}]
    slider = next(c._id for f in fns for c in f.inputs if getattr(c, "elem_id", None) == "emrfuse-slice")
    assert any((slider, "input") in f.targets for f in renders)  # moving the slider still renders the slice
    for f in renders:
        for target, event in f.targets:
            assert not (event == "change" and target in set_with_images), (f.name, target, event)


def test_queue_is_bounded_and_a_full_queue_turns_requests_away(app, monkeypatch):
    import threading

    import gradio as gr
    from gradio_client import Client

    assert app.build_demo()._queue.max_size == app.QUEUE_MAX_SIZE == 16  # the documented default
    release = threading.Event()

    def slow_predict(*args):
        release.wait(30)
        raise gr.Error("finished", print_exception=False)

    monkeypatch.setattr(app, "predict", slow_predict)
    monkeypatch.setattr(app, "QUEUE_MAX_SIZE", 1)
    demo = app.build_demo()
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        args = (None, None, None, None, None, REPORT, None, "FLAIR", "axial", False, "auto")
        jobs = [client.submit(*args, api_name="/predict") for _ in range(4)]
        messages = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("Queue is full" in m for m in messages):
            time.sleep(0.2)
            messages = [str(job.exception(timeout=0.01)) for job in jobs if job.done() and job.exception()]
        release.set()
        for job in jobs:
            try:
                job.result(timeout=60)
            except Exception as exc:  # noqa: BLE001
                messages.append(str(exc))
    finally:
        release.set()
        demo.close()
    assert any("Queue is full" in m for m in messages), messages  # one running, one waiting, the rest turned away
    assert any("finished" in m for m in messages), messages  # the accepted ones ran


def test_app_stopped_with_sigterm_leaves_no_files(tmp_path):
    """``python space/app.py`` stopped with SIGTERM (how a Space or a container stops it) removes its temporary
    folder, including an upload whose request never reached a prediction."""
    import signal

    import httpx

    model = build_tiny_model_folder(tmp_path / "model")
    tmp_root = tmp_path / "server-tmp"
    tmp_root.mkdir()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    env.update(
        EMRFUSE_MODEL=str(model),
        EMRFUSE_SPACE_TMPDIR=str(tmp_root),
        EMRFUSE_DEMO_SIZE="small",
        EMRFUSE_DEMO_CASES="1",
        GRADIO_SERVER_NAME="127.0.0.1",
        GRADIO_SERVER_PORT=str(port),
    )
    proc = subprocess.Popen(
        [sys.executable, str(SPACE / "app.py")],
        env=env,
        cwd=str(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "the app exited early"
            try:
                if httpx.get(url + "/config", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the app did not start"
            time.sleep(1)
        case = write_small_case(tmp_path / "src", shape=(16, 16, 8), case_id="Sigterm_001")
        with open(case / "Sigterm_001_t1.nii.gz", "rb") as fh:
            reply = httpx.post(url + "/gradio_api/upload", files={"files": ("Sigterm_001_t1.nii.gz", fh)}, timeout=30)
        reply.raise_for_status()
        assert list(tmp_root.rglob("Sigterm_001_t1.nii.gz")), "the upload should sit in the app's temporary folder"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(tmp_root.iterdir()) == []  # uploads, examples and results all gone


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
    demo = app.build_demo()  # with the app's own queue settings
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_gradio_client_predicts_an_example(app, running_app):
    from gradio_client import Client

    client = Client(running_app, verbose=False)
    name = _demo_example(app)
    result = client.predict(
        None, None, None, None, name, app.example_report(name), None, "FLAIR", "axial", api_name="/predict"
    )
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
    left = [
        str(p) for s in ("t1", "t1ce", "t2", "flair") for p in Path(get_upload_folder()).rglob(f"{case_id}_{s}.nii.gz")
    ]
    assert left == [], f"uploads still on the server: {left}"


# ------------------------------------------------------------------------------------------ browser
# The page is driven by Selenium through Debian's chromium-driver on the system Chromium. `.ci/run` installs
# both and sets EMRFUSE_REQUIRE_BROWSER=1: there, a missing browser fails the test instead of skipping it.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1400,1800",
]
# the overlay colours of the legend (brats2017 labels), blended 50/50 with the grey MRI
LEGEND_COLOURS = {1: (230, 30, 30), 2: (0, 200, 0), 4: (255, 215, 0)}


def _browser_or_skip():
    chromium = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )
    driver = shutil.which("chromedriver")
    missing = [what for what, path in (("chromium", chromium), ("chromedriver", driver)) if not path]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        message = f"no browser to drive the page: missing {', '.join(missing)} (Debian: apt-get install chromium chromium-driver)"
        if os.environ.get("EMRFUSE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def _wait_for(driver, script: str, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"the page never showed {what} within {timeout} s")


FETCH_BASE64 = """
const [selector, attribute, done] = arguments;
const element = document.querySelector(selector);
if (!element) { done('missing: ' + selector); return; }
fetch(element[attribute]).then(r => r.arrayBuffer()).then(buffer => {
  const bytes = new Uint8Array(buffer); let text = '';
  for (let i = 0; i < bytes.length; i += 1) text += String.fromCharCode(bytes[i]);
  done('ok:' + btoa(text));
}).catch(e => done('error: ' + e));
"""


def _fetch(driver, selector: str, attribute: str) -> bytes:
    """The bytes the page shows at ``selector`` (an image's ``src``, a link's ``href``), fetched by the page itself."""
    import base64

    result = driver.execute_async_script(FETCH_BASE64, selector, attribute)
    assert result.startswith("ok:"), result
    return base64.b64decode(result[3:])


def overlay_labels(rgb: np.ndarray) -> np.ndarray:
    """Which legend label each pixel of an overlay image is coloured with (0: grey, no overlay; -1: a colour that is
    no legend colour). A grey value g blended with colour c shows (g + c) / 2: its channel differences are half the
    colour's, whatever the grey."""
    rgb = rgb.astype(int)
    diffs = np.stack([rgb[..., 0] - rgb[..., 1], rgb[..., 1] - rgb[..., 2]], axis=-1)
    out = np.full(rgb.shape[:2], -1, dtype=int)
    out[(np.abs(diffs) <= 1).all(axis=-1)] = 0
    for label, (r, g, b) in LEGEND_COLOURS.items():
        expected = np.array([(r - g) / 2, (g - b) / 2])
        out[(np.abs(diffs - expected) <= 1.5).all(axis=-1)] = label
    return out


def test_overlay_labels_reads_each_legend_colour(app):
    grey = np.full((3, 4), 90, dtype=np.uint8)
    labels = np.array([[0, 1, 2, 4], [4, 2, 1, 0], [0, 0, 1, 1]])
    image = app._overlay(grey, labels, "brats2017")  # the app's own drawing, read back by the test's rule
    scale = image.shape[0] // 3
    np.testing.assert_array_equal(overlay_labels(image)[::scale, ::scale], labels)


def test_browser_runs_an_example_and_shows_the_prediction_overlay(app, running_app, tmp_path):
    """A real browser clicks Run on the demo example; the prediction view (not the ground-truth view) must show, at
    the slice the slider names, exactly the label map the page offers for download, in the legend's colours."""
    from PIL import Image

    driver = _browser_or_skip()
    try:
        driver.set_script_timeout(120)
        driver.get(running_app)
        _wait_for(driver, "return !!document.querySelector('#emrfuse-run')", 90, "the Run button")
        driver.execute_script(
            "const b = document.querySelector('#emrfuse-run'); (b.tagName === 'BUTTON' ? b : b.querySelector('button')).click();"
        )
        _wait_for(driver, "return document.body.innerText.includes('Prediction done')", 180, "a finished prediction")
        _wait_for(
            driver,
            "const i = document.querySelector('#emrfuse-pred-view img'); return !!(i && i.complete && i.naturalWidth > 0);",
            180,
            "the prediction image",
        )
        _wait_for(driver, "return !!document.querySelector('#emrfuse-download a[href]')", 180, "the label map download")
        text = driver.execute_script("return document.body.innerText")
        index = int(
            float(driver.execute_script("return document.querySelector('#emrfuse-slice input[type=number]').value"))
        )
        shown = np.asarray(
            Image.open(__import__("io").BytesIO(_fetch(driver, "#emrfuse-pred-view img", "src"))).convert("RGB")
        )
        label_file = tmp_path / "downloaded_labels.nii.gz"
        label_file.write_bytes(_fetch(driver, "#emrfuse-download a[href]", "href"))
        gt_loaded = _wait_for(
            driver,
            "const i = document.querySelector('#emrfuse-gt-view img'); "
            "return !!(i && i.complete && i.naturalWidth > 0);",
            180,
            "the ground-truth image",
        )
        # the user moves the slider: the view follows
        before = driver.execute_script("return document.querySelector('#emrfuse-pred-view img').src")
        driver.execute_script(
            "const r = document.querySelector('#emrfuse-slice input[type=range]'); r.value = String(Number(r.value) - 1); "
            "r.dispatchEvent(new Event('input', {bubbles: true})); r.dispatchEvent(new Event('pointerup', {bubbles: true}));"
        )
        moved = _wait_for(
            driver,
            "const i = document.querySelector('#emrfuse-pred-view img'); "
            f"return !!(i && i.src !== {before!r} && i.complete && i.naturalWidth > 0);",
            60,
            "the next slice after moving the slider",
        )
        shot = Path(os.environ.get("EMRFUSE_SCREENSHOT_DIR", tmp_path)) / "emrfuse_space.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    for needle in (
        "Prediction done",
        "HGG",
        "LGG",
        "alpha_text",
        "alpha_image",
        "whole tumour (WT)",
        "enhancing tumour",
        "cm³",
        "Dice",
        "Overlay (brats2017 labels)",
    ):
        assert needle in text, needle
    assert gt_loaded  # the example's ground truth is shown beside the prediction
    assert moved
    label_map = np.asarray(nib.load(str(label_file)).dataobj)
    expected = np.rot90(label_map[:, :, index])  # axial slice, displayed as the viewer shows it
    scale = shown.shape[0] // expected.shape[0]
    assert shown.shape[:2] == (expected.shape[0] * scale, expected.shape[1] * scale)
    expected = expected.repeat(scale, axis=0).repeat(scale, axis=1)
    assert len(np.unique(expected)) >= 3, "the shown slice should hold several predicted labels"
    seen = overlay_labels(shown)
    assert (seen >= 0).all(), "the prediction view shows colours that are not in the legend"
    np.testing.assert_array_equal(seen, expected)  # every pixel: the predicted label's colour, or none


# ------------------------------------------------------------------------------------------ issue 20
def test_space_runs_no_code_from_the_model_folder_unless_asked(app, tmp_path, monkeypatch):
    from test_security_geometry import _evil_copy

    marker = tmp_path / "marker.txt"
    evil = _evil_copy(Path(os.environ["EMRFUSE_MODEL"]), tmp_path / "evil-model", marker)
    monkeypatch.setenv("EMRFUSE_MODEL", str(evil))
    monkeypatch.delenv(app.TRUST_ENV, raising=False)
    saved = dict(app._PIPE)
    app._PIPE.clear()
    try:
        pipe = app.get_pipeline()
        assert not marker.exists() and type(pipe.model).__module__ == "modeling_emrfuse.modeling_emrfuse"
        monkeypatch.setenv(app.TRUST_ENV, "1")
        app.get_pipeline()
        assert marker.exists()  # EMRFUSE_TRUST_REMOTE_CODE=1: the folder's own code, as asked
    finally:
        app._PIPE.clear()
        app._PIPE.update(saved)


def test_single_slice_volume_is_refused_with_a_clear_message(app, tmp_path):
    import gradio as gr

    with pytest.raises(gr.Error) as info:
        app.predict(*_uploads(tmp_path, shape=(32, 32, 1)), None, "", None)
    message = str(info.value.message if hasattr(info.value, "message") else info.value)
    assert "32 x 32 x 1" in message and f"at least {app.MIN_SIDE} voxels" in message and str(tmp_path) not in message


def _uploads(tmp_path, shape=(32, 32, 16)):
    case = write_small_case(tmp_path / "src", shape=shape)
    files = []
    for seq in ("t1", "t1ce", "t2", "flair"):
        target = tmp_path / "uploads" / seq / f"Case_001_{seq}.nii.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(case / f"Case_001_{seq}.nii.gz", target)
        files.append(str(target))
    return files


def test_uploads_never_get_the_examples_report(app, tmp_path):
    import gradio as gr

    name = _demo_example(app)
    report = app.example_report(name)
    assert app.report_for_example(name, None, None, None, None) == report
    assert app.report_for_example(name, "a.nii.gz", None, None, None) == ""  # sequences uploaded: no example report
    demo = app.build_demo()
    report_box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "emrfuse-report")
    uploads = {
        b._id for b in demo.blocks.values() if isinstance(b, gr.File) and b.label in ("T1", "T1ce", "T2", "FLAIR")
    }
    cleared = {
        target
        for fn in demo.fns.values()
        for target, event in fn.targets
        if event == "upload" and [o._id for o in fn.outputs] == [report_box._id]
    }
    assert cleared == uploads and len(uploads) == 4  # each upload empties the report box

    with pytest.raises(gr.Error, match="report of the example"):  # the example's report sent with uploaded sequences
        app.predict(*_uploads(tmp_path / "a"), name, report, None)
    own = "Irregular mass in the left frontal lobe."
    status = app.predict(*_uploads(tmp_path / "b"), name, own, None)[11]
    assert f"Report: the text in the report box ({len(own)} characters), for `Case_001`" in status and own not in status
    status = app.predict(*_uploads(tmp_path / "c"), name, "", None)[11]
    assert "Report: none for `Case_001`" in status


def test_image_only_model_without_grading_says_so(app, tmp_path, monkeypatch):
    from conftest import make_tokenizer, tiny_config

    from modeling_emrfuse.modeling_emrfuse import EmrFuseForSegmentation
    from modeling_emrfuse.processing_emrfuse import EmrFuseImageProcessor, EmrFuseProcessor

    folder = tmp_path / "image-only"
    tokenizer = make_tokenizer(tmp_path / "vocab")
    EmrFuseForSegmentation(tiny_config(use_text=False, text_config=None)).save_pretrained(folder)
    EmrFuseProcessor(EmrFuseImageProcessor(context_slices=0), tokenizer).save_pretrained(folder)
    monkeypatch.setenv("EMRFUSE_MODEL", str(folder))
    saved = dict(app._PIPE)
    app._PIPE.clear()
    try:
        name = _demo_example(app)
        out = app.predict(None, None, None, None, name, app.example_report(name), None)
    finally:
        app._PIPE.clear()
        app._PIPE.update(saved)
    grade, highlighted, status = out[5], out[7], out[11]
    assert grade["value"] is None and grade["label"] == app.NO_GRADING_LABEL
    assert highlighted["value"] == [] and highlighted["label"] == app.NO_TEXT_LABEL
    assert "this model does not read reports" in status and "truncated" not in status
    assert "no grading model" in status
