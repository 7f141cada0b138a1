"""The ``jpki`` group loads its command modules lazily: every name must still resolve."""

from __future__ import annotations

import subprocess
import sys

import click
from click.testing import CliRunner

from jpki.cli import BENCHMARKS, COMMANDS, bench, main


def test_every_command_resolves_to_a_click_command_of_that_name() -> None:
    for group, table in ((main, COMMANDS), (bench, BENCHMARKS)):
        ctx = click.Context(group)
        for name in table:
            command = group.get_command(ctx, name)
            assert isinstance(command, click.Command), name
            assert command.name == name


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    listed = {line.split()[0] for line in result.stdout.split("Commands:")[1].splitlines()
              if line.strip()}
    assert listed == {*COMMANDS, "bench"}


def test_one_command_does_not_import_the_others() -> None:
    probe = ("import sys; from jpki.cli import main; "
             "main(['ca', '--help'], standalone_mode=False); "
             "print(sorted(m for m in ('workers.tsm.engine', 'device_sim.fleet', "
             "'jpki.bench.issuance', 'orchestrator.saga.engine') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
