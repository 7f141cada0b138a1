"""Raw SCP03 primitives ("hazmat"): AES-CMAC, the SCP03 KDF, AES-CBC/ECB, M2 padding, KCV.

Private to ``protocol.scp03``: these functions take raw keys and check nothing about how
they are used. The session API above them is the safe layer.

Speed notes (measured with pyca/cryptography 50, one core): a fresh ``cmac.CMAC`` costs
about 1–1.7 µs, a ``.copy()`` of a keyed template about 0.3 µs, and ``KBKDFCMAC`` about
11 µs per derivation — so keys are kept as ``AesKey`` objects holding a CMAC template, one
CBC context per direction and an ECB encryptor, and the KDF is written directly over CMAC.
A fresh cipher context costs about 4 µs, so every CBC message of a key goes through the
same context (see ``AesKey``), which also spares the per-block Python loop short inputs had.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from protocol.errors import SecureChannelError

BLOCK = 16
AES_KEY_LENGTHS = (16, 24, 32)
_KCV_INPUT = b"\x01" * BLOCK  # GPC v2.3 §11.8.2.3: AES KCV over 16 bytes '01'
_ZERO_BLOCK = bytes(BLOCK)


class AesKey:
    """An AES key with its reusable cipher contexts. Never printed.

    Contexts are made on first use (each costs about 4 µs to set up): MAC-only keys (S-MAC,
    S-RMAC, Key-MAC) only ever build the CMAC template; S-ENC builds what its side uses.

    CBC with any IV runs through one long-lived CBC context per direction. An encrypting
    context chains from the last ciphertext block it produced, so XORing that block and the
    wanted IV into the first plaintext block gives exactly CBC under the wanted IV; a
    decrypting one XORs the last ciphertext block it was given into the first plaintext
    block, which is corrected the same way. So one context serves every message instead of
    one context (or a Python loop) per message. Those contexts are state: an ``AesKey``
    belongs to one thread.
    """

    __slots__ = ("_algorithm", "_cmac", "_encrypt_block", "_cbc_encrypt", "_cbc_encrypt_last",
                 "_cbc_decrypt", "_cbc_decrypt_last", "length")

    def __init__(self, key: bytes) -> None:
        if len(key) not in AES_KEY_LENGTHS:
            raise SecureChannelError(f"AES key must be 16, 24 or 32 bytes, not {len(key)}")
        self.length = len(key)
        self._algorithm = algorithms.AES(bytes(key))
        self._cmac: cmac.CMAC | None = None
        self._encrypt_block: Callable[[bytes], bytes] | None = None
        # The CBC contexts and their chaining values (the zero IV to begin with), as integers.
        self._cbc_encrypt: Callable[[bytes], bytes] | None = None
        self._cbc_encrypt_last = 0
        self._cbc_decrypt: Callable[[bytes], bytes] | None = None
        self._cbc_decrypt_last = 0

    def __repr__(self) -> str:
        return f"AesKey(AES-{self.length * 8}, <redacted>)"

    def _cipher(self, mode: modes.Mode, encrypt: bool) -> Callable[[bytes], bytes]:
        cipher = Cipher(self._algorithm, mode)
        return (cipher.encryptor() if encrypt else cipher.decryptor()).update

    def cmac(self, data: bytes) -> bytes:
        """AES-CMAC (NIST SP 800-38B), full 16 bytes."""
        template = self._cmac
        if template is None:
            template = self._cmac = cmac.CMAC(self._algorithm)
        mac = template.copy()
        mac.update(data)
        return mac.finalize()

    def ecb_encrypt(self, data: bytes) -> bytes:
        """AES-ECB over whole blocks (used for ICVs and key check values)."""
        encrypt = self._encrypt_block
        if encrypt is None:
            # An ECB context keeps no state between update() calls: safe to reuse.
            encrypt = self._encrypt_block = self._cipher(modes.ECB(), True)  # noqa: S305
        return encrypt(data)

    def cbc_encrypt(self, iv: bytes, data: bytes) -> bytes:
        """AES-CBC without padding; ``data`` must be whole blocks."""
        n = len(data)
        if n == 0 or n % BLOCK:
            raise SecureChannelError("CBC input is not a whole number of blocks")
        encrypt = self._cbc_encrypt
        if encrypt is None:
            encrypt = self._cbc_encrypt = self._cipher(modes.CBC(bytes(BLOCK)), True)
        mask = int.from_bytes(iv, "big") ^ self._cbc_encrypt_last
        if mask:
            first = (int.from_bytes(data[:BLOCK], "big") ^ mask).to_bytes(BLOCK, "big")
            data = first + data[BLOCK:]
        out = encrypt(data)
        self._cbc_encrypt_last = int.from_bytes(out[-BLOCK:], "big")
        return out

    def cbc_encrypt_with_encrypted_iv(self, iv_input: bytes, data: bytes) -> bytes:
        """AES-CBC of ``data`` under the IV AES(key, ``iv_input``), the ICV of SCP03's C-DEC
        and R-ENC (GP Amd D §6.2.6, §6.2.7): CBC with a zero IV over ``iv_input`` ‖ ``data``
        makes that IV as its first block, so one call replaces an ECB call and a CBC call."""
        if len(iv_input) != BLOCK:
            raise SecureChannelError("the IV input must be one block")
        return self.cbc_encrypt(_ZERO_BLOCK, iv_input + data)[BLOCK:]

    def cbc_decrypt(self, iv: bytes, data: bytes) -> bytes:
        """AES-CBC decryption without unpadding."""
        n = len(data)
        if n == 0 or n % BLOCK:
            raise SecureChannelError("CBC ciphertext is not a whole number of blocks")
        decrypt = self._cbc_decrypt
        if decrypt is None:
            decrypt = self._cbc_decrypt = self._cipher(modes.CBC(bytes(BLOCK)), False)
        out = decrypt(data)
        mask = int.from_bytes(iv, "big") ^ self._cbc_decrypt_last
        self._cbc_decrypt_last = int.from_bytes(data[-BLOCK:], "big")
        if mask:
            first = (int.from_bytes(out[:BLOCK], "big") ^ mask).to_bytes(BLOCK, "big")
            out = first + out[BLOCK:]
        return out


def kdf(key: AesKey, constant: int, context: bytes, bits: int) -> bytes:
    """SCP03 data derivation, GP Amd D §4.1.5: NIST SP 800-108 KDF in counter mode with
    AES-CMAC as PRF. Fixed input per iteration i: label (11 × '00' ‖ constant) ‖ '00'
    separator ‖ L (2 bytes, in bits) ‖ i (1 byte) ‖ context. Output is the first L bits."""
    prefix = _KDF_FIRST_BLOCK.get((constant, bits))
    if prefix is not None:  # one CMAC block of output, the case of every SCP03 derivation
        return key.cmac(prefix + context)[: bits // 8]
    if bits <= 0 or bits % 8 or bits > 0xFFFF:
        raise SecureChannelError(f"KDF output length {bits} bits is not supported")
    prefix = bytes(11) + bytes((constant, 0)) + bits.to_bytes(2, "big")
    n_bytes = bits // 8
    blocks = -(-n_bytes // BLOCK)
    if blocks > 0xFF:
        raise SecureChannelError("KDF counter overflow")
    if blocks == 1:
        return key.cmac(prefix + b"\x01" + context)[:n_bytes]
    out = b"".join(key.cmac(prefix + bytes((i,)) + context) for i in range(1, blocks + 1))
    return out[:n_bytes]


# The fixed input up to the counter, counter 1 included, of the derivations of at most one
# block: SCP03's constants 00-07 at 64 and 128 bits (cryptograms, challenges, AES-128 keys).
_KDF_FIRST_BLOCK = {
    (constant, bits): bytes(11) + bytes((constant, 0)) + bits.to_bytes(2, "big") + b"\x01"
    for constant in range(8)
    for bits in (64, 128)
}


def pad_m2(data: bytes) -> bytes:
    """ISO/IEC 9797-1 padding method 2 to a multiple of 16 bytes ('80' then '00's)."""
    return data + b"\x80" + bytes(BLOCK - 1 - len(data) % BLOCK)


def unpad_m2(padded: bytes) -> bytes:
    """Strip ISO/IEC 9797-1 method 2 padding; a missing '80' marker is a typed error.

    Deliberately lenient about length: some SEs pad a response past the next block
    boundary (the Samsung OpenSCP traces pad 11 bytes to 32). That costs nothing here,
    because SCP03 verifies the MAC over the ciphertext before anything is decrypted, so
    there is no padding oracle. What this module produces is always minimal (``pad_m2``).
    """
    stripped = padded.rstrip(b"\x00")
    if not stripped or stripped[-1] != 0x80:
        raise SecureChannelError("bad ISO 9797-1 M2 padding")
    return stripped[:-1]


def key_check_value(key: bytes) -> bytes:
    """AES key check value: the first 3 bytes of AES-ECB(key, 16 × '01') (GPC v2.3 §11.8.2.3)."""
    return AesKey(key).ecb_encrypt(_KCV_INPUT)[:3]

