#!/usr/bin/env python3
"""Run ``gatewayd <command>`` for a benchmark, optionally with the hl7apy builders the hot path replaced.

    python bench/launch.py [--reference-builders] -- run --config gateway.yaml
    python bench/launch.py [--reference-builders] -- his-sim --config his-sim.yaml

``--reference-builders`` makes the gateway build SRM^S01/S04 with ``build_srm_hl7apy`` and the simulator
build its SIU with ``build_siu_hl7apy`` (~10 ms each): the "before" of the before/after figures in
docs/benchmarks.md. ``--commit-inline`` makes the chamber run COMMIT on the reactor thread, as before the
writer thread (to measure what the thread buys). These switches exist only here, in bench code; gatewayd
itself has no such options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-builders", action="store_true",
                    help="build SRM (gateway) and SIU (simulator) with hl7apy, as before the light writers")
    ap.add_argument("--commit-inline", action="store_true",
                    help="COMMIT on the reactor thread (no writer thread), as before pipelined group commit")
    ap.add_argument("--pipeline-always", action="store_true",
                    help="COMMIT in the writer thread every time (not only when the reactor has work waiting)")
    ap.add_argument("--no-writer-thread", action="store_true",
                    help="no chamber writer thread at all: COMMIT and lock waits on the reactor thread (before)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the gatewayd command line")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.reference_builders:
        import gateway.service
        import hissim.service
        from adapters.maps.srm_booking import build_srm_hl7apy
        from hissim.messages import build_siu_hl7apy

        def reference_srm(trigger, *, receiving_facility=None, z_segments=(), **fields):
            # (the hl7apy reference knows neither facility routes nor Z-segments; the benchmarks use neither)
            if receiving_facility is not None or z_segments:
                raise ValueError("the hl7apy reference builder takes no receiving facility or Z-segments")
            return build_srm_hl7apy(trigger, **fields)

        gateway.service.build_srm = reference_srm
        hissim.service.build_siu = build_siu_hl7apy
    if args.commit_inline:
        import gateway.chamber.engine

        gateway.chamber.engine.PIPELINE_COMMITS = False  # (the writer thread still waits for the other gate's lock)
    if args.pipeline_always:
        import gateway.chamber.engine

        gateway.chamber.engine.PIPELINE_COMMITS = True
    if args.no_writer_thread:
        import gateway.chamber.engine

        gateway.chamber.engine.Chamber._threaded = lambda self, journal_mode: False
    from gateway.cli import main as gatewayd

    return gatewayd(command)


if __name__ == "__main__":
    sys.exit(main())
