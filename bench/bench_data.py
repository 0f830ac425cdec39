"""Benchmark of the data pipeline: is it fast enough not to be the training bottleneck?

Measures, on this machine's CPU:
  1. demo-data writing (seconds per case, small and full size);
  2. preprocessing full-size (240 x 240 x 155) cases into the slice cache (cases/s), in this process
     and with 2 worker processes, plus the no-op check of an up-to-date cache; the real TCGA case
     from ../shared/realdata when present;
  3. slices/s the SliceDataset + DataLoader + collate_slices deliver WITH augmentation (rotation,
     scaling, translation, flips), full-size and small demo cases, 0 and 2 loader workers;
  4. slices/s one training step (forward + backward + AdamW step) of the paper-size
     EmrFuseForSegmentation (BERT-base-sized text tower, ResNet-50, random weights) consumes at
     the same slice sizes.

    OMP_NUM_THREADS=2 python bench/bench_data.py            # full run (a few minutes)
    python bench/bench_data.py --full-cases 2 --skip-model   # quicker

Figures depend on the machine and on what else runs on it; nothing here is a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
from datasets_scripts.brats_layouts import discover_cases  # noqa: E402
from datasets_scripts.demo_data import write_demo_dataset  # noqa: E402
from datasets_scripts.slice_cache import SliceDataset, build_cache, collate_slices  # noqa: E402
from modeling_emrfuse.processing_emrfuse import EmrFuseImageProcessor  # noqa: E402

REALDATA = ROOT.parent / "shared" / "realdata"


def make_tokenizer(report_dir: Path):
    """A WordPiece tokenizer trained on the demo reports (no pretrained vocabulary can be downloaded here)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [p.read_text() for p in sorted(report_dir.rglob("*_flair_text.txt"))]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=500, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    )
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def loader_rate(ds: SliceDataset, batch_size: int, n_batches: int, workers: int) -> float:
    """Slices/s delivered by a DataLoader over ``ds`` (first batch excluded: worker start-up)."""
    dl = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_slices,
        persistent_workers=False,
    )
    it = iter(dl)
    next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(n_batches):
        batch = next(it)
        n += batch["pixel_values"].shape[0]
    dt = time.perf_counter() - t0
    del it
    return n / dt


def model_rate(size, batch_size: int, slices_per_case: int, steps: int, text_len: int = 160) -> float:
    """Slices/s of forward+backward+AdamW of the paper-size segmentation model (random weights)."""
    from modeling_emrfuse.configuration_emrfuse import EmrFuseConfig
    from modeling_emrfuse.modeling_emrfuse import EmrFuseForSegmentation

    torch.manual_seed(0)
    model = EmrFuseForSegmentation(EmrFuseConfig()).train()  # BERT-base-sized text tower + ResNet-50
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n_cases = max(1, batch_size // slices_per_case)
    h, w = size
    batch = {
        "pixel_values": torch.randn(batch_size, 4, h, w),
        "labels": (torch.rand(batch_size, 3, h, w) > 0.9).float(),
        "input_ids": torch.randint(1000, 20000, (n_cases, text_len)),
        "attention_mask": torch.ones(n_cases, text_len, dtype=torch.long),
        "token_type_ids": torch.zeros(n_cases, text_len, dtype=torch.long),
        "slice_to_case": torch.arange(batch_size) // slices_per_case % n_cases,
    }

    def step():
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * steps / (time.perf_counter() - t0)


def _parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full-cases", type=int, default=4, help="full-size demo cases to cache (default 4)")
    ap.add_argument("--small-cases", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16, help="slices per batch for the loader (default 16)")
    ap.add_argument("--batches", type=int, default=40, help="batches timed per loader setting")
    ap.add_argument("--model-batch", type=int, default=8, help="slices per model step (default 8 = 2 cases x 4 slices)")
    ap.add_argument("--model-steps", type=int, default=2)
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep data and caches here (default: a temp folder)")
    return ap.parse_args(argv)


def _bench_demo_writer(args, work: Path, rows: list) -> None:
    """1. demo data: seconds per case written, small and full size."""
    _, t = timed(write_demo_dataset, work / "small", n_cases=args.small_cases, size="small", seed=0)
    rows.append(("demo writer, small 64x64x48", f"{t / args.small_cases:.3f} s/case", ""))
    _, t = timed(write_demo_dataset, work / "full", n_cases=args.full_cases, size="full", seed=0)
    rows.append(("demo writer, full 240x240x155", f"{t / args.full_cases:.2f} s/case", ""))


def _bench_cache(work: Path, ip, tok, rows: list):
    """2. cache building: full-size demo with 0 and 2 workers, the up-to-date check, the real case if present;
    returns the full-size and the small caches."""
    full_cases = discover_cases(work / "full")
    for workers in (0, 2):
        _, t = timed(
            build_cache, full_cases, work / f"cache_full_w{workers}", ip, tok, num_workers=workers, progress=False
        )
        rows.append(
            (
                f"cache build, full-size demo, {workers} workers",
                f"{len(full_cases) / t:.2f} cases/s",
                f"{t / len(full_cases):.2f} s/case",
            )
        )
    full_cache, t = timed(build_cache, full_cases, work / "cache_full_w0", ip, tok, progress=False)
    rows.append(
        ("cache check, up to date (no rebuild)", f"{len(full_cases) / t:.0f} cases/s", f"{t * 1000:.1f} ms total")
    )
    real = REALDATA / "TCGA-DU-7294"
    if real.is_dir():
        example = {
            "case_id": "TCGA-DU-7294",
            "grade": "LGG",
            "label_convention": "brats2017",
            **{s: str(real / f"TCGA-DU-7294_{s}.nii.gz") for s in ("t1", "t1ce", "t2", "flair")},
            "seg": str(real / "TCGA-DU-7294_seg.nii.gz"),
        }
        _, t = timed(build_cache, [example], work / "cache_real", ip, tok, progress=False)
        rows.append(("cache build, real TCGA-DU-7294 (240x240x155)", f"{1 / t:.2f} cases/s", f"{t:.2f} s/case"))
    else:
        rows.append(("cache build, real case", "skipped", f"{real} absent"))
    small_cache = build_cache(discover_cases(work / "small"), work / "cache_small", ip, tok, progress=False)
    return full_cache, small_cache


def _bench_slices(args, full_cache, small_cache, full_size, rows: list) -> None:
    """3. slice pipeline with augmentation, full-size and small, 0 and 2 loader workers."""
    settings = [("full-size", full_cache, full_size), ("small demo", small_cache, (64, 64))]
    for name, cache, size in settings:
        for workers in (0, 2):
            ds = SliceDataset(
                cache,
                image_size=size,
                tumour_prob=0.5,
                slices_per_case=4,
                seed=0,
                samples_per_epoch=args.batch_size * (args.batches + 2),
            )
            rate = loader_rate(ds, args.batch_size, args.batches, workers)
            rows.append(
                (
                    f"slices + augmentation, {name} {size[0]}x{size[1]}, {workers} workers",
                    f"{rate:.0f} slices/s",
                    "",
                )
            )


def _bench_model(args, full_size, rows: list) -> None:
    """4. what a training step consumes: paper-size model fwd+bwd+step, full-size and small slices."""
    if args.skip_model:
        rows.append(("paper-size model step", "skipped", "--skip-model"))
        return
    try:
        import modeling_emrfuse.modeling_emrfuse  # noqa: F401
    except ImportError as exc:
        rows.append(("paper-size model step", "unavailable", f"{exc}"))
        return
    for name, size in (("full-size", full_size), ("small demo", (64, 64))):
        rate = model_rate(size, args.model_batch, 4, args.model_steps)
        rows.append(
            (
                f"paper-size model fwd+bwd+step, {name} {size[0]}x{size[1]}, batch {args.model_batch}",
                f"{rate:.2f} slices/s",
                "BERT-base + ResNet-50, random weights",
            )
        )


def _print_table(rows: list) -> None:
    width = max(len(r[0]) for r in rows)
    print()
    print(f"| {'measurement'.ljust(width)} | rate | note |")
    print(f"|{'-' * (width + 2)}|------|------|")
    for name, rate, note in rows:
        print(f"| {name.ljust(width)} | {rate} | {note} |")


def main(argv=None) -> int:
    args = _parse_args(argv)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} intra-op threads, {os.cpu_count()} CPUs visible")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        _bench_demo_writer(args, work, rows)
        tok = make_tokenizer(work / "small")
        ip = EmrFuseImageProcessor()
        full_cache, small_cache = _bench_cache(work, ip, tok, rows)
        full_size = (max(c.height for c in full_cache), max(c.width for c in full_cache))
        _bench_slices(args, full_cache, small_cache, full_size, rows)
        _bench_model(args, full_size, rows)
    _print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
