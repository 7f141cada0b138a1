"""Raw SCP03 primitives ("hazmat"): AES-CMAC, the SCP03 KDF, AES-CBC/ECB, M2 padding, KCV.

Private to ``protocol.scp03``: these functions take raw keys and check nothing about how
they are used. The session API above them is the safe layer.

Speed notes (measured with pyca/cryptography 50, one core): a fresh ``cmac.CMAC`` costs
about 4 µs, a ``.copy()`` of a keyed template about 1 µs, and ``KBKDFCMAC`` about 11 µs per
derivation — so keys are kept as ``AesKey`` objects holding a CMAC template and an ECB
encryptor/decryptor, and the KDF is written directly over CMAC. A fresh CBC context costs
about 8 µs, so short inputs are chained block by block over the cached ECB context instead.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from protocol.errors import SecureChannelError

BLOCK = 16
AES_KEY_LENGTHS = (16, 24, 32)
_KCV_INPUT = b"\x01" * BLOCK  # GPC v2.3 §11.8.2.3: AES KCV over 16 bytes '01'
# CBC over more blocks than this goes through one OpenSSL CBC context (cheaper than the
# per-block loop from here on, measured).
_CBC_LOOP_MAX_BLOCKS = 4


class AesKey:
    """An AES key with its reusable cipher contexts. Never printed.

    The ECB contexts are made on first use: MAC-only keys (S-MAC, S-RMAC, Key-MAC) never
    need them, and each costs about 5 µs to set up.
    """

    __slots__ = ("_algorithm", "_cmac", "_encrypt_block", "_decrypt_blocks", "length")

    def __init__(self, key: bytes) -> None:
        if len(key) not in AES_KEY_LENGTHS:
            raise SecureChannelError(f"AES key must be 16, 24 or 32 bytes, not {len(key)}")
        self.length = len(key)
        self._algorithm = algorithms.AES(bytes(key))
        self._cmac = cmac.CMAC(self._algorithm)
        self._encrypt_block: Callable[[bytes], bytes] | None = None
        self._decrypt_blocks: Callable[[bytes], bytes] | None = None

    def __repr__(self) -> str:
        return f"AesKey(AES-{self.length * 8}, <redacted>)"

    def cmac(self, data: bytes) -> bytes:
        """AES-CMAC (NIST SP 800-38B), full 16 bytes."""
        mac = self._cmac.copy()
        mac.update(data)
        return mac.finalize()

    def _encryptor(self) -> Callable[[bytes], bytes]:
        encrypt = self._encrypt_block
        if encrypt is None:
            # An ECB context keeps no state between update() calls: safe to reuse.
            encrypt = Cipher(self._algorithm, modes.ECB()).encryptor().update  # noqa: S305
            self._encrypt_block = encrypt
        return encrypt

    def ecb_encrypt(self, data: bytes) -> bytes:
        """AES-ECB over whole blocks (used for ICVs and key check values)."""
        return self._encryptor()(data)

    def _ecb_decrypt(self, data: bytes) -> bytes:
        decrypt = self._decrypt_blocks
        if decrypt is None:
            decrypt = Cipher(self._algorithm, modes.ECB()).decryptor().update  # noqa: S305
            self._decrypt_blocks = decrypt
        return decrypt(data)

    def cbc_encrypt(self, iv: bytes, data: bytes) -> bytes:
        """AES-CBC without padding; ``data`` must be whole blocks."""
        n = len(data)
        if n % BLOCK:
            raise SecureChannelError("CBC input is not a whole number of blocks")
        if n > _CBC_LOOP_MAX_BLOCKS * BLOCK:
            encryptor = Cipher(self._algorithm, modes.CBC(iv)).encryptor()
            return encryptor.update(data) + encryptor.finalize()
        out = []
        chain = int.from_bytes(iv, "big")
        encrypt = self._encryptor()
        for offset in range(0, n, BLOCK):
            plain = int.from_bytes(data[offset : offset + BLOCK], "big")
            block = encrypt((plain ^ chain).to_bytes(BLOCK, "big"))
            out.append(block)
            chain = int.from_bytes(block, "big")
        return b"".join(out)

    def cbc_decrypt(self, iv: bytes, data: bytes) -> bytes:
        """AES-CBC decryption without unpadding: one ECB pass, then one XOR (CBC decryption
        has no chaining dependency)."""
        n = len(data)
        if n == 0 or n % BLOCK:
            raise SecureChannelError("CBC ciphertext is not a whole number of blocks")
        decrypted = self._ecb_decrypt(data)
        previous = iv + data[:-BLOCK]
        return (int.from_bytes(decrypted, "big") ^ int.from_bytes(previous, "big")).to_bytes(
            n, "big"
        )


def kdf(key: AesKey, constant: int, context: bytes, bits: int) -> bytes:
    """SCP03 data derivation, GP Amd D §4.1.5: NIST SP 800-108 KDF in counter mode with
    AES-CMAC as PRF. Fixed input per iteration i: label (11 × '00' ‖ constant) ‖ '00'
    separator ‖ L (2 bytes, in bits) ‖ i (1 byte) ‖ context. Output is the first L bits."""
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

