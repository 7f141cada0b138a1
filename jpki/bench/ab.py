"""``jpki bench ab``: two revisions of the code, the embedded issuance bench, alternated runs.

On a shared VM one run's rate moves by 5–8 % with the machine's state, more than most
single changes gain. A change is judged by pairs: each revision checked out in a worktree
of its own, the bench run for one and then the other, the order swapped every pair so that
a drift favours neither, and the medians and the pairs won compared.

Each run is a fresh interpreter started outside the repository with ``python -P`` and the
worktree alone on ``PYTHONPATH``: ``python -c`` otherwise puts the working directory first
on ``sys.path``, and a run started in the repository's root would import the root's code
whatever the worktree (an earlier round compared the same code twice that way). Before the
runs, each worktree is asked where it imports ``jpki`` from, and the comparison stops if
that is not the worktree.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click

from jpki.bench.machine import calibration, machine

FIGURES = ("issuances_per_s", "process_cpu_ms_per_issuance")


class AbError(click.ClickException):
    """A revision that cannot be checked out, run, or measured."""


@dataclass(frozen=True)
class Revision:
    label: str  # "base" or "change"
    rev: str
    commit: str
    tree: Path


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise AbError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def _remove_worktree(repo: Path, tree: Path) -> None:
    """Warns rather than raises: an error here must not hide the one that ended the runs."""
    done = subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        click.echo(f"warning: worktree {tree} not removed ({done.stderr.strip()}); "
                   f"`git worktree prune` clears it once the directory is gone", err=True)


def _interpreter_env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


def _check_imports_from(revision: Revision, scratch: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-P", "-c", "import jpki; print(jpki.__file__)"],
        capture_output=True, text=True, cwd=scratch, env=_interpreter_env(revision.tree),
    )
    imported = Path(done.stdout.strip()).resolve()
    if done.returncode != 0 or not imported.is_relative_to(revision.tree.resolve()):
        raise AbError(f"{revision.label} ({revision.rev}) imports jpki from {imported}, not "
                      f"from its worktree {revision.tree}: {done.stderr.strip()[-500:]}")


def _run_bench(revision: Revision, scratch: Path, bench_args: list[str]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-P", "-c", "from jpki.cli import main; main()", "bench", "issuance",
         *bench_args],
        capture_output=True, text=True, cwd=scratch, env=_interpreter_env(revision.tree),
    )
    if done.returncode != 0:
        raise AbError(f"{revision.label} ({revision.rev}) bench failed: "
                      f"{done.stderr.strip()[-2000:]}")
    try:
        figures = json.loads(done.stdout)
        findings = figures["audit_findings"]
        measured = {figure: float(figures[figure]) for figure in FIGURES}
    except (ValueError, KeyError, TypeError) as exc:  # an older bench, other figures
        raise AbError(f"{revision.label} ({revision.rev}): its bench's output is not the "
                      f"figures this comparison reads ({type(exc).__name__}: {exc})") from exc
    if findings != 0:
        raise AbError(f"{revision.label} ({revision.rev}): the audit found "
                      f"{findings} broken invariants")
    return measured


def compare(runs: dict[str, list[dict[str, float]]]) -> dict[str, object]:
    """Medians, ranges and pairs won for each figure (higher rate, lower CPU wins)."""
    summary: dict[str, object] = {}
    for figure in FIGURES:
        base = [r[figure] for r in runs["base"]]
        change = [r[figure] for r in runs["change"]]
        higher_is_better = figure == "issuances_per_s"
        won = sum((c > b) if higher_is_better else (c < b)
                  for b, c in zip(base, change, strict=True))
        summary[figure] = {
            "base": _spread(base),
            "change": _spread(change),
            "change_over_base": round(statistics.median(change) / statistics.median(base), 3),
            "pairs_change_won": f"{won}/{len(base)}",
        }
    return summary


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": min(values),
            "max": max(values)}


@click.command("ab")
@click.argument("base_rev")
@click.argument("change_rev")
@click.option("--pairs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--phones", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="the git repository holding both revisions")
def ab_bench(base_rev: str, change_rev: str, pairs: int, phones: int, concurrency: int,
             repo: Path) -> None:
    """Embedded issuance bench, BASE_REV against CHANGE_REV, in alternated pairs."""
    repo = Path(_git(repo, "rev-parse", "--show-toplevel"))
    bench_args = ["--phones", str(phones), "--concurrency", str(concurrency)]
    with tempfile.TemporaryDirectory(prefix="jpki-bench-ab-") as scratch_dir:
        scratch = Path(scratch_dir)
        revisions = [
            Revision(label, rev, _git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}"),
                     scratch / label)
            for label, rev in (("base", base_rev), ("change", change_rev))
        ]
        try:
            for revision in revisions:
                _git(repo, "worktree", "add", "--detach", str(revision.tree), revision.commit)
                _check_imports_from(revision, scratch)
            click.echo(f"machine: {machine()}; calibration {calibration()}", err=True)
            runs: dict[str, list[dict[str, float]]] = {"base": [], "change": []}
            for pair in range(pairs):
                order = revisions if pair % 2 == 0 else revisions[::-1]
                for revision in order:
                    figures = _run_bench(revision, scratch, bench_args)
                    runs[revision.label].append(figures)
                    click.echo(f"pair {pair + 1}/{pairs} {revision.label:6} "
                               f"{figures['issuances_per_s']:8.2f}/s "
                               f"{figures['process_cpu_ms_per_issuance']:5.1f} ms",
                               err=True)
        finally:
            for revision in revisions:
                if revision.tree.exists():
                    _remove_worktree(repo, revision.tree)
    click.echo(json.dumps({
        "base": {"rev": revisions[0].rev, "commit": revisions[0].commit},
        "change": {"rev": revisions[1].rev, "commit": revisions[1].commit},
        "pairs": pairs, "phones": phones, "concurrency": concurrency,
        "machine": machine(),
        "runs": runs,
        "compared": compare(runs),
    }, indent=2))
