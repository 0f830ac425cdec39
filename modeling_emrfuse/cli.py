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

# command name -> module providing add_parser(subparsers)
COMMANDS = {
    "demo-data": "datasets_scripts.demo_data",
    "prepare": "datasets_scripts.brats_text",
    "score": "modeling_emrfuse.metrics_cli",
    "predict": "modeling_emrfuse.predict_cli",
}


def build_parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emrfuse",
        description="EmrFuse: multimodal (MRI + report) brain-tumour grading and segmentation.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module_name in COMMANDS.items():
        if wanted is not None and wanted in COMMANDS and name != wanted:
            continue  # only import the module of the command that runs
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
