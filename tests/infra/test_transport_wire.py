"""The RabbitMQ transport writes its publishes' frames itself: byte for byte what pamqp
(aiormq's codec) makes of the same publish, and what it reads back."""

from __future__ import annotations

import pamqp.frame
import pytest
from pamqp import commands as amqp
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from infra.transport.base import Outgoing
from infra.transport.rabbitmq import encoded_publish

MAX_CONTENT = 131072 - 8  # RabbitMQ's default frame_max less the frame's own bytes


def pamqp_frames(channel: int, exchange: str, message: Outgoing, message_id: str) -> bytes:
    frames: list[object] = [
        amqp.Basic.Publish(exchange=exchange, routing_key=message.routing_key, mandatory=True),
        ContentHeader(body_size=len(message.body), properties=amqp.Basic.Properties(
            content_type="application/json", delivery_mode=2, headers=dict(message.headers),
            message_id=message_id)),
    ]
    body = message.body
    frames += [ContentBody(body[i:i + MAX_CONTENT]) for i in range(0, len(body), MAX_CONTENT)]
    return b"".join(pamqp.frame.marshal(frame, channel) for frame in frames)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "message",
    [
        Outgoing("tsm.cmd.install", b'{"n":1}', "m-1"),
        Outgoing("app.event.tapped", b"{}", "m-2", headers={"mqtt-topic": "jpki/dev/d1/up"}),
        Outgoing("ca.cmd.issue", "{\"name\":\"山田 太郎\"}".encode(), "m-3",
                 headers={"x-original-routing-key": "ca.cmd.issue", "note": "日本語"}),
        Outgoing("bench.work", b"x" * (3 * MAX_CONTENT + 17), "m-4"),  # four body frames
        Outgoing("empty.body", b"", "m-5"),
    ],
    ids=["plain", "header", "unicode", "large", "empty"],
)
def test_a_publish_is_written_as_pamqp_would(message: Outgoing) -> None:
    ours = encoded_publish(7, "jpki", message, message.message_id, MAX_CONTENT)
    assert ours == pamqp_frames(7, "jpki", message, message.message_id)


def test_what_is_written_reads_back() -> None:
    message = Outgoing("se.result.run", b'{"ok":true}', "m-9", headers={"a": "b"})
    data = encoded_publish(3, "jpki.test", message, "m-9", MAX_CONTENT)
    read: list[object] = []
    while data:
        consumed, channel, frame = pamqp.frame.unmarshal(data)
        assert channel == 3
        read.append(frame)
        data = data[consumed:]
    publish, header, body = read
    assert isinstance(publish, amqp.Basic.Publish) and publish.mandatory
    assert (publish.exchange, publish.routing_key) == ("jpki.test", "se.result.run")
    assert isinstance(header, ContentHeader) and header.body_size == len(message.body)
    properties = header.properties
    assert (properties.message_id, properties.delivery_mode, properties.headers,
            properties.content_type) == ("m-9", 2, {"a": "b"}, "application/json")
    assert isinstance(body, ContentBody) and body.value == message.body


def test_a_routing_key_longer_than_a_short_string_is_refused() -> None:
    with pytest.raises(ValueError, match="255 bytes"):
        encoded_publish(1, "jpki", Outgoing("k" * 256, b"{}", "m"), "m", MAX_CONTENT)
