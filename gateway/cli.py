"""The ``gatewayd`` command.

    gatewayd run --config PATH            run the gateway (both gates, one process)
    gatewayd check-config PATH [--probe]  print "ok" or every problem (file:line:column: key: message); with
                                          --probe, also ask each HIS database (kind: database) for its tables,
                                          columns and codes
    gatewayd his-sim --config PATH        run the bundled HIS simulator (a real MLLP peer)
    gatewayd demo [--workdir DIR]         certificates, configs, HIS simulator and gateway, all on loopback
    gatewayd certs init DIR               a development CA, server and platform certificates
    gatewayd queue list|show|retry|purge  the chamber's messages (and with --notifications, the notifications
                                          owed to subscriptions): list, one's story, resubmit, delete dead ones
    gatewayd audit verify|export|prune|find   the audit trail: check its hash chain, export AuditEvents,
                                          retention, was this id asked for
    gatewayd backup DEST --config PATH    a consistent, checked copy of the chamber (while gatewayd runs)
    gatewayd restore FILE --config PATH   put a backup back as the chamber: checked first (integrity, schema
                                          version, audit chain), refused while a gate runs on the chamber, the
                                          replaced chamber kept aside
    gatewayd reload --config PATH         SIGHUP to the gateway running that config, and what it applied or
                                          why it refused (exit 1)
    gatewayd completion bash              the bash completion script (generated from this parser)
    gatewayd man                          the man page gatewayd(8) (roff, generated from this parser's help)
    gatewayd status --config PATH [--json]   the lock at a glance: who runs each gate, HIS endpoints, queues,
                                          certificates (opens the chamber read-only, claims nothing)
    gatewayd console-password             a password's hash for admin.operators (read from the terminal or stdin)
    gatewayd config-reference [--update README.md]   every config key, its type, default and meaning
    gatewayd --version                    the version and the git commit it was built from
"""

from __future__ import annotations

import argparse
import gc
import os
import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gatewayd", description="The hospital front-end gateway: the lock "
                                "between the HIS (HL7 v2/MLLP) and internet platforms (FHIR R4/HTTPS).")
    p.add_argument("--version", action="version", version=version_line())
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("--config", required=True, type=Path)
    run.add_argument("--gate", choices=("both", "inner", "outer"), default="both",
                     help="both gates in this process (default), or one gate of the split lock: 'inner' (HIS "
                          "side: MLLP) or 'outer' (internet side: FHIR); the two share only the chamber")

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("path", type=Path)
    check.add_argument("--probe", action="store_true",
                       help="also check each HIS endpoint of kind database against its live database: the view "
                            "and table with the configured columns, and the codes the view holds")

    sim = sub.add_parser("his-sim", help="run the bundled HIS simulator")
    sim.add_argument("--config", required=True, type=Path)
    sim.add_argument("--log", type=Path, default=None, help="override the received-messages log path")
    sim.add_argument("--suspend-file", type=Path, default=None,
                     help="on SIGHUP, suspend the clinics its lines name: SCHEDULE YYYY-MM-DD")

    demo = sub.add_parser("demo", help="run the whole lock on loopback with a simulated HIS")
    demo.add_argument("--workdir", type=Path, default=Path("demo-run"))

    certs = sub.add_parser("certs", help="development certificates")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    init = certs_sub.add_parser("init", help="create a dev CA, a server and platform client certificates")
    init.add_argument("directory", type=Path)
    init.add_argument("--platform", action="append", default=None,
                      help="platform name (repeatable; default: demo)")
    init.add_argument("--server-name", action="append", default=None,
                      help="DNS name or IP of the gateway (repeatable; default: localhost, 127.0.0.1)")

    queue = sub.add_parser("queue", help="look at and act on the chamber's messages (works while gatewayd runs)")
    queue_sub = queue.add_subparsers(dest="queue_command", required=True)
    listing = queue_sub.add_parser("list", help="messages, newest first")
    listing.add_argument("--state", choices=("committed", "sending", "retrying", "delivered", "refused", "dead",
                                             "withdrawn", "pending"))
    listing.add_argument("--notifications", action="store_true",
                         help="the notifications owed to platforms' subscriptions instead (states pending, "
                              "delivered, dead)")
    listing.add_argument("--dest", metavar="PEER", help="only messages to/from this HIS (inner.his.name)")
    listing.add_argument("--direction", choices=("inbound", "outbound"))
    listing.add_argument("--limit", type=int, default=50)
    show = queue_sub.add_parser("show", help="one message's whole story (without ID: like list)")
    show.add_argument("id", nargs="?", type=int)
    show.add_argument("--limit", type=int, default=50)
    retry = queue_sub.add_parser("retry", help="resubmit a dead-lettered or refused message")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", type=int)
    which.add_argument("--all-dead", action="store_true", help="every dead-lettered message, oldest first")
    which.add_argument("--notification", metavar="SUBSCRIPTION/EVENT",
                       help="a dead notification, e.g. s-1a2b/7 (sent once more at once)")
    retry.add_argument("--notifications", action="store_true",
                       help="with --all-dead: every dead notification instead of every dead message")
    purge = queue_sub.add_parser("purge", help="delete dead-lettered messages")
    purge.add_argument("--dead", action="store_true", required=True, help="(required) only dead-lettered ones")
    purge.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 30d, 12h")
    purge.add_argument("--notifications", action="store_true",
                       help="dead notifications (platforms' subscriptions) instead of dead messages")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    for p_ in (listing, show, retry, purge):
        p_.add_argument("--config", required=True, type=Path)

    audit = sub.add_parser("audit", help="the audit trail in the chamber (works while gatewayd runs)")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="check the hash chain; name the first record that does not fit")
    export = audit_sub.add_parser("export", help="write records as FHIR AuditEvent resources (NDJSON) to stdout")
    export.add_argument("--since", required=True, metavar="WHEN",
                        help="a date (YYYY-MM-DD, hospital time) or an ISO date-time with offset")
    export.add_argument("--until", metavar="WHEN", help="only records before this date or date-time")
    export.add_argument("--format", choices=("fhir", "records"), default="fhir",
                        help="fhir: R4B AuditEvent (default); records: the chamber's rows as JSON")
    prune = audit_sub.add_parser("prune", help="remove records older than audit.retention (keeps the chain "
                                               "verifiable)")
    prune.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    find = audit_sub.add_parser("find", help="was this id asked for: the records naming it (ids the gateway did "
                                             "not issue are recorded by their keyed name)")
    find.add_argument("ids", nargs="+", metavar="ID", help="an id as a request gave it (percent-escapes allowed)")
    for p_ in (verify, export, prune, find):
        p_.add_argument("--config", required=True, type=Path)

    backup = sub.add_parser("backup", help="write a consistent copy of the chamber (works while gatewayd runs)")
    backup.add_argument("dest", type=Path, help="the copy's file (replaced whole, only once the new copy is "
                                                "complete and checked)")
    backup.add_argument("--config", required=True, type=Path)

    restore = sub.add_parser("restore", help="put a backup back as the chamber: checks it (integrity_check, "
                             "schema version, the audit chain) and keeps the replaced chamber aside; refused "
                             "while any gate runs on the chamber")
    restore.add_argument("file", type=Path, help="the backup (written by gatewayd backup)")
    restore.add_argument("--config", required=True, type=Path)

    reload_ = sub.add_parser("reload", help="SIGHUP to the gateway running this config (found through the "
                             "chamber's claims) and its outcome printed: what it applied, what needs a restart, "
                             "or why it refused (exit 1)")
    reload_.add_argument("--config", required=True, type=Path)
    reload_.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                         help="how long to wait for the gateway to report the outcome (default 30)")

    completion = sub.add_parser("completion", help="print the shell completion script (generated from this "
                                "command's parser)")
    completion.add_argument("shell", choices=("bash",))

    sub.add_parser("man", help="print the man page gatewayd(8) (roff; man -l - shows it)")

    status = sub.add_parser("status", help="the lock at a glance: the gateway, each HIS endpoint (up or down, "
                            "traffic, queue, dead letters), certificates, the chamber (works with or without a "
                            "running gatewayd)")
    status.add_argument("--config", required=True, type=Path)
    status.add_argument("--json", action="store_true", help="print it as JSON (for scripts)")
    status.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour the summary (auto: on a terminal, unless NO_COLOR is set)")

    sub.add_parser("console-password", help="print the hash of a password (asked on the terminal, or one line "
                                            "of stdin) for admin.operators[].password_hash")

    ref = sub.add_parser("config-reference", help="print the configuration reference (Markdown)")
    ref.add_argument("--update", type=Path, metavar="README",
                     help="rewrite the reference between the config-reference markers of this file instead")
    return p


def version_line() -> str:
    """``gatewayd VERSION (commit C)``: ``gateway/BUILD`` (written by ``make dist``) names the commit; a source
    checkout has none."""
    from importlib import metadata

    try:
        built, commit = Path(__file__).with_name("BUILD").read_text(encoding="utf-8").split()
    except (OSError, ValueError):
        built, commit = "0+unknown", "unknown: not built by make dist"
    try:
        version = metadata.version("gatewayd")
    except metadata.PackageNotFoundError:  # (the source tree, as make dist runs it for the man page)
        version = built
    return f"gatewayd {version} (commit {commit})"


def main(argv: list[str] | None = None) -> int:
    try:
        return _command(argv)
    except BrokenPipeError:
        # The reader went away (`gatewayd config-reference | head`): stop writing, like a command that got
        # SIGPIPE, without a traceback (and without the one the interpreter's final flush would print).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _command(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.path, probe=args.probe)
    if args.command == "run":
        return run(args.config, args.gate)
    if args.command == "his-sim":
        from hissim.cli import main as sim_main

        return sim_main(["--config", str(args.config)] + (["--log", str(args.log)] if args.log else [])
                        + (["--suspend-file", str(args.suspend_file)] if args.suspend_file else []))
    if args.command == "demo":
        from gateway.ops.demo import run_demo

        return run_demo(args.workdir)
    if args.command == "certs":
        from gateway.ops.devca import DevCAError, init_dev_ca

        try:
            paths = init_dev_ca(args.directory, platforms=tuple(args.platform or ("demo",)),
                                server_names=tuple(args.server_name or ("localhost", "127.0.0.1")))
        except (DevCAError, ValueError, OSError) as e:
            print(f"gatewayd certs init: {e}", file=sys.stderr)
            return 1
        for name, path in paths.items():
            print(f"{name}: {path}")
        return 0
    if args.command == "queue":
        return queue_command(args)
    if args.command == "audit":
        return audit_command(args)
    if args.command == "backup":
        return with_chamber(args, "backup", lambda chamber, config: _backup(chamber, args.dest))
    if args.command == "restore":
        return restore_command(args)
    if args.command == "reload":
        config, error = _load(args.config)
        if error:
            print(f"{error}\ngatewayd reload: the config does not load: nothing was signalled, the gateway keeps "
                  f"its running config", file=sys.stderr)
            return 1
        from gateway.ops.reloadctl import reload_command

        return reload_command(config, args.config, wait=args.wait)
    if args.command == "completion":
        from gateway.ops.clidoc import bash_completion

        print(bash_completion(_parser()), end="")
        return 0
    if args.command == "man":
        from gateway.ops.clidoc import man_page

        print(man_page(_parser(), version_line(), see_also=("systemctl(1)", "sqlite3(1)")), end="")
        return 0
    if args.command == "console-password":
        import getpass

        from gateway.ops.console import hash_password

        password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
        if len(password) < 12:
            print("gatewayd console-password: use at least 12 characters", file=sys.stderr)
            return 1
        print(hash_password(password))
        return 0
    if args.command == "status":
        config, error = _load(args.config)
        if error:
            print(error, file=sys.stderr)
            return 1
        from gateway.ops.status import status_command

        return status_command(config, as_json=args.json,
                              colour={"auto": None, "always": True, "never": False}[args.color])
    if args.command == "config-reference":
        if args.update:
            text = args.update.read_text(encoding="utf-8")
            start = text.index("\n", text.index("<!-- config-reference:start")) + 1
            end = text.index("<!-- config-reference:end -->")
            args.update.write_text(text[:start] + config_reference() + "\n" + text[end:], encoding="utf-8")
            return 0
        print(config_reference())
        return 0
    return 2


def _load(path: Path):
    from gateway.config.model import load_config
    from gateway.config.errors import ConfigError

    try:
        return load_config(path), None
    except ConfigError as e:  # includes a missing or unreadable file
        return None, str(e)


def check_config(path: Path, probe: bool = False) -> int:
    config, error = _load(path)
    if error:
        print(error, file=sys.stderr)
        return 1
    problems = probe_his_databases(config) if probe else []
    if problems:
        print("\n".join(f"{path}: {p}" for p in problems), file=sys.stderr)
        return 1
    print("ok")
    return 0


def probe_his_databases(config) -> list[str]:
    """``check-config --probe``: what each HIS database (kind: database) says about the config's view, table,
    columns and codes, as 'key path: problem'."""
    from adapters.inner.database import DatabaseLink

    if config.inner is None:
        return []
    problems = []
    for key, his in [("inner.his", config.inner.his)] + [(f"inner.endpoints[{i}]", e)
                                                          for i, e in enumerate(config.inner.endpoints)]:
        if his.kind == "database":
            link = DatabaseLink(his.database, peer=his.name, reactor=None)
            problems += [f"{key}.database.{p}" for p in link.probe()]
    return problems


def gate_problem(config, path: Path, gate: str) -> str | None:
    """Why ``config`` cannot run ``gate``: each gate's config names only its own side of the lock, so the
    outer (internet) process cannot even know where the HIS is, and the inner one has no internet listener."""
    if gate in ("both", "inner") and config.inner is None:
        return f"{path}: the inner gate needs an 'inner' section"
    if gate in ("both", "outer") and config.outer is None:
        return f"{path}: the outer gate needs an 'outer' section"
    if gate == "outer" and config.inner is not None:
        return (f"{path}: the outer gate's config must not contain the 'inner' section: the internet-side "
                f"process must not be able to reach the intranet (give it a config with only 'outer')")
    if gate == "inner" and (config.outer is not None or config.platforms):
        return (f"{path}: the inner gate's config must not contain 'outer' or 'platforms': the intranet-side "
                f"process must not listen on the internet side (give it a config with only 'inner')")
    return None


def _stop_after_failed_start(svc) -> None:
    """Undo a start that failed half-way, before the process exits: stop what is running, leaves first.
    What never started is left alone (Twisted's listener services cannot stop a port they never opened and
    would log that as an error); the chamber needs nothing — SQLite's file is consistent at any point."""
    from twisted.application.service import MultiService
    from twisted.internet import defer

    if isinstance(svc, MultiService):
        for child in reversed(list(svc)):
            _stop_after_failed_start(child)
        svc.running = 0
    elif svc.running:
        defer.maybeDeferred(svc.stopService).addErrback(lambda _failure: None)


def run(path: Path, gate: str = "both") -> int:
    config, error = _load(path)
    if not error:
        error = gate_problem(config, path, gate)
    if error:
        print(error, file=sys.stderr)
        return 1
    from twisted.internet import reactor

    from gateway.ops import logs
    from gateway.service import make_service

    logs.configure(config.logging.level, config.logging.format)
    import structlog

    log = structlog.get_logger("gateway")
    claim = _claim(config, path, gate, log)
    if isinstance(claim, int):
        return claim
    root = make_service(config, reactor, gate)
    try:
        root.privilegedStartService()
        root.startService()
    except Exception as e:  # a child that fails to start fails the whole start
        log.error("gateway.start_failed", error=str(e), error_type=type(e).__name__)
        print(f"gatewayd: cannot start: {e}", file=sys.stderr)
        _stop_after_failed_start(root)
        claim.release()
        return 1
    exit_code = [0]
    if claim.database is not None:  # a chamber in PostgreSQL: its claim kept (taken again after a failover)
        from twisted.internet import task

        from gateway.ops.claim import CLAIM_HELD_EXIT

        def keep_claim():
            lost = claim.database.keep()
            if lost is not None:  # another gateway took this gate while PostgreSQL had dropped ours: stop
                log.error("gateway.claim_lost", error=lost)
                exit_code[0] = CLAIM_HELD_EXIT
                if keeper.running:
                    keeper.stop()
                reactor.stop()

        keeper = task.LoopingCall(keep_claim)
        keeper.start(CLAIM_KEPT_EVERY, now=False)

    def stop():
        """SIGTERM/SIGINT: listeners stop first (reverse start order), sends in flight get up to
        daemon.shutdown_grace to be answered; what is still unanswered stays in the chamber and is resent,
        with its control id, after the restart."""
        from twisted.internet import defer

        log.info("gateway.stopping", grace=config.daemon.shutdown_grace)
        done = defer.Deferred()
        stopping = defer.maybeDeferred(root.stopService)

        def finished(result):
            if not done.called:
                done.callback(None)
            return result

        def grace_over():
            if not done.called:
                log.warning("gateway.stop_grace_exceeded", grace=config.daemon.shutdown_grace)
                done.callback(None)

        stopping.addBoth(finished)
        timer = reactor.callLater(config.daemon.shutdown_grace, grace_over)
        done.addCallback(lambda _: timer.cancel() if timer.active() else None)
        return done

    reactor.addSystemEventTrigger("before", "shutdown", stop)

    def reload_config():
        """SIGHUP: load the file again; a config that fails to load leaves the running one in place."""
        from gateway.ops.reload import reload

        new, problem = _load(path)
        if not problem:
            problem = gate_problem(new, path, gate)
        if problem:
            log.error("gateway.reload_refused", errors=problem.splitlines(), keeping="the running config")
            root.last_reload = {"at": reactor.seconds(), "outcome": "refused", "errors": problem.splitlines()}
            return
        try:
            applied = reload(root, new)
        except Exception as e:  # e.g. a certificate file that does not parse
            log.error("gateway.reload_refused", errors=[f"{type(e).__name__}: {e}"], keeping="the running config")
            root.last_reload = {"at": reactor.seconds(), "outcome": "refused", "errors": [f"{type(e).__name__}: {e}"]}
            return
        log.info("gateway.reloaded", applied=applied)
        root.last_reload = {"at": reactor.seconds(), "outcome": "applied", "applied": applied}

    import signal

    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(reload_config))
    from gateway.ops import sdnotify

    outer, inner = config.outer, config.inner
    status = [f"FHIR {outer.host}:{outer.port}" if outer and gate != "inner" else "",
              f"MLLP {inner.listen}" if inner and gate != "outer" else ""]
    sdnotify.notify(f"READY=1\nSTATUS={gate} gate(s): {', '.join(x for x in status if x)}")
    sdnotify.start_watchdog(reactor)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: sdnotify.notify("STOPPING=1"))
    log.info("gateway.ready", gate=gate, chamber=str(config.chamber.path),
             fhir=f"https://{outer.host}:{outer.port}{outer.base_path}" if outer and gate != "inner" else None,
             mllp=inner.listen if inner and gate != "outer" else None,
             his=f"{inner.his.host}:{inner.his.port}" if inner and gate != "outer" else None)
    # What start-up built (modules, config, FHIR models, the service tree: ~80,000 objects) lives as long as the
    # process: frozen, a full collection no longer walks it. Under a flood of connections, whose cycles are what
    # full collections find, each took 150-220 ms of the reactor, now 20-60 ms (bench/siege.py, docs/benchmarks.md).
    gc.collect()
    gc.freeze()
    reactor.run()
    claim.release()  # (the process's end would: held until the tree has stopped, never across a reload)
    log.info("gateway.stopped")
    return exit_code[0]


#: how often a gateway on a PostgreSQL chamber makes sure it still holds its claim there (seconds)
CLAIM_KEPT_EVERY = 5.0


def _claim(config, path: Path, gate: str, log):
    """This gate's claim on the chamber (gateway/ops/claim.py), taken before anything is opened or listens; or
    the exit code when it cannot be taken: CLAIM_HELD_EXIT when another process runs this gate on the chamber
    (the message names it), 1 when the claim file cannot be opened or written."""
    from gateway.ops.claim import CLAIM_HELD_EXIT, ROLES, Claim, ClaimError, ClaimHeld, Holder

    claim = Claim(config.chamber.path, gate, Holder.this_process(gate, path))
    try:
        claim.take()
    except ClaimHeld as e:
        held = e.holder
        log.error("gateway.claim_held", role=e.role, chamber=e.chamber, claim_file=str(e.path),
                  holder_pid=held.pid if held else None, holder_gate=held.gate if held else None,
                  holder_config=held.config if held else None, holder_since=held.since if held else None,
                  holder_user=held.user if held else None, holder_host=held.host if held else None)
        print(f"gatewayd: cannot start: {e}", file=sys.stderr)
        return CLAIM_HELD_EXIT
    except ClaimError as e:
        log.error("gateway.start_failed", error=str(e), error_type=type(e).__name__)
        print(f"gatewayd: cannot start: {e}", file=sys.stderr)
        return 1
    if config.chamber.backend != "sqlite":  # the same roles claimed in the database, for every host that reaches it
        from gateway.chamber.backends import backend_for
        from gateway.chamber.errors import ChamberClaimed, ChamberError

        holder = claim.holder
        try:
            claim.database = backend_for(config.chamber).claim(
                ROLES[gate], f"gatewayd {gate} pid {holder.pid} on {holder.host}")
            claim.database.take()
        except ChamberClaimed as e:
            claim.release()
            log.error("gateway.claim_held", role=e.role, chamber=e.chamber, holder=e.holder)
            print(f"gatewayd: cannot start: {e}", file=sys.stderr)
            return CLAIM_HELD_EXIT
        except ChamberError as e:
            claim.release()
            log.error("gateway.start_failed", error=str(e), error_type=type(e).__name__)
            print(f"gatewayd: cannot start: {e}", file=sys.stderr)
            return 1
    log.info("gateway.claimed", roles=list(claim.held), chamber=str(config.chamber.path))
    return claim


def with_chamber(args, command: str, run) -> int:
    """Load the config, open its chamber (next to a running gatewayd, WAL allows it), run
    ``run(chamber, config)``, close.  Logs go to stderr: stdout is the command's answer."""
    config, error = _load(args.config)
    if error:
        print(error, file=sys.stderr)
        return 1
    import time

    from gateway.ops import logs
    from gateway.chamber.backends import backend_for
    from gateway.chamber.engine import Chamber
    from gateway.chamber.errors import ChamberError

    logs.configure("warning", "console", stream=sys.stderr)
    try:
        chamber = Chamber(backend=backend_for(config.chamber), clock=time.time)
        chamber.open()
    except ChamberError as e:
        print(f"gatewayd {command}: {e}", file=sys.stderr)
        return 1
    try:
        return run(chamber, config)
    finally:
        chamber.close()


def _backup(chamber, dest: Path) -> int:
    from gateway.chamber.errors import ChamberError

    if chamber.backend.kind != "sqlite":
        print(f"gatewayd backup: refused: the chamber is on {chamber.backend.kind}, which is backed up with its own "
              f"tools (pg_dump; pg_basebackup with WAL archiving for a point in time): docs/chamber.md",
              file=sys.stderr)
        return 1
    dest = dest.resolve()
    if dest == Path(chamber.path).resolve():
        print("gatewayd backup: the copy cannot replace the chamber itself", file=sys.stderr)
        return 1
    if not dest.parent.is_dir():
        print(f"gatewayd backup: {dest.parent} is not a directory", file=sys.stderr)
        return 1
    try:
        counts = chamber.backup(dest)
    except (ChamberError, OSError, sqlite3.Error) as e:
        print(f"gatewayd backup: {e}", file=sys.stderr)
        return 1
    size = dest.stat().st_size
    print(f"backed up to {dest} ({size / 1e6:.1f} MB): " + ", ".join(f"{n} {t}" for t, n in counts.items()))
    return 0


def restore_command(args) -> int:
    config, error = _load(args.config)
    if error:
        print(error, file=sys.stderr)
        return 1
    from gateway.ops.claim import ClaimError, ClaimHeld
    from gateway.ops.restore import RestoreError, restore

    if config.chamber.backend != "sqlite":
        print(f"gatewayd restore: refused, nothing was changed: the chamber is on {config.chamber.backend}, which "
              f"is restored with its own tools (pg_restore): docs/chamber.md", file=sys.stderr)
        return 1
    try:
        done = restore(args.file, config.chamber.path, args.config)
    except ClaimHeld as e:
        who = e.holder.describe() if e.holder is not None else "a process that has not recorded itself yet"
        print(f"gatewayd restore: refused, nothing was changed: the {e.role} gate of the chamber {e.chamber} is "
              f"run by {who}: stop the gateway first (systemctl stop gatewayd)", file=sys.stderr)
        return 1
    except (RestoreError, ClaimError) as e:
        print(f"gatewayd restore: refused, nothing was changed: {e}", file=sys.stderr)
        return 1
    print("\n".join(done))
    return 0


def queue_command(args) -> int:
    return with_chamber(args, "queue", lambda chamber, config: _queue_dispatch(chamber, config, args))


def _queue_dispatch(chamber, config, args) -> int:
    if args.queue_command == "list" and args.notifications:
        return _queue_notifications(chamber, args.state, args.limit)
    if args.queue_command == "list" or (args.queue_command == "show" and args.id is None):
        return _queue_list(chamber, getattr(args, "state", None), getattr(args, "dest", None),
                           getattr(args, "direction", None), args.limit)
    if args.queue_command == "show":
        return _queue_show(chamber, args.id)
    if args.queue_command == "retry":
        return _queue_retry(chamber, config, args)
    return _queue_purge(chamber, args)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def _queue_list(chamber, state, peer, direction, limit) -> int:
    print(f"{'id':>6}  {'direction':9} {'peer':8} {'type':9} {'state':10} {'control id':21} {'tries':>5}  updated")
    for m in chamber.read().messages(state=state, peer=peer, direction=direction, limit=limit):
        print(f"{m.id:>6}  {m.direction:9} {m.peer:8} {m.type:9} {m.state:10} {m.control_id:21} {m.attempts:>5}"
              f"  {_when(m.updated)}")
    return 0


def _queue_notifications(chamber, state, limit) -> int:
    print(f"{'subscription/event':28} {'platform':10} {'what':10} {'focus':34} {'state':9} {'tries':>5}  updated"
          f"  last error")
    for n in chamber.read().notifications_in(state, limit=limit):
        print(f"{n.subscription_id + '/' + str(n.event):28} {n.platform:10} {n.what:10} {n.focus:34} {n.state:9}"
              f" {n.attempts:>5}  {_when(n.updated)}  {n.last_error or ''}")
    return 0


def _queue_show(chamber, message_id: int) -> int:
    reader = chamber.read()
    m = reader.message(message_id)
    if m is None:
        print(f"no message {message_id}", file=sys.stderr)
        return 1
    print(f"message {m.id}: {m.direction} {m.type} control id {m.control_id} peer {m.peer}")
    print(f"state {m.state}, {m.attempts} attempt(s), answer {m.answer_code or '-'} {m.answer_text or ''}")
    if m.last_error:
        print(f"last error: {m.last_error}")
    for at, state, detail in reader.message_events(m.id):
        print(f"  {_when(at)}  {state:10} {detail or ''}")
    return 0


def _queue_retry(chamber, config, args) -> int:
    import getpass
    from zoneinfo import ZoneInfo

    from adapters.inner.receiver import make_reprocessor
    from gateway.domain.slot_book import SlotBook
    from gateway.ops.queue import NotRetryable, retry, retry_all_dead

    reprocess = make_reprocessor(SlotBook(ZoneInfo(config.hospital.timezone)),
                                 config.inner.his.charset if config.inner else "utf-8",
                                 config.inner.z_segment_peers() if config.inner else ())
    who = f"operator {getpass.getuser()}"
    if args.notification or args.notifications:
        return _queue_retry_notifications(chamber, config, args, who)
    if args.all_dead:
        for line in retry_all_dead(chamber, reprocess, who=who):
            print(line)
        return 0
    try:
        print(retry(chamber, args.id, reprocess, who=who))
    except NotRetryable as e:
        print(f"gatewayd queue retry: {e}", file=sys.stderr)
        return 1
    return 0


def _queue_retry_notifications(chamber, config, args, who: str) -> int:
    from gateway.ops.queue import NotRetryable, retry_dead_notifications, retry_notification
    from gateway.service import notify_grants

    granted = notify_grants(config.platforms)
    if args.notification is None:
        if not args.all_dead:
            print("gatewayd queue retry: --notifications goes with --all-dead (or give --notification SUB/EVENT)",
                  file=sys.stderr)
            return 2
        for line in retry_dead_notifications(chamber, granted, who=who):
            print(line)
        return 0
    subscription_id, _, event = args.notification.rpartition("/")
    if not subscription_id or not event.isdigit():
        print("gatewayd queue retry: --notification is SUBSCRIPTION/EVENT, e.g. s-1a2b/7", file=sys.stderr)
        return 2
    try:
        print(retry_notification(chamber, subscription_id, int(event), granted, who=who))
    except NotRetryable as e:
        print(f"gatewayd queue retry: {e}", file=sys.stderr)
        return 1
    return 0


def _queue_purge(chamber, args) -> int:
    from gateway.config.fields import parse_duration
    from gateway.ops.queue import count_purgeable, purge_dead

    try:
        age = parse_duration(args.older_than)
    except ValueError as e:
        print(f"gatewayd queue purge: --older-than: {e}", file=sys.stderr)
        return 2
    kind = "notification(s)" if args.notifications else "message(s)"
    if args.notifications:
        from gateway.ops.queue import count_purgeable_notifications as count_purgeable
        from gateway.ops.queue import purge_dead_notifications as purge_dead
    n = count_purgeable(chamber, age)
    if n == 0:
        print("nothing to purge")
        return 0
    if not args.yes:
        try:
            answer = input(f"delete {n} dead-lettered {kind} older than {args.older_than}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    print(f"deleted {purge_dead(chamber, age)} dead-lettered {kind}")
    return 0


def audit_command(args) -> int:
    return with_chamber(args, "audit", lambda chamber, config: _audit_dispatch(chamber, config, args))


def _audit_dispatch(chamber, config, args) -> int:
    if args.audit_command == "verify":
        return _audit_verify(chamber)
    if args.audit_command == "export":
        return _audit_export(chamber, config, args)
    if args.audit_command == "find":
        return _audit_find(chamber, args)
    return _audit_prune(chamber, config, args)


def _audit_verify(chamber) -> int:
    from gateway.domain.audit import verify

    verdict = verify(chamber.read())
    if not verdict.ok:
        print(f"audit chain BROKEN at record {verdict.broken_at}: {verdict.reason}")
        print(f"({verdict.checked} record(s) after the anchor (record {verdict.anchor_seq}) verified before it)")
        return 1
    if verdict.head_seq == verdict.anchor_seq:
        print(f"ok: no record after the anchor (record {verdict.anchor_seq})")
    else:
        print(f"ok: {verdict.checked} record(s) verified, records {verdict.anchor_seq + 1}-{verdict.head_seq}"
              f" (anchor: record {verdict.anchor_seq})")
    print(f"head: record {verdict.head_seq} sha256 {verdict.head_hash}")
    return 0


def _when_arg(text: str, tz) -> float:
    """'2026-11-01' (midnight, hospital time) or an ISO date-time ('2026-11-01T08:00:00+08:00') -> timestamp."""
    from datetime import date

    text = text.strip()
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            return datetime(d.year, d.month, d.day, tzinfo=tz).timestamp()
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a date (YYYY-MM-DD) or an ISO date-time") from None
    return (when if when.tzinfo else when.replace(tzinfo=tz)).timestamp()


def _audit_export(chamber, config, args) -> int:
    import json
    from zoneinfo import ZoneInfo

    from gateway.domain.audit import audit_event

    tz = ZoneInfo(config.hospital.timezone)
    try:
        since = _when_arg(args.since, tz)
        until = _when_arg(args.until, tz) if args.until else None
    except ValueError as e:
        print(f"gatewayd audit export: {e}", file=sys.stderr)
        return 2
    until_us = None if until is None else round(until * 1_000_000)
    out = sys.stdout
    for row in chamber.read().audit_records(since_us=round(since * 1_000_000)):
        if until_us is not None and row.at_us >= until_us:
            continue
        data = audit_event(row, tz) if args.format == "fhir" else row.__dict__
        out.write(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")
    out.flush()
    return 0


def _audit_find(chamber, args) -> int:
    """For each id: the name the audit gives it when the chamber does not hold it (its keyed name), then
    every record naming it either way, as rows (JSON).  Exit 1 when no record names any of them."""
    import json
    from urllib.parse import unquote

    from gateway.domain.audit import keyed_name

    reader = chamber.read()
    key = reader.audit_key()
    wanted: set[str] = set()
    for given in args.ids:
        resource_id, name = unquote(given), keyed_name(key, unquote(given))
        print(f"{resource_id}: recorded as {name} (or as itself, if the chamber holds it)")
        wanted |= {resource_id, name}
    found = 0
    for row in reader.audit_records():
        if row.resource_id in wanted:
            found += 1
            print(json.dumps(row.__dict__, ensure_ascii=False, separators=(",", ":")))
    if not found:
        print("no record names it")
    sys.stdout.flush()
    return 0 if found else 1


def _audit_prune(chamber, config, args) -> int:
    import getpass
    import time

    from gateway.domain.audit import prunable, prune, verify

    verdict = verify(chamber.read())
    if not verdict.ok:
        print(f"gatewayd audit prune: the chain is broken at record {verdict.broken_at} ({verdict.reason}); "
              f"nothing removed — keep the evidence and look at `gatewayd audit verify` first", file=sys.stderr)
        return 1
    cutoff = time.time() - config.audit.retention
    n = prunable(chamber.read(), cutoff)
    if n == 0:
        print(f"nothing to remove: no record is older than {_when(cutoff)}")
        return 0
    if not args.yes:
        try:
            answer = input(f"remove {n} audit record(s) written before {_when(cutoff)} (retention "
                           f"{config.audit.retention / 86400:g} days)? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 1
    removed, anchor = chamber.transact_now(lambda tx: prune(tx, cutoff, f"operator {getpass.getuser()}"))
    if not removed:
        print(f"nothing to remove: no record is older than {_when(cutoff)}")
        return 0
    print(f"removed {removed} audit record(s) written before {_when(cutoff)}; the chain now starts after "
          f"record {anchor}, whose hash is kept as its anchor")
    return 0


def config_reference() -> str:
    from gateway.config.model import GatewayConfig
    from gateway.config.reference import describe

    def cell(text) -> str:  # a '|' in a value (an ER7 example) must not end the table's cell
        return str(text).replace("|", "\\|")

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, doc in describe(GatewayConfig):
        lines.append(f"| `{key}` | {cell(type_name)} | {cell(default)} | {cell(doc)} |")
    return "\n".join(lines)
