"""``jpki up``'s account of the shared services' CPU, read from a /proc of our making."""

from __future__ import annotations

import os
from pathlib import Path

from jpki.service_cpu import local_service_cpu_seconds

TICK = os.sysconf("SC_CLK_TCK")


def _process(proc: Path, pid: int, command: str, utime: int, stime: int, cutime: int = 0,
             cstime: int = 0) -> None:
    (proc / str(pid)).mkdir()
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime stime cutime cstime ...
    (proc / str(pid) / "stat").write_text(
        f"{pid} ({command}) S 1 1 1 0 -1 4194560 10 0 0 0 {utime} {stime} {cutime} {cstime}"
        " 20 0 1 0 100 0 0\n"
    )


def test_each_service_counts_its_processes_and_the_children_they_reaped(tmp_path: Path) -> None:
    _process(tmp_path, 10, "postgres", utime=100, stime=20, cutime=300, cstime=80)  # postmaster
    _process(tmp_path, 11, "postgres", utime=7, stime=3)  # a live backend
    _process(tmp_path, 20, "beam.smp", utime=900, stime=100)
    _process(tmp_path, 30, "python3", utime=5000, stime=5000)  # not a shared service
    _process(tmp_path, 40, "weird) (postgres", utime=1, stime=1)  # a name with brackets
    (tmp_path / "self").mkdir()  # not a process directory

    assert local_service_cpu_seconds(tmp_path) == {
        "postgresql": (100 + 20 + 300 + 80 + 7 + 3) / TICK,
        "rabbitmq": 1000 / TICK,
    }


def test_a_process_gone_while_reading_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "12").mkdir()  # its stat vanished
    _process(tmp_path, 13, "mosquitto", utime=4, stime=6)
    assert local_service_cpu_seconds(tmp_path) == {"mosquitto": 10 / TICK}
