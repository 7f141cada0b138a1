"""``jpki ca init|rollover|export``, ``jpki bench ca`` (tiny run) and the CA on PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import re

import pytest
from ca_support import PASSPHRASE, SE, issue_card, key_request, verify
from click.testing import CliRunner
from cryptography import x509

from infra.db.database import Database
from jpki.cli import main
from workers.ca import CaKind, Cause, CertificateAuthority, CertType, Status
from workers.ca.state_check import Branch


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("JPKI_CA_PASSPHRASE", PASSPHRASE.value.decode())
    monkeypatch.delenv("JPKI_CA_PASSPHRASE_FILE", raising=False)


async def test_export_writes_cas_crls_certificates_and_index(env, tmp_path, keys, clock) -> None:
    data = tmp_path / "data"
    ca = await CertificateAuthority.open(data, PASSPHRASE, new_key=keys, clock=clock)
    card = await issue_card(ca, keys)
    await verify(ca, card, "saga-1", os.urandom(32))
    auth, sign = await ca.issue(
        "saga-1",
        [
            key_request("saga-1", CertType.AUTH, keys()),
            key_request("saga-1", CertType.SIGN, keys()),
        ],
    )
    await ca.hold(auth.serial)
    await ca.revoke(sign.serial, Cause.DISPOSAL)
    await ca.close()

    runner = CliRunner()  # the commands run their own event loop: call them from a thread
    result = await asyncio.to_thread(
        runner.invoke, main, ["ca", "rollover", "--data-dir", str(data), "--kind", "sign"]
    )
    assert result.exit_code == 0, result.output
    assert "sign CA generation 2" in result.output
    out = tmp_path / "export"
    result = await asyncio.to_thread(
        runner.invoke, main, ["ca", "export", "--data-dir", str(data), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "ca").iterdir()) == [
        "auth-g1.pem",
        "sign-g1.pem",
        "sign-g2.pem",
    ]
    assert sorted(p.name for p in (out / "crl").iterdir()) == [
        "auth-g1.crl.pem",
        "sign-g1.crl.pem",
        "sign-g2.crl.pem",
    ]
    crl = x509.load_pem_x509_crl((out / "crl" / "sign-g1.crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(sign.serial, 16)) is not None
    assert len(list((out / "certs").iterdir())) == 4
    lines = (out / "index.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:8] == [
        "serial",
        "holder",
        "type",
        "ca_generation",
        "status",
        "reason",
        "se",
        "person",
    ]
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    assert rows[auth.serial][1:8] == [
        "phone",
        "auth",
        "1",
        "held",
        "certificate_hold",
        SE.cin,
        "person-0001",
    ]
    assert rows[sign.serial][4:6] == ["revoked", "cessation_of_operation"]
    assert rows[card.certs.sign.serial][1:5] == ["card", "sign", "1", "valid"]


def test_commands_refuse_without_a_passphrase(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("JPKI_CA_PASSPHRASE", raising=False)
    monkeypatch.delenv("JPKI_CA_PASSPHRASE_FILE", raising=False)
    result = CliRunner().invoke(main, ["ca", "init", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "set JPKI_CA_PASSPHRASE or JPKI_CA_PASSPHRASE_FILE" in result.output
    assert "Traceback" not in result.output


def test_a_run_data_directory_opens_with_its_own_passphrase(monkeypatch, tmp_path) -> None:
    """``jpki run`` keeps the passphrase it made in ``<data dir>/secrets``: export reads it."""
    monkeypatch.delenv("JPKI_CA_PASSPHRASE", raising=False)
    monkeypatch.delenv("JPKI_CA_PASSPHRASE_FILE", raising=False)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "ca.passphrase").write_bytes(PASSPHRASE.value + b"\n")
    runner = CliRunner()
    assert runner.invoke(main, ["ca", "init", "--data-dir", str(tmp_path)]).exit_code == 0
    out = tmp_path / "export"
    result = runner.invoke(main, ["ca", "export", "--data-dir", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert list(out.glob("*.pem")) or list(out.rglob("*.pem"))
    (tmp_path / "secrets" / "ca.passphrase").write_bytes(b"not-the-passphrase")
    refused = runner.invoke(main, ["ca", "export", "--data-dir", str(tmp_path), "--out", str(out)])
    assert refused.exit_code != 0


def test_bench_prints_both_rates(env) -> None:
    result = CliRunner().invoke(
        main, ["bench", "ca", "--issuances", "6", "--rounds", "1", "--raw-seconds", "0.2"]
    )
    assert result.exit_code == 0, result.output
    assert "raw RSA-2048 sign:" in result.output
    assert "CA two-cert issuance:" in result.output and "(6 issuances" in result.output
    cpu = re.search(r"CPU per issuance: +([0-9.]+) ms .* ideal ([0-9.]+) ms", result.output)
    assert cpu is not None and float(cpu[1]) > 0 and float(cpu[2]) > 0, result.output
    assert re.search(r"load average \(1/5/15 min\): [0-9.]+ [0-9.]+ [0-9.]+ before", result.output)
    assert "share per round:" in result.output


@pytest.mark.postgres
async def test_the_ca_runs_on_postgresql(pg_url, unique, tmp_path, keys, clock) -> None:
    db = Database.for_service("ca", url=pg_url, schema=f"ca_test_{unique}")
    ca = await CertificateAuthority.open(
        tmp_path / "pg", PASSPHRASE, db=db, new_key=keys, clock=clock
    )
    try:
        card = await issue_card(ca, keys)
        await verify(ca, card, "saga-1", os.urandom(32))
        assert (await ca.state_check("saga-1")).branch is Branch.NEW_ISSUANCE
        requests = [
            key_request("saga-1", CertType.AUTH, keys()),
            key_request("saga-1", CertType.SIGN, keys()),
        ]
        first = await ca.issue("saga-1", requests)
        assert [c.der for c in await ca.issue("saga-1", requests)] == [c.der for c in first]
        await ca.hold(first[0].serial)
        changes = await ca.revoke(card.certs.sign.serial, Cause.CARD_RENEWED)
        assert {c.serial for c in changes} == {
            card.certs.sign.serial,
            first[0].serial,
            first[1].serial,
        }
        assert (await ca.certificate(first[0].serial)).status is Status.REVOKED
        crl = x509.load_der_x509_crl(await ca.crl(CaKind.AUTH))
        assert crl.get_revoked_certificate_by_serial_number(int(first[0].serial, 16)) is not None
    finally:
        await ca.close()
        await db.drop_schema()


async def test_ocsp_serve_command_answers_over_http(env, tmp_path, keys, clock) -> None:
    """``jpki ocsp serve`` as its own process: CRL download and an OCSP answer."""
    import socket
    import sys

    import aiohttp
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp

    data = tmp_path / "data"
    ca = await CertificateAuthority.open(data, PASSPHRASE, new_key=keys, clock=clock)
    card = await issue_card(ca, keys)
    await ca.revoke(card.certs.auth.serial, Cause.CARD_LOST)
    await ca.close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    jpki = os.path.join(os.path.dirname(sys.executable), "jpki")
    process = await asyncio.create_subprocess_exec(
        jpki,
        "ocsp",
        "serve",
        "--data-dir",
        str(data),
        "--port",
        str(port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        async with aiohttp.ClientSession() as session:
            for _ in range(600):  # a loaded machine can take seconds to import and start
                try:
                    async with session.get(url + "crl/auth.crl") as response:
                        crl = x509.load_der_x509_crl(await response.read())
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            else:
                process.terminate()
                _, err = await process.communicate()
                pytest.fail(f"jpki ocsp serve did not start listening: {err.decode()[-2000:]}")
            assert crl.get_revoked_certificate_by_serial_number(int(card.certs.auth.serial, 16))
            request = (
                ocsp.OCSPRequestBuilder()
                .add_certificate(
                    card.certs.auth.certificate,
                    x509.load_der_x509_certificate(card.certs.auth.ca_der),
                    hashes.SHA256(),
                )
                .build()
            )
            async with session.post(
                url,
                data=request.public_bytes(serialization.Encoding.DER),
                headers={"Content-Type": "application/ocsp-request"},
            ) as response:
                answer = ocsp.load_der_ocsp_response(await response.read())
        assert answer.certificate_status is ocsp.OCSPCertStatus.REVOKED
        assert answer.revocation_reason is x509.ReasonFlags.key_compromise
    finally:
        process.terminate()
        await process.wait()
