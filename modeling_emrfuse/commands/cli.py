"""The ``emrfuse`` command line: one entry point, one sub-command per job.

Each sub-command lives in the module that owns the work and registers itself through an
``add_parser(subparsers)`` function; this file only dispatches. Modules are imported lazily so
that ``emrfuse --help`` stays fast and a missing optional dependency only affects its command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# command name -> (module providing add_parser(subparsers), one-line summary for the top-level help)
COMMANDS = {
    "demo-data": ("datasets_scripts.demo_data", "write synthetic BraTS-2020-layout cases with reports (demo data)"),
    "prepare": ("datasets_scripts.brats_text", "build the BraTS + report dataset from a release folder and write it"),
    "score": (
        "modeling_emrfuse.commands.score",
        "score predicted NIfTI label maps against references (Dice, PPV, sensitivity, HD95)",
    ),
    "predict": (
        "modeling_emrfuse.commands.predict",
        "segment and grade a case (or a folder of cases) with an EmrFuse model",
    ),
}


def build_parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    """The parser; only the module of the command being run is imported (``emrfuse --help`` stays instant)."""
    parser = argparse.ArgumentParser(
        prog="emrfuse",
        description="EmrFuse: multimodal (MRI + report) brain-tumour grading and segmentation.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv or [] if not a.startswith("-")), None)
    for name, (module_name, summary) in COMMANDS.items():
        if name != wanted:
            subparsers.add_parser(name, help=summary)  # listed only; its module is not needed
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # pragma: no cover - depends on the environment
            sub = subparsers.add_parser(name, help=f"(unavailable: {exc})")
            sub.set_defaults(func=lambda args, exc=exc: _unavailable(exc))
            continue
        module.add_parser(subparsers)
    return parser


def _unavailable(exc: Exception) -> int:
    print(f"emrfuse: this command is unavailable here: {exc}", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
