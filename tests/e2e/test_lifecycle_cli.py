"""``jpki callcentre``: an operator's request from the command line reaches the
``orchestrator`` queue's binding on RabbitMQ, signed so that the orchestrator accepts it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from infra.bus import SERVICE_QUEUES, declare_topology
from infra.transport.rabbitmq import RabbitMQTransport
from jpki.cli import main
from orchestrator import callcentre
from orchestrator import lifecycle_messages as lm
from protocol.envelope import decode

pytestmark = [pytest.mark.e2e, pytest.mark.rabbitmq]

KEY = bytes(range(100, 132))


async def test_loss_report_from_the_command_line(tmp_path: Path, amqp_vhost_url: str) -> None:
    transport = RabbitMQTransport(amqp_vhost_url, connection_name="callcentre-cli-test")
    await transport.connect()
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def keep(delivery) -> None:  # noqa: ANN001
        await received.put(delivery.body)
        await delivery.ack()

    try:
        await declare_topology(transport, SERVICE_QUEUES)
        await transport.consume("orchestrator", keep)
        key_file = tmp_path / "desk.key"
        key_file.write_text(KEY.hex())
        args = ["callcentre", "--amqp-url", amqp_vhost_url, "--operator", "desk-3",
                "--key-file", str(key_file), "loss", "--device-id", "phone-9",
                "--cin", "0a0b0c0d0e0f10111213", "--kdd", "0a0b0c0d0e0f10111213"]
        result = await asyncio.to_thread(CliRunner().invoke, main, args)
        assert result.exit_code == 0, result.output
        message = decode(await asyncio.wait_for(received.get(), 10))
    finally:
        await transport.close()
    report = message.body
    assert isinstance(report, lm.LossReport)
    assert message.envelope.saga_id == report.request_id
    assert report.request_id in result.output
    assert (report.phone.device_id, report.phone.se.cin) == ("phone-9", "0A0B0C0D0E0F10111213")
    assert KEY.hex() not in result.output
    callcentre.configure(callcentre.OperatorKeys({"desk-3": KEY}))
    try:
        callcentre.authenticate(report, datetime.now(UTC).timestamp())
        callcentre.configure(callcentre.OperatorKeys({"desk-3": bytes(32)}))
        with pytest.raises(callcentre.NotAuthenticated):
            callcentre.authenticate(report, datetime.now(UTC).timestamp())
    finally:
        callcentre.configure(callcentre.OperatorKeys({}))
