"""``jpki bench ca``: two-certificate issuances per second against the raw RSA-2048 sign rate.

One issuance is what the worker does for ``ca.cmd.issue``: read the verified application
and the card certificate, check two proofs of possession, build and sign two certificates,
store them in SQLite, commit. Preparing the work (card, verified applications, phone keys
and their proofs) happens before the clock starts. The raw rate is pyca/cryptography's
RSA-2048 PKCS#1 v1.5 / SHA-256 signature over 32 bytes, measured in the same run on the
same machine. An issuance costs two signatures, so the ceiling is raw ÷ 2; the target is at
least 40 % of that.

Rates on a shared machine move with the load, so the bench also states what does not: the
process CPU per issuance (every thread of the process, signing threads included) next to the
ideal, two raw signatures' CPU, and the load average before and after. Raw and issuance
rounds alternate; the share is given per round pair (median and range) as well as overall.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import click
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from infra.db.outbox import outgoing
from infra.transport.base import Delivery
from infra.transport.inprocess import InProcessTransport
from jpki.bench.machine import machine
from protocol import jpki
from protocol.envelope import build, decode
from workers.ca import messages as m
from workers.ca.application import KEY_EF, Application, SeIdentity
from workers.ca.authority import CertificateAuthority, KeyRequest, Person
from workers.ca.keystore import Passphrase
from workers.ca.profiles import BasicFacts, CertType, Sex
from workers.ca.service import CaWorker

TARGET_SHARE = 0.40


@dataclass(frozen=True)
class Measured:
    """``count`` operations in ``seconds`` of wall time and ``cpu_seconds`` of process CPU."""

    count: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_seconds / self.count

    def __add__(self, other: Measured) -> Measured:
        return Measured(
            self.count + other.count,
            self.seconds + other.seconds,
            self.cpu_seconds + other.cpu_seconds,
        )


@dataclass
class Rounds:
    raw: list[Measured] = field(default_factory=list)
    issuance: list[Measured] = field(default_factory=list)

    @staticmethod
    def _total(items: list[Measured]) -> Measured:
        total = Measured(0, 0.0, 0.0)
        for item in items:
            total += item
        return total

    @property
    def raw_total(self) -> Measured:
        return self._total(self.raw)

    @property
    def issuance_total(self) -> Measured:
        return self._total(self.issuance)

    def shares(self) -> list[float]:
        """Issuance rate ÷ (raw rate ÷ 2) of each round pair."""
        return [
            done.rate / (raw.rate / 2) for raw, done in zip(self.raw, self.issuance, strict=True)
        ]


def raw_sign_rate(key: rsa.RSAPrivateKey, seconds: float) -> Measured:
    data = os.urandom(32)
    count = 0
    cpu = time.process_time()
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for _ in range(16):
            key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        count += 16
    return Measured(count, time.perf_counter() - started, time.process_time() - cpu)


def _key_request(cert_type: CertType, key: rsa.RSAPrivateKey, challenge: bytes) -> KeyRequest:
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    proof = key.sign(
        jpki.proof_message(KEY_EF[cert_type], challenge, spki), padding.PKCS1v15(), hashes.SHA256()
    )
    return KeyRequest(cert_type=cert_type, public_key_der=spki, challenge=challenge, proof=proof)


async def prepare(ca: CertificateAuthority, issuances: int) -> list[tuple[str, list[KeyRequest]]]:
    """A person with a card and ``issuances`` verified applications with proven keys."""
    person = Person(
        person_id="bench-person",
        facts=BasicFacts(
            name="試験 太郎", date_of_birth=date(1990, 1, 1), sex=Sex.MALE, address="東京都千代田区"
        ),
        prefecture="東京都",
        city="千代田区",
    )
    card_sign_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    card = await ca.issue_card_certificates(
        person,
        rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(),
        card_sign_key.public_key(),
        card_expiry=datetime.now(UTC) + timedelta(days=3650),
    )
    se = SeIdentity(cin="0102030405060708090A", kdd="A1A2A3A4A5A6A7A8A9AA")
    # phone keys are the applet's business: a few, reused, keep preparation short
    phone_keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(4)]
    work: list[tuple[str, list[KeyRequest]]] = []
    for index in range(issuances):
        saga_id = f"bench-{index:06d}"
        nonce = os.urandom(32)
        tbs = Application(
            application_id=saga_id,
            nonce=nonce,
            device_id="bench-phone",
            app_instance_id="b" * 32,
            se=se,
            certificates=[CertType.AUTH, CertType.SIGN],
            requested_at=datetime.now(UTC),
        ).to_be_signed()
        await ca.verify_application(
            saga_id=saga_id,
            expected_nonce=nonce,
            expected_se=se,
            to_be_signed=tbs,
            signature=card_sign_key.sign(tbs, padding.PKCS1v15(), hashes.SHA256()),
            card_certificate=card.sign.der,
        )
        challenge = os.urandom(32)
        work.append(
            (
                saga_id,
                [
                    _key_request(CertType.AUTH, phone_keys[index % 4], challenge),
                    _key_request(CertType.SIGN, phone_keys[(index + 1) % 4], challenge),
                ],
            )
        )
    return work


async def issue_all(
    ca: CertificateAuthority, work: list[tuple[str, list[KeyRequest]]], concurrency: int
) -> None:
    """Issue every planned pair with ``concurrency`` requests in flight."""
    pending = iter(work)

    async def lane() -> None:
        for saga_id, requests in pending:
            issued = await ca.issue(saga_id, requests)
            if len(issued) != 2:
                raise RuntimeError("an issuance returned fewer than two certificates")

    await asyncio.gather(*(lane() for _ in range(concurrency)))


class WorkerPath:
    """Issuance through the worker as deployed: ``ca.cmd.issue`` on the ``ca`` queue, the
    inbox consumer's batched transactions, replies through the outbox relay (in-process
    transport, so the broker's own cost is not counted)."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.transport = InProcessTransport()
        self.worker = CaWorker(ca, self.transport)
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    async def start(self) -> None:
        await self.transport.connect()
        await self.transport.declare_queue("bench.replies", ["ca.reply.#"])

        async def collect(delivery: Delivery) -> None:
            await self.replies.put(delivery.body)
            await delivery.ack()

        await self.transport.consume("bench.replies", collect, prefetch=1024)
        await self.worker.start()

    async def stop(self) -> None:
        # Let the relay settle into its idle wait first: on Python 3.11 asyncio.wait_for
        # swallows a cancel that lands as its inner wait completes (CPython gh-86296), and
        # OutboxRelay.stop() then waits forever.
        await asyncio.sleep(0.2)
        await self.worker.stop()
        await self.transport.close()

    async def issue_all(self, work: list[tuple[str, list[KeyRequest]]]) -> None:
        commands = [
            outgoing(
                build(
                    m.IssueCertificates(
                        command_id=f"issue-{saga_id}",
                        public_keys=[
                            m.PublicKeyProof(
                                kind=r.cert_type,
                                public_key_der=r.public_key_der,
                                challenge=r.challenge,
                                proof=r.proof,
                            )
                            for r in requests
                        ],
                    ),
                    saga_id=saga_id,
                )
            )
            for saga_id, requests in work
        ]
        await self.transport.publish(commands)
        for _ in commands:
            reply = decode(await asyncio.wait_for(self.replies.get(), 60))
            if not reply.body.ok or len(reply.body.certificates) != 2:
                raise RuntimeError(f"issuance failed: {reply.body.failure}")


async def run(
    data_dir: Path,
    issuances: int,
    rounds: int,
    concurrency: int,
    raw_seconds: float,
    through_worker: bool,
) -> Rounds:
    """Alternate raw-sign and issuance rounds so both see the same machine load."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = await CertificateAuthority.open(data_dir, Passphrase(os.urandom(16).hex().encode()))
    try:
        work = await prepare(ca, issuances)
        path = WorkerPath(ca) if through_worker else None
        if path is not None:
            await path.start()
        per_round = max(1, issuances // rounds)
        measured = Rounds()
        for start in range(0, issuances, per_round):
            measured.raw.append(raw_sign_rate(key, raw_seconds / rounds))
            chunk = work[start : start + per_round]
            cpu, started = time.process_time(), time.perf_counter()
            if path is not None:
                await path.issue_all(chunk)
            else:
                await issue_all(ca, chunk, concurrency)
            measured.issuance.append(
                Measured(len(chunk), time.perf_counter() - started, time.process_time() - cpu)
            )
        if path is not None:
            await path.stop()
        issued = measured.issuance_total.count
        stored = len(await ca.certificates())
        if stored != 2 * issued + 2:
            raise RuntimeError(f"expected {2 * issued + 2} stored certificates, found {stored}")
        return measured
    finally:
        await ca.close()


def _load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


@click.command("ca")
@click.option("--issuances", type=int, default=400, show_default=True)
@click.option("--rounds", type=int, default=4, show_default=True)
@click.option(
    "--concurrency",
    type=int,
    default=1,
    show_default=True,
    help="issuance requests in flight (the worker handles a batch at a time)",
)
@click.option("--raw-seconds", type=float, default=4.0, show_default=True)
@click.option(
    "--path",
    "issuance_path",
    type=click.Choice(["worker", "direct"]),
    default="worker",
    show_default=True,
    help="worker: ca.cmd.issue through the worker (inbox batches, outbox replies); "
    "direct: CertificateAuthority.issue calls",
)
def ca_bench(
    issuances: int, rounds: int, concurrency: int, raw_seconds: float, issuance_path: str
) -> None:
    """Two-certificate issuances/s of the CA (SQLite) next to the raw RSA-2048 sign rate."""
    click.echo(
        f"machine: {machine()}"
    )
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="jpki-bench-ca-") as tmp:
        measured = asyncio.run(
            run(Path(tmp), issuances, rounds, concurrency, raw_seconds, issuance_path == "worker")
        )
    raw, done = measured.raw_total, measured.issuance_total
    ceiling = raw.rate / 2
    share = done.rate / ceiling
    ideal_ms = 2 * raw.cpu_ms
    shares = measured.shares()
    click.echo(f"load average (1/5/15 min): {load_before} before, {_load()} after")
    click.echo(
        f"raw RSA-2048 sign:     {raw.rate:8.1f} signatures/s "
        f"({raw.count} signatures, {raw.cpu_ms:.3f} ms CPU each)"
    )
    click.echo(f"ceiling (raw / 2):     {ceiling:8.1f} issuances/s")
    click.echo(
        f"CA two-cert issuance:  {done.rate:8.1f} issuances/s "
        f"({done.count} issuances, SQLite, "
        + (
            "through the worker)"
            if issuance_path == "worker"
            else f"direct, concurrency {concurrency})"
        )
    )
    click.echo(
        f"CPU per issuance:      {done.cpu_ms:8.3f} ms (process, all threads); "
        f"ideal {ideal_ms:.3f} ms (2 raw signatures): {done.cpu_ms / ideal_ms:.2f} x ideal"
    )
    verdict = "met" if share >= TARGET_SHARE else "NOT met"
    click.echo(f"share of ceiling:      {share:8.1%} (target {TARGET_SHARE:.0%}: {verdict})")
    click.echo(
        f"share per round:       {statistics.median(shares):8.1%} median, "
        f"{min(shares):.1%} to {max(shares):.1%} ({len(shares)} rounds)"
    )
