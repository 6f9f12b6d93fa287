"""gatewayd's own MLLP listener and sender as small processes, for tests against real sockets and peers.

    python -m tests.interop.mllp_tool listen [--tls CERT KEY CA] [--release 2]
        Listens on a free loopback port with `MLLPServerFactory` and answers every message as the gate's
        answer policy says for an accepted message (`build_answers`: AA, or CA/AA as MSH-15/16 ask). Prints
        one JSON line {"port": N} once listening; runs until killed.

    python -m tests.interop.mllp_tool send --port N [--ca CA [--cert CERT --key KEY]] [--release 2]
                                           [--charset C] FILE...
        Sends each FILE (one encoded HL7 message, bytes as they are) with `MLLPClient`, one after the other,
        resending on PeerUnavailable as the relay does (at most 3 attempts). Prints one JSON line per
        message: control_id, ok, attempts, and the answer (MSA-1, MSA-2, raw bytes in base64) or the error.

Nothing here stands in for gatewayd: these are its real MLLP classes on the real reactor.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from datetime import datetime
from pathlib import Path

import structlog
from twisted.internet import defer, endpoints, task

from adapters.hl7.ack import build_answers, read_ack
from adapters.hl7.er7 import parse
from adapters.inner.client import MLLPClient, PeerUnavailable
from adapters.inner.listener import MLLPServerFactory
from adapters.tls import client_options, server_options


class AcceptAll:
    """Answers every message as accepted: the answer policy without a chamber."""

    def handle(self, message, peer):
        return build_answers(message, "accepted", sending_application="MLLPTOOL", sending_facility="TEST",
                             control_id=lambda: "T" + message.control_id[:18], now=datetime.now())


async def listen(reactor, args) -> None:
    tls = server_options(*args.tls) if args.tls else None
    factory = MLLPServerFactory(AcceptAll(), clock=reactor, release=args.release, tls=tls, idle_timeout=30)
    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    print(json.dumps({"port": port.getHost().port}), flush=True)
    await defer.Deferred()  # until killed


async def send(reactor, args) -> int:
    tls = client_options(args.hostname, args.ca, args.cert, args.key) if args.ca else None
    endpoint = endpoints.TCP4ClientEndpoint(reactor, args.host, args.port, timeout=5)
    client = MLLPClient(reactor, endpoint, clock=reactor, release=args.release, tls=tls, connect_timeout=5,
                        default_charset=args.charset)
    failures = 0
    for path in args.files:
        payload = Path(path).read_bytes()
        control_id = parse(payload).control_id
        result = {"file": path, "control_id": control_id}
        for attempt in range(1, 4):
            result["attempts"] = attempt
            try:
                answer = await client.send(payload, control_id, args.timeout)
            except PeerUnavailable as e:  # e.g. a peer that closes after each message: resend, as the relay
                result.update(ok=False, error=f"{type(e).__name__}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - report it, the test decides
                result.update(ok=False, error=f"{type(e).__name__}: {e}")
                break
            code, answered, text = read_ack(answer)
            result.update(ok=True, code=code, answered=answered, text=text, error=None,
                          raw=base64.b64encode(answer.raw).decode("ascii"))
            break
        failures += not result["ok"]
        print(json.dumps(result, ensure_ascii=False), flush=True)
    await client.close()
    return 1 if failures else 0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="mllp_tool")
    sub = p.add_subparsers(dest="command", required=True)
    lp = sub.add_parser("listen")
    lp.add_argument("--tls", nargs=3, metavar=("CERT", "KEY", "CA"))
    lp.add_argument("--release", type=int, default=1)
    sp = sub.add_parser("send")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, required=True)
    sp.add_argument("--ca", help="TLS: the CA that signs the listener's certificate")
    sp.add_argument("--cert", help="TLS: our client certificate")
    sp.add_argument("--key", help="TLS: its private key")
    sp.add_argument("--hostname", default="127.0.0.1", help="name checked against the server certificate")
    sp.add_argument("--release", type=int, default=1)
    sp.add_argument("--timeout", type=float, default=5.0)
    sp.add_argument("--charset", default="utf-8", help="charset of answers that leave MSH-18 empty")
    sp.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout is for results
    if args.command == "send" and (args.cert or args.key) and not args.ca:
        p.error("--cert/--key need --ca")

    def run(reactor):
        coroutine = listen(reactor, args) if args.command == "listen" else send(reactor, args)
        d = defer.ensureDeferred(coroutine)
        d.addCallback(lambda code: sys.exit(code) if code else None)
        return d

    task.react(run)


if __name__ == "__main__":
    main()
