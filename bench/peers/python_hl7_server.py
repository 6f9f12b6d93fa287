#!/usr/bin/env python3
"""python-hl7's asyncio MLLP server (``hl7.mllp.start_hl7_server``), as its documentation shows it: each
message is read with ``readmessage()`` (which parses it with ``hl7.parse``) and answered with
``Message.create_ack()`` (AA, MSA-2 = MSH-10). No storage: the ACK says "received", not "stored".

    python bench/peers/python_hl7_server.py --port 2575
"""

import argparse
import asyncio

import hl7.mllp


async def connection(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
    try:
        while not reader.at_eof():
            message = await reader.readmessage()
            writer.writemessage(message.create_ack())
            await writer.drain()
    except asyncio.IncompleteReadError:
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await hl7.mllp.start_hl7_server(connection, "127.0.0.1", port, encoding="utf-8")
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=2575)
    asyncio.run(main(ap.parse_args().port))
