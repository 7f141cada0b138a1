"""The fleet's manufacturing (SEs the TSM can open, cards the CA issued), its profile and
certificate mixes, and the network faults around a phone's link."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from device_sim.fleet import (
    UNSUPPORTED_MODELS,
    CaCardFactory,
    FaultyLink,
    Fleet,
    FleetConfig,
    FleetConfigError,
    NetworkFaults,
    PhoneProfile,
    PhoneResult,
    expected,
    parse_mix,
    spread,
)
from device_sim.se.jpki_applet import PooledKeys
from infra.bus import Bus, declare_topology
from infra.transport.inprocess import InProcessTransport
from infra.transport.phone_link import InProcessPhoneHub
from orchestrator import messages as om
from protocol import jpki
from protocol.envelope import build, decode, encode
from workers.ca.authority import CertificateAuthority, Holder
from workers.ca.keystore import Passphrase
from workers.tsm import messages as tsm
from workers.tsm.engine import InProcessPhoneLink, TsmEngine
from workers.tsm.keys import MasterKeyRing, MasterKeys
from workers.tsm.registry import MemoryRegistry


def test_mix_parsing_and_exact_spread():
    weights = parse_mix("new=70,second_hand=10,reinstalled=10,unsupported=10", list(PhoneProfile))
    assert Counter(spread(weights, 50)) == {
        "new": 35,
        "second_hand": 5,
        "reinstalled": 5,
        "unsupported": 5,
    }
    assert Counter(spread({"both": 1, "auth": 1, "sign": 1}, 7)).total() == 7
    for bad in ("new=x", "nobody=1", "new=-1", ""):
        with pytest.raises(FleetConfigError):
            parse_mix(bad, list(PhoneProfile))


@pytest.fixture(scope="module")
def key_pool(tmp_path_factory):
    return PooledKeys(size=4, directory=tmp_path_factory.mktemp("keys"))


@pytest.fixture
async def authority(tmp_path):
    ca = await CertificateAuthority.open(tmp_path / "ca", Passphrase(b"fleet test passphrase"))
    yield ca
    await ca.close()


@pytest.fixture
def ring():
    return MasterKeyRing({1: MasterKeys.generate(1)}, 1)


async def test_manufacturing_makes_the_promised_phones(authority, ring, key_pool):
    config = FleetConfig(
        phones=8,
        profile_mix={"new": 2, "second_hand": 2, "reinstalled": 2, "unsupported": 2},
        certificate_mix={"both": 2, "auth": 1, "sign": 1},
        pin_option_mix={"4": 3, "3": 1},
    )
    cards = CaCardFactory(authority)
    fleet = Fleet.manufacture(
        config, ring, cards.issuer_for, se_key_source=key_pool, card_key_source=key_pool
    )
    assert await cards.record() == 8 + 2  # owners, and the previous owners of second-hand phones
    profiles = Counter(p.profile for p in fleet.phones)
    assert profiles == {profile: 2 for profile in PhoneProfile}
    assert Counter(p.certificates for p in fleet.phones) == {"both": 4, "auth": 2, "sign": 2}
    assert Counter(int(p.pin_option) for p in fleet.phones) == {4: 6, 3: 2}
    assert len({p.se.identity.cin for p in fleet.phones}) == 8
    for phone in fleet.phones:
        assert (phone.device.model in UNSUPPORTED_MODELS) == (
            phone.profile is PhoneProfile.UNSUPPORTED
        )
        assert (phone.previous_owner is not None) == (phone.profile is PhoneProfile.SECOND_HAND)
        # Out of the factory no SE carries the JPKI applet: profiles get theirs by living.
        assert not any(a.aid == jpki.AID for a in phone.se.manager.applications.values())

    # The SP-TSM can open a session with every SE from its master keys alone.
    link = InProcessPhoneLink()
    engine = TsmEngine(ring, MemoryRegistry(), link)
    for phone in fleet.phones:
        link.attach(phone.device_id, phone.se)
        reply = await engine.execute(
            tsm.InspectSe(
                command_id=f"inspect-{phone.device_id}",
                device_id=phone.device_id,
                se=phone.se_identity,
            )
        )
        assert reply.ok and not reply.applet_present

    # Every card holds certificates the CA issued and recorded for its holder.
    owner = fleet.phones[0].owner
    records = await authority.certificates(person_id=owner.person_id, holder=Holder.CARD)
    assert {r.cert_type.value for r in records} == {"auth", "sign"}
    card = owner.card
    card.transmit(jpki.select_ap().to_bytes())
    card.transmit(jpki.select_ef(jpki.EF.SIGN_PIN).to_bytes())
    assert card.transmit(jpki.verify(owner.card_password.encode()).to_bytes())[-2:] == b"\x90\x00"
    card.transmit(jpki.select_ef(jpki.EF.SIGN_KEY).to_bytes())
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"application")
    signature = card.transmit(
        jpki.compute_digital_signature(jpki.digest_info("sha256", digest.finalize())).to_bytes()
    )[:-2]
    sign_record = next(r for r in records if r.cert_type.value == "sign")
    x509.load_der_x509_certificate(sign_record.der).public_key().verify(
        signature, b"application", padding.PKCS1v15(), hashes.SHA256()
    )


def test_people_do_not_show_their_secrets(authority, ring, key_pool):
    cards = CaCardFactory(authority)
    fleet = Fleet.manufacture(
        FleetConfig(phones=1),
        ring,
        cards.issuer_for,
        se_key_source=key_pool,
        card_key_source=key_pool,
    )
    person = fleet.phones[0].owner
    shown = repr(person) + repr(fleet.phones[0])
    for secret in (person.card_password, person.signing_password):
        assert secret not in shown
    assert "auth_pin" not in shown  # four digits could occur by chance; the field must not


@pytest.fixture
async def hub():
    transport = InProcessTransport()
    await transport.connect()
    bus = Bus(transport)
    await declare_topology(transport)
    phone_hub = InProcessPhoneHub(bus)
    await phone_hub.start()
    yield bus, phone_hub
    await phone_hub.close()
    await transport.close()


def _down(device_id: str, n: int):
    return build(
        om.Result(outcome=om.Outcome.REFUSED, phase=1, reason=om.Reason.UNSUPPORTED_MODEL),
        saga_id=f"saga-{n}",
        device_id=device_id,
    )


async def test_disconnect_mid_saga_loses_nothing(hub):
    bus, phone_hub = hub
    faults = NetworkFaults(disconnect_rate=1.0, reconnect_after_s=0.2)
    link = FaultyLink(phone_hub.link, "phone-x", faults, random.Random(3))
    received: list[str] = []

    async def on_message(message):
        received.append(message.envelope.saga_id)

    await link.start(on_message)
    link.arm_disconnect()
    for n in range(8):
        await bus.publish(_down("phone-x", n))
        await asyncio.sleep(0.03)
    for _ in range(100):
        if len(received) == 8:
            break
        await asyncio.sleep(0.05)
    await link.close()
    assert link.disconnects == 1
    assert received == [f"saga-{n}" for n in range(8)]  # all of them, in order


async def test_latency_and_drops_apply_to_sp_tsm_traffic_only(hub):
    bus, phone_hub = hub
    faults = NetworkFaults(latency_s=0.05, drop_rate=1.0)
    link = FaultyLink(phone_hub.link, "phone-y", faults, random.Random(1))
    received: list[str] = []

    async def on_message(message):
        received.append(message.envelope.type)

    await link.start(on_message)
    started = time.monotonic()
    await bus.publish(_down("phone-y", 1))
    await bus.publish(
        build(tsm.SeScript(script_id="s1", operation="inspect", steps=[]), device_id="phone-y")
    )
    for _ in range(50):
        if received:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    await link.close()
    assert received == ["app.cmd.result"]  # the script was dropped, the app message was not
    assert link.dropped == 1
    assert time.monotonic() - started >= 0.05


async def test_an_app_that_answers_while_its_link_is_down_loses_nothing(hub):
    """The app answers from inside its message handler; if the link drops meanwhile, the
    answers wait in the client's outbox and the messages held for it still arrive."""
    bus, phone_hub = hub
    await bus.transport.declare_queue("tap", ["app.event.#"])
    answers: list[str] = []

    async def tap(delivery):
        answers.append(decode(delivery.body).envelope.causation_id)
        await delivery.ack()

    await bus.transport.consume("tap", tap)
    faults = NetworkFaults(latency_s=0.05, disconnect_rate=1.0, reconnect_after_s=0.2)
    link = FaultyLink(phone_hub.link, "phone-z", faults, random.Random(5))
    one_at_a_time = asyncio.Lock()  # as the app's UI thread

    async def app(message):
        async with one_at_a_time:
            online = om.Online(device_id="phone-z", app_instance_id="a" * 32)
            answer = build(online, device_id="phone-z", causation_id=message.envelope.saga_id)
            await link.send(answer)

    await link.start(app)
    link.arm_disconnect()
    for n in range(8):
        await bus.publish(_down("phone-z", n))
        await asyncio.sleep(0.02)
    for _ in range(100):
        if len(answers) == 8:
            break
        await asyncio.sleep(0.05)
    await link.close()
    assert link.disconnects == 1
    assert answers == [f"saga-{n}" for n in range(8)]


@pytest.mark.mqtt
def test_fleet_command_holds_every_phone_online_and_reports_memory(mqtt_url, tmp_path, unique):
    from click.testing import CliRunner

    from device_sim.fleet import fleet_command

    result = CliRunner().invoke(
        fleet_command,
        [
            "--phones",
            "6",
            "--hold-only",
            "--key-pool",
            "--key-pool-size",
            "2",
            "--data-dir",
            str(tmp_path),
            "--mqtt-url",
            mqtt_url,
            "--seed",
            "11",
            "--device-prefix",
            f"t{unique}",
            "--topic-root",
            f"jpki-test-{unique}/dev",
        ],
        env={"JPKI_CA_PASSPHRASE": f"fleet command test {unique}"},
    )
    assert result.exit_code == 0, result.output
    assert "6 phones online, each with its own session" in result.output
    assert "KiB per phone" in result.output


@pytest.mark.mqtt
async def test_disconnect_mid_saga_over_mqtt_keeps_the_persistent_session(mqtt_url, unique):
    """The phone's MQTT session drops and comes back with the same client id: what the
    broker queued for it meanwhile (QoS 1, clean_session off) arrives, in order."""
    import aiomqtt

    from infra.mqtt import MqttAddress, MqttPhoneLink, down_topic

    device_id = f"t{unique}-mqtt"
    faults = NetworkFaults(disconnect_rate=1.0, reconnect_after_s=0.5)
    link = FaultyLink(lambda d: MqttPhoneLink(mqtt_url, d), device_id, faults, random.Random(2))
    received: list[str] = []

    async def on_message(message):
        received.append(message.envelope.saga_id)

    await link.start(on_message)
    link.arm_disconnect()
    address = MqttAddress.from_url(mqtt_url)
    async with aiomqtt.Client(address.hostname, address.port) as gateway:
        for n in range(8):
            payload = encode(_down(device_id, n))
            await gateway.publish(down_topic(device_id), payload, qos=1)
            await asyncio.sleep(0.1)
    for _ in range(100):
        if len(received) == 8:
            break
        await asyncio.sleep(0.05)
    await link.close()
    # Leave no persistent session behind on the broker.
    identifier = f"jpki-phone-{device_id}"
    async with aiomqtt.Client(
        address.hostname, address.port, identifier=identifier, clean_session=True
    ):
        pass
    assert link.disconnects == 1
    assert received == [f"saga-{n}" for n in range(8)]


@pytest.mark.parametrize("certificates, login", [("both", "not_tried"), ("sign", "n/a")])
def test_a_run_without_logins_expects_every_issued_phone_untried(certificates, login) -> None:
    issued = PhoneResult(device_id="p", profile=PhoneProfile.NEW.value, model="m",
                         certificates=certificates, pin_option=4,
                         outcome=om.Outcome.ISSUED.value, phase=4, login=login)
    assert expected(issued, login=False)
    assert not expected(PhoneResult(device_id="p", profile=PhoneProfile.NEW.value, model="m",
                                    certificates="both", pin_option=4,
                                    outcome=om.Outcome.ISSUED.value, phase=4, login="failed"),
                        login=False)
