"""Benchmark ``emrfuse predict`` end to end on one full-size case with the paper-size model, next to
MONAI's SegResNet (BraTS bundle configuration) forward on the same volume.

Figures are speed, not accuracy (random weights); what each part measures is in :func:`main`'s
docstring, the reference figures in README, "Benchmarks".

Usage::

    python bench/bench_predict.py                       # the real case ../shared/realdata/TCGA-DU-7294 if present
    python bench/bench_predict.py --case path/to/case --threads 2 --rounds 5
    python bench/bench_predict.py --no-segresnet --precision fp32
    python bench/bench_predict.py --scale-out           # cases/minute, 1 vs 2 processes (paper-size model)
    python bench/bench_predict.py --scale-out --scale-out-model outputs/emrfuse-demo --scale-out-cases 24

Targets: <= 5 s end to end per case, >= 3.5x faster than SegResNet's forward, text encoding < 5 %.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REALDATA_CASE = REPO.parent / "shared" / "realdata" / "TCGA-DU-7294"
REPORT_100_WORDS = (
    "There is an irregular heterogeneous mass centred in the right frontal lobe with extension toward the corpus "
    "callosum. The lesion shows hypointense signal on T1 and hyperintense signal on T2 and FLAIR images. After "
    "contrast there is thick irregular ring enhancement surrounding a central non-enhancing necrotic core. "
    "Extensive surrounding FLAIR hyperintensity is consistent with vasogenic oedema involving the adjacent white "
    "matter. There is moderate mass effect with effacement of the adjacent sulci, partial compression of the right "
    "lateral ventricle and a mild leftward midline shift. No haemorrhage is seen. The left hemisphere appears "
    "unremarkable. Findings are compatible with an aggressive intra-axial neoplasm."
)


def _log(msg: str) -> None:
    print(msg, flush=True)


def build_paper_size_folder(folder: Path, seed: int = 0) -> Path:
    """Save the paper-size segmentation model (root) + grading model (grading/) with their processor.

    BERT-base-sized text tower, ResNet-50 image tower, fusion_dim 256, decoder (256, 128, 64, 32, 16),
    random weights, saved once with ``save_pretrained`` (as a trained folder is).
    """
    import torch
    from transformers import BertTokenizerFast

    from modeling_emrfuse.configuration_emrfuse import EmrFuseConfig
    from modeling_emrfuse.hub.packaging import add_pipeline_to_folder
    from modeling_emrfuse.modeling_emrfuse import EmrFuseForImageClassification, EmrFuseForSegmentation
    from modeling_emrfuse.processing_emrfuse import EmrFuseImageProcessor, EmrFuseProcessor

    if (folder / "config.json").is_file() and (folder / "grading" / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    # a WordPiece vocabulary from report words (no pretrained tokenizer can be downloaded here)
    words = set(REPORT_100_WORDS.lower().replace(".", " . ").replace(",", " , ").split())
    reports = REPO.parent / "shared" / "realdata" / "textbrats_reports.jsonl"
    if reports.is_file():
        for line in reports.read_text(encoding="utf-8").splitlines()[:200]:
            text = json.loads(line)["text"].lower()
            for ch in ".,;:()-/":
                text = text.replace(ch, f" {ch} ")
            words.update(text.split())
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)
    vocab += [c for c in "abcdefghijklmnopqrstuvwxyz0123456789" if c not in words]
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(dict.fromkeys(vocab))}, model_max_length=512)
    config = EmrFuseConfig()  # paper size: BERT-base text tower, ResNet-50, fusion_dim 256
    processor = EmrFuseProcessor(EmrFuseImageProcessor(context_slices=config.context_slices), tokenizer)
    torch.manual_seed(seed)
    seg = EmrFuseForSegmentation(config).eval()
    seg.save_pretrained(folder)
    processor.save_pretrained(folder)
    del seg
    torch.manual_seed(seed + 1)
    cls = EmrFuseForImageClassification(config).eval()
    cls.save_pretrained(folder / "grading")
    processor.save_pretrained(folder / "grading")
    del cls
    add_pipeline_to_folder(folder, grading_model=folder / "grading")
    return folder


def full_size_case(workdir: Path, case: str | None) -> Path:
    if case:
        return Path(case)
    if REALDATA_CASE.is_dir():
        return REALDATA_CASE
    from datasets_scripts.demo_data import write_demo_dataset

    out = write_demo_dataset(workdir / "demo_full", n_cases=1, size="full", seed=0)
    return next(p for p in sorted(out.iterdir()) if p.is_dir())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * np.logical_and(a, b).sum() / s)


def make_segresnet():
    """MONAI SegResNet in the BraTS bundle configuration (random weights), fp32 and a bf16 copy.

    ``blocks_down=(1, 2, 2, 4)``, ``blocks_up=(1, 1, 1)``, ``init_filters=16``, ``in_channels=4``,
    ``out_channels=3``, ``dropout_prob=0.2``; fp32 is the bundle's setting.
    """
    import copy

    import torch
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    net = SegResNet(
        blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), init_filters=16, in_channels=4, out_channels=3, dropout_prob=0.2
    ).eval()
    return {"fp32": net, "bf16": copy.deepcopy(net).to(torch.bfloat16)}


def segresnet_forward(net, volume: np.ndarray) -> float:
    """One bundle-style inference (``sliding_window_inference``, roi 240 x 240 x 160: one window, the 155
    slices padded to 160); seconds."""
    import torch
    from monai.inferers import sliding_window_inference

    dtype = next(net.parameters()).dtype
    x = torch.from_numpy(volume[None]).to(dtype)
    t0 = time.perf_counter()
    with torch.inference_mode():
        y = sliding_window_inference(x, roi_size=(240, 240, 160), sw_batch_size=1, predictor=net, overlap=0.5)
    seconds = time.perf_counter() - t0
    assert y.shape[-3:] == volume.shape[-3:]
    return seconds


def emrfuse_case(pipe, case: Path, tmp: Path):
    """One case through the pipeline + writing its NIfTI and JSON (what ``emrfuse predict`` does per case).

    The timings hold the stages load (read the four NIfTI files), preprocess (normalise, crop, slices,
    tokenise), model, post-process (label map on the original grid, volumes) and write (NIfTI + JSON),
    and the text tower's time and number of calls (the report is encoded once per model per case).
    """
    from modeling_emrfuse.commands.predict import prediction_record, write_label_map

    t0 = time.perf_counter()
    res = pipe(str(case), report=REPORT_100_WORDS)
    t1 = time.perf_counter()
    write_label_map(tmp / "pred.nii.gz", res["label_map"], res["affine"], res["header"])
    (tmp / "pred.json").write_text(json.dumps(prediction_record(res, "pred.nii.gz", {}, {})))
    t2 = time.perf_counter()
    timings = dict(res["timings"])
    timings["write"] = t2 - t1
    timings["end_to_end"] = t2 - t0
    return timings, res


def scale_out(args, model: Path, workdir: Path) -> dict:
    """Cases/minute of ``emrfuse predict`` on one folder of cases, with 1 and with 2 processes (torchrun).

    The ``--scale-out`` mode, and the only thing it runs: one folder of demo cases (``--scale-out-cases``,
    ``--scale-out-size``), as one process and as two (``torchrun --nproc_per_node 2``, CPU processes over
    gloo, each with half the threads), each a fresh command: cases/minute end to end (start, imports,
    model load, every case, summary) and without the model load.
    """
    from datasets_scripts.demo_data import write_demo_dataset

    cases = workdir / f"scale_out_{args.scale_out_cases}_{args.scale_out_size}"
    if not cases.is_dir():
        write_demo_dataset(cases, n_cases=args.scale_out_cases, size=args.scale_out_size, seed=0)
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    figures = {}
    for n in (1, 2):
        out = workdir / f"scale_out_pred_{n}"
        shutil.rmtree(out, ignore_errors=True)
        threads = max(1, args.threads // n)
        launcher = [sys.executable] + (
            [] if n == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
        )
        cmd = launcher + [
            "-m",
            "modeling_emrfuse.commands.cli",
            "predict",
            str(cases),
            "--model",
            str(model),
            "-o",
            str(out),
            "-q",
            "--precision",
            args.precision,
            "--threads",
            str(threads),
            "--grading-slices",
            str(args.grading_slices),
        ]
        load_avg = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=str(REPO), env={**env, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True
        )
        wall = time.perf_counter() - t0
        summary = json.loads((out / "predict_summary.json").read_text())
        done = len(summary["predicted"])
        load = max(
            json.loads((out / f"{c}.json").read_text())["timings_s"]["model_load_once"] for c in summary["predicted"]
        )
        figures[n] = {
            "processes": n,
            "threads_per_process": threads,
            "cases": done,
            "failed": len(summary["failed"]),
            "exit_status": proc.returncode,
            "wall_s": wall,
            "cases_per_min": 60 * done / wall,
            "cases_per_min_without_model_load": 60 * done / (wall - load),
            "load_avg_before": load_avg,
        }
        _log(
            f"{n} process(es) x {threads} thread(s): {done} cases ({len(summary['failed'])} failed) in {wall:.1f} s -> "
            f"{figures[n]['cases_per_min']:.1f} cases/min end to end, "
            f"{figures[n]['cases_per_min_without_model_load']:.1f} without the model load ({load:.1f} s); "
            f"load avg before {load_avg:.2f}"
        )
    _log(f"2 processes / 1 process: {figures[2]['cases_per_min'] / figures[1]['cases_per_min']:.2f}x end to end")
    return figures


def _parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "emrfuse-bench"))
    ap.add_argument(
        "--case", default=None, help="full-size case folder (default: TCGA-DU-7294 or a full-size demo case)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="paired rounds (EmrFuse case, SegResNet fp32, SegResNet bf16), after one warm-up round",
    )
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument(
        "--grading-slices",
        type=int,
        default=32,
        help="grading model pools at most this many slices (default 32, as emrfuse predict; 0: all)",
    )
    ap.add_argument("--no-segresnet", action="store_true")
    ap.add_argument("--no-compare", action="store_true", help="skip the bf16 vs fp32 comparison")
    ap.add_argument("--no-variants", action="store_true", help="skip the 32-slice grading and segmentation-only runs")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold subprocess run")
    ap.add_argument(
        "--scale-out",
        action="store_true",
        help="only measure cases/minute of emrfuse predict on a folder of cases with 1 and 2 processes",
    )
    ap.add_argument("--scale-out-cases", type=int, default=16, help="demo cases in the scale-out folder (default 16)")
    ap.add_argument(
        "--scale-out-size",
        default="small",
        choices=("small", "medium", "full"),
        help="demo case size for --scale-out (default small: 64 x 64 x 48)",
    )
    ap.add_argument(
        "--scale-out-model",
        default=None,
        help="model folder for --scale-out (default: the paper-size model this bench builds)",
    )
    ap.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        choices=("PASSIVE", "ACTIVE", "unset"),
        help="OpenMP wait policy for this run (emrfuse predict's default is PASSIVE); applies to both models",
    )
    return ap.parse_args(argv)


def _segresnet_and_volume(case: Path):
    """The two SegResNet nets (fp32, bf16) and the case's four sequences, z-scored as the bundle reads them."""
    from modeling_emrfuse.brats_io import load_case
    from modeling_emrfuse.processing_emrfuse import EmrFuseImageProcessor

    loaded = load_case(str(case))
    volume = np.stack([loaded.volumes[s] for s in ("t1", "t1ce", "t2", "flair")]).astype(np.float32)
    volume = EmrFuseImageProcessor().normalize(
        volume
    )  # z-score over the brain (the bundle's NormalizeIntensity nonzero)
    return make_segresnet(), volume


def _paired_rounds(pipe, case: Path, nets, volume, n_rounds: int):
    """One warm-up round and ``n_rounds`` measured ones (EmrFuse case, then the SegResNet forwards when
    ``nets``); returns the measured rounds and the last round's pipeline result."""
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n_rounds + 1):  # round 0 warms up (allocator, oneDNN kernels)
            row = {"load_avg": os.getloadavg()[0]}
            row["emrfuse"], res = emrfuse_case(pipe, case, Path(tmp))
            if nets is not None:
                row["segresnet_fp32"] = segresnet_forward(nets["fp32"], volume)
                row["segresnet_bf16"] = segresnet_forward(nets["bf16"], volume)
            if i > 0:
                rounds.append(row)
            msg = f"round {i}{' (warm-up)' if i == 0 else ''}: load avg {row['load_avg']:.2f}, EmrFuse case {row['emrfuse']['end_to_end']:.2f} s"
            if nets is not None:
                msg += (
                    f", SegResNet forward fp32 {row['segresnet_fp32']:.2f} s / bf16 {row['segresnet_bf16']:.2f} s -> "
                    f"EmrFuse {row['segresnet_fp32'] / row['emrfuse']['end_to_end']:.1f}x / "
                    f"{row['segresnet_bf16'] / row['emrfuse']['end_to_end']:.1f}x faster"
                )
            _log(msg)
    return rounds, res


def _report_rounds(rounds, with_segresnet: bool, args, slices: int, load_s: float) -> dict:
    """Print the stages of the best round (and the SegResNet ratios); return the report's first entries."""
    best_round = min(rounds, key=lambda r: r["emrfuse"]["end_to_end"])
    best = best_round["emrfuse"]
    total = best["end_to_end"]
    _log(f"\n== emrfuse predict stages, best round (load avg {best_round['load_avg']:.2f})")
    for stage in ("load", "preprocess", "model", "postprocess", "write"):
        _log(f"  {stage:<12} {best[stage]:7.3f} s  {100 * best[stage] / total:5.1f} %")
    _log(f"  {'end to end':<12} {total:7.3f} s")
    _log(
        f"  model: segmentation {best['model_segmentation']:.3f} s, grading {best['model_grading']:.3f} s; text tower "
        f"{best['text_encoder']:.3f} s = {100 * best['text_encoder'] / total:.1f} % of the case "
        f"({best['text_encoder_calls']} calls: the report once per model per case)"
    )
    report = {
        "precision": args.precision,
        "threads": args.threads,
        "slices": slices,
        "model_load": load_s,
        "rounds": rounds,
        "best": best,
        "end_to_end_median_s": statistics.median(r["emrfuse"]["end_to_end"] for r in rounds),
    }
    if with_segresnet:
        ratios = sorted(r["segresnet_fp32"] / r["emrfuse"]["end_to_end"] for r in rounds)
        ratios16 = sorted(r["segresnet_bf16"] / r["emrfuse"]["end_to_end"] for r in rounds)
        _log(
            f"  vs SegResNet forward (same round): fp32 {best_round['segresnet_fp32']:.2f} s -> "
            f"{best_round['segresnet_fp32'] / total:.1f}x faster; bf16 {best_round['segresnet_bf16']:.2f} s -> "
            f"{best_round['segresnet_bf16'] / total:.1f}x; median over rounds {ratios[len(ratios) // 2]:.1f}x / "
            f"{ratios16[len(ratios16) // 2]:.1f}x"
        )
        report["segresnet_ratio_median"] = {"fp32": ratios[len(ratios) // 2], "bf16": ratios16[len(ratios16) // 2]}
    return report


def _time_variant(pipe, case: Path, name: str) -> dict:
    """One warm-up and one timed case with a variant pipeline; prints and returns the timed stages."""
    with tempfile.TemporaryDirectory() as tmp:
        emrfuse_case(pipe, case, Path(tmp))
        t, _ = emrfuse_case(pipe, case, Path(tmp))
    _log(
        f"== variant, {name}: {t['end_to_end']:.2f} s end to end (model {t['model']:.2f} s: segmentation "
        f"{t['model_segmentation']:.2f}, grading {t['model_grading']:.2f}; text tower {t['text_encoder']:.3f} s), "
        f"load avg {os.getloadavg()[0]:.2f}"
    )
    return t


def _fresh_process_seconds(code: str) -> float:
    """Wall seconds of ``python -c code`` in a fresh process (Python start included)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(REPO))
    return time.perf_counter() - t0


def cold_start_figures(cold_s: float, warm_s: float, import_torch_s: float, peak_rss_kib: int) -> dict:
    """The cold-start goal's figures: the cold process's overhead over the warm case (cold - warm end to end), that
    overhead in units of ``import torch`` measured in the same run, and the cold process's peak memory."""
    overhead = cold_s - warm_s
    return {
        "cold_s": cold_s,
        "warm_end_to_end_s": warm_s,
        "cold_overhead_s": overhead,
        "import_torch_s": import_torch_s,
        "cold_overhead_over_import_torch": overhead / import_torch_s if import_torch_s > 0 else float("nan"),
        "peak_rss_gib": peak_rss_kib / 2**20,
    }


def _cold_start(case: Path, model: Path, args, warm_s: float) -> dict:
    """:func:`_cold_predict` next to ``python -c "import torch"`` (median of 3, same minute) and the cold
    process's peak resident memory (the largest child's ``ru_maxrss``: the predict process is the largest)."""
    import resource

    torch_s = statistics.median(_fresh_process_seconds("import torch") for _ in range(3))
    cold = _cold_predict(case, model, args)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    figures = cold_start_figures(cold, warm_s, torch_s, peak)
    _log(
        f"== cold start: overhead over the warm case {figures['cold_overhead_s']:.2f} s = "
        f"{figures['cold_overhead_over_import_torch']:.1f}x `import torch` ({torch_s:.2f} s, same run); peak memory of "
        f"the predict process {figures['peak_rss_gib']:.2f} GiB (load avg {os.getloadavg()[0]:.2f})"
    )
    return figures


def _cold_predict(case: Path, model: Path, args) -> float:
    """Seconds of ``emrfuse predict`` on the case as a fresh process (Python start, imports, model load)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "modeling_emrfuse.commands.cli",
            "predict",
            str(case),
            "--model",
            str(model),
            "-o",
            tmp,
            "--precision",
            args.precision,
            "--threads",
            str(args.threads),
            "--report",
            REPORT_100_WORDS,
            "-q",
        ]
        cmd += ["--grading-slices", str(args.grading_slices)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=str(REPO))
        cold = time.perf_counter() - t0
    _log(f"== emrfuse predict as a fresh process (Python start, imports, model load, one case): {cold:.2f} s")
    return cold


def _compare_with_fp32(model: Path, case: Path, res: dict, args, grading_slices) -> dict:
    """The optimised result ``res`` (bf16 autocast by default) against the unmodified fp32 model on the same
    case: agreement of the label maps (Dice per region) and of the grade probabilities."""
    from modeling_emrfuse.brats_labels import label_map_to_regions
    from modeling_emrfuse.pipeline_emrfuse import load_pipeline

    ref_pipe = load_pipeline(
        str(model), precision="fp32", optimize=False, chunk_size=args.chunk_size, grading_max_slices=grading_slices
    )
    t0 = time.perf_counter()
    ref = ref_pipe(str(case), report=REPORT_100_WORDS)
    ref_s = time.perf_counter() - t0
    del ref_pipe
    ra = label_map_to_regions(res["label_map"], res["label_convention"])
    rb = label_map_to_regions(ref["label_map"], ref["label_convention"])
    dices = {r: round(dice(ra[i], rb[i]), 4) for i, r in enumerate(("WT", "TC", "ET"))}
    pa, pb = res["grade_probabilities"], ref["grade_probabilities"]
    dp = max(abs(pa[k] - pb[k]) for k in pa)
    voxels = int((res["label_map"] != ref["label_map"]).sum())
    _log(
        f"== {args.precision} (optimised) vs the unmodified fp32 model on this case: label-map Dice per region "
        f"{dices}, {voxels} voxels differ, max |grade probability diff| {dp:.4f}, alpha_text "
        f"{res['alpha_text']:.4f} vs {ref['alpha_text']:.4f}; unmodified fp32 case {ref_s:.2f} s "
        f"(load avg {os.getloadavg()[0]:.2f})"
    )
    return {"dice": dices, "voxels_differing": voxels, "grade_prob_diff": dp, "fp32_unmodified_end_to_end": ref_s}


def main(argv=None) -> int:
    """Run the benchmark (each part is described on the function that does it); returns the exit status.

    The cores may be shared with other work: each round runs the EmrFuse case and the SegResNet forwards
    back to back, and ratios are computed within a round (the load average is printed with each).
    """
    args = _parse_args(argv)
    if args.omp_wait_policy != "unset" and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # read when torch's OpenMP runtime loads

    import torch

    from modeling_emrfuse.pipeline_emrfuse import load_pipeline

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _log(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU bf16: "
        f"{getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: '?')()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
        f"load average now {os.getloadavg()[0]:.2f} "
        "(other processes share these cores: compare figures within a round)"
    )
    t0 = time.perf_counter()
    model = (
        Path(args.scale_out_model) if args.scale_out_model else build_paper_size_folder(workdir / "paper-size-model")
    )
    _log(f"model folder: {model} ({time.perf_counter() - t0:.1f} s to build/find)")
    if args.scale_out:
        out = workdir / "bench_predict_scale_out.json"
        out.write_text(json.dumps(scale_out(args, model, workdir), indent=2, default=float))
        _log(f"\nfigures written to {out}")
        return 0
    case = full_size_case(workdir, args.case)
    _log(f"case: {case}")

    common = dict(precision=args.precision, chunk_size=args.chunk_size)
    t0 = time.perf_counter()
    grading_slices = args.grading_slices or None  # 0 -> all slices
    pipe = load_pipeline(str(model), grading_max_slices=grading_slices, **common)
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for m in pipe.models for p in m.parameters()) / 1e6
    slices = int(pipe.preprocess(str(case), report=REPORT_100_WORDS)["model_inputs"]["pixel_values"].shape[0])
    _log(
        f"{slices} brain slices; {n_params:.0f} M parameters in {len(pipe.models)} models (segmentation + grading on "
        f"{args.grading_slices or 'all'} slices); model load {load_s:.2f} s; optimisations: {pipe.optimizations}"
    )

    nets, volume = _segresnet_and_volume(case) if not args.no_segresnet else (None, None)
    rounds, res = _paired_rounds(pipe, case, nets, volume, args.rounds)
    report = _report_rounds(rounds, nets is not None, args, slices, load_s)
    del nets

    if not args.no_variants:
        for name, kwargs in (
            ("grading on all brain slices", dict(grading_max_slices=None)),
            ("segmentation only (--no-grading)", dict(grading_model=False)),
        ):
            del pipe
            pipe = load_pipeline(str(model), **common, **kwargs)
            report.setdefault("variants", {})[name] = _time_variant(pipe, case, name)

    if not args.no_cold:
        report["cold_start"] = _cold_start(case, model, args, report["end_to_end_median_s"])
        report["cli_cold_subprocess"] = report["cold_start"]["cold_s"]

    if not args.no_compare:
        del pipe
        report["compare"] = _compare_with_fp32(model, case, res, args, grading_slices)

    out = workdir / f"bench_predict_{args.precision}.json"
    out.write_text(json.dumps(report, indent=2, default=float))
    _log(f"\nfigures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
