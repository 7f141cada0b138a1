"""The real ``openssl`` CLI judges our certificates, complete CRLs and the OCSP responder."""

from __future__ import annotations

import asyncio
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from ca_support import PASSPHRASE, SE, issue_card, key_request, make_person, verify
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from workers.ca import CaKind, Cause, CertificateAuthority, CertType
from workers.ca.http import serve

pytestmark = [
    pytest.mark.openssl,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="*** openssl CLI not installed ***"),
]


@pytest.fixture
async def live_ca(tmp_path, keys):
    """A CA on the real clock: openssl checks CRL and OCSP times against it."""
    authority = await CertificateAuthority.open(tmp_path / "ca", PASSPHRASE, new_key=keys)
    yield authority
    await authority.close()


async def openssl(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "openssl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode()


def pem(path: Path, *ders: bytes, crl: bool = False) -> Path:
    blocks = [
        (x509.load_der_x509_crl(d) if crl else x509.load_der_x509_certificate(d)).public_bytes(
            serialization.Encoding.PEM
        )
        for d in ders
    ]
    path.write_bytes(b"".join(blocks))
    return path


async def phone_certificates(ca, keys, saga_id: str):
    card = await issue_card(ca, keys)
    await verify(ca, card, saga_id, os.urandom(32), requested_at=datetime.now(UTC))
    return await ca.issue(
        saga_id,
        [key_request(saga_id, CertType.AUTH, keys()), key_request(saga_id, CertType.SIGN, keys())],
    )


async def crl_verify(ca, tmp_path: Path, certificate: bytes, kind: CaKind) -> tuple[int, str]:
    cas = pem(
        tmp_path / "cas.pem",
        *(
            i.certificate.public_bytes(serialization.Encoding.DER)
            for i in ca.generations()
            if i.kind is kind
        ),
    )
    crls = pem(
        tmp_path / "crls.pem",
        *[await ca.crl(kind, i.generation) for i in ca.generations() if i.kind is kind],
        crl=True,
    )
    leaf = pem(tmp_path / "leaf.pem", certificate)
    return await openssl(
        "verify", "-crl_check", "-CAfile", str(cas), "-CRLfile", str(crls), str(leaf)
    )


async def test_verify_with_complete_crls(live_ca, keys, tmp_path) -> None:
    auth, sign = await phone_certificates(live_ca, keys, "saga-1")
    code, out = await crl_verify(live_ca, tmp_path, auth.der, CaKind.AUTH)
    assert code == 0 and out.strip().endswith(": OK"), out
    code, out = await crl_verify(live_ca, tmp_path, sign.der, CaKind.SIGN)
    assert code == 0 and out.strip().endswith(": OK"), out

    await live_ca.hold(auth.serial)
    await live_ca.revoke(sign.serial, Cause.LOSS)
    code, out = await crl_verify(live_ca, tmp_path, auth.der, CaKind.AUTH)
    assert code != 0 and "certificate revoked" in out, out
    code, out = await crl_verify(live_ca, tmp_path, sign.der, CaKind.SIGN)
    assert code != 0 and "certificate revoked" in out, out

    await live_ca.release(auth.serial)  # released: off the next complete CRL
    code, out = await crl_verify(live_ca, tmp_path, auth.der, CaKind.AUTH)
    assert code == 0 and out.strip().endswith(": OK"), out


async def test_chains_are_built_by_key_identifier_across_a_rollover(
    live_ca, keys, tmp_path
) -> None:
    before, _ = await phone_certificates(live_ca, keys, "saga-1")
    await live_ca.rollover(CaKind.AUTH)
    generations = [i for i in live_ca.generations() if i.kind is CaKind.AUTH]
    assert len(generations) == 2
    assert generations[0].certificate.subject == generations[1].certificate.subject
    assert generations[0].key_id != generations[1].key_id
    card = await issue_card(live_ca, keys, make_person("person-0002"))  # not a renewal
    await verify(live_ca, card, "saga-2", os.urandom(32), requested_at=datetime.now(UTC))
    (after,) = await live_ca.issue("saga-2", [key_request("saga-2", CertType.AUTH, keys())])
    # both roots in one CA file under one name: openssl must pick each leaf's by key id
    for issued in (before, after):
        code, out = await crl_verify(live_ca, tmp_path, issued.der, CaKind.AUTH)
        assert code == 0 and out.strip().endswith(": OK"), out
    # with only the other generation's root the chain does not build
    only_new = pem(
        tmp_path / "new.pem", generations[1].certificate.public_bytes(serialization.Encoding.DER)
    )
    code, out = await openssl(
        "verify", "-CAfile", str(only_new), str(pem(tmp_path / "old.pem", before.der))
    )
    assert code != 0, out
    # a revocation of an old-generation certificate lands on that generation's CRL
    await live_ca.revoke(before.serial, Cause.DISPOSAL)
    code, out = await crl_verify(live_ca, tmp_path, before.der, CaKind.AUTH)
    assert code != 0 and "certificate revoked" in out, out
    code, out = await crl_verify(live_ca, tmp_path, after.der, CaKind.AUTH)
    assert code == 0, out


@pytest.fixture
async def responder(live_ca):
    runner = await serve(live_ca, "127.0.0.1", 0)
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/"
    await runner.cleanup()


async def ocsp_query(ca, tmp_path: Path, url: str, issued) -> tuple[int, str]:
    issuer = next(
        i
        for i in ca.generations()
        if i.certificate.public_bytes(serialization.Encoding.DER) == issued.ca_der
    )
    ca_pem = pem(tmp_path / "issuer.pem", issued.ca_der)
    leaf = pem(tmp_path / f"{issued.serial}.pem", issued.der)
    assert issuer is not None
    return await openssl(
        "ocsp", "-issuer", str(ca_pem), "-cert", str(leaf), "-url", url, "-CAfile", str(ca_pem)
    )


async def test_ocsp_responder_reports_good_held_and_revoked(
    live_ca, keys, tmp_path, responder
) -> None:
    auth, sign = await phone_certificates(live_ca, keys, "saga-1")
    for issued in (auth, sign):
        code, out = await ocsp_query(live_ca, tmp_path, responder, issued)
        assert code == 0, out
        assert "Response verify OK" in out, out
        assert f"{issued.serial}.pem: good" in out, out

    await live_ca.hold(auth.serial)
    code, out = await ocsp_query(live_ca, tmp_path, responder, auth)
    assert "Response verify OK" in out, out
    assert f"{auth.serial}.pem: revoked" in out and "Reason: certificateHold" in out, out

    await live_ca.revoke(sign.serial, Cause.MODEL_CHANGE)
    code, out = await ocsp_query(live_ca, tmp_path, responder, sign)
    assert "Response verify OK" in out, out
    assert f"{sign.serial}.pem: revoked" in out and "Reason: superseded" in out, out

    await live_ca.release(auth.serial)
    code, out = await ocsp_query(live_ca, tmp_path, responder, auth)
    assert "Response verify OK" in out and f"{auth.serial}.pem: good" in out, out


async def test_http_serves_crls_and_ca_certificates(live_ca, keys, responder) -> None:
    import aiohttp

    auth, _ = await phone_certificates(live_ca, keys, "saga-1")
    await live_ca.revoke(auth.serial, Cause.FAILURE)
    async with aiohttp.ClientSession() as session:
        async with session.get(responder + "crl/auth.crl") as response:
            assert response.status == 200
            crl = x509.load_der_x509_crl(await response.read())
        async with session.get(responder + "crl/auth-g9.crl") as response:
            assert response.status == 404
        async with session.get(responder + "ca/sign-g1.crt") as response:
            assert x509.load_der_x509_certificate(await response.read()).subject == (
                live_ca.issuer(CaKind.SIGN).certificate.subject
            )
        async with session.post(responder, data=b"not an ocsp request") as response:
            from cryptography.x509 import ocsp

            assert ocsp.load_der_ocsp_response(await response.read()).response_status is (
                ocsp.OCSPResponseStatus.MALFORMED_REQUEST
            )
    entry = crl.get_revoked_certificate_by_serial_number(int(auth.serial, 16))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is (
        x509.ReasonFlags.cessation_of_operation
    )
    assert SE.cin  # the SE identity travels in the index, not in certificates
