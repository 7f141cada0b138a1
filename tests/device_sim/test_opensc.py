"""OpenSC against the simulated card, through pcscd and the vsmartcard virtual reader.

``jpki card serve --vpcd`` runs as a real subprocess; OpenSC's own ``jpki`` driver
(``pkcs15-tool``, ``pkcs11-tool``) talks to it. Skipped loudly when pcscd, the vpcd
driver or OpenSC are missing; failed instead under ``JPKI_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from tests.services import unavailable

pytestmark = pytest.mark.opensc

VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
VPCD_PORT = 35963
PCSCD_SOCKET = Path("/run/pcscd/pcscd.comm")
PIN = "4826"
PASSWORD = "JPKI2026SIGN"


def _require(condition: bool, what: str) -> None:
    if condition:
        return
    reason = f"*** {what}: OpenSC interop test SKIPPED (install pcscd vsmartcard-vpcd opensc) ***"
    unavailable(reason)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5):
            return True
    except OSError:
        return False


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({result.returncode}):\n{result.stdout}\n"
                             f"{result.stderr}")
    return result


@pytest.fixture(scope="module")
def reader_lock() -> Iterator[None]:
    """One virtual reader per machine: test runs in parallel take turns."""
    with open(Path(tempfile.gettempdir()) / "jpki-vpcd-reader.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def pcscd(reader_lock: None) -> Iterator[None]:
    for tool in ("pcscd", "pkcs15-tool", "pkcs11-tool", "opensc-tool"):
        _require(shutil.which(tool) is not None, f"{tool} is not installed")
    _require(VPCD_DRIVER.exists(), "the vsmartcard vpcd driver is not installed")
    process = None
    if not _port_open(VPCD_PORT):
        # No pcscd with the vpcd reader yet: start our own, stopped at the end.
        _require(not PCSCD_SOCKET.exists() or os.access(PCSCD_SOCKET.parent, os.W_OK),
                 "a pcscd without the vpcd reader is running and cannot be replaced")
        process = subprocess.Popen(["pcscd", "--foreground"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            _wait(lambda: _port_open(VPCD_PORT), 15, "pcscd to open the vpcd port")
        except AssertionError:
            process.terminate()
            raise
    yield
    if process is not None:
        process.terminate()
        process.wait(10)


@pytest.fixture
def served(pcscd: None, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A freshly personalised card (or phone applet) in the virtual reader."""
    phone = getattr(request, "param", False)
    certs = tmp_path / "certs"
    command = [
        sys.executable, "-c", "from jpki.cli import main; main()", "card", "serve", "--vpcd",
        "--pin", PIN, "--sign-password", PASSWORD, "--export-certificates", str(certs),
    ] + (["--phone"] if phone else [])
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "serving a" not in line:
            line = server.stdout.readline()
            assert line or server.poll() is None, "jpki card serve exited early"
            assert time.monotonic() < deadline, "jpki card serve did not connect"
        _wait(lambda: run("opensc-tool", "--atr", check=False).stdout.strip().startswith(
            "3b:e0:00:ff:81:31:fe:45:14"), 20, "the card to appear in the reader")
        yield certs
    finally:
        server.terminate()
        server.wait(10)
        # The reader must see the card leave before the next test inserts a new one.
        _wait(lambda: run("opensc-tool", "--atr", check=False).returncode != 0, 20,
              "the card to leave the reader")


def tries_left(label: str) -> int:
    listing = run("pkcs15-tool", "--list-pins").stdout
    block = listing.split(f"PIN [{label}]")[1]
    return int(re.search(r"Tries left\s*:\s*(-?\d+)", block).group(1))


def test_card_driver_and_certificates(served: Path) -> None:
    assert run("opensc-tool", "--name").stdout.strip().splitlines()[-1] == "jpki"
    listing = run("pkcs15-tool", "--list-certificates").stdout
    entry = r"X\.509 Certificate \[([^\]]+)\]\n(?:\t.*\n)*?\tPath\s*:\s*(\w+)"
    certificates = dict(re.findall(entry, listing))
    assert len(certificates) == 4
    for label, path in (("User Authentication Certificate", "000a"),
                        ("Digital Signature Certificate", "0001"),
                        ("User Authentication Certificate CA", "000b"),
                        ("Digital Signature Certificate CA", "0002")):
        assert certificates[label] == path, label
    # What OpenSC reads back is byte for byte what the card holds.
    pem = run("pkcs15-tool", "--read-certificate", "01").stdout
    read_back = x509.load_pem_x509_certificate(pem.encode())
    assert read_back == x509.load_der_x509_certificate((served / "000A.der").read_bytes())
    pins = run("pkcs15-tool", "--list-pins").stdout
    assert "User Authentication PIN" in pins and "Digital Signature PIN" in pins
    assert tries_left("User Authentication PIN") == 3
    assert tries_left("Digital Signature PIN") == 5


@pytest.mark.parametrize(("slot", "key_id", "pin", "cert"), [
    ("0", "01", PIN, "000A.der"),
    ("1", "02", PASSWORD, "0001.der"),
])
def test_pkcs11_signature_verifies(served: Path, tmp_path: Path, slot: str, key_id: str,
                                   pin: str, cert: str) -> None:
    data = tmp_path / "data.txt"
    data.write_bytes(b"signed through PKCS#11 by a simulated My Number Card\n")
    signature = tmp_path / "signature.bin"
    run("pkcs11-tool", "--slot-index", slot, "--login", "--pin", pin, "--sign",
        "-m", "SHA256-RSA-PKCS", "--id", key_id, "-i", str(data), "-o", str(signature))
    certificate = x509.load_der_x509_certificate((served / cert).read_bytes())
    certificate.public_key().verify(signature.read_bytes(), data.read_bytes(),
                                    padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize(("label", "slot", "wrong", "right", "tries"), [
    ("User Authentication PIN", "0", "0000", PIN, 3),
    ("Digital Signature PIN", "1", "WRONG123", PASSWORD, 5),
])
def test_wrong_pins_count_down_and_block(served: Path, label: str, slot: str, wrong: str,
                                         right: str, tries: int) -> None:
    for left in range(tries - 1, -1, -1):
        result = run("pkcs11-tool", "--slot-index", slot, "--login", "--pin", wrong,
                     "--test", check=False)
        assert result.returncode != 0
        assert "CKR_PIN_INCORRECT" in result.stdout + result.stderr
        assert tries_left(label) == left
    # 6984: blocked, even for the right PIN; OpenSC reports the token locked.
    auth_id = "01" if slot == "0" else "02"
    blocked = run("pkcs15-tool", "--verify-pin", "--auth-id", auth_id, "--pin", right,
                  check=False)
    assert "Reference data not usable" in blocked.stdout + blocked.stderr
    assert tries_left(label) == 0
    tokens = run("pkcs11-tool", "--list-slots").stdout
    (slot_listing,) = [block for block in tokens.split("\nSlot ") if f"JPKI ({label})" in block]
    assert re.search(r"token flags\s*:.*user PIN locked", slot_listing)


@pytest.mark.parametrize("served", [True], indirect=True, ids=["phone"])
def test_phone_applet_auth_certificate_needs_the_pin(served: Path, tmp_path: Path) -> None:
    """The phone's SE (card manager + applet, personalised by SP-TSM scripts) in the reader."""
    token = run("opensc-tool", "--send-apdu", "00A4040C0AD392F000260100000001",
                "--send-apdu", "00A4020C020006", "--send-apdu", "00B0000020").stdout
    assert b"JPKIAPGPSETOKEN".hex(" ").upper() in token.upper().replace(":", " ")
    refused = run("pkcs15-tool", "--read-certificate", "01", check=False)
    assert "BEGIN CERTIFICATE" not in refused.stdout
    raw = run("opensc-tool", "--send-apdu", "00A4040C0AD392F000260100000001",
              "--send-apdu", "00A4020C02000A", "--send-apdu", "00B0000004").stdout
    assert raw.count("SW1=0x90, SW2=0x00") == 2 and "SW1=0x69, SW2=0x82" in raw
    allowed = run("pkcs15-tool", "--read-certificate", "01", "--verify-pin", "--auth-id", "01",
                  "--pin", PIN).stdout
    certificate = x509.load_der_x509_certificate((served / "000A.der").read_bytes())
    assert x509.load_pem_x509_certificate(allowed.encode()) == certificate
    data, signature = tmp_path / "login.txt", tmp_path / "login.sig"
    data.write_bytes(b"phase-4 login challenge")
    run("pkcs11-tool", "--slot-index", "0", "--login", "--pin", PIN, "--sign",
        "-m", "SHA256-RSA-PKCS", "--id", "01", "-i", str(data), "-o", str(signature))
    certificate.public_key().verify(signature.read_bytes(), data.read_bytes(),
                                    padding.PKCS1v15(), hashes.SHA256())
