"""Property tests: host ↔ card round trips and tamper rejection at every level and S mode.

The host side and the card side share one core, so these tests alone could agree with
themselves; ``test_scp03_vectors.py`` pins both sides to public vectors.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.errors import MalformedAPDU, SecureChannelClosed, SecureChannelError
from protocol.scp03 import (
    VALID_SECURITY_LEVELS,
    CardSecureChannel,
    HostSession,
    OfflineHostSession,
    StaticKeys,
    response_is_protected,
)

LEVELS = sorted(VALID_SECURITY_LEVELS)
SD_AID = bytes.fromhex("A000000151000000")
KDD = bytes.fromhex("00112233445566778899")

_key_sizes = st.sampled_from([16, 24, 32])


@st.composite
def _static_keys(draw):
    size = draw(_key_sizes)
    return StaticKeys(*(draw(st.binary(min_size=size, max_size=size)) for _ in range(3)))


@st.composite
def _commands(draw, channel: int):
    cla = draw(st.sampled_from([0x00, 0x80])) | channel
    data = draw(st.one_of(st.just(b""), st.binary(max_size=64), st.binary(min_size=200,
                                                                          max_size=600)))
    le = draw(st.one_of(st.none(), st.integers(1, 256), st.integers(257, 65536)))
    return CommandAPDU(cla, draw(st.integers(0, 255)), draw(st.integers(0, 255)),
                       draw(st.integers(0, 255)), data, le, draw(st.booleans()))


_sws = st.sampled_from([0x9000, 0x6283, 0x63C2, 0x6A82, 0x6982, 0x6700])
_responses = st.builds(ResponseAPDU, st.binary(max_size=300), _sws)


def _open(keys, level, s_mode, channel, host_challenge, pseudo_random, card_random):
    card_sd = CardSecureChannel(kdd=KDD, sd_aid=SD_AID, sequence_counter=41,
                                pseudo_random=pseudo_random, random=lambda n: card_random[:n])
    host = HostSession(keys, key_version=0x30, s_mode=s_mode,
                       host_challenge=host_challenge[:s_mode], channel=channel)
    iu = CommandAPDU.from_bytes(host.initialize_update().to_bytes())
    iu_response, pending = card_sd.initialize_update(iu, keys, 0x30)
    auth = host.on_initialize_update_response(ResponseAPDU.from_bytes(iu_response.to_bytes()))
    ea = auth.external_authenticate(level)
    card = pending.external_authenticate(CommandAPDU.from_bytes(ea.to_bytes()))
    auth.unwrap(ResponseAPDU(b"", 0x9000))
    return auth, card


def _expected(response: ResponseAPDU, level: int) -> ResponseAPDU:
    if level & 0x10 and not response_is_protected(response.sw):
        return ResponseAPDU(b"", response.sw)
    return response


_session_params = {
    "keys": _static_keys(),
    "level": st.sampled_from(LEVELS),
    "s_mode": st.sampled_from([8, 16]),
    "channel": st.integers(0, 3),
    "host_challenge": st.binary(min_size=16, max_size=16),
    "pseudo_random": st.booleans(),
    "card_random": st.binary(min_size=16, max_size=16),
}


@settings(max_examples=120, deadline=None)
@given(**_session_params, data=st.data())
def test_round_trip(keys, level, s_mode, channel, host_challenge, pseudo_random, card_random,
                    data):
    auth, card = _open(keys, level, s_mode, channel, host_challenge, pseudo_random,
                       card_random)
    exchanges = data.draw(st.lists(st.tuples(_commands(channel), _responses), max_size=6))
    for command, response in exchanges:
        wrapped = auth.wrap(command)
        received = card.unwrap_command(CommandAPDU.from_bytes(wrapped.to_bytes()))
        assert (received.cla, received.ins, received.p1, received.p2, received.data,
                received.le) == (command.cla, command.ins, command.p1, command.p2,
                                 command.data, command.le)
        protected = card.wrap_response(response)
        plain = auth.unwrap(ResponseAPDU.from_bytes(protected.to_bytes()))
        assert plain == _expected(response, level)


@settings(max_examples=80, deadline=None)
@given(**_session_params, data=st.data())
def test_pipelined_offline_script(keys, level, s_mode, channel, host_challenge, pseudo_random,
                                  card_random, data):
    """The whole script is wrapped before the first response; every R-MAC still verifies."""
    del pseudo_random, card_random
    card_sd = CardSecureChannel(kdd=KDD, sd_aid=SD_AID, sequence_counter=7)
    offline = OfflineHostSession.predict(
        keys, key_version=0x30, sequence_counter=8, sd_aid=SD_AID, security_level=level,
        host_challenge=host_challenge[:s_mode], s_mode=s_mode, key_diversification_data=KDD,
        channel=channel,
    )
    exchanges = data.draw(st.lists(st.tuples(_commands(channel), _responses), max_size=5))
    script = offline.script([command for command, _ in exchanges])
    iu_response, pending = card_sd.initialize_update(script[0], keys, 0x30)
    card = pending.external_authenticate(script[1])
    replies = [iu_response, ResponseAPDU(b"", 0x9000)]
    for wrapped, (_, response) in zip(script[2:], exchanges, strict=True):
        card.unwrap_command(CommandAPDU.from_bytes(wrapped.to_bytes()))
        replies.append(card.wrap_response(response))
    plains = offline.unwrap_all(replies)
    assert plains[2:] == [_expected(response, level) for _, response in exchanges]


def _flip(raw: bytes, bit: int) -> bytes:
    index, shift = divmod(bit, 8)
    return raw[:index] + bytes((raw[index] ^ (1 << shift),)) + raw[index + 1 :]


def _protected_command_bits(wrapped: CommandAPDU) -> int:
    """Bits covered by the C-MAC as transmitted: everything but Le (GP Amd D §6.2.4 MACs
    header, Lc and data; Le is outside the MAC by design)."""
    raw = wrapped.to_bytes()
    if wrapped.le is None:
        return len(raw) * 8
    return (len(raw) - (2 if wrapped.needs_extended else 1)) * 8


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**_session_params, data=st.data())
def test_flipped_command_bit_is_rejected_and_kills_the_session(
        keys, level, s_mode, channel, host_challenge, pseudo_random, card_random, data):
    assume(level != 0x00)  # level 00 protects nothing after EXTERNAL AUTHENTICATE
    auth, card = _open(keys, level, s_mode, channel, host_challenge, pseudo_random,
                       card_random)
    before = data.draw(st.lists(st.tuples(_commands(channel), _responses), max_size=2))
    for command, response in before:
        card.unwrap_command(auth.wrap(command))
        auth.unwrap(card.wrap_response(response))
    wrapped = auth.wrap(data.draw(_commands(channel)))
    bit = data.draw(st.integers(0, _protected_command_bits(wrapped) - 1))
    tampered = _flip(wrapped.to_bytes(), bit)
    try:
        parsed = CommandAPDU.from_bytes(tampered)
    except MalformedAPDU:
        event("flip broke the APDU framing")
        return  # a flipped length no longer frames: rejected before the secure channel
    event("flip reached the secure channel")
    with pytest.raises(SecureChannelError):
        card.unwrap_command(parsed)
    assert card.closed
    with pytest.raises(SecureChannelClosed):
        card.unwrap_command(wrapped)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**_session_params, data=st.data())
def test_flipped_response_bit_is_rejected_and_kills_the_session(
        keys, level, s_mode, channel, host_challenge, pseudo_random, card_random, data):
    assume(level & 0x10)  # only R-MAC levels protect responses
    auth, card = _open(keys, level, s_mode, channel, host_challenge, pseudo_random,
                       card_random)
    card.unwrap_command(auth.wrap(data.draw(_commands(channel))))
    # Error status words travel alone and unprotected (GP Amd D §6.2.5): flip protected ones.
    sw = data.draw(st.sampled_from([0x9000, 0x6283, 0x63C2]))
    protected = card.wrap_response(ResponseAPDU(data.draw(st.binary(max_size=300)), sw))
    raw = protected.to_bytes()
    tampered = _flip(raw, data.draw(st.integers(0, len(raw) * 8 - 1)))
    with pytest.raises(SecureChannelError):
        auth.unwrap(ResponseAPDU.from_bytes(tampered))
    assert auth.closed
    with pytest.raises(SecureChannelClosed):
        auth.wrap(CommandAPDU(0x80 | channel, 0xCA, 0x00, 0x66, le=256))


@settings(max_examples=60, deadline=None)
@given(**_session_params)
def test_wrong_mac_key_fails_both_cryptograms(keys, level, s_mode, channel, host_challenge,
                                          pseudo_random, card_random):
    # The cryptograms hang on Key-MAC (through S-MAC); Key-ENC only enters the card
    # challenge (pseudo-random) and S-ENC.
    other = StaticKeys(keys.enc, bytes(x ^ 1 for x in keys.mac), keys.dek)
    card_sd = CardSecureChannel(kdd=KDD, sd_aid=SD_AID, pseudo_random=pseudo_random,
                                random=lambda n: card_random[:n])
    host = HostSession(other, s_mode=s_mode, host_challenge=host_challenge[:s_mode],
                       channel=channel)
    response, _ = card_sd.initialize_update(host.initialize_update(), keys, 0x30)
    with pytest.raises(SecureChannelError):
        host.on_initialize_update_response(response)
    # And a host that skips the card check cannot get past EXTERNAL AUTHENTICATE.
    host_ok = HostSession(keys, s_mode=s_mode, host_challenge=host_challenge[:s_mode],
                          channel=channel)
    response, pending = card_sd.initialize_update(host_ok.initialize_update(), keys, 0x30)
    auth = host_ok.on_initialize_update_response(response)
    _, pending_other = card_sd.initialize_update(host_ok.initialize_update(), other, 0x30)
    with pytest.raises(SecureChannelError):
        pending_other.external_authenticate(auth.external_authenticate(level))


@settings(max_examples=150, deadline=None)
@given(**_session_params, data=st.data())
def test_flipped_external_authenticate_bit_is_rejected(
        keys, level, s_mode, channel, host_challenge, pseudo_random, card_random, data):
    card_sd = CardSecureChannel(kdd=KDD, sd_aid=SD_AID, pseudo_random=pseudo_random,
                                random=lambda n: card_random[:n])
    host = HostSession(keys, s_mode=s_mode, host_challenge=host_challenge[:s_mode],
                       channel=channel)
    response, pending = card_sd.initialize_update(host.initialize_update(), keys, 0x30)
    raw = host.on_initialize_update_response(response).external_authenticate(level).to_bytes()
    tampered = _flip(raw, data.draw(st.integers(0, len(raw) * 8 - 1)))
    try:
        parsed = CommandAPDU.from_bytes(tampered)
    except MalformedAPDU:
        return
    with pytest.raises(SecureChannelError):
        pending.external_authenticate(parsed)


@settings(max_examples=150, deadline=None)
@given(**_session_params, data=st.data())
def test_flipped_initialize_update_response_bit_fails_the_offline_session(
        keys, level, s_mode, channel, host_challenge, pseudo_random, card_random, data):
    """The offline verifier checks every field it relies on: KDD, KVN, the i bits in use,
    the card challenge, the cryptogram and the counter. Only i bits that change nothing
    for this session (RFU, unused R-MAC/R-ENC support) may flip unnoticed."""
    del pseudo_random, card_random
    card_sd = CardSecureChannel(kdd=KDD, sd_aid=SD_AID, sequence_counter=20)
    offline = OfflineHostSession.predict(
        keys, key_version=0x30, sequence_counter=21, sd_aid=SD_AID, security_level=level,
        host_challenge=host_challenge[:s_mode], s_mode=s_mode, key_diversification_data=KDD,
        channel=channel,
    )
    response, _ = card_sd.initialize_update(offline.initialize_update_command, keys, 0x30)
    i_byte = 12
    i_bits_in_use = 0x11 | (0x20 if level & 0x10 else 0) | (0x40 if level & 0x20 else 0)
    bit = data.draw(st.integers(0, len(response.data) * 8 - 1).filter(
        lambda b: b // 8 != i_byte or (1 << (b % 8)) & i_bits_in_use))
    with pytest.raises(SecureChannelError):
        offline.unwrap(ResponseAPDU(_flip(response.data, bit), 0x9000))
