#!/usr/bin/env python3
"""The standing fuzzing campaign: every harness of tests/fuzz (or those named), coverage-guided (atheris).

    python bench/fuzz.py --minutes N [--target NAME ...] [--slice MINUTES] [--workdir DIR]

Runs the harnesses one at a time, each in its own process, round robin in slices of ``--slice`` minutes
(default 5, shorter when the time does not allow one slice per target) until ``--minutes`` minutes have
passed in all: ``--minutes 60`` with six targets gives each about 10 minutes. Each target keeps what it
learned in ``<workdir>/<target>/corpus`` (default workdir ``bench/results/fuzz``, outside git): the next slice,
and the next campaign, start from there and from the seeds in tests/fuzz/corpus/<target>. A crash, hang
(10 s on one input) or runaway memory (1 GiB) is written to ``<workdir>/<target>/crashes/`` and printed
with the harness's traceback; that target then leaves the rotation (libFuzzer stops at a target's first
crash, and would find the same one again: fix it first) and the others share its time. Each slice's output
is in ``<workdir>/<target>/last.log``. Exit status 1 if anything was found.

To turn a finding into a regression test: read the harness's invariant (its docstring), reproduce the input
in a unit test next to the module's other tests, fix the module, and copy the input into
tests/fuzz/corpus/<target>/ so that the short run in the test suite replays it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz import campaign  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True, help="time for the whole campaign")
    parser.add_argument("--target", action="append", choices=sorted(campaign.TARGETS),
                        help="fuzz only this target (repeatable); default: all")
    parser.add_argument("--slice", type=float, default=5.0, help="minutes a target runs before the next one")
    parser.add_argument("--workdir", type=Path, default=campaign.REPO / "bench" / "results" / "fuzz")
    args = parser.parse_args(argv)
    targets = args.target or sorted(campaign.TARGETS)
    slice_s = max(10, int(min(args.slice, args.minutes / len(targets)) * 60))
    end = time.monotonic() + args.minutes * 60
    executions = dict.fromkeys(targets, 0)
    findings: dict[str, list[Path]] = {t: [] for t in targets}
    print(f"fuzzing {', '.join(targets)} for {args.minutes:g} min in slices of {slice_s} s; work dir {args.workdir}")
    rotation = list(targets)
    while rotation and time.monotonic() < end - 5:
        for target in list(rotation):
            left = int(end - time.monotonic())
            if left < 5:
                break
            work = args.workdir / target
            result = campaign.run(target, corpus=work / "corpus", artifacts=work / "crashes",
                                  seconds=min(slice_s, left))
            (work / "last.log").write_text(result.output, encoding="utf-8")
            executions[target] += result.executions
            corpus_size = sum(1 for _ in (work / "corpus").iterdir())
            print(f"{target}: {result.executions} inputs in this slice, corpus {corpus_size}"
                  + (f", FOUND {len(result.artifacts)}" if result.failed else ""), flush=True)
            if result.failed:
                findings[target] += result.artifacts
                rotation.remove(target)
                print(campaign.report(result), flush=True)
    print("\nsummary")
    for target in targets:
        found = findings[target]
        print(f"  {target}: {executions[target]} inputs, "
              + (f"{len(found)} finding(s): {', '.join(str(p) for p in found)}" if found else "nothing found"))
    return 1 if any(findings.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
