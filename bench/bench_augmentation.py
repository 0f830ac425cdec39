"""Benchmark of the training-slice augmentations: slices/s of ``paper``, ``monai`` and ``none`` on one cached case.

One real case (default: a BraTS 2018 case of ../shared/realdata) is cached once with the model's image processor,
then ``SliceDataset(augmentation=...)[i]`` is timed in this process on one thread (as one DataLoader worker runs
it), whole padded slices, the same draws for every augmentation.

    nice -n 10 python bench/bench_augmentation.py --samples 300
    python bench/bench_augmentation.py --case DIR --context-slices 1 --sequence-presence

Figures depend on the machine and on what else runs on it; nothing here is a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from datasets_scripts.brats_layouts import discover_cases  # noqa: E402
from datasets_scripts.slice_cache import SliceDataset, build_cache  # noqa: E402
from modeling_emrfuse.processing_emrfuse import EmrFuseImageProcessor  # noqa: E402
from modeling_emrfuse.training.text_tower import placeholder_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASE = ROOT.parent / "shared" / "realdata" / "BraTS2018" / "HGG" / "Brats18_2013_2_1"


def slices_per_second(ds: SliceDataset, samples: int) -> float:
    ds[0]  # memory maps opened, pipeline warmed up
    t0 = time.perf_counter()
    for i in range(samples):
        ds[i]
    return samples / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", type=Path, default=DEFAULT_CASE, help="a BraTS case folder")
    ap.add_argument("--samples", type=int, default=300, help="slices timed per augmentation")
    ap.add_argument("--context-slices", type=int, default=0)
    ap.add_argument("--sequence-presence", action="store_true")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep the cache here (default: a temp folder)")
    args = ap.parse_args(argv)
    if not args.case.is_dir():
        print(f"bench_augmentation: {args.case} is not a case folder.", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        cases = [c for c in discover_cases(args.case.parent) if c.case_id == args.case.name]
        ip = EmrFuseImageProcessor(context_slices=args.context_slices, sequence_presence=args.sequence_presence)
        cached = build_cache(cases, work / "cache", ip, placeholder_tokenizer(), progress=False)
        c = cached[0]
        print(f"case {c.case_id}: cached {c.num_slices} slices of {c.height} x {c.width}, {args.samples} samples each")
        print("| augmentation | slices/s | ms/slice |")
        print("|---|---|---|")
        for name in ("none", "paper", "monai"):
            ds = SliceDataset(
                cached,
                image_processor=ip,
                presence_channels=args.sequence_presence,
                augmentation=name,
                samples_per_epoch=args.samples + 1,
                seed=0,
            )
            rate = slices_per_second(ds, args.samples)
            print(f"| {name} | {rate:.0f} | {1000 / rate:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
