"""Find a secret in captured payloads in any of the encodings a leak could take.

Encodings checked: the ASCII text itself, hex (both cases) of its bytes, and standard and
URL-safe base64 at each of the three byte alignments it could have inside a longer encoded
value (only the characters the secret alone decides are compared). Digits-only secrets (the
4-digit authentication PIN) in ASCII must stand alone — not inside a longer run of digits,
where a timestamp or a counter would match by chance.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass


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
            core = encoded[start:end]
            if len(core) >= 4:
                cores.append((f"{name}@{align}", core))
    return cores


def patterns(secret: str) -> list[tuple[str, re.Pattern[bytes]]]:
    raw = secret.encode()
    found: list[tuple[str, re.Pattern[bytes]]] = []
    if secret.isdigit():
        found.append(("ascii", re.compile(rb"(?<![0-9.])" + re.escape(raw) + rb"(?![0-9])")))
    else:
        found.append(("ascii", re.compile(re.escape(raw))))
    found.append(("hex", re.compile(re.escape(raw.hex().encode()), re.IGNORECASE)))
    for name, core in _base64_cores(raw):
        found.append((name, re.compile(re.escape(core))))
    return found


def scan(
    captured: Iterable[Captured], secrets: dict[str, str], *, allowed: str | None = None
) -> list[Hit]:
    """Every occurrence of every secret (label → value). ``allowed``: a regex on ``where``
    where occurrences are expected (and not reported)."""
    compiled = {label: patterns(value) for label, value in secrets.items()}
    allow = re.compile(allowed) if allowed else None
    hits: list[Hit] = []
    for item in captured:
        if allow is not None and allow.search(item.where):
            continue
        for label, pats in compiled.items():
            for encoding, pattern in pats:
                match = pattern.search(item.payload)
                if match:
                    lo, hi = max(0, match.start() - 40), match.end() + 40
                    hits.append(Hit(label, encoding, item.where,
                                    item.payload[lo:hi].decode("ascii", "replace")))
                    break  # one hit per secret and payload is enough to name the leak
    return hits
