"""SCP03 card (security domain) side as sans-I/O states.

``CardSecureChannel`` (one per security domain: KDD, SD AID, sequence counter)
    .initialize_update(command, keys, key_version) ──▶ (response, ``CardAwaitingAuthentication``)
``CardAwaitingAuthentication``.external_authenticate(command) ──▶ ``CardSession``
``CardSession``: unwrap_command(command) ──▶ plain command; wrap_response(response).

The card manager answers a raised ``SecureChannelError`` with '6982' and drops the
session object, which refuses any further use (GP Amd D §6.2.4: a failed C-MAC ends the
session). Choosing the key set for KVN P1 (and answering '6A88' when there is none) is
the card manager's job; so is persisting ``sequence_counter``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from hmac import compare_digest

from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.errors import (
    CryptogramMismatch,
    MacMismatch,
    SecureChannelClosed,
    SecureChannelError,
)
from protocol.scp03.channel import MessagingCore
from protocol.scp03.keys import (
    I_PSEUDO_RANDOM_CHALLENGE,
    I_R_ENC,
    I_R_MAC,
    I_S16,
    KDD_LENGTH,
    S8,
    S16,
    SEQUENCE_COUNTER_MAX,
    InitializeUpdateResponse,
    SecurityLevel,
    SessionKeys,
    StaticKeys,
    pseudo_random_card_challenge,
    security_level,
)

INS_INITIALIZE_UPDATE = 0x50
INS_EXTERNAL_AUTHENTICATE = 0x82
_ZERO_CHAIN = bytes(16)
_R_MAC = SecurityLevel.R_MAC.value
_R_ENC = SecurityLevel.R_ENCRYPTION.value

Random = Callable[[int], bytes]


class CardSecureChannel:
    """What a security domain keeps between sessions, and INITIALIZE UPDATE."""

    __slots__ = ("kdd", "sd_aid", "sequence_counter", "_s_modes", "pseudo_random",
                 "r_mac_support", "r_enc_support", "_random")

    def __init__(self, *, kdd: bytes, sd_aid: bytes, sequence_counter: int = 0,
                 s_modes: tuple[int, ...] = (S8, S16), pseudo_random: bool = True,
                 r_mac_support: bool = True, r_enc_support: bool = True,
                 random: Random = os.urandom) -> None:
        if len(kdd) != KDD_LENGTH:
            raise SecureChannelError("key diversification data must be 10 bytes")
        if not 0 <= sequence_counter <= SEQUENCE_COUNTER_MAX:
            raise SecureChannelError("sequence counter out of range")
        self.kdd = bytes(kdd)
        self.sd_aid = bytes(sd_aid)
        self.sequence_counter = sequence_counter  # the last one used; persist it
        self._s_modes = s_modes
        self.pseudo_random = pseudo_random
        self.r_mac_support = r_mac_support
        self.r_enc_support = r_enc_support and r_mac_support
        self._random = random

    def __repr__(self) -> str:
        return f"CardSecureChannel(counter={self.sequence_counter:06X})"

    def i_parameter(self, s_mode: int) -> int:
        return (
            (I_S16 if s_mode == S16 else 0)
            | (I_PSEUDO_RANDOM_CHALLENGE if self.pseudo_random else 0)
            | (I_R_MAC if self.r_mac_support else 0)
            | (I_R_ENC if self.r_enc_support else 0)
        )

    def initialize_update(self, command: CommandAPDU, keys: StaticKeys, key_version: int
                          ) -> tuple[ResponseAPDU, CardAwaitingAuthentication]:
        """GP Amd D §7.1.1. The S mode follows the host challenge length (8 or 16 bytes)."""
        if command.ins != INS_INITIALIZE_UPDATE or command.cla & 0xFC != 0x80:
            raise SecureChannelError("not an INITIALIZE UPDATE command")
        if command.p2 != 0x00:
            raise SecureChannelError("INITIALIZE UPDATE P2 must be 00")
        host_challenge = command.data
        s_mode = len(host_challenge)
        if s_mode not in self._s_modes:
            raise SecureChannelError(f"host challenge of {s_mode} bytes is not supported")
        if self.pseudo_random:
            if self.sequence_counter >= SEQUENCE_COUNTER_MAX:
                raise SecureChannelError("sequence counter exhausted")
            # Amd D §6.2.2.1: a new counter value for every challenge, so none repeats
            # even when the session is never authenticated.
            self.sequence_counter += 1
            card_challenge = pseudo_random_card_challenge(
                keys, self.sequence_counter, self.sd_aid, s_mode
            )
            counter: int | None = self.sequence_counter
        else:
            card_challenge = self._random(s_mode)
            counter = None
        session = SessionKeys.derive(keys, host_challenge, card_challenge)
        info = InitializeUpdateResponse(
            key_diversification_data=self.kdd,
            key_version=key_version,
            i_parameter=self.i_parameter(s_mode),
            card_challenge=card_challenge,
            card_cryptogram=session.card_cryptogram(host_challenge, card_challenge),
            sequence_counter=counter,
        )
        pending = CardAwaitingAuthentication(session, info, host_challenge, command.cla & 0x03)
        return ResponseAPDU(info.to_bytes(), 0x9000), pending


class CardAwaitingAuthentication:
    """After INITIALIZE UPDATE; only EXTERNAL AUTHENTICATE is acceptable."""

    __slots__ = ("_session", "info", "_host_challenge", "_used", "_channel")

    def __init__(self, session: SessionKeys, info: InitializeUpdateResponse,
                 host_challenge: bytes, channel: int = 0) -> None:
        self._session = session
        self._channel = channel
        self.info = info
        self._host_challenge = host_challenge
        self._used = False

    def __repr__(self) -> str:
        return f"CardAwaitingAuthentication(S{self.info.s_mode}, used={self._used})"

    def external_authenticate(self, command: CommandAPDU) -> CardSession:
        """Verify C-MAC and host cryptogram (constant time); any failure raises."""
        if self._used:
            raise SecureChannelClosed("EXTERNAL AUTHENTICATE was already processed")
        self._used = True
        if command.ins != INS_EXTERNAL_AUTHENTICATE or command.cla & 0xFC != 0x84:
            raise SecureChannelError("not an EXTERNAL AUTHENTICATE command")
        if command.p2 != 0x00:
            raise SecureChannelError("EXTERNAL AUTHENTICATE P2 must be 00")
        if command.cla & 0x03 != self._channel:
            raise SecureChannelError("EXTERNAL AUTHENTICATE on another logical channel")
        level = security_level(command.p1)
        i = self.info.i_parameter
        if level.value & _R_MAC and not i & I_R_MAC:
            raise SecureChannelError("R-MAC requested but not supported")
        if level.value & _R_ENC and not i & I_R_ENC:
            raise SecureChannelError("R-ENC requested but not supported")
        s_mode = self.info.s_mode
        if len(command.data) != 2 * s_mode:
            raise SecureChannelError("EXTERNAL AUTHENTICATE data has the wrong length")
        cryptogram, mac = command.data[:s_mode], command.data[s_mode:]
        core = MessagingCore(self._session, level, s_mode, self._channel)
        full_mac = core.command_mac(_ZERO_CHAIN, command.cla, command.ins, command.p1,
                                    command.p2, cryptogram, command.needs_extended)
        if not compare_digest(full_mac[:s_mode], mac):
            raise MacMismatch("EXTERNAL AUTHENTICATE C-MAC does not verify")
        expected = self._session.host_cryptogram(self._host_challenge, self.info.card_challenge)
        if not compare_digest(expected, cryptogram):
            raise CryptogramMismatch("host cryptogram does not verify")
        return CardSession(core, full_mac)


class CardSession:
    """An authenticated session: unwrap each command, then wrap its response."""

    __slots__ = ("_core", "_chain", "_counter", "_awaiting_response", "_dead")

    def __init__(self, core: MessagingCore, chain: bytes) -> None:
        self._core = core
        self._chain = chain
        self._counter = 0
        self._awaiting_response = False
        self._dead = False

    def __repr__(self) -> str:
        return f"CardSession(level={int(self._core.level):02X}, dead={self._dead})"

    @property
    def security_level(self) -> SecurityLevel:
        return self._core.level

    @property
    def closed(self) -> bool:
        return self._dead

    def close(self) -> None:
        self._dead = True

    def unwrap_command(self, command: CommandAPDU) -> CommandAPDU:
        """Verify C-MAC, decrypt (GP Amd D §6.2.4, §6.2.6); a failure ends the session."""
        if self._dead:
            raise SecureChannelClosed("secure channel session is closed")
        self._counter += 1
        try:
            plain, self._chain = self._core.verify_command(command, self._chain, self._counter)
        except SecureChannelError:
            self._dead = True
            raise
        self._awaiting_response = True
        return plain

    def wrap_response(self, response: ResponseAPDU) -> ResponseAPDU:
        """R-ENC then R-MAC over the response to the last unwrapped command."""
        if self._dead:
            raise SecureChannelClosed("secure channel session is closed")
        if not self._awaiting_response:
            raise SecureChannelClosed("no unwrapped command is waiting for a response")
        self._awaiting_response = False
        return self._core.protect_response(response, self._chain, self._counter)
