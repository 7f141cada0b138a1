"""Find a secret in captured payloads in any of the encodings a leak could take.

Two passes over every payload:

1. the raw bytes: the secret's ASCII text, the hex of its bytes (both cases), and — for
   secrets long enough that it cannot match by chance — the characters of its standard and
   URL-safe base64 at each of the three byte alignments it could have inside a longer
   encoded value (only the characters the secret alone decides are compared);
2. the decoded values: every JSON string in the payload that decodes as base64 (either
   alphabet) or hex is decoded and searched for the secret's bytes, so a short secret (the
   4-digit PIN) inside any encoded blob is found at any offset.

A digits-only secret in ASCII must stand alone — not inside a longer run of digits or of
base64/hex text, where a timestamp, a counter or random bytes would match by chance (a leak
of it in a decoded value is pass 2's to find).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# Below this many bytes a secret's base64 core is 4-5 characters: in a megabyte of
# certificates and ciphertext such a core turns up by chance. Pass 2 covers short secrets.
MIN_BYTES_FOR_BASE64_CORES = 6


@dataclass(frozen=True, slots=True)
class Captured:
    where: str  # "mqtt:<topic>" or "amqp:<routing key>"
    payload: bytes


@dataclass(frozen=True, slots=True)
class Hit:
    secret_label: str
    encoding: str
    where: str
    context: str


def _base64_cores(secret: bytes) -> list[tuple[str, bytes]]:
    cores = []
    for align in range(3):
        for name, encode in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
            encoded = encode(b"\x00" * align + secret)
            start = -(-8 * align // 6)  # first character made of the secret's bits only
            end = (8 * (align + len(secret))) // 6  # last such character (exclusive)
            cores.append((f"{name}@{align}", encoded[start:end]))
    return cores


def patterns(secret: str) -> list[tuple[str, re.Pattern[bytes]]]:
    raw = secret.encode()
    found: list[tuple[str, re.Pattern[bytes]]] = []
    if secret.isdigit():
        # standing alone: not part of a longer token (a number, a hyphenated id, the year
        # of a date such as a certificate's "2031-03-13T00:00:00Z")
        found.append(("ascii", re.compile(
            rb"(?<![0-9A-Za-z.+/_-])" + re.escape(raw) + rb"(?![0-9A-Za-z-])")))
    else:
        found.append(("ascii", re.compile(re.escape(raw))))
    found.append(("hex", re.compile(re.escape(raw.hex().encode()), re.IGNORECASE)))
    if len(raw) >= MIN_BYTES_FOR_BASE64_CORES:
        for name, core in _base64_cores(raw):
            found.append((name, re.compile(re.escape(core))))
    return found


_HEX = re.compile(r"^(?:[0-9A-Fa-f]{2}){4,}$")
_B64 = re.compile(r"^[A-Za-z0-9+/_-]{8,}={0,2}$")


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def decoded_values(payload: bytes) -> Iterator[tuple[str, bytes]]:
    """(encoding, bytes) of every JSON string value that is hex or base64."""
    try:
        document = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return
    for text in _strings(document):
        if _HEX.match(text):
            yield "hex-value", bytes.fromhex(text)
        if _B64.match(text):
            padded = text + "=" * (-len(text) % 4)
            for name, decode in (("base64-value", base64.b64decode),
                                 ("base64url-value", base64.urlsafe_b64decode)):
                try:
                    yield name, decode(padded)
                except (binascii.Error, ValueError):
                    continue


def scan(
    captured: Iterable[Captured], secrets: dict[str, str], *, allowed: str | None = None
) -> list[Hit]:
    """Every payload where a secret (label → value) occurs. ``allowed``: a regex on
    ``where`` where occurrences are expected (and not reported)."""
    compiled = {label: patterns(value) for label, value in secrets.items()}
    # in decoded values the same "stands alone" rule as in ASCII: a PIN's digits inside a
    # certificate's UTCTime or a JSON timestamp are not that PIN
    in_values = {label: pats[0][1] for label, pats in compiled.items()}
    allow = re.compile(allowed) if allowed else None
    hits: list[Hit] = []
    for item in captured:
        if allow is not None and allow.search(item.where):
            continue
        found: set[str] = set()
        for label, pats in compiled.items():
            for encoding, pattern in pats:
                match = pattern.search(item.payload)
                if match:
                    lo, hi = max(0, match.start() - 40), match.end() + 40
                    hits.append(Hit(label, encoding, item.where,
                                    item.payload[lo:hi].decode("ascii", "replace")))
                    found.add(label)
                    break  # one hit per secret and payload is enough to name the leak
        for encoding, blob in decoded_values(item.payload):
            for label, pattern in in_values.items():
                if label not in found and pattern.search(blob):
                    hits.append(Hit(label, encoding, item.where, "<inside a decoded value>"))
                    found.add(label)
    return hits
