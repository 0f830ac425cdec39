"""``emrfuse predict``: segment and grade brain MRI cases with an EmrFuse model, from the shell.

A thin layer over :class:`modeling_emrfuse.pipeline_emrfuse.EmrFusePipeline` (the same inference as
``transformers.pipeline(model=..., trust_remote_code=True)``): it finds the cases, calls the pipeline
and writes, for each case, ``<case_id>.nii.gz`` (the label map on the input's grid) and
``<case_id>.json`` (:func:`prediction_record`). Exit statuses are documented at :data:`EXIT_OK`.

    emrfuse predict path/to/BraTS20_Training_001 --report-file report.txt -o predictions/
    emrfuse predict path/to/MICCAI_BraTS2020_TrainingData -o predictions/   # a folder of cases

``emrfuse predict --help`` and the README describe every option.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..brats_io import (
    CaseFiles,
    case_id_from_file_names,
    discover_cases,
    label_convention_from_file_names,
    read_reports,
    write_label_map,
)
from ..brats_labels import LABEL_CONVENTIONS, SEQUENCES, get_label_convention
from ..runtime.cpu_threads import limit_torch_threads, prefer_passive_openmp
from ..runtime.strict_json import write_json

# Exit status: 0 when every case was predicted; 1 when some cases of a folder failed (the others are
# written and predict_summary.json says which failed and why); 2 for bad input, an output location that
# cannot be written (checked before the model is loaded) or an unusable model (not an EmrFuse folder,
# pickled, truncated, corrupted or non-finite weights, a corrupt tokenizer file): a one-line message
# naming the file, no traceback. Under torchrun every process returns that status; the launcher itself
# exits with 1 when it is not 0.
EXIT_OK, EXIT_SOME_FAILED, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_OUTPUT_DIR = "predictions"


class PredictError(ValueError):
    """Expected problem with the command's input (printed as one line, exit status 2)."""


# ------------------------------------------------------------------------------------------ records
def prediction_record(
    result: Dict[str, Any], label_map_file: Optional[str], inputs: Dict[str, str], extra: Dict[str, Any]
) -> Dict[str, Any]:
    """The JSON document written next to a label map: grade and grade probabilities, region volumes in
    cm^3 (voxel size from the header), ``alpha_text`` / ``alpha_image``, whether the report was missing,
    truncated or capped at ``--max-report-chars``, the model id and revision, the label convention, the
    missing (zero-filled) sequences, the resampling grids, any warnings and timings. Never the report text.
    Every JSON written is strict JSON (no bare ``NaN``)."""
    conv = get_label_convention(result["label_convention"])
    record: Dict[str, Any] = {
        "case_id": result.get("case_id"),
        "label_map": label_map_file,
        "label_convention": conv.name,
        "labels": {str(k): v for k, v in conv.labels.items()},
        "shape": [int(s) for s in result["shape"]],
        "spacing_mm": [float(s) for s in result["spacing"]],
        "grade": result.get("grade"),
        "grade_probabilities": result.get("grade_probabilities"),
        "region_volumes_cm3": result.get("region_volumes_cm3"),
        "alpha_text": result.get("alpha_text"),
        "alpha_image": result.get("alpha_image"),
        "has_report": bool(result.get("has_report")),
        "report_missing": not bool(result.get("has_report")),
        "report_truncated": bool(result.get("report_truncated")),
        "report_source": result.get("report_source"),
        "report_capped": bool(result.get("report_capped")),
        "reoriented_from": result.get("reoriented_from"),
        "missing_sequences": list(result.get("missing_sequences") or []),
        "resampling": result.get("resampling"),
        "tta": bool(result.get("tta")),
        "probe_stride": int(result.get("probe_stride") or 1),
        "probe_box_margin": result.get("probe_box_margin"),
        "postprocessing": result.get("postprocessing"),
        "warnings": list(result.get("warnings") or []),
        "model": {"id": result.get("model_id"), "revision": result.get("revision")},
        "inputs": inputs,
        "timings_s": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.get("timings", {}).items()},
    }
    if result.get("grading_model_id"):
        record["model"]["grading_id"] = result.get("grading_model_id")
        record["model"]["grading_revision"] = result.get("grading_revision")
    if result.get("segmentation_model_id"):
        record["model"]["segmentation_id"] = result.get("segmentation_model_id")
        record["model"]["segmentation_revision"] = result.get("segmentation_revision")
    record.update(extra)
    return record


# ------------------------------------------------------------------------------------------ cases
def find_cases(args) -> Tuple[List[CaseFiles], List[Dict[str, str]], bool]:
    """The cases to predict, each discovered once: ``(cases, skipped, single)``. A case is a
    :class:`~modeling_emrfuse.brats_io.CaseFiles` (its files, id, release, label convention, report file) that
    goes as it is to the pipeline and into the written record.

    A case lacking sequences is accepted only with ``--allow-missing-sequences`` (a single case
    otherwise fails with a one-line error; in a folder of cases it is skipped with that reason)."""
    allow_missing = bool(getattr(args, "allow_missing_sequences", False))
    explicit = {s: getattr(args, s) for s in SEQUENCES if getattr(args, s, None)}
    if explicit:
        return [_explicit_case(args, explicit, allow_missing)], [], True
    found, root = _discover(args)
    skipped = [{"case_id": s.case_id, "reason": f"{s.reason} ({s.path})"} for s in found.skipped]
    single = len(found) + len(skipped) == 1 and (
        (len(found) == 1 and found[0].source_dir is not None and Path(found[0].source_dir).resolve() == root.resolve())
        or (len(skipped) == 1 and Path(found.skipped[0].path).resolve() == root.resolve())
    )
    cases = list(found)
    if not allow_missing:
        skipped += [_missing_skip(c, root) for c in cases if c.missing_sequences]
        cases = [c for c in cases if not c.missing_sequences]
    if args.case_id and single and cases:
        cases[0] = dataclasses.replace(cases[0], case_id=args.case_id)
    return cases, skipped, single


def _explicit_case(args, explicit: Dict[str, str], allow_missing: bool) -> CaseFiles:
    """The one case of ``--t1/--t1ce/--t2/--flair``."""
    if args.input:
        raise PredictError("give either a case folder or --t1/--t1ce/--t2/--flair, not both.")
    missing = [s for s in SEQUENCES if s not in explicit]
    if missing and not allow_missing:
        raise PredictError(
            f"missing sequence(s) {missing}: give all four of --t1 --t1ce --t2 --flair, or pass "
            "--allow-missing-sequences to zero-fill the missing ones."
        )
    return CaseFiles(
        case_id=args.case_id or case_id_from_file_names(explicit.values()),
        release=None,
        label_convention=label_convention_from_file_names(explicit.values()),
        grade=None,
        sequences={s: Path(v) for s, v in explicit.items()},
    )


def _discover(args):
    """The cases under ``args.input`` (a case folder or a folder of cases), lacking sequences or not, and the
    folder; problems become one-line errors."""
    if not args.input:
        raise PredictError(
            "give a case folder, a folder of cases, or the four files --t1 --t1ce --t2 --flair "
            "(a subset with --allow-missing-sequences)."
        )
    root = Path(args.input).expanduser()
    if not root.exists():
        raise PredictError(f"{root} does not exist.")
    if not root.is_dir():
        raise PredictError(
            f"{root} is a file: give a case folder, or the four sequences with --t1 --t1ce --t2 --flair."
        )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped cases are reported in the summary instead
        try:
            # cases lacking sequences are found, then refused without --allow-missing-sequences
            return discover_cases(root, release=args.release, on_error="skip", allow_missing_sequences=True), root
        except ValueError as exc:
            raise PredictError(str(exc)) from exc


def _missing_skip(case: CaseFiles, root: Path) -> Dict[str, str]:
    """The summary entry of a case left out for its missing sequences."""
    present = ", ".join(f"{k}={Path(v).name}" for k, v in case.sequences.items())
    return {
        "case_id": case.case_id,
        "reason": f"missing sequence(s) {case.missing_sequences} (found: {present}); pass --allow-missing-sequences "
        f"to zero-fill them ({case.source_dir if case.source_dir is not None else root})",
    }


def _report_for(case: CaseFiles, args, reports: Optional[Dict[str, str]]) -> Tuple[Optional[str], Optional[str]]:
    """(report text, source) for a case: --report / --report-file, then --reports, then the case's own file."""
    if args.report is not None:
        return args.report, "argument"
    if args.report_file is not None:
        return args._report_file_text, "file"
    if reports is not None and case.case_id in reports:
        return reports[case.case_id], "reports file"
    return None, None


def _read_text_file(path: str, what: str, max_chars: int) -> str:
    """The text of ``path``, at most ``max_chars + 1`` characters read (the pipeline cuts it to ``max_chars`` and
    says so): a huge file is never read whole."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise PredictError(f"{what} {p} is a folder: give a UTF-8 text file.")
    if not p.exists():
        raise PredictError(f"{what} {p} does not exist.")
    try:
        with open(p, encoding="utf-8") as fh:
            return fh.read(max_chars + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise PredictError(f"{what} {p} cannot be read as UTF-8 text ({type(exc).__name__}).") from exc


def check_case_id(case_id: Optional[str], what: str = "case id") -> None:
    """Refuse (``PredictError``) a case id that cannot be a file name inside the output folder: empty, ``.`` or
    ``..``, or holding a path separator or a NUL byte (``--case-id ../x`` or ``/tmp/x`` would write elsewhere)."""
    if not case_id or case_id.strip() in (".", "..") or any(c in case_id for c in ("/", "\\", "\0")):
        raise PredictError(
            f"{what} {case_id!r} cannot be used as a file name: give a name without '/', '\\' or "
            "'..' (the outputs are written as <case id>.nii.gz and <case id>.json inside -o)."
        )


def _single_file_output(out: Path, single: bool) -> bool:
    name = out.name.lower()
    return single and (name.endswith(".nii.gz") or name.endswith(".nii"))


def check_output_location(out: Path, single: bool) -> None:
    """Refuse (``PredictError``) an output location that cannot be written, before any model is loaded.

    The output folder (``-o``, or for one case the folder of ``-o x.nii.gz``) must be a folder or not exist
    yet; its nearest existing parent must be a folder in which a file can be created (tried with a
    temporary file, removed at once: nothing is left behind when the run fails later). A single-case
    ``.nii.gz`` target must not be an existing folder.
    """
    file_target = _single_file_output(out, single)
    folder = out.parent if file_target else out
    if file_target and out.is_dir():
        raise PredictError(
            f"output {out} is a folder; give a .nii.gz file name, or a folder without the .nii.gz suffix."
        )
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file" if existing == folder else f"is below {existing}, which is a file"
        raise PredictError(f"output {out} {what}: give a folder (or, for one case, a .nii.gz file name).")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise PredictError(
            f"output {out} cannot be written: no file can be created in {existing} "
            f"({exc.strerror or type(exc).__name__})."
        ) from None


def _output_paths(case_id: str, out: Path, single: bool) -> Tuple[Path, Path]:
    name = out.name.lower()
    if _single_file_output(out, single):
        stem = out.name[: -len(".nii.gz")] if name.endswith(".nii.gz") else out.name[: -len(".nii")]
        return out, out.with_name(stem + ".json")
    return out / f"{case_id}.nii.gz", out / f"{case_id}.json"


# ------------------------------------------------------------------------------------------ command
def run(args: argparse.Namespace) -> int:
    """Run ``emrfuse predict``; returns the exit status (:data:`EXIT_OK` and its siblings).

    The model folder is loaded with the installed emrfuse classes (``model_type`` checked) and nothing
    from it runs unless ``--trust-remote-code`` is given; weights are read from safetensors only (a
    pickled ``pytorch_model.bin`` is refused unread); nothing is written outside ``-o``
    (:func:`check_case_id`); label maps and JSONs are written under a temporary name and renamed.
    """
    # OpenMP threads that sleep instead of spinning while they wait: on cores shared with other work
    # (laptops, CI, shared servers) spinning threads steal the time their siblings need (measured here:
    # 1.5-3.7x slower under load, no gain when idle). Set before torch is imported; the user's value wins.
    prefer_passive_openmp()
    try:
        return _run(args)
    except PredictError as exc:
        print(f"emrfuse predict: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _run(args: argparse.Namespace) -> int:
    cases, skipped, single, reports, out = _prepare(args)
    processes = ProcessShare.from_environment(args.device)
    pipe = _load_pipeline(args, processes)
    mine = processes.share(cases)
    written, failures = _predict_cases(pipe, mine, args, reports, out, single, show_progress=processes.is_main)
    if not single:
        written, failures = processes.gather(cases, written, failures)
        failures = list(skipped) + failures
        if processes.is_main:
            _write_summary(out, written, failures)
    processes.finish()
    return EXIT_SOME_FAILED if failures else EXIT_OK


def _prepare(args: argparse.Namespace):
    """Check the arguments, find the cases and check the output location, before any model is loaded:
    ``(cases, skipped, single, reports, output path)``."""
    if args.report is not None and args.report_file is not None:
        raise PredictError("give either --report or --report-file, not both.")
    if args.label_convention is not None:
        try:
            get_label_convention(args.label_convention)
        except ValueError as exc:
            raise PredictError(str(exc)) from exc
    if not 0.0 < args.threshold < 1.0:
        raise PredictError(f"--threshold must be in (0, 1), got {args.threshold}.")
    if args.max_report_chars < 1:
        raise PredictError(f"--max-report-chars must be >= 1, got {args.max_report_chars}.")
    for option in ("min_component_mm3", "et_min_mm3"):
        value = getattr(args, option, None)
        if value is not None and not 0.0 <= value < float("inf"):
            raise PredictError(f"--{option.replace('_', '-')} must be a number of mm^3 >= 0, got {value}.")
    if args.case_id is not None:
        check_case_id(args.case_id, "--case-id")
    args._report_file_text = (
        _read_text_file(args.report_file, "report file", args.max_report_chars) if args.report_file else None
    )
    reports = None
    if args.reports is not None:
        try:
            reports = read_reports(args.reports)
        except (ValueError, FileNotFoundError) as exc:
            raise PredictError(str(exc)) from exc

    cases, skipped, single = find_cases(args)
    if single and skipped and not cases:
        raise PredictError(f"case {skipped[0]['case_id']}: {skipped[0]['reason']}")
    if not single and (args.report is not None or args.report_file is not None):
        raise PredictError(
            "--report / --report-file are for one case; for a folder of cases use --reports FILE "
            "(CSV/JSONL case id -> text) or per-case <case>_flair_text.txt files."
        )
    out = Path(args.output).expanduser()
    check_output_location(out, single)  # before the model is loaded and any case computed
    return cases, skipped, single, reports, out


def _load_pipeline(args: argparse.Namespace, processes: "ProcessShare"):
    """The pipeline, on ``--device`` or this process's device (one GPU per process under a launcher)."""
    revision = args.revision
    if revision is not None and Path(args.model).expanduser().is_dir():
        print(
            f"emrfuse predict: warning: --revision {revision} is ignored: {args.model} is a local folder "
            "(a revision selects a Hub commit).",
            file=sys.stderr,
        )
        revision = None
    try:  # --threads, else OMP_NUM_THREADS, else the allowed cores shared by this node's processes
        limit_torch_threads(args.threads)
    except ValueError as exc:
        raise PredictError(f"--threads: {exc}") from exc

    from transformers.utils import logging as hf_logging

    from ..pipeline_emrfuse import DEFAULT_GRADING_SLICES, load_pipeline

    hf_logging.disable_progress_bar()  # weight-loading bars; the per-case bar below stays
    try:
        return load_pipeline(
            args.model,
            grading_model=False if args.no_grading else args.grading_model,
            revision=revision,
            device=args.device or processes.device,
            precision=args.precision,
            chunk_size=args.chunk_size,
            grading_max_slices=DEFAULT_GRADING_SLICES if args.grading_slices is None else (args.grading_slices or None),
            trust_remote_code=bool(getattr(args, "trust_remote_code", False)),
        )
    except (OSError, ValueError, ImportError) as exc:  # missing folder, offline Hub, not an EmrFuse model
        raise PredictError(f"cannot load the model {args.model!r}: {exc}") from exc


def _predict_cases(pipe, cases, args, reports, out: Path, single: bool, show_progress: bool = True):
    """Predict and write each case: ``(case ids written, failures)``. In a folder of cases a failing case is
    recorded with its reason and the others go on; a single case's failure is raised."""
    failures: List[Dict[str, str]] = []
    written: List[str] = []
    progress = None
    iterator = cases
    if not single:
        from tqdm.auto import tqdm

        progress = tqdm(cases, desc="emrfuse predict", unit="case", disable=args.quiet or not show_progress or None)
        iterator = progress
    for case in iterator:
        try:
            _predict_one(pipe, case, args, reports, out, single)
            written.append(case.case_id)
        except (ValueError, OSError, ImportError) as exc:
            if single:
                raise PredictError(f"case {case.case_id}: {exc}") from exc
            failures.append({"case_id": case.case_id, "reason": f"{type(exc).__name__}: {exc}"})
        except Exception as exc:  # a batch goes on; the summary says which case failed and why
            if single:
                raise
            failures.append({"case_id": case.case_id, "reason": f"unexpected {type(exc).__name__}: {exc}"})
    if progress is not None:
        progress.close()
    return written, failures


def _probe_options(args) -> Dict[str, int]:
    """The tumour-slab options given on the command line (none: every slice, the exact path)."""
    options = {}
    if getattr(args, "probe_stride", None) not in (None, 1):
        options["probe_stride"] = int(args.probe_stride)
        for option in ("probe_margin", "probe_box_margin"):
            if getattr(args, option, None) is not None:
                options[option] = int(getattr(args, option))
    return options


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _postprocessing_options(args) -> Dict[str, float]:
    """The post-processing options given on the command line (none given: the model folder's setting)."""
    options = {}
    for option in ("min_component_mm3", "et_min_mm3"):
        if getattr(args, option, None) is not None:
            options[option] = float(getattr(args, option))
    return options


def _predict_one(pipe, case: CaseFiles, args, reports, out: Path, single: bool) -> None:
    """One case through the pipeline; writes its label map and JSON."""
    check_case_id(case.case_id)
    report, source = _report_for(case, args, reports)
    result = pipe(
        case,  # read as discovered, not discovered again
        report=report,
        label_convention=args.label_convention or case.label_convention or "brats2017",
        use_case_report=not args.ignore_case_reports,
        threshold=args.threshold,
        allow_missing_sequences=bool(getattr(args, "allow_missing_sequences", False)),
        resample=bool(getattr(args, "resample", False)),
        max_report_chars=getattr(args, "max_report_chars", None),
        **({"tta": True} if getattr(args, "tta", False) else {}),  # a folder's own older pipeline has no tta
        **_postprocessing_options(args),
        **_probe_options(args),  # only when asked for: a folder's own older pipeline has no probe
    )
    if source is not None and result.get("has_report"):
        result["report_source"] = source
    t0 = time.perf_counter()
    nifti_path, json_path = _output_paths(case.case_id, out, single)
    if result["label_map"] is not None:
        write_label_map(nifti_path, result["label_map"], result["affine"], result["header"])
        label_file = nifti_path.name
    else:
        label_file = None
    extra: Dict[str, Any] = {"precision": pipe.precision}
    if args.save_attention:
        extra["words"] = result.get("words")
        extra["tokens"] = result.get("tokens")
        extra["token_attention"] = result.get("token_attention")
    record = prediction_record(result, label_file, {k: str(v) for k, v in case.sequences.items()}, extra)
    record["timings_s"]["write"] = round(time.perf_counter() - t0, 4)
    record["timings_s"]["model_load_once"] = round(pipe.load_seconds or 0.0, 4)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(json_path, record, indent=2)
    if single and not args.quiet:
        _print_case(record, nifti_path if label_file else None, json_path)


def _write_summary(out: Path, written: List[str], failures: List[Dict[str, str]]) -> None:
    """``predict_summary.json`` of a folder of cases, and the one-line account on stderr."""
    summary = {"predicted": written, "failed": failures, "output_dir": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "predict_summary.json", summary, indent=2)
    print(f"emrfuse predict: {len(written)} case(s) predicted into {out}, {len(failures)} failed.", file=sys.stderr)
    for f in failures:
        print(f"  failed {f['case_id']}: {f['reason']}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ processes
class ProcessShare:
    """This process's share of the cases when ``emrfuse predict`` runs under ``torchrun`` or ``accelerate
    launch`` (``WORLD_SIZE`` > 1), through accelerate's :class:`~accelerate.PartialState`; one process
    otherwise, with no process group and nothing changed. On CPU, for example:
    ``ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m modeling_emrfuse.commands.cli predict cases/ -o out/``;
    on GPUs, one process per GPU. Each process loads the model once; the outputs are those of a single process.

    Each process predicts and writes its own contiguous share of the cases
    (``PartialState.split_between_processes``); the per-case records are then gathered
    (``accelerate.utils.gather_object``: ``all_gather_object``, gloo on CPU) so that the main process writes
    the one summary, in the order of the cases, and every process returns the same exit status.
    """

    def __init__(self, state=None):
        self.state = state

    @classmethod
    def from_environment(cls, device: Optional[str] = None) -> "ProcessShare":
        """One process, or under a launcher accelerate's state: on the CPU (gloo) with
        ``ACCELERATE_USE_CPU=true``, ``--device cpu`` or no GPU, otherwise one GPU per process."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        import torch
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        has_accelerator = (
            torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
        )
        cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or str(device or "").startswith("cpu") or not has_accelerator
        state = PartialState(cpu=cpu)
        if state.num_processes != world_size:  # each process would predict every case
            raise PredictError(
                f"launched as {world_size} processes, but accelerate set up {state.num_processes}; on "
                "CPU set ACCELERATE_USE_CPU=true."
            )
        return cls(state)

    @property
    def is_main(self) -> bool:
        return self.state is None or self.state.is_main_process

    @property
    def device(self) -> Optional[str]:
        """This process's device under a launcher (its own GPU, or the CPU); ``None`` (the default) otherwise."""
        return None if self.state is None else str(self.state.device)

    def share(self, cases: List[CaseFiles]) -> List[CaseFiles]:
        if self.state is None:
            return cases
        with self.state.split_between_processes(cases) as mine:
            return list(mine)

    def gather(
        self, cases, written: List[str], failures: List[Dict[str, str]]
    ) -> Tuple[List[str], List[Dict[str, str]]]:
        """Every process's written case ids and failures, in the order of ``cases``."""
        if self.state is None:
            return written, failures
        from accelerate.utils import gather_object

        parts = gather_object([{"written": written, "failures": failures}])
        order = {c.case_id: i for i, c in enumerate(cases)}
        all_written = sorted((w for part in parts for w in part["written"]), key=order.__getitem__)
        all_failures = sorted((f for part in parts for f in part["failures"]), key=lambda f: order[f["case_id"]])
        return all_written, all_failures

    def finish(self) -> None:
        """Wait until the main process has written the summary, then leave the process group."""
        if self.state is not None:
            self.state.wait_for_everyone()
            self.state.destroy_process_group()


def _print_case(record: Dict[str, Any], nifti: Optional[Path], json_path: Path) -> None:
    parts = [f"case {record['case_id']}"]
    if record.get("grade"):
        p = record["grade_probabilities"][record["grade"]]
        parts.append(f"grade {record['grade']} (p={p:.2f})")
    if record.get("region_volumes_cm3"):
        parts.append(", ".join(f"{k} {v:.1f} cm3" for k, v in record["region_volumes_cm3"].items()))
    if record["report_missing"]:
        parts.append("no report")
    elif record["report_truncated"]:
        parts.append("report truncated")
    if record.get("missing_sequences"):
        parts.append(f"missing sequence(s) {', '.join(record['missing_sequences'])} (zero-filled)")
    print("; ".join(parts))
    for warning in record.get("warnings") or []:
        print(f"emrfuse predict: warning: {warning}", file=sys.stderr)
    if nifti is not None:
        print(f"label map: {nifti}")
    print(f"details:   {json_path}")


# The pipeline's defaults, repeated here so that ``--help`` and argument errors never import torch (the pipeline
# module does); tests/test_predict_cli.py checks that they equal pipeline_emrfuse's.
DEFAULT_MODEL = os.path.join("outputs", "emrfuse-demo")
DEFAULT_MAX_REPORT_CHARS = 65536


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``emrfuse predict`` on the ``emrfuse`` CLI's sub-parsers."""
    p = subparsers.add_parser(
        "predict",
        help="segment and grade a case (or a folder of cases) with an EmrFuse model",
        description=(
            "Segment (WT/TC/ET label map) and grade (HGG/LGG) brain MRI cases with an EmrFuse model. Input: a case "
            "folder in any BraTS layout, a folder of cases, or the four sequence files. Output: <case>.nii.gz "
            "(label map on the input's grid, with its affine and header) and <case>.json."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  emrfuse predict data/BraTS20_Training_001 --report-file report.txt -o predictions/\n"
            "  emrfuse predict --t1 a_t1.nii.gz --t1ce a_t1ce.nii.gz --t2 a_t2.nii.gz --flair a_flair.nii.gz\n"
            "  emrfuse predict data/MICCAI_BraTS2020_TrainingData --reports reports.jsonl -o predictions/\n"
            "  emrfuse predict --t1ce a_t1ce.nii.gz --flair a_flair.nii.gz --allow-missing-sequences\n"
            "exit status: 0 all predicted, 1 some cases of a folder failed (see predict_summary.json), "
            "2 bad input or model"
        ),
    )
    _add_input_options(p)
    _add_report_options(p)
    _add_model_options(p)
    _add_output_options(p)
    _add_runtime_options(p)
    p.set_defaults(func=run)
    return p


def _add_input_options(p: argparse.ArgumentParser) -> None:
    """The case(s) to predict: a folder, or the sequence files one by one."""
    p.add_argument("input", nargs="?", help="a case folder or a folder of cases (any BraTS layout)")
    for name in SEQUENCES:
        p.add_argument(
            f"--{name}",
            metavar="FILE",
            help=f"the {name.upper()} NIfTI file (with the three others, or any of them with --allow-missing-sequences)",
        )
    p.add_argument("--case-id", help="case id of the outputs (default: from the folder / file names)")
    p.add_argument(
        "--allow-missing-sequences",
        action="store_true",
        help="accept cases with any non-empty subset of T1/T1ce/T2/FLAIR (files or case folders): the missing "
        "sequences are zero-filled. A model trained with sequence dropout (train.py --sequence_dropout) "
        "gets sequence-presence channels saying which are missing; a model without them still runs, "
        "but does not know a sequence is missing (a warning says so). The JSON lists missing_sequences.",
    )


def _add_report_options(p: argparse.ArgumentParser) -> None:
    """Where the radiology reports come from (their own argument group)."""
    group = p.add_argument_group("report (never printed or logged)")
    group.add_argument("--report", metavar="TEXT", help="the radiology report of the case")
    group.add_argument("--report-file", metavar="FILE", help="a UTF-8 text file holding the report")
    group.add_argument(
        "--reports", metavar="FILE", help="for a folder of cases: CSV/JSONL/JSON of case id -> report text"
    )
    group.add_argument(
        "--max-report-chars",
        type=int,
        default=DEFAULT_MAX_REPORT_CHARS,
        metavar="N",
        help=f"read at most N characters of a report (default {DEFAULT_MAX_REPORT_CHARS}); a longer one is "
        "cut, and the JSON says so (report_capped, warnings)",
    )
    group.add_argument(
        "--ignore-case-reports",
        action="store_true",
        help="do not use the reports found in the case folders (<case>_flair_text.txt)",
    )


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Which segmentation / grading model is loaded, and whether its code may run."""
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model folder or Hub id (default {DEFAULT_MODEL}, which the README's main job makes)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the Python code that the model folder or Hub repository names in its config (auto_map) "
        "instead of the installed emrfuse classes; only for a model source you trust (without it, "
        "nothing from the folder is executed)",
    )
    p.add_argument(
        "--revision",
        help="Hub revision (branch, tag or commit) of --model (ignored, with a warning, for a local folder)",
    )
    p.add_argument(
        "--grading-model", help="grading model folder / Hub id when --model holds only the segmentation model"
    )
    p.add_argument("--no-grading", action="store_true", help="segmentation only (skip the grading model)")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """Where the outputs go and how the label map is made: labels, release, threshold, resampling, flips, post-processing."""
    p.add_argument(
        "-o",
        "--output",
        default=DEFAULT_OUTPUT_DIR,
        help=f"output folder (default {DEFAULT_OUTPUT_DIR}/), or for one case a .nii.gz file (the JSON goes next to it)",
    )
    p.add_argument(
        "--label-convention",
        choices=sorted(LABEL_CONVENTIONS),
        default=None,
        help="labels of the output map (default: the convention of the input's BraTS release; brats2017 if unknown)",
    )
    p.add_argument(
        "--release", default="auto", help="force the BraTS release of the input layout (e.g. 2018, 2023; default auto)"
    )
    p.add_argument("--threshold", type=float, default=0.5, help="region probability threshold (default 0.5)")
    p.add_argument(
        "--resample",
        action="store_true",
        help="a case whose voxel spacing is not the model's (1 mm for BraTS models) is resampled to it "
        "(trilinear, nnU-Net/MONAI style) and the region probabilities back onto the input grid, so "
        "that the label map is on the input's grid with its affine; without it such a case is an "
        'error. The JSON records both grids under "resampling".',
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time flips: average the region probabilities over each slice and its flips along the two "
        'in-plane axes (4 forward passes of the segmentation model instead of 1); the JSON records "tta"',
    )
    p.add_argument(
        "--probe-stride",
        type=_int_at_least(1),
        default=None,
        metavar="K",
        help="speed: segment every K-th slice first, then only the slab of slices around the tumour it finds "
        "(every other slice is background); 1 or unset: every slice (exact). A lesion thinner than K slices lying "
        'apart from the rest can be missed; the JSON records "probe_stride"',
    )
    p.add_argument(
        "--probe-margin",
        type=_int_at_least(0),
        default=None,
        metavar="SLICES",
        help="with --probe-stride: extra slices segmented on each side of the slab (default 2)",
    )
    p.add_argument(
        "--probe-box-margin",
        type=_int_at_least(0),
        default=None,
        metavar="PIXELS",
        help="with --probe-stride: also crop the slab's slices in-plane to the probe's tumour box plus this many "
        "pixels (not exact: less context at the box's edges; default: whole slices)",
    )
    p.add_argument(
        "--min-component-mm3",
        type=float,
        default=None,
        metavar="MM3",
        help="post-processing: remove whole-tumour connected components (26-connected) smaller than this many mm^3, "
        "with their core and enhancing voxels (default: the model folder's setting, 0 = off unless it sets one)",
    )
    p.add_argument(
        "--et-min-mm3",
        type=float,
        default=None,
        metavar="MM3",
        help="post-processing: when the predicted enhancing tumour totals less than this many mm^3, relabel it as "
        'tumour core (default: the model folder\'s setting, 0 = off unless it sets one); the JSON records "postprocessing"',
    )


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    """Device, precision, batching, threads and what else is reported."""
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto (default): bf16 weights where the CPU/GPU has native bf16, fp32 otherwise",
    )
    p.add_argument("--chunk-size", type=int, default=None, help="slices per image-tower call (default: the model's)")
    p.add_argument(
        "--grading-slices",
        type=int,
        default=None,
        help="grade from at most this many evenly spaced brain slices (default: the grading model's "
        "config.grading_slices, the policy its accuracy was measured with; 0: all slices)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per process (default: OMP_NUM_THREADS if set, else the cores this process may "
        "use, shared by the processes of a torchrun / accelerate launch)",
    )
    p.add_argument(
        "--save-attention",
        action="store_true",
        help="also write the report's words and their attention weights into the JSON",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or per-case summary")
