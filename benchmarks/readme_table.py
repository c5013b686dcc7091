"""Copy the summary of the latest benchmark results into the README, between its markers.

Usage (from the repository root)::

    python -m benchmarks.readme_table            # rewrite README.md in place
    python -m benchmarks.readme_table --check    # exit 1 if README.md is not up to date
    python -m benchmarks.readme_table --results benchmarks/results/2026-11-28-vm.md --readme README.md

The latest results file is the ``benchmarks/results/<YYYY-MM-DD>-<host>.md`` with the latest
date (then the latest modification time). Its summary section (between
``<!-- summary:start -->`` and ``<!-- summary:end -->``, written by ``python -m benchmarks``)
replaces what is between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` in the README,
markers kept. Missing or unordered markers, in either file, are an error (exit status 2)
that names the file and the marker; nothing is written then.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from benchmarks.report import REPO_ROOT, RESULTS_DIR
from benchmarks.summary import SUMMARY_END, SUMMARY_START

__all__ = ["BENCH_END", "BENCH_START", "MarkerError", "latest_results", "render_block", "update_readme"]

BENCH_START = "<!-- bench:start -->"
BENCH_END = "<!-- bench:end -->"

_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2})-.+\.md$")


class MarkerError(ValueError):
    """A marker is missing, repeated or out of order."""


def latest_results(results_dir: Path = RESULTS_DIR) -> Path:
    """The results file with the latest date in its name (ties: the latest modified)."""
    candidates = [p for p in results_dir.glob("*.md") if _NAME.match(p.name)]
    if not candidates:
        raise FileNotFoundError(
            f"no results file (<YYYY-MM-DD>-<host>.md) in {results_dir}; run `python -m benchmarks`"
        )
    return max(candidates, key=lambda p: (_NAME.match(p.name).group(1), p.stat().st_mtime))  # type: ignore[union-attr]


def _between(text: str, start: str, end: str, where: str) -> tuple[int, int]:
    """(index just after ``start``, index of ``end``); MarkerError unless each appears exactly once, in order."""
    for marker in (start, end):
        count = text.count(marker)
        if count != 1:
            what = "is missing" if count == 0 else f"appears {count} times"
            raise MarkerError(f"{where}: the marker {marker} {what} (expected exactly one {start} and one {end})")
    i, j = text.index(start) + len(start), text.index(end)
    if j < i:
        raise MarkerError(f"{where}: {end} comes before {start}")
    return i, j


def render_block(results_path: Path) -> str:
    """The text to put between the README's markers: the results file's summary, with its source named."""
    text = results_path.read_text(encoding="utf-8")
    i, j = _between(text, SUMMARY_START, SUMMARY_END, str(results_path))
    body = text[i:j].strip("\n")
    try:
        rel = results_path.resolve().relative_to(REPO_ROOT)
    except ValueError:
        rel = results_path
    header = f"<!-- generated from {rel} by `python -m benchmarks.readme_table`; do not edit by hand -->"
    return f"\n{header}\n\n{body}\n\n"


def update_readme(readme: Path, results_path: Path) -> tuple[str, bool]:
    """(the new README text, whether it differs from the current one); raises MarkerError."""
    text = readme.read_text(encoding="utf-8")
    i, j = _between(text, BENCH_START, BENCH_END, str(readme))
    block = render_block(results_path)
    new = text[:i] + block + text[j:]
    return new, new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readme_table", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, help="the results file (default: the latest in benchmarks/results)")
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md", help="the README (default: README.md)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if the README is out of date")
    args = parser.parse_args(argv)
    try:
        results = args.results or latest_results()
        new, changed = update_readme(args.readme, results)
    except (MarkerError, FileNotFoundError) as exc:
        print(f"readme_table: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if changed:
            print(f"readme_table: {args.readme} is out of date with {results}; run python -m benchmarks.readme_table",
                  file=sys.stderr)
            return 1
        print(f"readme_table: {args.readme} is up to date with {results}")
        return 0
    if changed:
        args.readme.write_text(new, encoding="utf-8")
        print(f"readme_table: {args.readme} updated from {results}")
    else:
        print(f"readme_table: {args.readme} already up to date with {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
