"""The GlobalPlatform card manager, command by command, driven by the SCP03 host side."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_sim.se.card_manager import (
    ISD_AID,
    CardLifeCycle,
    ChallengeMode,
    KeySet,
    LoadFile,
)
from device_sim.se.element import (
    SP_SD_AID,
    ScriptCommand,
    SecureElement,
    SecureElementStateError,
)
from device_sim.se.jpki_applet import JpkiAppletFactory, PooledKeys
from protocol import jpki
from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.errors import CryptogramMismatch
from protocol.scp03 import KeyBlockStyle, key_check_value
from protocol.scp03.host import AuthenticatedHost, HostSession
from protocol.scp03.keyblock import put_key_command
from protocol.scp03.keys import pseudo_random_card_challenge

ELF = bytes.fromhex("D392F0002601")
CIN = bytes.fromhex("0102030405060708090A")
OK, NOT_FOUND, SECURITY, CONDITIONS, WRONG_DATA = 0x9000, 0x6A88, 0x6982, 0x6985, 0x6A80


def _keys(kvn: int, seed: int) -> KeySet:
    return KeySet(kvn, bytes([seed]) * 16, bytes([seed + 1]) * 16, bytes([seed + 2]) * 16)


SP_KEYS = _keys(0x30, 0x40)
ISD_KEYS = _keys(0x20, 0x10)


@pytest.fixture(scope="module")
def load_file() -> LoadFile:
    # Card-manager tests never generate keys for certificates; the pool keeps them fast.
    return LoadFile(ELF, (jpki.AID,), JpkiAppletFactory(key_source=PooledKeys(2)))


@pytest.fixture
def se(load_file: LoadFile) -> SecureElement:
    return SecureElement.manufacture(
        cin=CIN, isd_keys=ISD_KEYS, sp_sd_keys=SP_KEYS, load_files=[load_file]
    )


def send(se: SecureElement, command: CommandAPDU) -> ResponseAPDU:
    return ResponseAPDU.from_bytes(se.transmit(command.to_bytes()))


def select(se: SecureElement, aid: bytes) -> ResponseAPDU:
    return send(se, CommandAPDU(0x00, 0xA4, 0x04, 0x00, aid, le=256))


def open_session(
    se: SecureElement, aid: bytes, keys: KeySet = SP_KEYS, level: int = 0x33
) -> AuthenticatedHost:
    assert select(se, aid).sw == OK
    host = HostSession(keys.static_keys(), key_version=keys.kvn)
    auth = host.on_initialize_update_response(send(se, host.initialize_update()))
    assert auth.unwrap(send(se, auth.external_authenticate(level))).sw == OK
    return auth


def secure(se: SecureElement, auth: AuthenticatedHost, command: CommandAPDU) -> ResponseAPDU:
    return auth.unwrap(send(se, auth.wrap(command)))


def install(aid: bytes = jpki.AID, p1: int = 0x0C, elf: bytes = ELF) -> CommandAPDU:
    fields = (elf, jpki.AID, aid, b"\x00", b"\xc9\x00", b"")
    return CommandAPDU(0x80, 0xE6, p1, 0x00, b"".join(bytes((len(f),)) + f for f in fields))


def get_status(p1: int = 0x40, aid: bytes = b"", p2: int = 0x02) -> CommandAPDU:
    return CommandAPDU(0x80, 0xF2, p1, p2, b"\x4f" + bytes((len(aid),)) + aid, le=256)


def delete(aid: bytes = jpki.AID) -> CommandAPDU:
    return CommandAPDU(0x80, 0xE4, 0x00, 0x00, b"\x4f" + bytes((len(aid),)) + aid)


def records(data: bytes) -> list[dict[int, bytes]]:
    """E3 templates of a GET STATUS answer as {tag: value}."""
    out, i = [], 0
    while i < len(data):
        assert data[i] == 0xE3
        length, i = data[i + 1], i + 2
        body, i = data[i : i + length], i + length
        fields, j = {}, 0
        while j < len(body):
            tag = body[j]
            j += 1
            if tag & 0x1F == 0x1F:
                tag, j = (tag << 8) | body[j], j + 1
            n = body[j]
            fields[tag] = body[j + 1 : j + 1 + n]
            j += 1 + n
        out.append(fields)
    return out


def installed(se: SecureElement) -> AuthenticatedHost:
    auth = open_session(se, SP_SD_AID)
    assert secure(se, auth, install()).sw == OK
    return auth


# -- selection, GET DATA, refusals outside a session ------------------------------------------


def test_select_isd_by_empty_aid_returns_fci(se: SecureElement) -> None:
    response = send(se, CommandAPDU(0x00, 0xA4, 0x04, 0x00))
    assert response.sw == OK
    assert response.data[0] == 0x6F and ISD_AID in response.data


def test_select_unknown_application_is_6a82(se: SecureElement) -> None:
    assert select(se, bytes.fromhex("A0000000999999")).sw == 0x6A82


@pytest.mark.parametrize(
    ("p1p2", "tag", "value"),
    [
        (0x0045, b"\x45", CIN),
        (0x0042, b"\x42", bytes.fromhex("42")),
        (0x00C1, b"\xc1", bytes(3)),
    ],
)
def test_get_data_without_session(se: SecureElement, p1p2: int, tag: bytes, value: bytes) -> None:
    select(se, SP_SD_AID)
    response = send(se, CommandAPDU(0x80, 0xCA, p1p2 >> 8, p1p2 & 0xFF, le=256))
    assert response.sw == OK
    assert response.data == tag + bytes((len(value),)) + value


def test_get_data_cplc_and_key_information(se: SecureElement) -> None:
    select(se, SP_SD_AID)
    cplc = send(se, CommandAPDU(0x80, 0xCA, 0x9F, 0x7F, le=256))
    assert cplc.sw == OK and cplc.data[:3] == b"\x9f\x7f\x2a" and len(cplc.data) == 45
    info = send(se, CommandAPDU(0x80, 0xCA, 0x00, 0xE0, le=256))
    # E0 { C0 04 <key id> <KVN> 88 <length> } for ENC, MAC, DEK of KVN 30
    assert info.data == bytes.fromhex("E012") + b"".join(
        bytes.fromhex(f"C004{key_id:02X}308810") for key_id in (1, 2, 3)
    )
    assert send(se, CommandAPDU(0x80, 0xCA, 0x00, 0x99, le=256)).sw == NOT_FOUND


def test_get_data_inside_a_session_is_protected(se: SecureElement) -> None:
    auth = open_session(se, SP_SD_AID)
    wrapped = auth.wrap(CommandAPDU(0x80, 0xCA, 0x00, 0x45, le=256))
    raw = ResponseAPDU.from_bytes(se.transmit(wrapped.to_bytes()))
    assert CIN not in raw.data  # R-ENC
    assert auth.unwrap(raw).data == b"\x45\x0a" + CIN


@pytest.mark.parametrize(
    "command",
    [
        install(),
        delete(),
        get_status(),
        CommandAPDU(0x80, 0xF0, 0x40, 0x87, jpki.AID),
        CommandAPDU(0x80, 0xD8, 0x00, 0x81, b"\x31"),
        CommandAPDU(0x80, 0xE2, 0x90, 0x00, b"\x45\x01\x00"),
    ],
    ids=["INSTALL", "DELETE", "GET STATUS", "SET STATUS", "PUT KEY", "STORE DATA"],
)
def test_card_management_without_secure_channel_is_refused(
    se: SecureElement, command: CommandAPDU
) -> None:
    select(se, SP_SD_AID)
    assert send(se, command).sw == SECURITY


def test_card_management_at_security_level_00_is_refused(se: SecureElement) -> None:
    auth = open_session(se, SP_SD_AID, level=0x00)
    assert secure(se, auth, get_status()).sw == SECURITY


def test_logical_channels_and_malformed_frames_get_status_words(se: SecureElement) -> None:
    assert send(se, CommandAPDU(0x01, 0xA4, 0x04, 0x00, SP_SD_AID)).sw == 0x6881
    assert ResponseAPDU.from_bytes(se.transmit(b"\x00\xa4")).sw == 0x6700
    assert ResponseAPDU.from_bytes(se.transmit(b"\x00\xa4\x04\x00\x05\x01")).sw == 0x6700
    select(se, SP_SD_AID)
    assert send(se, CommandAPDU(0x80, 0x99, 0x00, 0x00)).sw in (SECURITY, 0x6D00)


# -- INITIALIZE UPDATE / EXTERNAL AUTHENTICATE --------------------------------------------------


def test_initialize_update_pseudo_random_challenge_and_counter(se: SecureElement) -> None:
    select(se, SP_SD_AID)
    for expected_counter in (1, 2, 3):
        host = HostSession(SP_KEYS.static_keys(), key_version=0x30)
        response = send(se, host.initialize_update())
        assert response.sw == OK
        data = response.data
        assert data[:10] == CIN and data[10] == 0x30 and data[11] == 0x03
        assert data[12] == 0x70  # pseudo-random challenge, R-MAC and R-ENC supported
        counter = int.from_bytes(data[-3:], "big")
        assert counter == expected_counter
        expected = pseudo_random_card_challenge(SP_KEYS.static_keys(), counter, SP_SD_AID)
        assert data[13:21] == expected
        host.on_initialize_update_response(response)  # the card cryptogram verifies
    assert se.manager.domains[SP_SD_AID].sequence_counter == 3


def test_initialize_update_random_challenge_mode(load_file: LoadFile) -> None:
    se = SecureElement.manufacture(
        cin=CIN, isd_keys=ISD_KEYS, sp_sd_keys=SP_KEYS, load_files=[load_file],
        challenge_mode=ChallengeMode.RANDOM,
    )
    select(se, SP_SD_AID)
    challenges = set()
    for _ in range(3):
        host = HostSession(SP_KEYS.static_keys(), key_version=0x30)
        data = send(se, host.initialize_update()).data
        assert len(data) == 29 and data[12] == 0x60  # no counter, random challenge
        challenges.add(data[13:21])
    assert len(challenges) == 3
    auth = open_session(se, SP_SD_AID)
    assert secure(se, auth, get_status(p1=0x80)).sw == OK


def test_initialize_update_unknown_key_version_is_6a88(se: SecureElement) -> None:
    select(se, SP_SD_AID)
    host = HostSession(SP_KEYS.static_keys(), key_version=0x55)
    assert send(se, host.initialize_update()).sw == NOT_FOUND


def test_external_authenticate_with_wrong_keys_is_refused(se: SecureElement) -> None:
    select(se, SP_SD_AID)
    wrong = _keys(0x30, 0x77)
    host = HostSession(wrong.static_keys(), key_version=0x30)
    response = send(se, host.initialize_update())
    assert response.sw == OK
    # The host cannot verify the card's cryptogram; an EA without the right keys fails.
    with pytest.raises(CryptogramMismatch):
        host.on_initialize_update_response(response)
    assert send(se, CommandAPDU(0x84, 0x82, 0x33, 0x00, bytes(16))).sw == SECURITY
    assert send(se, get_status()).sw == SECURITY


def test_external_authenticate_out_of_order_is_refused(se: SecureElement) -> None:
    select(se, SP_SD_AID)
    assert send(se, CommandAPDU(0x84, 0x82, 0x33, 0x00, bytes(16))).sw == CONDITIONS


def test_flipped_bit_in_wrapped_command_kills_the_session(se: SecureElement) -> None:
    auth = open_session(se, SP_SD_AID)
    wrapped = auth.wrap(get_status(p1=0x80)).to_bytes()
    tampered = wrapped[:-3] + bytes((wrapped[-3] ^ 0x01,)) + wrapped[-2:]
    assert ResponseAPDU.from_bytes(se.transmit(tampered)).sw == SECURITY
    # The session is dead: the next correctly wrapped command is refused as well.
    assert send(se, auth.wrap(get_status(p1=0x80))).sw == SECURITY


def test_plain_command_inside_a_c_mac_session_is_refused(se: SecureElement) -> None:
    open_session(se, SP_SD_AID)
    assert send(se, get_status()).sw == SECURITY


# -- INSTALL / DELETE / GET STATUS ---------------------------------------------------------------


def test_install_and_make_selectable_then_get_status(se: SecureElement) -> None:
    auth = open_session(se, SP_SD_AID)
    response = secure(se, auth, install())
    assert (response.sw, response.data) == (OK, b"\x00")
    status = secure(se, auth, get_status(aid=jpki.AID))
    assert status.sw == OK
    (record,) = records(status.data)
    assert record[0x4F] == jpki.AID
    assert record[0x9F70] == b"\x07"
    assert record[0xC5] == bytes(3)
    assert record[0xC4] == ELF
    assert record[0xCC] == SP_SD_AID
    assert record[0xDF70] == b"\x00"
    assert select(se, jpki.AID).sw == OK


def test_install_for_install_only_then_make_selectable(se: SecureElement) -> None:
    auth = open_session(se, SP_SD_AID)
    assert secure(se, auth, install(p1=0x04)).sw == OK
    (record,) = records(secure(se, auth, get_status(aid=jpki.AID)).data)
    assert record[0x9F70] == b"\x03"
    fields = b"\x00\x00" + bytes((len(jpki.AID),)) + jpki.AID + b"\x01\x00\x00\x00"
    make_selectable = CommandAPDU(0x80, 0xE6, 0x08, 0x00, fields)
    assert secure(se, auth, make_selectable).sw == OK
    (record,) = records(secure(se, auth, get_status(aid=jpki.AID)).data)
    assert record[0x9F70] == b"\x07"


def test_installed_but_not_selectable_application_cannot_be_selected(se: SecureElement) -> None:
    auth = open_session(se, SP_SD_AID)
    assert secure(se, auth, install(p1=0x04)).sw == OK
    assert select(se, jpki.AID).sw == 0x6999


@pytest.mark.parametrize(
    ("command", "sw"),
    [
        (install(elf=bytes.fromhex("A0000000FF")), NOT_FOUND),
        (CommandAPDU(0x80, 0xE6, 0x0C, 0x00, b"\x06\x01\x02"), WRONG_DATA),
        (CommandAPDU(0x80, 0xE6, 0x0C, 0x00, b""), WRONG_DATA),
        (CommandAPDU(0x80, 0xE6, 0x02, 0x00, b"\x00" * 6), 0x6A86),
    ],
    ids=["unknown load file", "truncated", "empty", "INSTALL for load"],
)
def test_install_bad_input_gets_status_words(
    se: SecureElement, command: CommandAPDU, sw: int
) -> None:
    auth = open_session(se, SP_SD_AID)
    assert secure(se, auth, command).sw == sw


def test_install_twice_is_6985(se: SecureElement) -> None:
    auth = installed(se)
    assert secure(se, auth, install()).sw == CONDITIONS


def test_delete_removes_the_applet_and_its_keys(se: SecureElement) -> None:
    installed(se)
    auth = open_session(se, jpki.AID)
    assert secure(se, auth, jpki.set_owner_reference("owner-1")).sw == OK
    key = secure(se, auth, jpki.generate_key_pair(jpki.EF.AUTH_KEY, bytes(16)))
    assert key.sw == OK
    auth = open_session(se, SP_SD_AID)
    (record,) = records(secure(se, auth, get_status(aid=jpki.AID)).data)
    assert record[0xDF70] == b"\x01" and record[0xDF71] == b"owner-1"
    assert secure(se, auth, delete()).sw == OK
    assert secure(se, auth, get_status(aid=jpki.AID)).sw == NOT_FOUND
    assert jpki.AID not in se.manager.applications
    # A fresh install starts empty: the old key went with the deleted applet.
    assert secure(se, auth, install()).sw == OK
    (record,) = records(secure(se, auth, get_status(aid=jpki.AID)).data)
    assert record[0xDF70] == b"\x00" and 0xDF71 not in record


def test_delete_absent_application_is_6a88_and_domains_are_protected(se: SecureElement) -> None:
    auth = open_session(se, SP_SD_AID)
    assert secure(se, auth, delete()).sw == NOT_FOUND
    assert secure(se, auth, delete(ISD_AID)).sw == CONDITIONS
    assert secure(se, auth, CommandAPDU(0x80, 0xE4, 0x00, 0x00, b"\x99\x00")).sw == WRONG_DATA


def test_get_status_issuer_domain_load_files_and_modules(se: SecureElement) -> None:
    auth = installed(se)
    (isd,) = records(secure(se, auth, get_status(p1=0x80)).data)
    assert isd[0x4F] == ISD_AID and isd[0x9F70] == bytes((CardLifeCycle.SECURED,))
    domains_and_apps = records(secure(se, auth, get_status(p1=0x40)).data)
    assert [r[0x4F] for r in domains_and_apps] == [SP_SD_AID, jpki.AID]
    assert domains_and_apps[0][0xC5][0] & 0x80  # the SP-TSM's domain is a security domain
    (elf,) = records(secure(se, auth, get_status(p1=0x20)).data)
    assert elf[0x4F] == ELF and 0x84 not in elf
    (elf_with_modules,) = records(secure(se, auth, get_status(p1=0x10)).data)
    assert elf_with_modules[0x84] == jpki.AID
    assert secure(se, auth, get_status(p1=0x08)).sw == 0x6A86
    assert secure(se, auth, get_status(p2=0x00)).sw == 0x6A86


def test_get_status_pages_with_6310(se: SecureElement) -> None:
    auth = open_session(se, SP_SD_AID)
    aids = [jpki.AID[:-1] + bytes((n,)) for n in range(2, 14)]
    for aid in aids:
        assert secure(se, auth, install(aid)).sw == OK
    first = secure(se, auth, get_status())
    assert first.sw == 0x6310
    seen = records(first.data)
    while True:
        page = secure(se, auth, get_status(p2=0x03))
        seen += records(page.data)
        if page.sw == OK:
            break
        assert page.sw == 0x6310
    assert {r[0x4F] for r in seen} == {SP_SD_AID, *aids}


# -- SET STATUS ---------------------------------------------------------------------------------


def test_set_status_locks_unlocks_and_sets_application_specific_state(se: SecureElement) -> None:
    auth = installed(se)
    assert secure(se, auth, CommandAPDU(0x80, 0xF0, 0x40, 0x80, jpki.AID)).sw == OK
    (record,) = records(secure(se, auth, get_status(aid=jpki.AID)).data)
    assert record[0x9F70] == b"\x87"
    assert select(se, jpki.AID).sw == 0x6999
    auth = open_session(se, SP_SD_AID)
    assert secure(se, auth, CommandAPDU(0x80, 0xF0, 0x40, 0x00, jpki.AID)).sw == OK
    assert secure(se, auth, CommandAPDU(0x80, 0xF0, 0x40, 0x0F, jpki.AID)).sw == OK
    (record,) = records(secure(se, auth, get_status(aid=jpki.AID)).data)
    assert record[0x9F70] == b"\x0f"
    assert secure(se, auth, CommandAPDU(0x80, 0xF0, 0x40, 0x05, jpki.AID)).sw == 0x6A86
    assert secure(se, auth, CommandAPDU(0x80, 0xF0, 0x40, 0x00, jpki.AID)).sw == CONDITIONS
    assert secure(se, auth, CommandAPDU(0x80, 0xF0, 0x40, 0x80, ISD_AID)).sw == NOT_FOUND


def test_card_life_cycle_belongs_to_the_issuer_domain(se: SecureElement) -> None:
    installed(se)
    auth = open_session(se, SP_SD_AID)
    assert secure(se, auth, CommandAPDU(0x80, 0xF0, 0x80, 0x7F)).sw == SECURITY
    auth = open_session(se, ISD_AID, ISD_KEYS)
    assert secure(se, auth, CommandAPDU(0x80, 0xF0, 0x80, 0x07)).sw == CONDITIONS  # no way back
    assert secure(se, auth, CommandAPDU(0x80, 0xF0, 0x80, 0x7F)).sw == OK
    assert se.manager.life_cycle is CardLifeCycle.CARD_LOCKED
    assert select(se, jpki.AID).sw == 0x6999
    assert select(se, SP_SD_AID).sw == 0x6999
    auth = open_session(se, ISD_AID, ISD_KEYS)
    assert secure(se, auth, CommandAPDU(0x80, 0xF0, 0x80, 0x0F)).sw == OK
    assert select(se, jpki.AID).sw == OK
    auth = open_session(se, ISD_AID, ISD_KEYS)
    assert secure(se, auth, CommandAPDU(0x80, 0xF0, 0x80, 0xFF)).sw == OK
    assert select(se, ISD_AID).sw == CONDITIONS
    assert send(se, CommandAPDU(0x80, 0xCA, 0x00, 0x45, le=256)).sw == OK


# -- PUT KEY -----------------------------------------------------------------------------------


def _put_key(current: int, new: KeySet, dek: bytes, *, length_prefixed: bool) -> CommandAPDU:
    style = KeyBlockStyle.LENGTH_PREFIXED if length_prefixed else KeyBlockStyle.PLAIN
    return put_key_command(
        dek, old_key_version=current, new_key_version=new.kvn,
        keys=[new.enc, new.mac, new.dek], style=style,
    )


@pytest.mark.parametrize("length_prefixed", [True, False], ids=["Amd D style", "bare key"])
def test_put_key_replaces_the_key_set(se: SecureElement, length_prefixed: bool) -> None:
    new = _keys(0x31, 0x90)
    auth = open_session(se, SP_SD_AID)
    response = secure(se, auth, _put_key(0x30, new, SP_KEYS.dek, length_prefixed=length_prefixed))
    assert response.sw == OK
    check_values = b"".join(key_check_value(k) for k in (new.enc, new.mac, new.dek))
    assert response.data == b"\x31" + check_values
    auth = open_session(se, SP_SD_AID, new)  # the new keys open a session
    assert secure(se, auth, get_status(p1=0x80)).sw == OK
    select(se, SP_SD_AID)
    old = HostSession(SP_KEYS.static_keys(), key_version=0x30)
    assert send(se, old.initialize_update()).sw == NOT_FOUND


def test_put_key_adds_a_key_set_and_rejects_bad_blocks(se: SecureElement) -> None:
    auth = open_session(se, SP_SD_AID)
    new = _keys(0x32, 0xA0)
    assert secure(se, auth, _put_key(0x00, new, SP_KEYS.dek, length_prefixed=True)).sw == OK
    assert set(se.manager.domains[SP_SD_AID].key_sets) == {0x30, 0x32}
    again = _keys(0x32, 0xB0)
    duplicate = _put_key(0x00, again, SP_KEYS.dek, length_prefixed=True)
    assert secure(se, auth, duplicate).sw == CONDITIONS
    bad_kcv = _put_key(0x30, _keys(0x33, 0xC0), SP_KEYS.dek, length_prefixed=True)
    tampered = bad_kcv.data[:-1] + bytes((bad_kcv.data[-1] ^ 0xFF,))
    assert secure(se, auth, bad_kcv.with_data(tampered)).sw == WRONG_DATA
    wrong_dek = _put_key(0x30, _keys(0x33, 0xC0), bytes(16), length_prefixed=True)
    assert secure(se, auth, wrong_dek).sw == WRONG_DATA
    assert secure(se, auth, CommandAPDU(0x80, 0xD8, 0x30, 0x81, b"\x33\x80\x10")).sw == WRONG_DATA
    assert secure(se, auth, CommandAPDU(0x80, 0xD8, 0x44, 0x81, b"\x33")).sw == NOT_FOUND
    assert set(se.manager.domains[SP_SD_AID].key_sets) == {0x30, 0x32}


# -- STORE DATA and routing to the applet -------------------------------------------------------


def test_store_data_updates_card_data(se: SecureElement) -> None:
    auth = open_session(se, ISD_AID, ISD_KEYS)
    new_cin = bytes.fromhex("AABBCCDDEEFF00112233")
    assert secure(se, auth, CommandAPDU(0x80, 0xE2, 0x90, 0x00, b"\x45\x0a" + new_cin)).sw == OK
    assert se.manager.identity.cin == new_cin
    assert se.manager.identity.kdd == CIN  # key diversification data does not move
    assert secure(se, auth, CommandAPDU(0x80, 0xE2, 0x90, 0x00, b"\x99\x01\x00")).sw == NOT_FOUND
    auth = open_session(se, SP_SD_AID)
    assert secure(se, auth, CommandAPDU(0x80, 0xE2, 0x90, 0x00, b"\x45\x01\x00")).sw == CONDITIONS


def test_store_data_after_install_for_personalization_reaches_the_applet(se: SecureElement) -> None:
    auth = installed(se)
    personalize = CommandAPDU(
        0x80, 0xE6, 0x20, 0x00, b"\x00\x00" + bytes((len(jpki.AID),)) + jpki.AID + b"\x00\x00\x00"
    )
    assert secure(se, auth, personalize).sw == OK
    # The JPKI applet has no STORE DATA of its own: its answer comes back through the domain.
    assert secure(se, auth, CommandAPDU(0x80, 0xE2, 0x80, 0x00, b"\x01")).sw != OK


def test_applet_sees_the_secure_channel_of_its_domain(se: SecureElement) -> None:
    installed(se)
    select(se, jpki.AID)
    assert send(se, jpki.set_owner_reference("someone")).sw == SECURITY  # outside SCP03
    auth = open_session(se, jpki.AID)
    assert secure(se, auth, jpki.set_owner_reference("someone")).sw == OK
    assert se.manager.applications[jpki.AID].applet.owner_reference() == "someone"
    # ISO commands are wrapped too (CLA 00 -> 04) and answered inside the session.
    assert secure(se, auth, jpki.select_ef(jpki.EF.TOKEN)).sw == OK
    token = secure(se, auth, jpki.read_binary(0, 32))
    assert jpki.parse_token(token.data) == jpki.PHONE_TOKEN


def test_selecting_another_application_ends_the_session(se: SecureElement) -> None:
    installed(se)
    auth = open_session(se, jpki.AID)
    select(se, SP_SD_AID)
    select(se, jpki.AID)
    assert send(se, auth.wrap(jpki.set_owner_reference("x"))).sw == SECURITY


# -- scripts and persistence --------------------------------------------------------------------


def test_run_script_stops_at_the_first_unexpected_status_word(se: SecureElement) -> None:
    outcome = se.run_script(
        [
            ScriptCommand(CommandAPDU(0x00, 0xA4, 0x04, 0x00, SP_SD_AID).to_bytes()),
            ScriptCommand(get_status().to_bytes()),  # no session: 6982
            ScriptCommand(CommandAPDU(0x80, 0xCA, 0x00, 0x45).to_bytes()),
        ]
    )
    assert not outcome.completed
    assert [r[-2:] for r in outcome.responses] == [b"\x90\x00", b"\x69\x82"]
    tolerant = se.run_script([ScriptCommand(delete().to_bytes(), (OK, SECURITY))])
    assert tolerant.completed


def test_state_survives_a_reinstall_of_the_app(se: SecureElement, load_file: LoadFile) -> None:
    installed(se)
    auth = open_session(se, jpki.AID)
    assert secure(se, auth, jpki.set_owner_reference("persisted")).sw == OK
    counter = se.manager.domains[SP_SD_AID].sequence_counter
    text = se.to_json()
    for secret in (SP_KEYS.enc, SP_KEYS.mac):
        assert secret.hex() in text  # the SE's own storage holds its keys...
    restored = SecureElement.from_json(text, [load_file])
    assert restored.identity == se.identity
    assert restored.manager.domains[SP_SD_AID].sequence_counter == counter
    assert restored.manager.applications[jpki.AID].applet.owner_reference() == "persisted"
    auth = open_session(restored, SP_SD_AID)  # ...and the next session continues the counter
    assert restored.manager.domains[SP_SD_AID].sequence_counter == counter + 1
    assert secure(restored, auth, get_status(aid=jpki.AID)).sw == OK
    with pytest.raises(SecureElementStateError, match="format"):
        SecureElement.from_json(json.dumps({"format": 99}), [load_file])
    damaged = json.loads(text)
    del damaged["card"]["security_domains"][0]["key_sets"]
    with pytest.raises(SecureElementStateError, match="damaged"):
        SecureElement.from_json(json.dumps(damaged), [load_file])
    with pytest.raises(SecureElementStateError):
        SecureElement.from_json("{not json", [load_file])


def test_save_and_load_file(se: SecureElement, load_file: LoadFile, tmp_path) -> None:
    path = tmp_path / "se.json"
    se.save(path)
    assert SecureElement.load(path, [load_file]).identity == se.identity


def test_key_material_is_not_in_reprs(se: SecureElement) -> None:
    keys = _keys(0x30, 0x5A)
    assert keys.enc.hex() not in repr(keys).lower()
    assert SP_KEYS.enc.hex() not in repr(se.manager.domains[SP_SD_AID]).lower()


# -- any bytes in, a status word out ------------------------------------------------------------


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    frames=st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.builds(
                lambda cla, ins, p1, p2, data: bytes((cla, ins, p1, p2, len(data))) + data,
                st.sampled_from([0x00, 0x04, 0x80, 0x84, 0x01, 0x40]),
                st.sampled_from([0xA4, 0x50, 0x82, 0xE6, 0xE4, 0xF2, 0xF0, 0xD8, 0xE2, 0xCA,
                                 0x20, 0x24, 0xB0, 0x2A, 0x46, 0xD6, 0x30, 0x3C, 0x99]),
                st.integers(0, 255),
                st.integers(0, 255),
                st.binary(max_size=60),
            ),
        ),
        max_size=12,
    ),
    authenticate=st.booleans(),
)
def test_any_frame_gets_a_status_word(
    load_file: LoadFile, frames: list[bytes], authenticate: bool
) -> None:
    se = SecureElement.manufacture(
        cin=CIN, isd_keys=ISD_KEYS, sp_sd_keys=SP_KEYS, load_files=[load_file]
    )
    if authenticate:
        installed(se)
    for frame in frames:
        response = se.transmit(frame)
        assert len(response) >= 2
