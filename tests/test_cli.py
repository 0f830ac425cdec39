"""The `emrfuse` dispatcher: every command is listed, and only the one that runs is imported."""

import subprocess
import sys

from modeling_emrfuse.commands.cli import COMMANDS


def test_top_level_help_lists_every_command_without_importing_them():
    code = (
        "import sys; from modeling_emrfuse.commands.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'datasets', 'modeling_emrfuse.commands.predict') if m in sys.modules]\n"
        "print('IMPORTED', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out
    assert "IMPORTED []" in out


def test_a_command_gets_its_own_full_parser():
    out = subprocess.run(
        [sys.executable, "-m", "modeling_emrfuse.commands.cli", "score", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--pred" in out and "--ref" in out
