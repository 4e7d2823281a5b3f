"""One report for the groups of a test run (scripts/test.sh): how many tests passed, failed, errored and were
skipped in all, and the slowest tests (setup + call + teardown), from the groups' JUnit XML files.

Exits non-zero when a group failed, or when no test ran at all."""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET  # noqa: S405 (our own pytest's output)
from pathlib import Path

NO_TESTS_COLLECTED = 5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="*", type=Path, help="JUnit XML files, one per group")
    parser.add_argument("--slowest", type=int, default=20, help="how many of the slowest tests to list")
    parser.add_argument("--seconds", type=int, default=None, help="the run's wall-clock time, to print")
    parser.add_argument(
        "--exit-code", type=int, action="append", default=[], help="a group's pytest exit code (once per group)"
    )
    args = parser.parse_args(argv)

    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    cases: list[tuple[float, str]] = []
    for report in args.reports:
        if not report.exists() or report.stat().st_size == 0:
            continue
        root = ET.parse(report).getroot()  # noqa: S314
        for suite in root.iter("testsuite"):
            for key in totals:
                totals[key] += int(suite.get(key, 0))
        for case in root.iter("testcase"):
            name = f"{case.get('file') or case.get('classname', '')}::{case.get('name')}"
            cases.append((float(case.get("time", 0)), name))

    cases.sort(reverse=True)
    print(f"\n=== the {min(args.slowest, len(cases))} slowest tests (setup + call + teardown) ===")
    for seconds, name in cases[: args.slowest]:
        print(f"{seconds:8.2f} s  {name}")
    passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    took = f" in {args.seconds} s" if args.seconds is not None else ""
    print(
        f"\n=== {totals['tests']} tests{took}: {passed} passed, {totals['failures']} failed, "
        f"{totals['errors']} errors, {totals['skipped']} skipped ==="
    )
    failed_groups = [code for code in args.exit_code if code not in (0, NO_TESTS_COLLECTED)]
    if failed_groups:
        print(f"FAILED: a group's pytest exited with {failed_groups}", file=sys.stderr)
        return 1
    if totals["tests"] == 0:
        print("FAILED: no test ran", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
