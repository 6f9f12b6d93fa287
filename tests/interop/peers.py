"""MLLP servers built with other people's libraries, used unmodified, each in a thread of the test process.

* `Hl7apyPeer` - ``hl7apy.mllp.MLLPServer`` (socketserver threads) with an ``AbstractHandler`` that parses
  the message with hl7apy and answers with an ACK built by hl7apy (``Message('ACK')``, ``to_mllp()``). Like
  hl7apy's server, it takes one message per connection and then closes it.
* `PythonHl7Peer` - python-hl7's asyncio ``hl7.mllp.start_hl7_server`` on its own event loop; each message
  is read with ``readblock`` (so the raw bytes are kept), parsed with ``hl7.parse`` and answered with
  ``Message.create_ack()`` through ``writemessage``.

Both record what they received (``received``: raw bytes / decoded text) so tests can check our messages
arrived intact.
"""

from __future__ import annotations

import asyncio
import threading

import hl7
import hl7.mllp
from hl7apy.core import Message as Hl7apyMessage
from hl7apy.mllp import AbstractHandler, MLLPRequestHandler, MLLPServer
from hl7apy.parser import parse_message


class Hl7apyPeer:
    def __init__(self, message_types: list[str], encoding: str = "utf-8"):
        self.received: list[str] = []
        self.parsed_control_ids: list[str] = []
        peer = self

        class Handler(AbstractHandler):
            def reply(self):
                text = self.incoming_message
                peer.received.append(text)
                incoming = parse_message(text, find_groups=False)
                control_id = incoming.msh.msh_10.value
                peer.parsed_control_ids.append(control_id)
                ack = Hl7apyMessage("ACK", version=incoming.msh.msh_12.value)
                ack.msh.msh_3 = "HL7APY"
                ack.msh.msh_4 = "PEER"
                ack.msh.msh_9 = "ACK^" + incoming.msh.msh_9.msh_9_2.value + "^ACK"
                ack.msh.msh_10 = "H" + control_id[:19]
                ack.msh.msh_11 = "P"
                if incoming.msh.msh_18.value:
                    ack.msh.msh_18 = incoming.msh.msh_18.value
                ack.msa.msa_1 = "AA"
                ack.msa.msa_2 = control_id
                return ack.to_mllp()

        class RequestHandler(MLLPRequestHandler):
            pass

        RequestHandler.encoding = encoding
        self.server = MLLPServer("127.0.0.1", 0, {t: (Handler,) for t in message_types}, timeout=5,
                                 request_handler_class=RequestHandler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="hl7apy-peer", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class PythonHl7Peer:
    def __init__(self, encoding: str = "utf-8"):
        self.encoding = encoding
        self.received: list[bytes] = []
        self.parsed_control_ids: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="python-hl7-peer", daemon=True)
        self.server = None
        self.port = None

    async def _connection(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter):
        try:
            while not reader.at_eof():
                block = await reader.readblock()
                self.received.append(block)
                message = hl7.parse(block.decode(self.encoding))
                self.parsed_control_ids.append(str(message.segment("MSH")[10]))
                writer.writemessage(message.create_ack(application="PYHL7", facility="PEER"))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    async def _start(self):
        self.server = await hl7.mllp.start_hl7_server(self._connection, "127.0.0.1", 0, encoding=self.encoding)
        return self.server.sockets[0].getsockname()[1]

    def __enter__(self):
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(5)
        return self

    def __exit__(self, *exc):
        async def stop():
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
