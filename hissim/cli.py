"""``gatewayd his-sim --config PATH [--log PATH]`` (also ``python -m hissim``): run the simulated HIS.

``--log`` overrides the received-messages journal path. SIGUSR1 makes the counter book one random
free slot at once (journalled and pushed like any counter booking); SIGUSR2 makes the pharmacy (config
``pharmacy:``) release a random prescription to outside pharmacies; SIGHUP opens the slots of the doctors
marked ``held`` at once (one SIU^S24 each: a slot-release rush), then suspends the clinics (停诊) the
``--suspend-file`` names, if given: each line ``SCHEDULE YYYY-MM-DD`` cancels that doctor's bookings of that day
(SIU^S15) and blocks the day's slots (SIU^S23); a clinic suspended already is left as it is. SIGINT / SIGTERM
stop it.
Exit status: 0 after a clean stop, 1 if it could not listen or open its store, 2 for a bad configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from datetime import date
from pathlib import Path

import structlog

from gateway.config.errors import ConfigError
from hissim.config import load_config

log = structlog.get_logger("hissim.cli")


def _configure_logging() -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(ensure_ascii=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gatewayd his-sim", description="Run the bundled HIS simulator.")
    parser.add_argument("--config", required=True, type=Path, help="the simulator's YAML config")
    parser.add_argument("--log", type=Path, default=None,
                        help="path of the received-messages journal (overrides received_log)")
    parser.add_argument("--suspend-file", type=Path, default=None,
                        help="on SIGHUP, suspend the clinics its lines name: SCHEDULE YYYY-MM-DD")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"his-sim: the configuration is not valid:\n{exc}", file=sys.stderr)
        return 2
    if args.log is not None:
        config = dataclasses.replace(config, received_log=args.log.absolute())

    _configure_logging()
    from twisted.internet import reactor

    from hissim.service import make_service
    from hissim.store import StoreError

    try:
        sim = make_service(config, reactor)
    except StoreError as exc:
        log.error("his-sim.cannot-open-store", path=config.store, error=str(exc))
        return 1
    status = {"code": 0}

    def cannot_listen(failure):
        log.error("his-sim.cannot-listen", endpoint=getattr(failure.value, "endpoint", config.listen),
                  error=getattr(failure.value, "reason", failure.getErrorMessage()))
        status["code"] = 1
        reactor.stop()

    def start() -> None:
        sim.startService()
        sim.listening.addErrback(cannot_listen)

    def on_usr1(signum, frame) -> None:
        reactor.callFromThread(sim.counter_booking_now)

    def on_usr2(signum, frame) -> None:
        reactor.callFromThread(sim.release_now)

    def suspend() -> None:
        if args.suspend_file is None:
            return
        try:
            lines = args.suspend_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            log.error("his-sim.cannot-read-suspend-file", path=str(args.suspend_file), error=str(exc))
            return
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                schedule_id, day = line.split()
                sim.suspend_clinic(schedule_id, date.fromisoformat(day))
            except ValueError:
                log.error("his-sim.bad-suspend-line", path=str(args.suspend_file), line=number,
                          expected="SCHEDULE YYYY-MM-DD")

    def on_hup(signum, frame) -> None:
        reactor.callFromThread(sim.release_held_slots)
        reactor.callFromThread(suspend)

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGUSR2, on_usr2)
    signal.signal(signal.SIGHUP, on_hup)
    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", sim.stopService)
    reactor.run()
    return status["code"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
