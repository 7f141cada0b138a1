"""SCP03 off-card (host) side as sans-I/O states: bytes in, bytes out, no I/O.

``HostSession`` ──initialize_update()──▶ command
            ──on_initialize_update_response(resp)──▶ ``AuthenticatedHost``
``AuthenticatedHost``: external_authenticate(level), wrap(command), unwrap(response).

``OfflineHostSession.predict(...)`` is an ``AuthenticatedHost`` computed before anything is
sent, for SEs with the pseudo-random card challenge (GP Amd D §6.2.2.1): it yields the
INITIALIZE UPDATE and EXTERNAL AUTHENTICATE commands and wraps the whole script up front,
then verifies the responses in order — the INITIALIZE UPDATE response (sequence counter,
card challenge, card cryptogram) first, then every status word and R-MAC.

Any verification failure kills the object: later calls raise ``SecureChannelClosed``.
"""

from __future__ import annotations

import enum
import os
from collections import deque
from collections.abc import Callable, Iterable
from hmac import compare_digest

from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.errors import (
    CryptogramMismatch,
    SecureChannelClosed,
    SecureChannelError,
    SequenceCounterMismatch,
)
from protocol.scp03.channel import MessagingCore
from protocol.scp03.keys import (
    I_PSEUDO_RANDOM_CHALLENGE,
    I_R_ENC,
    I_R_MAC,
    I_S16,
    S8,
    S16,
    InitializeUpdateResponse,
    SecurityLevel,
    SessionKeys,
    StaticKeys,
    check_s_mode,
    pseudo_random_card_challenge,
)
from protocol.scp03.keys import security_level as parse_security_level

INS_INITIALIZE_UPDATE = 0x50
INS_EXTERNAL_AUTHENTICATE = 0x82
_CLA_GP = 0x80
_CLA_GP_SM = 0x84
_ZERO_CHAIN = bytes(16)
_R_MAC = SecurityLevel.R_MAC.value
_R_ENC = SecurityLevel.R_ENCRYPTION.value

Random = Callable[[int], bytes]


class _Expect(enum.Enum):
    INITIALIZE_UPDATE = "initialize update"
    EXTERNAL_AUTHENTICATE = "external authenticate"
    COMMAND = "command"


def initialize_update_command(key_version: int, host_challenge: bytes, channel: int = 0
                              ) -> CommandAPDU:
    """INITIALIZE UPDATE, GP Amd D §7.1.1: 80 50 KVN 00 Lc host-challenge 00."""
    if not 0 <= key_version <= 0xFF:
        raise SecureChannelError("key version out of range")
    if not 0 <= channel <= 3:
        raise SecureChannelError("logical channel must be 0..3")
    return CommandAPDU(_CLA_GP | channel, INS_INITIALIZE_UPDATE, key_version, 0x00,
                       host_challenge, le=256)


class HostSession:
    """Before INITIALIZE UPDATE: holds the static keys and the host challenge."""

    __slots__ = ("_keys", "_key_version", "_s_mode", "_host_challenge", "_used", "_channel")

    def __init__(self, keys: StaticKeys, *, key_version: int = 0, s_mode: int = S8,
                 host_challenge: bytes | None = None, random: Random = os.urandom,
                 channel: int = 0) -> None:
        self._keys = keys
        self._key_version = key_version
        self._channel = channel
        self._s_mode = check_s_mode(s_mode)
        challenge = random(s_mode) if host_challenge is None else host_challenge
        if len(challenge) != s_mode:
            raise SecureChannelError(f"host challenge must be {s_mode} bytes")
        self._host_challenge = bytes(challenge)
        self._used = False

    def __repr__(self) -> str:
        return f"HostSession(kvn={self._key_version:02X}, S{self._s_mode})"

    @property
    def host_challenge(self) -> bytes:
        return self._host_challenge

    def initialize_update(self) -> CommandAPDU:
        return initialize_update_command(self._key_version, self._host_challenge, self._channel)

    def on_initialize_update_response(self, response: ResponseAPDU) -> AuthenticatedHost:
        """Verify the card cryptogram (constant time); derive the session keys."""
        if self._used:
            raise SecureChannelClosed("this HostSession already received its response")
        self._used = True
        if response.sw != 0x9000:
            raise SecureChannelError(f"INITIALIZE UPDATE failed with SW {response.sw:04X}")
        info = InitializeUpdateResponse.parse(response.data, self._s_mode)
        if self._key_version and info.key_version != self._key_version:
            raise SecureChannelError(
                f"card used key version {info.key_version:02X}, not {self._key_version:02X}"
            )
        session = SessionKeys.derive(self._keys, self._host_challenge, info.card_challenge)
        expected = session.card_cryptogram(self._host_challenge, info.card_challenge)
        if not compare_digest(expected, info.card_cryptogram):
            raise CryptogramMismatch("card cryptogram does not verify")
        return AuthenticatedHost(session, info, self._host_challenge, self._channel)


class AuthenticatedHost:
    """The card is authenticated; next: EXTERNAL AUTHENTICATE, then wrap/unwrap.

    Responses are matched to commands first in, first out, so a caller may wrap a whole
    script before sending it and unwrap the responses afterwards.
    """

    __slots__ = ("_session", "info", "_host_challenge", "_core", "_chain", "_counter",
                 "_pending", "_dead", "_channel")

    def __init__(self, session: SessionKeys, info: InitializeUpdateResponse,
                 host_challenge: bytes, channel: int = 0) -> None:
        self._session = session
        self._channel = channel
        self.info = info
        self._host_challenge = host_challenge
        self._core: MessagingCore | None = None
        self._chain = _ZERO_CHAIN
        self._counter = 0
        self._pending: deque[tuple[_Expect, bytes, int]] = deque()
        self._dead = False

    def __repr__(self) -> str:
        level = "-" if self._core is None else f"{int(self._core.level):02X}"
        return f"{type(self).__name__}(level={level}, S{self.info.s_mode}, dead={self._dead})"

    @property
    def closed(self) -> bool:
        return self._dead

    @property
    def security_level(self) -> SecurityLevel | None:
        return None if self._core is None else self._core.level

    def close(self) -> None:
        self._dead = True

    def _alive(self) -> None:
        if self._dead:
            raise SecureChannelClosed("secure channel session is closed")

    def external_authenticate(self, level: int) -> CommandAPDU:
        """EXTERNAL AUTHENTICATE (GP Amd D §7.1.2): 84 82 level 00, host cryptogram + C-MAC.
        Never encrypted; starts MAC chaining from 16 × '00' and the counter at 0."""
        self._alive()
        if self._core is not None:
            raise SecureChannelClosed("EXTERNAL AUTHENTICATE was already built")
        level = parse_security_level(level)
        bits = level.value
        if bits & _R_MAC and not self.info.i_parameter & I_R_MAC:
            raise SecureChannelError("card does not support R-MAC (i parameter)")
        if bits & _R_ENC and not self.info.i_parameter & I_R_ENC:
            raise SecureChannelError("card does not support R-ENC (i parameter)")
        s_mode = self.info.s_mode
        cryptogram = self._session.host_cryptogram(self._host_challenge, self.info.card_challenge)
        core = MessagingCore(self._session, level, s_mode, self._channel)
        full_mac = core.command_mac(_ZERO_CHAIN, _CLA_GP_SM, INS_EXTERNAL_AUTHENTICATE, level,
                                    0x00, cryptogram, False)
        self._core = core
        self._chain = full_mac
        self._pending.append((_Expect.EXTERNAL_AUTHENTICATE, full_mac, 0))
        return CommandAPDU(_CLA_GP_SM | self._channel, INS_EXTERNAL_AUTHENTICATE, level, 0x00,
                           cryptogram + full_mac[:s_mode])

    def wrap(self, command: CommandAPDU) -> CommandAPDU:
        """C-DEC then C-MAC at the session's level (GP Amd D §6.2.4, §6.2.6)."""
        self._alive()
        core = self._core
        if core is None:
            raise SecureChannelClosed("wrap before EXTERNAL AUTHENTICATE")
        self._counter += 1
        try:
            wrapped, self._chain = core.protect_command(command, self._chain, self._counter)
        except SecureChannelError:
            self._dead = True
            raise
        self._pending.append((_Expect.COMMAND, self._chain, self._counter))
        return wrapped

    def wrap_all(self, commands: Iterable[CommandAPDU]) -> list[CommandAPDU]:
        return [self.wrap(command) for command in commands]

    def unwrap(self, response: ResponseAPDU) -> ResponseAPDU:
        """Verify the response to the oldest command not yet answered; R-MAC then R-ENC."""
        self._alive()
        if not self._pending:
            raise SecureChannelClosed("no command is waiting for this response")
        expect, chain, counter = self._pending.popleft()
        try:
            if expect is _Expect.INITIALIZE_UPDATE:
                self._verify_initialize_update(response)
                return response
            if expect is _Expect.EXTERNAL_AUTHENTICATE:
                if response.sw != 0x9000:
                    raise CryptogramMismatch(
                        f"EXTERNAL AUTHENTICATE refused with SW {response.sw:04X}"
                    )
                return response
            core = self._core
            if core is None:  # a command is only ever queued after EXTERNAL AUTHENTICATE
                raise SecureChannelClosed("response to a command wrapped before authentication")
            return core.verify_response(response, chain, counter)
        except SecureChannelError:
            self._dead = True
            raise

    def _verify_initialize_update(self, response: ResponseAPDU) -> None:
        raise SecureChannelClosed("INITIALIZE UPDATE was not predicted by this session")


class OfflineHostSession(AuthenticatedHost):
    """A whole session computed before the SE is contacted (pseudo-random card challenge).

    The TSM knows the SE's static keys, SD AID and the sequence counter the SE will use
    next (the SE increments its counter and then derives the challenge from it, so this is
    the last counter seen + 1). ``script(commands)`` returns INITIALIZE UPDATE, EXTERNAL
    AUTHENTICATE and the wrapped commands; ``unwrap`` the responses in the same order.
    """

    __slots__ = ("initialize_update_command", "external_authenticate_command", "_expected_kdd",
                 "_key_version")

    @classmethod
    def predict(cls, keys: StaticKeys, *, key_version: int, sequence_counter: int,
                sd_aid: bytes, security_level: int, host_challenge: bytes | None = None,
                s_mode: int = S8, key_diversification_data: bytes | None = None,
                i_parameter: int = I_R_MAC | I_R_ENC, random: Random = os.urandom,
                channel: int = 0) -> OfflineHostSession:
        """Compute the session for an SE that will use ``sequence_counter`` next.

        ``key_diversification_data``: the SE's KDD, checked in its INITIALIZE UPDATE response
        when given. ``i_parameter``: the SE's R-MAC/R-ENC support bits (the pseudo-random
        and S16 bits are added here); the level must fit them.
        """
        check_s_mode(s_mode)
        challenge = random(s_mode) if host_challenge is None else bytes(host_challenge)
        if len(challenge) != s_mode:
            raise SecureChannelError(f"host challenge must be {s_mode} bytes")
        card_challenge = pseudo_random_card_challenge(keys, sequence_counter, sd_aid, s_mode)
        session = SessionKeys.derive(keys, challenge, card_challenge)
        info = InitializeUpdateResponse(
            key_diversification_data=key_diversification_data or bytes(10),
            key_version=key_version,
            i_parameter=i_parameter | I_PSEUDO_RANDOM_CHALLENGE | (I_S16 if s_mode == S16 else 0),
            card_challenge=card_challenge,
            card_cryptogram=session.card_cryptogram(challenge, card_challenge),
            sequence_counter=sequence_counter,
        )
        offline = cls(session, info, challenge, channel)
        offline._expected_kdd = key_diversification_data
        offline._key_version = key_version
        offline.initialize_update_command = initialize_update_command(key_version, challenge,
                                                                      channel)
        offline._pending.append((_Expect.INITIALIZE_UPDATE, _ZERO_CHAIN, 0))
        offline.external_authenticate_command = offline.external_authenticate(security_level)
        return offline

    def script(self, commands: Iterable[CommandAPDU]) -> list[CommandAPDU]:
        """INITIALIZE UPDATE, EXTERNAL AUTHENTICATE, then every command wrapped, in order."""
        return [self.initialize_update_command, self.external_authenticate_command,
                *self.wrap_all(commands)]

    def unwrap_all(self, responses: Iterable[ResponseAPDU]) -> list[ResponseAPDU]:
        return [self.unwrap(response) for response in responses]

    def _verify_initialize_update(self, response: ResponseAPDU) -> None:
        if response.sw != 0x9000:
            raise SecureChannelError(f"INITIALIZE UPDATE failed with SW {response.sw:04X}")
        actual = InitializeUpdateResponse.parse(response.data, self.info.s_mode)
        predicted = self.info
        if actual.sequence_counter is None:
            raise SecureChannelError("SE did not use the pseudo-random card challenge")
        if actual.sequence_counter != predicted.sequence_counter:
            raise SequenceCounterMismatch(predicted.sequence_counter or 0, actual.sequence_counter)
        if self._key_version and actual.key_version != self._key_version:
            raise SecureChannelError(
                f"card used key version {actual.key_version:02X}, not {self._key_version:02X}"
            )
        if (self._expected_kdd is not None
                and actual.key_diversification_data != self._expected_kdd):
            raise SecureChannelError("key diversification data is not this SE's")
        # The i bits this session relies on: the S mode, and R-MAC / R-ENC if the level uses them.
        i = actual.i_parameter
        level = int(self.security_level or 0)
        if (bool(i & I_S16) != (predicted.s_mode == S16)
                or (level & _R_MAC and not i & I_R_MAC)
                or (level & _R_ENC and not i & I_R_ENC)):
            raise SecureChannelError(f"i parameter {i:02X} does not fit this session")
        # Both are public values, but compare in constant time all the same.
        if not compare_digest(actual.card_challenge, predicted.card_challenge):
            raise CryptogramMismatch("card challenge differs from the prediction")
        if not compare_digest(actual.card_cryptogram, predicted.card_cryptogram):
            raise CryptogramMismatch("card cryptogram differs from the prediction")
