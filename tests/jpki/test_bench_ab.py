"""``jpki bench ab``: two revisions in worktrees, alternated runs, each importing its own code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jpki.bench import ab
from jpki.bench.ab import AbError, Revision, _check_imports_from, _run_bench, compare

REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_compare_gives_medians_ratio_and_pairs_won() -> None:
    runs = {
        "base": [{"issuances_per_s": 100.0, "process_cpu_ms_per_issuance": 5.0},
                 {"issuances_per_s": 110.0, "process_cpu_ms_per_issuance": 4.8},
                 {"issuances_per_s": 90.0, "process_cpu_ms_per_issuance": 5.2}],
        "change": [{"issuances_per_s": 120.0, "process_cpu_ms_per_issuance": 4.5},
                   {"issuances_per_s": 105.0, "process_cpu_ms_per_issuance": 4.9},
                   {"issuances_per_s": 99.0, "process_cpu_ms_per_issuance": 4.6}],
    }
    compared = compare(runs)
    rate = compared["issuances_per_s"]
    assert rate["base"] == {"median": 100.0, "min": 90.0, "max": 110.0}
    assert rate["change"]["median"] == 105.0
    assert rate["change_over_base"] == 1.05
    assert rate["pairs_change_won"] == "2/3"  # 120 > 100, 105 < 110, 99 > 90
    cpu = compared["process_cpu_ms_per_issuance"]
    assert cpu["change_over_base"] == pytest.approx(4.6 / 5.0, abs=0.001)
    assert cpu["pairs_change_won"] == "2/3"  # lower CPU wins: 4.5 < 5.0, 4.9 > 4.8, 4.6 < 5.2


def test_a_tree_that_does_not_import_its_own_code_is_refused(tmp_path: Path) -> None:
    # an empty directory on PYTHONPATH: jpki comes from the installed project instead
    empty = tmp_path / "tree"
    empty.mkdir()
    revision = Revision("base", "HEAD", "0" * 40, empty)
    with pytest.raises(AbError, match="imports jpki from .* not from its worktree"):
        _check_imports_from(revision, tmp_path)


def test_two_revisions_run_in_their_own_worktrees_and_leave_none_behind() -> None:
    head = _git("rev-parse", "HEAD")
    worktrees_before = _git("worktree", "list")
    done = subprocess.run(
        [sys.executable, "-c", "from jpki.cli import main; main()", "bench", "ab",
         "HEAD", head, "--pairs", "1", "--phones", "3", "--concurrency", "2",
         "--repo", str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert report["base"]["commit"] == report["change"]["commit"] == head
    assert [len(report["runs"]["base"]), len(report["runs"]["change"])] == [1, 1]
    assert all(run["issuances_per_s"] > 0 for runs in report["runs"].values() for run in runs)
    [base], [change] = report["runs"]["base"], report["runs"]["change"]
    rate = report["compared"]["issuances_per_s"]
    assert rate["change_over_base"] == round(change["issuances_per_s"]
                                             / base["issuances_per_s"], 3)
    assert rate["pairs_change_won"] == (
        "1/1" if change["issuances_per_s"] > base["issuances_per_s"] else "0/1")
    assert "pair 1/1 base" in done.stderr and "pair 1/1 change" in done.stderr
    assert _git("worktree", "list") == worktrees_before


def test_an_unknown_revision_is_a_clear_error() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from jpki.cli import main; main()", "bench", "ab",
         "HEAD", "no-such-revision-here", "--repo", str(REPO)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert "no-such-revision-here" in done.stderr


@pytest.mark.parametrize("output, missing", [
    ("not json", "JSONDecodeError"),
    ('{"issuances_per_s": 1.0, "audit_findings": 0}', "process_cpu_ms_per_issuance"),
])
def test_a_bench_without_the_figures_is_a_clear_error(monkeypatch, tmp_path, output,
                                                      missing) -> None:
    monkeypatch.setattr(ab.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout=output, stderr=""))
    revision = Revision("base", "old", "0" * 40, tmp_path)
    with pytest.raises(AbError, match=f"base \\(old\\): its bench's output .*{missing}"):
        _run_bench(revision, tmp_path, [])
