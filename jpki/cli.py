"""The ``jpki`` command line: one group, one module a command family.

Command modules are imported when their command runs (Click's lazy-loading pattern), so
``jpki ca export`` does not pay for importing the TSM, the fleet and the benchmarks.
"""

from __future__ import annotations

import importlib

import click


class LazyGroup(click.Group):
    """A group whose subcommands are ``"module:attribute"`` paths, imported on first use."""

    def __init__(self, *args: object, lazy: dict[str, str], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy and cmd_name not in self.commands:
            module_name, attribute = self._lazy[cmd_name].split(":")
            command = getattr(importlib.import_module(module_name), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self._lazy[cmd_name]} is not a click command")
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


# Command families, one line each: name -> "module:attribute".
COMMANDS = {
    "card": "device_sim.vpcd:card_cli",
    "ca": "workers.ca.cli:ca_cli",
    "ocsp": "workers.ca.cli:ocsp_cli",
    "gateway": "workers.gateway.cli:gateway_command",
    "ops": "infra.transport.cli:ops",
    "fleet": "device_sim.fleet:fleet_command",
    "orchestrator": "orchestrator.service:orchestrator_command",
    "run": "jpki.run:run_command",
    "up": "jpki.up:up_command",
    "audit": "jpki.audit:audit_command",
    "worker": "jpki.worker:worker",
    "pin-options": "jpki.pin_options:pin_options_cli",
    "callcentre": "orchestrator.callcentre:callcentre_cli",
}
BENCHMARKS = {
    "ca": "jpki.bench.ca:ca_bench",
    "transport": "jpki.bench.transport:transport_bench",
    "saga": "jpki.bench.saga:saga_bench",
    "tsm": "jpki.bench.tsm:tsm_bench",
    "issuance": "jpki.bench.issuance:issuance_bench",
    "ab": "jpki.bench.ab:ab_bench",
}


@click.group(cls=LazyGroup, lazy=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="jpki-mobile")
def main() -> None:
    """jpki-mobile: JPKI certificates on a smartphone's secure element."""


@main.group(cls=LazyGroup, lazy=BENCHMARKS)
def bench() -> None:
    """Reproducible benchmarks (figures printed with the machine they ran on)."""
    # Warnings only: a log line per operation would measure the console, not the system.
    from infra.logging import configure_logging

    configure_logging("bench", level="WARNING")
