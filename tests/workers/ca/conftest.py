"""Fixtures of the CA tests: a key pool (RSA generation is the slow part), a clock we move
and a CA in a temporary directory."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta

import pytest
from ca_support import PASSPHRASE, T0
from cryptography.hazmat.primitives.asymmetric import rsa

from workers.ca import CertificateAuthority


@pytest.fixture(scope="session")
def key_pool() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(24)]


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def keys(key_pool: list[rsa.RSAPrivateKey]) -> Callable[[], rsa.RSAPrivateKey]:
    """Distinct keys, in order, for one test (the CA takes its generations' keys here too)."""
    source = iter(key_pool)
    return lambda: next(source)


@pytest.fixture
async def ca(tmp_path, clock: Clock, keys) -> AsyncIterator[CertificateAuthority]:
    authority = await CertificateAuthority.open(
        tmp_path / "ca", PASSPHRASE, clock=clock, random_bytes=os.urandom, new_key=keys
    )
    yield authority
    await authority.close()
