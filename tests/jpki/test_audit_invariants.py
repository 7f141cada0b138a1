"""Each invariant of ``jpki audit``, broken on purpose and named; a clean world passes."""

from __future__ import annotations

from dataclasses import replace

from jpki.audit import (
    CertificateFact,
    Invariant,
    RegistryFact,
    SagaFact,
    SeFact,
    Stores,
    audit,
)

NOW = 1_000_000.0
KEY_A, KEY_S = "aa" * 32, "bb" * 32


def _cert(serial: str, kind: str = "auth", **kw) -> CertificateFact:
    base = dict(serial=serial, cert_type=kind, person_id="p1", se_cin="SE1", saga_id="s1",
                status="valid", expired=False, spki_sha256=KEY_A if kind == "auth" else KEY_S)
    base.update(kw)
    return CertificateFact(**base)


def _world() -> Stores:
    """One person, one phone, both certificates issued by a completed saga."""
    return Stores(
        certificates=[_cert("01", "auth"), _cert("02", "sign")],
        sagas=[SagaFact("s1", "issuance.new", "completed", False, NOW - 10, "SE1", ("01", "02"))],
        secure_elements=[SeFact("SE1", "phone-1", True, True, {"auth": KEY_A, "sign": KEY_S})],
        registry=[RegistryFact("SE1", holds_keys=True)],
    )


def _named(stores: Stores) -> set[Invariant]:
    return {v.invariant for v in audit(stores, now=NOW)}


def test_a_consistent_world_passes() -> None:
    assert audit(_world(), now=NOW) == []


def test_active_certificate_without_its_key() -> None:
    world = _world()
    wiped = replace(world, secure_elements=[SeFact("SE1", "phone-1", True, True, {"auth": KEY_A})])
    violations = audit(wiped, now=NOW)
    assert [(v.invariant, v.subject) for v in violations] == [
        (Invariant.ACTIVE_CERTIFICATE_WITHOUT_KEY, "02")
    ]
    other_key = replace(world, secure_elements=[
        SeFact("SE1", "phone-1", True, True, {"auth": "cc" * 32, "sign": KEY_S})])
    assert _named(other_key) == {Invariant.ACTIVE_CERTIFICATE_WITHOUT_KEY}
    broken_phone = replace(world, secure_elements=[
        SeFact("SE1", "phone-1", False, True, {"auth": KEY_A, "sign": KEY_S})])
    assert len(audit(broken_phone, now=NOW)) == 2


def test_certificate_left_by_a_compensated_saga() -> None:
    world = replace(_world(), sagas=[
        SagaFact("s1", "issuance.new", "compensated", False, NOW - 10, "SE1", ("01", "02"))])
    world = replace(world, certificates=[_cert("01"), _cert("02", "sign", status="revoked")])
    violations = audit(world, now=NOW)
    assert Invariant.CERTIFICATE_LEFT_BY_COMPENSATED_SAGA in {v.invariant for v in violations}
    assert [v.subject for v in violations
            if v.invariant is Invariant.CERTIFICATE_LEFT_BY_COMPENSATED_SAGA] == ["01"]


def test_two_active_phones_for_one_person() -> None:
    world = _world()
    second = [_cert("03", se_cin="SE2", saga_id="s2", spki_sha256="dd" * 32)]
    world = replace(
        world,
        certificates=[*world.certificates, *second],
        secure_elements=[*world.secure_elements,
                         SeFact("SE2", "phone-2", True, True, {"auth": "dd" * 32})],
    )
    violations = [v for v in audit(world, now=NOW) if v.invariant is Invariant.TWO_ACTIVE_PHONES]
    assert [v.subject for v in violations] == ["p1"]
    revoked_old = replace(world, certificates=[
        _cert("01", status="revoked"), _cert("02", "sign", status="revoked"), *second])
    assert Invariant.TWO_ACTIVE_PHONES not in _named(revoked_old)


def test_saga_past_deadline_without_operator_flag() -> None:
    stuck = SagaFact("s9", "issuance.new", "running", False, NOW - 1, "SE9")
    world = replace(_world(), sagas=[*_world().sagas, stuck])
    assert [v.subject for v in audit(world, now=NOW)] == ["s9"]
    flagged = replace(world, sagas=[*_world().sagas, replace(stuck, paused=True)])
    assert audit(flagged, now=NOW) == []
    in_time = replace(world, sagas=[*_world().sagas, replace(stuck, deadline_at=NOW + 60)])
    assert audit(in_time, now=NOW) == []


def test_keyed_applet_without_certificate_outside_a_running_saga() -> None:
    world = _world()
    orphan = SeFact("SE7", "phone-7", True, True, {"auth": "ee" * 32})
    stores = replace(world, secure_elements=[*world.secure_elements, orphan])
    assert [(v.invariant, v.subject) for v in audit(stores, now=NOW)] == [
        (Invariant.KEYED_APPLET_WITHOUT_CERTIFICATE, "SE7")
    ]
    running = SagaFact("s7", "issuance.new", "running", False, NOW + 600, "SE7")
    assert audit(replace(stores, sagas=[*world.sagas, running]), now=NOW) == []
    recorded = SagaFact("s8", "issuance.new", "completed", False, NOW, "SE8",
                        pending_applet_deletions=("SE7",))
    assert audit(replace(stores, sagas=[*world.sagas, recorded]), now=NOW) == []
    empty_applet = replace(orphan, keys={})
    assert audit(replace(world, secure_elements=[*world.secure_elements, empty_applet]),
                 now=NOW) == []


def test_registry_disagreeing_with_the_se() -> None:
    world = replace(_world(), registry=[RegistryFact("SE1", holds_keys=False)])
    assert _named(world) == {Invariant.REGISTRY_DISAGREES_WITH_SE}
    cut_off = replace(_world(), registry=[RegistryFact("SE1", False, operation_running=True)])
    assert audit(cut_off, now=NOW) == []


def test_without_the_fleet_store_only_backend_invariants_are_checked() -> None:
    world = replace(_world(), secure_elements=None)
    assert audit(world, now=NOW) == []
