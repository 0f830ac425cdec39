"""Benchmark of training and evaluation with train.py's own loop, on this machine's CPU.

What it measures (training throughput, the share of a step spent waiting for data, evaluation seconds
per case, and with ``--load`` the threading policies beside another job) is in :func:`main` and
:func:`measure_under_load`; the reference figures in README, "Benchmarks".

    OMP_NUM_THREADS=2 python bench/bench_train.py                 # both models (~5 minutes)
    python bench/bench_train.py --skip-paper                       # demo model only
    python bench/bench_train.py --load                             # demo s/step alone and beside another job

Figures depend on the machine and on what else runs on it; nothing here is a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

POLICIES = ("before", "after")
_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--child-policy", choices=POLICIES)
CHILD_POLICY = _pre.parse_known_args()[0].child_policy
if CHILD_POLICY != "before":  # as train.py does: before torch loads
    from modeling_emrfuse.runtime.cpu_threads import prefer_passive_openmp

    prefer_passive_openmp()

import torch  # noqa: E402

from modeling_emrfuse.training import loop  # noqa: E402
from modeling_emrfuse.training.data import prepare_run_data  # noqa: E402
from modeling_emrfuse.training.run import make_accelerator, setup_logging  # noqa: E402
from modeling_emrfuse.training.settings import TrainingSettings  # noqa: E402
from modeling_emrfuse.training.text_tower import build_demo_text_tower  # noqa: E402


def load_train_script():
    """train.py (its parse_args, make_accelerator, setup_logging), loaded from its file; its own
    prefer_passive_openmp() comes after torch loaded: no effect in "before"."""
    spec = importlib.util.spec_from_file_location("emrfuse_train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = load_train_script()

BERT_BASE = {
    "vocab_size": 1000,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
}


def measure(argv, text_spec, warmup: int, steps: int, label: str) -> dict:
    args = train.parse_args(argv + ["--max_steps", str(warmup + steps)])
    accelerator = make_accelerator(args)
    setup_logging(accelerator)
    run = prepare_run_data(train.data_settings(args), accelerator)
    if text_spec is not None:
        texts = [run.reports[c.case_id] for c in run.train_cases if run.reports.get(c.case_id)]
        run.text_model = build_demo_text_tower(
            texts, Path(args.cache_dir) / f"bench-tower-{text_spec['hidden_size']}", accelerator, spec=text_spec
        )
    # time every step: the dataset's __getitem__ and the collate run in this process (num_workers=0),
    # so their time is the time the step waits for data; successive collate calls mark the steps
    step_times, wait_times = [], []
    orig_build = loop.build_train_loader

    def timed_build(*a, **k):
        loader, dataset = orig_build(*a, **k)
        timed = TimedDataset(dataset)
        collate = loader.collate_fn
        state = {"last": None}

        def timed_collate(batch):
            t0 = time.perf_counter()
            out = collate(batch)
            t1 = time.perf_counter()
            if state["last"] is not None:
                step_times.append(t1 - state["last"])
                wait_times.append(timed.take() + (t1 - t0))
            else:
                timed.take()
            state["last"] = t1
            return out

        new_loader = torch.utils.data.DataLoader(
            timed,
            batch_size=loader.batch_size,
            shuffle=False,
            collate_fn=timed_collate,
            num_workers=0,
            drop_last=True,
            generator=loader.generator,
        )
        return new_loader, dataset

    loop.build_train_loader = timed_build
    try:
        summary, _ = loop.train_one(
            TrainingSettings.from_args(args),
            accelerator,
            run,
            task="segmentation",
            output_dir=Path(args.output_dir),
            switches=train.model_switches(args),
            seed=0,
            save_model=False,
            use_trackers=False,
            desc=label,
        )
    finally:
        loop.build_train_loader = orig_build
    step_times, wait_times = step_times[warmup:], wait_times[warmup:]
    per_case = Path(args.output_dir) / "eval" / "per_case.csv"
    import csv

    with per_case.open() as fh:
        rows = list(csv.DictReader(fh))
    result = {
        "model": label,
        "slice_size": "x".join(str(v) for v in _slice_size(run, args)),
        "batch_slices": args.batch_size,
        "step_seconds": round(sum(step_times) / len(step_times), 3),
        "train_slices_per_second": round(args.batch_size * len(step_times) / sum(step_times), 2),
        "data_wait_share": round(sum(wait_times) / sum(step_times), 3),
        "eval_seconds_per_case": round(sum(float(r["seconds"]) for r in rows) / len(rows), 2),
        "eval_case_grid": "full (240x240x155)" if "full" in argv else "demo small (64x64x48)",
        "threads": torch.get_num_threads(),
        "omp_wait_policy": "unset" if CHILD_POLICY == "before" else os.environ.get("OMP_WAIT_POLICY", "unset"),
    }
    return result


def _slice_size(run, args):
    from datasets_scripts.slice_cache import load_cache

    cached = load_cache(Path(args.cache_dir) / "slices", [c.case_id for c in run.train_cases])
    return max(c.height for c in cached), max(c.width for c in cached)


class TimedDataset(torch.utils.data.Dataset):
    """Forwards to a dataset and adds up the seconds spent in ``__getitem__``."""

    def __init__(self, dataset):
        self.dataset, self.seconds = dataset, 0.0

    def __len__(self):
        return len(self.dataset)

    def set_epoch(self, epoch):
        self.dataset.set_epoch(epoch)

    def __getitem__(self, index):
        t0 = time.perf_counter()
        item = self.dataset[index]
        self.seconds += time.perf_counter() - t0
        return item

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


COMPETITOR = "import torch\nx = torch.randn(768, 768)\nwhile True:\n    y = x @ x\n"


def _child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def measure_under_load(steps: int) -> None:
    """Demo s/step alone and beside a competing torch process, for the "before" and "after" threading policies.

    ``--load``: the demo model's seconds per training step alone and beside one competing torch process (a
    matrix-multiply loop with torch's default threading), for two threading policies, each in a fresh
    process: "before" (torch loaded with ``OMP_WAIT_POLICY`` unset and its default thread count) and
    "after" (the policy of :mod:`modeling_emrfuse.runtime.cpu_threads` that train.py applies:
    ``OMP_WAIT_POLICY=PASSIVE`` set before torch loads, threads limited to the allowed cores).
    """
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for policy in POLICIES:
            row = {"policy": policy}
            for beside in (False, True):
                competitor = None
                if beside:
                    competitor = subprocess.Popen(
                        [sys.executable, "-c", COMPETITOR],
                        env=_child_env(),
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    time.sleep(3.0)  # let it start spinning
                try:
                    out = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--child-policy",
                            policy,
                            "--skip-paper",
                            "--demo-steps",
                            str(steps),
                            "--work-dir",
                            work,
                        ],
                        env=_child_env(),
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                finally:
                    if competitor is not None:
                        competitor.kill()
                        competitor.wait()
                result = json.loads(out[out.index("[") :])[0]
                row["beside" if beside else "alone"] = result["step_seconds"]
                row["threads"] = result.get("threads")
                row["omp_wait_policy"] = result.get("omp_wait_policy")
                print(
                    f"  {policy:6s} {'beside a competitor' if beside else 'alone':20s} {result['step_seconds']} s/step",
                    file=sys.stderr,
                )
            row["slowdown"] = round(row["beside"] / row["alone"], 2)
            rows.append(row)
    print()
    print(
        "| threading policy | OMP_WAIT_POLICY at torch load | threads | s/step alone | s/step beside a competing torch process | slowdown |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['policy']} | {r['omp_wait_policy']} | {r['threads']} | {r['alone']} | {r['beside']} | {r['slowdown']}x |"
        )
    print(json.dumps(rows))


def main() -> None:
    """Run the benchmark.

    Measures, for the paper-size model (BERT-base-sized text tower with random weights, ResNet-50,
    the default decoder, fusion_dim 256) on full-size cases (240 x 240 x 155, whole brain slices)
    and for the demo model (the `python train.py --demo` defaults: 2-layer BERT, ResNet-18, 64 x 64
    slices):

      1. training throughput in slices/s (forward + backward + AdamW step, batch of the run, data
         loading included), measured after warm-up steps;
      2. the share of the training step time spent waiting for the next batch (data loading,
         augmentation, collation);
      3. evaluation seconds per case on whole volumes (files -> slices -> model -> label map on the
         original grid -> 3D metrics), for a full-size case with the paper-size model.
    """
    opts = _parse_args()
    if opts.load:
        measure_under_load(opts.demo_steps)
        return
    if opts.child_policy != "before":  # as train.py does
        from modeling_emrfuse.runtime.cpu_threads import limit_torch_threads

        limit_torch_threads()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(opts.work_dir or tmp)
        common = ["--demo", "--report_to", "none", "--cache_dir", str(tmp / "cache"), "--logging_steps", "1000"]
        if not opts.skip_demo:
            results.append(
                measure(
                    common + _demo_model_args(tmp),
                    None,
                    warmup=3,
                    steps=opts.demo_steps,
                    label="demo model (2-layer BERT 64, ResNet-18)",
                )
            )
        if not opts.skip_paper:
            results.append(
                measure(
                    common + _paper_model_args(tmp),
                    BERT_BASE,
                    warmup=1,
                    steps=opts.paper_steps,
                    label="paper-size model (BERT-base-sized, ResNet-50)",
                )
            )
    _print_results(results)


def _parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-paper", action="store_true")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--paper-steps", type=int, default=4)
    p.add_argument("--demo-steps", type=int, default=20)
    p.add_argument(
        "--load",
        action="store_true",
        help="demo s/step alone and beside a competing torch process, before/after train.py's threading policy",
    )
    p.add_argument("--child-policy", choices=POLICIES, help=argparse.SUPPRESS)
    p.add_argument("--work-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def _demo_model_args(tmp: Path) -> list:
    """train.py arguments of the demo model run (its defaults, 64 x 64 slices)."""
    return [
        "--demo_data_dir",
        str(tmp / "demo48"),
        "--output_dir",
        str(tmp / "demo-out"),
        "--max_eval_cases",
        "4",
    ]


def _paper_model_args(tmp: Path) -> list:
    """train.py arguments of the paper-size model run (ResNet-50, fusion_dim 256, full-size demo cases)."""
    return [
        "--demo_cases",
        "4",
        "--demo_size",
        "full",
        "--eval_fraction",
        "0.25",
        "--demo_data_dir",
        str(tmp / "full4"),
        "--output_dir",
        str(tmp / "paper-out"),
        "--vision_model",
        "resnet50",
        "--fusion_dim",
        "256",
        "--cross_attention_heads",
        "8",
        "--decoder_channels",
        "256",
        "128",
        "64",
        "32",
        "16",
        "--batch_size",
        "8",
        "--slices_per_case",
        "4",
    ]


def _print_results(results: list) -> None:
    print()
    print("| model | slice H x W | slices/step | s/step | train slices/s | data-wait share | eval s/case | eval grid |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['model']} | {r['slice_size']} | {r['batch_slices']} | {r['step_seconds']} | {r['train_slices_per_second']} | "
            f"{100 * r['data_wait_share']:.1f} % | {r['eval_seconds_per_case']} | {r['eval_case_grid']} |"
        )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
