"""pkilint (RFC 5280 / RFC 6960 profiles) finds no ERROR in anything the CA produces."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
from pathlib import Path

from ca_support import issue_card, key_request, verify
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from workers.ca import CaKind, Cause, CertType


def lint(tool: str, path: Path, *options: str) -> list[tuple[str, str]]:
    """(severity, code) of every finding at WARNING or above, from the pkilint command-line
    tool's own entry point run in-process (one interpreter start instead of one per file)."""
    module = importlib.import_module(f"pkilint.bin.{tool}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        # the exit code is the number of findings (clamped); the JSON says which
        module.main(["lint", *options, "-s", "WARNING", "-f", "JSON", str(path)])
    report = json.loads(out.getvalue() or '{"results": []}')
    return [
        (finding["severity"], finding["code"])
        for entry in report["results"]
        for finding in entry["finding_descriptions"]
    ]


def no_errors(findings: list[tuple[str, str]]) -> bool:
    return not [f for f in findings if f[0] in ("ERROR", "FATAL")]


def ocsp_request(issued, ca_der: bytes) -> bytes:
    from cryptography import x509

    builder = ocsp.OCSPRequestBuilder().add_certificate(
        issued.certificate, x509.load_der_x509_certificate(ca_der), hashes.SHA1()
    )
    return (
        builder.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
        .build()
        .public_bytes(serialization.Encoding.DER)
    )


async def test_every_certificate_crl_and_ocsp_response_lints_clean(ca, keys, tmp_path) -> None:
    card = await issue_card(ca, keys)
    await verify(ca, card, "saga-1", os.urandom(32))
    auth, sign = await ca.issue(
        "saga-1",
        [
            key_request("saga-1", CertType.AUTH, keys()),
            key_request("saga-1", CertType.SIGN, keys()),
        ],
    )
    documents: dict[str, tuple[str, bytes, tuple[str, ...]]] = {}
    for issuer in ca.generations():
        documents[f"ca-{issuer.kind.value}"] = (
            "lint_pkix_cert",
            issuer.certificate.public_bytes(serialization.Encoding.DER),
            (),
        )
        documents[f"crl-empty-{issuer.kind.value}"] = (
            "lint_crl",
            await ca.crl(issuer.kind),
            ("-t", "CRL", "-p", "PKIX"),
        )
    for name, issued in (
        ("card-auth", card.certs.auth),
        ("card-sign", card.certs.sign),
        ("phone-auth", auth),
        ("phone-sign", sign),
    ):
        documents[name] = ("lint_pkix_cert", issued.der, ())
    documents["ocsp-good"] = (
        "lint_ocsp_response",
        await ca.ocsp(ocsp_request(auth, auth.ca_der)),
        (),
    )
    await ca.hold(auth.serial)
    await ca.revoke(sign.serial, Cause.LOSS)
    documents["ocsp-held"] = (
        "lint_ocsp_response",
        await ca.ocsp(ocsp_request(auth, auth.ca_der)),
        (),
    )
    documents["ocsp-revoked"] = (
        "lint_ocsp_response",
        await ca.ocsp(ocsp_request(sign, sign.ca_der)),
        (),
    )
    documents["ocsp-unknown"] = (
        "lint_ocsp_response",
        await ca.ocsp(ocsp_request(card.certs.auth, sign.ca_der)),
        (),
    )
    documents["ocsp-malformed"] = ("lint_ocsp_response", await ca.ocsp(b"\x30\x00"), ())
    for kind in CaKind:
        documents[f"crl-entries-{kind.value}"] = (
            "lint_crl",
            await ca.crl(kind),
            ("-t", "CRL", "-p", "PKIX"),
        )
    assert ocsp.load_der_ocsp_response(documents["ocsp-unknown"][1]).certificate_status is (
        ocsp.OCSPCertStatus.UNKNOWN
    )

    failures = {}
    for name, (tool, der, options) in documents.items():
        path = tmp_path / f"{name}.der"
        path.write_bytes(der)
        findings = lint(tool, path, "--document-format", "DER", *options)
        if findings:  # stricter than the bar (no ERROR): no WARNING either
            failures[name] = findings
    assert failures == {}


def test_the_linter_does_report_errors(tmp_path, keys) -> None:
    """Control: an end-entity certificate without AKI and with keyCertSign is an ERROR."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509

    key = keys()
    now = datetime.now(UTC)
    bad = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ca")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, False, False, False), True
        )
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "bad.der"
    path.write_bytes(bad.public_bytes(serialization.Encoding.DER))
    assert not no_errors(lint("lint_pkix_cert", path, "--document-format", "DER"))
