"""Making secure elements the SP-TSM can talk to: the factory's side of key diversification.

A phone leaves the factory with an SE whose SP-TSM security domain holds the static SCP03
keys diversified from the TSM's master keys with the SE's KDD (``keys.MasterKeys``), the
JPKI applet's load file in ROM, and an empty registry. The fleet of simulated phones and
the benchmarks make their SEs here; the TSM enrols an SE on first contact, or up front
with ``register``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from device_sim.se.applet_api import AppletFactory
from device_sim.se.card_manager import ChallengeMode, KeySet, LoadFile
from device_sim.se.element import SecureElement
from workers.tsm import scripts
from workers.tsm.keys import MasterKeyRing
from workers.tsm.registry import ChallengeMode as RegistryChallengeMode
from workers.tsm.registry import Registry, SeRecord

Random = Callable[[int], bytes]


def jpki_load_file(factory: AppletFactory) -> LoadFile:
    return LoadFile(scripts.JPKI_ELF_AID, (scripts.JPKI_MODULE_AID,), factory)


def manufacture_secure_element(
    keys: MasterKeyRing,
    cin: bytes,
    factory: AppletFactory,
    *,
    challenge_mode: ChallengeMode = ChallengeMode.PSEUDO_RANDOM,
    random: Random = os.urandom,
) -> SecureElement:
    """A new SE: KDD = CIN (10 bytes), SP-TSM keys of the current master key version.

    The issuer security domain gets random keys nobody here knows, as on a real phone:
    the SP-TSM manages the applet through its own domain only.
    """
    if len(cin) != 10:
        raise ValueError("a CIN (our KDD) is 10 bytes")
    issuer_keys = KeySet(0x01, random(16), random(16), random(16))
    return SecureElement.manufacture(
        cin=cin,
        isd_keys=issuer_keys,
        sp_sd_keys=keys.current_keys.for_se(cin),
        load_files=[jpki_load_file(factory)],
        challenge_mode=challenge_mode,
        sp_sd_aid=scripts.SP_SD_AID,
        random_bytes=random,
    )


async def register(
    registry: Registry, element: SecureElement, device_id: str, key_version: int
) -> SeRecord:
    """Record a manufactured SE before its first session (the counter is then exact)."""
    identity = element.identity
    sp_sd = element.manager.domains[element.sp_sd_aid]
    record = SeRecord(
        cin=identity.cin.hex().upper(),
        kdd=identity.kdd.hex().upper(),
        device_id=device_id,
        key_version=key_version,
        sequence_counter=sp_sd.sequence_counter,
        challenge_mode=RegistryChallengeMode(sp_sd.challenge_mode.value),
    )
    await registry.add(record)
    return record
