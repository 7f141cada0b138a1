"""SCP03 session behaviour: states, failures that kill, offline verification, redaction."""

from __future__ import annotations

import pytest

from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.errors import (
    CryptogramMismatch,
    Disposition,
    MacMismatch,
    SecureChannelClosed,
    SecureChannelError,
    SequenceCounterMismatch,
)
from protocol.scp03 import (
    CardSecureChannel,
    HostSession,
    MasterKeys,
    OfflineHostSession,
    StaticKeys,
    diversify_kdf3,
)
from protocol.scp03.keys import SEQUENCE_COUNTER_MAX, InitializeUpdateResponse

ENC = bytes.fromhex("404142434445464748494A4B4C4D4E4F")
MAC = bytes.fromhex("505152535455565758595A5B5C5D5E5F")
DEK = bytes.fromhex("606162636465666768696A6B6C6D6E6F")
KEYS = StaticKeys(ENC, MAC, DEK)
SD_AID = bytes.fromhex("A000000151000000")
KDD = bytes.fromhex("0102030405060708090A")
GET_DATA = CommandAPDU(0x80, 0xCA, 0x00, 0x66, le=256)


def _card(**kwargs) -> CardSecureChannel:
    return CardSecureChannel(kdd=KDD, sd_aid=SD_AID, **kwargs)


def _open(level=0x33, card=None, host=None):
    card = card or _card()
    host = host or HostSession(KEYS, key_version=0x30, random=lambda n: b"\x11" * n)
    response, pending = card.initialize_update(host.initialize_update(), KEYS, 0x30)
    auth = host.on_initialize_update_response(response)
    session = pending.external_authenticate(auth.external_authenticate(level))
    auth.unwrap(ResponseAPDU(b"", 0x9000))
    return auth, session


def test_secrets_stay_out_of_repr():
    auth, session = _open()
    master = MasterKeys(ENC, MAC, DEK)
    texts = [repr(KEYS), str(KEYS), repr(auth), repr(session), repr(master),
             repr(diversify_kdf3(master, KDD)), repr(KEYS.enc_key)]
    for text in texts:
        for secret in (ENC, MAC, DEK):
            assert secret.hex() not in text.lower()
            assert repr(secret) not in text


def test_host_session_is_single_use_and_dies_on_bad_cryptogram():
    card = _card()
    host = HostSession(KEYS, key_version=0x30)
    response, _ = card.initialize_update(host.initialize_update(), KEYS, 0x30)
    forged = bytearray(response.data)
    forged[-4] ^= 0x01  # last byte of the card cryptogram (counter follows)
    with pytest.raises(CryptogramMismatch):
        host.on_initialize_update_response(ResponseAPDU(bytes(forged), 0x9000))
    with pytest.raises(SecureChannelClosed):
        host.on_initialize_update_response(response)


def test_initialize_update_refused_status_is_typed():
    host = HostSession(KEYS)
    host.initialize_update()
    with pytest.raises(SecureChannelError, match="6A88"):
        host.on_initialize_update_response(ResponseAPDU(b"", 0x6A88))


def test_host_key_version_must_match():
    card = _card()
    host = HostSession(KEYS, key_version=0x31)
    response, _ = card.initialize_update(host.initialize_update(), KEYS, 0x30)
    with pytest.raises(SecureChannelError, match="key version"):
        host.on_initialize_update_response(response)


def test_wrap_before_external_authenticate_is_refused():
    card = _card()
    host = HostSession(KEYS)
    response, _ = card.initialize_update(host.initialize_update(), KEYS, 0x30)
    auth = host.on_initialize_update_response(response)
    with pytest.raises(SecureChannelClosed):
        auth.wrap(GET_DATA)
    with pytest.raises(SecureChannelClosed):
        auth.unwrap(ResponseAPDU(b"", 0x9000))


@pytest.mark.parametrize("level", [0x02, 0x10, 0x12, 0x21, 0x31, 0x23, 0xFF])
def test_forbidden_security_levels(level):
    card = _card()
    host = HostSession(KEYS)
    response, _ = card.initialize_update(host.initialize_update(), KEYS, 0x30)
    with pytest.raises(SecureChannelError):
        host.on_initialize_update_response(response).external_authenticate(level)


def test_r_mac_needs_card_support():
    card = _card(r_mac_support=False)
    host = HostSession(KEYS)
    response, pending = card.initialize_update(host.initialize_update(), KEYS, 0x30)
    auth = host.on_initialize_update_response(response)
    with pytest.raises(SecureChannelError, match="R-MAC"):
        auth.external_authenticate(0x11)


def test_refused_external_authenticate_kills_host_session():
    card = _card()
    host = HostSession(KEYS)
    response, _ = card.initialize_update(host.initialize_update(), KEYS, 0x30)
    auth = host.on_initialize_update_response(response)
    auth.external_authenticate(0x01)
    with pytest.raises(CryptogramMismatch):
        auth.unwrap(ResponseAPDU(b"", 0x6982))
    assert auth.closed
    with pytest.raises(SecureChannelClosed):
        auth.wrap(GET_DATA)


def test_card_rejects_forged_external_authenticate():
    card = _card()
    host = HostSession(KEYS)
    response, pending = card.initialize_update(host.initialize_update(), KEYS, 0x30)
    ea = host.on_initialize_update_response(response).external_authenticate(0x33)
    forged = bytearray(ea.data)
    forged[0] ^= 0x80  # host cryptogram, C-MAC left as is
    with pytest.raises(MacMismatch):
        pending.external_authenticate(ea.with_data(bytes(forged)))
    with pytest.raises(SecureChannelClosed):
        pending.external_authenticate(ea)


def test_card_rejects_external_authenticate_on_other_channel():
    card = _card()
    host = HostSession(KEYS)
    response, pending = card.initialize_update(host.initialize_update(), KEYS, 0x30)
    ea = host.on_initialize_update_response(response).external_authenticate(0x01)
    with pytest.raises(SecureChannelError):
        pending.external_authenticate(ea.with_data(ea.data, cla=0x85))


def test_command_without_secure_messaging_kills_card_session():
    _, session = _open(0x01)
    with pytest.raises(MacMismatch):
        session.unwrap_command(GET_DATA)
    assert session.closed
    with pytest.raises(SecureChannelClosed):
        session.wrap_response(ResponseAPDU(b"", 0x9000))


def test_replayed_command_is_rejected():
    auth, session = _open(0x03)
    wrapped = auth.wrap(GET_DATA)
    session.unwrap_command(wrapped)
    session.wrap_response(ResponseAPDU(b"\x01", 0x9000))
    with pytest.raises(MacMismatch):
        session.unwrap_command(wrapped)


def test_response_must_follow_a_command():
    _, session = _open()
    with pytest.raises(SecureChannelClosed):
        session.wrap_response(ResponseAPDU(b"", 0x9000))


def test_error_status_words_travel_alone():
    auth, session = _open(0x33)
    session.unwrap_command(auth.wrap(GET_DATA))
    # The card drops data next to an error status; no R-MAC is added (GP Amd D §6.2.5).
    protected = session.wrap_response(ResponseAPDU(b"leak", 0x6A88))
    assert protected == ResponseAPDU(b"", 0x6A88)
    assert auth.unwrap(protected) == ResponseAPDU(b"", 0x6A88)
    # A host never accepts data beside an error status at an R-MAC level.
    session.unwrap_command(auth.wrap(GET_DATA))
    session.wrap_response(ResponseAPDU(b"", 0x6A88))
    with pytest.raises(SecureChannelError):
        auth.unwrap(ResponseAPDU(b"\x00" * 8, 0x6A88))
    assert auth.closed


def test_data_less_command_advances_the_encryption_counter():
    """Two sessions with the same challenges: one sends a data-less command first. The
    next encrypted command must differ, because the counter moved (GP Amd D §6.2.6)."""
    store = CommandAPDU(0x80, 0xE2, 0x00, 0x00, b"same data")
    results = []
    for prefix in ([], [CommandAPDU(0x80, 0xF2, 0x20, 0x02)]):
        card = _card(sequence_counter=0)
        host = HostSession(KEYS, host_challenge=b"\x22" * 8)
        auth, session = _open(0x03, card=card, host=host)
        for command in prefix:
            assert auth.wrap(command).data.__len__() == 8  # not encrypted: the C-MAC alone
        results.append(auth.wrap(store).data[:-8])
    assert results[0] != results[1]


def test_card_counts_sessions_and_stops_at_the_end():
    card = _card(sequence_counter=SEQUENCE_COUNTER_MAX - 1)
    host = HostSession(KEYS)
    response, _ = card.initialize_update(host.initialize_update(), KEYS, 0x30)
    info = InitializeUpdateResponse.parse(response.data, 8)
    assert info.sequence_counter == card.sequence_counter == SEQUENCE_COUNTER_MAX
    with pytest.raises(SecureChannelError, match="exhausted"):
        card.initialize_update(HostSession(KEYS).initialize_update(), KEYS, 0x30)


def test_card_refuses_malformed_initialize_update():
    card = _card()
    with pytest.raises(SecureChannelError):
        card.initialize_update(CommandAPDU(0x80, 0x50, 0x30, 0x00, b"\x00" * 7), KEYS, 0x30)
    with pytest.raises(SecureChannelError):
        card.initialize_update(CommandAPDU(0x80, 0x50, 0x30, 0x01, b"\x00" * 8), KEYS, 0x30)
    with pytest.raises(SecureChannelError):
        card.initialize_update(CommandAPDU(0x80, 0x51, 0x30, 0x00, b"\x00" * 8), KEYS, 0x30)
    with pytest.raises(SecureChannelError):
        CardSecureChannel(kdd=b"\x00", sd_aid=SD_AID)


def test_s16_is_marked_in_the_i_parameter():
    card = _card()
    host = HostSession(KEYS, s_mode=16)
    response, _ = card.initialize_update(host.initialize_update(), KEYS, 0x30)
    assert InitializeUpdateResponse.parse(response.data, 16).i_parameter == 0x71
    assert card.i_parameter(8) == 0x70


def test_malformed_initialize_update_response():
    for data in (b"", bytes(28), bytes(31)):
        with pytest.raises(SecureChannelError):
            InitializeUpdateResponse.parse(data, 8)
    good = bytearray(bytes(10) + bytes((0x30, 0x03, 0x70)) + bytes(16) + b"\x00\x00\x01")
    InitializeUpdateResponse.parse(bytes(good), 8)
    good[11] = 0x02  # SCP02
    with pytest.raises(SecureChannelError, match="SCP"):
        InitializeUpdateResponse.parse(bytes(good), 8)


# -- offline (one round trip) ---------------------------------------------------------


def _predict(counter, **kwargs):
    return OfflineHostSession.predict(
        KEYS, key_version=0x30, sequence_counter=counter, sd_aid=SD_AID, security_level=0x33,
        key_diversification_data=KDD, **kwargs,
    )


def test_offline_script_runs_in_one_pass():
    card = _card(sequence_counter=99)
    offline = _predict(100)
    commands = [CommandAPDU(0x80, 0xE2, 0x80, 0x00, b"\x01\x02"), GET_DATA]
    script = offline.script(commands)
    response, pending = card.initialize_update(script[0], KEYS, 0x30)
    session = pending.external_authenticate(script[1])
    replies = [response, ResponseAPDU(b"", 0x9000)]
    for wrapped, answer in zip(script[2:], [b"", b"\x42" * 20], strict=True):
        session.unwrap_command(wrapped)
        replies.append(session.wrap_response(ResponseAPDU(answer, 0x9000)))
    plains = offline.unwrap_all(replies)
    assert plains[3] == ResponseAPDU(b"\x42" * 20, 0x9000)


def test_offline_counter_drift_is_transient_and_reports_the_actual_counter():
    card = _card(sequence_counter=104)
    offline = _predict(100)
    response, _ = card.initialize_update(offline.initialize_update_command, KEYS, 0x30)
    with pytest.raises(SequenceCounterMismatch) as caught:
        offline.unwrap(response)
    assert caught.value.actual == 105 and caught.value.expected == 100
    assert caught.value.disposition is Disposition.TRANSIENT
    assert offline.closed


def test_offline_detects_another_se():
    other_aid = CardSecureChannel(kdd=KDD, sd_aid=bytes.fromhex("A000000151535041"),
                                  sequence_counter=99)
    offline = _predict(100)
    response, _ = other_aid.initialize_update(offline.initialize_update_command, KEYS, 0x30)
    with pytest.raises(CryptogramMismatch):
        offline.unwrap(response)

    other_kdd = CardSecureChannel(kdd=bytes(10), sd_aid=SD_AID, sequence_counter=99)
    offline = _predict(100)
    response, _ = other_kdd.initialize_update(offline.initialize_update_command, KEYS, 0x30)
    with pytest.raises(SecureChannelError, match="diversification"):
        offline.unwrap(response)


def test_offline_refuses_random_challenge_card():
    card = _card(pseudo_random=False)
    offline = _predict(1)
    response, _ = card.initialize_update(offline.initialize_update_command, KEYS, 0x30)
    with pytest.raises(SecureChannelError, match="pseudo-random"):
        offline.unwrap(response)


def test_offline_refuses_more_responses_than_commands():
    card = _card(sequence_counter=0)
    offline = _predict(1)
    response, pending = card.initialize_update(offline.initialize_update_command, KEYS, 0x30)
    pending.external_authenticate(offline.external_authenticate_command)
    offline.unwrap_all([response, ResponseAPDU(b"", 0x9000)])
    with pytest.raises(SecureChannelClosed):
        offline.unwrap(ResponseAPDU(b"", 0x9000))
