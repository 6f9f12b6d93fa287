#!/usr/bin/env python3
"""txHL7's Twisted MLLP server (``txHL7.mllp.MLLPFactory``) with an ``AbstractHL7Receiver``: each message
is parsed with python-hl7 (``hl7.parse``) and answered with its ``create_ack()`` (AA). No storage.

    python bench/peers/txhl7_server.py --port 2575
"""

import argparse

from twisted.internet import defer, reactor
from txHL7.mllp import MLLPFactory
from txHL7.receiver import AbstractHL7Receiver


class AckReceiver(AbstractHL7Receiver):
    def handleMessage(self, message_container):
        return defer.succeed(message_container.ack())

    def getCodec(self):
        return "utf-8", "strict"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=2575)
    reactor.listenTCP(ap.parse_args().port, MLLPFactory(AckReceiver()), interface="127.0.0.1")
    reactor.run()
