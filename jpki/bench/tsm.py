"""``jpki bench tsm``: SP-TSM personalisation sessions per second.

One session is step 10 of the issuance saga for two certificates, exactly as the TSM
worker runs ``tsm.cmd.store_certificates``: look the SE up, derive its keys, compute a
whole SCP03 level-33 session offline (INITIALIZE UPDATE, EXTERNAL AUTHENTICATE, four
WRITE CERTIFICATE — both certificates and both CA certificates — and two SET TEMPORARY
PIN), send it as one script, let the SE run it, verify every answer (card cryptogram,
R-MAC, R-ENC), seal the temporary PINs, record the outcome.

The secure elements are simulated in this same process, so their work (card side of
SCP03, the applet parsing certificates) is on the clock too. Their RSA key pairs come
from a PRE-GENERATED KEY POOL (labelled as such in the output): the figures measure the
back end, not the simulator's key generation. Preparing the SEs (install, key pairs,
certificates) happens before the clock starts.

Part 2 puts a simulated phone link with a fixed round-trip time (default 20 ms) between
the TSM and the SEs and runs the same sessions at several concurrency levels: with one
round trip per session, sessions/s ≈ concurrency / RTT until the CPU is the limit.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import platform
import time
from dataclasses import dataclass

import click
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from device_sim.se.jpki_applet import JpkiAppletFactory, PooledKeys
from orchestrator.messages import CertificateKind, PinOption, SeIdentity
from workers.tsm import messages as m
from workers.tsm.engine import InProcessPhoneLink, TsmEngine
from workers.tsm.keys import MasterKeyRing, MasterKeys
from workers.tsm.provisioning import manufacture_secure_element, register
from workers.tsm.registry import MemoryRegistry

TARGET_IN_PROCESS = 2000.0
TARGET_OVER_LINK = 1000.0


@dataclass(frozen=True, slots=True)
class Figure:
    label: str
    concurrency: int
    sessions: int
    seconds: float
    cpu_seconds: float  # this process's CPU time during the measurement
    se_cpu_seconds: float  # of which the simulated SEs ran scripts

    @property
    def tsm_cpu_ms(self) -> float:
        return 1000 * (self.cpu_seconds - self.se_cpu_seconds) / self.sessions

    @property
    def se_cpu_ms(self) -> float:
        return 1000 * self.se_cpu_seconds / self.sessions

    @property
    def rate(self) -> float:
        return self.sessions / self.seconds


def _quiet_logging() -> None:
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=True,
    )


class _CertificateFactory:
    """Test certificates for the pooled keys (one per distinct key, made once)."""

    def __init__(self) -> None:
        self._ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._cache: dict[bytes, bytes] = {}

    def __call__(self, public_key_der: bytes) -> bytes:
        certificate = self._cache.get(public_key_der)
        if certificate is None:
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
            now = datetime.datetime.now(datetime.UTC)
            certificate = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(serialization.load_der_public_key(public_key_der))
                .serial_number(x509.random_serial_number())
                .not_valid_before(now)
                .not_valid_after(now + datetime.timedelta(days=1))
                .sign(self._ca_key, hashes.SHA256())
                .public_bytes(serialization.Encoding.DER)
            )
            self._cache[public_key_der] = certificate
        return certificate


class _Bench:
    def __init__(self, count: int, pool_size: int) -> None:
        self.count = count
        self.ring = MasterKeyRing({0x30: MasterKeys.generate(0x30)}, 0x30)
        self.registry = MemoryRegistry()
        self.link = InProcessPhoneLink()
        self.engine = TsmEngine(self.ring, self.registry, self.link)
        self.factory = JpkiAppletFactory(key_source=PooledKeys(pool_size))
        self.certificates = _CertificateFactory()
        self.requests: list[tuple[str, SeIdentity, list[m.CertificateToStore]]] = []
        self._run = 0

    async def prepare(self) -> None:
        for n in range(self.count):
            element = manufacture_secure_element(self.ring, n.to_bytes(10, "big"), self.factory)
            device_id = f"bench{n}"
            self.link.attach(device_id, element)
            await register(self.registry, element, device_id, 0x30)
            identity = SeIdentity(
                cin=element.identity.cin.hex().upper(), kdd=element.identity.kdd.hex().upper()
            )
            installed = await self.engine.execute(
                m.InstallApplet(command_id=f"install-{n}", device_id=device_id, se=identity)
            )
            generated = await self.engine.execute(
                m.GenerateKeys(
                    command_id=f"keys-{n}", device_id=device_id, se=identity,
                    certificates=[CertificateKind.AUTH, CertificateKind.SIGN],
                    owner_reference=f"bench-person-{n}",
                )
            )
            if not (installed.ok and generated.ok):
                raise click.ClickException("preparing the secure elements failed")
            self.requests.append(
                (
                    device_id,
                    identity,
                    [
                        m.CertificateToStore(
                            kind=key.kind,
                            certificate=self.certificates(key.public_key_der),
                            ca_certificate=self.certificates(key.public_key_der),
                        )
                        for key in generated.public_keys
                    ],
                )
            )

    async def measure(self, label: str, concurrency: int, latency: float, sessions: int) -> Figure:
        self.link.latency = latency
        self._run += 1
        run = self._run
        commands = [
            m.StoreCertificates(
                command_id=f"store-{run}-{i}",
                device_id=device_id,
                se=identity,
                certificates=certificates,
                pin_option=PinOption.INITIAL_STATE,
            )
            for i, (device_id, identity, certificates) in zip(
                range(sessions), _cycle(self.requests, sessions), strict=True
            )
        ]
        queue: asyncio.Queue[m.StoreCertificates] = asyncio.Queue()
        for command in commands:
            queue.put_nowait(command)
        failures = 0

        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                reply = await self.engine.execute(queue.get_nowait())
                if not reply.ok:
                    failures += 1

        se_before = self.link.se_cpu_seconds
        cpu_before = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu_before
        if failures:
            raise click.ClickException(f"{failures} sessions failed in {label}")
        return Figure(
            label, concurrency, sessions, seconds, cpu, self.link.se_cpu_seconds - se_before
        )


def _cycle(items: list, count: int):  # noqa: ANN202 - a plain generator
    for i in range(count):
        yield items[i % len(items)]


async def _run(
    count: int, sessions: int, pool_size: int, rtt_ms: float, levels: list[int], local: int
) -> tuple[list[Figure], list[Figure]]:
    bench = _Bench(count, pool_size)
    click.echo(
        f"preparing {count} simulated SEs (install + two key pairs each; RSA keys from the "
        f"PRE-GENERATED KEY POOL of {pool_size} keys) ..."
    )
    await bench.prepare()
    await bench.measure("warm-up", local, 0.0, min(sessions, 200))
    in_process = [await bench.measure("in-process", local, 0.0, sessions)]
    over_link = []
    for level in levels:
        # Enough sessions for at least ~1 s of steady state, never fewer than 2 x level.
        expected = level / (rtt_ms / 1000)
        n = max(2 * level, min(sessions, int(expected * 1.5) + 1))
        over_link.append(await bench.measure(f"{rtt_ms:g} ms link", level, rtt_ms / 1000, n))
    return in_process, over_link


@click.command("tsm")
@click.option("--ses", "count", default=2000, show_default=True,
              help="simulated secure elements (sessions cycle over them)")
@click.option("--sessions", default=4000, show_default=True, help="sessions per measurement")
@click.option("--pool", "pool_size", default=32, show_default=True,
              help="size of the pre-generated RSA key pool the SEs draw from")
@click.option("--rtt-ms", default=20.0, show_default=True, help="simulated phone round trip")
@click.option("--concurrency", "levels", default="1,10,50,100,200,500", show_default=True,
              help="concurrency levels over the simulated link")
@click.option("--local-concurrency", default=64, show_default=True,
              help="concurrent sessions in the in-process measurement")
def tsm_bench(
    count: int, sessions: int, pool_size: int, rtt_ms: float, levels: str, local_concurrency: int
) -> None:
    """Personalisation sessions/s (two certificates, one SCP03 script) in one process."""
    _quiet_logging()
    concurrency = [int(level) for level in levels.split(",") if level.strip()]
    in_process, over_link = asyncio.run(
        _run(count, sessions, pool_size, rtt_ms, concurrency, local_concurrency)
    )
    click.echo(
        f"machine: {platform.machine()} {platform.processor() or ''} x{os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )
    click.echo("session = tsm.cmd.store_certificates for two certificates: SCP03 level 33, "
               "one script, 9 APDUs, one round trip")
    click.echo("SE key pairs: PRE-GENERATED KEY POOL (benchmark only)")
    (local,) = in_process
    verdict = "meets" if local.rate >= TARGET_IN_PROCESS else "BELOW"
    click.echo(
        f"in-process SEs, no link, concurrency {local.concurrency}: "
        f"{local.rate:,.0f} sessions/s ({local.sessions} in {local.seconds:.2f} s) — "
        f"{verdict} the {TARGET_IN_PROCESS:,.0f}/s target"
    )
    click.echo(
        f"  CPU per session: TSM {local.tsm_cpu_ms:.3f} ms + simulated SE {local.se_cpu_ms:.3f} ms"
        f"; wall/CPU {local.seconds / local.cpu_seconds:.2f} (above 1: other processes share "
        f"the CPUs)"
    )
    click.echo(
        f"  one dedicated core: {1000 / (local.tsm_cpu_ms + local.se_cpu_ms):,.0f} sessions/s "
        f"with the SEs in-process, {1000 / local.tsm_cpu_ms:,.0f} sessions/s of TSM work alone"
    )
    click.echo(f"simulated phone link, RTT {rtt_ms:g} ms:")
    click.echo(
        f"  {'concurrency':>11}  {'sessions/s':>10}  {'ideal c/RTT':>11}  {'sessions':>8}"
        f"  {'TSM CPU ms':>10}"
    )
    for figure in over_link:
        ideal = figure.concurrency / (rtt_ms / 1000)
        click.echo(
            f"  {figure.concurrency:>11}  {figure.rate:>10,.0f}  {ideal:>11,.0f}  "
            f"{figure.sessions:>8}  {figure.tsm_cpu_ms:>10.3f}"
        )
    best = max(over_link, key=lambda f: f.rate) if over_link else None
    if best is not None:
        verdict = "meets" if best.rate >= TARGET_OVER_LINK else "BELOW"
        click.echo(
            f"best over the link: {best.rate:,.0f} sessions/s at concurrency {best.concurrency} "
            f"— {verdict} the {TARGET_OVER_LINK:,.0f}/s target"
        )
