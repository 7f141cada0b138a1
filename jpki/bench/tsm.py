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

With ``--se-processes N`` both parts run once more with the simulated phones in N worker
processes, so that the TSM's process runs only the TSM (as in a deployment, where the SEs
are in the phones). Those figures are printed apart and labelled; the in-process figures
(TSM and SEs sharing one process) are always measured and printed first.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import multiprocessing
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import click
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from device_sim.se.element import ScriptCommand, SecureElement
from device_sim.se.jpki_applet import JpkiAppletFactory, PooledKeys
from jpki.bench.machine import machine
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
        link = self.engine.link
        assert isinstance(link, InProcessPhoneLink | _PhoneFarm)
        link.latency = latency
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
        se_cpu = self.link.se_cpu_seconds - se_before if link is self.link else 0.0
        return Figure(label, concurrency, sessions, seconds, cpu, se_cpu)


class _Shard:
    def __init__(self, connection: Connection, process: BaseProcess) -> None:
        self.connection = connection
        self.process = process
        self.sender = ThreadPoolExecutor(max_workers=1)  # keeps one shard's batches in order
        self.outbox: list[tuple[str, str, list[tuple[bytes, tuple[int, ...]]]]] = []
        self.waiting: dict[str, asyncio.Future[tuple[list[bytes], bool]]] = {}
        self.flush_scheduled = False


def _farm_worker(connection: Connection, elements: dict[str, SecureElement]) -> None:
    """A worker process of the phone farm: runs the scripts of its phones, batch by batch."""
    while True:
        batch = connection.recv()
        if batch is None:
            return
        answers = []
        for script_id, device_id, steps in batch:
            outcome = elements[device_id].run_script(
                ScriptCommand(apdu, expect) for apdu, expect in steps
            )
            answers.append((script_id, list(outcome.responses), outcome.completed))
        connection.send(answers)


class _PhoneFarm:
    """The simulated phones in worker processes: the TSM's process then runs only the TSM.

    A phone link like ``InProcessPhoneLink`` (same latency model); scripts to one worker
    are batched per event-loop turn and sent from a thread, answers read by the loop.
    """

    def __init__(self, elements: dict[str, SecureElement], processes: int, latency: float) -> None:
        context = multiprocessing.get_context("fork")
        devices = sorted(elements)
        self._shard_of = {device: n % processes for n, device in enumerate(devices)}
        self.latency = latency
        self.round_trips = 0
        self.shards: list[_Shard] = []
        for n in range(processes):
            mine = {d: elements[d] for d in devices if self._shard_of[d] == n}
            parent, child = context.Pipe()
            process = context.Process(target=_farm_worker, args=(child, mine), daemon=True)
            process.start()
            child.close()
            self.shards.append(_Shard(parent, process))
        loop = asyncio.get_running_loop()
        for shard in self.shards:
            loop.add_reader(shard.connection.fileno(), self._answers, shard)

    def _answers(self, shard: _Shard) -> None:
        for script_id, responses, completed in shard.connection.recv():
            future = shard.waiting.pop(script_id)
            if not future.done():
                future.set_result((responses, completed))

    def _flush(self, shard: _Shard) -> None:
        batch, shard.outbox, shard.flush_scheduled = shard.outbox, [], False
        shard.sender.submit(shard.connection.send, batch)

    async def exchange(self, device_id: str, script: m.SeScript) -> m.SeScriptResult:
        if self.latency:
            await asyncio.sleep(self.latency / 2)
        shard = self.shards[self._shard_of[device_id]]
        future: asyncio.Future[tuple[list[bytes], bool]] = (
            asyncio.get_running_loop().create_future()
        )
        shard.waiting[script.script_id] = future
        steps = [(step.apdu, tuple(step.expect)) for step in script.steps]
        shard.outbox.append((script.script_id, device_id, steps))
        if not shard.flush_scheduled:
            shard.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, shard)
        responses, completed = await future
        self.round_trips += 1
        if self.latency:
            await asyncio.sleep(self.latency / 2)
        return m.SeScriptResult(script_id=script.script_id, responses=responses,
                                completed=completed)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for shard in self.shards:
            loop.remove_reader(shard.connection.fileno())
            shard.connection.send(None)
            shard.process.join(timeout=5)
            shard.sender.shutdown()


def _cycle(items: list, count: int):  # noqa: ANN202 - a plain generator
    for i in range(count):
        yield items[i % len(items)]


async def _run(
    count: int,
    sessions: int,
    pool_size: int,
    rtt_ms: float,
    levels: list[int],
    local: int,
    se_processes: int,
    rounds: int,
) -> tuple[list[Figure], list[Figure], Figure | None, list[Figure]]:
    bench = _Bench(count, pool_size)
    click.echo(
        f"preparing {count} simulated SEs (install + two key pairs each; RSA keys from the "
        f"PRE-GENERATED KEY POOL of {pool_size} keys) ..."
    )
    await bench.prepare()
    await bench.measure("warm-up", local, 0.0, min(sessions, 200))
    # Identical rounds on a shared VM differ by up to a quarter: the median round is the figure
    in_process = [await bench.measure("in-process", local, 0.0, sessions) for _ in range(rounds)]
    over_link = await _link_levels(bench, sessions, rtt_ms, levels)
    farmed_local: Figure | None = None
    farmed: list[Figure] = []
    if se_processes:
        farm = _PhoneFarm(bench.link.elements, se_processes, 0.0)
        bench.engine.link = farm
        try:
            await bench.measure("warm-up, SEs in worker processes", local, 0.0,
                                min(sessions, 200))
            farmed_local = await bench.measure("SEs in worker processes", local, 0.0, sessions)
            farmed = await _link_levels(bench, sessions, rtt_ms, levels)
        finally:
            farm.close()
            bench.engine.link = bench.link
    return in_process, over_link, farmed_local, farmed


async def _link_levels(
    bench: _Bench, sessions: int, rtt_ms: float, levels: list[int]
) -> list[Figure]:
    figures = []
    for level in levels:
        # Enough sessions for about a second of steady state, never fewer than 2 x level.
        expected = level / (rtt_ms / 1000)
        n = max(2 * level, min(sessions, int(expected * 1.5) + 1))
        figures.append(await bench.measure(f"{rtt_ms:g} ms link", level, rtt_ms / 1000, n))
    return figures


def _link_table(figures: list[Figure], rtt_ms: float, *, se_split: bool) -> None:
    click.echo(
        f"  {'concurrency':>11}  {'sessions/s':>10}  {'ideal c/RTT':>11}  {'sessions':>8}"
        f"  {'TSM CPU ms':>10}"
    )
    for figure in figures:
        ideal = figure.concurrency / (rtt_ms / 1000)
        tsm_cpu = figure.tsm_cpu_ms if se_split else 1000 * figure.cpu_seconds / figure.sessions
        click.echo(
            f"  {figure.concurrency:>11}  {figure.rate:>10,.0f}  {ideal:>11,.0f}  "
            f"{figure.sessions:>8}  {tsm_cpu:>10.3f}"
        )


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
@click.option("--rounds", default=5, show_default=True,
              help="in-process measurement rounds; the median round is reported")
@click.option("--se-processes", default=0, show_default=True,
              help="also run the link levels with the simulated phones in this many worker "
                   "processes (the TSM process then runs only the TSM)")
def tsm_bench(
    count: int,
    sessions: int,
    pool_size: int,
    rtt_ms: float,
    levels: str,
    local_concurrency: int,
    se_processes: int,
    rounds: int,
) -> None:
    """Personalisation sessions/s (two certificates, one SCP03 script) in one process."""
    _quiet_logging()
    concurrency = [int(level) for level in levels.split(",") if level.strip()]
    rounds_run, over_link, farmed_local, farmed = asyncio.run(
        _run(count, sessions, pool_size, rtt_ms, concurrency, local_concurrency, se_processes,
             max(1, rounds))
    )
    by_rate = sorted(rounds_run, key=lambda f: f.rate)
    local = by_rate[len(by_rate) // 2]
    click.echo(
        f"machine: {machine()}, {platform.system()} {platform.release()}"
    )
    click.echo("session = tsm.cmd.store_certificates for two certificates: SCP03 level 33, "
               "one script, 9 APDUs, one round trip")
    click.echo("SE key pairs: PRE-GENERATED KEY POOL (benchmark only)")
    verdict = "meets" if local.rate >= TARGET_IN_PROCESS else "BELOW"
    click.echo(
        f"in-process SEs, no link, concurrency {local.concurrency}: "
        f"{local.rate:,.0f} sessions/s, the median of {len(by_rate)} rounds of "
        f"{local.sessions} (range {by_rate[0].rate:,.0f}–{by_rate[-1].rate:,.0f}) — "
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
    click.echo(f"simulated phone link, RTT {rtt_ms:g} ms, SEs in this process:")
    _link_table(over_link, rtt_ms, se_split=True)
    _best_over_link(over_link, "SEs in this process")
    if farmed_local is not None:
        farm = f"SEs in {se_processes} worker process(es)"
        click.echo(
            f"{farm} (not the in-process figure above), no link, concurrency "
            f"{farmed_local.concurrency}: {farmed_local.rate:,.0f} sessions/s "
            f"({farmed_local.sessions} in {farmed_local.seconds:.2f} s)"
        )
        click.echo(
            f"  CPU per session in the TSM's process (everything but the SEs): "
            f"{1000 * farmed_local.cpu_seconds / farmed_local.sessions:.3f} ms"
        )
        click.echo(f"simulated phone link, RTT {rtt_ms:g} ms, {farm}; "
                   f"TSM CPU = the TSM's whole process:")
        _link_table(farmed, rtt_ms, se_split=False)
        _best_over_link(farmed, farm)


def _best_over_link(figures: list[Figure], where: str) -> None:
    if not figures:
        return
    best = max(figures, key=lambda f: f.rate)
    verdict = "meets" if best.rate >= TARGET_OVER_LINK else "BELOW"
    click.echo(
        f"  best over the link, {where}: {best.rate:,.0f} sessions/s at concurrency "
        f"{best.concurrency} — {verdict} the {TARGET_OVER_LINK:,.0f}/s target"
    )
