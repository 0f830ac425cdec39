"""Benchmark: one full-size case through the paper-size EmrFuse model on CPU (prints figures; not a test).

One case = a 4 x 240 x 240 x 155 volume (the real ``../shared/realdata/TCGA-DU-7294`` case when present, else a
synthetic brain of the same size), cut by the image processor into its brain slices (crop to the brain's
bounding box, pad to a multiple of 32), plus a 100-word report (128 BERT tokens with [CLS]/[SEP]; random ids,
since no tokenizer can be downloaded here). The model is paper size with random weights: a BERT-base-sized text
tower (12 layers, hidden 768), ResNet-50 (timm), fusion_dim 256, the full fusion head, and the U-Net decoder.

What each row measures is in :func:`run`'s docstring; the reference figures in README, "Benchmarks".

    OMP_NUM_THREADS=2 python bench/bench_model.py            # about 3-5 minutes on 2 cores
    python bench/bench_model.py --paths bf16_cl --heads seg --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import resource
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
from modeling_emrfuse.configuration_emrfuse import EmrFuseConfig  # noqa: E402
from modeling_emrfuse.modeling_emrfuse import EmrFuseForImageClassification, EmrFuseForSegmentation  # noqa: E402

REAL_CASE = ROOT.parent / "shared" / "realdata" / "TCGA-DU-7294"
PATHS = {
    "fp32": dict(channels_last=False, bf16=False),
    "fp32_cl": dict(channels_last=True, bf16=False),
    "bf16_cl": dict(channels_last=True, bf16=True),
    "bf16w_cl": dict(channels_last=True, bf16=True, weights=True),
}
PATHS_HELP = """fp32: plain; fp32_cl: channels-last; bf16_cl: bf16 autocast + channels-last; bf16w_cl: weights and inputs cast to
bf16 once (no autocast: no per-call casts of weights and activations) + channels-last."""


def prepare(module, slices, opts):
    """Put ``module`` and ``slices`` in the path's memory format / dtype; returns (slices, autocast context)."""
    fmt = torch.channels_last if opts["channels_last"] else torch.contiguous_format
    dtype = torch.bfloat16 if opts.get("weights") else torch.float32
    module.to(dtype=dtype, memory_format=fmt)
    px = slices.to(dtype).contiguous(memory_format=fmt)
    use_amp = opts["bf16"] and not opts.get("weights")
    return px, (torch.autocast("cpu", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext())


# ----------------------------------------------------------------------------------------------- inputs
def synthetic_volume(seed: int = 0) -> np.ndarray:
    """A 4 x 240 x 240 x 155 volume with an ellipsoidal 'brain' of BraTS-like extent (about 140 x 170 x 140)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.ogrid[:240, :240, :155]
    brain = ((x - 120) / 70.0) ** 2 + ((y - 118) / 86.0) ** 2 + ((z - 75) / 70.0) ** 2 <= 1.0
    vol = np.zeros((4, 240, 240, 155), dtype=np.float32)
    for c in range(4):
        vol[c][brain] = rng.normal(300 + 50 * c, 60, size=int(brain.sum()))
    return vol


def case_slices(context_slices: int = 0):
    """(slices (D, C, H, W) float32 tensor, description): the processor's model-ready slices of one case."""
    try:
        from modeling_emrfuse.processing_emrfuse import EmrFuseImageProcessor
    except ImportError:  # processor not available: random data of the processed shape
        return torch.randn(140, 4 * (2 * context_slices + 1), 160, 192), "random slices of the processed shape"
    proc = EmrFuseImageProcessor(context_slices=context_slices)
    if REAL_CASE.is_dir():
        files = {s: REAL_CASE / f"TCGA-DU-7294_{s}.nii.gz" for s in ("t1", "t1ce", "t2", "flair")}
        try:
            prepared = proc.prepare_volume(files)
            source = "real case TCGA-DU-7294"
        except Exception as err:  # noqa: BLE001 - fall back to synthetic data, say why
            print(f"(real case not usable: {type(err).__name__}: {err}; using a synthetic volume)")
            prepared, source = proc.prepare_volume(synthetic_volume()), "synthetic 240x240x155 volume"
    else:
        prepared, source = proc.prepare_volume(synthetic_volume()), "synthetic 240x240x155 volume"
    slices = torch.from_numpy(np.ascontiguousarray(proc.slices(prepared)))
    return slices, source


def report_tokens(n_tokens: int = 128, vocab: int = 30522, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (1, n_tokens), generator=gen)
    ids[0, 0], ids[0, -1] = 101, 102  # [CLS] ... [SEP]
    return ids, torch.ones_like(ids), torch.zeros_like(ids)


# ----------------------------------------------------------------------------------------------- measuring
class PeakRSS:
    """Peak resident set size (bytes) of this process while the context is open (sampled every 5 ms)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._proc = psutil.Process()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


class ModuleTimer:
    """Wall time spent inside a module's forward (forward pre/post hooks)."""

    def __init__(self, module):
        self.total, self.calls, self._t0 = 0.0, 0, None
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *args):
        self._t0 = time.perf_counter()

    def _post(self, *args):
        self.total += time.perf_counter() - self._t0
        self.calls += 1

    def reset(self):
        self.total, self.calls = 0.0, 0

    def remove(self):
        for h in self._handles:
            h.remove()


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    """Best GFLOP/s of an n x n x n matrix multiply in ``dtype`` over about ``seconds``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        torch.mm(a, b)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def count_flops(fn) -> tuple[float, dict]:
    with FlopCounterMode(display=False) as counter:
        fn()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return float(counter.get_total_flops()), per_module


# ----------------------------------------------------------------------------------------------- main
def run(args) -> None:
    """Print the table of one case per numeric path and head (the rows described below).

    For each numeric path (fp32; fp32 channels-last; bf16 autocast + channels-last; bf16 weights +
    channels-last) and each head (segmentation: all slices -> region logits; grading: all slices -> one grade)
    it reports seconds per case, the share of that time spent in the text tower (measured with forward hooks),
    the peak resident memory during the run (sampled with psutil; ``ru_maxrss`` of the process is printed at
    the end), and the achieved GFLOP/s, i.e. FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode``
    on the same inputs divided by the time, as a fraction of an fp32 and a bf16 matrix-multiply peak measured
    in the same run. A "ResNet-50 tower only" row shows what the image tower alone reaches. Inference runs as
    the model runs it on a case: slices in chunks of ``slice_chunk_size``, the report encoded once.
    """
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, {threads} threads, CPU: {psutil.cpu_count(logical=True)} logical cores, "
        f"load average {', '.join(f'{x:.2f}' for x in psutil.getloadavg())}"
    )
    slices, source = case_slices()
    ids, mask, tt = report_tokens(args.report_tokens)
    n, c, h, w = slices.shape
    print(f"case: {source}: {n} brain slices of {c} x {h} x {w}; report: {ids.shape[1]} tokens (~100 words)")

    print("measuring matmul peaks ...", flush=True)
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak (2048^3): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")

    config = EmrFuseConfig(slice_chunk_size=args.chunk)  # paper size: BERT-base, ResNet-50, fusion_dim 256
    heads = {"seg": EmrFuseForSegmentation, "cls": EmrFuseForImageClassification}
    rows = []
    for head in args.heads:
        model = heads[head](config).eval()
        n_params = sum(p.numel() for p in model.parameters()) / 1e6

        def forward(px, model=model):
            # all slices of one case, one report: encoded once, slices in chunks of slice_chunk_size
            return model(px, ids, mask, tt, slice_to_case=torch.zeros(px.shape[0], dtype=torch.long))

        with torch.no_grad():
            flops, per_module = count_flops(lambda: forward(slices))
        text_flops = sum(v for k, v in per_module.items() if k.endswith("emrfuse.text_model"))
        tower_flops = sum(v for k, v in per_module.items() if k.endswith("emrfuse.vision_model"))
        print(
            f"[{head}] {type(model).__name__}: {n_params:.1f} M parameters, {flops / 1e9:.0f} GFLOP per case "
            f"(text tower {100 * text_flops / flops:.2f} %, image tower {100 * tower_flops / flops:.0f} %)"
        )
        timer = ModuleTimer(model.emrfuse.text_model)
        for path in args.paths:
            rows.append(_time_path(model, forward, timer, slices, f"{head} {path}", path, flops, peak, args))
        timer.remove()
        model.to(dtype=torch.float32)
        if head == args.heads[-1] and args.tower:
            rows.extend(_tower_rows(model.emrfuse.vision_model, slices, peak, args))
        del model
        gc.collect()

    _print_table(rows, peak, args, n)


def _time_path(model, forward, timer, slices, what: str, path: str, flops: float, peak: dict, args) -> dict:
    """Best of ``args.repeats`` timed cases of one head on one numeric path (after a warm-up): the table row."""
    px, amp = prepare(model, slices, PATHS[path])
    now = {"fp32": matmul_peak(torch.float32, seconds=1.0), "bf16": matmul_peak(torch.bfloat16, seconds=1.0)}
    with torch.no_grad(), amp:
        forward(px[: args.chunk])  # warm-up (oneDNN kernels, allocator)
        gc.collect()
        times, text_times = [], []
        with PeakRSS() as mem:
            for _ in range(args.repeats):
                timer.reset()
                t0 = time.perf_counter()
                out = forward(px)
                times.append(time.perf_counter() - t0)
                text_times.append(timer.total)
        assert timer.calls == 1, "the report must be encoded once per case"
        assert torch.isfinite(out.logits.float()).all()
    best = min(times)
    gflops = flops / best / 1e9
    row = dict(
        what=what,
        sec=best,
        text=text_times[times.index(best)] / best,
        rss=mem.peak / 2**30,
        gflops=gflops,
        load=psutil.getloadavg()[0],
        f32=gflops / peak["fp32"],
        bf16=gflops / peak["bf16"],
        now32=gflops / now["fp32"],
        now16=gflops / now["bf16"],
    )
    print(f"  {path}: {best:.2f} s/case (runs: {', '.join(f'{t:.2f}' for t in times)})", flush=True)
    return row


def _tower_rows(tower, slices, peak: dict, args) -> list:
    """The "ResNet-50 tower only" rows: ``args.chunk`` slices timed per path, extrapolated to the case's slices."""
    n = slices.shape[0]
    rows = []
    with torch.no_grad():
        tflops, _ = count_flops(lambda: tower(slices[: args.chunk]))
    for path in args.paths:
        px, amp = prepare(tower, slices[: args.chunk], PATHS[path])
        now = {"fp32": matmul_peak(torch.float32, seconds=1.0), "bf16": matmul_peak(torch.bfloat16, seconds=1.0)}
        with torch.no_grad(), amp:
            tower(px)
            times = []
            for _ in range(max(2, args.repeats)):
                t0 = time.perf_counter()
                tower(px)
                times.append(time.perf_counter() - t0)
        best = min(times) * n / args.chunk
        gflops = tflops * n / args.chunk / best / 1e9
        rows.append(
            dict(
                what=f"ResNet-50 tower only {path}",
                sec=best,
                text=float("nan"),
                rss=float("nan"),
                gflops=gflops,
                f32=gflops / peak["fp32"],
                bf16=gflops / peak["bf16"],
                load=psutil.getloadavg()[0],
                now32=gflops / now["fp32"],
                now16=gflops / now["bf16"],
            )
        )
    return rows


def _print_table(rows: list, peak: dict, args, n: int) -> None:
    """Measure the matmul peaks again (the machine is shared: keep the best of both) and print the table."""
    again = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak again: fp32 {again['fp32']:.0f} GFLOP/s, bf16 {again['bf16']:.0f} GFLOP/s")
    for key in peak:
        if again[key] > peak[key]:
            peak[key] = again[key]
            for r in rows:
                r["f32" if key == "fp32" else "bf16"] = r["gflops"] / peak[key]
    print()
    header = (
        f"{'run (one case)':<30} {'s/case':>7} {'text %':>6} {'RSS GiB':>7} {'GFLOP/s':>7} "
        f"{'%fp32 pk':>8} {'%bf16 pk':>8} {'%fp32 now':>9} {'%bf16 now':>9} {'load':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        text = "" if r["text"] != r["text"] else f"{100 * r['text']:.1f}"
        rss = "" if r["rss"] != r["rss"] else f"{r['rss']:.2f}"
        print(
            f"{r['what']:<30} {r['sec']:>7.2f} {text:>6} {rss:>7} {r['gflops']:>7.0f} "
            f"{100 * r['f32']:>7.0f}% {100 * r['bf16']:>7.0f}% {100 * r['now32']:>8.0f}% {100 * r['now16']:>8.0f}% "
            f"{r['load']:>5.1f}"
        )
    print(
        "(pk: best matmul peak of the run; now: matmul peak measured just before that row, i.e. what the shared "
        "machine gave at the time; load: 1-min load average after the row)"
    )
    print(
        f"\nprocess peak RSS (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB; "
        f"matmul peaks fp32 {peak['fp32']:.0f} / bf16 {peak['bf16']:.0f} GFLOP/s; tower rows extrapolate "
        f"{args.chunk} slices to {n}."
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS), help=PATHS_HELP)
    parser.add_argument("--heads", nargs="+", default=["seg", "cls"], choices=["seg", "cls"])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per path (the best is reported)")
    parser.add_argument("--chunk", type=int, default=32, help="slices per image-tower call (slice_chunk_size)")
    parser.add_argument("--report-tokens", type=int, default=128)
    parser.add_argument("--no-tower", dest="tower", action="store_false", help="skip the ResNet-50-only rows")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
