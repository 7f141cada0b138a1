"""Secure messaging after EXTERNAL AUTHENTICATE: the one core both roles share.

GP Amd D §6.2.3–§6.2.7. One ``MessagingCore`` holds the session keys and the security
level; the host and the card each call the two functions of their direction. The MAC
chaining value and the encryption counter are passed in and out explicitly, because the
host may pipeline (wrap a whole script before the first response comes back) and must
then check each R-MAC against the chaining value of *its* command.
"""

from __future__ import annotations

from hmac import compare_digest

from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.errors import MacMismatch, SecureChannelError
from protocol.scp03._primitives import BLOCK, pad_m2, unpad_m2
from protocol.scp03.keys import SecurityLevel, SessionKeys

_SM_CLA_BIT = 0x04  # GP Amd D §6.2.4: b3 set = GP proprietary secure messaging
_CHANNEL_BITS = 0x03
_FURTHER_INTERINDUSTRY = 0x40  # CLA b7: channels 4-19, not supported here
_SHORT_MAX_LC = 255
_SHORT_MAX_LE = 256
_EXTENDED_MAX_LC = 65535
_RESPONSE_ICV_MARKER = 0x80  # GP Amd D §6.2.7: MSB of the counter block set for responses
# The level bits as plain ints (an enum member's ``.value`` is a Python-level property).
_C_MAC = SecurityLevel.C_MAC.value
_C_DEC = SecurityLevel.C_DECRYPTION.value
_R_MAC = SecurityLevel.R_MAC.value
_R_ENC = SecurityLevel.R_ENCRYPTION.value


def response_is_protected(sw: int) -> bool:
    """GP Amd D §6.2.5: only '9000' and warnings '62xx'/'63xx' carry R-MAC/R-ENC; every
    other status word comes back alone, unprotected."""
    return sw == 0x9000 or (sw >> 8) in (0x62, 0x63)


def check_plain_cla(cla: int) -> None:
    if cla & _FURTHER_INTERINDUSTRY:
        raise SecureChannelError(f"CLA {cla:02X}: only first interindustry CLA coding is supported")
    if cla & 0x0C:
        raise SecureChannelError(f"CLA {cla:02X} already indicates secure messaging")


def mac_cla(cla: int) -> int:
    """GP Amd D §6.2.4: for the C-MAC the logical channel is set to 0, b4 to 0 and b3 to 1."""
    return (cla & 0xF0) | _SM_CLA_BIT


class MessagingCore:
    """Session keys + security level; pure functions of (message, chain, counter)."""

    __slots__ = ("_keys", "mac_len", "level", "channel", "_c_mac", "_c_dec", "_r_mac", "_r_enc")

    def __init__(self, keys: SessionKeys, level: SecurityLevel, s_mode: int,
                 channel: int = 0) -> None:
        self._keys = keys
        # The C-MAC leaves the logical channel out (§6.2.4), so the session is bound to
        # the channel it was opened on and every other channel number is refused.
        self.channel = channel
        self.mac_len = s_mode
        self.level = level
        bits = int(level)  # plain int: IntFlag operators cost ~1 µs each
        self._c_mac = bool(bits & _C_MAC)
        self._c_dec = bool(bits & _C_DEC)
        self._r_mac = bool(bits & _R_MAC)
        self._r_enc = bool(bits & _R_ENC)

    def __repr__(self) -> str:
        return f"MessagingCore(level={int(self.level):02X}, S{self.mac_len}, <keys redacted>)"

    # -- C-MAC over what is transmitted -------------------------------------------------

    def command_mac(self, chain: bytes, cla: int, ins: int, p1: int, p2: int, body: bytes,
                    extended: bool) -> bytes:
        """Full 16-byte C-MAC = new chaining value (GP Amd D §6.2.4): CMAC(S-MAC, chaining
        value ‖ header ‖ Lc ‖ data field without the MAC), with Lc as transmitted (it counts
        the MAC; three bytes in extended length)."""
        lc = len(body) + self.mac_len
        lc_field = b"\x00" + lc.to_bytes(2, "big") if extended else bytes((lc,))
        header = bytes((mac_cla(cla), ins, p1, p2))
        return self._keys.s_mac.cmac(chain + header + lc_field + body)

    @staticmethod
    def _counter_block(counter: int, response: bool) -> bytes:
        """The block whose encryption under S-ENC is the ICV (GP Amd D §6.2.6, §6.2.7)."""
        block = counter.to_bytes(BLOCK, "big")
        if response:
            block = bytes((_RESPONSE_ICV_MARKER,)) + block[1:]
        return block

    def _icv(self, counter: int, response: bool) -> bytes:
        return self._keys.s_enc.ecb_encrypt(self._counter_block(counter, response))

    # -- host: commands out, responses in -----------------------------------------------

    def protect_command(self, command: CommandAPDU, chain: bytes, counter: int
                        ) -> tuple[CommandAPDU, bytes]:
        """Wrap one command; returns it and the new MAC chaining value."""
        if not self._c_mac:
            return command, chain
        cla = command.cla
        check_plain_cla(cla)
        if cla & _CHANNEL_BITS != self.channel:
            raise SecureChannelError(f"command for channel {cla & 3}, session on {self.channel}")
        body = command.data
        if self._c_dec and body:
            # Data-less commands are not encrypted; the counter still advanced (§6.2.6).
            body = self._keys.s_enc.cbc_encrypt_with_encrypted_iv(
                self._counter_block(counter, False), pad_m2(body)
            )
        mac_len = self.mac_len
        lc = len(body) + mac_len
        le = command.le
        extended = command.extended or lc > _SHORT_MAX_LC or (le is not None and le > _SHORT_MAX_LE)
        if lc > _EXTENDED_MAX_LC:
            raise SecureChannelError("wrapped command data exceeds 65535 bytes")
        ins, p1, p2 = command.ins, command.p1, command.p2
        # ``command_mac`` written out: this runs for every command of every session.
        lc_field = b"\x00" + lc.to_bytes(2, "big") if extended else bytes((lc,))
        header = bytes(((cla & 0xF0) | _SM_CLA_BIT, ins, p1, p2))
        full_mac = self._keys.s_mac.cmac(chain + header + lc_field + body)
        wrapped = CommandAPDU(cla | _SM_CLA_BIT, ins, p1, p2, body + full_mac[:mac_len], le,
                              extended)
        return wrapped, full_mac

    def verify_response(self, response: ResponseAPDU, chain: bytes, counter: int
                        ) -> ResponseAPDU:
        """Check the R-MAC, then decrypt (GP Amd D §6.2.5, §6.2.7)."""
        if not self._r_mac:
            return response
        sw = response.sw
        data = response.data
        if not response_is_protected(sw):
            if data:
                raise SecureChannelError(f"data returned with unprotected error status {sw:04X}")
            return response
        if len(data) < self.mac_len:
            raise MacMismatch("response too short to hold an R-MAC")
        body = data[: -self.mac_len]
        expected = self._keys.s_rmac.cmac(chain + body + sw.to_bytes(2, "big"))
        if not compare_digest(expected[: self.mac_len], data[-self.mac_len :]):
            raise MacMismatch("R-MAC does not verify")
        if self._r_enc and body:
            if len(body) % BLOCK:
                raise SecureChannelError("encrypted response data is not whole blocks")
            body = unpad_m2(self._keys.s_enc.cbc_decrypt(self._icv(counter, True), body))
        return ResponseAPDU(body, sw)

    # -- card: commands in, responses out -----------------------------------------------

    def verify_command(self, wrapped: CommandAPDU, chain: bytes, counter: int
                       ) -> tuple[CommandAPDU, bytes]:
        """Check the C-MAC, then decrypt; returns the plain command and the new chain."""
        cla = wrapped.cla
        if not self._c_mac:
            if cla & 0x0C:
                raise SecureChannelError("secure messaging in a session at security level 00")
            return wrapped, chain
        if cla & _FURTHER_INTERINDUSTRY or cla & 0x0C != _SM_CLA_BIT:
            raise MacMismatch(f"CLA {cla:02X} lacks the secure messaging indication")
        if cla & _CHANNEL_BITS != self.channel:
            raise SecureChannelError(f"command on channel {cla & 3}, session on {self.channel}")
        data = wrapped.data
        mac_len = self.mac_len
        lc = len(data)  # Lc as transmitted: it counts the MAC
        if lc < mac_len:
            raise MacMismatch("command too short to hold a C-MAC")
        body = data[:-mac_len]
        ins, p1, p2, le = wrapped.ins, wrapped.p1, wrapped.p2, wrapped.le
        # ``command_mac`` written out, as in ``protect_command``.
        extended = wrapped.extended or lc > _SHORT_MAX_LC or (le is not None and le > _SHORT_MAX_LE)
        lc_field = b"\x00" + lc.to_bytes(2, "big") if extended else bytes((lc,))
        header = bytes(((cla & 0xF0) | _SM_CLA_BIT, ins, p1, p2))
        full_mac = self._keys.s_mac.cmac(chain + header + lc_field + body)
        if not compare_digest(full_mac[:mac_len], data[-mac_len:]):
            raise MacMismatch("C-MAC does not verify")
        if self._c_dec and body:
            if len(body) % BLOCK:
                raise SecureChannelError("encrypted command data is not whole blocks")
            body = unpad_m2(self._keys.s_enc.cbc_decrypt(self._icv(counter, False), body))
        plain = CommandAPDU(cla & ~_SM_CLA_BIT, ins, p1, p2, body, le, wrapped.extended)
        return plain, full_mac

    def protect_response(self, response: ResponseAPDU, chain: bytes, counter: int
                         ) -> ResponseAPDU:
        if not self._r_mac:
            return response
        sw = response.sw
        if not response_is_protected(sw):
            return ResponseAPDU(b"", sw) if response.data else response
        body = response.data
        if self._r_enc and body:
            body = self._keys.s_enc.cbc_encrypt_with_encrypted_iv(
                self._counter_block(counter, True), pad_m2(body)
            )
        rmac = self._keys.s_rmac.cmac(chain + body + sw.to_bytes(2, "big"))
        return ResponseAPDU(body + rmac[: self.mac_len], sw)
