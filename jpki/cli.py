"""The ``jpki`` command line: one group, one module a command family."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="jpki-mobile")
def main() -> None:
    """jpki-mobile: JPKI certificates on a smartphone's secure element."""


@main.group()
def bench() -> None:
    """Reproducible benchmarks (figures printed with the machine they ran on)."""
    # Warnings only: a log line per operation would measure the console, not the system.
    from infra.logging import configure_logging

    configure_logging("bench", level="WARNING")


# Command families register below, one line each.
from device_sim.vpcd import card_cli  # noqa: E402, I001
main.add_command(card_cli)
from workers.ca.cli import ca_cli, ocsp_cli  # noqa: E402, I001
main.add_command(ca_cli)
main.add_command(ocsp_cli)
from workers.gateway.cli import gateway_command  # noqa: E402, I001
main.add_command(gateway_command)
from infra.transport.cli import ops  # noqa: E402, I001
main.add_command(ops)
from device_sim.fleet import fleet_command  # noqa: E402, I001
main.add_command(fleet_command)
from orchestrator.service import orchestrator_command  # noqa: E402, I001
main.add_command(orchestrator_command)
from jpki.run import run_command  # noqa: E402, I001
main.add_command(run_command)
from jpki.up import up_command  # noqa: E402, I001
main.add_command(up_command)
from jpki.audit import audit_command  # noqa: E402, I001
main.add_command(audit_command)
from jpki.worker import worker  # noqa: E402, I001
main.add_command(worker)
from jpki.bench.ca import ca_bench  # noqa: E402, I001
bench.add_command(ca_bench)
from jpki.bench.transport import transport_bench  # noqa: E402, I001
bench.add_command(transport_bench)
from jpki.bench.saga import saga_bench  # noqa: E402, I001
bench.add_command(saga_bench)
from jpki.bench.tsm import tsm_bench  # noqa: E402, I001
bench.add_command(tsm_bench)
from jpki.pin_options import pin_options_cli  # noqa: E402, I001
main.add_command(pin_options_cli)
from jpki.bench.issuance import issuance_bench  # noqa: E402, I001
bench.add_command(issuance_bench)
from orchestrator.callcentre import callcentre_cli  # noqa: E402, I001
main.add_command(callcentre_cli)
